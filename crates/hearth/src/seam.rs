//! The seams between hearth's flow and the servers it runs on, as traits: the durable
//! [`EventQueue`] (with a [`Reader`] per consumer), the lanes' [`Ownership`], the [`EventStore`],
//! the [`AlertStore`], the latest-value [`LatestCache`] and the push [`FanOut`].
//!
//! Each has two backends, in twin folders: [`crate::servers`] (Redis Streams, PostgreSQL,
//! Redis, Redis pub/sub: the production stack, which scales to many processes) and
//! [`crate::embedded`] (SQLite in one data folder, in-process maps and channels: `hearth up` with
//! nothing configured). The worker, the intake, the API and the tools run on these traits alone;
//! one conformance suite per seam (`tests/conformance.rs`) runs against both backends so that
//! they cannot drift apart.
//!
//! The traits return boxed futures so that they can be held as `Arc<dyn ...>`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde::Serialize;
use utoipa::ToSchema;

use crate::alerts::engine::{Outcome, SensorKey, State};
use crate::alerts::{Alert, AlertState};
use crate::codec::Codecs;
use crate::dead_letter::DeadLetter;
use crate::dlq::{Filter, Letter, Replayed};
use crate::event::Event;
use crate::lane::Lane;
use crate::status::Status;

/// A server (or the embedded store) did not answer: retry later. Never a content problem.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

pub type Fut<'a, T> = BoxFuture<'a, Result<T, Unavailable>>;

/// Why a write that proves lane ownership did not happen.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// A newer owner holds these lanes: nothing was written, and they are not ours any more.
    #[error("fenced out of lanes {0:?} by a newer owner")]
    Fenced(Vec<Lane>),
    /// The store refused the content of some event (the batch is isolated event by event).
    #[error("refused: {0}")]
    Content(String),
    /// The store's circuit is open: not tried, retry later.
    #[error("circuit open")]
    CircuitOpen,
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
}

pub type WriteFut<'a, T> = BoxFuture<'a, Result<T, WriteError>>;

/// A lane held, and the fencing token that proves it to the store.
pub type Fence = (Lane, i64);

/// An entry read from the queue: one lane's record batch, with its events in append order.
#[derive(Debug, Clone, Default)]
pub struct Delivery {
    pub lane: Lane,
    /// The entry's id in its lane (a stream id, or the embedded queue's row id).
    pub id: String,
    pub events: Vec<Event>,
    /// Handed out before (taken over, or after an error): some of its events may be stored.
    pub redelivered: bool,
    /// Set when the entry cannot be read back (its events are then empty).
    pub unreadable: Option<Unreadable>,
}

/// An entry that does not decode: why, its raw body, and how many events it counted.
#[derive(Debug, Clone, Default)]
pub struct Unreadable {
    pub detail: String,
    pub body: Vec<u8>,
    pub events: u64,
}

impl Delivery {
    /// The events the entry counts in the loss accounting.
    pub fn count(&self) -> u64 {
        match &self.unreadable {
            Some(u) => u.events,
            None => self.events.len() as u64,
        }
    }

    /// The dead letter of an entry that cannot be read back (`bad_entry`, its raw body kept).
    pub fn unreadable_letter(&self) -> Option<DeadLetter> {
        let u = self.unreadable.as_ref()?;
        Some(DeadLetter {
            reason: crate::event::Reason::BadEntry.as_str(),
            detail: format!("{} (lane {}, entry {})", u.detail, self.lane, self.id),
            topic: String::new(),
            payload: u.body.clone(),
            source: "worker",
            at_ms: crate::event::now_us() / 1000,
        })
    }
}

