//! The webhook notifier on the servers: alert transitions queued in the `P:notify` stream (by
//! the worker that made them, after they were written) and delivered by a notifier in each worker
//! process ([`crate::alerts::notify::deliver`]). The entry is acknowledged only once delivered
//! or dead-lettered, so a notifier that dies leaves it to another (claimed after a minute of
//! silence).

use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use tracing::warn;

use super::queue::{self, Queue};
use super::stream;
use crate::alerts::notify::Notifier;
use crate::alerts::rules::RuleSet;
use crate::backoff::Backoff;
use crate::config::Config;
use crate::dead_letter::DeadLetter;
use crate::shutdown::Shutdown;

const GROUP: &str = "notifier";
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
    let notifier = match Notifier::new(&rules) {
        Ok(n) => n,
        Err(e) => {
            warn!(error = %e, "webhooks cannot be delivered");
            return;
        }
    };
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
                    stream::claim(&mut conn, &stream, GROUP, &name, CLAIM_IDLE_MS, "0-0", 50)
                        .await?;
                if entries.is_empty() {
                    entries = stream::read_group(
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
                    for letter in notifier.deliver(entry.field("a").unwrap_or_default()).await {
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

async fn dead_letter(queue: &Queue, letter: DeadLetter) {
    let mut pipe = redis::pipe();
    queue::xadd_letter(&mut pipe, &queue.keys.dead(), &letter);
    let mut conn = queue.conn.clone();
    if let Err(e) = pipe.exec_async(&mut conn).await {
        warn!(error = %e, "could not dead-letter a failed webhook");
    }
}
