//! The embedded workers: the flow of the distributed worker on the seams, without leases (one
//! process owns every lane). Two run: one for the critical lane, one for the routine lanes, so
//! a smoke alarm never waits behind a batch of telemetry.
//!
//! For each batch: write the events (idempotent), offer them to the cache, evaluate the rules
//! and write their transitions, push the alerts (and the events, when someone watches), then
//! acknowledge the entries. A crash anywhere before the acknowledgement redelivers the batch at
//! the next start, and the writes skip what was already written.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::memory::ChannelFanOut;
use super::queue::SqliteQueue;
use super::store::SqliteStore;
use crate::alerts::Alert;
use crate::alerts::engine::Engine;
use crate::alerts::rules::RuleSet;
use crate::backoff::Backoff;
use crate::dead_letter::DeadLetter;
use crate::event::{Event, Rejection};
use crate::metrics::METRICS;
use crate::seam::{Delivery, EventQueue, EventStore, FanOut, Lanes, LatestCache, Written};
use crate::shutdown::Shutdown;

pub struct Worker {
    pub lanes: Lanes,
    pub queue: Arc<SqliteQueue>,
    pub store: Arc<SqliteStore>,
    pub cache: Arc<dyn LatestCache>,
    pub fanout: Arc<ChannelFanOut>,
    pub rules: Arc<RuleSet>,
    pub batch_size: usize,
}

impl Worker {
    /// Run until shutdown. A panic (a bug) does not leave the lanes unserved: it is logged, the
    /// worker's unacknowledged entries are handed out again, and it starts over.
    pub async fn run(self, shutdown: Shutdown) {
        use futures_util::FutureExt;
        loop {
            let once = std::panic::AssertUnwindSafe(self.serve(shutdown.clone()));
            match once.catch_unwind().await {
                Ok(()) => return,
                Err(_) => {
                    tracing::error!(lanes = ?self.lanes, "embedded worker panicked; starting over");
                    self.queue.release(self.lanes);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn serve(&self, mut shutdown: Shutdown) {
        let mut engine = Engine::new(self.rules.clone());
        let mut sequences = crate::worker::sequence::SequenceTracker::default();
        let mut backoff = Backoff::default();
        let mut next_sweep = Instant::now();
        loop {
            if shutdown.is_set() {
                return;
            }
            // The critical worker also looks for silent sensors, as the critical lane's owner
            // does on the servers.
            if self.lanes == Lanes::Critical && Instant::now() >= next_sweep {
                next_sweep = Instant::now() + self.rules.sweep_period();
                match self.store.sweep_offline(&self.rules).await {
                    Ok(alerts) => {
                        for a in &alerts {
                            METRICS.alerts.with(a.severity.as_str()).add(1);
                            tracing::info!(alert = a.id, sensor = %a.sensor_id, "sensor offline");
                            let _ = self.fanout.push_alert(&self.rules, a).await;
                        }
                    }
                    Err(e) => warn!(error = %e, "offline sweep failed"),
                }
            }
            // Registered before reading, so that an append right after the read wakes us.
            let appended = self.queue.appended.notified();
            let batch = match self.queue.read(self.lanes, self.batch_size).await {
                Ok(b) => b,
                Err(e) => {
                    warn!(error = %e, "embedded queue read failed, retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            if batch.is_empty() {
                let idle = Duration::from_millis(500).min(self.rules.sweep_period());
                tokio::select! {
                    _ = appended => {}
                    _ = tokio::time::sleep(idle) => {}
                    _ = shutdown.wait() => return,
                }
                continue;
            }
            let all: Vec<&Event> = batch.iter().flat_map(|d| &d.events).collect();
            crate::fault::pause("pause_before_store").await;
            crate::fault::hit("before_store");
            // Retried until it succeeds: an error here is the disk, never the content.
            let written = loop {
                match self.store.write(&all).await {
                    Ok(w) => break w,
                    Err(e) => {
                        warn!(error = %e, "embedded store write failed, retrying");
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                }
            };
            crate::fault::hit("after_store");
            // What was stored (events past a cap were not): what the rules and pushes see.
            let events: Vec<&Event> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| !written.capped.iter().any(|(c, _)| c == i))
                .map(|(_, e)| *e)
                .collect();
            let letters = capped_letters(&batch, &written);
            let _ = self.cache.offer(&events).await;
            let alerts = loop {
                match self.evaluate(&mut engine, &events).await {
                    Ok(a) => break a,
                    Err(e) => {
                        warn!(error = %e, "embedded alert write failed, retrying");
                        engine.forget();
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                }
            };
            crate::fault::hit("after_rules");
            for alert in &alerts {
                let _ = self.fanout.push_alert(&self.rules, alert).await;
            }
            self.push_events(&events).await;
            while let Err(e) = self.queue.ack(&batch, &written, &letters).await {
                warn!(error = %e, "embedded queue acknowledgement failed, retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            crate::fault::hit("after_ack");
            let gaps = sequences.observe(events.iter().copied());
            if gaps > 0 {
                METRICS.sequence_gaps.add(gaps);
            }
            backoff.reset();
            METRICS.stored.add(written.stored);
            METRICS.duplicates.add(written.duplicates);
            debug!(
                stored = written.stored,
                duplicates = written.duplicates,
                "batch stored"
            );
        }
    }

    async fn evaluate(
        &self,
        engine: &mut Engine,
        events: &[&Event],
    ) -> Result<Vec<Alert>, crate::seam::Unavailable> {
        let to_load = engine.to_load(events);
        if !to_load.is_empty() {
            let states = self.store.load_states(to_load.clone()).await?;
            engine.load(&to_load, states);
        }
        let outcome = engine.evaluate(events);
        let alerts = if outcome.is_empty() {
            Vec::new()
        } else {
            self.store
                .write_outcome(&outcome, self.rules.clone())
                .await?
        };
        engine.commit(outcome, events);
        for a in &alerts {
            if a.state == crate::alerts::AlertState::Active {
                METRICS.alerts.with(a.severity.as_str()).add(1);
            }
            tracing::info!(alert = a.id, rule = %a.rule, sensor = %a.sensor_id, state = a.state.as_str(), "alert");
        }
        Ok(alerts)
    }

    async fn push_events(&self, events: &[&Event]) {
        if !self.fanout.has_subscribers() {
            return;
        }
        for json in crate::alerts::event_messages(events, |_| true) {
            let _ = self.fanout.publish(json).await;
        }
    }
}

/// One dead letter per queue entry for its events past a cap (by their index in the batch).
fn capped_letters(batch: &[Delivery], written: &Written) -> Vec<DeadLetter> {
    let mut out = Vec::new();
    let mut offset = 0;
    for d in batch {
        let range = offset..offset + d.events.len();
        let (why, events): (Vec<Rejection>, Vec<&Event>) = written
            .capped
            .iter()
            .filter(|(i, _)| range.contains(i))
            .filter_map(|(i, r)| Some((r.clone(), d.events.get(i - offset)?)))
            .unzip();
        let context = format!("lane {}, queue row {}", d.lane, d.id);
        out.extend(DeadLetter::of_events(&events, &why, &context));
        offset = range.end;
    }
    out
}
