//! The event: one reading of one sensor, as it travels from the ingest through a Redis stream to
//! a row in PostgreSQL, and the rules every event obeys (id syntax, value range per kind, which
//! kinds are critical).
//!
//! An `Event` is only ever built by a codec after validation, so the worker can trust it: what a
//! worker finds wrong in an event is the content of a stream entry that someone else wrote.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use crate::kinds::{ValueRule, value_rule};

/// One validated reading. Serialised with short field names into a stream entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    #[serde(rename = "h")]
    pub house_id: String,
    #[serde(rename = "s")]
    pub sensor_id: String,
    #[serde(rename = "k")]
    pub kind: String,
    /// Booleans are stored as 1.0 and 0.0.
    #[serde(rename = "v")]
    pub value: f64,
    /// The kind's canonical unit (°C, hPa, kWh, ...: [`crate::kinds`]) when the device sent a
    /// unit, the unit as sent for a kind hearth does not know; none when the device sent none
    /// (the value is then in the canonical unit, which readers show).
    #[serde(rename = "u", default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// The unit the device sent, when the value was converted from it.
    #[serde(rename = "o", default, skip_serializing_if = "Option::is_none")]
    pub source_unit: Option<String>,
    /// The device's own counter, when it sends one: then (sensor, kind, seq) is the dedup key.
    #[serde(rename = "q", default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<i64>,
    /// Reading time, epoch milliseconds (the receive time when the device sent none).
    #[serde(rename = "t")]
    pub ts_ms: i64,
    /// When the ingest received the MQTT message, epoch microseconds.
    #[serde(rename = "r")]
    pub received_us: i64,
    /// Assigned at ingest when the device sent no `seq`; the dedup key then.
    #[serde(rename = "i", default, skip_serializing_if = "Option::is_none")]
    pub ingest_id: Option<Uuid>,
}

impl Event {
    /// Critical events travel their own lane and are never queued behind telemetry.
    pub fn is_critical(&self) -> bool {
        is_critical_kind(&self.kind)
    }

    /// The time hearth orders this reading by: its stamp, but never later than when it was
    /// received. A device may stamp a reading up to `max_future_skew_secs` ahead (clocks drift),
    /// and the stamp is stored as sent; ordered by it, one reading stamped a day ahead would
    /// outrank every reading of the next day: pin the latest value and make the rules skip them
    /// all (they skip readings at or before their last transition). Ordered by this instead, a
    /// reading counts as "now" at the latest, so whatever arrives after it comes after it. Past
    /// stamps keep their meaning: a reading delivered late (a device's buffer) still sorts where
    /// its stamp says, behind newer ones.
    pub fn at_ms(&self) -> i64 {
        self.ts_ms.min(self.received_us.div_euclid(1000))
    }

    /// The reading's place among the readings of its (house, sensor, kind): [`Event::at_ms`],
    /// then `seq` (a reading with one after one without), then the receive time. The
    /// latest-value caches keep a value only if it is greater; the rules skip a reading that is
    /// not after their last transition.
    pub fn order(&self) -> Order {
        (
            self.at_ms().max(0),
            self.seq.map_or((0, 0), |s| (1, s.max(0))),
            self.received_us.max(0),
        )
    }

    /// [`Event::order`] as text of fixed width, so that string order is that order (15 digits,
    /// `0` and 20 zeros or `1` and the seq in 20 digits, 17 digits): kept beside cached values
    /// in Redis (compared by a Lua script) and in the rules' stored state.
    pub fn order_key(&self) -> String {
        // Written digit by digit: `format!` with padding cost more than the rest of a reading's
        // evaluation (every event of a batch gets a key, for the cache and the alert rules).
        let mut out = String::with_capacity(ORDER_KEY_LEN);
        push_padded(&mut out, self.at_ms().max(0) as u64, 15);
        match self.seq {
            Some(s) => {
                out.push('1');
                push_padded(&mut out, s.max(0) as u64, 20);
            }
            None => {
                out.push('0');
                push_padded(&mut out, 0, 20);
            }
        }
        push_padded(&mut out, self.received_us.max(0) as u64, 17);
        out
    }
}

