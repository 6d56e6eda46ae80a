//! The rollups on PostgreSQL ([`crate::series`]). A worker's insert statement appends what each
//! batch adds to its readings' minutes to `rollup_deltas`, in the batch's transaction (a plain
//! insert: several workers never wait on one another's rollup rows); [`fold_chunk`] moves the
//! deltas into `rollups` (minute, hour, day), deleting what it adds in the same statement. Exact
//! and resumable: a delta is either still in `rollup_deltas` or counted in `rollups`, never both,
//! and a series reads the two at once (one snapshot). One worker process at a time folds, every
//! second ([`crate::sweeps::rollups`], [`is_folder`]: a lease); were two to fold at once (a
//! lease taken over during a long fold), they take disjoint rows (`SKIP LOCKED`).

use tokio_postgres::Client;

use crate::series::{Point, SeriesQuery};

/// Delta rows folded per statement.
const CHUNK: i64 = 20_000;

/// One chunk of deltas: taken (deleted), summed per (house, sensor, kind, step, bucket) and
/// added to the rollups in key order (two folds meeting on a row wait, never deadlock).
const FOLD: &str = "
WITH taken AS (
    DELETE FROM rollup_deltas
    WHERE ctid = ANY (ARRAY(SELECT ctid FROM rollup_deltas LIMIT $1 FOR UPDATE SKIP LOCKED))
    RETURNING *
), folded AS (
    INSERT INTO rollups AS r (house_id, sensor_id, kind, step, bucket, n, total, low, high,
                              last_ts, last_id, last)
    SELECT house_id, sensor_id, kind, st.step, date_trunc(st.step, minute, 'UTC'), sum(n),
           sum(total), min(low), max(high), max(last_ts),
           -- The latest by (ts, id), without a sort: float8 holds both exactly.
           (max(ARRAY[extract(epoch FROM last_ts) * 1e6, last_id::float8, last]))[2]::int8,
           (max(ARRAY[extract(epoch FROM last_ts) * 1e6, last_id::float8, last]))[3]
    FROM taken CROSS JOIN (VALUES ('minute'), ('hour'), ('day')) AS st(step)
    -- A minute past `rollup_minute_days` is expired: its late readings count in the hour and day.
    WHERE $2::int8 IS NULL OR st.step <> 'minute'
       OR minute >= timestamptz 'epoch' + $2::int8 * interval '1 millisecond'
    GROUP BY 1, 2, 3, 4, 5
    ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (house_id, sensor_id, kind, step, bucket) DO UPDATE SET
        n = r.n + EXCLUDED.n, total = r.total + EXCLUDED.total,
        low = LEAST(r.low, EXCLUDED.low), high = GREATEST(r.high, EXCLUDED.high),
        last = CASE WHEN (EXCLUDED.last_ts, EXCLUDED.last_id) >= (r.last_ts, r.last_id)
                    THEN EXCLUDED.last ELSE r.last END,
        last_id = CASE WHEN (EXCLUDED.last_ts, EXCLUDED.last_id) >= (r.last_ts, r.last_id)
                       THEN EXCLUDED.last_id ELSE r.last_id END,
        last_ts = GREATEST(r.last_ts, EXCLUDED.last_ts)
    RETURNING 1
)
SELECT count(*), coalesce(sum(n), 0)::int8 FROM taken";

/// How long a folder's turn lasts unless it folds again: past it, the next process to try takes
/// over (the folder died, drains, or its fold task stopped).
pub const FOLDER_LEASE_MS: i64 = 5_000;

/// Whether `me` (a process's store) is the one that folds: it holds the folder's lease
/// (`rollup_folder`), renewed by this call, or takes it now that the lease ran out. One process
/// folds for all: a fold upserts every key its deltas name, so N processes folding every second
/// would upsert each sensor's rows N times.
pub async fn is_folder(client: &Client, me: &str) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "UPDATE rollup_folder
             SET holder = $1, until = now() + $2::int8 * interval '1 millisecond'
             WHERE holder = $1 OR until < now()
             RETURNING true",
            &[&me, &FOLDER_LEASE_MS],
        )
        .await?;
    Ok(row.is_some())
}

