//! The one intake: what the MQTT ingest, the embedded broker and `POST /events` share, from a
//! decoded message to its durable append: one dead letter per message, the counts, one
//! backpressure gate with one meaning of the watermarks, and the append itself.
//!
//! Each source decodes ([`Intake::decode`], or its own request codec for HTTP), asks whether the
//! gate [`holds`](Intake::holds) the message back, and appends ([`Intake::append`]): nothing is
//! acknowledged upstream (PUBACK, 202) before that append returns, and what was received and
//! refused is counted only once it is durable. Holding means what it can for each source: the
//! ingest leaves messages at the broker, the embedded broker stops reading its clients, HTTP
//! answers 503.
//!
//! The gate closes when the routine lanes hold `queue_high_watermark` events and opens again
//! once they are down to `queue_low_watermark` (hysteresis: it does not flap at the mark). The
//! depth is measured every [`MEASURE_EVERY`] from the queue's counters, and counted up by the
//! intakes in between, with every append: a burst cannot run more than one append past the mark
//! before the gate closes, however fast it comes. Critical events are never held back by it
//! (they have their own lane). One gate per process, shared by its intakes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::codec::discovery::Announcement;
use crate::codec::{self, Codecs, Decoded, Limits};
use crate::dead_letter::DeadLetter;
use crate::event::{Event, Reason, Rejection};
use crate::metrics::METRICS;
use crate::seam::{DeviceInfo, EventQueue, Head, Unavailable};
use crate::shutdown::Shutdown;

/// One message (or request) as an intake takes it: its events, and one dead letter for what of
/// it was refused.
#[derive(Debug, Default)]
pub struct Input {
    pub events: Vec<Event>,
    pub dead: Option<DeadLetter>,
    /// The reason of each refused reading, counted once the input is appended.
    refused: Vec<Reason>,
    /// Discovery configs, kept with the append and then applied.
    announcements: Vec<Announcement>,
    /// The device the events come from (device ecosystems).
    device: Option<Box<DeviceInfo>>,
    /// What a bridge said of its devices.
    catalog: Vec<(String, DeviceInfo)>,
}

impl Input {
    /// A decoded message; its refused readings become one letter holding `payload`.
    pub fn of(
        decoded: Decoded,
        source: &'static str,
        topic: &str,
        payload: &[u8],
        at_ms: i64,
    ) -> Input {
        let dead = DeadLetter::from_rejections(&decoded.rejections, source, topic, payload, at_ms);
        Input {
            refused: decoded.rejections.iter().map(|r| r.reason).collect(),
            events: decoded.events,
            dead,
            announcements: decoded.announcements,
            device: decoded.device,
            catalog: decoded.catalog,
        }
    }

    /// A message refused whole (a topic its sender may not write, say).
    pub fn refused(
        why: Rejection,
        source: &'static str,
        topic: &str,
        payload: &[u8],
        at_ms: i64,
    ) -> Input {
        Input {
            events: Vec::new(),
            dead: Some(DeadLetter::from_rejection(
                &why, source, topic, payload, at_ms,
            )),
            refused: vec![why.reason],
            announcements: Vec::new(),
            device: None,
            catalog: Vec::new(),
        }
    }

    /// Only critical events: passes a closed gate.
    pub fn is_critical(&self) -> bool {
        !self.events.is_empty() && self.events.iter().all(Event::is_critical)
    }

    /// Its place in its sensor's order: the first sensor of it with a `seq`.
    fn head(&self) -> Option<Head> {
        let first = self.events.iter().find(|e| e.seq.is_some())?;
        let (lo, hi) = self
            .events
            .iter()
            .filter(|e| e.house_id == first.house_id && e.sensor_id == first.sensor_id)
            .filter_map(|e| e.seq)
            .fold((i64::MAX, i64::MIN), |(l, h), s| (l.min(s), h.max(s)));
        Some(Head {
            house_id: first.house_id.clone(),
            sensor_id: first.sensor_id.clone(),
            first: lo,
            last: hi,
            waited_ms: 0,
        })
    }

    fn routine(&self) -> u64 {
        self.events.iter().filter(|e| !e.is_critical()).count() as u64
    }
}

/// Decode, gate, append and count, for one source (`mqtt` or `http`).
pub struct Intake {
    queue: Arc<dyn EventQueue>,
    gate: Arc<Gate>,
    source: &'static str,
    codecs: Codecs,
    /// (house, sensor) → the device already recorded for it by this process.
    devices: Mutex<HashMap<(String, String), String>>,
}

/// Most (house, sensor) an intake remembers the device of (then it forgets them all, and writes
/// them again as they come).
const DEVICES_REMEMBERED: usize = 100_000;

