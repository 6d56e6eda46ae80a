//! The store seam on PostgreSQL: events, sensors, houses and tokens. A worker's consumer has a
//! [`PgStore`] of its own (its writer connection, shared with its alerts and its fences, and
//! its memory of the sensors it recorded); the process has one whose writer owns no lanes (the
//! API's writes, and the rollups' fold every second: `servers/rollups.rs`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{MappedMutexGuard, MutexGuard};

use super::postgres::{Db, connect};
use super::store::{Batch, Store, StoreError, describe};
use crate::caps::Caps;
use crate::config::Config;
use crate::event::Event;
use crate::keep::Keep;
use crate::lane::Lane;
use crate::seam::{
    EventStore, Fence, Fut, HistoryEvent, HistoryQuery, HouseView, SensorRow, TokenInfo,
    Unavailable, WriteError, WriteFut, Written,
};
use crate::sensors::SensorMemo;
use crate::series::{Point, SeriesQuery};

pub(super) fn pg(e: tokio_postgres::Error) -> Unavailable {
    Unavailable(format!("database: {}", describe(&e)))
}

impl From<StoreError> for WriteError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Content(e) => WriteError::Content(describe(&e)),
            StoreError::Fenced(names) => {
                WriteError::Fenced(names.iter().filter_map(|n| Lane::parse(n)).collect())
            }
            StoreError::CircuitOpen => WriteError::CircuitOpen,
            other => WriteError::Unavailable(other.into()),
        }
    }
}

/// One PostgreSQL session for writes, opened on first use and again after it broke: a
/// consumer's events, alert transitions and fencing tokens go through it.
pub struct Writer {
    url: String,
    /// `idle_in_transaction_session_timeout`: below the lease time, so that a transaction of
    /// a paused process does not block the lane's next owner for longer than it takes to notice.
    idle: Duration,
    slot: tokio::sync::Mutex<Option<Store>>,
}

impl Writer {
    pub fn new(url: &str, idle: Duration) -> Writer {
        Writer {
            url: url.to_string(),
            idle,
            slot: tokio::sync::Mutex::new(None),
        }
    }

    pub async fn get(&self) -> Result<MappedMutexGuard<'_, Store>, StoreError> {
        let mut slot = self.slot.lock().await;
        if slot.as_ref().is_none_or(Store::is_closed) {
            *slot = Some(Store::connect(&self.url, self.idle).await?);
        }
        Ok(MutexGuard::map(slot, |s| s.as_mut().expect("just set")))
    }

    /// Drop the session after an error of the server: the next call opens a new one.
    pub async fn reset(&self) {
        *self.slot.lock().await = None;
    }
}

/// Events, sensors, houses and tokens in PostgreSQL: reads on a shared connection, writes on
/// the [`Writer`].
pub struct PgStore {
    url: String,
    db: Arc<Db>,
    writer: Arc<Writer>,
    caps: Caps,
    keep: Keep,
    /// `dedup_window_hours`, in microseconds.
    window_us: i64,
    memo: Mutex<SensorMemo>,
    /// A write slower than this counts against PostgreSQL's circuit breaker.
    slow: Duration,
    /// When this process last vacuumed the rollups' deltas.
    vacuumed: Mutex<Instant>,
    /// Who this store is to the rollup folder's lease ([`super::rollups::is_folder`]).
    folder: String,
}

impl PgStore {
    pub fn new(config: &Config, writer: Arc<Writer>, db: Arc<Db>) -> PgStore {
        PgStore {
            url: config.database_url.clone(),
            db,
            writer,
            caps: Caps::from_config(config),
            keep: Keep::from_config(config),
            window_us: i64::from(config.dedup_window_hours) * 3_600_000_000,
            memo: Mutex::new(SensorMemo::new(config.sensor_touch_interval_ms)),
            slow: Duration::from_millis(config.store_slow_ms),
            vacuumed: Mutex::new(Instant::now()),
            folder: uuid::Uuid::new_v4().to_string(),
        }
    }

    fn memo(&self) -> std::sync::MutexGuard<'_, SensorMemo> {
        self.memo.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Write within the caps: only sensors or kinds this writer has not recorded can pass one,
    /// so the store is asked about them alone (none, once a sensor's kinds are known).
    async fn write_rows(
        &self,
        fences: &[Fence],
        events: &[&Event],
        redelivered: bool,
    ) -> Result<Written, StoreError> {
        let unknown = self.memo().unknown(events);
        let mut store = self.writer.get().await?;
        let capped = if unknown.is_empty() {
            Vec::new()
        } else {
            store.admit(&unknown, events, &self.caps).await?
        };
        let kept: Vec<&Event> = events
            .iter()
            .enumerate()
            .filter(|(i, _)| !capped.iter().any(|(c, _)| c == i))
            .map(|(_, e)| *e)
            .collect();
        let seen = self.memo().to_record(&kept);
        let fences: Vec<(String, i64)> = fences.iter().map(|(l, t)| (l.name(), *t)).collect();
        let batch = Batch {
            fences: &fences,
            events: &kept,
            sensors: &seen,
            keep: &self.keep,
            window_us: self.window_us,
        };
        let stored = store.write(batch, redelivered).await?;
        drop(store);
        let mut memo = self.memo();
        memo.recorded(seen);
        memo.observe(&kept);
        Ok(Written {
            stored,
            duplicates: kept.len() as u64 - stored,
            capped,
        })
    }
}

