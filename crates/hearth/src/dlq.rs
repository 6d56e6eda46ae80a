//! Dead letters you can work with: list, replay and purge the entries of `P:dead`, selected by
//! reason, sensor and age (`hearth dlq ...` and `/api/v1/dlq`).
//!
//! A replayed letter goes through the normal path again: an ingest letter (`mqtt`, `http`) is
//! decoded again from its topic and raw payload, exactly as the ingest would (so a letter whose
//! cause was fixed, a rule or a limit, now passes, and one that still fails is dead-lettered
//! again with its reason); a worker's letter is appended back to its lane; a failed webhook is
//! queued for the notifier again. Each letter's events and its removal from the dead-letter
//! stream are one transaction, so a replay that dies halfway never replays a letter twice.

use std::time::Duration;

use serde::Serialize;
use utoipa::ToSchema;

use std::sync::Arc;

use crate::codec::{self, Codecs, Limits};
use crate::dead_letter::DeadLetter;
use crate::event::Event;

/// Which dead letters an operation applies to. Every condition must hold.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub reason: Option<String>,
    /// The house named by the letter's topic ([`crate::codec::Codecs::topic_house`]) or payload
    /// (`"house_id"`).
    pub house: Option<String>,
    /// The sensor named by the letter's topic (`.../{sensor}`) or payload (`"sensor_id"`); with
    /// `house`, that house's sensor.
    pub sensor: Option<String>,
    pub older_than: Option<Duration>,
    pub newer_than: Option<Duration>,
    /// At most this many letters (oldest first); `None`: all.
    pub limit: Option<usize>,
    /// The sources a letter's topic is read against for its house (the defaults when none).
    pub codecs: Option<Arc<Codecs>>,
}

/// A dead letter as listed.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Letter {
    /// Its id in the dead-letter stream.
    pub id: String,
    pub reason: String,
    pub detail: String,
    pub topic: String,
    /// `mqtt`, `http`, `worker` or `notifier`.
    pub source: String,
    /// Epoch milliseconds.
    pub at: i64,
    /// The raw payload (UTF-8, invalid bytes replaced).
    pub payload: String,
    #[serde(skip)]
    raw: Vec<u8>,
}

/// What a replay did.
#[derive(Debug, Default, Clone, Serialize, ToSchema)]
pub struct Replayed {
    /// Letters taken out of the dead-letter stream.
    pub letters: u64,
    /// Events appended to the lanes.
    pub events: u64,
    /// Letters that failed again and were dead-lettered anew (with their reason).
    pub rejected_again: u64,
    /// Letters left in place because nothing in them can be replayed.
    pub skipped: u64,
}

impl Letter {
    /// A letter read from any dead-letter store.
    pub fn new(
        id: String,
        reason: String,
        detail: String,
        topic: String,
        source: String,
        at: i64,
        raw: Vec<u8>,
    ) -> Letter {
        Letter {
            id,
            reason,
            detail,
            topic,
            source,
            at,
            payload: String::from_utf8_lossy(&raw).into_owned(),
            raw,
        }
    }

    /// The alert of a failed webhook notification (`source` `notifier`), to queue again: for
    /// the webhook that failed only (its name, the letter's topic, under
    /// [`crate::alerts::notify::ONLY`]), not those that had it already.
    pub fn notification(&self) -> Option<serde_json::Value> {
        let mut alert = serde_json::from_slice::<serde_json::Value>(&self.raw)
            .ok()
            .map(|v| v["alert"].clone())
            .filter(|a| a.is_object())?;
        if !self.topic.is_empty() {
            alert[crate::alerts::notify::ONLY] = self.topic.clone().into();
        }
        Some(alert)
    }

    /// Whether the letter is about `house` and `sensor` (either may be left open): by its topic,
    /// else by the readings in its payload.
    pub fn about(&self, codecs: &Codecs, house: Option<&str>, sensor: Option<&str>) -> bool {
        let topic_house = codecs.topic_house(&self.topic);
        let topic_sensor = self
            .topic
            .contains('/')
            .then(|| self.topic.rsplit('/').next())
            .flatten();
        if topic_house.is_some()
            && house.is_none_or(|h| topic_house == Some(h))
            && sensor.is_none_or(|s| topic_sensor == Some(s))
        {
            return true;
        }
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(&self.raw) else {
            return false;
        };
        let items = match &value {
            serde_json::Value::Array(items) => items.iter().collect(),
            other => vec![other],
        };
        let field = |i: &serde_json::Value, long: &str, short: &str| {
            i[long]
                .as_str()
                .or_else(|| i[short].as_str())
                .map(str::to_string)
        };
        items.iter().any(|i| {
            let (h, s) = (field(i, "house_id", "h"), field(i, "sensor_id", "s"));
            let h = h.as_deref().or(topic_house);
            house.is_none_or(|want| h == Some(want))
                && sensor.is_none_or(|want| s.as_deref() == Some(want))
        })
    }

