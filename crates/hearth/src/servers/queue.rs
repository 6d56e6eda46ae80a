//! The durable buffer between the intakes and the workers, on the servers: Redis Streams.
//!
//! Events are spread over lanes: one critical lane for the kinds of
//! [`crate::event::CRITICAL_KINDS`], and `shards` routine lanes chosen by a hash of (house, sensor),
//! so that all events of a sensor (in one lane) sit in one stream, in the order the ingest
//! appended them. Each lane is one stream read by the consumer group `workers`.
//!
//! An entry is a record batch: the events of one ingest batch that go to that lane, in order, as
//! a JSON array in the field `e`. Redis then works per batch, not per event (one XADD, one
//! pending-list entry, one XACK for hundreds of events at full speed; one event per entry when
//! traffic is light). A worker acknowledges an entry (XACK) only after all its events are
//! committed or dead-lettered, and trims a stream only below its oldest unacknowledged entry.
//!
//! Depth is counted in events: the ingest adds an entry's events to `in:{lane}` in the same
//! transaction as its XADD, and the acknowledgement adds them to `out:{lane}` in the same script
//! as its XACK, so `in - out` is exactly the events of unacknowledged entries.
//!
//! Rejected input goes to the dead-letter stream with its reason, topic and raw payload, kept
//! `dead_letter_max_age_secs` and `dead_letter_max_count`.
//!
//! Keys (all under the configured prefix `P`, named once in [`Keys`]): `P:stream:{lane}` (a
//! lane), `P:dead` (dead letters), `P:lease:{lane}` and `P:consumers:{pool}` (ownership),
//! `P:stats` (the loss accounting), `P:meta` (the shard count and schema of the keys), `P:push`
//! (the fan-out channel), `P:notify` (webhook jobs), `P:watched` (houses someone watches),
//! `P:watch_changes` (a count of the watches advertised),
//! `P:circuits` (circuit states shared by the processes), `P:tokens` (house tokens cached by hash), and the
//! cache's `P:latest:{house}:{sensor}` and `P:house:{house}:sensors`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use redis::Value;

use super::conn::{self, Conn};
use super::keys::{Group, Keys};
use super::order::{self, Order};
use super::txn::{NotReplicated, Replicas, Txn, Unwritten};
use crate::codec::Codecs;
use crate::dead_letter::{DeadLetter, Retention};
use crate::dlq::{Filter, Letter, Replayed};
use crate::event::Event;
use crate::lane::Lane;
use crate::seam::{DeviceInfo, EventQueue, Fut, Unavailable};
use crate::status::stat;

/// The consumer group every worker reads through.
pub const GROUP: &str = "workers";

/// Errors of the queue. Every one of them is a server condition, to be retried; content problems
/// are values ([`StreamEntry::decode`]), not errors.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected reply from redis to {0}")]
    Reply(&'static str),
    #[error(
        "shards changed from {stored} to {configured} while {queued} events are queued; drain the queue first or keep shards = {stored}"
    )]
    ShardsChanged {
        stored: u16,
        configured: u16,
        queued: u64,
    },
    #[error(
        "{queued} routine events are queued as an earlier hearth version spread them over the lanes (by sensor id alone); appends wait until the workers have stored them (stop the earlier version's ingest processes)"
    )]
    Rerouting { queued: u64 },
    #[error("redis: {0}")]
    NotReplicated(#[from] NotReplicated),
}

impl From<Unwritten> for QueueError {
    fn from(e: Unwritten) -> Self {
        match e {
            Unwritten::Redis(e) => QueueError::Redis(e),
            Unwritten::NotReplicated(e) => QueueError::NotReplicated(e),
        }
    }
}

impl QueueError {
    /// The stream or its group vanished (Redis restarted without persistence, or a key was
    /// deleted): recreate the groups and go on.
    pub fn is_missing_group(&self) -> bool {
        matches!(self, QueueError::Redis(e) if e.code() == Some("NOGROUP"))
    }
}

/// How events are spread over the routine lanes, recorded in `P:meta` (`route`). Version 1 (no
/// field) hashed the sensor id alone; version 2 hashes (house, sensor).
pub const ROUTE: &str = "house-sensor";

/// Connect with timeouts fit for hearth: a reply may take up to `response` (blocking reads ask
/// for more than the default half second).
pub async fn connect(url: &str, response: Duration) -> Result<Conn, QueueError> {
    Ok(conn::connect(url, response).await?)
}

/// A self-healing connection for everything but blocking reads ([`conn::manager`]).
pub fn manager(url: &str) -> Result<Conn, QueueError> {
    Ok(conn::manager(url, REPLY_TIMEOUT)?)
}