/// Something kept per sensor, a sensor being (house, sensor): nested by house, hashed with a
/// fast seeded hasher, looked up by the event's ids without allocating (they run for every
/// event of every batch); bounded by its caller, which counts it with [`PerSensor::len`].
#[derive(Debug, Clone)]
pub struct PerSensor<T> {
    houses: hashbrown::HashMap<String, hashbrown::HashMap<String, T>>,
    len: usize,
}

impl<T> Default for PerSensor<T> {
    fn default() -> Self {
        PerSensor {
            houses: Default::default(),
            len: 0,
        }
    }
}

impl<T> PerSensor<T> {
    pub fn get(&self, house: &str, sensor: &str) -> Option<&T> {
        self.houses.get(house)?.get(sensor)
    }

    pub fn get_mut(&mut self, house: &str, sensor: &str) -> Option<&mut T> {
        self.houses.get_mut(house)?.get_mut(sensor)
    }

    /// The sensor's value, made by `make` if it has none (the ids are copied only then).
    pub fn get_or_insert_with(
        &mut self,
        house: &str,
        sensor: &str,
        make: impl FnOnce() -> T,
    ) -> &mut T {
        let sensors = self.houses.entry_ref(house).or_default();
        match sensors.entry_ref(sensor) {
            hashbrown::hash_map::EntryRef::Occupied(o) => o.into_mut(),
            hashbrown::hash_map::EntryRef::Vacant(v) => {
                self.len += 1;
                v.insert(make())
            }
        }
    }

    pub fn remove(&mut self, house: &str, sensor: &str) -> Option<T> {
        let removed = self.houses.get_mut(house)?.remove(sensor);
        self.len -= usize::from(removed.is_some());
        removed
    }

    /// Sensors held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.houses.clear();
        self.len = 0;
    }
}

/// See [`Event::order`].
pub type Order = (i64, (u8, i64), i64);

/// Width of [`Event::order_key`].
pub const ORDER_KEY_LEN: usize = 15 + 21 + 17;

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

/// Kinds that mean danger to people or the house. Routed by kind, not by value, so that a
/// sensor's "smoke: false" that clears an alarm follows the "smoke: true" it clears.
pub const CRITICAL_KINDS: &[&str] = &["smoke", "co", "gas", "water_leak", "intrusion", "panic"];

pub fn is_critical_kind(kind: &str) -> bool {
    CRITICAL_KINDS.contains(&kind)
}

/// House, sensor and kind ids: `[A-Za-z0-9_.-]{1,64}`. They become Redis key parts and SQL
/// values, so nothing else gets past the codecs.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && id != "."
        && id != ".."
}

/// Why a message or one of its readings was refused. The string form is the `reason` of the
/// dead letter and of `hearth_events_rejected_total{reason}`: a short, fixed vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    MalformedJson,
    WrongType,
    MissingField,
    NotFinite,
    OutOfRange,
    PayloadTooLarge,
    BadId,
    BadSeq,
    BadTimestamp,
    HouseMismatch,
    UnknownTopic,
    /// A message or request with more readings than `max_readings_per_message`.
    TooManyReadings,
    /// A reading of a new house past `max_houses`.
    TooManyHouses,
    /// A reading of a new sensor of a house past `max_sensors_per_house`.
    TooManySensors,
    /// A reading of a new kind of a sensor past `max_kinds_per_sensor`.
    TooManyKinds,
    /// A message published where its sender may not publish (another house's topics).
    Forbidden,
    /// A stream entry a worker could not read back (written by something other than the ingest).
    BadEntry,
    /// The store refused the row for its content after `max_deliveries` attempts.
    StoreRejected,
    /// A unit hearth cannot convert into the kind's canonical one.
    BadUnit,
    /// A discovery config whose value template is outside the subset hearth evaluates.
    UnsupportedTemplate,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::MalformedJson => "malformed_json",
            Reason::WrongType => "wrong_type",
            Reason::MissingField => "missing_field",
            Reason::NotFinite => "not_finite",
            Reason::OutOfRange => "out_of_range",
            Reason::PayloadTooLarge => "payload_too_large",
            Reason::BadId => "bad_id",
            Reason::BadSeq => "bad_seq",
            Reason::BadTimestamp => "bad_timestamp",
            Reason::HouseMismatch => "house_mismatch",
            Reason::UnknownTopic => "unknown_topic",
            Reason::TooManyReadings => "too_many_readings",
            Reason::TooManyHouses => "too_many_houses",
            Reason::TooManySensors => "too_many_sensors",
            Reason::TooManyKinds => "too_many_kinds",
            Reason::Forbidden => "forbidden",
            Reason::BadEntry => "bad_entry",
            Reason::StoreRejected => "store_rejected",
            Reason::BadUnit => "bad_unit",
            Reason::UnsupportedTemplate => "unsupported_template",
        }
    }
}