const SENSOR_COLUMNS: &str =
    "sensor_id, house_id, kinds, (extract(epoch FROM first_seen) * 1000)::int8,
    (extract(epoch FROM last_seen) * 1000)::int8";

fn sensor_row(r: &tokio_postgres::Row) -> SensorRow {
    SensorRow {
        sensor_id: r.get(0),
        house_id: r.get(1),
        kinds: r.get(2),
        first_seen: r.get(3),
        last_seen: r.get(4),
    }
}

impl EventStore for PgStore {
    /// Through PostgreSQL's circuit breaker: refused at once while it is open; an unreachable
    /// store, or a call slower than `store_slow_ms`, counts against it (a drowning database
    /// gets room, routine entries waiting in the queue, instead of more load).
    fn write<'a>(
        &'a self,
        fences: &'a [Fence],
        events: &'a [&'a Event],
        redelivered: bool,
    ) -> WriteFut<'a, Written> {
        Box::pin(async move {
            let breaker = &crate::breaker::POSTGRES;
            if !breaker.allow() {
                return Err(WriteError::CircuitOpen);
            }
            let started = Instant::now();
            let result = self.write_rows(fences, events, redelivered).await;
            let slow = started.elapsed() > self.slow;
            match &result {
                Err(StoreError::Unavailable(_)) => {
                    breaker.failure();
                    self.writer.reset().await;
                }
                _ if slow => breaker.failure(),
                _ => breaker.success(),
            }
            Ok(result?)
        })
    }

    fn is_paused(&self) -> bool {
        crate::breaker::POSTGRES.is_open()
    }

    fn houses<'a>(&'a self, only: Option<&'a str>) -> Fut<'a, Vec<HouseView>> {
        Box::pin(async move {
            let client = self.db.client().await?;
            let rows = client
                .query(
                    "SELECT house_id, count(*) FROM sensors
                     WHERE $1::text IS NULL OR house_id = $1
                     GROUP BY house_id ORDER BY house_id",
                    &[&only],
                )
                .await
                .map_err(pg)?;
            Ok(rows
                .iter()
                .map(|r| HouseView {
                    house_id: r.get(0),
                    sensors: r.get(1),
                })
                .collect())
        })
    }

    fn sensors<'a>(&'a self, house: &'a str) -> Fut<'a, Vec<SensorRow>> {
        Box::pin(async move {
            let client = self.db.client().await?;
            let rows = client
                .query(
                    &format!(
                        "SELECT {SENSOR_COLUMNS} FROM sensors WHERE house_id = $1
                         ORDER BY sensor_id LIMIT 10000"
                    ),
                    &[&house],
                )
                .await
                .map_err(pg)?;
            Ok(rows.iter().map(sensor_row).collect())
        })
    }

    fn sensor<'a>(&'a self, house: &'a str, sensor: &'a str) -> Fut<'a, Option<SensorRow>> {
        Box::pin(async move {
            let client = self.db.client().await?;
            Ok(client
                .query_opt(
                    &format!(
                        "SELECT {SENSOR_COLUMNS} FROM sensors WHERE house_id = $1 AND sensor_id = $2"
                    ),
                    &[&house, &sensor],
                )
                .await
                .map_err(pg)?
                .as_ref()
                .map(sensor_row))
        })
    }

    fn series<'a>(&'a self, q: &'a SeriesQuery) -> Fut<'a, Vec<Point>> {
        Box::pin(async move {
            let client = self.db.client().await?;
            let q = self.keep.unexpired(q, crate::event::now_us());
            super::rollups::series(&client, &q).await.map_err(pg)
        })
    }

    /// By the holder of the folder's lease only ([`super::rollups::is_folder`]);
    /// a chunk at a time, the writer's session released in between (the API's alert writes
    /// share it); the deltas' table vacuumed every [`super::rollups::VACUUM_EVERY`].
    fn fold_rollups(&self) -> Fut<'_, u64> {
        Box::pin(async move {
            let mut readings = 0;
            let cutoff = self.keep.minute_rollup_cutoff_ms(crate::event::now_us());
            {
                let store = self.writer.get().await?;
                if !super::rollups::is_folder(&store.client, &self.folder)
                    .await
                    .map_err(pg)?
                {
                    return Ok(0);
                }
            }
            loop {
                let store = self.writer.get().await?;
                let (n, more) = super::rollups::fold_chunk(&store.client, cutoff)
                    .await
                    .map_err(pg)?;
                readings += n;
                if !more {
                    break;
                }
            }
            let due = {
                let mut last = self.vacuumed.lock().unwrap_or_else(|p| p.into_inner());
                let due = last.elapsed() >= super::rollups::VACUUM_EVERY;
                if due {
                    *last = Instant::now();
                }
                due
            };
            if due {
                let store = self.writer.get().await?;
                if let Err(e) = super::rollups::vacuum(&store.client).await {
                    tracing::debug!(error = %describe(&e), "rollup deltas: vacuum skipped");
                }
            }
            Ok(readings)
        })
    }

    fn history<'a>(&'a self, q: &'a HistoryQuery) -> Fut<'a, Vec<HistoryEvent>> {
        Box::pin(async move {
            let client = self.db.client().await?;
            let rows = client
                .query(
                    "SELECT id, kind, value, unit, seq, (extract(epoch FROM ts) * 1000)::int8 AS ms,
                            source_unit
                     FROM events
                     WHERE house_id = $8 AND sensor_id = $1
                       AND ($2::text IS NULL OR kind = $2)
                       AND ($3::int8 IS NULL OR ts >= timestamptz 'epoch' + $3 * interval '1 millisecond')
                       AND ($4::int8 IS NULL OR ts < timestamptz 'epoch' + $4 * interval '1 millisecond')
                       AND ($5::int8 IS NULL OR (ts, id) < (timestamptz 'epoch' + $5 * interval '1 millisecond', $6))
                     ORDER BY ts DESC, id DESC
                     LIMIT $7",
                    &[
                        &q.sensor,
                        &q.kind,
                        &q.from,
                        &q.to,
                        &q.cursor.map(|c| c.0),
                        &q.cursor.map(|c| c.1).unwrap_or(0),
                        &q.limit,
                        &q.house,
                    ],
                )
                .await
                .map_err(pg)?;
            Ok(rows
                .iter()
                .map(|r| HistoryEvent {
                    id: r.get(0),
                    unit: crate::kinds::unit_or_canonical(r.get(1), r.get(3)),
                    kind: r.get(1),
                    value: r.get(2),
                    seq: r.get(4),
                    ts: r.get(5),
                    source_unit: r.get(6),
                })
                .collect())
        })
    }

    fn token_house<'a>(&'a self, hash: &'a [u8]) -> Fut<'a, Option<String>> {
        Box::pin(async move {
            let client = self.db.client().await?;
            Ok(client
                .query_opt(
                    "SELECT house_id FROM tokens
                     WHERE hash = $1 AND (expires_at IS NULL OR expires_at > now())",
                    &[&hash],
                )
                .await
                .map_err(pg)?
                .map(|r| r.get(0)))
        })
    }

    fn create_token<'a>(
        &'a self,
        id: &'a str,
        hash: &'a [u8],
        house: &'a str,
        expires_at: Option<i64>,
    ) -> Fut<'a, ()> {
        Box::pin(async move {
            let client = self.db.client().await?;
            client
                .execute(
                    "INSERT INTO tokens (id, hash, house_id, expires_at)
                     VALUES ($1, $2, $3, timestamptz 'epoch' + $4::int8 * interval '1 millisecond')",
                    &[&id, &hash, &house, &expires_at],
                )
                .await
                .map_err(pg)?;
            Ok(())
        })
    }

    fn tokens(&self) -> Fut<'_, Vec<TokenInfo>> {
        Box::pin(async move {
            let client = self.db.client().await?;
            let rows = client
                .query(
                    "SELECT id, house_id, (extract(epoch FROM created_at) * 1000)::int8,
                            (extract(epoch FROM expires_at) * 1000)::int8
                     FROM tokens ORDER BY created_at, id",
                    &[],
                )
                .await
                .map_err(pg)?;
            Ok(rows
                .iter()
                .map(|r| TokenInfo {
                    id: r.get(0),
                    house_id: r.get(1),
                    created_at: r.get(2),
                    expires_at: r.get(3),
                })
                .collect())
        })
    }

    fn revoke<'a>(&'a self, id: &'a str) -> Fut<'a, bool> {
        Box::pin(async move {
            let client = self.db.client().await?;
            let n = client
                .execute("DELETE FROM tokens WHERE id = $1", &[&id])
                .await
                .map_err(pg)?;
            Ok(n > 0)
        })
    }

    /// On a session of its own: its transactions must not take in the shared session's reads.
    fn expire(&self, now_us: i64) -> Fut<'_, crate::keep::Expired> {
        Box::pin(async move {
            let client = connect(&self.url).await?;
            Ok(super::retention::sweep(&client, &self.keep, now_us).await?)
        })
    }

    fn ready(&self) -> Fut<'_, (&'static str, bool)> {
        Box::pin(async move {
            let ok = match self.db.client().await {
                Ok(c) => c.simple_query("SELECT 1").await.is_ok(),
                Err(_) => false,
            };
            Ok(("postgres", ok))
        })
    }
}
