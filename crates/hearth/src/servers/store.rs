//! PostgreSQL: where events end.
//!
//! A worker writes a whole batch in one statement, which is its own transaction and one round
//! trip: check the fencing tokens of the batch's lanes (row lock shared, so a takeover waits for
//! the batch in flight), insert the events skipping those whose dedup key is stored (redelivery
//! never duplicates), and record the sensors seen. Only after it committed does the worker
//! acknowledge the stream entries.
//!
//! Errors are sorted by whose fault they are: [`StoreError::Content`] (the rows themselves),
//! [`StoreError::Fenced`] (the lane moved to another worker), or [`StoreError::Unavailable`]
//! (the server: retried, never dead-lettered).

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Statement};

use crate::alerts::engine::SensorKey;
use crate::caps::Known;
use crate::event::Event;
use crate::keep::Keep;
use crate::sensors::SensorSeen;

use super::postgres::classify;
pub use super::postgres::{StoreError, describe};

const TAKE_FENCE: &str = "
INSERT INTO lane_fences (lane, token, owner) VALUES ($1, 1, $2)
ON CONFLICT (lane) DO UPDATE
SET token = lane_fences.token + 1, owner = EXCLUDED.owner, taken_at = now()
RETURNING token";

/// One batch, one statement, one round trip (and its own transaction):
///
/// 1. lock the batch's lanes' fence rows (shared) and check they still hold our tokens; a
///    takeover (which increments a token) waits for this statement, and any later write of the
///    former owner finds its token stale;
/// 2. insert the events in array order, each in the partition of its class (`keep_days`) and
///    time of receipt. Each partition has unique indexes on the dedup keys (a partitioned table
///    cannot: they lack its partition keys); a reading with a `seq` whose `dedup_window_hours`
///    of receipt reach another partition is also looked for there (an index probe of the
///    partitions in reach; a broker's redelivery is received anew, maybe past midnight). The
///    plain variant is a bare INSERT: duplicates are rare (a broker redelivery, a device
///    publishing twice), and when one is there a unique index refuses the whole statement,
///    which is then run again as the `safe` variant, `ON CONFLICT DO NOTHING`. Speculative
///    insertion costs half as much again as a plain insert, and a probe before each insert a
///    sixth: both are paid only when needed. Entries delivered again (after a crash, a retry) go
///    straight to the safe variant;
/// 3. append what the inserted rows add to their minutes' rollups (folded later);
/// 4. record the sensors seen.
///
/// Returns whether the fences held, the rows inserted, and the lanes whose fence held.
fn write_statement(safe: bool) -> String {
    let conflict = if safe { "ON CONFLICT DO NOTHING" } else { "" };
    format!(
        "
WITH held AS (
    SELECT f.lane FROM lane_fences f
    JOIN unnest($11::text[], $12::int8[]) AS c(lane, token) ON f.lane = c.lane AND f.token = c.token
    FOR SHARE OF f
), fence AS (
    SELECT count(*) = cardinality($11::text[]) AS ok FROM held
), inserted AS (
    INSERT INTO events (house_id, sensor_id, kind, value, unit, seq, ingest_id, ts, received_at,
                        critical, source_unit, keep_days)
    SELECT h, s, k, v, u, q, i,
           timestamptz 'epoch' + t * interval '1 millisecond',
           timestamptz 'epoch' + r * interval '1 microsecond',
           c, o, d
    FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[], $5::text[], $6::int8[],
                $7::uuid[], $8::int8[], $9::int8[], $10::bool[], $19::text[], $20::int4[],
                $21::bool[], $24::bool[])
         WITH ORDINALITY AS x(h, s, k, v, u, q, i, t, r, c, o, d, p, a, n)
         CROSS JOIN fence
    WHERE fence.ok
      -- A reading with a seq whose window reaches out of its own partition (whose unique
      -- index covers the rest) is looked for there: an index probe of the partitions in
      -- reach, of its class, or of any class while a change of policy is that recent.
      AND NOT (p AND EXISTS (
          SELECT FROM events e
          WHERE e.keep_days = x.d
            AND e.house_id = x.h AND e.sensor_id = x.s AND e.kind = x.k AND e.seq = x.q
            AND e.received_at >= timestamptz 'epoch' + (x.r - $22) * interval '1 microsecond'
            AND e.received_at <= timestamptz 'epoch' + (x.r + $23) * interval '1 microsecond'
            -- The batch's reach, as constants: the plan holds only the partitions in it.
            AND e.received_at >= $25::timestamptz AND e.received_at <= $26::timestamptz))
      AND NOT (a AND EXISTS (
          SELECT FROM events e
          WHERE e.house_id = x.h AND e.sensor_id = x.s AND e.kind = x.k AND e.seq = x.q
            AND e.received_at >= timestamptz 'epoch' + (x.r - $22) * interval '1 microsecond'
            AND e.received_at <= timestamptz 'epoch' + (x.r + $23) * interval '1 microsecond'
            -- The batch's reach, as constants: the plan holds only the partitions in it.
            AND e.received_at >= $25::timestamptz AND e.received_at <= $26::timestamptz))
    ORDER BY n
    {conflict}
    RETURNING house_id, sensor_id, kind, value, ts, id
), rolled AS (
    -- What the batch adds to each minute it touched: appended, folded into the rollups later
    -- (crate::servers::rollups). An upsert per (sensor, kind, step) here cost more than the
    -- rows' own insert.
    INSERT INTO rollup_deltas (house_id, sensor_id, kind, minute, n, total, low, high,
                               last_ts, last_id, last)
    SELECT house_id, sensor_id, kind, date_trunc('minute', ts, 'UTC'), count(*),
           sum(value), min(value), max(value), max(ts),
           -- The latest row by (ts, id), without a sort: float8 holds both exactly.
           (max(ARRAY[extract(epoch FROM ts) * 1e6, id::float8, value]))[2]::int8,
           (max(ARRAY[extract(epoch FROM ts) * 1e6, id::float8, value]))[3]
    FROM inserted
    GROUP BY 1, 2, 3, 4
    RETURNING 1
), seen AS (
    INSERT INTO sensors (house_id, sensor_id, kinds, first_seen, last_seen, interval_ms)
    SELECT h, s, string_to_array(k, ','),
           timestamptz 'epoch' + f * interval '1 microsecond',
           timestamptz 'epoch' + l * interval '1 microsecond',
           g
    FROM unnest($13::text[], $14::text[], $15::text[], $16::int8[], $17::int8[], $18::float8[])
         AS y(s, h, k, f, l, g),
         fence
    WHERE fence.ok
    ORDER BY h, s
    ON CONFLICT (house_id, sensor_id) DO UPDATE SET
        kinds = ARRAY(SELECT DISTINCT k FROM unnest(sensors.kinds || EXCLUDED.kinds) AS k ORDER BY k),
        first_seen = LEAST(sensors.first_seen, EXCLUDED.first_seen),
        last_seen = GREATEST(sensors.last_seen, EXCLUDED.last_seen),
        interval_ms = coalesce(EXCLUDED.interval_ms, sensors.interval_ms)
    RETURNING 1
), homes AS (
    INSERT INTO houses (house_id)
    SELECT DISTINCT h FROM unnest($14::text[]) AS z(h), fence
    WHERE fence.ok
    ORDER BY h
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT (SELECT ok FROM fence), (SELECT count(*) FROM inserted), ARRAY(SELECT lane FROM held)"
    )
}

