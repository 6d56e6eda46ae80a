//! The four seams between hearth's flow and the servers it runs on: the durable [`EventQueue`],
//! the [`EventStore`], the latest-value [`LatestCache`] and the push [`FanOut`].
//!
//! Each has two backends: [`servers`] (Redis Streams, PostgreSQL, Redis, Redis pub/sub: the
//! production stack, which scales to many processes) and [`crate::embedded`] (SQLite in one data
//! folder and in-process maps and channels: `hearth up` with nothing configured). The API serves
//! both through these traits, the embedded runtime runs on them, and one conformance suite per
//! seam (`tests/conformance.rs`) runs against both backends so that they cannot drift apart.
//!
//! The traits return boxed futures so that the API can hold them as `Arc<dyn ...>`.

use std::collections::{BTreeMap, HashMap};

use futures_util::future::BoxFuture;
use serde::Serialize;
use utoipa::ToSchema;

use crate::alerts::{Alert, AlertState};
use crate::codec::Limits;
use crate::dead_letter::DeadLetter;
use crate::dlq::{Filter, Letter, Replayed};
use crate::event::Event;
use crate::lane::Lane;
use crate::status::Status;

/// A server (or the embedded store) did not answer: retry later. Never a content problem.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

impl From<crate::servers::queue::QueueError> for Unavailable {
    fn from(e: crate::servers::queue::QueueError) -> Self {
        Unavailable(format!("redis: {e}"))
    }
}

impl From<crate::servers::store::StoreError> for Unavailable {
    fn from(e: crate::servers::store::StoreError) -> Self {
        Unavailable(format!("database: {e}"))
    }
}

pub type Fut<'a, T> = BoxFuture<'a, Result<T, Unavailable>>;

/// Entries read from the queue: one lane's record batch, with its events in append order.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub lane: Lane,
    /// The entry's id in its lane (a stream id, or the embedded queue's row id).
    pub id: String,
    pub events: Vec<Event>,
}

/// Which lanes a reader takes entries from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lanes {
    All,
    Critical,
    Routine,
}

impl Lanes {
    pub fn includes(self, lane: Lane) -> bool {
        match self {
            Lanes::All => true,
            Lanes::Critical => lane == Lane::Critical,
            Lanes::Routine => lane != Lane::Critical,
        }
    }
}

/// The durable buffer between the ingest and the workers.
///
/// Contract (checked by the conformance suite): `append` returns only once the events and dead
/// letters are durable; `read` hands out each appended entry to one reader, the critical lane's
/// before any routine lane's, each lane in append order (so a sensor's events in order); an
/// entry stays pending until `ack`, and a reader opened later (after a crash) gets the pending
/// entries again before anything new; the depths count the events appended and not acknowledged.
pub trait EventQueue: Send + Sync {
    /// The queue's name as a dependency (`redis` or `embedded`), for logs and metrics.
    fn name(&self) -> &'static str;
    fn append<'a>(&'a self, events: &'a [&'a Event], dead: &'a [&'a DeadLetter]) -> Fut<'a, ()>;
    /// Up to about `max` entries of the chosen lanes, critical lane first.
    fn read(&self, lanes: Lanes, max: usize) -> Fut<'_, Vec<Delivery>>;
    /// Acknowledge entries, counting what their write did in the loss accounting, and keep
    /// `dead`, the letters of the events the write refused (past a cap), in the same step.
    fn ack<'a>(
        &'a self,
        done: &'a [Delivery],
        written: &'a Written,
        dead: &'a [DeadLetter],
    ) -> Fut<'a, ()>;
    /// Events appended and not yet acknowledged, per lane.
    fn depths(&self) -> Fut<'_, Vec<(Lane, u64)>>;
    /// Lanes, dead letters, consumers and the loss accounting (`hearth status`).
    fn status(&self) -> Fut<'_, Status>;
    fn dead_letters<'a>(&'a self, filter: &'a Filter) -> Fut<'a, Vec<Letter>>;
    fn replay<'a>(&'a self, limits: &'a Limits, filter: &'a Filter) -> Fut<'a, Replayed>;
    fn purge<'a>(&'a self, filter: &'a Filter) -> Fut<'a, u64>;
    /// Dependency → whether its circuit is open in any process.
    fn circuits(&self) -> Fut<'_, BTreeMap<String, bool>>;
    /// Whether the queue answers, by name (`redis` or `embedded`).
    fn ready(&self) -> Fut<'_, (&'static str, bool)>;
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

