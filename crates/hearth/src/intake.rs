//! What every intake shares, the MQTT ingest, the embedded broker and `POST /events` alike:
//! one backpressure gate, with one meaning of the watermarks.
//!
//! The gate closes when the routine lanes hold `queue_high_watermark` events and opens again
//! once they are down to `queue_low_watermark` (hysteresis: it does not flap at the mark). The
//! depth is measured every [`MEASURE_EVERY`] from the queue's counters, and counted up by the
//! intake itself in between, with every append: a burst cannot run more than one append past
//! the mark before the gate closes, however fast it comes. Critical events are never held back
//! by it (they have their own lane); each intake decides what holding means for it (the ingest
//! leaves messages at the broker, the embedded broker stops reading its clients, HTTP answers
//! 503).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tracing::{info, warn};

use crate::metrics::METRICS;
use crate::seam::EventQueue;
use crate::shutdown::Shutdown;

/// How often the gate reads the queue's depth.
pub const MEASURE_EVERY: Duration = Duration::from_millis(100);

/// The routine depth as an intake sees it, and whether it holds routine traffic back.
pub struct Gate {
    depth: AtomicU64,
    closed: AtomicBool,
    high: u64,
    low: u64,
    /// Woken at every measure (a closed gate may have opened).
    pub changed: Notify,
}

impl Gate {
    pub fn new(high: u64, low: u64) -> Arc<Gate> {
        Arc::new(Gate {
            depth: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            high,
            low,
            changed: Notify::new(),
        })
    }

    pub fn from_config(config: &crate::config::Config) -> Arc<Gate> {
        Gate::new(config.queue_high_watermark, config.queue_low_watermark)
    }

    /// Whether routine traffic is held back.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// `n` routine events were appended since the last measure.
    pub fn appended(&self, n: u64) {
        if n > 0 {
            self.depth.fetch_add(n, Ordering::SeqCst);
            self.evaluate();
        }
    }

    /// The queue's routine depth, as read.
    pub fn measured(&self, depth: u64) {
        self.depth.store(depth, Ordering::SeqCst);
        self.evaluate();
        self.changed.notify_waiters();
    }

    /// Wait until the gate is open.
    pub async fn open(&self) {
        while self.is_closed() {
            let changed = self.changed.notified();
            if !self.is_closed() {
                return;
            }
            changed.await;
        }
    }

    /// Hysteresis: close at `high`, open at `low`.
    fn evaluate(&self) {
        let depth = self.depth.load(Ordering::SeqCst);
        if !self.is_closed() && depth >= self.high {
            warn!(
                depth,
                high = self.high,
                "queue deep: holding routine traffic back"
            );
            self.closed.store(true, Ordering::SeqCst);
            METRICS.ingest_paused.set(1.0);
        } else if self.is_closed() && depth <= self.low {
            info!(
                depth,
                low = self.low,
                "queue drained: taking routine traffic again"
            );
            self.closed.store(false, Ordering::SeqCst);
            METRICS.ingest_paused.set(0.0);
        }
    }

    /// Measure the queue's routine depth every [`MEASURE_EVERY`] until shutdown.
    pub async fn watch(self: Arc<Self>, queue: Arc<dyn EventQueue>, mut shutdown: Shutdown) {
        loop {
            if let Ok(depths) = queue.depths().await {
                self.measured(crate::lane::routine_depth(&depths));
            }
            if !shutdown.sleep(MEASURE_EVERY).await {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closes_at_high_opens_at_low_and_counts_between_measures() {
        let gate = Gate::new(100, 20);
        gate.measured(10);
        gate.appended(50);
        assert!(!gate.is_closed());
        gate.appended(50);
        assert!(gate.is_closed(), "counted up to 110 between two measures");
        gate.measured(60);
        assert!(gate.is_closed(), "under high, above low: still closed");
        gate.measured(20);
        assert!(!gate.is_closed());
    }
}
