//! The consumer's alerting outside a batch's own steps (which are [`super::batch`]'s: rules,
//! their transitions, pushes): push again what a lane's former owner left unpushed; for the
//! holder of the critical lane, sweep for silent sensors; and, while the store is unreachable,
//! warn of critical alerts before they are stored.

use std::time::Instant;

use tracing::{info, warn};

use super::Consumer;
use crate::alerts::rules::Condition;
use crate::alerts::{Alert, AlertState, Severity};
use crate::event::Event;
use crate::lane::Lane;
use crate::metrics::METRICS;
use crate::seam::{Delivery, Unavailable};

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

    /// Between batches: push what lanes taken over left unpushed, and (the critical lane's
    /// holder) sweep for silent sensors.
    pub(super) async fn housekeeping(&mut self) -> Result<(), Unavailable> {
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
