//! Retention on SQLite: expired readings deleted row by row, in bounded chunks, by the current
//! policy ([`Keep`]); cleared alerts past their days.
//!
//! SQLite has no partitions; a home's file is small enough that deleting its expired rows an
//! hour's worth at a time is cheap. Two rules keep the rollups exact: the rows are summed first
//! ([`super::rollups::catch_up`]), and only rows at or below `rollup_mark` are deleted; and the
//! newest row is never deleted, so that SQLite (ids without AUTOINCREMENT: the next id is the
//! greatest plus one) never gives an id below the mark again.

use rusqlite::{Connection, params};

use crate::keep::Keep;

/// Rows looked at per chunk (one writer call, one transaction).
pub const CHUNK: i64 = 10_000;

/// One chunk: from the rows after `cursor` (id order), delete those expired at `now_us`.
/// Returns (rows deleted, the next cursor), or `None` as the cursor when done: the rows ahead
/// are not summed yet, or every row looked at was received after the shortest retention's cutoff.
pub fn expire_chunk(
    c: &mut Connection,
    keep: &Keep,
    now_us: i64,
    cursor: i64,
) -> rusqlite::Result<(u64, Option<i64>)> {
    let shortest = keep.classes().into_iter().filter(|d| *d > 0).min();
    let Some(shortest) = shortest else {
        return Ok((0, None));
    };
    let newest_cutoff = now_us - i64::from(shortest) * crate::keep::DAY_US;
    super::rollups::catch_up(c, keep.minute_rollup_cutoff_ms(now_us))?;
    let tx = c.transaction()?;
    let bound: i64 = tx.query_row(
        "SELECT min((SELECT id FROM rollup_mark), coalesce((SELECT max(id) FROM events), 0) - 1)",
        [],
        |r| r.get(0),
    )?;
    let rows: Vec<(i64, String, i64)> = {
        let mut st = tx.prepare_cached(
            "SELECT id, kind, received_us FROM events WHERE id > ?1 AND id <= ?2
             ORDER BY id LIMIT ?3",
        )?;
        st.query_map(params![cursor, bound, CHUNK], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?
        .collect::<rusqlite::Result<_>>()?
    };
    let mut deleted = 0;
    {
        let mut delete = tx.prepare_cached("DELETE FROM events WHERE id = ?1")?;
        for (id, kind, received_us) in &rows {
            if keep
                .cutoff_us(kind, now_us)
                .is_some_and(|c| *received_us < c)
            {
                deleted += delete.execute([id])? as u64;
            }
        }
    }
    tx.commit()?;
    let done = (rows.len() as i64) < CHUNK || rows.iter().all(|r| r.2 >= newest_cutoff);
    Ok((deleted, if done { None } else { rows.last().map(|r| r.0) }))
}

/// Delete the cleared alerts past `keep.alert_days`; how many.
pub fn expire_alerts(c: &Connection, keep: &Keep, now_us: i64) -> rusqlite::Result<u64> {
    if keep.alert_days == 0 {
        return Ok(0);
    }
    let cutoff_ms = (now_us - i64::from(keep.alert_days) * crate::keep::DAY_US) / 1000;
    Ok(c.execute(
        "DELETE FROM alerts WHERE state = 'cleared' AND cleared_at < ?1",
        [cutoff_ms],
    )? as u64)
}
