//! The latest value of each sensor and kind, in Redis, for apps that want "now" without a query.
//!
//! `P:latest:{house}:{sensor}` is a hash from kind to a JSON object (`value`, `unit`, `ts`,
//! `seq`, `received_us`, `house_id`) behind the reading's fixed-width order key
//! ([`Event::order_key`]; [`cached_json`] strips it); `P:house:{house}:sensors` is the set of a
//! house's sensors. A reading replaces the cached one only if its order key is greater (time,
//! never later than its receipt, then seq, then receive time), checked and written in one Lua
//! script, so a redelivered, stale or future-stamped event never pins or moves the cache
//! backwards, whichever worker writes it and in whatever order.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};

use crate::event::{Event, ORDER_KEY_LEN};
use crate::seam::{Fut, LatestCache};
use crate::servers::conn::Conn;
use crate::servers::keys::{Group, Keys};
use crate::servers::queue::QueueError;
use crate::servers::txn::Txn;

/// For each reading: KEYS[i] the sensor's hash, ARGV in groups of 5: kind, order key, the
/// house's sensor-set key, sensor id, value. A stored value starts with its order key, so the
/// comparison is one string compare, no JSON decoding.
const UPDATE_LATEST: &str = r#"
local updated = 0
for i = 1, #KEYS do
  local b = (i - 1) * 5
  local kind, order = ARGV[b + 1], ARGV[b + 2]
  local cur = redis.call('HGET', KEYS[i], kind)
  if (not cur) or string.sub(cur, 1, #order) < order then
    redis.call('HSET', KEYS[i], kind, ARGV[b + 5])
    updated = updated + 1
  end
  if not cur then
    redis.call('SADD', ARGV[b + 3], ARGV[b + 4])
  end
end
return updated
"#;

/// The JSON of a cached value (after its order key).
pub fn cached_json(raw: &str) -> Option<&str> {
    raw.get(ORDER_KEY_LEN..)
}

#[derive(Clone)]
pub struct Cache {
    conn: Conn,
    keys: Keys,
}

impl Cache {
    pub fn new(conn: Conn, keys: Keys) -> Self {
        Cache { conn, keys }
    }

    /// Add to `txn` the offer of these events as latest values (only the newest of each
    /// (sensor, kind) is sent): one script for all on one server, one per house on a cluster.
    pub fn add_update(&self, txn: &mut Txn, events: &[&Event]) {
        let mut newest: HashMap<(&str, &str, &str), (&Event, String)> = HashMap::new();
        for e in events {
            let key = e.order_key();
            match newest.entry((&e.house_id, &e.sensor_id, &e.kind)) {
                Entry::Vacant(v) => {
                    v.insert((e, key));
                }
                Entry::Occupied(mut o) if o.get().1 < key => {
                    o.insert((e, key));
                }
                Entry::Occupied(_) => {}
            }
        }
        let mut by_group: BTreeMap<Group, Vec<&(&Event, String)>> = BTreeMap::new();
        for value in newest.values() {
            let group = self.keys.group(Group::House(value.0.house_id.clone()));
            by_group.entry(group).or_default().push(value);
        }
        for (group, values) in by_group {
            let pipe = txn.on(group);
            pipe.cmd("EVAL").arg(UPDATE_LATEST).arg(values.len());
            for (e, _) in &values {
                pipe.arg(self.keys.latest(&e.house_id, &e.sensor_id));
            }
            for (e, order) in &values {
                let json = crate::seam::latest_json(e);
                pipe.arg(&e.kind)
                    .arg(order)
                    .arg(self.keys.house_sensors(&e.house_id))
                    .arg(&e.sensor_id)
                    .arg(format!("{order}{json}"));
            }
            pipe.ignore();
        }
    }

    /// The cached latest values of some sensors of a house (kind → JSON each), in one round
    /// trip.
    pub async fn latest(
        &self,
        house_id: &str,
        sensors: &[String],
    ) -> Result<Vec<HashMap<String, String>>, QueueError> {
        if sensors.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for s in sensors {
            pipe.cmd("HGETALL").arg(self.keys.latest(house_id, s));
        }
        let mut conn = self.conn.clone();
        let raw: Vec<HashMap<String, String>> = pipe.query_async(&mut conn).await?;
        Ok(raw
            .into_iter()
            .map(|kinds| {
                kinds
                    .into_iter()
                    .filter_map(|(k, v)| Some((k, cached_json(&v)?.to_string())))
                    .collect()
            })
            .collect())
    }

    /// Move the values cached under the keys of earlier versions (`P:latest:{sensor}`, a sensor
    /// shared by every house) to their houses' keys (`P:latest:{house}:{sensor}`), each value to
    /// the house named in it, through the same compare-and-set. Idempotent: several processes
    /// may run it at once. Returns the old keys moved.
    pub async fn migrate_unscoped(&self) -> Result<u64, QueueError> {
        if self.keys.is_cluster() {
            return Ok(0); // no version before this one ran on a cluster
        }
        let mut conn = self.conn.clone();
        let pattern = format!("{}*", self.keys.latest_prefix());
        let mut cursor: u64 = 0;
        let mut moved = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            for key in keys {
                let Some(sensor) = key.strip_prefix(&self.keys.latest_prefix()) else {
                    continue;
                };
                // Scoped keys have a house level; old ones only the sensor id (ids hold no ':').
                if sensor.contains(':') {
                    continue;
                }
                let raw: HashMap<String, String> = redis::cmd("HGETALL")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await?;
                let events: Vec<Event> = raw
                    .iter()
                    .filter_map(|(kind, v)| unscoped_event(sensor, kind, cached_json(v)?))
                    .collect();
                let refs: Vec<&Event> = events.iter().collect();
                let mut txn = Txn::new(&self.keys);
                self.add_update(&mut txn, &refs);
                txn.on(Group::Global).cmd("DEL").arg(&key).ignore();
                txn.exec(&self.conn).await?;
                moved += 1;
            }
            if next == 0 {
                return Ok(moved);
            }
            cursor = next;
        }
    }
}

