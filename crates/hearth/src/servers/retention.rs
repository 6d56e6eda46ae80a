//! Retention on PostgreSQL: the partitions of `events`, made ahead and dropped whole, and
//! cleared alerts past their days.
//!
//! `events` is partitioned by class (`keep_days`, LIST) and then by time of receipt (RANGE,
//! [`Keep::partition_days`] wide, from the epoch): `events_k{class}` and
//! `events_k{class}_{yyyymmdd}` (the day it starts). A partition is made as a table of its own
//! and then attached, which locks its parent `SHARE UPDATE EXCLUSIVE` only (reads and inserts go
//! on); an expired one is detached and dropped, which waits at most `lock_timeout` for the
//! statements in flight and is tried again at the next sweep when it could not. Every change
//! happens under one advisory lock, so the processes that sweep (every worker) take turns, and
//! any of them may make a partition a batch needs when the sweep has not yet.

use std::collections::{BTreeSet, HashSet};

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use super::postgres::{StoreError, classify};
use crate::keep::{DAY_US, Expired, Keep};

/// The advisory lock partitions are changed under.
const LOCK: i64 = 7_265_727_470;

/// The name of a class's partition starting at `start_us`.
pub fn name(class: u32, start_us: i64) -> String {
    let day = time::OffsetDateTime::UNIX_EPOCH + time::Duration::days(start_us / DAY_US);
    format!(
        "events_k{class}_{:04}{:02}{:02}",
        day.year(),
        u8::from(day.month()),
        day.day()
    )
}

fn timestamp(us: i64) -> String {
    let t = time::OffsetDateTime::UNIX_EPOCH + time::Duration::microseconds(us);
    t.format(&time::format_description::well_known::Rfc3339)
        .expect("a time within the years 0..9999")
}

/// The partitions (class, start µs) a writer's session made or saw made: a batch asks for the
/// others only.
#[derive(Default)]
pub struct Made(HashSet<(u32, i64)>);

impl Made {
    /// Make those of `wanted` (class, start µs) not known to be made.
    pub async fn make(
        &mut self,
        client: &Client,
        wanted: impl IntoIterator<Item = (u32, i64)>,
    ) -> Result<(), StoreError> {
        let missing: BTreeSet<(u32, i64)> =
            wanted.into_iter().filter(|p| !self.0.contains(p)).collect();
        if !missing.is_empty() {
            let missing: Vec<(u32, i64)> = missing.into_iter().collect();
            make(client, &missing).await?;
            self.0.extend(missing);
        }
        Ok(())
    }

    /// Forget them all (one was dropped since).
    pub fn forget(&mut self) {
        self.0.clear();
    }
}

/// Whether PostgreSQL found no partition for a row.
pub fn is_unpartitioned(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::CHECK_VIOLATION)
        && e.as_db_error()
            .is_some_and(|d| d.message().starts_with("no partition of relation"))
}

/// Make the partitions (class, start µs) holding readings, if they are missing.
pub async fn make(client: &Client, wanted: &[(u32, i64)]) -> Result<(), StoreError> {
    for &(class, start) in wanted {
        let (start, end) = Keep::partition_of(class, start);
        let part = name(class, start);
        // Each in a block of its own: a partition whose range another already covers (the
        // legacy rows' partition of class 0) is no error, and no other change is undone by it.
        let sql = format!(
            "DO $$ BEGIN
                PERFORM pg_advisory_xact_lock({LOCK});
                CREATE TABLE IF NOT EXISTS events_k{class} PARTITION OF events
                    FOR VALUES IN ({class}) PARTITION BY RANGE (received_at);
                IF to_regclass('{part}') IS NULL THEN
                    CREATE TABLE {part}
                        (LIKE events INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
                    BEGIN
                        ALTER TABLE events_k{class} ATTACH PARTITION {part}
                            FOR VALUES FROM ('{from}') TO ('{to}');
                    EXCEPTION WHEN invalid_object_definition THEN
                        DROP TABLE {part};
                    END;
                END IF;
            END $$",
            from = timestamp(start),
            to = timestamp(end),
        );
        client.batch_execute(&sql).await.map_err(classify)?;
    }
    Ok(())
}

/// Make every class's partitions for now and the next one (so that the writers seldom make
/// one), drop the expired partitions, and delete the cleared alerts past `keep.alert_days`.
pub async fn sweep(client: &Client, keep: &Keep, now_us: i64) -> Result<Expired, StoreError> {
    let mut wanted = Vec::new();
    for class in keep.classes() {
        let (start, end) = Keep::partition_of(class, now_us);
        wanted.push((class, start));
        wanted.push((class, end));
    }
    make(client, &wanted).await?;
    let rows = client
        .query(
            r"SELECT c.relname::text, substring(pg_get_expr(p.relpartbound, p.oid) FROM 'IN \((\d+)\)')::int,
                     (extract(epoch FROM substring(pg_get_expr(c.relpartbound, c.oid)
                                        FROM 'TO \(''([^'']+)''\)')::timestamptz) * 1e6)::int8
              FROM pg_inherits ip
              JOIN pg_class p ON p.oid = ip.inhrelid
              JOIN pg_inherits i ON i.inhparent = p.oid
              JOIN pg_class c ON c.oid = i.inhrelid
              WHERE ip.inhparent = 'events'::regclass",
            &[],
        )
        .await
        .map_err(classify)?;
    let mut expired = Expired::default();
    for row in rows {
        let (part, class, end): (String, Option<i32>, Option<i64>) =
            (row.get(0), row.get(1), row.get(2));
        let (Some(class), Some(end)) = (class, end) else {
            continue;
        };
        if !keep.expired(class as u32, end, now_us) {
            continue;
        }
        let sql = format!(
            "BEGIN;
             SET LOCAL lock_timeout = '5s';
             SELECT pg_advisory_xact_lock({LOCK});
             ALTER TABLE events_k{class} DETACH PARTITION {part};
             DROP TABLE {part};
             COMMIT;"
        );
        match client.batch_execute(&sql).await {
            Ok(()) => expired.partitions.push(part),
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK").await;
                if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) {
                    tracing::info!(partition = %part, "expired partition busy; dropped at the next sweep");
                } else {
                    return Err(classify(e));
                }
            }
        }
    }
    if keep.alert_days > 0 {
        // A few thousand at a time: alerts are not a hot table, but a long delete holds back
        // vacuum for nothing.
        loop {
            let n = client
                .execute(
                    "DELETE FROM alerts WHERE id IN (
                        SELECT id FROM alerts
                        WHERE state = 'cleared'
                          AND cleared_at < timestamptz 'epoch' + $1::int8 * interval '1 microsecond'
                        LIMIT 5000)",
                    &[&(now_us - i64::from(keep.alert_days) * DAY_US)],
                )
                .await
                .map_err(classify)?;
            expired.alerts += n;
            if n < 5000 {
                break;
            }
        }
    }
    Ok(expired)
}