impl Intake {
    pub fn new(
        queue: Arc<dyn EventQueue>,
        gate: Arc<Gate>,
        source: &'static str,
        codecs: Codecs,
    ) -> Intake {
        Intake {
            queue,
            gate,
            source,
            codecs,
            devices: Mutex::new(HashMap::new()),
        }
    }

    /// One MQTT message: its events, and its refused readings as one letter.
    pub fn decode(&self, topic: &str, payload: &[u8], received_us: i64) -> Input {
        let decoded = self.codecs.decode(topic, payload, received_us);
        if decoded.is_ignored() {
            METRICS
                .ignored
                .with(self.codecs.ecosystem(topic).map_or("none", |e| e.name()))
                .add(1);
        }
        let input = Input::of(decoded, self.source, topic, payload, received_us / 1000);
        if let Some(d) = &input.dead {
            info!(topic = %codec::truncate(topic, 128), reason = d.reason, detail = %codec::truncate(&d.detail, 256), "rejected");
        }
        input
    }

    pub fn limits(&self) -> &Limits {
        &self.codecs.limits
    }

    /// The sources this intake reads topics as.
    pub fn codecs(&self) -> &Codecs {
        &self.codecs
    }

    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// Whether the gate holds `input` back now: routine traffic while the routine lanes are
    /// deep; critical events always pass.
    pub fn holds(&self, input: &Input) -> bool {
        self.gate.is_closed() && !input.is_critical()
    }

    /// Append `inputs` durably, then count them: received events, refused readings by reason,
    /// and the routine depth the gate sees.
    pub async fn append(&self, inputs: &[&Input]) -> Result<(), Unavailable> {
        let events: Vec<&Event> = inputs.iter().flat_map(|i| &i.events).collect();
        let dead: Vec<&DeadLetter> = inputs.iter().filter_map(|i| i.dead.as_ref()).collect();
        let announced: Vec<Announcement> = inputs
            .iter()
            .flat_map(|i| i.announcements.iter().cloned())
            .collect();
        let catalog: Vec<(String, DeviceInfo)> = inputs
            .iter()
            .flat_map(|i| i.catalog.iter().cloned())
            .collect();
        if !catalog.is_empty() {
            self.queue
                .keep_catalog(&catalog, self.codecs.limits.max_devices_per_house)
                .await?;
        }
        if events.is_empty() && dead.is_empty() && announced.is_empty() {
            return Ok(());
        }
        if !announced.is_empty() {
            let configs: Vec<(String, Vec<u8>)> = announced
                .iter()
                .map(|a| (a.config_topic.clone(), a.payload.clone()))
                .collect();
            self.queue.keep_discovery(&configs).await?;
        }
        let devices = self.new_devices(inputs);
        if !devices.is_empty() {
            self.queue
                .keep_devices(&devices, self.codecs.limits.max_devices_per_house)
                .await?;
        }
        crate::fault::hit("before_append");
        self.queue.append(&events, &dead).await?;
        self.remember_devices(devices);
        self.codecs.discovery.apply(&announced);
        crate::fault::hit("after_append");
        METRICS.received.with(self.source).add(events.len() as u64);
        for reason in inputs.iter().flat_map(|i| &i.refused) {
            METRICS.rejected.with(reason.as_str()).add(1);
        }
        self.gate.appended(inputs.iter().map(|i| i.routine()).sum());
        Ok(())
    }

    /// Which of `inputs` may be appended now in their sensors' order, each with how long it has
    /// waited (`u64::MAX`: it may wait no more). One without `seq` may; one holding a critical
    /// reading never waits.
    pub async fn admit(&self, inputs: &[(&Input, u64)]) -> Result<Vec<bool>, Unavailable> {
        let mut out = vec![true; inputs.len()];
        let mut heads = Vec::new();
        let mut at = Vec::new();
        for (i, (input, waited)) in inputs.iter().enumerate() {
            if let Some(mut head) = input.head() {
                let critical = input.events.iter().any(Event::is_critical);
                head.waited_ms = if critical { u64::MAX } else { *waited };
                heads.push(head);
                at.push(i);
            }
        }
        if !heads.is_empty() {
            for (i, ok) in at.into_iter().zip(self.queue.admit(&heads).await?) {
                out[i] = ok;
            }
        }
        Ok(out)
    }

    /// [`Intake::append`], retried with backoff until the queue takes it (nothing is
    /// acknowledged meanwhile); false on shutdown.
    pub async fn append_until_done(&self, inputs: &[&Input], shutdown: &Shutdown) -> bool {
        let mut backoff = Backoff::default();
        loop {
            match self.append(inputs).await {
                Ok(()) => return true,
                Err(e) => {
                    crate::metrics::dependency_error(self.queue_name());
                    if backoff.attempts().is_multiple_of(20) {
                        warn!(error = %e, source = self.source, "append failed, retrying (nothing acknowledged)");
                    }
                    if !shutdown.clone().sleep(backoff.next_delay()).await {
                        return false;
                    }
                }
            }
        }
    }

