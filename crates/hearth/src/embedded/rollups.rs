//! The rollups on SQLite ([`crate::series`]). The one writer stores events in id order, so the
//! rows past `rollup_mark` are exactly those not summed yet: [`catch_up`] sums them and moves the
//! mark in one transaction (exact, resumable, off the insert's path), every second
//! ([`crate::sweeps::rollups`]) and before a series is read.

use rusqlite::{Connection, params};

use crate::series::{Point, SeriesQuery, Step, Stored, fold};

/// Rows summed per transaction.
const CHUNK: i64 = 50_000;

/// Sum the rows stored since the mark into their buckets (minute buckets before
/// `minute_cutoff_ms` aside: expired, [`crate::keep::Keep::minute_rollup_cutoff_ms`]); returns
/// how many.
pub fn catch_up(c: &mut Connection, minute_cutoff_ms: Option<i64>) -> rusqlite::Result<u64> {
    let mut total = 0u64;
    loop {
        let tx = c.transaction()?;
        let mark: i64 = tx.query_row("SELECT id FROM rollup_mark", [], |r| r.get(0))?;
        let rows: Vec<(String, String, String, f64, i64, i64)> = {
            let mut st = tx.prepare_cached(
                "SELECT house_id, sensor_id, kind, value, ts, id FROM events
                 WHERE id > ?1 ORDER BY id LIMIT ?2",
            )?;
            st.query_map(params![mark, CHUNK], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })?
            .collect::<rusqlite::Result<_>>()?
        };
        let Some(last) = rows.last().map(|r| r.5) else {
            return Ok(total);
        };
        let stored: Vec<Stored<'_>> = rows
            .iter()
            .map(|(h, s, k, v, ts, id)| Stored {
                house_id: h,
                sensor_id: s,
                kind: k,
                value: *v,
                ts_ms: *ts,
                id: *id,
            })
            .collect();
        add(&tx, &stored, minute_cutoff_ms)?;
        tx.execute("UPDATE rollup_mark SET id = ?1", [last])?;
        tx.commit()?;
        total += rows.len() as u64;
        if (rows.len() as i64) < CHUNK {
            return Ok(total);
        }
    }
}

fn add(
    c: &Connection,
    stored: &[Stored<'_>],
    minute_cutoff_ms: Option<i64>,
) -> rusqlite::Result<()> {
    let mut upsert = c.prepare_cached(
        "INSERT INTO rollups (house_id, sensor_id, kind, step, bucket, n, total, low, high,
                              last_ts, last_id, last)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
         ON CONFLICT (house_id, sensor_id, kind, step, bucket) DO UPDATE SET
             n = n + excluded.n, total = total + excluded.total,
             low = min(low, excluded.low), high = max(high, excluded.high),
             last = CASE WHEN excluded.last_ts > last_ts
                          OR (excluded.last_ts = last_ts AND excluded.last_id >= last_id)
                         THEN excluded.last ELSE last END,
             last_id = CASE WHEN excluded.last_ts > last_ts
                             OR (excluded.last_ts = last_ts AND excluded.last_id >= last_id)
                            THEN excluded.last_id ELSE last_id END,
             last_ts = max(last_ts, excluded.last_ts)",
    )?;
    let expired = |r: &crate::series::Rollup| {
        r.step == Step::Minute && minute_cutoff_ms.is_some_and(|cut| r.bucket < cut)
    };
    for r in fold(stored).into_iter().filter(|r| !expired(r)) {
        upsert.execute(params![
            r.house_id,
            r.sensor_id,
            r.kind,
            r.step.name(),
            r.bucket,
            r.count,
            r.sum,
            r.min,
            r.max,
            r.last_ts,
            r.last_id,
            r.last
        ])?;
    }
    Ok(())
}

/// Delete up to `CHUNK` minute rollups before `cutoff_ms`; returns how many and whether more
/// may be left (the chunk was full).
pub fn expire_minutes(c: &Connection, cutoff_ms: i64) -> rusqlite::Result<(u64, bool)> {
    let n = c.execute(
        "DELETE FROM rollups WHERE (house_id, sensor_id, kind, step, bucket) IN (
             SELECT house_id, sensor_id, kind, step, bucket FROM rollups
             WHERE step = 'minute' AND bucket < ?1 LIMIT ?2)",
        params![cutoff_ms, CHUNK],
    )?;
    Ok((n as u64, n as i64 == CHUNK))
}

/// A series, oldest bucket first.
pub fn series(c: &Connection, q: &SeriesQuery) -> rusqlite::Result<Vec<Point>> {
    let mut st = c.prepare_cached(
        "SELECT bucket, n, low, high, total / n, last FROM rollups
         WHERE house_id = ?1 AND sensor_id = ?2 AND kind = ?3 AND step = ?4
           AND bucket >= ?5 AND bucket < ?6
         ORDER BY bucket",
    )?;
    let rows = st.query_map(
        params![q.house, q.sensor, q.kind, q.step.name(), q.from, q.to],
        |r| {
            Ok(Point {
                bucket: r.get(0)?,
                count: r.get(1)?,
                min: r.get(2)?,
                max: r.get(3)?,
                avg: r.get(4)?,
                last: r.get(5)?,
            })
        },
    )?;
    rows.collect()
}
