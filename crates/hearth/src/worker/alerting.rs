//! The consumer's part in alerting: evaluate the rules on each committed batch and write the
//! transitions (fenced like the batch), push them (WebSocket fan-out through Redis pub/sub,
//! webhooks through the `P:notify` stream), and mark them pushed; push again what a lane's former
//! owner left unpushed; and, for the owner of the critical lane, sweep for silent sensors.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{Consumer, WorkerError, lock};
use crate::alerts::Alert;
use crate::alerts::rules::Condition;
use crate::backoff::Backoff;
use crate::event::Event;
use crate::lane::Lane;
use crate::metrics::{self, METRICS};
use crate::servers::store::StoreError;

/// How often the set of watched houses is read again (one ZRANGEBYSCORE): a new WebSocket
/// subscription gets events within about this long.
const WATCHED_REFRESH: Duration = Duration::from_millis(500);

impl Consumer {
    /// While the store is unreachable the critical lane still warns: the alerts that critical
    /// boolean rules (smoke, CO, gas, water leak, alarms) raise on these entries' events are
    /// pushed at once, with id 0 ("not stored yet"), and their latest values cached. The entries
    /// stay pending; once stored, the rules run as usual and the stored alert is pushed again
    /// with its id (the same `raised_by`, so a client can tell it is the same alert). Each entry
    /// is pushed provisionally once.
    pub(super) async fn push_provisional(&mut self, entries: &[super::Entry]) {
        let fresh: Vec<&super::Entry> = entries
            .iter()
            .filter(|e| e.lane == Lane::Critical && !self.provisional.contains(&e.raw.id))
            .collect();
        if fresh.is_empty() {
            return;
        }
        let events: Vec<&Event> = fresh.iter().flat_map(|e| &e.events).collect();
        let alerts: Vec<Alert> = events
            .iter()
            .filter(|e| e.value == 1.0)
            .flat_map(|e| {
                self.engine
                    .rules
                    .rules
                    .iter()
                    .filter(|r| {
                        r.condition == Condition::Boolean
                            && r.severity == crate::alerts::Severity::Critical
                            && r.kinds.contains(&e.kind)
                    })
                    .map(move |r| Alert {
                        id: 0,
                        house_id: e.house_id.clone(),
                        sensor_id: e.sensor_id.clone(),
                        rule: r.name.clone(),
                        kind: e.kind.clone(),
                        severity: r.severity,
                        state: crate::alerts::AlertState::Active,
                        message: r.message.clone(),
                        value: Some(e.value),
                        raised_at: e.ts_ms,
                        raised_by: crate::alerts::event_key(e),
                        acknowledged_at: None,
                        acknowledged_by: None,
                        cleared_at: None,
                        cleared_by: None,
                    })
            })
            .collect();
        let mut pipe = redis::pipe();
        self.cache.add_update(&mut pipe, &events);
        self.add_pushes(&mut pipe, &alerts, &[]);
        match self.queue.exec(&pipe).await {
            Ok(()) => {
                self.provisional
                    .extend(fresh.iter().map(|e| e.raw.id.clone()));
                if !alerts.is_empty() {
                    warn!(consumer = %self.name, alerts = alerts.len(), "store unreachable: critical alerts pushed before they are stored");
                }
            }
            Err(e) => warn!(consumer = %self.name, error = %e, "could not push provisional alerts"),
        }
    }

