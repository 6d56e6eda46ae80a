//! The embedded store: events, sensors, houses and tokens in the SQLite database, with the same
//! dedup keys and constraints as the PostgreSQL schema (`servers/schema.rs`).
//!
//! Writes go to the writer thread, the API's queries to the reader thread (WAL: a read never
//! waits for a write).

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::db::Sqlite;
use crate::alerts::engine::SensorKey;
use crate::caps::{Caps, Known};
use crate::event::{Event, Rejection};
use crate::seam::{
    EventStore, Fence, Fut, HistoryEvent, HistoryQuery, HouseView, SensorRow, TokenInfo, WriteFut,
    Written,
};
use crate::sensors::{SensorMemo, SensorSeen};
use crate::series::{Point, SeriesQuery};

pub struct SqliteStore {
    writer: Sqlite,
    reader: Sqlite,
    /// Which sensors were recorded when, so that a batch touches only the ones that need it.
    memo: Mutex<SensorMemo>,
    caps: Caps,
    keep: crate::keep::Keep,
}

fn sensor_row(r: &Row) -> rusqlite::Result<SensorRow> {
    let kinds: String = r.get(2)?;
    let mut kinds: Vec<String> = kinds
        .split(',')
        .filter(|k| !k.is_empty())
        .map(str::to_string)
        .collect();
    kinds.sort();
    Ok(SensorRow {
        sensor_id: r.get(0)?,
        house_id: r.get(1)?,
        kinds,
        first_seen: r.get(3)?,
        last_seen: r.get(4)?,
    })
}

/// Insert a batch's events (a dedup key already stored is skipped) and record the sensors the
/// memo says need it (new, with a new kind, or not recorded for `sensor_touch_interval_ms`).
fn write_events(c: &Connection, events: &[Event], sensors: &[SensorSeen]) -> rusqlite::Result<u64> {
    let now_us = crate::event::now_us();
    let mut insert = c.prepare_cached(
        "INSERT INTO events (house_id, sensor_id, kind, value, unit, seq, ingest_id, ts,
                             received_us, stored_us, critical, source_unit)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
         ON CONFLICT DO NOTHING",
    )?;
    let mut stored = 0;
    for e in events {
        stored += insert.execute(params![
            e.house_id,
            e.sensor_id,
            e.kind,
            e.value,
            e.unit,
            e.seq,
            e.ingest_id.map(|u| u.to_string()),
            e.ts_ms,
            e.received_us,
            now_us,
            e.is_critical(),
            e.source_unit,
        ])? as u64;
    }
    let mut kinds_of =
        c.prepare_cached("SELECT kinds FROM sensors WHERE house_id = ?1 AND sensor_id = ?2")?;
    let mut upsert = c.prepare_cached(
        "INSERT INTO sensors (sensor_id, house_id, kinds, first_seen, last_seen, interval_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (house_id, sensor_id) DO UPDATE SET
             kinds = excluded.kinds, first_seen = min(first_seen, excluded.first_seen),
             last_seen = max(last_seen, excluded.last_seen),
             interval_ms = coalesce(excluded.interval_ms, interval_ms)",
    )?;
    let mut home = c.prepare_cached(
        "INSERT INTO houses (house_id, first_seen) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
    )?;
    for s in sensors {
        let old: Option<String> = kinds_of
            .query_row([&s.house_id, &s.sensor_id], |r| r.get(0))
            .optional()?;
        if old.is_none() {
            home.execute(params![s.house_id, s.first_us / 1000])?;
        }
        let mut all: BTreeSet<&str> = s.kinds.iter().map(String::as_str).collect();
        if let Some(k) = &old {
            all.extend(k.split(',').filter(|k| !k.is_empty()));
        }
        let joined = all.into_iter().collect::<Vec<_>>().join(",");
        upsert.execute(params![
            s.sensor_id,
            s.house_id,
            joined,
            s.first_us / 1000,
            s.last_us / 1000,
            s.interval_ms
        ])?;
    }
    Ok(stored)
}