/// The durable buffer between the intakes and the workers.
///
/// Contract (checked by the conformance suite): `append` returns only once the events and dead
/// letters are durable; readers hand out each appended entry to one of them, the critical
/// lane's before any routine lane's, each lane in append order (so a sensor's events in order);
/// an entry stays pending until acknowledged, and a reader opened later (after a crash) gets
/// the pending entries again before anything new; the depths count events not acknowledged.
pub trait EventQueue: Send + Sync {
    /// The queue's name as a dependency (`redis` or `embedded`), for logs and metrics.
    fn name(&self) -> &'static str;
    fn append<'a>(&'a self, events: &'a [&'a Event], dead: &'a [&'a DeadLetter]) -> Fut<'a, ()>;
    /// Which messages may be appended now when ingest processes share the broker's messages: one
    /// whose sensor's `seq` runs ahead of what was appended waits (one writer: all may).
    fn admit<'a>(&'a self, heads: &'a [Head]) -> Fut<'a, Vec<bool>> {
        Box::pin(async move { Ok(vec![true; heads.len()]) })
    }
    /// Events appended and not yet acknowledged, per lane.
    fn depths(&self) -> Fut<'_, Vec<(Lane, u64)>>;
    /// Lanes, dead letters, consumers and the loss accounting (`hearth status`).
    fn status(&self) -> Fut<'_, Status>;
    fn dead_letters<'a>(&'a self, filter: &'a Filter) -> Fut<'a, Vec<Letter>>;
    fn replay<'a>(&'a self, codecs: &'a Codecs, filter: &'a Filter) -> Fut<'a, Replayed>;
    fn purge<'a>(&'a self, filter: &'a Filter) -> Fut<'a, u64>;
    /// Dependency → whether its circuit is open in any process.
    fn circuits(&self) -> Fut<'_, BTreeMap<String, bool>>;
    /// Whether the queue answers, by name (`redis` or `embedded`).
    fn ready(&self) -> Fut<'_, (&'static str, bool)>;
    /// Remove the dead letters past their retention (age, count); how many went.
    fn expire_dead_letters(&self) -> Fut<'_, u64>;
    /// Keep Home Assistant discovery configs (config topic → payload; an empty payload forgets
    /// the topic's), durably: called before the messages that brought them are acknowledged.
    fn keep_discovery<'a>(&'a self, configs: &'a [(String, Vec<u8>)]) -> Fut<'a, ()>;
    /// The discovery configs kept, read at start.
    fn discovery(&self) -> Fut<'_, Vec<(String, Vec<u8>)>>;
    /// Keep which device each (house, sensor) belongs to; a house holding `max_per_house` rows
    /// takes no new sensor (its known ones are still updated).
    fn keep_devices<'a>(
        &'a self,
        devices: &'a [(String, String, DeviceInfo)],
        max_per_house: u64,
    ) -> Fut<'a, ()>;
    /// A house's sensors' devices: sensor id → device.
    fn devices<'a>(&'a self, house: &'a str) -> Fut<'a, HashMap<String, DeviceInfo>>;
    /// Keep what bridges say of their devices (model, maker), by (house, device), bounded as
    /// [`EventQueue::keep_devices`].
    fn keep_catalog<'a>(
        &'a self,
        devices: &'a [(String, DeviceInfo)],
        max_per_house: u64,
    ) -> Fut<'a, ()>;
    /// What bridges said of a house's devices: device id → device.
    fn catalog<'a>(&'a self, house: &'a str) -> Fut<'a, HashMap<String, DeviceInfo>>;
}

/// One consumer's reading of the queue.
///
/// Contract: `read` hands out entries of the given lanes only: first the pending entries of a
/// lane this reader has not read yet or was told to [`retake`](Reader::retake) (marked
/// `redelivered`), oldest first; then new entries, critical first, waiting up to `wait` for some.
/// An entry stays pending, and is handed out again to a later reader, until `ack` or `give_up`.
pub trait Reader: Send + Sync {
    /// About `max` events' worth of entries.
    fn read<'a>(
        &'a mut self,
        lanes: &'a [Lane],
        max: usize,
        wait: std::time::Duration,
    ) -> Fut<'a, Vec<Delivery>>;
    /// Hand out the lane's pending entries again before anything new (after an error, or on
    /// taking the lane over).
    fn retake(&mut self, lane: Lane);
    /// Acknowledge entries, counting what their write did in the loss accounting, and keep
    /// `dead`, the letters of the events the write refused (past a cap), in the same step.
    fn ack<'a>(
        &'a mut self,
        done: &'a [Delivery],
        written: &'a Written,
        dead: &'a [DeadLetter],
    ) -> Fut<'a, ()>;
    /// How many times the entry was handed out.
    fn deliveries<'a>(&'a mut self, entry: &'a Delivery) -> Fut<'a, u64>;
    /// Give up on an entry that failed for its content: acknowledge it and keep its `letters`,
    /// in one step; its events count as dead-lettered.
    fn give_up<'a>(&'a mut self, entry: &'a Delivery, letters: &'a [DeadLetter]) -> Fut<'a, ()>;
}