/// A refusal with its reason and a human detail (which field, which value).
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub reason: Reason,
    pub detail: String,
}

impl Rejection {
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Rejection {
            reason,
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason.as_str(), self.detail)
    }
}

/// Now, in epoch microseconds.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// At most `max` bytes of `s`, cut on a character boundary: for details that quote input.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(is_valid_id("kitchen-1.temp_2"));
        assert!(is_valid_id(&"a".repeat(64)));
        assert!(!is_valid_id(&"a".repeat(65)));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id(".."));
        assert!(!is_valid_id("a/b"));
        assert!(!is_valid_id("a b"));
        assert!(!is_valid_id("é"));
        assert!(!is_valid_id("a\0b"));
    }

    fn ev(ts: i64, seq: Option<i64>, rcv: i64) -> Event {
        Event {
            house_id: "h".into(),
            sensor_id: "s".into(),
            kind: "power".into(),
            value: 1.0,
            unit: None,
            source_unit: None,
            seq,
            ts_ms: ts,
            received_us: rcv,
            ingest_id: None,
        }
    }

    #[test]
    fn order_keys_sort_like_time_then_seq_then_receive_time() {
        let r = 2_000_000_000_000_000; // received long after the stamps below
        let keys = [
            ev(1_000, None, r + 5).order_key(),
            ev(1_000, Some(0), r + 1).order_key(),
            ev(1_000, Some(9), r + 1).order_key(),
            ev(1_000, Some(10), r).order_key(),
            ev(1_000, Some(10), r + 7).order_key(),
            ev(1_764_139_200_123, Some(1), r).order_key(),
        ];
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:#?}");
        assert!(keys.iter().all(|k| k.len() == ORDER_KEY_LEN));
        // The same text as the padded formatting it replaces.
        let e = ev(1_764_139_200_123, Some(42), 1_764_139_200_123_456);
        assert_eq!(
            e.order_key(),
            format!("{:015}1{:020}{:017}", e.ts_ms, 42, e.received_us)
        );
    }

    #[test]
    fn a_reading_stamped_in_the_future_counts_as_received() {
        let now_us = 1_764_139_200_000_000;
        let ahead = ev(now_us / 1000 + 23 * 3_600_000, Some(1), now_us);
        assert_eq!(ahead.at_ms(), now_us / 1000);
        // A reading received a second later, stamped honestly, comes after it.
        let next = ev(now_us / 1000 + 1000, None, now_us + 1_000_000);
        assert!(next.order_key() > ahead.order_key());
        // A late delivery of an old reading still sorts by its stamp, behind both.
        let old = ev(now_us / 1000 - 60_000, Some(9), now_us + 2_000_000);
        assert!(old.order_key() < ahead.order_key());
        // The numbers and the text agree.
        for (a, b) in [(&ahead, &next), (&old, &ahead), (&old, &next)] {
            assert_eq!(a.order() < b.order(), a.order_key() < b.order_key());
        }
    }

    #[test]
    fn stream_encoding_round_trips() {
        let e = Event {
            house_id: "h1".into(),
            sensor_id: "s1".into(),
            kind: "temperature".into(),
            value: 22.5,
            unit: Some("°C".into()),
            source_unit: None,
            seq: Some(42),
            ts_ms: 1_764_139_200_123,
            received_us: 1_764_139_200_123_456,
            ingest_id: None,
        };
        let json = serde_json::to_string(&e).unwrap();
        assert!(!json.contains("\"i\""));
        assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), e);
    }
}
