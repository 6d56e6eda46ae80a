//! Webhook delivery, for both backends' notifiers (`servers/notifier.rs`, `embedded/notifier.rs`):
//! an alert transition POSTed to every webhook configured for its severity, in the webhook's
//! format ([`Format`]: generic JSON, ntfy, Slack/Discord, Alertmanager), over HTTP or HTTPS
//! (reqwest on rustls: redirects followed, at most 5; 10 s per attempt), retried with backoff,
//! behind a circuit breaker per webhook; one that still fails becomes a dead letter
//! (`webhook_failed`) for the caller to keep.
//!
//! A webhook is named by its name everywhere (logs, metrics, dead letters, breaker keys), never
//! by its URL, which often holds a secret (ntfy topics, Slack and Discord tokens); errors are
//! reported without it.

use std::time::Duration;

use tracing::{info, warn};

use super::rules::{Format, RuleSet, Webhook};
use super::{Alert, AlertState, Severity};
use crate::backoff::Backoff;
use crate::breaker::Breaker;
use crate::dead_letter::DeadLetter;
use crate::metrics::METRICS;
use crate::tls::{self, ClientFiles, Verify};

/// The key a notification's JSON (an alert's) may carry to go to that one webhook only: a
/// replayed dead letter goes back to the webhook that failed, not to every one of its severity.
pub const ONLY: &str = "only_webhook";

/// Attempts per webhook before a notification is dead-lettered.
const ATTEMPTS: u32 = 4;

/// Longest one attempt may take, connection and answer included.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an open alert stays firing in Alertmanager after its last transition, unless hearth
/// sends its clearing first (Alertmanager resolves an alert nobody re-sends).
const ALERTMANAGER_HOLD_MS: i64 = 24 * 3600 * 1000;

/// The webhooks of a rule set, each with its HTTP client and its breaker.
pub struct Notifier {
    targets: Vec<Target>,
}

struct Target {
    hook: Webhook,
    client: reqwest::Client,
    /// A receiver that keeps failing is not retried for every alert (each would wait out all
    /// its attempts); its notifications are dead-lettered at once (replayable with
    /// `hearth dlq replay --reason webhook_failed`) until a probe succeeds.
    breaker: Breaker,
}