/// Which lanes a consumer holds.
///
/// Contract: at most one consumer at a time holds a lane (a lease on the servers, checked again
/// by the store against the lane's fencing token, so a consumer that lost its lane while paused
/// cannot write to it); the consumers of a pool share its lanes fairly; a lane whose holder is
/// gone is taken by another within the lease time. Embedded: one process, every lane held.
pub trait Ownership: Send + Sync {
    /// Hold a fair share of the pool's lanes; returns the lanes newly taken.
    fn rebalance(&mut self) -> Fut<'_, Vec<Lane>>;
    /// The lanes held now, with their fences (a lane whose lease was found lost is gone).
    fn held(&mut self) -> Vec<Fence>;
    /// A newer owner fenced this consumer out of `lanes`.
    fn lost(&mut self, lanes: &[Lane]);
    /// How often `rebalance` runs (and a consumer holding nothing waits).
    fn period(&self) -> std::time::Duration;
    /// Hand every lane back (stopping), so that the next owner need not wait for the lease.
    fn release(&mut self) -> Fut<'_, ()>;
}

/// What a write did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Written {
    /// Rows inserted.
    pub stored: u64,
    /// Events whose dedup key was already stored (or repeated in the batch).
    pub duplicates: u64,
    /// Events not stored because they would pass a cap (houses, sensors per house, kinds per
    /// sensor): their index in the batch, and why. The caller dead-letters them.
    pub capped: Vec<(usize, crate::event::Rejection)>,
}

/// What hearth knows of the device a sensor belongs to (device ecosystems only).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, ToSchema)]
pub struct DeviceInfo {
    /// The device's id: its own sensor's; its channels' sensors are `{device_id}.{channel}`.
    pub device_id: String,
    /// `zigbee2mqtt`, `tasmota`, `shelly`, `esphome`, `ha_discovery`.
    pub ecosystem: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manufacturer: Option<String>,
}

/// A stored reading.
#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryEvent {
    /// Storage order (`events.id`).
    pub id: i64,
    pub kind: String,
    pub value: f64,
    pub unit: Option<String>,
    pub seq: Option<i64>,
    /// Reading time, epoch milliseconds.
    pub ts: i64,
    /// The unit the device sent, when the value was converted from it into `unit`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_unit: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HouseView {
    pub house_id: String,
    /// Sensors seen in this house.
    pub sensors: i64,
}

/// A house token as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct TokenInfo {
    /// The token's public id (`hearth token revoke ID`).
    pub id: String,
    pub house_id: String,
    /// Epoch milliseconds.
    pub created_at: i64,
    /// Epoch milliseconds; none: it does not expire.
    pub expires_at: Option<i64>,
}

/// A sensor as the store knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct SensorRow {
    pub sensor_id: String,
    pub house_id: String,
    pub kinds: Vec<String>,
    pub first_seen: i64,
    pub last_seen: i64,
}

/// Which page of a sensor's history (newest first).
#[derive(Debug, Clone, Default)]
pub struct HistoryQuery {
    pub house: String,
    pub sensor: String,
    pub kind: Option<String>,
    /// Epoch ms, inclusive.
    pub from: Option<i64>,
    /// Epoch ms, exclusive.
    pub to: Option<i64>,
    /// (ts ms, id) of the last row of the previous page.
    pub cursor: Option<(i64, i64)>,
    pub limit: i64,
}

