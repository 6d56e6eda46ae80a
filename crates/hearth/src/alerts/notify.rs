//! Webhook delivery, for both backends' notifiers (`servers/notifier.rs`, `embedded/notifier.rs`):
//! a JSON POST of an alert transition to every webhook configured for its severity, retried with
//! backoff, behind a circuit breaker per webhook; one that still fails becomes a dead letter
//! (`webhook_failed`) for the caller to keep.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn};

use super::Alert;
use super::rules::RuleSet;
use crate::backoff::Backoff;
use crate::breaker::Breaker;
use crate::dead_letter::DeadLetter;
use crate::metrics::METRICS;

/// Attempts per webhook before a notification is dead-lettered.
const ATTEMPTS: u32 = 4;

/// One breaker per webhook: a receiver that keeps failing is not retried for every alert (each
/// would wait out all its attempts); its notifications are dead-lettered at once (replayable
/// with `hearth dlq replay --reason webhook_failed`) until a probe succeeds.
pub fn breakers(rules: &RuleSet) -> Breakers {
    rules
        .webhooks
        .iter()
        .map(|w| {
            let b = Breaker::named(format!("webhook:{}", w.url), 3, Duration::from_secs(30));
            (w.url.clone(), b)
        })
        .collect()
}

pub type Breakers = std::collections::HashMap<String, Breaker>;

/// POST one transition (an alert's JSON) to every webhook of its severity; returns the dead
/// letters of the deliveries that kept failing, for the caller to keep.
pub async fn deliver(rules: &RuleSet, breakers: &Breakers, body: &[u8]) -> Vec<DeadLetter> {
    let Ok(alert) = serde_json::from_slice::<Alert>(body) else {
        warn!("unreadable notification dropped into the dead letters");
        return vec![letter("", body, "unreadable notification".into())];
    };
    let mut failed = Vec::new();
    let payload = serde_json::json!({"type": "alert", "alert": alert}).to_string();
    for hook in rules
        .webhooks
        .iter()
        .filter(|w| w.severities.contains(&alert.severity))
    {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let mut last_error = String::new();
        let mut delivered = false;
        let breaker = breakers.get(&hook.url);
        for _ in 0..ATTEMPTS {
            if breaker.is_some_and(|b| !b.allow()) {
                last_error = "circuit open: the webhook kept failing".into();
                break;
            }
            match post(&hook.url, &payload).await {
                Ok(()) => {
                    if let Some(b) = breaker {
                        b.success();
                    }
                    delivered = true;
                    break;
                }
                Err(e) => {
                    if let Some(b) = breaker {
                        b.failure();
                    }
                    last_error = e;
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
        if delivered {
            info!(url = %hook.url, alert = alert.id, state = alert.state.as_str(), "webhook delivered");
        } else {
            warn!(url = %hook.url, alert = alert.id, error = %last_error, "webhook failed, dead-lettered");
            let detail = format!("{}: {last_error}", hook.url);
            failed.push(letter(&hook.url, payload.as_bytes(), detail));
        }
    }
    failed
}

fn letter(url: &str, payload: &[u8], detail: String) -> DeadLetter {
    METRICS.rejected.with("webhook_failed").add(1);
    DeadLetter {
        reason: "webhook_failed",
        detail,
        topic: url.to_string(),
        payload: payload.to_vec(),
        source: "notifier",
        at_ms: crate::event::now_us() / 1000,
    }
}

/// A JSON POST over plain HTTP/1.1; any 2xx is success.
pub async fn post(url: &str, body: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// is supported")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: hearth\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut head = vec![0u8; 64];
        let n = stream
            .read(&mut head)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let status_line = String::from_utf8_lossy(&head[..n]).to_string();
        let status = status_line.split_whitespace().nth(1).unwrap_or("");
        if status.starts_with('2') {
            Ok(())
        } else {
            Err(format!(
                "HTTP {}",
                if status.is_empty() { "?" } else { status }
            ))
        }
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| "timed out after 10 s".to_string())?
}
