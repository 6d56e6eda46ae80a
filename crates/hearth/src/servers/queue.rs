//! The durable buffer between ingest and workers: Redis Streams.
//!
//! Events are spread over lanes: one critical lane for the kinds of
//! [`crate::event::CRITICAL_KINDS`], and `shards` routine lanes chosen by a hash of the sensor id,
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
//! Rejected input goes to the dead-letter stream with its reason, topic and raw payload. It is
//! never trimmed by hearth.
//!
//! Keys (all under the configured prefix `P`):
//! `P:stream:{lane}`, `P:dead`, `P:lease:{lane}`, `P:consumers:{pool}`, `P:stats`, `P:meta`,
//! and the cache's `P:latest:{sensor}`, `P:house:{house}:sensors`.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Value};

use crate::dead_letter::{DeadLetter, Retention};
use crate::event::Event;
use crate::lane::Lane;
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

/// Key names under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_string(),
        }
    }
    pub fn stream(&self, lane: Lane) -> String {
        format!("{}:stream:{}", self.prefix, lane.name())
    }
    pub fn dead(&self) -> String {
        format!("{}:dead", self.prefix)
    }
    pub fn lease(&self, lane: Lane) -> String {
        format!("{}:lease:{}", self.prefix, lane.name())
    }
    pub fn consumers(&self, pool: &str) -> String {
        format!("{}:consumers:{pool}", self.prefix)
    }
    pub fn stats(&self) -> String {
        format!("{}:stats", self.prefix)
    }
    pub fn meta(&self) -> String {
        format!("{}:meta", self.prefix)
    }
    /// Pub/sub channel of WebSocket pushes.
    pub fn push(&self) -> String {
        format!("{}:push", self.prefix)
    }
    /// Stream of alert transitions waiting for their webhooks.
    pub fn notify(&self) -> String {
        format!("{}:notify", self.prefix)
    }
    /// Houses watched by WebSocket clients (sorted set, score: until when, epoch ms).
    pub fn watched(&self) -> String {
        format!("{}:watched", self.prefix)
    }
    /// Circuit states of every process (hash: `{dependency}|{process}` → `{0|1}:{epoch ms}`).
    pub fn circuits(&self) -> String {
        format!("{}:circuits", self.prefix)
    }
    /// House tokens, cached (hash → house id).
    pub fn tokens(&self) -> String {
        format!("{}:tokens", self.prefix)
    }
    /// A sensor's latest values (hash: kind → order key + JSON).
    pub fn latest(&self, house_id: &str, sensor_id: &str) -> String {
        format!("{}:latest:{house_id}:{sensor_id}", self.prefix)
    }
    pub fn latest_prefix(&self) -> String {
        format!("{}:latest:", self.prefix)
    }
    pub fn house_sensors(&self, house_id: &str) -> String {
        format!("{}:house:{house_id}:sensors", self.prefix)
    }
}

/// One entry read back from a lane.
#[derive(Debug, Clone)]
pub struct StreamEntry {
    pub id: String,
    /// The `e` field, or `None` when the entry has none (or was deleted while pending).
    pub body: Option<Vec<u8>>,
    /// The `n` field: how many events the ingest put in it (known even when `e` is unreadable).
    pub count: Option<u64>,
}

impl StreamEntry {
    /// The entry's events, in the order they were appended.
    pub fn decode(&self) -> Result<Vec<Event>, String> {
        let body = self.body.as_deref().ok_or("entry has no `e` field")?;
        serde_json::from_slice(body).map_err(|e| e.to_string())
    }
}

/// An entry to acknowledge, with the number of events it held.
#[derive(Debug, Clone)]
pub struct Done {
    pub id: String,
    pub events: u64,
}

/// What one read returned, per lane.
pub type Batch = Vec<(Lane, Vec<StreamEntry>)>;

/// A client whose connections send at once: redis-rs leaves Nagle's algorithm on, and a
/// pipelined request then waits for the server's delayed ACK (40 ms on Linux), which measured
/// as most of the receive → stored latency.
fn client(url: &str) -> Result<redis::Client, QueueError> {
    use redis::IntoConnectionInfo;
    let info = url
        .into_connection_info()?
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    Ok(redis::Client::open(info)?)
}