pub struct Store {
    pub(crate) client: Client,
    /// The partitions this session knows.
    partitions: super::retention::Partitions,
    take_fence: Statement,
    write: Statement,
    write_safe: Statement,
}

impl Store {
    /// Connect a worker's session. `idle_in_tx` bounds how long a transaction left open by a
    /// paused (SIGSTOP) process holds its locks: it must be below the lease TTL, so that the
    /// lane's next owner is not blocked behind it.
    pub async fn connect(url: &str, idle_in_tx: Duration) -> Result<Store, StoreError> {
        let client = super::postgres::connect(url).await?;
        // Plans are made again at each batch: a plan cached while `events` was small would
        // keep scanning the whole table for duplicates (a hashed subplan) as it grows, where
        // one index probe per row is what a large table needs.
        client
            .batch_execute(&format!(
                "SET idle_in_transaction_session_timeout = {}; SET lock_timeout = '30s';
                 SET plan_cache_mode = force_custom_plan",
                idle_in_tx.as_millis().max(1)
            ))
            .await
            .map_err(StoreError::Unavailable)?;
        let prepare = |sql: String| {
            let client = &client;
            async move { client.prepare(&sql).await.map_err(StoreError::Unavailable) }
        };
        Ok(Store {
            take_fence: prepare(TAKE_FENCE.into()).await?,
            write: prepare(write_statement(false)).await?,
            write_safe: prepare(write_statement(true)).await?,
            partitions: Default::default(),
            client,
        })
    }