/// Where events, sensors and tokens are kept.
///
/// Contract: a sensor is (house, sensor); `write` is idempotent on the dedup key ((house,
/// sensor, kind, seq), else the ingest id): writing a batch again stores nothing twice, and it
/// stores nothing past the caps (reported in [`Written::capped`]); a write whose fences are not
/// all current writes nothing ([`WriteError::Fenced`]); history is newest first by (ts, id); a
/// token's house is known only until it expires or is revoked.
pub trait EventStore: Send + Sync {
    /// Store events, proving the lanes they come from are held (`fences`; none for a writer
    /// that owns no lanes). `redelivered`: some may be stored already.
    fn write<'a>(
        &'a self,
        fences: &'a [Fence],
        events: &'a [&'a Event],
        redelivered: bool,
    ) -> WriteFut<'a, Written>;
    /// Houses with their sensor count (`only`: just that one).
    fn houses<'a>(&'a self, only: Option<&'a str>) -> Fut<'a, Vec<HouseView>>;
    fn sensors<'a>(&'a self, house: &'a str) -> Fut<'a, Vec<SensorRow>>;
    fn sensor<'a>(&'a self, house: &'a str, sensor: &'a str) -> Fut<'a, Option<SensorRow>>;
    /// Up to `limit` rows, newest first.
    fn history<'a>(&'a self, q: &'a HistoryQuery) -> Fut<'a, Vec<HistoryEvent>>;
    /// A sensor's kind, bucket by bucket, from the rollups ([`crate::series`]), oldest first.
    fn series<'a>(
        &'a self,
        q: &'a crate::series::SeriesQuery,
    ) -> Fut<'a, Vec<crate::series::Point>>;
    /// Add the readings stored since the last fold to the rollups; returns how many. Every
    /// worker process calls it every second ([`crate::sweeps::rollups`]); a series counts the
    /// readings not folded yet too.
    fn fold_rollups(&self) -> Fut<'_, u64>;
    /// The house of a token, by its SHA-256 (none once expired or revoked).
    fn token_house<'a>(&'a self, hash: &'a [u8]) -> Fut<'a, Option<String>>;
    /// Keep a token (its hash) for `house`, under the public id `id`, until `expires_at` (epoch
    /// ms) if given.
    fn create_token<'a>(
        &'a self,
        id: &'a str,
        hash: &'a [u8],
        house: &'a str,
        expires_at: Option<i64>,
    ) -> Fut<'a, ()>;
    /// Every token (its public part), oldest first.
    fn tokens(&self) -> Fut<'_, Vec<TokenInfo>>;
    /// Remove a token by its id; whether there was one.
    fn revoke<'a>(&'a self, id: &'a str) -> Fut<'a, bool>;
    /// Whether the store answers, by name (`postgres` or `embedded`).
    fn ready(&self) -> Fut<'_, (&'static str, bool)>;
    /// Remove what [`crate::keep::Keep`] expired at `now_us` (readings, cleared alerts; never
    /// rollups), and make ahead what the next readings need.
    fn expire(&self, now_us: i64) -> Fut<'_, crate::keep::Expired>;
    /// Whether writes are paused for now (a circuit open): work that needs the store waits.
    fn is_paused(&self) -> bool {
        false
    }
}

/// Alerts and the rules' state: what the rules engine loads and writes, what the API lists and
/// acknowledges, and the offline sweep.
///
/// Contract: one open alert per (house, sensor, rule); a transition is written with the rule
/// states it changed, in one step, fenced like the batch it came from; an alert whose last
/// transition was not marked pushed is listed by `unpushed` for its lane until it is; the sweep
/// raises `offline` once per silent sensor; acknowledging is idempotent and refused for a
/// cleared alert.
pub trait AlertStore: Send + Sync {
    /// The stored rule state of these sensors (open alerts included).
    fn load_states<'a>(
        &'a self,
        sensors: &'a [SensorKey],
    ) -> Fut<'a, Vec<(SensorKey, String, State)>>;
    /// Write an evaluation's transitions and changed states; the alerts as they are after each
    /// transition that took effect.
    fn write_outcome<'a>(
        &'a self,
        fences: &'a [Fence],
        outcome: &'a Outcome,
    ) -> WriteFut<'a, Vec<Alert>>;
    /// Alerts of `lane` whose last transition was not pushed yet, oldest first.
    fn unpushed(&self, lane: Lane) -> Fut<'_, Vec<Alert>>;
    fn mark_pushed<'a>(&'a self, alerts: &'a [Alert]) -> Fut<'a, ()>;
    /// Declare offline the sensors silent for longer than the offline rule allows; the alerts
    /// raised.
    fn sweep_offline(&self) -> Fut<'_, Vec<Alert>>;
    fn list<'a>(
        &'a self,
        house: Option<&'a str>,
        state: Option<AlertState>,
        limit: i64,
    ) -> Fut<'a, Vec<Alert>>;
    fn get(&self, id: i64) -> Fut<'_, Option<Alert>>;
    /// The alert after the acknowledgement, and whether it changed.
    fn acknowledge<'a>(&'a self, id: i64, by: &'a str) -> Fut<'a, Option<(Alert, bool)>>;
}

