//! The consumer's part in alerting: evaluate the rules on each stored batch and write the
//! transitions (fenced like the batch), push them, and mark them pushed; push again what a
//! lane's former owner left unpushed; for the holder of the critical lane, sweep for silent
//! sensors; and, while the store is unreachable, warn of critical alerts before they are stored.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::Consumer;
use crate::alerts::rules::Condition;
use crate::alerts::{Alert, AlertState, Severity};
use crate::backoff::Backoff;
use crate::event::Event;
use crate::lane::Lane;
use crate::metrics::METRICS;
use crate::seam::{Delivery, Unavailable, WriteError};

/// How often the set of watched houses is read again: a new WebSocket subscription gets events
/// within about this long.
const WATCHED_REFRESH: Duration = Duration::from_millis(500);

impl Consumer {
    /// While the store is unreachable the critical lane still warns: the alerts that critical
    /// boolean rules (smoke, CO, gas, water leak, alarms) raise on these entries' events are
    /// pushed at once, with id 0 ("not stored yet"), and their latest values cached. The entries
    /// stay pending; once stored, the rules run as usual and the stored alert is pushed again
    /// with its id (the same `raised_by`, so a client can tell it is the same alert). Each entry
    /// is pushed provisionally once.
    pub(super) async fn push_provisional(&mut self, entries: &[Delivery]) {
        let fresh: Vec<&Delivery> = entries
            .iter()
            .filter(|e| e.lane == Lane::Critical && !self.provisional.contains(&e.id))
            .collect();
        if fresh.is_empty() {
            return;
        }
        let events: Vec<&Event> = fresh.iter().flat_map(|e| &e.events).collect();
        let rules = self.engine.rules.clone();
        let alerts: Vec<Alert> = events
            .iter()
            .filter(|e| e.value == 1.0)
            .flat_map(|e| {
                rules
                    .rules
                    .iter()
                    .filter(|r| {
                        r.condition == Condition::Boolean
                            && r.severity == Severity::Critical
                            && r.kinds.contains(&e.kind)
                    })
                    .map(move |r| Alert {
                        id: 0,
                        house_id: e.house_id.clone(),
                        sensor_id: e.sensor_id.clone(),
                        rule: r.name.clone(),
                        kind: e.kind.clone(),
                        severity: r.severity,
                        state: AlertState::Active,
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
        let result = async {
            self.cache.offer(&events).await?;
            self.fanout.push_alerts(&alerts).await
        }
        .await;
        match result {
            Ok(()) => {
                self.provisional.extend(fresh.iter().map(|e| e.id.clone()));
                if !alerts.is_empty() {
                    warn!(consumer = %self.name, alerts = alerts.len(), "store unreachable: critical alerts pushed before they are stored");
                }
            }
            Err(e) => warn!(consumer = %self.name, error = %e, "could not push provisional alerts"),
        }
    }

    /// Evaluate the rules on stored `events` (of `lanes`) and write what changed. `None` on
    /// shutdown or when a lane was lost meanwhile (the lane's next owner evaluates the batch
    /// again).
    pub(super) async fn evaluate_rules(
        &mut self,
        events: &[&Event],
        lanes: &[Lane],
    ) -> Option<Vec<Alert>> {
        let mut backoff = Backoff::default();
        loop {
            let result: Result<Vec<Alert>, WriteError> = async {
                let to_load = self.engine.to_load(events);
                if !to_load.is_empty() {
                    let states = self.parts.alerts.load_states(&to_load).await?;
                    self.engine.load(&to_load, states);
                }
                let outcome = self.engine.evaluate(events);
                let alerts = if outcome.is_empty() {
                    Vec::new()
                } else {
                    let fences: Vec<crate::seam::Fence> = self
                        .parts
                        .ownership
                        .held()
                        .into_iter()
                        .filter(|(l, _)| lanes.contains(l))
                        .collect();
                    let mut wanted: Vec<Lane> = lanes.to_vec();
                    wanted.sort();
                    wanted.dedup();
                    if fences.len() != wanted.len() {
                        return Err(WriteError::Fenced(Vec::new()));
                    }
                    self.parts.alerts.write_outcome(&fences, &outcome).await?
                };
                self.engine.commit(outcome, events);
                Ok(alerts)
            }
            .await;
            match result {
                Ok(alerts) => {
                    for a in &alerts {
                        if a.state == AlertState::Active {
                            METRICS.alerts.with(a.severity.as_str()).add(1);
                        }
                        info!(alert = a.id, rule = %a.rule, sensor = %a.sensor_id, state = a.state.as_str(), "alert");
                    }
                    return Some(alerts);
                }
                Err(WriteError::Fenced(lost)) => {
                    warn!(consumer = %self.name, lanes = ?lost, "fenced out while writing alerts");
                    self.parts.ownership.lost(&lost);
                    self.engine.forget();
                    return None;
                }
                Err(e) => {
                    if let WriteError::Unavailable(u) = &e {
                        crate::metrics::dependency_error(super::dependency(u));
                    }
                    warn!(consumer = %self.name, error = %e, "writing alerts failed, retrying");
                    self.engine.forget();
                    if !self.shutdown.clone().sleep(backoff.next_delay()).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Push `alerts`, and the events of watched houses.
    pub(super) async fn push(
        &self,
        alerts: &[Alert],
        events: &[&Event],
    ) -> Result<(), Unavailable> {
        if !alerts.is_empty() {
            self.fanout.push_alerts(alerts).await?;
        }
        let watched = &self.watched.1;
        if watched.is_empty() || events.is_empty() {
            return Ok(());
        }
        let all = watched.contains("*");
        let messages = crate::alerts::event_messages(events, |h| all || watched.contains(h));
        if messages.is_empty() {
            return Ok(());
        }
        self.fanout.publish(&messages).await
    }

    /// Note that `alerts` were pushed (best effort: if this fails, the lane's next owner pushes
    /// them again, and a client sees the same alert twice).
    pub(super) async fn pushed(&mut self, alerts: &[Alert]) {
        if alerts.is_empty() {
            return;
        }
        if let Err(e) = self.parts.alerts.mark_pushed(alerts).await {
            warn!(consumer = %self.name, error = %e, "could not mark alerts pushed");
        }
    }

    /// Between batches: refresh the watched houses, push what lanes taken over left unpushed,
    /// and (the critical lane's holder) sweep for silent sensors.
    pub(super) async fn housekeeping(&mut self) -> Result<(), Unavailable> {
        if self.watched.0.elapsed() >= WATCHED_REFRESH {
            let houses = self.fanout.watched().await?;
            self.watched = (Instant::now(), houses);
        }
        // Both below need the store: while its circuit is open they wait, and reading goes on
        // (the critical lane still pushes its alerts, see `push_provisional`).
        if self.parts.store.is_paused() {
            return Ok(());
        }
        let held = self.parts.ownership.held();
        while let Some(lane) = self.repush.first().copied() {
            if held.iter().any(|(l, _)| *l == lane) {
                let alerts = self.parts.alerts.unpushed(lane).await?;
                self.publish(&alerts).await?;
            }
            self.repush.remove(&lane);
        }
        if held.iter().any(|(l, _)| *l == Lane::Critical) && Instant::now() >= self.next_sweep {
            self.next_sweep = Instant::now() + self.engine.rules.sweep_period();
            let alerts = self.parts.alerts.sweep_offline().await?;
            for a in &alerts {
                METRICS.alerts.with(a.severity.as_str()).add(1);
                info!(alert = a.id, sensor = %a.sensor_id, "sensor offline");
            }
            self.publish(&alerts).await?;
        }
        Ok(())
    }

    /// Push alerts outside a batch (takeover, sweep), then mark them pushed.
    async fn publish(&mut self, alerts: &[Alert]) -> Result<(), Unavailable> {
        if alerts.is_empty() {
            return Ok(());
        }
        self.fanout.push_alerts(alerts).await?;
        self.parts.alerts.mark_pushed(alerts).await
    }
}