    /// Whether the session is gone (the server closed it): open a new one.
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Decide which of `events` stay within the caps, for the sensors (`unknown`) this writer
    /// has not written yet, and reserve what it admits (the sensors' rows and kinds, the houses)
    /// in the same transaction, under one lock: consumers admitting new sensors at the same
    /// moment take turns, so a cap is exact. Returns the refused events (index, why).
    pub async fn admit(
        &mut self,
        unknown: &[SensorKey],
        events: &[&Event],
        caps: &crate::caps::Caps,
    ) -> Result<Vec<(usize, crate::event::Rejection)>, StoreError> {
        let tx = self.client.transaction().await.map_err(classify)?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&super::postgres::locks::ADMIT],
        )
        .await
        .map_err(classify)?;
        let mut known = known(&tx, unknown).await?;
        let refused = crate::caps::admit(events, &mut known, caps);
        // Reserve the admitted: each asked sensor with its kinds now known.
        // Seen first when the batch's first reading of it was received (not now: a backlog
        // drained late must not make a silent sensor look heard from).
        let (mut houses, mut sensors, mut kinds, mut seen) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ((house, sensor), k) in &known.kinds_of {
            houses.push(house.as_str());
            sensors.push(sensor.as_str());
            let mut k: Vec<&str> = k.iter().map(String::as_str).collect();
            k.sort_unstable();
            kinds.push(k.join(","));
            let first = events
                .iter()
                .filter(|e| e.house_id == *house && e.sensor_id == *sensor)
                .map(|e| e.received_us)
                .min();
            seen.push(first.unwrap_or_else(crate::event::now_us));
        }
        tx.execute(
            "WITH s AS (
                INSERT INTO sensors (house_id, sensor_id, kinds, first_seen, last_seen)
                SELECT h, i, string_to_array(k, ','),
                       timestamptz 'epoch' + t * interval '1 microsecond',
                       timestamptz 'epoch' + t * interval '1 microsecond'
                FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[]) AS x(h, i, k, t)
                ORDER BY h, i
                ON CONFLICT (house_id, sensor_id) DO UPDATE SET kinds = ARRAY(
                    SELECT DISTINCT k FROM unnest(sensors.kinds || EXCLUDED.kinds) AS k ORDER BY k)
                RETURNING 1
             )
             INSERT INTO houses (house_id)
             SELECT DISTINCT h FROM unnest($1::text[]) AS y(h) ORDER BY h
             ON CONFLICT DO NOTHING",
            &[&houses, &sensors, &kinds, &seen],
        )
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(refused)
    }

    /// Take a lane: a new fencing token, greater than any before. Waits for a batch of the
    /// previous owner that is being written, and makes any later write of it fail.
    pub async fn take_fence(&self, lane: &str, owner: &str) -> Result<i64, StoreError> {
        let row = self
            .client
            .query_one(&self.take_fence, &[&lane, &owner])
            .await
            .map_err(classify)?;
        Ok(row.get(0))
    }

    /// Write one batch if every `(lane, token)` still holds. Returns the rows inserted (the rest
    /// were already there, or repeated within the batch). `redelivered` says some of it may have
    /// been written before.
    pub async fn write(&mut self, batch: Batch<'_>, redelivered: bool) -> Result<u64, StoreError> {
        // A key twice in one batch (a broker redelivery next to its original) is written once.
        let mut seen = std::collections::HashSet::with_capacity(batch.events.len());
        let events: Vec<&Event> = batch
            .events
            .iter()
            .copied()
            .filter(|e| seen.insert(dedup_key(e)))
            .collect();
        let batch = Batch {
            events: &events,
            ..batch
        };
        self.partitions
            .ready(&self.client, batch.keep, batch.readings())
            .await?;
        let written = match self.write_with(redelivered, &batch).await {
            // A partition this session saw was dropped since (a late reading of an expired
            // time): made again.
            Err(StoreError::Content(e)) if super::retention::is_unpartitioned(&e) => {
                self.partitions.forget();
                self.partitions
                    .ready(&self.client, batch.keep, batch.readings())
                    .await?;
                self.write_with(redelivered, &batch).await
            }
            other => other,
        };
        match written {
            Err(StoreError::Content(e)) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                tracing::debug!("duplicate in the batch; writing it again with ON CONFLICT");
                self.write_with(true, &batch).await
            }
            other => other,
        }
    }

    async fn write_with(&mut self, safe: bool, batch: &Batch<'_>) -> Result<u64, StoreError> {
        let Batch {
            fences,
            events,
            sensors,
            keep,
            window_us,
        } = *batch;
        let n = events.len();
        let (mut h, mut s, mut k) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut v, mut u, mut q) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut i, mut t, mut r) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let mut c = Vec::with_capacity(n);
        let mut o = Vec::with_capacity(n);
        let mut d = Vec::with_capacity(n);
        let (mut p, mut a) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for e in events {
            let class = keep.days_of(&e.kind);
            d.push(class as i32);
            let seq = e.seq.is_some();
            p.push(seq && self.partitions.reach_out(class, e.received_us, window_us));
            a.push(seq && self.partitions.other_class(e.received_us, window_us));
            h.push(e.house_id.as_str());
            s.push(e.sensor_id.as_str());
            k.push(e.kind.as_str());
            v.push(e.value);
            u.push(e.unit.as_deref());
            q.push(e.seq);
            i.push(e.ingest_id);
            t.push(e.ts_ms);
            r.push(e.received_us);
            c.push(e.is_critical());
            o.push(e.source_unit.as_deref());
        }
        let reach = reach(events, window_us);
        let lanes: Vec<&str> = fences.iter().map(|(l, _)| l.as_str()).collect();
        let tokens: Vec<i64> = fences.iter().map(|(_, t)| *t).collect();
        let sensor_ids: Vec<&str> = sensors.iter().map(|x| x.sensor_id.as_str()).collect();
        let houses: Vec<&str> = sensors.iter().map(|x| x.house_id.as_str()).collect();
        let kinds: Vec<String> = sensors.iter().map(|x| x.kinds.join(",")).collect();
        let first: Vec<i64> = sensors.iter().map(|x| x.first_us).collect();
        let last: Vec<i64> = sensors.iter().map(|x| x.last_us).collect();
        let intervals: Vec<Option<f64>> = sensors.iter().map(|x| x.interval_ms).collect();
        let statement = if safe { &self.write_safe } else { &self.write };
        let row = self
            .client
            .query_one(
                statement,
                &[
                    &h,
                    &s,
                    &k,
                    &v,
                    &u,
                    &q,
                    &i,
                    &t,
                    &r,
                    &c,
                    &lanes,
                    &tokens,
                    &sensor_ids,
                    &houses,
                    &kinds,
                    &first,
                    &last,
                    &intervals,
                    &o,
                    &d,
                    &p,
                    &window_us,
                    &super::retention::AHEAD_US,
                    &a,
                    &reach.0,
                    &reach.1,
                ],
            )
            .await
            .map_err(classify)?;
        let (held, inserted, valid): (bool, i64, Vec<String>) =
            (row.get(0), row.get(1), row.get(2));
        if !held {
            let lost = lanes
                .iter()
                .filter(|l| !valid.iter().any(|v| v == *l))
                .map(|l| l.to_string())
                .collect();
            return Err(StoreError::Fenced(lost));
        }
        Ok(inserted as u64)
    }
}

