//! Dead letters: what hearth refused, why, and enough to replay it. One message or request
//! costs at most one letter, whatever it holds; letters are kept by a retention policy (age and
//! count), and what goes is counted, never silent.

use std::time::Duration;

use crate::event::{Event, Rejection};

/// A dead letter: what was refused, why, and enough to replay it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub reason: &'static str,
    pub detail: String,
    pub topic: String,
    pub payload: Vec<u8>,
    /// `mqtt` or `http` for the ingest, `worker` for a stream entry a worker gave up on,
    /// `notifier` for a webhook that kept failing.
    pub source: &'static str,
    pub at_ms: i64,
}

/// Largest raw payload kept in a dead letter; an oversize payload is cut there (its full size is
/// in the detail).
const DEAD_PAYLOAD_MAX: usize = 4096;
/// Largest detail of a dead letter: the first refused readings are listed, then how many more.
const DEAD_DETAIL_MAX: usize = 1024;

impl DeadLetter {
    /// A refused message or reading; `source` is `mqtt` or `http` (whose topic is `http`).
    pub fn from_rejection(
        rejection: &Rejection,
        source: &'static str,
        topic: &str,
        payload: &[u8],
        at_ms: i64,
    ) -> Self {
        DeadLetter::from_rejections(
            std::slice::from_ref(rejection),
            source,
            topic,
            payload,
            at_ms,
        )
        .unwrap_or_else(|| DeadLetter {
            reason: rejection.reason.as_str(),
            detail: String::new(),
            topic: String::new(),
            payload: Vec::new(),
            source,
            at_ms,
        })
    }

    /// The one dead letter of a message some of whose readings were refused (none when none
    /// was): its reason is the first refusal's, its detail lists the refusals (the first ones,
    /// then how many more), its payload is the message's (cut at 4 KiB). One message, one
    /// letter, whatever it holds: a message of thousands of bad readings cannot make thousands
    /// of letters, each a copy of it.
    pub fn from_rejections(
        rejections: &[Rejection],
        source: &'static str,
        topic: &str,
        payload: &[u8],
        at_ms: i64,
    ) -> Option<Self> {
        let first = rejections.first()?;
        let mut detail = String::new();
        for (i, r) in rejections.iter().enumerate() {
            let item = if rejections.len() == 1 {
                r.detail.clone()
            } else {
                format!("{}: {}", r.reason.as_str(), r.detail)
            };
            if detail.len() + item.len() + 2 > DEAD_DETAIL_MAX {
                detail.push_str(&format!("; and {} more", rejections.len() - i));
                break;
            }
            if i > 0 {
                detail.push_str("; ");
            }
            detail.push_str(&item);
        }
        Some(DeadLetter {
            reason: first.reason.as_str(),
            detail: crate::event::truncate(&detail, DEAD_DETAIL_MAX + 32).to_string(),
            topic: crate::event::truncate(topic, 256).to_string(),
            payload: payload[..payload.len().min(DEAD_PAYLOAD_MAX)].to_vec(),
            source,
            at_ms,
        })
    }

    /// The one letter of stream events a worker did not store (past a cap), holding them: a
    /// replay appends them to their lane again (once the cap is raised). `context` says where
    /// they were (lane, entry).
    pub fn of_events(events: &[&Event], why: &[Rejection], context: &str) -> Option<Self> {
        let first = events.first()?;
        let mut letter = DeadLetter::from_rejections(
            why,
            "worker",
            &format!("hearth/{}/{}", first.house_id, first.sensor_id),
            &serde_json::to_vec(events).unwrap_or_default(),
            crate::event::now_us() / 1000,
        )?;
        letter.detail = format!("{} ({context})", letter.detail);
        Some(letter)
    }
}

/// How long and how many dead letters are kept (0: no limit). Past them the oldest are removed
/// and counted (`dead_expired` in `P:stats`, `hearth_dead_letters_expired_total`), never
/// silently: by count at every append that writes letters (so a flood of bad input is bounded
/// as it comes), by age and count by a periodic sweep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retention {
    pub max_age_ms: u64,
    pub max_count: u64,
}

impl Retention {
    pub fn from_config(config: &crate::config::Config) -> Retention {
        Retention {
            max_age_ms: config.dead_letter_max_age_secs.saturating_mul(1000),
            max_count: config.dead_letter_max_count,
        }
    }
}

impl Default for Retention {
    fn default() -> Self {
        Retention::from_config(&crate::config::Config::default())
    }
}

/// How often dead letters are swept for age.
pub const RETENTION_SWEEP: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Rejection;

    #[test]
    fn a_message_of_many_bad_readings_is_one_bounded_letter() {
        let many: Vec<Rejection> = (0..32_767)
            .map(|i| {
                Rejection::new(
                    crate::event::Reason::WrongType,
                    format!("reading {i}: a reading must be an object, got a number"),
                )
            })
            .collect();
        let payload = vec![b'1'; 64 * 1024];
        let letter = DeadLetter::from_rejections(&many, "mqtt", "hearth/h/s", &payload, 0).unwrap();
        assert_eq!(letter.reason, "wrong_type");
        assert!(
            letter.detail.len() <= DEAD_DETAIL_MAX + 32,
            "{}",
            letter.detail.len()
        );
        assert!(letter.detail.ends_with("more"), "{}", letter.detail);
        assert_eq!(letter.payload.len(), DEAD_PAYLOAD_MAX);
        assert!(DeadLetter::from_rejections(&[], "mqtt", "t", b"", 0).is_none());
    }
}