/// A value of an old unscoped cache key, as the event it was made from.
fn unscoped_event(sensor: &str, kind: &str, json: &str) -> Option<Event> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let house = v["house_id"].as_str()?;
    if !crate::event::is_valid_id(house) || !crate::event::is_valid_id(kind) {
        return None;
    }
    Some(Event {
        house_id: house.to_string(),
        sensor_id: sensor.to_string(),
        kind: kind.to_string(),
        value: v["value"].as_f64()?,
        unit: v["unit"].as_str().map(str::to_string),
        source_unit: None,
        seq: v["seq"].as_i64(),
        ts_ms: v["ts"].as_i64()?,
        received_us: v["received_us"].as_i64()?,
        ingest_id: None,
    })
}

/// The latest values in Redis (`P:latest:{house}:{sensor}`), compared and set by a Lua script.
pub struct RedisCache {
    pub cache: Cache,
    pub queue: super::queue::Queue,
}

impl LatestCache for RedisCache {
    fn offer<'a>(&'a self, events: &'a [&'a Event]) -> Fut<'a, ()> {
        Box::pin(async move {
            let mut txn = Txn::pipelined(&self.cache.keys);
            self.cache.add_update(&mut txn, events);
            Ok(txn.exec(&self.queue.conn).await.map_err(QueueError::from)?)
        })
    }

    fn latest<'a>(
        &'a self,
        house: &'a str,
        sensors: &'a [String],
    ) -> Fut<'a, Vec<HashMap<String, String>>> {
        Box::pin(async move { Ok(self.cache.latest(house, sensors).await?) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_old_cached_value_becomes_its_house_event() {
        let e = unscoped_event(
            "kitchen",
            "temperature",
            r#"{"value":21.5,"unit":"°C","ts":1764139200123,"seq":4,"received_us":1764139200123456,"house_id":"h2"}"#,
        )
        .unwrap();
        assert_eq!(
            (e.house_id.as_str(), e.sensor_id.as_str()),
            ("h2", "kitchen")
        );
        assert_eq!(
            (e.value, e.seq, e.ts_ms),
            (21.5, Some(4), 1_764_139_200_123)
        );
        assert!(unscoped_event("kitchen", "temperature", r#"{"value":1}"#).is_none());
        assert!(
            unscoped_event(
                "k",
                "t",
                r#"{"value":1,"ts":1,"received_us":1,"house_id":"a b"}"#
            )
            .is_none()
        );
    }
}