impl Notifier {
    /// A client per webhook (its own CA, when it names one). Fails on an unreadable CA.
    pub fn new(rules: &RuleSet) -> Result<Notifier, String> {
        let targets = rules
            .webhooks
            .iter()
            .map(|hook| {
                let files = ClientFiles {
                    ca: hook.ca.clone(),
                    ..ClientFiles::default()
                };
                let tls = tls::client_config(&files, Verify::Full)
                    .map_err(|e| format!("webhook {:?}: {e}", hook.name))?;
                let client = reqwest::Client::builder()
                    .tls_backend_preconfigured((*tls).clone())
                    .user_agent(concat!("hearth/", env!("CARGO_PKG_VERSION")))
                    .connect_timeout(Duration::from_secs(5))
                    .timeout(ATTEMPT_TIMEOUT)
                    .redirect(reqwest::redirect::Policy::limited(5))
                    .build()
                    .map_err(|e| format!("webhook {:?}: {e}", hook.name))?;
                let breaker =
                    Breaker::named(format!("webhook:{}", hook.name), 3, Duration::from_secs(30));
                Ok(Target {
                    hook: hook.clone(),
                    client,
                    breaker,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Notifier { targets })
    }

    /// POST one transition (an alert's JSON) to every webhook of its severity; returns the dead
    /// letters of the deliveries that kept failing, for the caller to keep. A letter's payload
    /// is the generic body, whatever the webhook's format, so that a replay can read the alert.
    pub async fn deliver(&self, body: &[u8]) -> Vec<DeadLetter> {
        let Ok(alert) = serde_json::from_slice::<Alert>(body) else {
            warn!("unreadable notification dropped into the dead letters");
            return vec![letter("", body, "unreadable notification".into())];
        };
        let only = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v[ONLY].as_str().map(str::to_string));
        let generic = serde_json::json!({"type": "alert", "alert": alert}).to_string();
        let mut failed = Vec::new();
        for target in self.targets.iter().filter(|t| {
            t.hook.severities.contains(&alert.severity)
                && only.as_deref().is_none_or(|name| name == t.hook.name)
        }) {
            let name = &target.hook.name;
            match target.deliver(&alert, &generic).await {
                Ok(()) => {
                    info!(webhook = %name, alert = alert.id, state = alert.state.as_str(), "webhook delivered");
                }
                Err(error) => {
                    warn!(webhook = %name, alert = alert.id, %error, "webhook failed, dead-lettered");
                    failed.push(letter(name, generic.as_bytes(), format!("{name}: {error}")));
                }
            }
        }
        failed
    }
}

impl Target {
    async fn deliver(&self, alert: &Alert, generic: &str) -> Result<(), String> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let mut last_error = String::new();
        for _ in 0..ATTEMPTS {
            if !self.breaker.allow() {
                return Err(match last_error.is_empty() {
                    true => "circuit open: the webhook kept failing".into(),
                    false => format!("{last_error} (circuit now open)"),
                });
            }
            match self.post(alert, generic).await {
                Ok(()) => {
                    self.breaker.success();
                    return Ok(());
                }
                Err(e) => {
                    self.breaker.failure();
                    last_error = e;
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
        Err(last_error)
    }

    /// One attempt; any 2xx is success.
    async fn post(&self, alert: &Alert, generic: &str) -> Result<(), String> {
        let (content_type, body, extra) = render(self.hook.format, alert, generic);
        let mut request = self
            .client
            .post(&self.hook.url)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body);
        for (name, value) in extra.iter().chain(&self.hook.headers) {
            request = request.header(name.as_str(), value.as_str());
        }
        let response = request.send().await.map_err(describe)?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {}", status.as_u16()))
        }
    }
}

/// An HTTP error without its URL, with its causes (a refused connection, a bad certificate).
fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The body of `alert` for a webhook of `format`: content type, bytes, headers of its own.
fn render(format: Format, alert: &Alert, generic: &str) -> (&'static str, Vec<u8>, Headers) {
    let json = "application/json";
    match format {
        Format::Generic => (json, generic.as_bytes().to_vec(), Vec::new()),
        Format::Ntfy => {
            let priority = match (alert.state, alert.severity) {
                (AlertState::Cleared | AlertState::Acknowledged, _) => "default",
                (_, Severity::Critical) => "urgent",
                (_, Severity::Warning) => "high",
                (_, Severity::Info) => "default",
            };
            let tag = match alert.state {
                AlertState::Active => "rotating_light",
                AlertState::Acknowledged => "eyes",
                AlertState::Cleared => "white_check_mark",
            };
            let headers = vec![
                ("Title".into(), title(alert)),
                ("Priority".into(), priority.into()),
                ("Tags".into(), format!("{tag},{}", alert.severity.as_str())),
            ];
            (
                "text/plain; charset=utf-8",
                text(alert).into_bytes(),
                headers,
            )
        }
        Format::Slack => {
            let line = format!("*{}*\n{}", title(alert), text(alert));
            let body = serde_json::json!({"text": line, "content": line});
            (json, body.to_string().into_bytes(), Vec::new())
        }
        Format::Alertmanager => {
            let mut item = serde_json::json!({
                "labels": {
                    "alertname": alert.rule,
                    "severity": alert.severity.as_str(),
                    "house": alert.house_id,
                    "sensor": alert.sensor_id,
                    "kind": alert.kind,
                    "source": "hearth",
                },
                "annotations": {
                    "summary": alert.message,
                    "description": text(alert),
                    "hearth_alert_id": alert.id.to_string(),
                    "state": alert.state.as_str(),
                },
                "startsAt": rfc3339(alert.raised_at),
            });
            let ends = match alert.cleared_at {
                Some(at) => at,
                None => crate::event::now_us() / 1000 + ALERTMANAGER_HOLD_MS,
            };
            item["endsAt"] = rfc3339(ends).into();
            (
                json,
                serde_json::json!([item]).to_string().into_bytes(),
                Vec::new(),
            )
        }
    }
}

type Headers = Vec<(String, String)>;

fn title(alert: &Alert) -> String {
    let state = match alert.state {
        AlertState::Active => "",
        AlertState::Acknowledged => " (acknowledged)",
        AlertState::Cleared => " (cleared)",
    };
    format!(
        "{}{state}: {}/{}",
        alert.message, alert.house_id, alert.sensor_id
    )
}

fn text(alert: &Alert) -> String {
    let value = alert
        .value
        .map(|v| format!(", value {v}"))
        .unwrap_or_default();
    format!(
        "{} {} at {}/{} ({}{value}), alert {}",
        alert.severity.as_str(),
        alert.rule,
        alert.house_id,
        alert.sensor_id,
        alert.kind,
        alert.id
    )
}

fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn letter(name: &str, payload: &[u8], detail: String) -> DeadLetter {
    METRICS.rejected.with("webhook_failed").add(1);
    DeadLetter {
        reason: "webhook_failed",
        detail,
        topic: name.to_string(),
        payload: payload.to_vec(),
        source: "notifier",
        at_ms: crate::event::now_us() / 1000,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(state: AlertState) -> Alert {
        Alert {
            id: 7,
            house_id: "h1".into(),
            sensor_id: "hall".into(),
            rule: "smoke".into(),
            kind: "smoke".into(),
            severity: Severity::Critical,
            state,
            message: "Smoke detected".into(),
            value: Some(1.0),
            raised_at: 1_700_000_000_000,
            raised_by: "h1/hall/smoke/1".into(),
            acknowledged_at: None,
            acknowledged_by: None,
            cleared_at: (state == AlertState::Cleared).then_some(1_700_000_060_000),
            cleared_by: None,
        }
    }

    #[test]
    fn each_format() {
        let a = alert(AlertState::Active);
        let (ct, body, headers) = render(Format::Ntfy, &a, "");
        assert!(ct.starts_with("text/plain"));
        assert!(
            String::from_utf8(body)
                .unwrap()
                .contains("smoke at h1/hall")
        );
        assert!(headers.contains(&("Priority".into(), "urgent".into())));
        let (_, body, _) = render(Format::Slack, &a, "");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["text"], v["content"]);
        let (_, body, _) = render(Format::Alertmanager, &alert(AlertState::Cleared), "");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v[0]["labels"]["alertname"], "smoke");
        assert_eq!(v[0]["startsAt"], "2023-11-14T22:13:20Z");
        assert_eq!(v[0]["endsAt"], "2023-11-14T22:14:20Z");
    }
}
