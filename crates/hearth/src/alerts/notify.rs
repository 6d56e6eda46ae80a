//! Webhook notifications: alert transitions queued in the `P:notify` stream (by the worker that
//! made them, after they were written) and delivered by a notifier in each worker process: a
//! JSON POST to every webhook configured for the alert's severity, retried with backoff; one that
//! still fails goes to the dead letters with its reason. The entry is acknowledged only then, so
//! a notifier that dies leaves it to another (claimed after a minute of silence).

use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn};

use super::Alert;
use super::rules::RuleSet;
use crate::backoff::Backoff;
use crate::breaker::Breaker;
use crate::config::Config;
use crate::dead_letter::DeadLetter;
use crate::metrics::METRICS;
use crate::servers::queue::{self, Queue};
use crate::shutdown::Shutdown;

const GROUP: &str = "notifier";
/// Attempts per webhook before a notification is dead-lettered.
const ATTEMPTS: u32 = 4;
/// A notifier silent this long has its pending notifications taken by another.
const CLAIM_IDLE_MS: u64 = 60_000;

pub async fn run(config: Arc<Config>, rules: Arc<RuleSet>, mut shutdown: Shutdown) {
    let queue = match Queue::from_config(&config) {
        Ok(q) => q,
        Err(e) => {
            warn!(error = %e, "notifier cannot start");
            return;
        }
    };
    let name = format!("notifier-{}-{:04x}", std::process::id(), fastrand::u16(..));
    let breakers = breakers(&rules);
    let stream = queue.keys.notify();
    let mut backoff = Backoff::default();
    while !shutdown.is_set() {
        let step = async {
            let mut conn = queue::connect(&config.redis_url, Duration::from_secs(15)).await?;
            let _: Result<Value, _> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&stream)
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut conn)
                .await;
            loop {
                // Another notifier's leftovers first, then new transitions.
                let (_, mut entries) =
                    queue::claim(&mut conn, &stream, GROUP, &name, CLAIM_IDLE_MS, "0-0", 50)
                        .await?;
                if entries.is_empty() {
                    entries = queue::read_group(
                        &mut conn,
                        &stream,
                        GROUP,
                        &name,
                        50,
                        Duration::from_secs(1),
                    )
                    .await?;
                }
                for entry in entries {
                    let id = entry.id.clone();
                    for letter in
                        deliver(&rules, &breakers, entry.field("a").unwrap_or_default()).await
                    {
                        dead_letter(&queue, letter).await;
                    }
                    let mut c = queue.conn.clone();
                    redis::pipe()
                        .cmd("XACK")
                        .arg(&stream)
                        .arg(GROUP)
                        .arg(&id)
                        .ignore()
                        .cmd("XDEL")
                        .arg(&stream)
                        .arg(&id)
                        .ignore()
                        .exec_async(&mut c)
                        .await?;
                }
                if shutdown.is_set() {
                    return Ok::<(), queue::QueueError>(());
                }
            }
        }
        .await;
        match step {
            Ok(()) => return,
            Err(e) => {
                crate::metrics::dependency_error("redis");
                warn!(error = %e, "notifier failed, retrying");
                if !shutdown.sleep(backoff.next_delay()).await {
                    return;
                }
            }
        }
    }
}

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

async fn dead_letter(queue: &Queue, letter: DeadLetter) {
    let mut pipe = redis::pipe();
    queue::xadd_letter(&mut pipe, &queue.keys.dead(), &letter);
    let mut conn = queue.conn.clone();
    if let Err(e) = pipe.exec_async(&mut conn).await {
        warn!(error = %e, "could not dead-letter a failed webhook");
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
