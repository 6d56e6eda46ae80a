//! Alerts and rule state in SQLite: what the rules engine loads and writes, what the API lists
//! and acknowledges, the offline sweep, and the webhook notifications written with each
//! transition (in its transaction) for the notifier ([`super::notifier`]).

use std::collections::HashMap;
use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::db::Sqlite;
use crate::alerts::engine::{Outcome, SensorKey, State, Transition};
use crate::alerts::rules::RuleSet;
use crate::alerts::{Alert, AlertState, Severity};
use crate::lane::Lane;
use crate::seam::{AlertStore, Fence, Fut, WriteFut};

pub struct SqliteAlerts {
    writer: Sqlite,
    reader: Sqlite,
    rules: Arc<RuleSet>,
    shards: u16,
    /// Severities some webhook takes: their transitions get a notification job.
    webhook_severities: Vec<Severity>,
    /// Woken when notification jobs were written.
    pub jobs: Arc<tokio::sync::Notify>,
}

const ALERT_COLUMNS: &str = "id, house_id, sensor_id, rule, kind, severity, state, message, value,
    raised_at, raised_by, acknowledged_at, acknowledged_by, cleared_at, cleared_by";

fn alert(r: &Row) -> rusqlite::Result<Alert> {
    let severity: String = r.get(5)?;
    let state: String = r.get(6)?;
    Ok(Alert {
        id: r.get(0)?,
        house_id: r.get(1)?,
        sensor_id: r.get(2)?,
        rule: r.get(3)?,
        kind: r.get(4)?,
        severity: Severity::parse(&severity).unwrap_or(Severity::Info),
        state: AlertState::parse(&state).unwrap_or(AlertState::Active),
        message: r.get(7)?,
        value: r.get(8)?,
        raised_at: r.get(9)?,
        raised_by: r.get(10)?,
        acknowledged_at: r.get(11)?,
        acknowledged_by: r.get(12)?,
        cleared_at: r.get(13)?,
        cleared_by: r.get(14)?,
    })
}

