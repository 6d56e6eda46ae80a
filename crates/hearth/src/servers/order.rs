//! Per-sensor order across ingest processes that share the broker's messages.
//!
//! With `ingest_slots` above 1 the broker hands a sensor's messages round-robin to several
//! sessions, possibly in several processes, and a killed session's messages come back only when
//! its slot is taken over, seconds later. So that a sensor's readings are still appended (and
//! then stored, evaluated, pushed) in their `seq` order, each lane keeps the last `seq` appended
//! per sensor (`P:order:{lane}`, advanced in the same transaction as the append), and a message
//! whose first `seq` runs ahead of it waits at its ingest, unacknowledged, until the readings
//! before it are appended by whoever holds them ([`admit`]), or until the caller gives up waiting
//! (`ingest_order_wait_ms`: a reading really lost upstream). A reading at or below the last
//! `seq` (a redelivery, a device that restarted its count) never waits; critical ones never
//! wait either, but they advance the count.
//!
//! A lane's hash holds at most [`Order::cap`] sensors (twice its share of what the caps let the
//! store keep, `max_houses` × `max_sensors_per_house`): a device making up sensor ids, whose
//! readings the workers dead-letter past the caps, cannot grow it further. Past it, a sensor not
//! recorded yet is appended as it comes, without waiting (nothing to wait on).

use std::collections::BTreeMap;

use super::conn::Conn;
use super::keys::{Group, Keys};
use super::txn::Txn;
use crate::event::Event;
use crate::lane::Lane;
use crate::seam::Head;

/// How long a message of a sensor never seen waits, unless its `seq` is 0 or 1 (a device's
/// first): long enough for a concurrent ingest to append the readings before it.
pub const FIRST_WAIT_MS: u64 = 500;

/// Days a sensor's last `seq` is kept after its last append.
const KEPT_SECS: u64 = 7 * 24 * 3600;

/// KEYS[1]: a lane's order hash. ARGV: first-wait ms, cap, then per message of its sensors:
/// field, first, last, waited ms, forced (1/0). Returns 1 (may be appended) or 0 per message,
/// reading them in order as if each admitted one were appended.
const ADMIT: &str = r#"
local first_wait, cap = tonumber(ARGV[1]), tonumber(ARGV[2])
local key = KEYS[1]
local seen, out = {}, {}
for i = 3, #ARGV, 5 do
  local id = ARGV[i]
  local first, last = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local waited, forced = tonumber(ARGV[i + 3]), ARGV[i + 4] == '1'
  local cur = seen[id]
  if cur == nil then
    cur = tonumber(redis.call('HGET', key, id) or '-1')
  end
  local ok
  if forced then
    ok = true
  elseif cur < 0 then
    ok = first <= 1 or waited >= first_wait or redis.call('HLEN', key) >= cap
  else
    ok = first <= cur + 1
  end
  if ok then
    if last > cur then cur = last end
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
  seen[id] = cur
end
return out
"#;

/// KEYS[1]: an order hash. ARGV: keep seconds, cap, then field, seq pairs: each field raised to
/// its seq (never lowered); a new field only while the hash holds fewer than `cap`.
const ADVANCE: &str = r#"
local cap = tonumber(ARGV[2])
for i = 3, #ARGV, 2 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if cur == false then
    if redis.call('HLEN', KEYS[1]) < cap then
      redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    end
  elseif tonumber(ARGV[i + 1]) > tonumber(cur) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 0
"#;

/// Where the queue keeps its sensors' order.
pub struct Order<'a> {
    pub keys: &'a Keys,
    pub shards: u16,
    /// Most sensors a lane's hash records.
    pub cap: u64,
}

impl Order<'_> {
    pub fn of(keys: &Keys, shards: u16, cap: u64) -> Order<'_> {
        Order { keys, shards, cap }
    }

    /// Twice a lane's share of the sensors the caps let the store keep (lanes are a hash of the
    /// sensor: some get more than their share).
    pub fn cap(config: &crate::config::Config) -> u64 {
        let sensors = config
            .max_houses
            .saturating_mul(config.max_sensors_per_house);
        (sensors / u64::from(config.shards.max(1)))
            .saturating_mul(2)
            .max(1)
    }

    /// The routine lane whose hash holds a sensor's order, whatever the kind.
    fn lane(&self, house_id: &str, sensor_id: &str) -> Lane {
        Lane::of(house_id, sensor_id, "", self.shards)
    }
}

fn field(house_id: &str, sensor_id: &str) -> String {
    format!("{house_id}/{sensor_id}")
}

/// Which of `heads` may be appended now, in order: one script per lane (its hash), in one
/// round trip.
pub async fn admit(
    order: Order<'_>,
    conn: &Conn,
    heads: &[Head],
) -> Result<Vec<bool>, redis::RedisError> {
    if heads.is_empty() {
        return Ok(Vec::new());
    }
    let mut by_lane: BTreeMap<Lane, Vec<usize>> = BTreeMap::new();
    for (i, h) in heads.iter().enumerate() {
        by_lane
            .entry(order.lane(&h.house_id, &h.sensor_id))
            .or_default()
            .push(i);
    }
    let mut pipe = redis::pipe();
    for (lane, indexes) in &by_lane {
        let cmd = pipe
            .cmd("EVAL")
            .arg(ADMIT)
            .arg(1)
            .arg(order.keys.order(*lane))
            .arg(FIRST_WAIT_MS)
            .arg(order.cap);
        for h in indexes.iter().map(|&i| &heads[i]) {
            cmd.arg(field(&h.house_id, &h.sensor_id))
                .arg(h.first)
                .arg(h.last)
                .arg(h.waited_ms.min(i64::MAX as u64))
                .arg(if h.waited_ms == u64::MAX { "1" } else { "0" });
        }
    }
    let mut conn = conn.clone();
    let replies: Vec<Vec<i64>> = pipe.query_async(&mut conn).await?;
    let mut out = vec![false; heads.len()];
    for ((_, indexes), reply) in by_lane.iter().zip(replies) {
        for (&i, v) in indexes.iter().zip(reply) {
            out[i] = v == 1;
        }
    }
    Ok(out)
}

/// Add to an append's transaction the advance of each sensor's last `seq` to its highest in
/// `events` (in the part of the sensor's routine lane).
pub fn add_advance(order: Order<'_>, txn: &mut Txn, events: &[&Event]) {
    let mut by_lane: BTreeMap<Lane, BTreeMap<String, i64>> = BTreeMap::new();
    for e in events {
        let Some(seq) = e.seq else { continue };
        let top = by_lane
            .entry(order.lane(&e.house_id, &e.sensor_id))
            .or_default()
            .entry(field(&e.house_id, &e.sensor_id))
            .or_insert(seq);
        *top = (*top).max(seq);
    }
    for (lane, fields) in by_lane {
        let pipe = txn.on(Group::Lane(lane));
        pipe.cmd("EVAL")
            .arg(ADVANCE)
            .arg(1)
            .arg(order.keys.order(lane))
            .arg(KEPT_SECS)
            .arg(order.cap);
        for (f, seq) in fields {
            pipe.arg(f).arg(seq);
        }
        pipe.ignore();
    }
}