/// Default reply timeout of non-blocking commands. Generous: a timeout makes the caller retry,
/// and a retried XADD pipeline appends duplicates (harmless, but wasted work).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The queue operations shared by ingest, workers and `hearth status`.
#[derive(Clone)]
pub struct Queue {
    pub conn: Conn,
    pub keys: Keys,
    pub shards: u16,
    /// Stream keys of every lane, critical first: built once, used for every event.
    streams: std::sync::Arc<Vec<String>>,
    /// Whether `P:meta` says events are routed by [`ROUTE`] (checked before the first append).
    routed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// How long and how many dead letters are kept.
    pub retention: Retention,
    /// With ingest slots shared, appends keep each sensor's last `seq` ([`super::order`]), for
    /// at most this many sensors per lane.
    pub sequenced: Option<u64>,
    /// Replicas an append must reach before the intake acknowledges it (`redis_wait_replicas`).
    pub replicas: Option<Replicas>,
}

impl Queue {
    /// A queue handle; it connects on first use and reconnects by itself.
    pub fn open(url: &str, prefix: &str, shards: u16) -> Result<Queue, QueueError> {
        Ok(Queue::open_with(
            manager(url)?,
            &Keys::for_url(prefix, url),
            shards,
        ))
    }

    /// The configured installation's queue (its URL, prefix, shards and retention).
    pub fn from_config(config: &crate::config::Config) -> Result<Queue, QueueError> {
        let mut queue = Queue::open(&config.redis_url, &config.redis_prefix, config.shards)?;
        queue.retention = Retention::from_config(config);
        queue.sequenced = (config.ingest_slots > 1).then(|| Order::cap(config));
        queue.replicas = (config.redis_wait_replicas > 0).then(|| Replicas {
            count: config.redis_wait_replicas,
            timeout: Duration::from_millis(config.redis_wait_timeout_ms),
        });
        Ok(queue)
    }

    fn open_with(conn: Conn, keys: &Keys, shards: u16) -> Queue {
        let streams = std::iter::once(Lane::Critical)
            .chain(Lane::routine(shards))
            .map(|l| keys.stream(l))
            .collect();
        Queue {
            conn,
            keys: keys.clone(),
            shards,
            streams: std::sync::Arc::new(streams),
            routed: Default::default(),
            retention: Retention::default(),
            sequenced: None,
            replicas: None,
        }
    }

