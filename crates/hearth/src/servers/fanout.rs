//! The fan-out seam on Redis: pushes through pub/sub (`P:push`) to every API process, webhook
//! jobs on the `P:notify` stream, and the houses WebSocket clients watch (`P:watched`).

use std::collections::HashSet;
use std::sync::Arc;

use tracing::warn;

use super::queue::{Queue, QueueError};
use crate::alerts::Alert;
use crate::alerts::rules::RuleSet;
use crate::backoff::Backoff;
use crate::seam::{FanOut, Fut, Pushed};

/// Pushes through Redis pub/sub (`P:push`) to every API process; webhook jobs on `P:notify`.
pub struct RedisFanOut {
    pub queue: Queue,
    pub redis_url: String,
    /// Which alerts a webhook takes.
    pub rules: Arc<RuleSet>,
}

impl FanOut for RedisFanOut {
    fn publish<'a>(&'a self, messages: &'a [String]) -> Fut<'a, ()> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            for message in messages {
                pipe.cmd("PUBLISH")
                    .arg(self.queue.keys.push())
                    .arg(message)
                    .ignore();
            }
            Ok(self.queue.exec(&pipe).await?)
        })
    }

    /// To WebSocket clients (`P:push`, numbered and kept in `P:pushlog` by one script, so that
    /// the order of the numbers is the order of publication) and, when a webhook takes an
    /// alert's severity, to the notifier (`P:notify`), in one round trip.
    fn push_alerts<'a>(&'a self, alerts: &'a [Alert]) -> Fut<'a, ()> {
        Box::pin(async move {
            let keys = &self.queue.keys;
            let mut pipe = redis::pipe();
            for alert in alerts {
                if let Some(json) = crate::alerts::alert_message(alert) {
                    pipe.cmd("EVAL")
                        .arg(PUSH_ALERT)
                        .arg(2)
                        .arg(keys.push_seq())
                        .arg(keys.push_log())
                        .arg(keys.push())
                        .arg(json)
                        .arg(crate::seam::KEPT_ALERT_PUSHES)
                        .ignore();
                }
                if crate::alerts::has_webhook(&self.rules, alert)
                    && let Ok(json) = serde_json::to_string(alert)
                {
                    pipe.cmd("XADD")
                        .arg(self.queue.keys.notify())
                        .arg("*")
                        .arg("a")
                        .arg(json)
                        .ignore();
                }
            }
            Ok(self.queue.exec(&pipe).await?)
        })
    }

    fn alerts_since(&self, since: u64) -> Fut<'_, Option<Vec<String>>> {
        Box::pin(async move {
            let keys = &self.queue.keys;
            let mut conn = self.queue.conn.clone();
            type Entries = Vec<(String, Vec<(String, String)>)>;
            let (last, own, len, after): (Option<u64>, Entries, usize, Entries) = redis::pipe()
                .cmd("GET")
                .arg(keys.push_seq())
                .cmd("XRANGE")
                .arg(keys.push_log())
                .arg(format!("{since}-0"))
                .arg(format!("{since}-0"))
                .cmd("XLEN")
                .arg(keys.push_log())
                .cmd("XRANGE")
                .arg(keys.push_log())
                .arg(format!("({since}-0"))
                .arg("+")
                .query_async(&mut conn)
                .await
                .map_err(QueueError::from)?;
            // The numbers start from 0; the log is trimmed to about its cap, never below it
            // (`MAXLEN ~`).
            let from_origin = since == 0 && len < crate::seam::KEPT_ALERT_PUSHES;
            if !crate::seam::resumable(since, last.unwrap_or(0), !own.is_empty(), from_origin) {
                return Ok(None);
            }
            Ok(Some(
                after
                    .into_iter()
                    .filter_map(|(_, fields)| fields.into_iter().find(|(k, _)| k == "m"))
                    .map(|(_, m)| m)
                    .collect(),
            ))
        })
    }

    fn alerts_pushed(&self) -> Fut<'_, u64> {
        Box::pin(async move {
            let mut conn = self.queue.conn.clone();
            let last: Option<u64> = redis::cmd("GET")
                .arg(self.queue.keys.push_seq())
                .query_async(&mut conn)
                .await
                .map_err(QueueError::from)?;
            Ok(last.unwrap_or(0))
        })
    }

    fn subscribe(&self) -> Fut<'_, tokio::sync::mpsc::Receiver<Pushed>> {
        Box::pin(async move {
            let (tx, rx) = tokio::sync::mpsc::channel(4096);
            let channel = self.queue.keys.push();
            let url = self.redis_url.clone();
            // Subscribed before returning, so that nothing published after this call is missed.
            let first = subscribe(&url, &channel).await?;
            tokio::spawn(relay(url, channel, first, tx));
            Ok(rx)
        })
    }

    fn watch<'a>(&'a self, houses: &'a [String], ttl_ms: i64) -> Fut<'a, ()> {
        Box::pin(async move {
            let key = self.queue.keys.watched();
            let now = crate::event::now_us() / 1000;
            let mut pipe = redis::pipe();
            pipe.cmd("ZREMRANGEBYSCORE")
                .arg(&key)
                .arg("-inf")
                .arg(now)
                .ignore();
            for h in houses {
                pipe.cmd("ZADD").arg(&key).arg(now + ttl_ms).arg(h).ignore();
            }
            if !houses.is_empty() {
                pipe.cmd("INCR")
                    .arg(self.queue.keys.watch_changes())
                    .ignore();
            }
            Ok(self.queue.exec(&pipe).await?)
        })
    }

    fn watched(&self) -> Fut<'_, HashSet<String>> {
        Box::pin(async move {
            let now = crate::event::now_us() / 1000;
            let mut conn = self.queue.conn.clone();
            let houses: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(self.queue.keys.watched())
                .arg(now)
                .arg("+inf")
                .query_async(&mut conn)
                .await
                .map_err(QueueError::from)?;
            Ok(houses.into_iter().collect())
        })
    }

    fn watch_changes(&self) -> Fut<'_, u64> {
        Box::pin(async move {
            let mut conn = self.queue.conn.clone();
            let changes: Option<u64> = redis::cmd("GET")
                .arg(self.queue.keys.watch_changes())
                .query_async(&mut conn)
                .await
                .map_err(QueueError::from)?;
            Ok(changes.unwrap_or(0))
        })
    }
}

