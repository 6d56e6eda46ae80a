//! Ingest: from MQTT brokers to the queue, through the one intake ([`crate::intake`]),
//! acknowledging nothing before it is durably appended.
//!
//! The ingest holds persistent MQTT sessions (clean session off, QoS 1), so that a broker keeps
//! messages for hearth while it is down: `ingest_slots` per broker of `mqtt_url`, each a slot
//! that one process at a time holds ([`slots`]). Any number of `hearth ingest` processes,
//! started the same way, share the slots fairly; with more than one slot per broker the
//! sessions subscribe through a shared subscription (`$share/hearth/…`), so that each message
//! is taken by one of them, and each sensor's readings are put back in `seq` order before they
//! are appended ([`appender`]).
//!
//! Acknowledgements are manual: a message's PUBACK is sent only after the append holding its
//! events (and dead letter) has returned, and only on the connection the message came on (after
//! a reconnect the broker redelivers it instead). Until then the broker counts the message as in
//! flight and stops sending once its in-flight window is full: that is the backpressure. When
//! the routine lanes are deeper than `queue_high_watermark`, the ingest holds routine messages
//! unacknowledged (the broker keeps the rest) until the depth is back under
//! `queue_low_watermark`; critical messages still pass.
//!
//! Tasks: this one keeps the slots (every third of `lease_ttl_ms`) and starts or stops a session
//! per slot held ([`session`]); the appender batches, appends and routes the PUBACKs back.

mod appender;
mod retained;
mod session;
pub mod slots;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::mqttbytes::QoS;
use tokio::sync::{Notify, mpsc, watch};
use tracing::{info, warn};

use crate::alerts::mqtt::AlertFeed;
use crate::config::Config;
use crate::intake::{Input, Intake};
use crate::metrics::METRICS;
use crate::mqtt::Endpoint;
use crate::shutdown::Shutdown;
pub use slots::{AllSlots, Slots};

/// One MQTT message, decoded, waiting for its append and then its PUBACK.
pub struct Message {
    /// The slot whose session it came on.
    slot: u32,
    /// The connection it came on: a PUBACK is only valid on that one.
    generation: u64,
    pkid: u16,
    qos: QoS,
    input: Input,
    /// Since when it waits for the readings of its sensor before it.
    waiting_since: Option<Instant>,
}

impl Message {
    fn new(slot: u32, generation: u64, pkid: u16, qos: QoS, input: Input) -> Message {
        Message {
            slot,
            generation,
            pkid,
            qos,
            input,
            waiting_since: None,
        }
    }
}

/// PUBACKs to send: (connection generation, packet id).
type Acks = Vec<(u64, u16)>;

/// Where a slot's session hears from the appender: its PUBACKs, and that there is room.
type Line = (mpsc::UnboundedSender<Acks>, Arc<Notify>);

/// How the appender reaches the sessions: each slot's PUBACKs, and a wake-up when it has room.
#[derive(Default)]
pub struct Router {
    sessions: Mutex<HashMap<u32, Line>>,
}

impl Router {
    /// A session of `slot` starts: where its PUBACKs come, and its wake-up.
    fn join(&self, slot: u32) -> (mpsc::UnboundedReceiver<Acks>, Arc<Notify>) {
        // PUBACKs come back unbounded: the appender must never wait on a session, which may
        // itself be waiting for the appender to take messages. The broker's in-flight window
        // bounds them in practice.
        let (tx, rx) = mpsc::unbounded_channel();
        let room = Arc::new(Notify::new());
        self.lock().insert(slot, (tx, room.clone()));
        (rx, room)
    }

    fn leave(&self, slot: u32) {
        self.lock().remove(&slot);
    }

    /// The appender took messages: sessions that stopped reading (channel full) read again.
    fn room(&self) {
        for (_, room) in self.lock().values() {
            room.notify_one();
        }
    }

    /// Hand PUBACKs (slot, generation, packet id) to their sessions.
    fn ack(&self, acks: impl Iterator<Item = (u32, u64, u16)>) {
        let mut by_slot: BTreeMap<u32, Acks> = BTreeMap::new();
        for (slot, g, pkid) in acks {
            by_slot.entry(slot).or_default().push((g, pkid));
        }
        let sessions = self.lock();
        for (slot, acks) in by_slot {
            if let Some((tx, _)) = sessions.get(&slot) {
                let _ = tx.send(acks);
            }
        }
    }