/// The latest value of each (house, sensor, kind).
///
/// Contract: a value never moves backwards: an event older (by [`Event::order_key`]: time never
/// later than its receipt, then seq, then receive time) than the cached one leaves it
/// unchanged; `latest` gives, for each of a house's `sensors`, kind → the JSON of
/// `{value, unit, ts, seq, received_us, house_id}`.
pub trait LatestCache: Send + Sync {
    fn offer<'a>(&'a self, events: &'a [&'a Event]) -> Fut<'a, ()>;
    fn latest<'a>(
        &'a self,
        house: &'a str,
        sensors: &'a [String],
    ) -> Fut<'a, Vec<HashMap<String, String>>>;
}

/// Pushes to every API process's WebSocket clients (and, for alerts, to webhooks).
///
/// Contract: every subscriber gets every message published after it subscribed, in publish
/// order, or a [`Pushed::Gap`] where it may have missed some (its subscription was lost and
/// made again, or it fell behind); a message is a JSON object with `type` and `house_id`.
/// [`crate::pushes::subscribe`] fills the gaps' alert pushes back in.
pub trait FanOut: Send + Sync {
    /// Publish messages, in order.
    fn publish<'a>(&'a self, messages: &'a [String]) -> Fut<'a, ()>;
    /// Push alert transitions: to WebSocket clients, and to the webhooks of their severity.
    /// Each alert message carries a `seq`, greater than every earlier one's (across restarts),
    /// in publish order, and is kept for [`FanOut::alerts_since`] (the last
    /// [`KEPT_ALERT_PUSHES`]).
    fn push_alerts<'a>(&'a self, alerts: &'a [Alert]) -> Fut<'a, ()>;
    /// The alert messages pushed after the one whose `seq` is `since`, in order, for a client
    /// that reconnects; `None` when some of them are no longer kept (or `since` was never
    /// given out here): the client must re-read the alerts.
    fn alerts_since(&self, since: u64) -> Fut<'_, Option<Vec<String>>>;
    /// A receiver of every message published from now on (it reconnects as needed, and says
    /// where it may have missed some).
    fn subscribe(&self) -> Fut<'_, tokio::sync::mpsc::Receiver<Pushed>>;
    /// The number of the last alert push (0: none kept).
    fn alerts_pushed(&self) -> Fut<'_, u64>;
    /// Tell the workers which houses' events someone watches (`*`: all), for `ttl_ms`.
    fn watch<'a>(&'a self, houses: &'a [String], ttl_ms: i64) -> Fut<'a, ()>;
    /// The houses someone watches now (`*`: all).
    fn watched(&self) -> Fut<'_, std::collections::HashSet<String>>;
    /// A count that moves with every [`FanOut::watch`] of at least one house: a consumer reads
    /// it before a batch's event pushes and the houses again when it moved, so that a
    /// subscription is served from the first batch pushed after it was answered.
    fn watch_changes(&self) -> Fut<'_, u64>;
}

/// What a subscription to the fan-out brings.
#[derive(Debug, Clone, PartialEq)]
pub enum Pushed {
    Message(String),
    /// Messages may have been missed here: the subscription was lost and made again, or the
    /// subscriber fell behind.
    Gap,
}

