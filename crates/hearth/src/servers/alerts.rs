//! Alerts and rule state in PostgreSQL: what the rules engine loads and writes, what the API
//! lists and acknowledges, and the offline sweep; [`PgAlerts`] is the alert store seam on them.

use std::collections::HashMap;
use std::sync::Arc;

use tokio_postgres::GenericClient;
use tokio_postgres::types::ToSql;

use super::pg::Writer;
use super::postgres::Db;
use super::postgres::classify;
use super::store::{Store, StoreError};
use crate::alerts::engine::{Outcome, SensorKey, State, Transition};
use crate::alerts::rules::RuleSet;
use crate::alerts::{Alert, AlertState, Severity};
use crate::lane::Lane;
use crate::seam::{AlertStore, Fence, Fut, WriteFut};

/// The columns of an alert, in the order [`alert`] reads them.
pub const ALERT_COLUMNS: &str =
    "id, house_id, sensor_id, rule, kind, severity, state, message, value,
    (extract(epoch FROM raised_at) * 1000)::int8, raised_by,
    (extract(epoch FROM acknowledged_at) * 1000)::int8, acknowledged_by,
    (extract(epoch FROM cleared_at) * 1000)::int8, cleared_by";

pub fn alert(row: &tokio_postgres::Row) -> Alert {
    Alert {
        id: row.get(0),
        house_id: row.get(1),
        sensor_id: row.get(2),
        rule: row.get(3),
        kind: row.get(4),
        severity: Severity::parse(row.get(5)).unwrap_or(Severity::Warning),
        state: AlertState::parse(row.get(6)).unwrap_or(AlertState::Active),
        message: row.get(7),
        value: row.get(8),
        raised_at: row.get(9),
        raised_by: row.get(10),
        acknowledged_at: row.get(11),
        acknowledged_by: row.get(12),
        cleared_at: row.get(13),
        cleared_by: row.get(14),
    }
}

/// The stored rule state of `sensors`: (sensor, rule, state), open alerts included.
pub async fn load_states(
    client: &impl GenericClient,
    sensors: &[SensorKey],
) -> Result<Vec<(SensorKey, String, State)>, StoreError> {
    let houses: Vec<&str> = sensors.iter().map(|(h, _)| h.as_str()).collect();
    let ids: Vec<&str> = sensors.iter().map(|(_, s)| s.as_str()).collect();
    let mut states: HashMap<(String, String, String), State> = HashMap::new();
    let rows = client
        .query(
            "SELECT r.house_id, r.sensor_id, r.rule,
                    (extract(epoch FROM r.pending_since) * 1000)::int8, r.transition_key
             FROM rule_state r JOIN unnest($1::text[], $2::text[]) AS x(h, s)
                  ON r.house_id = x.h AND r.sensor_id = x.s",
            &[&houses, &ids],
        )
        .await
        .map_err(classify)?;
    for r in rows {
        states.insert(
            (r.get(0), r.get(1), r.get(2)),
            State {
                pending_since: r.get(3),
                transition_key: r.get(4),
                open: None,
            },
        );
    }
    let rows = client
        .query(
            "SELECT a.house_id, a.sensor_id, a.rule, a.state
             FROM alerts a JOIN unnest($1::text[], $2::text[]) AS x(h, s)
                  ON a.house_id = x.h AND a.sensor_id = x.s
             WHERE a.state <> 'cleared'",
            &[&houses, &ids],
        )
        .await
        .map_err(classify)?;
    for r in rows {
        let st = states.entry((r.get(0), r.get(1), r.get(2))).or_default();
        st.open = AlertState::parse(r.get(3));
    }
    Ok(states
        .into_iter()
        .map(|((h, s, r), st)| ((h, s), r, st))
        .collect())
}

/// Lanes whose fence rows still hold the tokens (locked shared until the transaction ends).
const CHECK_FENCES: &str = "
SELECT f.lane FROM lane_fences f
JOIN unnest($1::text[], $2::int8[]) AS c(lane, token) ON f.lane = c.lane AND f.token = c.token
FOR SHARE OF f";

