//! The sweeps every worker process (and `hearth up`) runs beside its consumers, on any backend:
//! dead letters past their retention ([`crate::dead_letter`]), readings and cleared alerts past
//! theirs ([`crate::keep`]), and the readings stored since the last second folded into the
//! rollups ([`crate::series`]).

use std::sync::Arc;
use std::time::Duration;

use crate::seam::{EventQueue, EventStore};
use crate::shutdown::Shutdown;

/// Remove the dead letters past their retention every
/// [`crate::dead_letter::RETENTION_SWEEP`], until shutdown.
pub async fn dead_letters(queue: Arc<dyn EventQueue>, mut shutdown: Shutdown) {
    loop {
        match queue.expire_dead_letters().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(letters = n, "dead letters past their retention removed"),
            Err(e) => tracing::warn!(error = %e, "dead-letter retention sweep failed"),
        }
        if !shutdown.sleep(crate::dead_letter::RETENTION_SWEEP).await {
            return;
        }
    }
}

/// How often a worker process sweeps (and makes the next partitions ahead).
pub const RETENTION_SWEEP: Duration = Duration::from_secs(3600);

/// Sweep at start, then every [`RETENTION_SWEEP`], until shutdown; what goes is logged and counted
/// (`hearth_expired_total`).
pub async fn retention(store: Arc<dyn EventStore>, mut shutdown: Shutdown) {
    loop {
        match store.expire(crate::event::now_us()).await {
            Ok(e) => {
                let m = crate::metrics::metrics();
                m.expired.with("partitions").add(e.partitions.len() as u64);
                m.expired.with("readings").add(e.readings);
                m.expired.with("alerts").add(e.alerts);
                m.expired.with("rollups").add(e.rollups);
                if e != crate::keep::Expired::default() {
                    tracing::info!(partitions = ?e.partitions, readings = e.readings,
                        alerts = e.alerts, rollups = e.rollups, "retention removed what expired");
                }
            }
            Err(e) => tracing::warn!(error = %e, "retention sweep failed; tried again later"),
        }
        if !shutdown.sleep(RETENTION_SWEEP).await {
            return;
        }
    }
}

/// How often a worker process folds the readings stored into the rollups.
pub const ROLLUP_FOLD: Duration = Duration::from_secs(1);

/// Fold every [`ROLLUP_FOLD`], until shutdown (a fold that fails is tried again the next time:
/// what it did not fold waits, counted by a series all the same). On PostgreSQL only the process
/// holding the folder's lease folds; the others' calls return at once.
pub async fn rollups(store: Arc<dyn EventStore>, mut shutdown: Shutdown) {
    while shutdown.sleep(ROLLUP_FOLD).await {
        if let Err(e) = store.fold_rollups().await {
            tracing::warn!(error = %e, "rollups: cannot fold now");
        }
    }
}