/// Connect with timeouts fit for hearth: a reply may take up to `response` (blocking reads ask
/// for more than the default half second).
pub async fn connect(url: &str, response: Duration) -> Result<MultiplexedConnection, QueueError> {
    let client = client(url)?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(3)))
        .set_response_timeout(Some(response));
    Ok(client
        .get_multiplexed_async_connection_with_config(&config)
        .await?)
}

/// A self-healing connection for everything but blocking reads: after Redis went away, the call
/// that noticed fails (the caller retries) and the manager reconnects in the background.
pub fn manager(url: &str) -> Result<ConnectionManager, QueueError> {
    let client = client(url)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(3)))
        .set_response_timeout(Some(REPLY_TIMEOUT))
        .set_max_delay(Duration::from_secs(2));
    Ok(ConnectionManager::new_lazy_with_config(client, config)?)
}

/// Default reply timeout of non-blocking commands. Generous: a timeout makes the caller retry,
/// and a retried XADD pipeline appends duplicates (harmless, but wasted work).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The queue operations shared by ingest, workers and `hearth status`.
#[derive(Clone)]
pub struct Queue {
    pub conn: ConnectionManager,
    pub keys: Keys,
    pub shards: u16,
    /// Stream keys of every lane, critical first: built once, used for every event.
    streams: std::sync::Arc<Vec<String>>,
    /// Whether `P:meta` says events are routed by [`ROUTE`] (checked before the first append).
    routed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// How long and how many dead letters are kept.
    pub retention: Retention,
}

impl Queue {
    /// A queue handle; it connects on first use and reconnects by itself.
    pub fn open(url: &str, prefix: &str, shards: u16) -> Result<Queue, QueueError> {
        Ok(Queue::open_with(manager(url)?, &Keys::new(prefix), shards))
    }

    /// The configured installation's queue (its URL, prefix, shards and retention).
    pub fn from_config(config: &crate::config::Config) -> Result<Queue, QueueError> {
        let mut queue = Queue::open(&config.redis_url, &config.redis_prefix, config.shards)?;
        queue.retention = Retention::from_config(config);
        Ok(queue)
    }