    /// Evaluate the rules on stored `events` and write what changed. `None` on shutdown or when
    /// a lane was lost meanwhile (the lane's next owner evaluates the batch again).
    pub(super) async fn evaluate_rules(
        &mut self,
        events: &[&Event],
        lanes: &BTreeSet<Lane>,
    ) -> Option<Vec<Alert>> {
        let mut backoff = Backoff::default();
        loop {
            let result: Result<Vec<Alert>, StoreError> = async {
                let to_load = self.engine.to_load(events);
                if !to_load.is_empty() {
                    let states = self.store().await?.load_states(&to_load).await?;
                    self.engine.load(&to_load, states);
                }
                let outcome = self.engine.evaluate(events);
                let alerts = if outcome.is_empty() {
                    Vec::new()
                } else {
                    let fences: Vec<(String, i64)> = lanes
                        .iter()
                        .filter_map(|l| self.held.get(l).map(|h| (l.name(), h.token)))
                        .collect();
                    if fences.len() != lanes.len() {
                        return Err(StoreError::Fenced(Vec::new()));
                    }
                    let rules = self.engine.rules.clone();
                    let shards = self.config.shards;
                    self.store()
                        .await?
                        .write_outcome(&fences, &outcome, &rules, shards)
                        .await?
                };
                self.engine.commit(outcome, events);
                Ok(alerts)
            }
            .await;
            match result {
                Ok(alerts) => {
                    for a in &alerts {
                        if a.state == crate::alerts::AlertState::Active {
                            METRICS.alerts.with(a.severity.as_str()).add(1);
                        }
                        info!(alert = a.id, rule = %a.rule, sensor = %a.sensor_id, state = a.state.as_str(), "alert");
                    }
                    return Some(alerts);
                }
                Err(StoreError::Fenced(lost)) => {
                    warn!(consumer = %self.name, lanes = ?lost, "fenced out while writing alerts");
                    for name in lost {
                        if let Some(lane) = self.lanes.iter().find(|l| l.name() == name).copied() {
                            self.held.remove(&lane);
                            lock(&self.kept).remove(&lane);
                        }
                    }
                    return None;
                }
                Err(e) => {
                    metrics::dependency_error("postgres");
                    warn!(consumer = %self.name, error = %e, "writing alerts failed, retrying");
                    self.store = None;
                    if !self.shutdown.clone().sleep(backoff.next_delay()).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Add to `pipe` the pushes of `alerts`, the webhook notifications, and the events of
    /// watched houses.
    pub(super) fn add_pushes(
        &self,
        pipe: &mut redis::Pipeline,
        alerts: &[Alert],
        events: &[&Event],
    ) {
        for alert in alerts {
            crate::alerts::add_push(pipe, &self.queue.keys, &self.engine.rules, alert);
        }
        let watched = &self.watched.1;
        if watched.is_empty() || events.is_empty() {
            return;
        }
        let all = watched.contains("*");
        for json in crate::alerts::event_messages(events, |h| all || watched.contains(h)) {
            pipe.cmd("PUBLISH")
                .arg(self.queue.keys.push())
                .arg(json)
                .ignore();
        }
    }

    /// Note that `alerts` were pushed (best effort: if this fails, the lane's next owner pushes
    /// them again, and a client sees the same alert twice).
    pub(super) async fn pushed(&mut self, alerts: &[Alert]) {
        if alerts.is_empty() {
            return;
        }
        let result = async { self.store().await?.mark_pushed(alerts).await }.await;
        if let Err(e) = result {
            warn!(consumer = %self.name, error = %e, "could not mark alerts pushed");
            self.store = None;
        }
    }

    /// Between batches: refresh the watched houses, push what lanes taken over left unpushed,
    /// and (the critical lane's owner) sweep for silent sensors.
    pub(super) async fn housekeeping(&mut self) -> Result<(), WorkerError> {
        if self.watched.0.elapsed() >= WATCHED_REFRESH {
            let now = crate::event::now_us() / 1000;
            let mut conn = self.queue.conn.clone();
            let houses: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(self.queue.keys.watched())
                .arg(now)
                .arg("+inf")
                .query_async(&mut conn)
                .await
                .map_err(crate::servers::queue::QueueError::from)?;
            self.watched = (Instant::now(), houses.into_iter().collect());
        }
        // Both below need the store: while its circuit is open they wait, and reading goes on
        // (the critical lane still pushes its alerts, see `push_provisional`).
        if crate::breaker::POSTGRES.is_open() {
            return Ok(());
        }
        while let Some(lane) = self.repush.first().copied() {
            if !self.held.contains_key(&lane) {
                self.repush.remove(&lane);
                continue;
            }
            let alerts = self.store().await?.unpushed(&lane.name()).await?;
            self.publish(&alerts).await?;
            self.repush.remove(&lane);
        }
        if self.held.contains_key(&Lane::Critical) && Instant::now() >= self.next_sweep {
            self.next_sweep = Instant::now() + self.engine.rules.sweep_period();
            let rules = self.engine.rules.clone();
            let shards = self.config.shards;
            let alerts = self.store().await?.sweep_offline(&rules, shards).await?;
            for a in &alerts {
                METRICS.alerts.with(a.severity.as_str()).add(1);
                info!(alert = a.id, sensor = %a.sensor_id, "sensor offline");
            }
            self.publish(&alerts).await?;
        }
        Ok(())
    }

    /// Push alerts outside a batch (takeover, sweep), then mark them pushed.
    async fn publish(&mut self, alerts: &[Alert]) -> Result<(), WorkerError> {
        if alerts.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        self.add_pushes(&mut pipe, alerts, &[]);
        self.queue.exec(&pipe).await?;
        self.store().await?.mark_pushed(alerts).await?;
        Ok(())
    }
}
