//! Every metric hearth exports, each named once, here (CONTRACT §7), and their Prometheus text
//! rendering.
//!
//! Counters and histograms are per process (atomics, updated where the thing happens). The
//! state of the shared queue (depth, pending, dead letters, the loss accounting) is read from
//! the queue seam at scrape time (Redis on the servers, the SQLite file embedded) by
//! [`render`], so any role process can show it. Labels are kept to small
//! fixed sets (lane, reason, source, severity, dependency): never a sensor or a house.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, RwLock};

use crate::event::Reason;

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
    /// Alerts raised, by severity.
    pub alerts: Family<Counter>,
    /// 1 while the circuit to a dependency is open.
    pub circuit_open: Family<Gauge>,
    /// What the embedded broker refused, by reason (`bad_credentials`, `anonymous`,
    /// `forbidden`, `subscription`, `too_many_connections`).
    pub mqtt_refused: Family<Counter>,
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
    alerts: Family::new("severity", Counter::default),
    circuit_open: Family::new("dependency", Gauge::default),
    mqtt_refused: Family::new("reason", Counter::default),
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
    "hearth_alerts_total",
    "hearth_circuit_open",
    "hearth_mqtt_refused_total",
    "hearth_dead_letters_expired_total",
    "hearth_queue_depth",
    "hearth_queue_pending",
    "hearth_dead_letters",
    "hearth_accounting_events",
    "hearth_consumers",
    "hearth_process_role",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_cpu_seconds_total",
    "process_start_time_seconds",
    "process_open_fds",
];

/// The process's own metrics, then the queue's (its status, when it answered), in the
/// Prometheus text format.
pub fn render(role: &str, queue: Option<&crate::status::Status>) -> String {
    let m = metrics();
    let mut out = String::with_capacity(8 * 1024);
    family_counter(
        &mut out,
        "hearth_events_received_total",
        "Events appended to the lanes by this process, by source.",
        &m.received,
    );
    scalar(
        &mut out,
        "hearth_events_stored_total",
        "counter",
        "Rows inserted into events by this process.",
        m.stored.get() as f64,
    );
    scalar(
        &mut out,
        "hearth_events_duplicate_total",
        "counter",
        "Events this process found already stored (redeliveries, duplicate publishes).",
        m.duplicates.get() as f64,
    );
    family_counter(
        &mut out,
        "hearth_events_rejected_total",
        "Messages or events refused into the dead-letter stream, by reason.",
        &m.rejected,
    );
    family_counter(
        &mut out,
        "hearth_messages_ignored_total",
        "Messages holding no reading and nothing wrong (bridge logs, device housekeeping), by ecosystem.",
        &m.ignored,
    );
    family_histogram(
        &mut out,
        "hearth_event_latency_seconds",
        "Receive to stored latency of events, by lane.",
        &m.latency,
    );
    histogram(
        &mut out,
        "hearth_batch_events",
        "Events per batch written by a worker.",
        "",
        &m.batch_events,
    );
    histogram(
        &mut out,
        "hearth_store_seconds",
        "Duration of one batch write to PostgreSQL.",
        "",
        &m.store_seconds,
    );
    family_counter(
        &mut out,
        "hearth_dependency_errors_total",
        "Errors talking to a dependency, each retried with backoff.",
        &m.dependency_errors,
    );
    scalar(
        &mut out,
        "hearth_sequence_gaps_total",
        "counter",
        "Readings missing from sensors' seq counters: lost before reaching hearth.",
        m.sequence_gaps.get() as f64,
    );
    scalar(
        &mut out,
        "hearth_broker_dropped_messages_total",
        "counter",
        "The broker's count of dropped messages ($SYS/broker/publish/messages/dropped).",
        m.broker_dropped.get(),
    );
    scalar(
        &mut out,
        "hearth_ingest_paused",
        "gauge",
        "1 while the ingest holds routine messages at the broker.",
        m.ingest_paused.get(),
    );
    family_counter(
        &mut out,
        "hearth_alerts_total",
        "Alerts raised, by severity.",
        &m.alerts,
    );
    family_counter(
        &mut out,
        "hearth_mqtt_refused_total",
        "Connections, logins, publishes and subscriptions the embedded broker refused, by reason.",
        &m.mqtt_refused,
    );
    header(
        &mut out,
        "hearth_circuit_open",
        "gauge",
        "1 while the circuit to a dependency is open.",
    );
    for (dep, g) in m.circuit_open.snapshot() {
        let _ = writeln!(
            out,
            "hearth_circuit_open{{dependency=\"{dep}\"}} {}",
            g.get()
        );
    }
    header(
        &mut out,
        "hearth_process_role",
        "gauge",
        "The role of this process (join on instance).",
    );
    let _ = writeln!(out, "hearth_process_role{{role=\"{role}\"}} 1");
    process(&mut out);
    if let Some(status) = queue {
        queue_metrics(&mut out, status);
    }
    out
}

