//! The latest value of each sensor and kind, in Redis, for apps that want "now" without a query.
//!
//! `P:latest:{sensor}` is a hash from kind to a JSON object (`value`, `unit`, `ts`, `seq`,
//! `received_us`, `house_id`); `P:house:{house}:sensors` is the set of a house's sensors.
//! A reading replaces the cached one only if it is newer by (ts, seq, received time), checked and
//! written in one Lua script, so a redelivered or stale event never moves the cache backwards,
//! whichever worker writes it and in whatever order.

use std::collections::HashMap;

use redis::aio::ConnectionManager;

use crate::event::Event;
use crate::queue::{Keys, QueueError};

/// For each reading: KEYS[i] the sensor's hash, ARGV in groups of 7: kind, ts, seq (or ""),
/// received_us, the house's sensor-set key, sensor id, JSON.
const UPDATE_LATEST: &str = r#"
local function newer(ts, seq, rcv, cur)
  local c = cjson.decode(cur)
  if ts ~= c.ts then return ts > c.ts end
  local cs = ''
  if type(c.seq) == 'number' then cs = string.format('%d', c.seq) end
  if seq ~= cs then
    if #seq ~= #cs then return #seq > #cs end
    return seq > cs
  end
  return rcv > c.received_us
end
local updated = 0
for i = 1, #KEYS do
  local b = (i - 1) * 7
  local kind, ts, seq, rcv = ARGV[b + 1], tonumber(ARGV[b + 2]), ARGV[b + 3], tonumber(ARGV[b + 4])
  local cur = redis.call('HGET', KEYS[i], kind)
  if (not cur) or newer(ts, seq, rcv, cur) then
    redis.call('HSET', KEYS[i], kind, ARGV[b + 7])
    updated = updated + 1
  end
  redis.call('SADD', ARGV[b + 5], ARGV[b + 6])
end
return updated
"#;

#[derive(Clone)]
pub struct Cache {
    conn: ConnectionManager,
    keys: Keys,
}

impl Cache {
    pub fn new(conn: ConnectionManager, keys: Keys) -> Self {
        Cache { conn, keys }
    }

    /// Offer these events as latest values; only the newest of each (sensor, kind) is sent.
    pub async fn update(&self, events: &[&Event]) -> Result<(), QueueError> {
        let mut newest: HashMap<(&str, &str), &Event> = HashMap::new();
        for e in events {
            let slot = newest.entry((&e.sensor_id, &e.kind)).or_insert(e);
            if order_key(e) > order_key(slot) {
                *slot = e;
            }
        }
        if newest.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(UPDATE_LATEST).arg(newest.len());
        for e in newest.values() {
            cmd.arg(self.keys.latest(&e.sensor_id));
        }
        for e in newest.values() {
            let json = serde_json::json!({
                "value": e.value,
                "unit": e.unit,
                "ts": e.ts_ms,
                "seq": e.seq,
                "received_us": e.received_us,
                "house_id": e.house_id,
            });
            cmd.arg(&e.kind)
                .arg(e.ts_ms)
                .arg(e.seq.map(|s| s.to_string()).unwrap_or_default())
                .arg(e.received_us)
                .arg(self.keys.house_sensors(&e.house_id))
                .arg(&e.sensor_id)
                .arg(json.to_string());
        }
        let mut conn = self.conn.clone();
        cmd.exec_async(&mut conn).await?;
        Ok(())
    }

    /// The cached latest values of a sensor, kind → JSON.
    pub async fn latest(&self, sensor_id: &str) -> Result<HashMap<String, String>, QueueError> {
        let mut conn = self.conn.clone();
        Ok(redis::cmd("HGETALL")
            .arg(self.keys.latest(sensor_id))
            .query_async(&mut conn)
            .await?)
    }
}

fn order_key(e: &Event) -> (i64, i64, i64) {
    (e.ts_ms, e.seq.unwrap_or(-1), e.received_us)
}