/// Where events, sensors, alerts and tokens are kept.
///
/// Contract: a sensor is (house, sensor); `write` is idempotent on the dedup key ((house,
/// sensor, kind, seq), else the ingest id): writing a batch again stores nothing twice, and it
/// stores nothing past the caps (reported in [`Written::capped`]); history is newest first by
/// (ts, id); one open alert per (house, sensor, rule); acknowledging is idempotent and refused
/// for a cleared alert; a token's house is known only until it expires or is revoked.
pub trait EventStore: Send + Sync {
    fn write<'a>(&'a self, events: &'a [&'a Event]) -> Fut<'a, Written>;
    /// Houses with their sensor count (`only`: just that one).
    fn houses<'a>(&'a self, only: Option<&'a str>) -> Fut<'a, Vec<HouseView>>;
    fn sensors<'a>(&'a self, house: &'a str) -> Fut<'a, Vec<SensorRow>>;
    fn sensor<'a>(&'a self, house: &'a str, sensor: &'a str) -> Fut<'a, Option<SensorRow>>;
    /// Up to `limit` rows, newest first.
    fn history<'a>(&'a self, q: &'a HistoryQuery) -> Fut<'a, Vec<HistoryEvent>>;
    fn alerts<'a>(
        &'a self,
        house: Option<&'a str>,
        state: Option<AlertState>,
        limit: i64,
    ) -> Fut<'a, Vec<Alert>>;
    fn alert(&self, id: i64) -> Fut<'_, Option<Alert>>;
    /// The alert after the acknowledgement, and whether it changed.
    fn acknowledge<'a>(&'a self, id: i64, by: &'a str) -> Fut<'a, Option<(Alert, bool)>>;
    fn mark_pushed<'a>(&'a self, alerts: &'a [Alert]) -> Fut<'a, ()>;
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
/// order; a message is a JSON object with `type` and `house_id`.
pub trait FanOut: Send + Sync {
    fn publish(&self, message: String) -> Fut<'_, ()>;
    /// Push an alert transition: to WebSocket clients, and to the webhooks of its severity.
    fn push_alert<'a>(
        &'a self,
        rules: &'a crate::alerts::rules::RuleSet,
        alert: &'a Alert,
    ) -> Fut<'a, ()>;
    /// A receiver of every message published from now on (it reconnects as needed).
    fn subscribe(&self) -> Fut<'_, tokio::sync::mpsc::Receiver<String>>;
    /// Tell the workers which houses' events someone watches (`*`: all), for `ttl_ms`.
    fn watch<'a>(&'a self, houses: &'a [String], ttl_ms: i64) -> Fut<'a, ()>;
}

/// The four seams of one backend, as the API and the embedded runtime hold them.
#[derive(Clone)]
pub struct Seams {
    pub queue: std::sync::Arc<dyn EventQueue>,
    pub store: std::sync::Arc<dyn EventStore>,
    pub cache: std::sync::Arc<dyn LatestCache>,
    pub fanout: std::sync::Arc<dyn FanOut>,
}

/// The cached JSON of an event, as both caches store it.
pub fn latest_json(e: &Event) -> String {
    serde_json::json!({
        "value": e.value,
        "unit": e.unit,
        "ts": e.ts_ms,
        "seq": e.seq,
        "received_us": e.received_us,
        "house_id": e.house_id,
    })
    .to_string()
}
