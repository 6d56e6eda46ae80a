//! Webhooks in embedded mode: the `notify` table holds a job for every alert transition a
//! webhook takes, written in the same transaction as the transition; this task POSTs them (the
//! same delivery, retries and per-webhook breakers as the servers' notifier) and removes each
//! job with the dead letters of what kept failing, in one transaction. A crash redelivers the
//! job: at least once, as on the servers.

use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use super::alerts::SqliteAlerts;
use crate::alerts::notify;
use crate::alerts::rules::RuleSet;
use crate::backoff::Backoff;
use crate::shutdown::Shutdown;

pub async fn run(store: Arc<SqliteAlerts>, rules: Arc<RuleSet>, mut shutdown: Shutdown) {
    let notifier = match notify::Notifier::new(&rules) {
        Ok(n) => n,
        Err(e) => {
            warn!(error = %e, "webhooks cannot be delivered");
            return;
        }
    };
    let mut backoff = Backoff::default();
    while !shutdown.is_set() {
        let written = store.jobs.notified();
        let jobs = match store.notifications(50).await {
            Ok(jobs) => jobs,
            Err(e) => {
                warn!(error = %e, "reading webhook notifications failed, retrying");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        if jobs.is_empty() {
            tokio::select! {
                _ = written => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.wait() => return,
            }
            continue;
        }
        for (id, alert) in jobs {
            let failed = notifier.deliver(alert.as_bytes()).await;
            while let Err(e) = store.notified(id, failed.clone()).await {
                warn!(error = %e, "recording a webhook notification failed, retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
        backoff.reset();
    }
}