    /// Make sure appends may route by [`ROUTE`]: an installation upgraded from a version that
    /// routed by sensor id alone may still hold routine events routed that way, and appending a
    /// sensor's new events to another lane than its queued ones would let two consumers store
    /// them out of order. Until the workers (which serve any lane) have drained them, appends
    /// fail with [`QueueError::Rerouting`] and the caller retries (the ingest holds the PUBACKs,
    /// HTTP answers 503); then the route is recorded and never checked again by this process.
    pub async fn ensure_route(&self) -> Result<(), QueueError> {
        use std::sync::atomic::Ordering;
        if self.routed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let route: Option<String> = redis::cmd("HGET")
            .arg(self.keys.meta())
            .arg("route")
            .query_async(&mut conn)
            .await?;
        if route.as_deref() != Some(ROUTE) {
            let queued = crate::lane::routine_depth(&self.depths().await?);
            if queued > 0 {
                return Err(QueueError::Rerouting { queued });
            }
            redis::cmd("HSET")
                .arg(self.keys.meta())
                .arg("route")
                .arg(ROUTE)
                .exec_async(&mut conn)
                .await?;
        }
        self.routed.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// The stream key of a lane of this installation.
    pub fn stream(&self, lane: Lane) -> &str {
        match lane {
            Lane::Critical => &self.streams[0],
            Lane::Routine(n) => &self.streams[n as usize + 1],
        }
    }

    /// Every lane of this installation, critical first.
    pub fn lanes(&self) -> Vec<Lane> {
        std::iter::once(Lane::Critical)
            .chain(Lane::routine(self.shards))
            .collect()
    }

    /// Create the streams and their consumer group where missing.
    pub async fn ensure_groups(&self) -> Result<(), QueueError> {
        let mut pipe = redis::pipe();
        for lane in self.lanes() {
            pipe.cmd("XGROUP")
                .arg("CREATE")
                .arg(self.stream(lane))
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM");
        }
        let mut conn = self.conn.clone();
        let replies: Vec<Value> = pipe.ignore_errors().query_async(&mut conn).await?;
        for reply in replies {
            if let Value::ServerError(e) = reply
                && e.code() != "BUSYGROUP"
            {
                return Err(QueueError::Redis(e.into()));
            }
        }
        Ok(())
    }

    /// Record the shard count, refusing a change while events are queued: moving a sensor to
    /// another lane with events of it still in the old one would break its order.
    pub async fn check_shards(&self) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let stored: Option<u16> = redis::cmd("HGET")
            .arg(self.keys.meta())
            .arg("shards")
            .query_async(&mut conn)
            .await?;
        match stored {
            Some(s) if s == self.shards => return Ok(()),
            Some(s) => {
                let old = Queue::open_with(self.conn.clone(), &self.keys, s);
                let queued: u64 = old.depths().await?.iter().map(|(_, d)| d).sum();
                if queued > 0 {
                    return Err(QueueError::ShardsChanged {
                        stored: s,
                        configured: self.shards,
                        queued,
                    });
                }
            }
            None => {}
        }
        redis::cmd("HSET")
            .arg(self.keys.meta())
            .arg("shards")
            .arg(self.shards)
            .exec_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Append events to their lanes (one entry per lane, events in order) and rejections to the
    /// dead-letter stream, in one transaction (one per lane on a cluster). Returns once Redis has
    /// answered for all of them, and `redis_wait_replicas` replicas hold them: only then may the
    /// caller PUBACK.
    pub async fn append(&self, events: &[&Event], dead: &[&DeadLetter]) -> Result<(), QueueError> {
        if events.is_empty() && dead.is_empty() {
            return Ok(());
        }
        self.ensure_route().await?;
        let mut txn = Txn::new(&self.keys);
        self.add_append(&mut txn, events, dead)?;
        Ok(txn.exec_replicated(&self.conn, self.replicas).await?)
    }

    /// Add to `txn` what [`Queue::append`] sends: the lanes' entries, their counters, the dead
    /// letters and theirs.
    pub fn add_append(
        &self,
        txn: &mut Txn,
        events: &[&Event],
        dead: &[&DeadLetter],
    ) -> Result<(), QueueError> {
        let by_lane = Lane::group(events, self.shards);
        let stats = self.keys.stats();
        for (lane, list) in &by_lane {
            let body = serde_json::to_vec(list).map_err(|_| QueueError::Reply("encode"))?;
            let pipe = txn.on(Group::Lane(*lane));
            pipe.cmd("XADD")
                .arg(self.stream(*lane))
                .arg("*")
                .arg("n")
                .arg(list.len())
                .arg("e")
                .arg(body)
                .ignore();
            pipe.cmd("HINCRBY")
                .arg(self.keys.stats_of(*lane))
                .arg(stat::appended(*lane))
                .arg(list.len())
                .ignore();
        }
        if let Some(cap) = self.sequenced {
            order::add_advance(Order::of(&self.keys, self.shards, cap), txn, events);
        }
        if dead.is_empty() {
            return Ok(());
        }
        let pipe = txn.on(Group::Global);
        let dead_key = self.keys.dead();
        for d in dead {
            xadd_letter(pipe, &dead_key, d);
        }
        self.add_dead_cap(pipe, dead.len());
        pipe.cmd("HINCRBY")
            .arg(&stats)
            .arg(stat::REJECTED)
            .arg(dead.len())
            .ignore();
        for d in dead {
            pipe.cmd("HINCRBY")
                .arg(&stats)
                .arg(format!("rejected:{}", d.reason))
                .arg(1)
                .ignore();
        }
        Ok(())
    }

    /// Events queued per lane: appended and not yet acknowledged.
    pub async fn depths(&self) -> Result<Vec<(Lane, u64)>, QueueError> {
        // One HMGET per hash the counters are in: one on a server, one per lane on a cluster.
        let lanes = self.lanes();
        let mut keys: Vec<String> = Vec::new();
        for lane in &lanes {
            let key = self.keys.stats_of(*lane);
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        let mut pipe = redis::pipe();
        for key in &keys {
            let cmd = pipe.cmd("HMGET").arg(key);
            for lane in lanes.iter().filter(|l| self.keys.stats_of(**l) == *key) {
                cmd.arg(stat::appended(*lane)).arg(stat::finished(*lane));
            }
        }
        let mut conn = self.conn.clone();
        let replies: Vec<Vec<Option<u64>>> = pipe.query_async(&mut conn).await?;
        let mut counts = HashMap::new();
        for (key, reply) in keys.iter().zip(replies) {
            let fields = lanes.iter().filter(|l| self.keys.stats_of(**l) == *key);
            for (lane, c) in fields.zip(reply.chunks(2)) {
                let (appended, finished) =
                    (c[0].unwrap_or(0), c.get(1).copied().flatten().unwrap_or(0));
                counts.insert(*lane, appended.saturating_sub(finished));
            }
        }
        Ok(lanes
            .into_iter()
            .map(|lane| (lane, counts.get(&lane).copied().unwrap_or(0)))
            .collect())
    }

    /// Send a pipeline (nothing if it is empty).
    pub async fn exec(&self, pipe: &redis::Pipeline) -> Result<(), QueueError> {
        if pipe.cmd_iter().next().is_none() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        pipe.exec_async(&mut conn).await?;
        Ok(())
    }
}

/// Add to `pipe` the XADD of a dead letter to the stream `key`.
pub fn xadd_letter(pipe: &mut redis::Pipeline, key: &str, letter: &DeadLetter) {
    pipe.cmd("XADD")
        .arg(key)
        .arg("*")
        .arg("reason")
        .arg(letter.reason)
        .arg("detail")
        .arg(&letter.detail)
        .arg("topic")
        .arg(&letter.topic)
        .arg("payload")
        .arg(&letter.payload)
        .arg("source")
        .arg(letter.source)
        .arg("at")
        .arg(letter.at_ms)
        .ignore();
}

impl From<QueueError> for Unavailable {
    fn from(e: QueueError) -> Self {
        Unavailable(format!("redis: {e}"))
    }
}

/// The queue seam on Redis Streams (a consumer's reading is [`super::reader::RedisReader`]).
pub struct RedisQueue {
    pub queue: Queue,
}

impl EventQueue for RedisQueue {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn append<'a>(&'a self, events: &'a [&'a Event], dead: &'a [&'a DeadLetter]) -> Fut<'a, ()> {
        Box::pin(async move { Ok(self.queue.append(events, dead).await?) })
    }

    fn admit<'a>(&'a self, heads: &'a [crate::seam::Head]) -> Fut<'a, Vec<bool>> {
        let q = &self.queue;
        let sensors = Order::of(&q.keys, q.shards, q.sequenced.unwrap_or(u64::MAX));
        let admit = order::admit(sensors, &q.conn, heads);
        Box::pin(async move { Ok(admit.await.map_err(QueueError::from)?) })
    }

    fn keep_discovery<'a>(&'a self, configs: &'a [(String, Vec<u8>)]) -> Fut<'a, ()> {
        Box::pin(async move { Ok(self.queue.keep_discovery(configs).await?) })
    }

    fn discovery(&self) -> Fut<'_, Vec<(String, Vec<u8>)>> {
        Box::pin(async move { Ok(self.queue.discovery().await?) })
    }

    fn keep_devices<'a>(
        &'a self,
        devices: &'a [(String, String, DeviceInfo)],
        max: u64,
    ) -> Fut<'a, ()> {
        Box::pin(async move { Ok(self.queue.keep_devices(devices, max).await?) })
    }

    fn devices<'a>(&'a self, house: &'a str) -> Fut<'a, HashMap<String, DeviceInfo>> {
        Box::pin(async move { Ok(self.queue.devices(house).await?) })
    }

    fn keep_catalog<'a>(&'a self, devices: &'a [(String, DeviceInfo)], max: u64) -> Fut<'a, ()> {
        Box::pin(async move { Ok(self.queue.keep_catalog(devices, max).await?) })
    }

    fn catalog<'a>(&'a self, house: &'a str) -> Fut<'a, HashMap<String, DeviceInfo>> {
        Box::pin(async move { Ok(self.queue.catalog(house).await?) })
    }

    fn depths(&self) -> Fut<'_, Vec<(Lane, u64)>> {
        Box::pin(async move { Ok(self.queue.depths().await?) })
    }

    fn status(&self) -> Fut<'_, crate::status::Status> {
        Box::pin(async move { Ok(self.queue.status().await?) })
    }

    fn dead_letters<'a>(&'a self, filter: &'a Filter) -> Fut<'a, Vec<Letter>> {
        Box::pin(async move { Ok(self.queue.dead_letters(filter).await?) })
    }

    fn replay<'a>(&'a self, codecs: &'a Codecs, filter: &'a Filter) -> Fut<'a, Replayed> {
        Box::pin(async move { Ok(self.queue.replay(codecs, filter).await?) })
    }

    fn purge<'a>(&'a self, filter: &'a Filter) -> Fut<'a, u64> {
        Box::pin(async move { Ok(self.queue.purge(filter).await?) })
    }

    fn circuits(&self) -> Fut<'_, BTreeMap<String, bool>> {
        Box::pin(async move { Ok(self.queue.circuits().await?) })
    }

    fn ready(&self) -> Fut<'_, (&'static str, bool)> {
        Box::pin(async move {
            let mut conn = self.queue.conn.clone();
            let ok = redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .is_ok();
            Ok(("redis", ok))
        })
    }

    fn expire_dead_letters(&self) -> Fut<'_, u64> {
        Box::pin(async move { Ok(self.queue.expire_dead_letters().await?) })
    }
}

pub(crate) fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

pub(crate) fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        other => as_string(other).and_then(|s| s.parse().ok()),
    }
}