fn get_alert(c: &Connection, id: i64) -> rusqlite::Result<Option<Alert>> {
    c.prepare_cached(&format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE id = ?1"))?
        .query_row([id], alert)
        .optional()
}

/// Queue a webhook notification for each transition a webhook takes, in the caller's
/// transaction (so a transition is never written without its notification).
fn queue_notifications(
    c: &Connection,
    hooked: &[Severity],
    alerts: &[Alert],
) -> rusqlite::Result<()> {
    for a in alerts.iter().filter(|a| hooked.contains(&a.severity)) {
        if let Ok(json) = serde_json::to_string(a) {
            c.prepare_cached("INSERT INTO notify (alert) VALUES (?1)")?
                .execute([json])?;
        }
    }
    Ok(())
}

impl SqliteAlerts {
    pub fn new(writer: Sqlite, reader: Sqlite, rules: Arc<RuleSet>, shards: u16) -> SqliteAlerts {
        SqliteAlerts {
            writer,
            reader,
            webhook_severities: rules
                .webhooks
                .iter()
                .flat_map(|w| w.severities.iter().copied())
                .collect(),
            rules,
            shards,
            jobs: Default::default(),
        }
    }

    /// Up to `limit` webhook notifications to deliver, oldest first: (id, alert JSON).
    pub async fn notifications(
        &self,
        limit: i64,
    ) -> Result<Vec<(i64, String)>, crate::seam::Unavailable> {
        self.writer
            .call(move |c| {
                let mut st =
                    c.prepare_cached("SELECT id, alert FROM notify ORDER BY id LIMIT ?1")?;
                let rows = st.query_map([limit], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect()
            })
            .await
    }

    /// A notification is done: remove it, keeping the dead letters of what failed.
    pub async fn notified(
        &self,
        id: i64,
        failed: Vec<crate::dead_letter::DeadLetter>,
    ) -> Result<(), crate::seam::Unavailable> {
        self.writer
            .call(move |c| {
                let tx = c.transaction()?;
                super::queue::insert(&tx, &Vec::new(), &failed)?;
                tx.execute("DELETE FROM notify WHERE id = ?1", [id])?;
                tx.commit()
            })
            .await
    }
}

impl AlertStore for SqliteAlerts {
    fn load_states<'a>(
        &'a self,
        sensors: &'a [SensorKey],
    ) -> Fut<'a, Vec<(SensorKey, String, State)>> {
        let sensors = sensors.to_vec();
        Box::pin(async move {
            self.writer
                .call(move |c| {
                    let mut states: HashMap<(SensorKey, String), State> = HashMap::new();
                    let mut st = c.prepare_cached(
                        "SELECT rule, pending_since, transition_key FROM rule_state
                     WHERE house_id = ?1 AND sensor_id = ?2",
                    )?;
                    let mut open = c.prepare_cached(
                        "SELECT rule, state FROM alerts
                     WHERE house_id = ?1 AND sensor_id = ?2 AND state <> 'cleared'",
                    )?;
                    for key in &sensors {
                        let rows = st.query_map([&key.0, &key.1], |r| {
                            Ok((
                                r.get::<_, String>(0)?,
                                r.get::<_, Option<i64>>(1)?,
                                r.get::<_, Option<String>>(2)?,
                            ))
                        })?;
                        for row in rows {
                            let (rule, pending_since, transition_key) = row?;
                            let entry = states.entry((key.clone(), rule)).or_default();
                            entry.pending_since = pending_since;
                            entry.transition_key = transition_key;
                        }
                        let rows = open.query_map([&key.0, &key.1], |r| {
                            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                        })?;
                        for row in rows {
                            let (rule, state) = row?;
                            states.entry((key.clone(), rule)).or_default().open =
                                AlertState::parse(&state);
                        }
                    }
                    Ok(states.into_iter().map(|((s, r), st)| (s, r, st)).collect())
                })
                .await
        })
    }

    /// Write an evaluation's transitions and changed states in one transaction; returns the
    /// alerts as they are after each transition that took effect.
    fn write_outcome<'a>(
        &'a self,
        _fences: &'a [Fence],
        outcome: &'a Outcome,
    ) -> WriteFut<'a, Vec<Alert>> {
        let rules = self.rules.clone();
        Box::pin(async move {
            let transitions = outcome.transitions.clone();
            let states = outcome.states.clone();
            let hooked = self.webhook_severities.clone();
            let changed = self
            .writer
            .call(move |c| {
                let tx = c.transaction()?;
                let mut changed = Vec::new();
                for t in &transitions {
                    let id: Option<i64> = match t {
                        Transition::Raise {
                            rule,
                            house_id,
                            sensor_id,
                            kind,
                            value,
                            ts_ms,
                            event_key,
                        } => {
                            let r = &rules.rules[*rule];
                            tx.prepare_cached(
                                "INSERT INTO alerts (house_id, sensor_id, rule, kind, severity, state,
                                                     message, value, raised_at, raised_by)
                                 VALUES (?1, ?2, ?3, ?4, ?5, 'active', ?6, ?7, ?8, ?9)
                                 ON CONFLICT (house_id, sensor_id, rule) WHERE state <> 'cleared'
                                 DO NOTHING
                                 RETURNING id",
                            )?
                            .query_row(
                                params![
                                    house_id,
                                    sensor_id,
                                    r.name,
                                    kind,
                                    r.severity.as_str(),
                                    r.message,
                                    value,
                                    ts_ms,
                                    event_key
                                ],
                                |r| r.get(0),
                            )
                            .optional()?
                        }
                        Transition::Clear {
                            rule,
                            house_id,
                            sensor_id,
                            ts_ms,
                            event_key,
                        } => tx
                            .prepare_cached(
                                "UPDATE alerts SET state = 'cleared', cleared_at = ?4, cleared_by = ?5
                                 WHERE house_id = ?1 AND sensor_id = ?2 AND rule = ?3
                                   AND state <> 'cleared'
                                 RETURNING id",
                            )?
                            .query_row(
                                params![house_id, sensor_id, rules.rules[*rule].name, ts_ms, event_key],
                                |r| r.get(0),
                            )
                            .optional()?,
                    };
                    if let Some(id) = id {
                        changed.extend(get_alert(&tx, id)?);
                    }
                }
                let mut upsert = tx.prepare_cached(
                    "INSERT INTO rule_state (house_id, sensor_id, rule, pending_since, transition_key)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (house_id, sensor_id, rule) DO UPDATE SET
                         pending_since = excluded.pending_since,
                         transition_key = excluded.transition_key",
                )?;
                for ((house, sensor), rule, st) in &states {
                    upsert.execute(params![
                        house,
                        sensor,
                        rules.rules[*rule].name,
                        st.pending_since,
                        st.transition_key
                    ])?;
                }
                drop(upsert);
                queue_notifications(&tx, &hooked, &changed)?;
                tx.commit()?;
                Ok(changed)
            })
            .await?;
            self.jobs.notify_waiters();
            Ok(changed)
        })
    }

    fn unpushed(&self, lane: Lane) -> Fut<'_, Vec<Alert>> {
        let shards = self.shards;
        Box::pin(async move {
            self.writer
                .call(move |c| {
                    let mut st = c.prepare_cached(&format!(
                        "SELECT {ALERT_COLUMNS} FROM alerts
                         WHERE notified_state IS NOT state ORDER BY id"
                    ))?;
                    let rows = st.query_map([], alert)?;
                    let all: Vec<Alert> = rows.collect::<rusqlite::Result<_>>()?;
                    Ok(all
                        .into_iter()
                        .filter(|a| Lane::of(&a.house_id, &a.sensor_id, &a.kind, shards) == lane)
                        .collect())
                })
                .await
        })
    }

    fn mark_pushed<'a>(&'a self, alerts: &'a [Alert]) -> Fut<'a, ()> {
        let pushed: Vec<(i64, &'static str)> =
            alerts.iter().map(|a| (a.id, a.state.as_str())).collect();
        Box::pin(async move {
            if pushed.is_empty() {
                return Ok(());
            }
            self.writer
                .call(move |c| {
                    let tx = c.transaction()?;
                    {
                        let mut st = tx.prepare_cached(
                            "UPDATE alerts SET notified_state = ?2 WHERE id = ?1 AND state = ?2",
                        )?;
                        for (id, state) in &pushed {
                            st.execute(params![id, state])?;
                        }
                    }
                    tx.commit()
                })
                .await
        })
    }

    /// Declare offline the sensors silent for longer than the offline rule allows (`multiple` ×
    /// their usual interval, at least `min_silence`), as the PostgreSQL store does; returns the
    /// alerts raised.
    fn sweep_offline(&self) -> Fut<'_, Vec<Alert>> {
        let rules = self.rules.clone();
        Box::pin(async move {
            let Some((rule, multiple, min_silence)) = rules.offline_silence() else {
                return Ok(Vec::new());
            };
            let (name, severity, message) = (
                rule.name.clone(),
                rule.severity.as_str(),
                rule.message.clone(),
            );
            let min_silence_ms = min_silence.as_millis() as f64;
            let hooked = self.webhook_severities.clone();
            let raised = self
            .writer
            .call(move |c| {
                let c = c.transaction()?;
                let now_ms = crate::event::now_us() / 1000;
                let silent: Vec<(String, String, i64)> = {
                    let mut st = c.prepare_cached(
                        "SELECT s.sensor_id, s.house_id, s.last_seen FROM sensors s
                         WHERE s.interval_ms IS NOT NULL
                           AND s.last_seen < ?1 - max(s.interval_ms * ?2, ?3)
                           AND NOT EXISTS (SELECT 1 FROM alerts a
                                           WHERE a.house_id = s.house_id AND a.sensor_id = s.sensor_id
                                             AND a.rule = ?4 AND a.state <> 'cleared')
                         LIMIT 1000",
                    )?;
                    let rows = st
                        .query_map(params![now_ms, multiple, min_silence_ms, name], |r| {
                            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                        })?;
                    rows.collect::<rusqlite::Result<_>>()?
                };
                let mut raised = Vec::new();
                for (sensor, house, last_ms) in silent {
                    let id: Option<i64> = c
                        .prepare_cached(
                            "INSERT INTO alerts (house_id, sensor_id, rule, kind, severity, state,
                                                 message, raised_at, raised_by)
                             VALUES (?1, ?2, ?3, 'online', ?4, 'active', ?5, ?6, ?7)
                             ON CONFLICT (house_id, sensor_id, rule) WHERE state <> 'cleared'
                             DO NOTHING
                             RETURNING id",
                        )?
                        .query_row(
                            params![
                                house,
                                sensor,
                                name,
                                severity,
                                message,
                                now_ms,
                                format!("silence since {last_ms}")
                            ],
                            |r| r.get(0),
                        )
                        .optional()?;
                    if let Some(id) = id {
                        raised.extend(get_alert(&c, id)?);
                    }
                }
                queue_notifications(&c, &hooked, &raised)?;
                c.commit()?;
                Ok(raised)
            })
            .await?;
            self.jobs.notify_waiters();
            Ok(raised)
        })
    }

    fn list<'a>(
        &'a self,
        house: Option<&'a str>,
        state: Option<AlertState>,
        limit: i64,
    ) -> Fut<'a, Vec<Alert>> {
        let house = house.map(str::to_string);
        let state = state.map(|s| s.as_str());
        Box::pin(async move {
            self.reader
                .call(move |c| {
                    let mut st = c.prepare_cached(&format!(
                        "SELECT {ALERT_COLUMNS} FROM alerts
                         WHERE (?1 IS NULL OR house_id = ?1) AND (?2 IS NULL OR state = ?2)
                         ORDER BY id DESC LIMIT ?3"
                    ))?;
                    let rows = st.query_map(params![house, state, limit], alert)?;
                    rows.collect()
                })
                .await
        })
    }

    fn get(&self, id: i64) -> Fut<'_, Option<Alert>> {
        Box::pin(async move { self.reader.call(move |c| get_alert(c, id)).await })
    }

    fn acknowledge<'a>(&'a self, id: i64, by: &'a str) -> Fut<'a, Option<(Alert, bool)>> {
        let by = by.to_string();
        let hooked = self.webhook_severities.clone();
        Box::pin(async move {
            let acked = self
                .writer
                .call(move |c| {
                    let tx = c.transaction()?;
                    let now_ms = crate::event::now_us() / 1000;
                    let changed = tx.execute(
                        "UPDATE alerts SET state = 'acknowledged', acknowledged_at = ?2,
                             acknowledged_by = ?3
                         WHERE id = ?1 AND state = 'active'",
                        params![id, now_ms, by],
                    )? == 1;
                    let alert = get_alert(&tx, id)?;
                    if let (Some(a), true) = (&alert, changed) {
                        queue_notifications(&tx, &hooked, std::slice::from_ref(a))?;
                    }
                    tx.commit()?;
                    Ok(alert.map(|a| (a, changed)))
                })
                .await?;
            self.jobs.notify_waiters();
            Ok(acked)
        })
    }
}