/// Fold one chunk of deltas into the rollups, minute buckets before `minute_cutoff_ms` aside
/// ([`crate::keep::Keep::minute_rollup_cutoff_ms`]); returns the readings they counted and
/// whether more may be waiting (the chunk was full).
pub async fn fold_chunk(
    client: &Client,
    minute_cutoff_ms: Option<i64>,
) -> Result<(u64, bool), tokio_postgres::Error> {
    let row = client.query_one(FOLD, &[&CHUNK, &minute_cutoff_ms]).await?;
    let (rows, readings): (i64, i64) = (row.get(0), row.get(1));
    Ok((readings as u64, rows == CHUNK))
}

/// Minute rollups deleted per statement.
const EXPIRE_CHUNK: u64 = 5_000;

/// Delete the minute rollups before `cutoff_ms`, a chunk per statement; how many.
pub async fn expire_minutes(client: &Client, cutoff_ms: i64) -> Result<u64, tokio_postgres::Error> {
    let mut total = 0;
    loop {
        let n = client
            .execute(
                "DELETE FROM rollups WHERE ctid = ANY (ARRAY(
                     SELECT ctid FROM rollups
                     WHERE step = 'minute'
                       AND bucket < timestamptz 'epoch' + $1::int8 * interval '1 millisecond'
                     LIMIT $2))",
                &[&cutoff_ms, &(EXPIRE_CHUNK as i64)],
            )
            .await?;
        total += n;
        if n < EXPIRE_CHUNK {
            return Ok(total);
        }
    }
}

/// How often a process vacuums `rollup_deltas`: emptied every second, it would otherwise hold
/// up to a minute of dead rows between autovacuum's visits (`autovacuum_naptime`), which every
/// fold and series read scans.
pub const VACUUM_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Reclaim the folded deltas' space (skipped while another process vacuums the table).
pub async fn vacuum(client: &Client) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute("VACUUM (SKIP_LOCKED) rollup_deltas")
        .await
}

/// A series, oldest bucket first: the rollups plus the deltas not folded yet, in one snapshot.
pub async fn series(client: &Client, q: &SeriesQuery) -> Result<Vec<Point>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT (extract(epoch FROM b) * 1000)::int8, sum(n)::int8, min(low), max(high),
                    sum(total) / sum(n)::float8,
                    (max(ARRAY[extract(epoch FROM last_ts) * 1e6, last_id::float8, last]))[3]
             FROM (
                 SELECT bucket AS b, n, total, low, high, last_ts, last_id, last FROM rollups
                 WHERE house_id = $1 AND sensor_id = $2 AND kind = $3 AND step = $4
                   AND bucket >= timestamptz 'epoch' + $5::int8 * interval '1 millisecond'
                   AND bucket < timestamptz 'epoch' + $6::int8 * interval '1 millisecond'
                 UNION ALL
                 SELECT date_trunc($4, minute, 'UTC'), n, total, low, high, last_ts, last_id, last
                 FROM rollup_deltas
                 WHERE house_id = $1 AND sensor_id = $2 AND kind = $3
                   AND date_trunc($4, minute, 'UTC')
                       >= timestamptz 'epoch' + $5::int8 * interval '1 millisecond'
                   AND date_trunc($4, minute, 'UTC')
                       < timestamptz 'epoch' + $6::int8 * interval '1 millisecond'
             ) AS x GROUP BY b ORDER BY b",
            &[&q.house, &q.sensor, &q.kind, &q.step.name(), &q.from, &q.to],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Point {
            bucket: r.get(0),
            count: r.get(1),
            min: r.get(2),
            max: r.get(3),
            avg: r.get(4),
            last: r.get(5),
        })
        .collect())
}