    /// The (house, sensor, device) of `inputs` not recorded by this process yet.
    fn new_devices(&self, inputs: &[&Input]) -> Vec<(String, String, DeviceInfo)> {
        // Native readings name no device: no lock for them.
        if inputs.iter().all(|i| i.device.is_none()) {
            return Vec::new();
        }
        let Ok(known) = self.devices.lock() else {
            return Vec::new();
        };
        let mut out: Vec<(String, String, DeviceInfo)> = Vec::new();
        for input in inputs {
            let Some(device) = &input.device else {
                continue;
            };
            for e in &input.events {
                let key = (e.house_id.clone(), e.sensor_id.clone());
                let seen = known.get(&key) == Some(&device.device_id)
                    || out.iter().any(|(h, s, _)| (h, s) == (&key.0, &key.1));
                if !seen {
                    out.push((key.0, key.1, device.as_ref().clone()));
                }
            }
        }
        out
    }

    fn remember_devices(&self, devices: Vec<(String, String, DeviceInfo)>) {
        if let Ok(mut known) = self.devices.lock() {
            if known.len() + devices.len() > DEVICES_REMEMBERED {
                known.clear();
            }
            for (house, sensor, d) in devices {
                known.insert((house, sensor), d.device_id);
            }
        }
    }

    fn queue_name(&self) -> &'static str {
        self.queue.name()
    }
}

/// How often the gate reads the queue's depth.
pub const MEASURE_EVERY: Duration = Duration::from_millis(100);

/// The routine depth as an intake sees it, and whether it holds routine traffic back.
pub struct Gate {
    depth: AtomicU64,
    closed: AtomicBool,
    high: u64,
    low: u64,
    /// Woken at every measure (a closed gate may have opened).
    pub changed: Notify,
}

impl Gate {
    pub fn new(high: u64, low: u64) -> Arc<Gate> {
        Arc::new(Gate {
            depth: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            high,
            low,
            changed: Notify::new(),
        })
    }

    pub fn from_config(config: &crate::config::Config) -> Arc<Gate> {
        Gate::new(config.queue_high_watermark, config.queue_low_watermark)
    }

    /// A gate measuring `queue` until shutdown.
    pub fn start(
        config: &crate::config::Config,
        queue: Arc<dyn EventQueue>,
        shutdown: &Shutdown,
    ) -> Arc<Gate> {
        let gate = Gate::from_config(config);
        tokio::spawn(gate.clone().watch(queue, shutdown.clone()));
        gate
    }

    /// Whether routine traffic is held back.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// `n` routine events were appended since the last measure.
    pub fn appended(&self, n: u64) {
        if n > 0 {
            self.depth.fetch_add(n, Ordering::SeqCst);
            self.evaluate();
        }
    }

    /// The queue's routine depth, as read.
    pub fn measured(&self, depth: u64) {
        self.depth.store(depth, Ordering::SeqCst);
        self.evaluate();
        self.changed.notify_waiters();
    }

    /// Wait until the gate is open.
    pub async fn open(&self) {
        while self.is_closed() {
            let changed = self.changed.notified();
            if !self.is_closed() {
                return;
            }
            changed.await;
        }
    }

    /// Hysteresis: close at `high`, open at `low`.
    fn evaluate(&self) {
        let depth = self.depth.load(Ordering::SeqCst);
        if !self.is_closed() && depth >= self.high {
            warn!(
                depth,
                high = self.high,
                "queue deep: holding routine traffic back"
            );
            self.closed.store(true, Ordering::SeqCst);
            METRICS.ingest_paused.set(1.0);
        } else if self.is_closed() && depth <= self.low {
            info!(
                depth,
                low = self.low,
                "queue drained: taking routine traffic again"
            );
            self.closed.store(false, Ordering::SeqCst);
            METRICS.ingest_paused.set(0.0);
        }
    }

    /// Measure the queue's routine depth every [`MEASURE_EVERY`] until shutdown.
    pub async fn watch(self: Arc<Self>, queue: Arc<dyn EventQueue>, mut shutdown: Shutdown) {
        loop {
            if let Ok(depths) = queue.depths().await {
                self.measured(crate::lane::routine_depth(&depths));
            }
            if !shutdown.sleep(MEASURE_EVERY).await {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closes_at_high_opens_at_low_and_counts_between_measures() {
        let gate = Gate::new(100, 20);
        gate.measured(10);
        gate.appended(50);
        assert!(!gate.is_closed());
        gate.appended(50);
        assert!(gate.is_closed(), "counted up to 110 between two measures");
        gate.measured(60);
        assert!(gate.is_closed(), "under high, above low: still closed");
        gate.measured(20);
        assert!(!gate.is_closed());
    }
}
