//! The PostgreSQL schema and its migrations (`hearth migrate`, also run by every role at start).
//!
//! Migrations are numbered, applied in order inside one transaction under an advisory lock (so
//! that several processes starting together apply each once), and recorded in
//! `schema_migrations`. A migration, once released, is never edited: a change is a new one.

use tokio_postgres::error::SqlState;

use super::postgres::connect;
use super::store::StoreError;

/// (version, name, SQL)
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "events, sensors, lane fences",
        r#"
CREATE TABLE events (
    -- Grows in the order rows are stored: within one sensor, ORDER BY id is processing order.
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Ids are ASCII ([A-Za-z0-9_.-]): byte order ("C") sorts them like any collation would,
    -- and compares them several times faster in the dedup index.
    house_id    text COLLATE "C" NOT NULL,
    sensor_id   text COLLATE "C" NOT NULL,
    kind        text COLLATE "C" NOT NULL,
    value       double precision NOT NULL,
    unit        text,
    -- The device's counter; with (sensor_id, kind) the dedup key.
    seq         bigint,
    -- Assigned at ingest when the device sent no seq; the dedup key then.
    ingest_id   uuid,
    ts          timestamptz NOT NULL,
    received_at timestamptz NOT NULL,
    -- When the row was written (per row, not per transaction): receive → stored latency.
    stored_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    critical    boolean NOT NULL DEFAULT false,
    CONSTRAINT events_one_dedup_key CHECK ((seq IS NULL) <> (ingest_id IS NULL))
);
CREATE UNIQUE INDEX events_dedup_seq ON events (sensor_id, kind, seq) WHERE seq IS NOT NULL;
CREATE UNIQUE INDEX events_dedup_ingest ON events (ingest_id) WHERE ingest_id IS NOT NULL;

CREATE TABLE sensors (
    sensor_id   text COLLATE "C" PRIMARY KEY,
    house_id    text COLLATE "C" NOT NULL,
    kinds       text[] NOT NULL DEFAULT '{}',
    first_seen  timestamptz NOT NULL,
    last_seen   timestamptz NOT NULL
);
CREATE INDEX sensors_house ON sensors (house_id);