/// Number an alert push (`INCR`), keep it (`XADD` with the number as its id, the log capped at
/// about ARGV[2] entries) and publish it, with `"seq"` first in its JSON, all at once.
/// KEYS: the counter, the log; ARGV: the channel, the message, the cap.
///
/// A number is one more than the last and never below the server's clock in microseconds, so
/// that numbers keep growing when Redis lost the counter (restarted without persistence,
/// flushed, an AOF's last second lost, a failover behind its replication): a reader that saw
/// a number never takes a new push for one it already had. (Lua numbers are doubles: exact to
/// 2^53, some 285 years of microseconds.)
const PUSH_ALERT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local seq = math.max(tonumber(redis.call('GET', KEYS[1]) or '0') + 1, now)
local id = string.format('%.0f', seq)
redis.call('SET', KEYS[1], id)
local message = '{"seq":' .. id .. ',' .. string.sub(ARGV[2], 2)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], id .. '-0', 'm', message)
redis.call('PUBLISH', ARGV[1], message)
return seq
"#;

/// Subscribe on the server, or on the first cluster node that answers (a cluster delivers every
/// message published on any node to the subscribers of every node).
async fn subscribe(url: &str, channel: &str) -> Result<redis::aio::PubSub, QueueError> {
    let mut last = None;
    for node in super::conn::nodes(url) {
        let attempt = async {
            let client = super::conn::client(&node)?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        match attempt.await {
            Ok(pubsub) => return Ok(pubsub),
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .map(QueueError::from)
        .unwrap_or(QueueError::Reply("no redis node")))
}

/// Forward `P:push` to `tx` until the receiver is dropped, resubscribing after a failure (what
/// was published meanwhile is missed: a [`Pushed::Gap`] says where, once subscribed again).
async fn relay(
    url: String,
    channel: String,
    first: redis::aio::PubSub,
    tx: tokio::sync::mpsc::Sender<Pushed>,
) {
    use futures_util::StreamExt;
    let mut backoff = Backoff::default();
    let mut current = Some(first);
    let mut lost = false;
    loop {
        let pubsub = match current.take() {
            Some(p) => Ok(p),
            None => subscribe(&url, &channel).await,
        };
        match pubsub {
            Ok(mut pubsub) => {
                backoff.reset();
                if std::mem::take(&mut lost) && tx.send(Pushed::Gap).await.is_err() {
                    return;
                }
                let mut messages = pubsub.on_message();
                while let Some(msg) = messages.next().await {
                    if let Ok(text) = msg.get_payload::<String>()
                        && tx.send(Pushed::Message(text)).await.is_err()
                    {
                        return;
                    }
                }
                crate::metrics::dependency_error("redis");
                warn!("push subscription lost, subscribing again");
            }
            Err(e) => {
                crate::metrics::dependency_error("redis");
                warn!(error = %e, "push subscription lost, reconnecting");
            }
        }
        lost = true;
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}
