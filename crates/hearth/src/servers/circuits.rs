//! Circuit states shared between processes through Redis (`P:circuits`), so that the pipeline
//! view of any process (`/api/v1/pipeline`, the dashboard) shows every process's circuits.

use super::queue::{Queue, QueueError};
use crate::breaker::SHARE_EVERY;

const SHARED_FRESH_MS: i64 = 10_000;

/// Share this process's circuit states through Redis until shutdown, so that the pipeline view
/// of any process (`/api/v1/pipeline`, the dashboard) shows every process's circuits.
pub async fn share(queue: Queue, mut shutdown: crate::shutdown::Shutdown) {
    let process = format!(
        "{}-{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into()),
        std::process::id()
    );
    while shutdown.sleep(SHARE_EVERY).await {
        let circuits = crate::metrics::circuits();
        if circuits.is_empty() {
            continue;
        }
        let now = crate::event::now_us() / 1000;
        let mut cmd = redis::cmd("HSET");
        cmd.arg(queue.keys.circuits());
        for (dependency, open) in circuits {
            cmd.arg(format!("{dependency}|{process}"))
                .arg(format!("{}:{now}", u8::from(open)));
        }
        let mut conn = queue.conn.clone();
        let _: Result<(), _> = cmd.query_async(&mut conn).await;
    }
}

impl Queue {
    /// Every dependency's circuit across processes: open if any process reported it open within
    /// the last 10 s. Reports older than a minute are removed.
    pub async fn circuits(&self) -> Result<std::collections::BTreeMap<String, bool>, QueueError> {
        let queue = self;
        let mut conn = queue.conn.clone();
        let fields: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
            .arg(queue.keys.circuits())
            .query_async(&mut conn)
            .await?;
        let now = crate::event::now_us() / 1000;
        let mut out = std::collections::BTreeMap::new();
        let mut stale = Vec::new();
        for (field, value) in fields {
            let (Some((dependency, _)), Some((open, at))) =
                (field.split_once('|'), value.split_once(':'))
            else {
                continue;
            };
            let age = now - at.parse::<i64>().unwrap_or(0);
            if age > 6 * SHARED_FRESH_MS {
                stale.push(field.clone());
            }
            if age <= SHARED_FRESH_MS {
                let entry = out.entry(dependency.to_string()).or_insert(false);
                *entry |= open == "1";
            }
        }
        if !stale.is_empty() {
            let _: Result<(), _> = redis::cmd("HDEL")
                .arg(queue.keys.circuits())
                .arg(stale)
                .query_async(&mut conn)
                .await;
        }
        Ok(out)
    }
}
