//! Alerts: why a house has sensors at all.
//!
//! [`rules`] are read from a documented file; the [`engine`] evaluates them on each sensor's
//! readings in stored order, right after the batch is committed, by the worker that owns the
//! sensor's lane (so the critical lane's alerts never wait behind routine traffic). One alert is
//! open per (house, sensor, rule) at a time: active → acknowledged (API) → cleared (rule). Every
//! transition is written to the `alerts` table, then pushed: to WebSocket clients through Redis
//! pub/sub, and to webhooks through the `P:notify` stream ([`notify`]). A transition that was
//! written but not yet pushed (a crash in between) is pushed again by the lane's next owner, so
//! a redelivery never loses a push, and never raises a second, different alert: each alert
//! carries the key of the event that raised it, and the engine skips readings at or before the
//! last transition of that (house, sensor, rule).

pub mod engine;
pub mod mqtt;
pub mod notify;
pub mod rules;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }

    pub fn parse(s: &str) -> Option<Severity> {
        match s {
            "info" => Some(Severity::Info),
            "warning" => Some(Severity::Warning),
            "critical" => Some(Severity::Critical),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    Active,
    Acknowledged,
    Cleared,
}

impl AlertState {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Active => "active",
            AlertState::Acknowledged => "acknowledged",
            AlertState::Cleared => "cleared",
        }
    }

    pub fn parse(s: &str) -> Option<AlertState> {
        match s {
            "active" => Some(AlertState::Active),
            "acknowledged" => Some(AlertState::Acknowledged),
            "cleared" => Some(AlertState::Cleared),
            _ => None,
        }
    }
}

/// An alert as stored, listed by the API, and pushed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Alert {
    pub id: i64,
    pub house_id: String,
    pub sensor_id: String,
    pub rule: String,
    pub kind: String,
    pub severity: Severity,
    pub state: AlertState,
    pub message: String,
    /// The reading that raised it.
    pub value: Option<f64>,
    /// Epoch milliseconds of the reading that raised it.
    pub raised_at: i64,
    /// The dedup key of the event that raised it (`house/sensor/kind/seq` or the ingest id).
    pub raised_by: String,
    pub acknowledged_at: Option<i64>,
    pub acknowledged_by: Option<String>,
    pub cleared_at: Option<i64>,
    pub cleared_by: Option<String>,
}

/// The dedup key of an event as text: what an alert says raised or cleared it.
pub fn event_key(e: &crate::event::Event) -> String {
    match (e.seq, e.ingest_id) {
        (Some(seq), _) => format!("{}/{}/{}/{seq}", e.house_id, e.sensor_id, e.kind),
        (None, Some(id)) => id.to_string(),
        (None, None) => format!(
            "{}/{}/{}/@{}",
            e.house_id, e.sensor_id, e.kind, e.received_us
        ),
    }
}

/// Whether a webhook takes alerts of this severity.
pub fn has_webhook(rules: &rules::RuleSet, alert: &Alert) -> bool {
    rules
        .webhooks
        .iter()
        .any(|w| w.severities.contains(&alert.severity))
}

/// The push message of an alert transition.
pub fn alert_message(alert: &Alert) -> Option<String> {
    serde_json::to_string(&Push::Alert {
        seq: None,
        house_id: alert.house_id.clone(),
        alert: Box::new(alert.clone()),
    })
    .ok()
}

/// The push messages of stored events: one per house that `watched` accepts, its events in
/// stored order.
pub fn event_messages(
    events: &[&crate::event::Event],
    watched: impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut by_house: std::collections::BTreeMap<&str, Vec<PushedEvent>> = Default::default();
    for e in events.iter().filter(|e| watched(&e.house_id)) {
        by_house
            .entry(&e.house_id)
            .or_default()
            .push(PushedEvent::from(*e));
    }
    by_house
        .into_iter()
        .filter_map(|(house, events)| {
            serde_json::to_string(&Push::Events {
                house_id: house.to_string(),
                events,
            })
            .ok()
        })
        .collect()
}

/// Sent to a reader of the pushes that may have missed alert pushes it cannot be given any
/// more (a WebSocket client resuming from too old a `since`, a reader whose subscription had a
/// gap the log no longer covers): re-read the alerts.
pub const RESYNC: &str = r#"{"type":"resync","reason":"the alert pushes after since are no longer kept: re-read the alerts"}"#;

/// A message to WebSocket clients, through the fan-out.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Push {
    /// An alert was raised, acknowledged or cleared. `seq` orders alert pushes (a client
    /// that reconnects asks for those after the last it saw: `?since=`).
    Alert {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
        house_id: String,
        alert: Box<Alert>,
    },
    /// Events stored for a house that has subscribers.
    Events {
        house_id: String,
        events: Vec<PushedEvent>,
    },
}

/// An event as pushed to WebSocket clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PushedEvent {
    pub sensor_id: String,
    pub kind: String,
    pub value: f64,
    pub unit: Option<String>,
    pub seq: Option<i64>,
    /// Epoch milliseconds.
    pub ts: i64,
}

impl From<&crate::event::Event> for PushedEvent {
    fn from(e: &crate::event::Event) -> Self {
        PushedEvent {
            sensor_id: e.sensor_id.clone(),
            kind: e.kind.clone(),
            value: e.value,
            unit: crate::kinds::unit_or_canonical(&e.kind, e.unit.clone()),
            seq: e.seq,
            ts: e.ts_ms,
        }
    }
}