/// From `window_us` before the batch's first receipt to [`super::retention::AHEAD_US`] after
/// its last.
fn reach(events: &[&Event], window_us: i64) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let at = super::retention::at;
    let first = events.iter().map(|e| e.received_us).min().unwrap_or(0);
    let last = events.iter().map(|e| e.received_us).max().unwrap_or(0);
    (
        at(first.saturating_sub(window_us)),
        at(last.saturating_add(super::retention::AHEAD_US)),
    )
}

/// One batch to write, and how: the fences it is written under, the sensors it records, the
/// retention class of each reading, how far apart two copies of a reading are still one.
#[derive(Clone, Copy)]
pub struct Batch<'a> {
    pub fences: &'a [(String, i64)],
    pub events: &'a [&'a Event],
    pub sensors: &'a [SensorSeen],
    pub keep: &'a Keep,
    pub window_us: i64,
}

impl Batch<'_> {
    /// Its readings' (class, time of receipt).
    fn readings(&self) -> impl Iterator<Item = (u32, i64)> + '_ {
        self.events
            .iter()
            .map(|e| (self.keep.days_of(&e.kind), e.received_us))
    }
}

/// The dedup key: (house, sensor, kind, seq) when the device sent a seq, else the id the ingest
/// gave the event.
#[derive(PartialEq, Eq, Hash)]
enum DedupKey<'a> {
    Seq(&'a str, &'a str, &'a str, i64),
    Ingest(uuid::Uuid),
}