    fn open_with(conn: ConnectionManager, keys: &Keys, shards: u16) -> Queue {
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
        }
    }

    /// Remove the dead letters past their retention (age and count); returns how many.
    pub async fn expire_dead_letters(&self) -> Result<u64, QueueError> {
        let now_ms = crate::event::now_us() as u64 / 1000;
        let min_id = match self.retention.max_age_ms {
            0 => 0,
            age => now_ms.saturating_sub(age),
        };
        let mut conn = self.conn.clone();
        let n: u64 = redis::cmd("EVAL")
            .arg(EXPIRE_DEAD)
            .arg(2)
            .arg(self.keys.dead())
            .arg(self.keys.stats())
            .arg(min_id)
            .arg(self.retention.max_count)
            .arg("=")
            .query_async(&mut conn)
            .await?;
        Ok(n)
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
    /// dead-letter stream, in one transaction. Returns once Redis has answered for all of them:
    /// only then may the caller PUBACK.
    pub async fn append(&self, events: &[&Event], dead: &[&DeadLetter]) -> Result<(), QueueError> {
        if events.is_empty() && dead.is_empty() {
            return Ok(());
        }
        self.ensure_route().await?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        self.add_append(&mut pipe, events, dead)?;
        let mut conn = self.conn.clone();
        pipe.exec_async(&mut conn).await?;
        Ok(())
    }

    /// Add to `pipe` what [`Queue::append`] sends: the lanes' entries, their counters, the dead
    /// letters and theirs.
    pub fn add_append(
        &self,
        pipe: &mut redis::Pipeline,
        events: &[&Event],
        dead: &[&DeadLetter],
    ) -> Result<(), QueueError> {
        let by_lane = Lane::group(events, self.shards);
        let stats = self.keys.stats();
        for (lane, list) in &by_lane {
            let body = serde_json::to_vec(list).map_err(|_| QueueError::Reply("encode"))?;
            pipe.cmd("XADD")
                .arg(self.stream(*lane))
                .arg("*")
                .arg("n")
                .arg(list.len())
                .arg("e")
                .arg(body)
                .ignore();
            pipe.cmd("HINCRBY")
                .arg(&stats)
                .arg(stat::appended(*lane))
                .arg(list.len())
                .ignore();
        }
        let dead_key = self.keys.dead();
        for d in dead {
            xadd_letter(pipe, &dead_key, d);
        }
        self.add_dead_cap(pipe, dead.len());
        if !dead.is_empty() {
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
        }
        Ok(())
    }

    /// Events queued per lane: appended and not yet acknowledged.
    pub async fn depths(&self) -> Result<Vec<(Lane, u64)>, QueueError> {
        let lanes = self.lanes();
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(self.keys.stats());
        for lane in &lanes {
            cmd.arg(stat::appended(*lane)).arg(stat::finished(*lane));
        }
        let mut conn = self.conn.clone();
        let counts: Vec<Option<u64>> = cmd.query_async(&mut conn).await?;
        Ok(lanes
            .into_iter()
            .zip(counts.chunks(2))
            .map(|(lane, c)| {
                let (appended, finished) =
                    (c[0].unwrap_or(0), c.get(1).copied().flatten().unwrap_or(0));
                (lane, appended.saturating_sub(finished))
            })
            .collect())
    }

    /// Add to `pipe` the acknowledgement of finished entries (each stream then trimmed below its
    /// oldest unacknowledged entry) and the count of what was stored.
    pub fn add_ack(
        &self,
        pipe: &mut redis::Pipeline,
        acks: &[(Lane, Vec<Done>)],
        stored: u64,
        duplicates: u64,
    ) {
        for (lane, done) in acks.iter().filter(|(_, d)| !d.is_empty()) {
            self.ack_and_trim(pipe, *lane, done);
        }
        let stats = self.keys.stats();
        for (field, n) in [(stat::STORED, stored), (stat::DUPLICATES, duplicates)] {
            if n > 0 {
                pipe.cmd("HINCRBY").arg(&stats).arg(field).arg(n).ignore();
            }
        }
    }

    /// Add to `pipe` dead letters a worker writes beside an acknowledgement (events it did not
    /// store: past a cap), and the `events` they hold to the dead-lettered count.
    pub fn add_dead(&self, pipe: &mut redis::Pipeline, letters: &[DeadLetter], events: u64) {
        let dead = self.keys.dead();
        for letter in letters {
            xadd_letter(pipe, &dead, letter);
        }
        self.add_dead_cap(pipe, letters.len());
        if events > 0 {
            pipe.cmd("HINCRBY")
                .arg(self.keys.stats())
                .arg(stat::DEAD_LETTERED)
                .arg(events)
                .ignore();
        }
    }

    /// After `letters` new dead letters, hold the stream to its count (approximately: whole
    /// nodes of the stream, cheap), counting what goes.
    fn add_dead_cap(&self, pipe: &mut redis::Pipeline, letters: usize) {
        if letters == 0 || self.retention.max_count == 0 {
            return;
        }
        pipe.cmd("EVAL")
            .arg(EXPIRE_DEAD)
            .arg(2)
            .arg(self.keys.dead())
            .arg(self.keys.stats())
            .arg(0)
            .arg(self.retention.max_count)
            .arg("~")
            .ignore();
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

    /// Dead-letter `letters` (a whole unreadable entry, or the events of an entry the store
    /// refused) and acknowledge the entry, atomically.
    pub async fn dead_letter(
        &self,
        lane: Lane,
        entry: &Done,
        letters: &[DeadLetter],
    ) -> Result<(), QueueError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        let dead = self.keys.dead();
        for letter in letters {
            xadd_letter(&mut pipe, &dead, letter);
        }
        self.ack_and_trim(&mut pipe, lane, std::slice::from_ref(entry));
        pipe.cmd("HINCRBY")
            .arg(self.keys.stats())
            .arg(stat::DEAD_LETTERED)
            .arg(letters.len())
            .ignore();
        let mut conn = self.conn.clone();
        pipe.exec_async(&mut conn).await?;
        Ok(())
    }

    fn ack_and_trim(&self, pipe: &mut redis::Pipeline, lane: Lane, done: &[Done]) {
        pipe.cmd("EVAL")
            .arg(ACK_AND_TRIM)
            .arg(2)
            .arg(self.stream(lane))
            .arg(self.keys.stats())
            .arg(GROUP)
            .arg(stat::finished(lane));
        for d in done {
            pipe.arg(&d.id).arg(d.events);
        }
        pipe.ignore();
    }

    /// How many times an entry has been delivered (0 when it is not pending).
    pub async fn deliveries(&self, lane: Lane, id: &str) -> Result<u64, QueueError> {
        let mut conn = self.conn.clone();
        let reply: Value = redis::cmd("XPENDING")
            .arg(self.stream(lane))
            .arg(GROUP)
            .arg(id)
            .arg(id)
            .arg(1)
            .query_async(&mut conn)
            .await?;
        match reply {
            Value::Array(rows) => match rows.first() {
                Some(Value::Array(row)) => Ok(row.get(3).and_then(as_u64).unwrap_or(0)),
                _ => Ok(0),
            },
            _ => Err(QueueError::Reply("XPENDING")),
        }
    }

    /// Read new entries of `lanes` for `consumer`, waiting up to `block` for some. Uses the given
    /// connection, which a blocking read ties up.
    pub async fn read_new(
        &self,
        conn: &mut MultiplexedConnection,
        consumer: &str,
        lanes: &[Lane],
        count: usize,
        block: Duration,
    ) -> Result<Batch, QueueError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(count);
        // BLOCK 0 would wait for ever: no wait is no BLOCK.
        if !block.is_zero() {
            cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS");
        for lane in lanes {
            cmd.arg(self.stream(*lane));
        }
        for _ in lanes {
            cmd.arg(">");
        }
        let reply: Value = cmd.query_async(conn).await?;
        let mut batch = Batch::new();
        let Value::Array(streams) = reply else {
            return Ok(batch); // nil: the block timed out
        };
        for stream in streams {
            let Value::Array(mut pair) = stream else {
                return Err(QueueError::Reply("XREADGROUP"));
            };
            let (Some(entries), Some(key)) = (pair.pop(), pair.pop()) else {
                return Err(QueueError::Reply("XREADGROUP"));
            };
            let key = as_string(&key).ok_or(QueueError::Reply("XREADGROUP"))?;
            let lane = lanes
                .iter()
                .find(|l| self.stream(**l) == key)
                .ok_or(QueueError::Reply("XREADGROUP"))?;
            batch.push((*lane, parse_entries(entries)?));
        }
        Ok(batch)
    }

    /// Take over pending entries of a lane (every one, whoever held it: the caller owns the lane),
    /// from `cursor` on. Returns the next cursor (`0-0` when done) and the entries. Entries
    /// deleted while pending are dropped from the pending list by Redis itself.
    pub async fn claim_pending(
        &self,
        conn: &mut MultiplexedConnection,
        consumer: &str,
        lane: Lane,
        cursor: &str,
        count: usize,
    ) -> Result<(String, Vec<StreamEntry>), QueueError> {
        let (next, raw) = claim(conn, self.stream(lane), GROUP, consumer, 0, cursor, count).await?;
        Ok((next, raw.into_iter().map(StreamEntry::from).collect()))
    }
}