    /// The appender is done: every session's PUBACK channel closes.
    fn close(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Line>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Run the ingest until shutdown; `feeds` (the fan-out's pushes, one per broker) are published
/// back to each broker by its slot 0, retained ([`crate::alerts::mqtt`]).
pub async fn run(
    config: Arc<Config>,
    intake: Arc<Intake>,
    feeds: Vec<Option<AlertFeed>>,
    mut slots: Box<dyn Slots>,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let per_broker = u32::from(config.ingest_slots);
    let shared = per_broker > 1;
    let mut endpoints = Vec::new();
    for url in config.mqtt_urls() {
        let mut endpoint = Endpoint::parse(&url, &config.mqtt_client_id)?;
        endpoint.clean_session = false;
        endpoints.push(endpoint);
    }
    let feeds: Vec<Arc<tokio::sync::Mutex<Option<AlertFeed>>>> = feeds
        .into_iter()
        .map(|f| Arc::new(tokio::sync::Mutex::new(f)))
        .collect();
    // Decoded messages go to the appender in chunks (one per socket read of up to 64 KiB, some
    // 700 small messages); the bound keeps memory bounded whatever the brokers send (QoS 0
    // floods included): 16 chunks is a few batches ahead, about 10 MB at most. (256 chunks
    // measured 299 MB of peak RSS under saturation.)
    let (tx, rx) = mpsc::channel::<Vec<Message>>(16);
    let router = Arc::new(Router::default());
    let order_wait = shared.then(|| Duration::from_millis(config.ingest_order_wait_ms));
    let appender = tokio::spawn(appender::run(
        intake.clone(),
        rx,
        router.clone(),
        config.batch_size,
        order_wait,
        shutdown.clone(),
    ));
    let topics = intake.codecs().discovery.watch();
    info!(brokers = endpoints.len(), slots = per_broker, client_id = %config.mqtt_client_id, "ingest started");
    let mut running: BTreeMap<u32, (watch::Sender<bool>, tokio::task::JoinHandle<()>)> =
        BTreeMap::new();
    let mut tick = tokio::time::interval(slots.period());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait() => break,
        }
        running.retain(|_, (_, task)| !task.is_finished());
        let held = match slots.rebalance().await {
            Ok(held) => {
                failures = 0;
                held
            }
            Err(e) => {
                // Sessions held go on (their leases run out if this lasts; then they stop).
                failures += 1;
                if failures == 1 || failures.is_multiple_of(20) {
                    warn!(error = %e, "cannot renew the ingest slots now");
                }
                continue;
            }
        };
        for (slot, (stop, _)) in running.iter() {
            if !held.contains(slot) {
                let _ = stop.send(true);
            }
        }
        for slot in held {
            if running.contains_key(&slot) {
                continue;
            }
            let broker = (slot / per_broker) as usize;
            let Some(base) = endpoints.get(broker) else {
                continue;
            };
            let mut endpoint = base.clone();
            if shared {
                endpoint.client_id = format!("{}-{}", config.mqtt_client_id, slot % per_broker);
            }
            let spec = session::Spec {
                slot,
                endpoint,
                shared,
                feed: (slot % per_broker == 0).then(|| feeds[broker].clone()),
            };
            let (stop_tx, stop_rx) = watch::channel(false);
            let task = tokio::spawn(session::run(
                spec,
                tx.clone(),
                router.clone(),
                intake.clone(),
                topics.clone(),
                stop_rx,
                shutdown.clone(),
            ));
            running.insert(slot, (stop_tx, task));
        }
        METRICS.ingest_slots.set(running.len() as f64);
    }
    // Shutdown: the sessions stop reading and wait for their PUBACKs; the appender appends what
    // it has, then ends once every sender is gone.
    drop(tx);
    for (_, (_, task)) in running {
        let _ = task.await;
    }
    if let Err(e) = appender.await {
        warn!(error = %e, "appender ended abnormally");
    }
    if let Err(e) = slots.release().await {
        warn!(error = %e, "cannot hand the ingest slots back; their leases will expire");
    }
    METRICS.ingest_slots.set(0.0);
    info!("ingest stopped");
    Ok(())
}