impl Store {
    /// Write an evaluation's transitions and changed states, in one transaction fenced like the
    /// batch it came from. Returns the alerts as they are after each transition that took effect.
    pub async fn write_outcome(
        &mut self,
        fences: &[(String, i64)],
        outcome: &Outcome,
        rules: &RuleSet,
        shards: u16,
    ) -> Result<Vec<Alert>, StoreError> {
        let tx = self.client.transaction().await.map_err(classify)?;
        let lanes: Vec<&str> = fences.iter().map(|(l, _)| l.as_str()).collect();
        let tokens: Vec<i64> = fences.iter().map(|(_, t)| *t).collect();
        let held = tx
            .query(CHECK_FENCES, &[&lanes, &tokens])
            .await
            .map_err(classify)?;
        if held.len() != fences.len() {
            let held: Vec<String> = held.iter().map(|r| r.get(0)).collect();
            return Err(StoreError::Fenced(
                lanes
                    .iter()
                    .filter(|l| !held.iter().any(|h| h == *l))
                    .map(|l| l.to_string())
                    .collect(),
            ));
        }
        let mut changed = Vec::new();
        for t in &outcome.transitions {
            let row = match t {
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
                    let lane = Lane::of(house_id, sensor_id, kind, shards).name();
                    let sql = format!(
                        "INSERT INTO alerts (house_id, sensor_id, lane, rule, kind, severity, state,
                                             message, value, raised_at, raised_by)
                         VALUES ($1, $2, $3, $4, $5, $6, 'active', $7, $8,
                                 timestamptz 'epoch' + $9::int8 * interval '1 millisecond', $10)
                         ON CONFLICT (house_id, sensor_id, rule) WHERE state <> 'cleared' DO NOTHING
                         RETURNING {ALERT_COLUMNS}"
                    );
                    let params: [&(dyn ToSql + Sync); 10] = [
                        house_id,
                        sensor_id,
                        &lane,
                        &r.name,
                        kind,
                        &r.severity.as_str(),
                        &r.message,
                        value,
                        ts_ms,
                        event_key,
                    ];
                    tx.query_opt(&sql, &params).await.map_err(classify)?
                }
                Transition::Clear {
                    rule,
                    house_id,
                    sensor_id,
                    ts_ms,
                    event_key,
                } => {
                    let sql = format!(
                        "UPDATE alerts SET state = 'cleared', updated_at = now(),
                                cleared_at = timestamptz 'epoch' + $4::int8 * interval '1 millisecond',
                                cleared_by = $5
                         WHERE house_id = $1 AND sensor_id = $2 AND rule = $3 AND state <> 'cleared'
                         RETURNING {ALERT_COLUMNS}"
                    );
                    let name = &rules.rules[*rule].name;
                    tx.query_opt(&sql, &[house_id, sensor_id, name, ts_ms, event_key])
                        .await
                        .map_err(classify)?
                }
            };
            changed.extend(row.as_ref().map(alert));
        }
        if !outcome.states.is_empty() {
            let houses: Vec<&str> = outcome
                .states
                .iter()
                .map(|((h, _), _, _)| h.as_str())
                .collect();
            let sensors: Vec<&str> = outcome
                .states
                .iter()
                .map(|((_, s), _, _)| s.as_str())
                .collect();
            let names: Vec<&str> = outcome
                .states
                .iter()
                .map(|(_, r, _)| rules.rules[*r].name.as_str())
                .collect();
            let pending: Vec<Option<i64>> = outcome
                .states
                .iter()
                .map(|(_, _, st)| st.pending_since)
                .collect();
            let keys: Vec<Option<&str>> = outcome
                .states
                .iter()
                .map(|(_, _, st)| st.transition_key.as_deref())
                .collect();
            tx.execute(
                "INSERT INTO rule_state (house_id, sensor_id, rule, pending_since, transition_key)
                 SELECT h, s, r, timestamptz 'epoch' + p * interval '1 millisecond', k
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[])
                      AS x(h, s, r, p, k)
                 ORDER BY h, s, r
                 ON CONFLICT (house_id, sensor_id, rule) DO UPDATE SET
                     pending_since = EXCLUDED.pending_since,
                     transition_key = EXCLUDED.transition_key, updated_at = now()",
                &[&houses, &sensors, &names, &pending, &keys],
            )
            .await
            .map_err(classify)?;
        }
        tx.commit().await.map_err(classify)?;
        Ok(changed)
    }

    /// Alerts of a lane whose last transition was not pushed yet.
    pub async fn unpushed(&self, lane: &str) -> Result<Vec<Alert>, StoreError> {
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT {ALERT_COLUMNS} FROM alerts
                     WHERE lane = $1 AND notified_state IS DISTINCT FROM state ORDER BY id"
                ),
                &[&lane],
            )
            .await
            .map_err(classify)?;
        Ok(rows.iter().map(alert).collect())
    }

    /// Declare offline the sensors silent for longer than the offline rule allows, and return
    /// the alerts raised.
    pub async fn sweep_offline(
        &self,
        rules: &RuleSet,
        shards: u16,
    ) -> Result<Vec<Alert>, StoreError> {
        let Some((rule, multiple, min_silence)) = rules.offline_silence() else {
            return Ok(Vec::new());
        };
        let silent = self
            .client
            .query(
                "SELECT s.sensor_id, s.house_id, (extract(epoch FROM s.last_seen) * 1000)::int8
                 FROM sensors s
                 WHERE s.interval_ms IS NOT NULL
                   AND s.last_seen < now() - greatest(s.interval_ms * $1, $2::float8) * interval '1 millisecond'
                   AND NOT EXISTS (SELECT 1 FROM alerts a
                                   WHERE a.house_id = s.house_id AND a.sensor_id = s.sensor_id
                                     AND a.rule = $3 AND a.state <> 'cleared')
                 LIMIT 1000",
                &[&multiple, &(min_silence.as_millis() as f64), &rule.name],
            )
            .await
            .map_err(classify)?;
        let mut raised = Vec::new();
        for row in silent {
            let (sensor, house, last_ms): (String, String, i64) =
                (row.get(0), row.get(1), row.get(2));
            let lane = Lane::of(&house, &sensor, "online", shards).name();
            let sql = format!(
                "INSERT INTO alerts (house_id, sensor_id, lane, rule, kind, severity, state, message,
                                     raised_at, raised_by)
                 VALUES ($1, $2, $3, $4, 'online', $5, 'active', $6, now(), $7)
                 ON CONFLICT (house_id, sensor_id, rule) WHERE state <> 'cleared' DO NOTHING
                 RETURNING {ALERT_COLUMNS}"
            );
            let by = format!("silence since {last_ms}");
            if let Some(row) = self
                .client
                .query_opt(
                    &sql,
                    &[
                        &house,
                        &sensor,
                        &lane,
                        &rule.name,
                        &rule.severity.as_str(),
                        &rule.message,
                        &by,
                    ],
                )
                .await
                .map_err(classify)?
            {
                raised.push(alert(&row));
            }
        }
        Ok(raised)
    }
}

