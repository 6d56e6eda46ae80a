//! Alerts back to the home's broker, so that Home Assistant, Node-RED and the devices' own
//! automations can act on them: every transition is published, retained, on
//! `hearth/{house}/alerts/{sensor}/{rule}` (the alert as JSON, with `problem` `ON` while it is
//! active or acknowledged, `OFF` once cleared), and the alert is announced by Home Assistant MQTT
//! discovery as a `binary_sensor` (`homeassistant/binary_sensor/hearth_{house}_{sensor}_{rule}/
//! config`, retained), one per (house, sensor, rule), grouped under a device per house.
//!
//! hearth reads neither back: the alert topics are no source's, and its discovery codec skips
//! the configs whose `unique_id` starts with [`OWN_PREFIX`]. No client may publish to a house's
//! alert topics on the embedded broker ([`is_alert_topic`]): the retained state is hearth's word.

use serde_json::json;

use super::{Alert, AlertState, Push, RESYNC};

/// The `unique_id` prefix of the entities hearth announces.
pub const OWN_PREFIX: &str = "hearth_";

/// Whether a topic (or filter) is under a house's alert topics: `hearth/{house}/alerts/…`.
pub fn is_alert_topic(topic: &str) -> bool {
    let mut levels = topic.split('/');
    matches!(
        (levels.next(), levels.next(), levels.next()),
        (Some("hearth"), Some(_), Some("alerts"))
    )
}

/// Where the alerts a broker connection publishes come from: the fan-out's pushes as they
/// happen, and the store, for the latest state of the recent ones at every (re)connection (a
/// transition pushed while the connection was down is not lost for long).
pub struct AlertFeed {
    pub pushes: tokio::sync::mpsc::Receiver<String>,
    pub store: std::sync::Arc<dyn crate::seam::AlertStore>,
}

/// The alerts whose state is published again at a (re)connection: the most recent ones.
pub const REPUBLISHED: i64 = 1000;

impl AlertFeed {
    /// The messages of the recent alerts, oldest first (so the newest state of a topic wins).
    pub async fn recent(&self) -> Vec<(String, Vec<u8>)> {
        match self.store.list(None, None, REPUBLISHED).await {
            Ok(list) => list.iter().rev().flat_map(messages).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the recent alerts to publish them");
                Vec::new()
            }
        }
    }
}

/// The next pushed message of a feed (never, without one; none when it ended). Cancel-safe, for
/// a `select!`: what it takes is returned.
pub async fn next(feed: &mut Option<AlertFeed>) -> Option<String> {
    match feed.as_mut() {
        Some(f) => f.pushes.recv().await,
        None => std::future::pending().await,
    }
}

/// The retained messages a push asks to publish: an alert transition's; the recent alerts'
/// after a gap its feed could not make up for ([`RESYNC`]); nothing for the other pushes.
pub async fn to_publish(feed: Option<&AlertFeed>, pushed: &str) -> Vec<(String, Vec<u8>)> {
    match (alert_of(pushed), feed) {
        (Some(alert), _) => messages(&alert),
        (None, Some(f)) if pushed == RESYNC => f.recent().await,
        (None, _) => Vec::new(),
    }
}

/// The alert of a pushed message, if it is an alert transition.
pub fn alert_of(pushed: &str) -> Option<Alert> {
    match serde_json::from_str::<Push>(pushed).ok()? {
        Push::Alert { alert, .. } => Some(*alert),
        _ => None,
    }
}

/// The retained messages of a transition: its discovery config, then its state.
pub fn messages(a: &Alert) -> Vec<(String, Vec<u8>)> {
    let state_topic = format!("hearth/{}/alerts/{}/{}", a.house_id, a.sensor_id, a.rule);
    let id = format!("{OWN_PREFIX}{}_{}_{}", a.house_id, a.sensor_id, a.rule);
    let class = match a.kind.as_str() {
        "smoke" => "smoke",
        "co" => "carbon_monoxide",
        "gas" => "gas",
        "water_leak" => "moisture",
        "availability" | "online" => "connectivity",
        _ => "problem",
    };
    let config = json!({
        "name": format!("{} {}", a.sensor_id, a.rule),
        "unique_id": id,
        "object_id": id,
        "state_topic": state_topic,
        "value_template": "{{ value_json.problem }}",
        "device_class": class,
        "json_attributes_topic": state_topic,
        "device": {
            "identifiers": [format!("{OWN_PREFIX}{}", a.house_id)],
            "name": format!("hearth {}", a.house_id),
            "manufacturer": "hearth",
        },
    });
    let mut state = serde_json::to_value(a).unwrap_or_default();
    state["problem"] = json!(match a.state {
        AlertState::Cleared => "OFF",
        _ => "ON",
    });
    vec![
        (
            format!("homeassistant/binary_sensor/{id}/config"),
            config.to_string().into_bytes(),
        ),
        (state_topic, state.to_string().into_bytes()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::Severity;

    #[test]
    fn a_transition_is_its_state_and_its_discovery_config() {
        let a = Alert {
            id: 7,
            house_id: "h1".into(),
            sensor_id: "hall-smoke".into(),
            rule: "smoke".into(),
            kind: "smoke".into(),
            severity: Severity::Critical,
            state: AlertState::Active,
            message: "Smoke".into(),
            value: Some(1.0),
            raised_at: 1,
            raised_by: "x".into(),
            acknowledged_at: None,
            acknowledged_by: None,
            cleared_at: None,
            cleared_by: None,
        };
        let m = messages(&a);
        assert_eq!(
            m[0].0,
            "homeassistant/binary_sensor/hearth_h1_hall-smoke_smoke/config"
        );
        assert_eq!(m[1].0, "hearth/h1/alerts/hall-smoke/smoke");
        assert!(is_alert_topic(&m[1].0) && is_alert_topic("hearth/+/alerts/#"));
        assert!(!is_alert_topic("hearth/h1/kitchen"));
        let state: serde_json::Value = serde_json::from_slice(&m[1].1).unwrap();
        assert_eq!(
            (state["problem"].as_str(), state["state"].as_str()),
            (Some("ON"), Some("active"))
        );
        let push = serde_json::to_string(&Push::Alert {
            seq: Some(3),
            house_id: "h1".into(),
            alert: Box::new(a),
        })
        .unwrap();
        assert_eq!(alert_of(&push).map(|a| a.id), Some(7));
    }
}
