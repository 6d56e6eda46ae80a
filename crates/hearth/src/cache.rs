//! The latest value of each sensor and kind, in Redis, for apps that want "now" without a query.
//!
//! `P:latest:{sensor}` is a hash from kind to a JSON object (`value`, `unit`, `ts`, `seq`,
//! `received_us`, `house_id`) behind a fixed-width order key ([`cached_json`] strips it);
//! `P:house:{house}:sensors` is the set of a house's sensors.
//! A reading replaces the cached one only if it is newer by (ts, seq, received time), checked and
//! written in one Lua script, so a redelivered or stale event never moves the cache backwards,
//! whichever worker writes it and in whatever order.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use redis::aio::ConnectionManager;

use crate::event::Event;
use crate::queue::{Keys, QueueError};

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

/// Width of the order key that prefixes every cached value.
const ORDER_KEY_LEN: usize = 15 + 21 + 17;

/// (ts, seq, received), fixed width so that string order is numeric order: ts in 15 digits,
/// then `0` and 20 zeros without seq or `1` and the seq in 20 digits, then the receive time in
/// 17 digits.
pub(crate) fn order_key(e: &Event) -> String {
    // Written digit by digit: `format!` with padding cost more than the rest of a reading's
    // evaluation (every event of a batch gets a key, for the cache and the alert rules).
    let mut out = String::with_capacity(ORDER_KEY_LEN);
    push_padded(&mut out, e.ts_ms.max(0) as u64, 15);
    match e.seq {
        Some(s) => {
            out.push('1');
            push_padded(&mut out, s.max(0) as u64, 20);
        }
        None => {
            out.push('0');
            push_padded(&mut out, 0, 20);
        }
    }
    push_padded(&mut out, e.received_us.max(0) as u64, 17);
    out
}

/// `n` in decimal, left-padded with zeros to `width` (at most 20, a u64's digits; longer
/// numbers are written whole).
fn push_padded(out: &mut String, mut n: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut start = digits.len();
    while n > 0 {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    let from = start.min(digits.len() - width.min(digits.len()));
    out.extend(digits[from..].iter().map(|d| char::from(*d)));
}

/// The JSON of a cached value (after its order key).
pub fn cached_json(raw: &str) -> Option<&str> {
    raw.get(ORDER_KEY_LEN..)
}

#[derive(Clone)]
pub struct Cache {
    conn: ConnectionManager,
    keys: Keys,
}

impl Cache {
    pub fn new(conn: ConnectionManager, keys: Keys) -> Self {
        Cache { conn, keys }
    }

    /// Add to `pipe` the offer of these events as latest values (only the newest of each
    /// (sensor, kind) is sent).
    pub fn add_update(&self, pipe: &mut redis::Pipeline, events: &[&Event]) {
        let mut newest: HashMap<(&str, &str), (&Event, String)> = HashMap::new();
        for e in events {
            let key = order_key(e);
            match newest.entry((&e.sensor_id, &e.kind)) {
                Entry::Vacant(v) => {
                    v.insert((e, key));
                }
                Entry::Occupied(mut o) if o.get().1 < key => {
                    o.insert((e, key));
                }
                Entry::Occupied(_) => {}
            }
        }
        if newest.is_empty() {
            return;
        }
        pipe.cmd("EVAL").arg(UPDATE_LATEST).arg(newest.len());
        for (e, _) in newest.values() {
            pipe.arg(self.keys.latest(&e.sensor_id));
        }
        for (e, order) in newest.values() {
            let json = crate::seam::latest_json(e);
            pipe.arg(&e.kind)
                .arg(order)
                .arg(self.keys.house_sensors(&e.house_id))
                .arg(&e.sensor_id)
                .arg(format!("{order}{json}"));
        }
        pipe.ignore();
    }

    /// The cached latest values of a sensor, kind → JSON.
    pub async fn latest(&self, sensor_id: &str) -> Result<HashMap<String, String>, QueueError> {
        let mut conn = self.conn.clone();
        let raw: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.keys.latest(sensor_id))
            .query_async(&mut conn)
            .await?;
        Ok(raw
            .into_iter()
            .filter_map(|(k, v)| Some((k, cached_json(&v)?.to_string())))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(ts: i64, seq: Option<i64>, rcv: i64) -> Event {
        Event {
            house_id: "h".into(),
            sensor_id: "s".into(),
            kind: "power".into(),
            value: 1.0,
            unit: None,
            seq,
            ts_ms: ts,
            received_us: rcv,
            ingest_id: None,
        }
    }

    #[test]
    fn order_keys_sort_like_ts_then_seq_then_receive_time() {
        let keys = [
            order_key(&ev(1_000, None, 5)),
            order_key(&ev(1_000, Some(0), 1)),
            order_key(&ev(1_000, Some(9), 1)),
            order_key(&ev(1_000, Some(10), 0)),
            order_key(&ev(1_000, Some(10), 7)),
            order_key(&ev(1_764_139_200_123, Some(1), 0)),
        ];
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:#?}");
        assert!(keys.iter().all(|k| k.len() == ORDER_KEY_LEN));
        // The same text as the padded formatting it replaces.
        for e in [
            ev(1_764_139_200_123, Some(42), 1_764_139_200_123_456),
            ev(0, None, 0),
        ] {
            let seq = match e.seq {
                Some(s) => format!("1{s:020}"),
                None => format!("0{:020}", 0),
            };
            let old = format!("{:015}{seq}{:017}", e.ts_ms, e.received_us);
            assert_eq!(order_key(&e), old);
        }
    }
}
