//! Every metric hearth exports, each named once, here (CONTRACT §7), and their Prometheus text
//! rendering.
//!
//! Counters and histograms are per process (atomics, updated where the thing happens). The
//! state of the shared queue (depth, pending, dead letters, the loss accounting) is read from
//! the queue seam at scrape time (Redis on the servers, the SQLite file embedded) by
//! [`render`], so any role process can show it. Labels are kept to small
//! fixed sets (lane, reason, source, severity, dependency): never a sensor or a house.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, RwLock};

use crate::event::Reason;

mod render;
pub use render::render;

/// A monotonically increasing count.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (stored as f64 bits).
#[derive(Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// A histogram with explicit bucket bounds (in the metric's unit).
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in millionths of the unit, so it stays an integer atomic.
    sum_micro: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micro: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micro
            .fetch_add((v.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }
}

/// A family of metrics of one name, one per label value (one label).
pub struct Family<T> {
    label: &'static str,
    members: RwLock<BTreeMap<String, std::sync::Arc<T>>>,
    make: fn() -> T,
}

impl<T> Family<T> {
    const fn new(label: &'static str, make: fn() -> T) -> Self {
        Family {
            label,
            members: RwLock::new(BTreeMap::new()),
            make,
        }
    }

    pub fn with(&self, value: &str) -> std::sync::Arc<T> {
        if let Some(m) = self.members.read().ok().and_then(|m| m.get(value).cloned()) {
            return m;
        }
        let mut members = match self.members.write() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        members
            .entry(value.to_string())
            .or_insert_with(|| std::sync::Arc::new((self.make)()))
            .clone()
    }

    fn snapshot(&self) -> Vec<(String, std::sync::Arc<T>)> {
        self.members
            .read()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }
}

/// Receive → stored, seconds: from 1 ms to 30 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Events per stored batch.
const BATCH_BUCKETS: &[f64] = &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0];
/// One batch write, seconds.
const STORE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

pub struct Metrics {
    /// Events appended to the lanes, by source (`mqtt`, `http`).
    pub received: Family<Counter>,
    /// Rows inserted into `events`.
    pub stored: Counter,
    /// Events whose row was already stored.
    pub duplicates: Counter,
    /// Messages or events refused, by reason (at ingest and by workers).
    pub rejected: Family<Counter>,
    /// Messages that hold no reading and nothing wrong (housekeeping), by ecosystem.
    pub ignored: Family<Counter>,
    /// Receive → stored latency, by lane kind (`critical`, `routine`).
    pub latency: Family<Histogram>,
    /// Events per batch written by a worker.
    pub batch_events: Histogram,
    /// Duration of a batch write.
    pub store_seconds: Histogram,
    /// Errors of a dependency (`redis`, `postgres`, `mqtt`), each followed by a retry.
    pub dependency_errors: Family<Counter>,
    /// Readings missing in a sensor's `seq` (a jump from n to n+k counts k-1).
    pub sequence_gaps: Counter,
    /// The broker's own count of dropped messages, read from `$SYS`.
    pub broker_dropped: Gauge,
    /// 1 while the ingest holds routine messages at the broker.
    pub ingest_paused: Gauge,
    /// Broker sessions (ingest slots) this process holds.
    pub ingest_slots: Gauge,
    /// Messages the ingest held back for their sensor's order (a `seq` gap), and of them the
    /// ones appended after `ingest_order_wait_ms` without the readings before them.
    pub order_waits: Counter,
    pub order_gave_up: Counter,
    /// What retention removed, by what (`partitions` dropped, `readings` deleted, `alerts`).
    pub expired: Family<Counter>,
    /// Alerts raised, by severity.
    pub alerts: Family<Counter>,
    /// 1 while the circuit to a dependency is open.
    pub circuit_open: Family<Gauge>,
    /// What the embedded broker refused, by reason (`bad_credentials`, `anonymous`,
    /// `forbidden`, `subscription`, `too_many_connections`, `too_many_logins`).
    pub mqtt_refused: Family<Counter>,
    /// Pauses the embedded broker made in the publishes of a client whose house published past
    /// `mqtt_publishes_per_second`.
    pub mqtt_throttled: Counter,
    /// WebSocket clients the API disconnected, by reason (`too_slow`, `no_pong`,
    /// `too_many_messages`).
    pub ws_closed: Family<Counter>,
    /// API requests refused past a rate, by which (`requests`: a house token's own; `lookups`:
    /// the store lookups of tokens never seen or seen unknown).
    pub api_refused: Family<Counter>,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    received: Family::new("source", Counter::default),
    stored: Counter::default(),
    duplicates: Counter::default(),
    rejected: Family::new("reason", Counter::default),
    ignored: Family::new("ecosystem", Counter::default),
    latency: Family::new("lane", || Histogram::new(LATENCY_BUCKETS)),
    batch_events: Histogram::new(BATCH_BUCKETS),
    store_seconds: Histogram::new(STORE_BUCKETS),
    dependency_errors: Family::new("dependency", Counter::default),
    sequence_gaps: Counter::default(),
    broker_dropped: Gauge::default(),
    ingest_paused: Gauge::default(),
    ingest_slots: Gauge::default(),
    order_waits: Counter::default(),
    order_gave_up: Counter::default(),
    expired: Family::new("what", Counter::default),
    alerts: Family::new("severity", Counter::default),
    circuit_open: Family::new("dependency", Gauge::default),
    mqtt_refused: Family::new("reason", Counter::default),
    mqtt_throttled: Counter::default(),
    ws_closed: Family::new("reason", Counter::default),
    api_refused: Family::new("rate", Counter::default),
});

pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// Count a rejection under its reason.
pub fn rejected(reason: Reason, n: u64) {
    METRICS.rejected.with(reason.as_str()).add(n);
}

/// Count a dependency error.
pub fn dependency_error(dependency: &str) {
    METRICS.dependency_errors.with(dependency).add(1);
}

/// Dependency → whether its circuit is open, in this process.
pub fn circuits() -> BTreeMap<String, bool> {
    METRICS
        .circuit_open
        .snapshot()
        .into_iter()
        .map(|(d, g)| (d, g.get() > 0.0))
        .collect()
}

/// Every metric name hearth exports, for the dashboard and alert files' consistency test.
pub const NAMES: &[&str] = &[
    "hearth_events_received_total",
    "hearth_events_stored_total",
    "hearth_events_duplicate_total",
    "hearth_events_rejected_total",
    "hearth_messages_ignored_total",
    "hearth_event_latency_seconds",
    "hearth_batch_events",
    "hearth_store_seconds",
    "hearth_dependency_errors_total",
    "hearth_sequence_gaps_total",
    "hearth_broker_dropped_messages_total",
    "hearth_ingest_paused",
    "hearth_ingest_slots",
    "hearth_ingest_order_waits_total",
    "hearth_ingest_order_gave_up_total",
    "hearth_expired_total",
    "hearth_alerts_total",
    "hearth_circuit_open",
    "hearth_mqtt_refused_total",
    "hearth_mqtt_throttled_total",
    "hearth_ws_closed_total",
    "hearth_api_refused_total",
    "hearth_dead_letters_expired_total",
    "hearth_queue_depth",
    "hearth_queue_pending",
    "hearth_dead_letters",
    "hearth_accounting_events_total",
    "hearth_accounting_in_flight_events",
    "hearth_consumers",
    "hearth_process_role",
    "hearth_build_info",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_cpu_seconds_total",
    "process_start_time_seconds",
    "process_open_fds",
];

/// User + system CPU seconds of a process, from /proc (Linux reports them in 1/100 s).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Peak resident memory of a process in KiB (VmHWM).
pub fn peak_rss_kb(pid: u32) -> Option<u64> {
    proc_status_kb(pid, "VmHWM:")
}

/// Resident memory of a process in KiB (VmRSS).
pub fn rss_kb(pid: u32) -> Option<u64> {
    proc_status_kb(pid, "VmRSS:")
}

fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