-- One row per lane: the fencing token of its current owner. Taking a lane increments it; every
-- batch write checks it, so a worker that lost its lane while paused cannot write.
CREATE TABLE lane_fences (
    lane        text PRIMARY KEY,
    token       bigint NOT NULL,
    owner       text NOT NULL,
    taken_at    timestamptz NOT NULL DEFAULT now()
);
"#,
    ),
    (
        2,
        "alerts, rule state, tokens, history index",
        r#"
-- The usual interval between a sensor's readings (EWMA, ms), for the offline rule.
ALTER TABLE sensors ADD COLUMN interval_ms double precision;

-- History of a sensor, newest first (GET /sensors/{sensor}/events), paged by (ts, id).
CREATE INDEX events_history ON events (sensor_id, ts DESC, id DESC);

CREATE TABLE alerts (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    house_id        text COLLATE "C" NOT NULL,
    sensor_id       text COLLATE "C" NOT NULL,
    -- The lane of the sensor: its owner pushes what was not pushed yet.
    lane            text NOT NULL,
    rule            text NOT NULL,
    kind            text NOT NULL,
    severity        text NOT NULL CHECK (severity IN ('info', 'warning', 'critical')),
    state           text NOT NULL CHECK (state IN ('active', 'acknowledged', 'cleared')),
    message         text NOT NULL,
    value           double precision,
    raised_at       timestamptz NOT NULL,
    -- The dedup key of the event that raised it.
    raised_by       text NOT NULL,
    acknowledged_at timestamptz,
    acknowledged_by text,
    cleared_at      timestamptz,
    cleared_by      text,
    -- The last state pushed to WebSocket clients and webhooks.
    notified_state  text,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
-- One open alert per (sensor, rule).
CREATE UNIQUE INDEX alerts_one_open ON alerts (sensor_id, rule) WHERE state <> 'cleared';
CREATE INDEX alerts_house ON alerts (house_id, id DESC);
CREATE INDEX alerts_unpushed ON alerts (lane) WHERE notified_state IS DISTINCT FROM state;

-- Rule evaluation state that must survive a restart: debounce start, last transition.
CREATE TABLE rule_state (
    sensor_id       text COLLATE "C" NOT NULL,
    rule            text NOT NULL,
    pending_since   timestamptz,
    transition_key  text,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sensor_id, rule)
);

-- House tokens, stored as SHA-256 of the token.
CREATE TABLE tokens (
    hash        bytea PRIMARY KEY,
    house_id    text COLLATE "C" NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
"#,
    ),
    (
        3,
        "identity is (house, sensor); houses; token ids and expiry",
        r#"
-- A sensor is (house_id, sensor_id): two houses may both have a `kitchen`. Every key that named
-- a sensor alone names its house too.
DROP INDEX events_dedup_seq;
CREATE UNIQUE INDEX events_dedup_seq ON events (house_id, sensor_id, kind, seq) WHERE seq IS NOT NULL;
DROP INDEX events_history;
CREATE INDEX events_history ON events (house_id, sensor_id, ts DESC, id DESC);

-- The old table kept a shared sensor id under the house that wrote it last: rebuilt from the
-- events, one row per (house, sensor) with the kinds that house sent.
CREATE TABLE sensors_by_house (
    house_id    text COLLATE "C" NOT NULL,
    sensor_id   text COLLATE "C" NOT NULL,
    kinds       text[] NOT NULL DEFAULT '{}',
    first_seen  timestamptz NOT NULL,
    last_seen   timestamptz NOT NULL,
    interval_ms double precision,
    PRIMARY KEY (house_id, sensor_id)
);
INSERT INTO sensors_by_house (house_id, sensor_id, kinds, first_seen, last_seen, interval_ms)
SELECT e.house_id, e.sensor_id, array_agg(DISTINCT e.kind ORDER BY e.kind),
       min(e.received_at), max(e.received_at),
       (SELECT s.interval_ms FROM sensors s
        WHERE s.sensor_id = e.sensor_id AND s.house_id = e.house_id)
FROM events e
GROUP BY e.house_id, e.sensor_id;

-- Houses with data (their count is capped by `max_houses`).
CREATE TABLE houses (
    house_id    text COLLATE "C" PRIMARY KEY,
    first_seen  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO houses (house_id, first_seen)
SELECT house_id, min(first_seen) FROM sensors_by_house GROUP BY house_id;

-- Rule state per (house, sensor, rule); a sensor's old state goes to each house that has it.
-- Transition keys are ordered by the reading's time never later than its receipt (the key's
-- first 15 digits): a key a reading stamped in the future left would otherwise keep every
-- reading until that time from raising or clearing anything.
CREATE TABLE rule_state_by_house (
    house_id        text COLLATE "C" NOT NULL,
    sensor_id       text COLLATE "C" NOT NULL,
    rule            text NOT NULL,
    pending_since   timestamptz,
    transition_key  text,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (house_id, sensor_id, rule)
);
INSERT INTO rule_state_by_house (house_id, sensor_id, rule, pending_since, transition_key, updated_at)
SELECT s.house_id, r.sensor_id, r.rule, r.pending_since,
       CASE WHEN r.transition_key ~ '^[0-9]{53}$'
            THEN lpad(least(substr(r.transition_key, 1, 15)::bigint,
                            substr(r.transition_key, 37, 17)::bigint / 1000)::text, 15, '0')
                 || substr(r.transition_key, 16)
            ELSE r.transition_key END,
       r.updated_at
FROM rule_state r JOIN sensors_by_house s ON s.sensor_id = r.sensor_id;

DROP TABLE rule_state;
ALTER TABLE rule_state_by_house RENAME TO rule_state;
DROP TABLE sensors;
ALTER TABLE sensors_by_house RENAME TO sensors;

-- One open alert per (house, sensor, rule).
DROP INDEX alerts_one_open;
CREATE UNIQUE INDEX alerts_one_open ON alerts (house_id, sensor_id, rule) WHERE state <> 'cleared';

-- Tokens get a public id (to list and revoke them; the first 6 bytes of the hash, in hex) and
-- an optional expiry.
ALTER TABLE tokens ADD COLUMN id text, ADD COLUMN expires_at timestamptz;
UPDATE tokens SET id = encode(substring(hash FROM 1 FOR 6), 'hex');
ALTER TABLE tokens ALTER COLUMN id SET NOT NULL;
CREATE UNIQUE INDEX tokens_id ON tokens (id);
"#,
    ),
    (
        4,
        "the unit a reading was sent in",
        r#"
-- Values are stored in their kind's canonical unit (°C, hPa, kWh, ...); the unit the device sent
-- is kept when the value was converted from it.
ALTER TABLE events ADD COLUMN source_unit text;
"#,
    ),
    (
        5,
        "rollups per minute, hour and day",
        r#"
-- Per (house, sensor, kind) and bucket (UTC): what the series endpoint reads. Kept by the
-- worker's insert, from the rows it actually inserted, in the same statement.
CREATE TABLE rollups (
    house_id    text COLLATE "C" NOT NULL,
    sensor_id   text COLLATE "C" NOT NULL,
    kind        text COLLATE "C" NOT NULL,
    step        text NOT NULL CHECK (step IN ('minute', 'hour', 'day')),
    bucket      timestamptz NOT NULL,
    n           bigint NOT NULL,
    total       double precision NOT NULL,
    low         double precision NOT NULL,
    high        double precision NOT NULL,
    last_ts     timestamptz NOT NULL,
    last_id     bigint NOT NULL,
    last        double precision NOT NULL,
    PRIMARY KEY (house_id, sensor_id, kind, step, bucket)
-- Every batch updates its buckets' rows in place: room on each page keeps those updates HOT
-- (no index entry per update).
) WITH (fillfactor = 50);
INSERT INTO rollups
SELECT e.house_id, e.sensor_id, e.kind, st.step, date_trunc(st.step, e.ts, 'UTC'),
       count(*), sum(e.value), min(e.value), max(e.value), max(e.ts),
       (array_agg(e.id ORDER BY e.ts DESC, e.id DESC))[1],
       (array_agg(e.value ORDER BY e.ts DESC, e.id DESC))[1]
FROM events e CROSS JOIN (VALUES ('minute'), ('hour'), ('day')) AS st(step)
GROUP BY 1, 2, 3, 4, 5;
"#,
    ),
    (
        6,
        "events partitioned by retention class and time of receipt",
        r#"
-- Readings are partitioned by the days their class keeps them (`keep_days`, the days of their
-- kind when stored; 0: forever), then by when they were received: retention drops whole
-- partitions, which hearth makes ahead of time (crate::keep). The rows stored before are
-- `events_legacy`, in class 0 up to the end of its current partition.
ALTER TABLE events RENAME TO events_legacy;
ALTER TABLE events_legacy ALTER COLUMN id DROP IDENTITY;
ALTER TABLE events_legacy ADD COLUMN keep_days int NOT NULL DEFAULT 0;
-- Nothing looks a row up by id alone: one index less to keep on the inserts it still takes.
ALTER TABLE events_legacy DROP CONSTRAINT events_pkey;
-- A partitioned table's unique index must hold its partition keys, which the dedup keys do
-- not: each partition has its own unique indexes on them (made with it by
-- crate::servers::retention; the legacy table keeps its seq key's, and its ingest key's gains
-- house_id, which a table distributed by house (Citus) needs), and a reading whose
-- `dedup_window_hours` reach another partition is probed there (crate::servers::store).
ALTER INDEX events_dedup_seq RENAME TO events_legacy_dedup_seq;
DROP INDEX events_dedup_ingest;
CREATE UNIQUE INDEX events_legacy_dedup_ingest ON events_legacy (ingest_id, house_id)
    WHERE ingest_id IS NOT NULL;

CREATE SEQUENCE events_id_seq AS bigint;
SELECT setval('events_id_seq', coalesce((SELECT max(id) FROM events_legacy), 0) + 1, false);

CREATE TABLE events (
    -- Grows in the order rows are stored: within one sensor, ORDER BY id is processing order.
    id          bigint NOT NULL DEFAULT nextval('events_id_seq'),
    house_id    text COLLATE "C" NOT NULL,
    sensor_id   text COLLATE "C" NOT NULL,
    kind        text COLLATE "C" NOT NULL,
    value       double precision NOT NULL,
    unit        text,
    seq         bigint,
    ingest_id   uuid,
    ts          timestamptz NOT NULL,
    received_at timestamptz NOT NULL,
    stored_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    critical    boolean NOT NULL DEFAULT false,
    source_unit text,
    keep_days   int NOT NULL,
    CONSTRAINT events_one_dedup_key CHECK ((seq IS NULL) <> (ingest_id IS NULL))
) PARTITION BY LIST (keep_days);
ALTER SEQUENCE events_id_seq OWNED BY events.id;
CREATE TABLE events_k0 PARTITION OF events FOR VALUES IN (0) PARTITION BY RANGE (received_at);

-- History of a sensor, newest first, paged by (ts, id): the legacy table's index is taken as is.
CREATE INDEX events_by_sensor ON events (house_id, sensor_id, ts DESC, id DESC);

-- The retention policy the writers last ran with (crate::keep::Keep::canonical), and when it
-- changed while readings were stored: until `dedup_window_hours` after that, a copy of a
-- reading may be in the partitions of another class, and is looked for there too.
CREATE TABLE retention_policy (
    one         boolean PRIMARY KEY DEFAULT true CHECK (one),
    policy      text NOT NULL,
    changed_at  timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO retention_policy (policy) VALUES ('0;');

-- A new database has no rows to keep: its class-0 partitions are made like any other.
DO $$ BEGIN
    IF EXISTS (SELECT 1 FROM events_legacy) THEN
        EXECUTE format(
            'ALTER TABLE events_k0 ATTACH PARTITION events_legacy FOR VALUES FROM (MINVALUE) TO (%L)',
            -- The end of the class's current partition (30 days wide, from the epoch), so that
            -- the next one hearth makes starts where this one ends.
            to_timestamp((floor(extract(epoch FROM now()) / 2592000) + 1) * 2592000));
    ELSE
        DROP TABLE events_legacy;
    END IF;
END $$;
"#,
    ),
    (
        7,
        "rollups folded off the insert's path",
        r#"
-- What a batch adds to its readings' minutes, appended by the worker's insert statement (in its
-- transaction: a plain insert, no conflict to resolve) and folded into `rollups` every second
-- by crate::servers::rollups, which deletes what it adds in the same transaction. A series
-- reads `rollups` and what is here still: every reading counted once, whatever the moment.
-- No index: the table holds about a second of batches, read whole.
CREATE TABLE rollup_deltas (
    house_id    text COLLATE "C" NOT NULL,
    sensor_id   text COLLATE "C" NOT NULL,
    kind        text COLLATE "C" NOT NULL,
    minute      timestamptz NOT NULL,
    n           bigint NOT NULL,
    total       double precision NOT NULL,
    low         double precision NOT NULL,
    high        double precision NOT NULL,
    last_ts     timestamptz NOT NULL,
    last_id     bigint NOT NULL,
    last        double precision NOT NULL
-- Emptied every second: vacuumed by the count of rows gone, not by a share of a tiny table.
) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 20000);
"#,
    ),
    (
        8,
        "minute rollups expire",
        r#"
-- Minute rollups expire by their minute (`rollup_minute_days`): found without a scan. Built in
-- the migration's transaction, in time proportional to the table (once).
CREATE INDEX rollups_minute_age ON rollups (bucket) WHERE step = 'minute';
"#,
    ),
    (
        9,
        "one rollup folder",
        r#"
-- Who folds the rollups (crate::servers::rollups::is_folder): one process for all, its lease
-- renewed by each fold; once it runs out, the next process to try takes over.
CREATE TABLE rollup_folder (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    holder  text NOT NULL,
    until   timestamptz NOT NULL
);
INSERT INTO rollup_folder (holder, until) VALUES ('', '-infinity');
"#,
    ),
];

