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

use redis::aio::ConnectionManager;

use super::keys::Keys;
use crate::event::Event;
use crate::lane::Lane;
use crate::seam::Head;

/// How long a message of a sensor never seen waits, unless its `seq` is 0 or 1 (a device's
/// first): long enough for a concurrent ingest to append the readings before it.
pub const FIRST_WAIT_MS: u64 = 500;

/// Days a sensor's last `seq` is kept after its last append.
const KEPT_SECS: u64 = 7 * 24 * 3600;

/// KEYS: the order hashes. ARGV: first-wait ms, cap, then per message: key index (1-based),
/// field, first, last, waited ms, forced (1/0). Returns 1 (may be appended) or 0 per message,
/// reading them in order as if each admitted one were appended.
const ADMIT: &str = r#"
local first_wait, cap = tonumber(ARGV[1]), tonumber(ARGV[2])
local seen, out = {}, {}
for i = 3, #ARGV, 6 do
  local key = KEYS[tonumber(ARGV[i])]
  local id = key .. '\n' .. ARGV[i + 1]
  local first, last = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local waited, forced = tonumber(ARGV[i + 4]), ARGV[i + 5] == '1'
  local cur = seen[id]
  if cur == nil then
    cur = tonumber(redis.call('HGET', key, ARGV[i + 1]) or '-1')
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

    /// The order hash of a sensor: its routine lane's, whatever the kind.
    fn key(&self, house_id: &str, sensor_id: &str) -> String {
        self.keys
            .order(Lane::of(house_id, sensor_id, "", self.shards))
    }
}

fn field(house_id: &str, sensor_id: &str) -> String {
    format!("{house_id}/{sensor_id}")
}

/// Which of `heads` may be appended now, in order.
pub async fn admit(
    order: Order<'_>,
    conn: &ConnectionManager,
    heads: &[Head],
) -> Result<Vec<bool>, redis::RedisError> {
    if heads.is_empty() {
        return Ok(Vec::new());
    }
    let mut keys: Vec<String> = Vec::new();
    let mut cmd = redis::cmd("EVAL");
    let mut args: Vec<String> = vec![FIRST_WAIT_MS.to_string(), order.cap.to_string()];
    for h in heads {
        let key = order.key(&h.house_id, &h.sensor_id);
        let index = match keys.iter().position(|k| *k == key) {
            Some(i) => i + 1,
            None => {
                keys.push(key);
                keys.len()
            }
        };
        args.extend([
            index.to_string(),
            field(&h.house_id, &h.sensor_id),
            h.first.to_string(),
            h.last.to_string(),
            h.waited_ms.min(i64::MAX as u64).to_string(),
            if h.waited_ms == u64::MAX { "1" } else { "0" }.to_string(),
        ]);
    }
    cmd.arg(ADMIT).arg(keys.len()).arg(&keys).arg(&args);
    let mut conn = conn.clone();
    let out: Vec<i64> = cmd.query_async(&mut conn).await?;
    Ok(out.into_iter().map(|v| v == 1).collect())
}

/// Add to an append's transaction the advance of each sensor's last `seq` to its highest in
/// `events`.
pub fn add_advance(order: Order<'_>, pipe: &mut redis::Pipeline, events: &[&Event]) {
    let mut by_key: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for e in events {
        let Some(seq) = e.seq else { continue };
        let key = order.key(&e.house_id, &e.sensor_id);
        let top = by_key
            .entry(key)
            .or_default()
            .entry(field(&e.house_id, &e.sensor_id))
            .or_insert(seq);
        *top = (*top).max(seq);
    }
    for (key, fields) in by_key {
        pipe.cmd("EVAL")
            .arg(ADVANCE)
            .arg(1)
            .arg(key)
            .arg(KEPT_SECS)
            .arg(order.cap);
        for (f, seq) in fields {
            pipe.arg(f).arg(seq);
        }
        pipe.ignore();
    }
}
