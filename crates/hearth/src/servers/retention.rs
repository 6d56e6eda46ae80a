//! Retention on PostgreSQL: the partitions of `events`, made ahead and dropped whole, and
//! cleared alerts past their days.
//!
//! `events` is partitioned by class (`keep_days`, LIST) and then by time of receipt (RANGE,
//! [`Keep::partition_days`] wide, from the epoch): `events_k{class}` and
//! `events_k{class}_{yyyymmdd}` (the day it starts). A partition is made as a table of its own,
//! with the unique indexes of the dedup keys (a partitioned table cannot have them: they lack
//! its partition keys), and then attached, which locks its parent `SHARE UPDATE EXCLUSIVE` only (reads and inserts go
//! on); an expired one is detached and dropped, which waits at most `lock_timeout` for the
//! statements in flight and is tried again at the next sweep when it could not. Every change
//! happens under one advisory lock, so the processes that sweep (every worker) take turns, and
//! any of them may make a partition a batch needs when the sweep has not yet.

use std::collections::BTreeSet;

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use super::postgres::{StoreError, classify};
use crate::keep::{DAY_US, Expired, Keep};

/// The advisory lock partitions are changed under.
const LOCK: i64 = super::postgres::locks::PARTITIONS;

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

/// A time in µs since the epoch (the epoch itself past the years `time` holds).
pub fn at(us: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn timestamp(us: i64) -> String {
    at(us)
        .format(&time::format_description::well_known::Rfc3339)
        .expect("a time within the years 0..9999")
}

/// A partition of `events`: its table, class and range of receipt (µs; the legacy table's
/// start is unbounded).
#[derive(Debug, Clone, PartialEq)]
pub struct Partition {
    pub name: String,
    pub class: u32,
    pub start: i64,
    pub end: i64,
}

/// Every partition of `events`, from the catalog.
pub async fn list(client: &Client) -> Result<Vec<Partition>, StoreError> {
    let rows = client
        .query(
            r"SELECT c.relname::text,
                     substring(pg_get_expr(p.relpartbound, p.oid) FROM 'IN \((\d+)\)')::int,
                     (extract(epoch FROM substring(pg_get_expr(c.relpartbound, c.oid)
                                        FROM 'FROM \(''([^'']+)''\)')::timestamptz) * 1e6)::int8,
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
    Ok(rows
        .iter()
        .filter_map(|r| {
            let class: Option<i32> = r.get(1);
            let end: Option<i64> = r.get(3);
            Some(Partition {
                name: r.get(0),
                class: u32::try_from(class?).ok()?,
                start: r.get::<_, Option<i64>>(2).unwrap_or(i64::MIN),
                end: end?,
            })
        })
        .collect())
}

/// The partitions a writer's session knows, read from the catalog again at least every
/// [`REFRESH`] (another process may have made or dropped one) and whenever one was missing.
#[derive(Default)]
pub struct Partitions {
    known: Vec<Partition>,
    read: Option<std::time::Instant>,
    /// When the retention policy last changed while readings were stored (µs; `None`: not
    /// read yet).
    changed_at: Option<i64>,
}

/// How much later than its copy a reading's original may have been received (two ingest
/// processes stamp the copies of one message apart by far less).
pub const AHEAD_US: i64 = 300_000_000;

/// How long a writer trusts its list of partitions.
pub const REFRESH: std::time::Duration = std::time::Duration::from_secs(60);

impl Partitions {
    /// Make sure readings of (class, received µs) each have their partition; on the first
    /// call, record `keep` as the policy the writers run with.
    pub async fn ready(
        &mut self,
        client: &Client,
        keep: &Keep,
        readings: impl IntoIterator<Item = (u32, i64)>,
    ) -> Result<(), StoreError> {
        if self.changed_at.is_none() {
            self.changed_at = Some(policy(client, keep).await?);
        }
        if self.read.is_none_or(|at| at.elapsed() > REFRESH) {
            self.known = list(client).await?;
            self.read = Some(std::time::Instant::now());
        }
        let missing: BTreeSet<(u32, i64)> = readings
            .into_iter()
            .filter(|&(class, at)| self.own(class, at).is_none())
            .map(|(class, at)| (class, Keep::partition_of(class, at).0))
            .collect();
        if !missing.is_empty() {
            make(client, &missing.into_iter().collect::<Vec<_>>()).await?;
            self.known = list(client).await?;
            self.read = Some(std::time::Instant::now());
        }
        Ok(())
    }

    /// Read the catalog again at the next batch (a partition was dropped since).
    pub fn forget(&mut self) {
        self.read = None;
    }

    fn own(&self, class: u32, at: i64) -> Option<&Partition> {
        self.known
            .iter()
            .find(|p| p.class == class && p.start <= at && at < p.end)
    }

    /// Whether the original of a reading of `class` received at `at` could be stored, within
    /// `window` before it (or [`AHEAD_US`] after), in another partition of its class than its
    /// own (whose unique indexes see the rest).
    pub fn reach_out(&self, class: u32, at: i64, window: i64) -> bool {
        let own = self.own(class, at);
        self.known.iter().any(|p| {
            p.class == class
                && Some(p) != own
                && p.start <= at.saturating_add(AHEAD_US)
                && p.end > at - window
        })
    }

    /// Whether the original of a reading received at `at` could be in another class: the
    /// policy changed within `window` of it.
    pub fn other_class(&self, at: i64, window: i64) -> bool {
        self.changed_at.is_some_and(|c| at - window < c)
    }
}

/// Record `keep` as the writers' policy; when it differs from the last one recorded while
/// readings are stored, it changed now. Returns when it last changed (µs).
async fn policy(client: &Client, keep: &Keep) -> Result<i64, StoreError> {
    let row = client
        .query_one(
            "WITH changed AS (
                UPDATE retention_policy SET policy = $1,
                    changed_at = CASE WHEN EXISTS (SELECT 1 FROM events) THEN now()
                                      ELSE changed_at END
                WHERE policy <> $1
                RETURNING changed_at
             )
             SELECT CASE WHEN at = '-infinity' THEN NULL
                         ELSE (extract(epoch FROM at) * 1e6)::int8 END
             FROM (SELECT coalesce((SELECT changed_at FROM changed),
                                   (SELECT changed_at FROM retention_policy)) AS at) t",
            &[&keep.canonical()],
        )
        .await
        .map_err(classify)?;
    Ok(row.get::<_, Option<i64>>(0).unwrap_or(i64::MIN))
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
                    CREATE UNIQUE INDEX {part}_dedup_seq ON {part}
                        (house_id, sensor_id, kind, seq) WHERE seq IS NOT NULL;
                    CREATE UNIQUE INDEX {part}_dedup_ingest ON {part}
                        (ingest_id, house_id) WHERE ingest_id IS NOT NULL;
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
    let partitions = list(client).await?;
    let mut expired = Expired::default();
    for Partition {
        name: part,
        class,
        end,
        ..
    } in partitions
    {
        if !keep.expired(class, end, now_us) {
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
    if let Some(cutoff) = keep.minute_rollup_cutoff_ms(now_us) {
        expired.rollups = super::rollups::expire_minutes(client, cutoff)
            .await
            .map_err(classify)?;
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