/// Create the database if it is missing, then apply pending migrations.
pub async fn migrate(url: &str) -> Result<Vec<i32>, StoreError> {
    let client = match connect(url).await {
        Err(StoreError::Unavailable(e)) if e.code() == Some(&SqlState::INVALID_CATALOG_NAME) => {
            create_database(url).await?;
            connect(url).await?
        }
        other => other?,
    };
    let mut client = client;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version int PRIMARY KEY, name text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .or_else(|e| {
            // Two processes racing on a brand-new database: the other one created it.
            if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
                Ok(())
            } else {
                Err(StoreError::Unavailable(e))
            }
        })?;
    let tx = client
        .transaction()
        .await
        .map_err(StoreError::Unavailable)?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&super::postgres::locks::MIGRATE],
    )
    .await
    .map_err(StoreError::Unavailable)?;
    let current: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM schema_migrations",
            &[],
        )
        .await
        .map_err(StoreError::Unavailable)?
        .get(0);
    let mut applied = Vec::new();
    for (version, name, sql) in super::schema::MIGRATIONS.iter().filter(|m| m.0 > current) {
        tx.batch_execute(sql)
            .await
            .map_err(StoreError::Unavailable)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await
        .map_err(StoreError::Unavailable)?;
        applied.push(*version);
    }
    tx.commit().await.map_err(StoreError::Unavailable)?;
    Ok(applied)
}

async fn create_database(url: &str) -> Result<(), StoreError> {
    let (mut config, tls) = super::pg_tls::parse(url).map_err(StoreError::Url)?;
    let name = config
        .get_dbname()
        .ok_or_else(|| StoreError::Url("no database name".into()))?
        .to_string();
    if !crate::event::is_valid_id(&name) {
        return Err(StoreError::Url(format!(
            "database name {name:?} must match [A-Za-z0-9_.-]{{1,64}} to be created by hearth"
        )));
    }
    config.dbname("postgres");
    config.connect_timeout(std::time::Duration::from_secs(5));
    let client = super::postgres::open(&config, tls).await?;
    match client
        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .await
    {
        Ok(()) => {
            tracing::info!(database = %name, "created database");
            Ok(())
        }
        Err(e) if e.code() == Some(&SqlState::DUPLICATE_DATABASE) => Ok(()),
        Err(e) => Err(StoreError::Unavailable(e)),
    }
}