pub async fn mark_pushed(client: &impl GenericClient, alerts: &[Alert]) -> Result<(), StoreError> {
    if alerts.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = alerts.iter().map(|a| a.id).collect();
    let states: Vec<&str> = alerts.iter().map(|a| a.state.as_str()).collect();
    client
        .execute(
            "UPDATE alerts a SET notified_state = x.s
             FROM unnest($1::int8[], $2::text[]) AS x(i, s)
             WHERE a.id = x.i AND a.state = x.s",
            &[&ids, &states],
        )
        .await
        .map_err(classify)?;
    Ok(())
}

/// Alerts, newest first.
pub async fn list(
    client: &impl GenericClient,
    house: Option<&str>,
    state: Option<AlertState>,
    limit: i64,
) -> Result<Vec<Alert>, StoreError> {
    let rows = client
        .query(
            &format!(
                "SELECT {ALERT_COLUMNS} FROM alerts
                 WHERE ($1::text IS NULL OR house_id = $1) AND ($2::text IS NULL OR state = $2)
                 ORDER BY id DESC LIMIT $3"
            ),
            &[&house, &state.map(AlertState::as_str), &limit],
        )
        .await
        .map_err(classify)?;
    Ok(rows.iter().map(alert).collect())
}

pub async fn get(client: &impl GenericClient, id: i64) -> Result<Option<Alert>, StoreError> {
    let row = client
        .query_opt(
            &format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE id = $1"),
            &[&id],
        )
        .await
        .map_err(classify)?;
    Ok(row.as_ref().map(alert))
}