/// XACK each entry and count its events as finished (only if this call acknowledged it, so a
/// second acknowledgement counts nothing), then trim the stream below its oldest pending entry,
/// or just past the group's last delivered id when nothing is pending. Entries below that floor
/// were all delivered (delivery follows id order) and are not pending, so acknowledged: trimming
/// never loses an unacknowledged entry, and entries not yet delivered are above it.
///
/// KEYS: stream, stats. ARGV: group, the lane's `out:` field, then (entry id, events) pairs.
const ACK_AND_TRIM: &str = r#"
local acked, events = 0, 0
for i = 3, #ARGV, 2 do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then
    acked = acked + 1
    events = events + tonumber(ARGV[i + 1])
  end
end
if events > 0 then
  redis.call('HINCRBY', KEYS[2], ARGV[2], events)
end
local floor = redis.call('XPENDING', KEYS[1], ARGV[1])[2]
if not floor then
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local name, last
    for i = 1, #g, 2 do
      if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
    end
    if name == ARGV[1] then
      local ms, sq = string.match(last, '^(%d+)-(%d+)$')
      floor = ms .. '-' .. string.format('%d', tonumber(sq) + 1)
    end
  end
end
if floor then
  redis.call('XTRIM', KEYS[1], 'MINID', floor)
end
return acked
"#;