fn dedup_key(e: &Event) -> DedupKey<'_> {
    match (e.seq, e.ingest_id) {
        (Some(seq), _) => DedupKey::Seq(&e.house_id, &e.sensor_id, &e.kind, seq),
        (None, Some(id)) => DedupKey::Ingest(id),
        // Not built by the codecs; keep it apart from everything.
        (None, None) => DedupKey::Ingest(uuid::Uuid::new_v4()),
    }
}

/// What the store holds of `sensors` and their houses: the houses stored, each of their houses'
/// sensor count, their own kinds (see [`crate::caps`]).
pub async fn known(
    client: &impl tokio_postgres::GenericClient,
    sensors: &[SensorKey],
) -> Result<Known, StoreError> {
    let houses: Vec<&str> = sensors.iter().map(|(h, _)| h.as_str()).collect();
    let ids: Vec<&str> = sensors.iter().map(|(_, s)| s.as_str()).collect();
    let mut distinct = houses.clone();
    distinct.sort_unstable();
    distinct.dedup();
    let house_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&distinct];
    let sensor_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&houses, &ids];
    let (count, per_house, kinds) = tokio::try_join!(
        client.query_one("SELECT count(*) FROM houses", &[]),
        client.query(
            "SELECT x.h, (SELECT count(*) FROM sensors s WHERE s.house_id = x.h)
             FROM unnest($1::text[]) AS x(h)
             WHERE EXISTS (SELECT 1 FROM houses WHERE house_id = x.h)",
            &house_params,
        ),
        client.query(
            "SELECT s.house_id, s.sensor_id, s.kinds
             FROM sensors s JOIN unnest($1::text[], $2::text[]) AS x(h, i)
                  ON s.house_id = x.h AND s.sensor_id = x.i",
            &sensor_params,
        ),
    )
    .map_err(classify)?;
    Ok(Known {
        asked: sensors.iter().cloned().collect(),
        houses: count.get::<_, i64>(0) as u64,
        sensors_of: per_house
            .iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
            .collect(),
        kinds_of: kinds
            .iter()
            .map(|r| {
                let kinds: Vec<String> = r.get(2);
                ((r.get(0), r.get(1)), kinds.into_iter().collect())
            })
            .collect(),
    })
}