/// What the store holds of `sensors` and their houses, for the caps (in the writer's
/// transaction: exact).
fn known(c: &Connection, sensors: &[SensorKey]) -> rusqlite::Result<Known> {
    let mut known = Known {
        asked: sensors.iter().cloned().collect(),
        houses: c.query_row("SELECT count(*) FROM houses", [], |r| r.get::<_, i64>(0))? as u64,
        ..Known::default()
    };
    let mut house = c.prepare_cached(
        "SELECT count(*) FROM sensors WHERE house_id = ?1
         HAVING EXISTS (SELECT 1 FROM houses WHERE house_id = ?1)",
    )?;
    let mut kinds =
        c.prepare_cached("SELECT kinds FROM sensors WHERE house_id = ?1 AND sensor_id = ?2")?;
    for (h, s) in sensors {
        if !known.sensors_of.contains_key(h)
            && let Some(n) = house.query_row([h], |r| r.get::<_, i64>(0)).optional()?
        {
            known.sensors_of.insert(h.clone(), n as u64);
        }
        if let Some(k) = kinds
            .query_row([h, s], |r| r.get::<_, String>(0))
            .optional()?
        {
            known.kinds_of.insert(
                (h.clone(), s.clone()),
                k.split(',')
                    .filter(|k| !k.is_empty())
                    .map(str::to_string)
                    .collect(),
            );
        }
    }
    Ok(known)
}

impl SqliteStore {
    pub fn new(
        writer: Sqlite,
        reader: Sqlite,
        touch_interval_ms: u64,
        caps: Caps,
        keep: crate::keep::Keep,
    ) -> SqliteStore {
        SqliteStore {
            writer,
            reader,
            memo: Mutex::new(SensorMemo::new(touch_interval_ms)),
            caps,
            keep,
        }
    }

    /// The latest stored reading of each kind of some sensors of a house (in the caches' order,
    /// [`Event::order`]), for the cache to read sensors in the first time they are asked for, on
    /// the reader pool: one query per sensor, walking its history index newest first and
    /// stopping as soon as no older row can be newer in that order than what was found for
    /// every kind (a reading's time is never later than its stamp).
    pub async fn latest_of(
        &self,
        house: &str,
        sensors: Vec<String>,
    ) -> Result<Vec<Event>, crate::seam::Unavailable> {
        let house = house.to_string();
        self.reader
            .call(move |c| {
                let mut kinds_of = c.prepare_cached(
                    "SELECT kinds FROM sensors WHERE house_id = ?1 AND sensor_id = ?2",
                )?;
                let mut history = c.prepare_cached(
                    "SELECT kind, value, unit, seq, ts, received_us, source_unit FROM events
                     WHERE house_id = ?1 AND sensor_id = ?2
                     ORDER BY ts DESC, id DESC",
                )?;
                let mut out = Vec::new();
                for sensor in &sensors {
                    let kinds: Option<String> = kinds_of
                        .query_row([&house, sensor], |r| r.get(0))
                        .optional()?;
                    let kinds = kinds.unwrap_or_default();
                    let wanted = kinds.split(',').filter(|k| !k.is_empty()).count();
                    let mut best: HashMap<String, Event> = HashMap::new();
                    let mut rows = history.query([&house, sensor])?;
                    while let Some(r) = rows.next()? {
                        let e = Event {
                            house_id: house.clone(),
                            sensor_id: sensor.clone(),
                            kind: r.get(0)?,
                            value: r.get(1)?,
                            unit: r.get(2)?,
                            seq: r.get(3)?,
                            ts_ms: r.get(4)?,
                            received_us: r.get(5)?,
                            source_unit: r.get(6)?,
                            ingest_id: None,
                        };
                        if best.len() >= wanted && best.values().all(|b| e.ts_ms < b.order().0) {
                            break;
                        }
                        match best.get(&e.kind) {
                            Some(b) if b.order() >= e.order() => {}
                            _ => {
                                best.insert(e.kind.clone(), e);
                            }
                        }
                    }
                    out.extend(best.into_values());
                }
                Ok(out)
            })
            .await
    }
}