/// Trim the dead-letter stream below a minimum id (age; 0: none) and to a length (0: none),
/// exactly (`=`) or by whole nodes (`~`), and count what went in `dead_expired`.
///
/// KEYS: dead stream, stats. ARGV: min id (epoch ms), max length, `=` or `~`.
const EXPIRE_DEAD: &str = r#"
local n = 0
if tonumber(ARGV[1]) > 0 then
  n = n + redis.call('XTRIM', KEYS[1], 'MINID', ARGV[1])
end
if tonumber(ARGV[2]) > 0 then
  n = n + redis.call('XTRIM', KEYS[1], 'MAXLEN', ARGV[3], ARGV[2])
end
if n > 0 then
  redis.call('HINCRBY', KEYS[2], 'dead_expired', n)
end
return n
"#;

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

/// An entry as Redis returns it: id and fields.
pub struct RawEntry {
    pub id: String,
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
}

impl RawEntry {
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }
}

impl From<RawEntry> for StreamEntry {
    fn from(raw: RawEntry) -> Self {
        let count = raw
            .field("n")
            .and_then(|n| std::str::from_utf8(n).ok())
            .and_then(|n| n.parse().ok());
        let body = raw.field("e").map(<[u8]>::to_vec);
        StreamEntry {
            id: raw.id,
            body,
            count,
        }
    }
}

fn parse_entries(value: Value) -> Result<Vec<StreamEntry>, QueueError> {
    Ok(parse_raw(value)?
        .into_iter()
        .map(StreamEntry::from)
        .collect())
}

pub fn parse_raw(value: Value) -> Result<Vec<RawEntry>, QueueError> {
    let Value::Array(items) = value else {
        return Err(QueueError::Reply("stream entries"));
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(mut parts) = item else {
            return Err(QueueError::Reply("stream entry"));
        };
        if parts.len() != 2 {
            return Err(QueueError::Reply("stream entry"));
        }
        let fields = parts.pop();
        let id = parts
            .pop()
            .as_ref()
            .and_then(as_string)
            .ok_or(QueueError::Reply("stream entry id"))?;
        let mut pairs = Vec::new();
        if let Some(Value::Array(fields)) = fields {
            let mut it = fields.into_iter();
            while let (Some(Value::BulkString(k)), Some(Value::BulkString(v))) =
                (it.next(), it.next())
            {
                pairs.push((k, v));
            }
        }
        out.push(RawEntry { id, fields: pairs });
    }
    Ok(out)
}

/// XREADGROUP of one stream (new entries), for side streams such as the notifications.
pub async fn read_group(
    conn: &mut MultiplexedConnection,
    stream: &str,
    group: &str,
    consumer: &str,
    count: usize,
    block: Duration,
) -> Result<Vec<RawEntry>, QueueError> {
    let reply: Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg(consumer)
        .arg("COUNT")
        .arg(count)
        .arg("BLOCK")
        .arg(block.as_millis() as u64)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query_async(conn)
        .await?;
    let Value::Array(mut streams) = reply else {
        return Ok(Vec::new());
    };
    match streams.pop() {
        Some(Value::Array(mut pair)) if pair.len() == 2 => {
            parse_raw(pair.pop().unwrap_or(Value::Nil))
        }
        _ => Ok(Vec::new()),
    }
}

/// XAUTOCLAIM entries idle for `min_idle_ms` to `consumer`; returns the next cursor and them.
pub async fn claim(
    conn: &mut MultiplexedConnection,
    stream: &str,
    group: &str,
    consumer: &str,
    min_idle_ms: u64,
    cursor: &str,
    count: usize,
) -> Result<(String, Vec<RawEntry>), QueueError> {
    let reply: Value = redis::cmd("XAUTOCLAIM")
        .arg(stream)
        .arg(group)
        .arg(consumer)
        .arg(min_idle_ms)
        .arg(cursor)
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await?;
    let Value::Array(mut parts) = reply else {
        return Err(QueueError::Reply("XAUTOCLAIM"));
    };
    if parts.len() < 2 {
        return Err(QueueError::Reply("XAUTOCLAIM"));
    }
    let entries = parse_raw(parts.swap_remove(1))?;
    let next = as_string(&parts[0]).ok_or(QueueError::Reply("XAUTOCLAIM"))?;
    Ok((next, entries))
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