fn queue_metrics(out: &mut String, s: &crate::status::Status) {
    header(
        out,
        "hearth_queue_depth",
        "gauge",
        "Events queued in a lane (appended, not yet stored or dead-lettered).",
    );
    for l in &s.lanes {
        let _ = writeln!(out, "hearth_queue_depth{{lane=\"{}\"}} {}", l.lane, l.depth);
    }
    header(
        out,
        "hearth_queue_pending",
        "gauge",
        "Entries of a lane delivered to a worker and not yet acknowledged.",
    );
    for l in &s.lanes {
        let _ = writeln!(
            out,
            "hearth_queue_pending{{lane=\"{}\"}} {}",
            l.lane, l.pending
        );
    }
    scalar(
        out,
        "hearth_dead_letters",
        "gauge",
        "Entries in the dead-letter stream.",
        s.dead_letters as f64,
    );
    scalar(
        out,
        "hearth_dead_letters_expired_total",
        "counter",
        "Dead letters removed by their retention (dead_letter_max_age_secs, dead_letter_max_count).",
        s.dead_letters_expired as f64,
    );
    header(
        out,
        "hearth_accounting_events",
        "gauge",
        "Loss accounting of all processes: received = stored + duplicates + dead_lettered + in_flight.",
    );
    let e = &s.events;
    for (state, v) in [
        ("received", e.received),
        ("stored", e.stored),
        ("duplicates", e.duplicates),
        ("dead_lettered", e.dead_lettered),
        ("in_flight", e.in_flight),
        ("rejected_at_ingest", e.rejected_at_ingest),
    ] {
        let _ = writeln!(out, "hearth_accounting_events{{state=\"{state}\"}} {v}");
    }
    header(
        out,
        "hearth_consumers",
        "gauge",
        "Worker consumers alive, by pool.",
    );
    let mut pools: Vec<_> = s.consumers_alive.iter().collect();
    pools.sort();
    for (pool, n) in pools {
        let _ = writeln!(out, "hearth_consumers{{pool=\"{pool}\"}} {n}");
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn scalar(out: &mut String, name: &str, kind: &str, help: &str, v: f64) {
    header(out, name, kind, help);
    let _ = writeln!(out, "{name} {v}");
}

fn family_counter(out: &mut String, name: &str, help: &str, f: &Family<Counter>) {
    header(out, name, "counter", help);
    for (value, c) in f.snapshot() {
        let _ = writeln!(out, "{name}{{{}=\"{value}\"}} {}", f.label, c.get());
    }
}

fn family_histogram(out: &mut String, name: &str, help: &str, f: &Family<Histogram>) {
    header(out, name, "histogram", help);
    for (value, h) in f.snapshot() {
        histogram_lines(out, name, &format!("{}=\"{value}\"", f.label), &h);
    }
}

fn histogram(out: &mut String, name: &str, help: &str, labels: &str, h: &Histogram) {
    header(out, name, "histogram", help);
    histogram_lines(out, name, labels, h);
}

fn histogram_lines(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    let sep = if labels.is_empty() { "" } else { "," };
    let mut cumulative = 0;
    for (bound, bucket) in h.bounds.iter().zip(&h.buckets) {
        cumulative += bucket.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
        );
    }
    let count = h.count.load(Ordering::Relaxed);
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
    let sum = h.sum_micro.load(Ordering::Relaxed) as f64 / 1e6;
    if labels.is_empty() {
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {count}");
    } else {
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// The standard process metrics, from /proc/self.
fn process(out: &mut String) {
    let pid = std::process::id();
    if let Some(kb) = rss_kb(pid) {
        scalar(
            out,
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            (kb * 1024) as f64,
        );
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
        && let Some((_, rest)) = stat.rsplit_once(')')
    {
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        scalar(
            out,
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time spent in seconds.",
            (ticks(11) + ticks(12)) / 100.0,
        );
        scalar(
            out,
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            ticks(20),
        );
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("btime"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        });
        if let Some(boot) = boot {
            scalar(
                out,
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since unix epoch in seconds.",
                boot + ticks(19) / 100.0,
            );
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        scalar(
            out,
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            fds.count() as f64,
        );
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.5, 1.7, 9.0] {
            h.observe(v);
        }
        let mut out = String::new();
        histogram_lines(&mut out, "x", "lane=\"a\"", &h);
        assert!(out.contains("x_bucket{lane=\"a\",le=\"1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{lane=\"a\",le=\"2\"} 3\n"), "{out}");
        assert!(
            out.contains("x_bucket{lane=\"a\",le=\"+Inf\"} 4\n"),
            "{out}"
        );
        assert!(out.contains("x_sum{lane=\"a\"} 12.7\n"), "{out}");
    }
}
