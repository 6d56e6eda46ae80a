//! The rollups on SQLite ([`crate::series`]): added to in the writer's transaction, from the
//! rows it inserted, and read as a series.

use rusqlite::{Connection, params};

use crate::event::Event;
use crate::series::{Point, SeriesQuery, fold};

/// Add the rows just inserted (each with its id) to their buckets.
pub fn add(c: &Connection, inserted: &[(&Event, i64)]) -> rusqlite::Result<()> {
    if inserted.is_empty() {
        return Ok(());
    }
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
    for r in fold(inserted) {
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
