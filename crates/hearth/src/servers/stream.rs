//! Reading the lanes on Redis Streams: entries and their decoding, reads through the consumer
//! group (new entries, pending ones taken over), delivery counts, and the acknowledgement that
//! trims (`ACK_AND_TRIM`). Appending, depths and dead letters are [`super::queue`]'s.

use std::time::Duration;

use redis::Value;

use super::conn::Conn;
use super::keys::Group;
use super::queue::{GROUP, Queue, QueueError, as_string, as_u64, xadd_letter};
use super::txn::Txn;
use crate::dead_letter::DeadLetter;
use crate::event::Event;
use crate::lane::Lane;
use crate::status::stat;

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

/// On a cluster, how long a read waits on one lane before it looks at the others again.
pub const CLUSTER_POLL: Duration = Duration::from_millis(10);

/// What one read returned, per lane.
pub type Batch = Vec<(Lane, Vec<StreamEntry>)>;

impl Queue {
    /// Add to `pipe` the acknowledgement of finished entries (each stream then trimmed below its
    /// oldest unacknowledged entry) and the count of what was stored.
    ///
    /// On a cluster each lane is a transaction of its own; the counts of what was stored go with
    /// the first lane's.
    pub fn add_ack(&self, txn: &mut Txn, acks: &[(Lane, Vec<Done>)], stored: u64, duplicates: u64) {
        let mut first = None;
        for (lane, done) in acks.iter().filter(|(_, d)| !d.is_empty()) {
            first.get_or_insert(*lane);
            self.ack_and_trim(txn.on(Group::Lane(*lane)), *lane, done);
        }
        let (group, stats) = match first {
            Some(lane) => (Group::Lane(lane), self.keys.stats_of(lane)),
            None => (Group::Global, self.keys.stats()),
        };
        for (field, n) in [(stat::STORED, stored), (stat::DUPLICATES, duplicates)] {
            if n > 0 {
                txn.on(group.clone())
                    .cmd("HINCRBY")
                    .arg(&stats)
                    .arg(field)
                    .arg(n)
                    .ignore();
            }
        }
    }

    /// Dead-letter `letters` (a whole unreadable entry, or the events of an entry the store
    /// refused) and acknowledge the entry, atomically (on a cluster: the letters first).
    pub async fn dead_letter(
        &self,
        lane: Lane,
        entry: &Done,
        letters: &[DeadLetter],
    ) -> Result<(), QueueError> {
        let mut txn = Txn::new(&self.keys);
        let pipe = txn.on(Group::Global);
        let dead = self.keys.dead();
        for letter in letters {
            xadd_letter(pipe, &dead, letter);
        }
        pipe.cmd("HINCRBY")
            .arg(self.keys.stats())
            .arg(stat::DEAD_LETTERED)
            .arg(letters.len())
            .ignore();
        self.ack_and_trim(txn.on(Group::Lane(lane)), lane, std::slice::from_ref(entry));
        Ok(txn.exec(&self.conn).await?)
    }

    fn ack_and_trim(&self, pipe: &mut redis::Pipeline, lane: Lane, done: &[Done]) {
        pipe.cmd("EVAL")
            .arg(ACK_AND_TRIM)
            .arg(2)
            .arg(self.stream(lane))
            .arg(self.keys.stats_of(lane))
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
    ///
    /// On a cluster one read may name only one slot's streams: the lanes are read each on its
    /// own, at once, without waiting; when none had anything, the first lane (the critical one,
    /// when held) is waited on for at most [`CLUSTER_POLL`], so that the others are looked at
    /// again that often.
    pub async fn read_new(
        &self,
        conn: &mut Conn,
        consumer: &str,
        lanes: &[Lane],
        count: usize,
        block: Duration,
    ) -> Result<Batch, QueueError> {
        if !self.keys.is_cluster() || lanes.len() < 2 {
            let reply: Value = self
                .xreadgroup(consumer, lanes, count, block)
                .query_async(conn)
                .await?;
            return self.parse_read(reply, lanes);
        }
        let mut pipe = redis::pipe();
        for lane in lanes {
            pipe.add_command(self.xreadgroup(
                consumer,
                std::slice::from_ref(lane),
                count,
                Duration::ZERO,
            ));
        }
        let replies: Vec<Value> = pipe.query_async(conn).await?;
        let mut batch = Batch::new();
        for reply in replies {
            batch.extend(self.parse_read(reply, lanes)?);
        }
        if !batch.is_empty() || block.is_zero() {
            return Ok(batch);
        }
        let reply: Value = self
            .xreadgroup(consumer, &lanes[..1], count, block.min(CLUSTER_POLL))
            .query_async(conn)
            .await?;
        self.parse_read(reply, lanes)
    }

    fn xreadgroup(
        &self,
        consumer: &str,
        lanes: &[Lane],
        count: usize,
        block: Duration,
    ) -> redis::Cmd {
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
        cmd
    }

    /// The entries of an XREADGROUP reply, by lane.
    fn parse_read(&self, reply: Value, lanes: &[Lane]) -> Result<Batch, QueueError> {
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
        conn: &mut Conn,
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
    conn: &mut Conn,
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
    conn: &mut Conn,
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
