//! The event: one reading of one sensor, as it travels from the ingest through a Redis stream to
//! a row in PostgreSQL, and the rules every event obeys (id syntax, value range per kind, which
//! kinds are critical).
//!
//! An `Event` is only ever built by a codec after validation, so the worker can trust it: what a
//! worker finds wrong in an event is the content of a stream entry that someone else wrote.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

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
    #[serde(rename = "u", default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
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

/// What values a kind accepts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueRule {
    /// true/false, or the numbers 0 and 1.
    Boolean,
    /// A finite number within the inclusive bounds.
    Range(f64, f64),
    /// Any finite number (unknown kinds).
    Finite,
}

/// The accepted values of each known kind. Ranges are physical plausibility, wide enough for any
/// real device: a value outside is a broken sensor or a broken payload, not weather.
pub fn value_rule(kind: &str, unit: Option<&str>) -> ValueRule {
    use ValueRule::*;
    match kind {
        "motion" | "door" | "window" | "smoke" | "co" | "gas" | "water_leak" | "alarm"
        | "intrusion" | "panic" | "occupancy" | "tamper" => Boolean,
        "temperature" => match unit {
            Some("°F") | Some("F") | Some("degF") => Range(-130.0, 302.0),
            Some("K") => Range(183.0, 423.0),
            _ => Range(-90.0, 150.0),
        },
        "humidity" | "battery" => Range(0.0, 100.0),
        "co2" => Range(0.0, 100_000.0),
        // hPa and Pa are both common.
        "pressure" => Range(0.0, 200_000.0),
        "light" | "illuminance" => Range(0.0, 200_000.0),
        "power" => Range(-1.0e6, 1.0e6),
        "energy" => Range(0.0, 1.0e12),
        "voltage" => Range(0.0, 100_000.0),
        "current" => Range(-10_000.0, 10_000.0),
        _ => Finite,
    }
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
    /// A stream entry a worker could not read back (written by something other than the ingest).
    BadEntry,
    /// The store refused the row for its content after `max_deliveries` attempts.
    StoreRejected,
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
            Reason::BadEntry => "bad_entry",
            Reason::StoreRejected => "store_rejected",
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

    #[test]
    fn stream_encoding_round_trips() {
        let e = Event {
            house_id: "h1".into(),
            sensor_id: "s1".into(),
            kind: "temperature".into(),
            value: 22.5,
            unit: Some("°C".into()),
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