/// Alert pushes each backend keeps for clients that reconnect ([`FanOut::alerts_since`]).
pub const KEPT_ALERT_PUSHES: usize = 10_000;

/// Whether the alert pushes after `since` are all still kept: `since` was given out (not past
/// the `last` number), and nothing came after it, or its own push is still kept (a log is
/// trimmed from its oldest end; numbers need not follow each other), or `from_origin`: it is
/// the number the log started from (nothing pushed yet when it was given out) and the log was
/// never trimmed.
pub fn resumable(since: u64, last: u64, kept_since: bool, from_origin: bool) -> bool {
    since <= last && (since == last || kept_since || from_origin)
}

/// `message` (a push's JSON object) with `"seq": seq` first.
pub fn with_seq(message: &str, seq: u64) -> String {
    match message.strip_prefix('{') {
        Some(rest) if rest.trim_start().starts_with('}') => format!("{{\"seq\":{seq}}}"),
        Some(rest) => format!("{{\"seq\":{seq},{rest}"),
        None => message.to_string(),
    }
}

/// The shared seams of one backend, as the API, the intakes and the tools hold them.
#[derive(Clone)]
pub struct Seams {
    pub queue: Arc<dyn EventQueue>,
    pub store: Arc<dyn EventStore>,
    pub alerts: Arc<dyn AlertStore>,
    pub cache: Arc<dyn LatestCache>,
    pub fanout: Arc<dyn FanOut>,
}

/// What one consumer of the worker works with: its own reader and lane ownership, and the
/// store and alert store it writes through (a connection of its own on the servers).
pub struct Parts {
    pub reader: Box<dyn Reader>,
    pub ownership: Box<dyn Ownership>,
    pub store: Arc<dyn EventStore>,
    pub alerts: Arc<dyn AlertStore>,
}

/// A message's place in its sensor's order, for [`EventQueue::admit`] (`waited_ms` `u64::MAX`: no wait).
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    pub house_id: String,
    pub sensor_id: String,
    pub first: i64,
    pub last: i64,
    pub waited_ms: u64,
}

/// A backend: its seams, and a consumer's own parts.
pub trait Backend: Send + Sync {
    fn seams(&self) -> &Seams;
    /// The parts of a consumer of `pool`, named `name`.
    fn consumer(&self, pool: Pool, name: &str) -> Result<Parts, Unavailable>;
    /// Routine consumers per worker process (the critical lane has one of its own).
    fn routine_consumers(&self) -> usize;
    /// Tasks a worker process runs beside its consumers (retention, shared circuit states).
    fn background(&self, shutdown: &crate::shutdown::Shutdown) -> Vec<tokio::task::JoinHandle<()>>;
}

/// A set of lanes shared out among the consumers that serve it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    Routine,
    Critical,
}

impl Pool {
    pub fn name(self) -> &'static str {
        match self {
            Pool::Routine => "routine",
            Pool::Critical => "critical",
        }
    }

    pub fn lanes(self, shards: u16) -> Vec<Lane> {
        match self {
            Pool::Critical => vec![Lane::Critical],
            Pool::Routine => Lane::routine(shards).collect(),
        }
    }
}

/// The cached JSON of an event, as both caches store it.
pub fn latest_json(e: &Event) -> String {
    serde_json::json!({
        "value": e.value,
        "unit": e.unit.as_deref().or(crate::kinds::unit_of(&e.kind)),
        "ts": e.ts_ms,
        "seq": e.seq,
        "received_us": e.received_us,
        "house_id": e.house_id,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::resumable;

    #[test]
    fn resumable_when_nothing_after_since_can_be_missing() {
        assert!(resumable(5, 5, false, false), "nothing after it");
        assert!(resumable(3, 9, true, false), "its own push still kept");
        assert!(!resumable(3, 9, false, false), "trimmed past it, or lost");
        assert!(
            resumable(0, 9, false, true),
            "from the origin, never trimmed"
        );
        assert!(!resumable(10, 9, true, true), "never given out");
    }
}