    pub fn matches(&self, filter: &Filter, now_ms: i64) -> bool {
        let defaults;
        let codecs = match &filter.codecs {
            Some(c) => c.as_ref(),
            None => {
                defaults = Codecs::defaults(Limits::default());
                &defaults
            }
        };
        let age = Duration::from_millis((now_ms - self.at).max(0) as u64);
        filter.reason.as_deref().is_none_or(|r| self.reason == r)
            && filter.older_than.is_none_or(|d| age >= d)
            && filter.newer_than.is_none_or(|d| age < d)
            && ((filter.house.is_none() && filter.sensor.is_none())
                || self.about(codecs, filter.house.as_deref(), filter.sensor.as_deref()))
    }
}

/// A letter's events (or its new rejections), decoded the way its source would.
pub fn decode_again(
    letter: &Letter,
    source: &str,
    received_us: i64,
    codecs: &Codecs,
) -> (Vec<Event>, Vec<DeadLetter>) {
    let at_ms = received_us / 1000;
    let mut events = Vec::new();
    let mut dead = Vec::new();
    match source {
        "worker" => {
            // A stored event's JSON (refused by the store) or a whole lane entry (unreadable).
            let value: Option<serde_json::Value> = serde_json::from_slice(&letter.raw).ok();
            let items = match value {
                Some(serde_json::Value::Array(items)) => items,
                Some(item) => vec![item],
                None => Vec::new(),
            };
            for item in items {
                if let Ok(e) = serde_json::from_value::<Event>(item) {
                    events.push(e);
                }
            }
        }
        "http" => {
            let decoded = codec::http::decode(&letter.raw, received_us, &codecs.limits);
            dead.extend(decoded.dead_letter("http", "http", &letter.raw, at_ms));
            events = decoded.events;
        }
        _ => {
            let decoded = codecs.decode(&letter.topic, &letter.raw, received_us);
            dead.extend(decoded.dead_letter("mqtt", &letter.topic, &letter.raw, at_ms));
            events = decoded.events;
        }
    }
    (events, dead)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(topic: &str, payload: &str, reason: &str, at: i64) -> Letter {
        Letter {
            id: "1-0".into(),
            reason: reason.into(),
            detail: String::new(),
            topic: topic.into(),
            source: "mqtt".into(),
            at,
            payload: payload.into(),
            raw: payload.as_bytes().to_vec(),
        }
    }

    #[test]
    fn filters_by_reason_sensor_and_age() {
        let now = 10_000_000;
        let l = letter("hearth/h1/s1", "{}", "malformed_json", now - 60_000);
        let f =
            |reason: Option<&str>, sensor: Option<&str>, older: Option<u64>, newer: Option<u64>| {
                Filter {
                    reason: reason.map(Into::into),
                    house: None,
                    sensor: sensor.map(Into::into),
                    older_than: older.map(Duration::from_secs),
                    newer_than: newer.map(Duration::from_secs),
                    limit: None,
                    codecs: None,
                }
            };
        assert!(l.matches(&f(None, None, None, None), now));
        assert!(l.matches(
            &f(Some("malformed_json"), Some("s1"), Some(30), Some(90)),
            now
        ));
        assert!(!l.matches(&f(Some("out_of_range"), None, None, None), now));
        assert!(!l.matches(&f(None, Some("s2"), None, None), now));
        assert!(!l.matches(&f(None, None, Some(90), None), now));
        assert!(!l.matches(&f(None, None, None, Some(30)), now));
        let http = letter("http", r#"{"sensor_id":"s9","kind":"x"}"#, "bad", now);
        assert!(http.matches(&f(None, Some("s9"), None, None), now));
        // By house: the topic's, or the readings'.
        let house = |h: &str, s: Option<&str>| Filter {
            house: Some(h.into()),
            sensor: s.map(Into::into),
            ..Filter::default()
        };
        assert!(l.matches(&house("h1", Some("s1")), now));
        assert!(
            !l.matches(&house("h2", Some("s1")), now),
            "h2's s1 is another sensor"
        );
        let http = letter(
            "http",
            r#"[{"house_id":"h2","sensor_id":"s9","kind":"x"}]"#,
            "bad",
            now,
        );
        assert!(http.matches(&house("h2", Some("s9")), now));
        assert!(!http.matches(&house("h1", None), now));
    }

    #[test]
    fn an_ingest_letter_is_decoded_again() {
        let l = letter(
            "hearth/h1/s1",
            r#"{"kind":"temperature","value":21.5,"seq":3}"#,
            "x",
            0,
        );
        let (events, dead) =
            decode_again(&l, "mqtt", 1_000_000, &Codecs::defaults(Limits::default()));
        assert_eq!((events.len(), dead.len()), (1, 0));
        let bad = letter("hearth/h1/s1", "{nope", "malformed_json", 0);
        let (events, dead) = decode_again(
            &bad,
            "mqtt",
            1_000_000,
            &Codecs::defaults(Limits::default()),
        );
        assert_eq!((events.len(), dead[0].reason), (0, "malformed_json"));
    }
}