impl EventStore for SqliteStore {
    /// Fences are not checked: one process holds every lane.
    fn write<'a>(
        &'a self,
        _fences: &'a [Fence],
        events: &'a [&'a Event],
        _redelivered: bool,
    ) -> WriteFut<'a, Written> {
        Box::pin(async move {
            let owned: Vec<Event> = events.iter().map(|e| (*e).clone()).collect();
            let unknown = self
                .memo
                .lock()
                .map(|m| m.unknown(events))
                .unwrap_or_default();
            let memo = self
                .memo
                .lock()
                .map(|m| m.to_record(events))
                .unwrap_or_default();
            let caps = self.caps;
            let (stored, capped, kept, sensors) = self
                .writer
                .call(move |c| {
                    let tx = c.transaction()?;
                    // The caps, decided in the writer's transaction: exact.
                    let refs: Vec<&Event> = owned.iter().collect();
                    let capped: Vec<(usize, Rejection)> = if unknown.is_empty() {
                        Vec::new()
                    } else {
                        crate::caps::admit(&refs, &mut known(&tx, &unknown)?, &caps)
                    };
                    let kept: Vec<Event> = owned
                        .into_iter()
                        .enumerate()
                        .filter(|(i, _)| !capped.iter().any(|(c, _)| c == i))
                        .map(|(_, e)| e)
                        .collect();
                    let sensors: Vec<SensorSeen> = if capped.is_empty() {
                        memo
                    } else {
                        let keep: Vec<&Event> = kept.iter().collect();
                        SensorMemo::new(0).to_record(&keep)
                    };
                    let stored = write_events(&tx, &kept, &sensors)?;
                    tx.commit()?;
                    Ok((stored, capped, kept, sensors))
                })
                .await?;
            if let Ok(mut m) = self.memo.lock() {
                m.recorded(sensors);
                m.observe(&kept.iter().collect::<Vec<_>>());
            }
            Ok(Written {
                stored,
                duplicates: kept.len() as u64 - stored,
                capped,
            })
        })
    }

    fn houses<'a>(&'a self, only: Option<&'a str>) -> Fut<'a, Vec<HouseView>> {
        let only = only.map(str::to_string);
        Box::pin(async move {
            self.reader
                .call(move |c| {
                    let mut st = c.prepare_cached(
                        "SELECT house_id, count(*) FROM sensors
                         WHERE ?1 IS NULL OR house_id = ?1
                         GROUP BY house_id ORDER BY house_id",
                    )?;
                    let rows = st.query_map([only], |r| {
                        Ok(HouseView {
                            house_id: r.get(0)?,
                            sensors: r.get(1)?,
                        })
                    })?;
                    rows.collect()
                })
                .await
        })
    }

    fn sensors<'a>(&'a self, house: &'a str) -> Fut<'a, Vec<SensorRow>> {
        let house = house.to_string();
        Box::pin(async move {
            self.reader
                .call(move |c| {
                    let mut st = c.prepare_cached(
                        "SELECT sensor_id, house_id, kinds, first_seen, last_seen FROM sensors
                         WHERE house_id = ?1 ORDER BY sensor_id LIMIT 10000",
                    )?;
                    let rows = st.query_map([house], sensor_row)?;
                    rows.collect()
                })
                .await
        })
    }

    fn sensor<'a>(&'a self, house: &'a str, sensor: &'a str) -> Fut<'a, Option<SensorRow>> {
        let (house, sensor) = (house.to_string(), sensor.to_string());
        Box::pin(async move {
            self.reader
                .call(move |c| {
                    c.prepare_cached(
                        "SELECT sensor_id, house_id, kinds, first_seen, last_seen FROM sensors
                         WHERE house_id = ?1 AND sensor_id = ?2",
                    )?
                    .query_row([house, sensor], sensor_row)
                    .optional()
                })
                .await
        })
    }

    fn series<'a>(&'a self, q: &'a SeriesQuery) -> Fut<'a, Vec<Point>> {
        let q = self.keep.unexpired(q, crate::event::now_us());
        Box::pin(async move {
            // What was stored since the last second counts too.
            self.fold_rollups().await?;
            self.reader
                .call(move |c| super::rollups::series(c, &q))
                .await
        })
    }

    fn fold_rollups(&self) -> Fut<'_, u64> {
        let cutoff = self.keep.minute_rollup_cutoff_ms(crate::event::now_us());
        Box::pin(async move {
            self.writer
                .call(move |c| super::rollups::catch_up(c, cutoff))
                .await
        })
    }

    fn history<'a>(&'a self, q: &'a HistoryQuery) -> Fut<'a, Vec<HistoryEvent>> {
        let q = q.clone();
        Box::pin(async move {
            self.reader
                .call(move |c| {
                    let mut st = c.prepare_cached(
                        "SELECT id, kind, value, unit, seq, ts, source_unit FROM events
                         WHERE house_id = ?8 AND sensor_id = ?1
                           AND (?2 IS NULL OR kind = ?2)
                           -- Bounds as plain ranges, so that the history index serves them.
                           AND ts >= coalesce(?3, -9223372036854775808)
                           AND ts < coalesce(?4, 9223372036854775807)
                           AND ts <= coalesce(?5, 9223372036854775807)
                           AND (?5 IS NULL OR ts < ?5 OR (ts = ?5 AND id < ?6))
                         ORDER BY ts DESC, id DESC
                         LIMIT ?7",
                    )?;
                    let rows = st.query_map(
                        params![
                            q.sensor,
                            q.kind,
                            q.from,
                            q.to,
                            q.cursor.map(|c| c.0),
                            q.cursor.map(|c| c.1).unwrap_or(0),
                            q.limit,
                            q.house
                        ],
                        |r| {
                            let kind: String = r.get(1)?;
                            Ok(HistoryEvent {
                                id: r.get(0)?,
                                unit: crate::kinds::unit_or_canonical(&kind, r.get(3)?),
                                kind,
                                value: r.get(2)?,
                                seq: r.get(4)?,
                                ts: r.get(5)?,
                                source_unit: r.get(6)?,
                            })
                        },
                    )?;
                    rows.collect()
                })
                .await
        })
    }

    fn token_house<'a>(&'a self, hash: &'a [u8]) -> Fut<'a, Option<String>> {
        let hash = hash.to_vec();
        Box::pin(async move {
            self.reader
                .call(move |c| {
                    c.prepare_cached(
                        "SELECT house_id FROM tokens
                         WHERE hash = ?1 AND (expires_at IS NULL OR expires_at > ?2)",
                    )?
                    .query_row(params![hash, crate::event::now_us() / 1000], |r| r.get(0))
                    .optional()
                })
                .await
        })
    }

    fn create_token<'a>(
        &'a self,
        id: &'a str,
        hash: &'a [u8],
        house: &'a str,
        expires_at: Option<i64>,
    ) -> Fut<'a, ()> {
        let (id, hash, house) = (id.to_string(), hash.to_vec(), house.to_string());
        Box::pin(async move {
            self.writer
                .call(move |c| {
                    c.execute(
                        "INSERT INTO tokens (id, hash, house_id, created_at, expires_at)
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![id, hash, house, crate::event::now_us() / 1000, expires_at],
                    )
                    .map(|_| ())
                })
                .await
        })
    }

    fn tokens(&self) -> Fut<'_, Vec<TokenInfo>> {
        Box::pin(async move {
            self.reader
                .call(|c| {
                    let mut st = c.prepare_cached(
                        "SELECT id, house_id, created_at, expires_at FROM tokens
                         ORDER BY created_at, id",
                    )?;
                    let rows = st.query_map([], |r| {
                        Ok(TokenInfo {
                            id: r.get(0)?,
                            house_id: r.get(1)?,
                            created_at: r.get(2)?,
                            expires_at: r.get(3)?,
                        })
                    })?;
                    rows.collect()
                })
                .await
        })
    }

    fn revoke<'a>(&'a self, id: &'a str) -> Fut<'a, bool> {
        let id = id.to_string();
        Box::pin(async move {
            self.writer
                .call(move |c| Ok(c.execute("DELETE FROM tokens WHERE id = ?1", [id])? > 0))
                .await
        })
    }

    /// A chunk per writer call: the batches in between go on.
    fn expire(&self, now_us: i64) -> Fut<'_, crate::keep::Expired> {
        Box::pin(async move {
            let mut expired = crate::keep::Expired::default();
            let mut cursor = Some(0);
            while let Some(from) = cursor {
                let keep = self.keep.clone();
                let (n, next) = self
                    .writer
                    .call(move |c| super::retention::expire_chunk(c, &keep, now_us, from))
                    .await?;
                expired.readings += n;
                cursor = next;
            }
            let keep = self.keep.clone();
            expired.alerts = self
                .writer
                .call(move |c| super::retention::expire_alerts(c, &keep, now_us))
                .await?;
            if let Some(cutoff) = self.keep.minute_rollup_cutoff_ms(now_us) {
                loop {
                    let (n, more) = self
                        .writer
                        .call(move |c| super::rollups::expire_minutes(c, cutoff))
                        .await?;
                    expired.rollups += n;
                    if !more {
                        break;
                    }
                }
            }
            Ok(expired)
        })
    }

    fn ready(&self) -> Fut<'_, (&'static str, bool)> {
        Box::pin(async move {
            let ok = self
                .reader
                .call(|c| c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0)))
                .await
                .is_ok();
            Ok(("embedded", ok))
        })
    }
}