/// Acknowledge an active alert. Returns the alert as it is after (unchanged if it was not
/// active), or `None` when there is no such alert.
pub async fn acknowledge(
    client: &impl GenericClient,
    id: i64,
    by: &str,
) -> Result<Option<(Alert, bool)>, StoreError> {
    let row = client
        .query_opt(
            &format!(
                "UPDATE alerts SET state = 'acknowledged', acknowledged_at = now(),
                        acknowledged_by = $2, updated_at = now()
                 WHERE id = $1 AND state = 'active'
                 RETURNING {ALERT_COLUMNS}"
            ),
            &[&id, &by],
        )
        .await
        .map_err(classify)?;
    match row {
        Some(row) => Ok(Some((alert(&row), true))),
        None => Ok(get(client, id).await?.map(|a| (a, false))),
    }
}

/// The alert store seam on PostgreSQL: the worker's calls on its consumer's [`Writer`] (fenced
/// transitions, rule state, pushes, the sweep), the API's on a shared connection.
pub struct PgAlerts {
    db: Arc<Db>,
    writer: Arc<Writer>,
    rules: Arc<RuleSet>,
    shards: u16,
}

impl PgAlerts {
    pub fn new(db: Arc<Db>, writer: Arc<Writer>, rules: Arc<RuleSet>, shards: u16) -> PgAlerts {
        PgAlerts {
            db,
            writer,
            rules,
            shards,
        }
    }

    /// An error of the writer's session: a server error drops it (the next call reconnects).
    async fn failed(&self, e: StoreError) -> StoreError {
        if matches!(e, StoreError::Unavailable(_)) {
            self.writer.reset().await;
        }
        e
    }
}

impl AlertStore for PgAlerts {
    fn load_states<'a>(
        &'a self,
        sensors: &'a [SensorKey],
    ) -> Fut<'a, Vec<(SensorKey, String, State)>> {
        Box::pin(async move {
            let store = self.writer.get().await?;
            match load_states(&store.client, sensors).await {
                Ok(states) => Ok(states),
                Err(e) => {
                    drop(store);
                    Err(self.failed(e).await.into())
                }
            }
        })
    }

    fn write_outcome<'a>(
        &'a self,
        fences: &'a [Fence],
        outcome: &'a Outcome,
    ) -> WriteFut<'a, Vec<Alert>> {
        Box::pin(async move {
            let fences: Vec<(String, i64)> = fences.iter().map(|(l, t)| (l.name(), *t)).collect();
            let mut store = self.writer.get().await?;
            match store
                .write_outcome(&fences, outcome, &self.rules, self.shards)
                .await
            {
                Ok(alerts) => Ok(alerts),
                Err(e) => {
                    drop(store);
                    Err(self.failed(e).await.into())
                }
            }
        })
    }

    fn unpushed(&self, lane: Lane) -> Fut<'_, Vec<Alert>> {
        Box::pin(async move {
            let store = self.writer.get().await?;
            match store.unpushed(&lane.name()).await {
                Ok(alerts) => Ok(alerts),
                Err(e) => {
                    drop(store);
                    Err(self.failed(e).await.into())
                }
            }
        })
    }

    fn mark_pushed<'a>(&'a self, alerts: &'a [Alert]) -> Fut<'a, ()> {
        Box::pin(async move {
            let store = self.writer.get().await?;
            match mark_pushed(&store.client, alerts).await {
                Ok(()) => Ok(()),
                Err(e) => {
                    drop(store);
                    Err(self.failed(e).await.into())
                }
            }
        })
    }

    fn sweep_offline(&self) -> Fut<'_, Vec<Alert>> {
        Box::pin(async move {
            let store = self.writer.get().await?;
            match store.sweep_offline(&self.rules, self.shards).await {
                Ok(alerts) => Ok(alerts),
                Err(e) => {
                    drop(store);
                    Err(self.failed(e).await.into())
                }
            }
        })
    }

    fn list<'a>(
        &'a self,
        house: Option<&'a str>,
        state: Option<AlertState>,
        limit: i64,
    ) -> Fut<'a, Vec<Alert>> {
        Box::pin(async move {
            let client = self.db.client().await?;
            Ok(list(&*client, house, state, limit).await?)
        })
    }

    fn get(&self, id: i64) -> Fut<'_, Option<Alert>> {
        Box::pin(async move {
            let client = self.db.client().await?;
            Ok(get(&*client, id).await?)
        })
    }

    fn acknowledge<'a>(&'a self, id: i64, by: &'a str) -> Fut<'a, Option<(Alert, bool)>> {
        Box::pin(async move {
            let client = self.db.client().await?;
            Ok(acknowledge(&*client, id, by).await?)
        })
    }
}
