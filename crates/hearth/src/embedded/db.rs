//! The embedded store's SQLite database: one file in the data folder, used from threads of its
//! own so that no query ever runs on the async executor.
//!
//! [`Sqlite`] owns one connection on one OS thread and runs the closures it is sent, in order:
//! the writer (queue appends, batch writes, acknowledgements) and the reader (the API's queries)
//! are two of them, so a long write never delays a read (WAL mode). `synchronous = FULL`: a
//! commit is on disk before the call returns, so what the broker acknowledged after it survives
//! a crash of the process and of the machine.

use std::path::Path;

use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::seam::Unavailable;

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// One connection on its own thread.
#[derive(Clone)]
pub struct Sqlite {
    jobs: std::sync::mpsc::Sender<Job>,
}

/// The schema, by version, applied in order (`PRAGMA user_version` says which ones are in). A
/// released version is never edited: a change is a new one.
const SCHEMA_1: &str = r#"
CREATE TABLE queue (
    -- Append order; within a lane, the order events are stored in.
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    lane        TEXT NOT NULL,
    critical    INTEGER NOT NULL,
    -- The number of events in `body`, a JSON array of events as in a Redis stream entry.
    n           INTEGER NOT NULL,
    body        TEXT NOT NULL
);
CREATE INDEX queue_order ON queue (critical DESC, id);

CREATE TABLE events (
    id          INTEGER PRIMARY KEY,
    house_id    TEXT NOT NULL,
    sensor_id   TEXT NOT NULL,
    kind        TEXT NOT NULL,
    value       REAL NOT NULL,
    unit        TEXT,
    seq         INTEGER,
    ingest_id   TEXT,
    ts          INTEGER NOT NULL,
    received_us INTEGER NOT NULL,
    stored_us   INTEGER NOT NULL,
    critical    INTEGER NOT NULL
);
CREATE UNIQUE INDEX events_dedup_seq ON events (sensor_id, kind, seq) WHERE seq IS NOT NULL;
CREATE UNIQUE INDEX events_dedup_ingest ON events (ingest_id) WHERE ingest_id IS NOT NULL;
CREATE INDEX events_history ON events (sensor_id, ts DESC, id DESC);

CREATE TABLE sensors (
    sensor_id   TEXT PRIMARY KEY,
    house_id    TEXT NOT NULL,
    -- Comma-separated, sorted.
    kinds       TEXT NOT NULL,
    first_seen  INTEGER NOT NULL,
    last_seen   INTEGER NOT NULL
);
CREATE INDEX sensors_house ON sensors (house_id);

CREATE TABLE alerts (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    house_id        TEXT NOT NULL,
    sensor_id       TEXT NOT NULL,
    rule            TEXT NOT NULL,
    kind            TEXT NOT NULL,
    severity        TEXT NOT NULL,
    state           TEXT NOT NULL,
    message         TEXT NOT NULL,
    value           REAL,
    raised_at       INTEGER NOT NULL,
    raised_by       TEXT NOT NULL,
    acknowledged_at INTEGER,
    acknowledged_by TEXT,
    cleared_at      INTEGER,
    cleared_by      TEXT
);
CREATE UNIQUE INDEX alerts_one_open ON alerts (sensor_id, rule) WHERE state <> 'cleared';
CREATE INDEX alerts_house ON alerts (house_id, id DESC);

CREATE TABLE rule_state (
    sensor_id       TEXT NOT NULL,
    rule            TEXT NOT NULL,
    pending_since   INTEGER,
    transition_key  TEXT,
    PRIMARY KEY (sensor_id, rule)
);

CREATE TABLE dead (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    reason  TEXT NOT NULL,
    detail  TEXT NOT NULL,
    topic   TEXT NOT NULL,
    payload BLOB NOT NULL,
    source  TEXT NOT NULL,
    at      INTEGER NOT NULL
);

-- The loss accounting, under the names of the Redis `P:stats` hash.
CREATE TABLE stats (
    name    TEXT PRIMARY KEY,
    value   INTEGER NOT NULL
);

CREATE TABLE tokens (
    hash        BLOB PRIMARY KEY,
    house_id    TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);
"#;

/// The usual interval between a sensor's readings (EWMA, ms), for the offline rule.
const SCHEMA_2: &str = "ALTER TABLE sensors ADD COLUMN interval_ms REAL;";

/// Webhook notifications to deliver: written with the alert transition, deleted once delivered
/// or dead-lettered.
const SCHEMA_3: &str =
    "CREATE TABLE notify (id INTEGER PRIMARY KEY AUTOINCREMENT, alert TEXT NOT NULL);";

/// A sensor is (house, sensor): every key that named a sensor alone names its house too; houses
/// are counted for `max_houses`; tokens get a public id and an expiry. Rebuilt from the events,
/// as on PostgreSQL (`store/schema.rs`, migration 3), whose comments say why.
const SCHEMA_4: &str = r#"
DROP INDEX events_dedup_seq;
CREATE UNIQUE INDEX events_dedup_seq ON events (house_id, sensor_id, kind, seq) WHERE seq IS NOT NULL;
DROP INDEX events_history;
CREATE INDEX events_history ON events (house_id, sensor_id, ts DESC, id DESC);
CREATE TABLE sensors_by_house (
    house_id    TEXT NOT NULL,
    sensor_id   TEXT NOT NULL,
    -- Comma-separated.
    kinds       TEXT NOT NULL,
    first_seen  INTEGER NOT NULL,
    last_seen   INTEGER NOT NULL,
    interval_ms REAL,
    PRIMARY KEY (house_id, sensor_id)
) WITHOUT ROWID;
INSERT INTO sensors_by_house (house_id, sensor_id, kinds, first_seen, last_seen, interval_ms)
SELECT e.house_id, e.sensor_id, group_concat(DISTINCT e.kind),
       min(e.received_us) / 1000, max(e.received_us) / 1000,
       (SELECT s.interval_ms FROM sensors s WHERE s.sensor_id = e.sensor_id AND s.house_id = e.house_id)
FROM events e GROUP BY e.house_id, e.sensor_id;

CREATE TABLE houses (
    house_id    TEXT PRIMARY KEY,
    first_seen  INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO houses (house_id, first_seen)
SELECT house_id, min(first_seen) FROM sensors_by_house GROUP BY house_id;

CREATE TABLE rule_state_by_house (
    house_id        TEXT NOT NULL,
    sensor_id       TEXT NOT NULL,
    rule            TEXT NOT NULL,
    pending_since   INTEGER,
    transition_key  TEXT,
    PRIMARY KEY (house_id, sensor_id, rule)
) WITHOUT ROWID;
INSERT INTO rule_state_by_house (house_id, sensor_id, rule, pending_since, transition_key)
SELECT s.house_id, r.sensor_id, r.rule, r.pending_since,
       CASE WHEN length(r.transition_key) = 53 AND r.transition_key NOT GLOB '*[^0-9]*'
            THEN printf('%015d', min(CAST(substr(r.transition_key, 1, 15) AS INTEGER),
                                     CAST(substr(r.transition_key, 37, 17) AS INTEGER) / 1000))
                 || substr(r.transition_key, 16)
            ELSE r.transition_key END
FROM rule_state r JOIN sensors_by_house s ON s.sensor_id = r.sensor_id;

DROP TABLE rule_state;
ALTER TABLE rule_state_by_house RENAME TO rule_state;
DROP TABLE sensors;
ALTER TABLE sensors_by_house RENAME TO sensors;

DROP INDEX alerts_one_open;
CREATE UNIQUE INDEX alerts_one_open ON alerts (house_id, sensor_id, rule) WHERE state <> 'cleared';

ALTER TABLE tokens ADD COLUMN id TEXT;
ALTER TABLE tokens ADD COLUMN expires_at INTEGER;
UPDATE tokens SET id = lower(hex(substr(hash, 1, 6)));
CREATE UNIQUE INDEX tokens_id ON tokens (id);
"#;

/// Which state of an alert was last pushed, so that a worker starting over pushes what a crash
/// left unpushed (the alerts before this version count as pushed).
const SCHEMA_5: &str = "
ALTER TABLE alerts ADD COLUMN notified_state TEXT;
UPDATE alerts SET notified_state = state;
";

/// Values are stored in their kind's canonical unit; the unit the device sent is kept when the
/// value was converted from it.
const SCHEMA_6: &str = "ALTER TABLE events ADD COLUMN source_unit TEXT;";

/// The broker's persistent sessions (clean session off): their subscriptions, and the messages
/// waiting for their clients, in the order they came (`sessions.rs`).
const SCHEMA_8: &str = "
CREATE TABLE mqtt_sessions (
    client_id TEXT PRIMARY KEY,
    at_us     INTEGER NOT NULL
);
CREATE TABLE mqtt_subscriptions (
    client_id TEXT NOT NULL,
    filter    TEXT NOT NULL,
    qos       INTEGER NOT NULL,
    PRIMARY KEY (client_id, filter)
);
-- AUTOINCREMENT: ids only grow (never reused), so a session reads its outbox in publish order
-- and the packet id a message goes out with follows from its row.
CREATE TABLE mqtt_outbox (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    client_id TEXT NOT NULL,
    topic     TEXT NOT NULL,
    payload   BLOB NOT NULL,
    qos       INTEGER NOT NULL,
    released  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX mqtt_outbox_by_client ON mqtt_outbox (client_id, id);
";

/// The broker's retained messages, and the wills of its connected clients (`kept.rs`).
const SCHEMA_7: &str = "
CREATE TABLE retained (
    topic   TEXT PRIMARY KEY,
    payload BLOB NOT NULL
);
CREATE TABLE wills (
    session TEXT PRIMARY KEY,
    topic   TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain  INTEGER NOT NULL,
    at_us   INTEGER NOT NULL
);
-- Home Assistant discovery configs (config topic → payload), read by the intake at start.
CREATE TABLE discovery (
    topic   TEXT PRIMARY KEY,
    payload BLOB NOT NULL
);
-- Which device each sensor of a device ecosystem belongs to (JSON: id, ecosystem, model, maker).
CREATE TABLE devices (
    house_id  TEXT NOT NULL,
    sensor_id TEXT NOT NULL,
    info      TEXT NOT NULL,
    PRIMARY KEY (house_id, sensor_id)
);
-- What bridges say of their devices (Zigbee2MQTT's bridge/devices): model and maker.
CREATE TABLE catalog (
    house_id  TEXT NOT NULL,
    device_id TEXT NOT NULL,
    info      TEXT NOT NULL,
    PRIMARY KEY (house_id, device_id)
);
";

/// Rollups per minute, hour and day ([`crate::series`]), built from the events already stored.
const SCHEMA_9: &str = r"
CREATE TABLE rollups (
    house_id  TEXT NOT NULL,
    sensor_id TEXT NOT NULL,
    kind      TEXT NOT NULL,
    step      TEXT NOT NULL,
    -- The bucket's start, epoch ms (UTC).
    bucket    INTEGER NOT NULL,
    n         INTEGER NOT NULL,
    total     REAL NOT NULL,
    low       REAL NOT NULL,
    high      REAL NOT NULL,
    last_ts   INTEGER NOT NULL,
    last_id   INTEGER NOT NULL,
    last      REAL NOT NULL,
    PRIMARY KEY (house_id, sensor_id, kind, step, bucket)
) WITHOUT ROWID;
WITH steps (step, ms) AS (VALUES ('minute', 60000), ('hour', 3600000), ('day', 86400000)),
b AS (
    SELECT e.house_id, e.sensor_id, e.kind, e.value, e.ts, e.id, s.step,
           e.ts - ((e.ts % s.ms) + s.ms) % s.ms AS bucket
    FROM events e, steps s
),
r AS (
    SELECT *, row_number() OVER (PARTITION BY house_id, sensor_id, kind, step, bucket
                                 ORDER BY ts DESC, id DESC) AS rn
    FROM b
)
INSERT INTO rollups
SELECT house_id, sensor_id, kind, step, bucket, count(*), sum(value), min(value), max(value),
       max(ts), max(CASE WHEN rn = 1 THEN id END), max(CASE WHEN rn = 1 THEN value END)
FROM r GROUP BY house_id, sensor_id, kind, step, bucket;
-- The last event summed into the rollups: the rows past it are the ones to add.
CREATE TABLE rollup_mark (id INTEGER NOT NULL);
INSERT INTO rollup_mark SELECT coalesce(max(id), 0) FROM events;
";

/// Minute rollups expire by their minute (`rollup_minute_days`): found without a scan.
const SCHEMA_10: &str = r"
CREATE INDEX rollups_minute_age ON rollups (bucket) WHERE step = 'minute';
";

const MIGRATIONS: &[(i64, &str)] = &[
    (1, SCHEMA_1),
    (2, SCHEMA_2),
    (3, SCHEMA_3),
    (4, SCHEMA_4),
    (5, SCHEMA_5),
    (6, SCHEMA_6),
    (7, SCHEMA_7),
    (8, SCHEMA_8),
    (9, SCHEMA_9),
    (10, SCHEMA_10),
];

/// The schema versions, for tests that build a data folder of an earlier version.
pub fn migrations() -> &'static [(i64, &'static str)] {
    MIGRATIONS
}

impl Sqlite {
    /// Open (creating the folder, the file and the schema as needed) and start the thread.
    pub fn open(dir: &Path, name: &str) -> Result<Sqlite, String> {
        Sqlite::pool(dir, name, 1)
    }

    /// `threads` connections on a thread each, taking jobs from one queue in turn: a slow read
    /// holds one of them, the others keep answering.
    pub fn pool(dir: &Path, name: &str, threads: usize) -> Result<Sqlite, String> {
        let path = private_file(dir)?;
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        for i in 0..threads.max(1) {
            let mut conn = Connection::open(&path)
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            setup(&mut conn, cache_kib(name)).map_err(|e| format!("{}: {e}", path.display()))?;
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("hearth-sqlite-{name}-{i}"))
                .spawn(move || {
                    loop {
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(&mut conn),
                            Err(_) => return,
                        }
                    }
                })
                .map_err(|e| format!("cannot start the store thread: {e}"))?;
        }
        Ok(Sqlite { jobs })
    }

    /// Run `f` on the connection's thread and wait for its answer.
    pub async fn call<T, F>(&self, f: F) -> Result<T, Unavailable>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let _ = tx.send(f(conn));
        });
        self.jobs
            .send(job)
            .map_err(|_| Unavailable("embedded store: its thread stopped".into()))?;
        rx.await
            .map_err(|_| Unavailable("embedded store: its thread stopped".into()))?
            .map_err(|e| Unavailable(format!("embedded store: {e}")))
    }
}

/// The data folder (made if missing) and its database file, readable by this user alone: they
/// hold every house's readings, tokens' hashes and dead letters (raw payloads). The folder is
/// 0700 and the files 0600 whatever the umask; SQLite gives its `-wal` and `-shm` files the
/// database file's mode.
pub fn private_file(dir: &Path) -> Result<std::path::PathBuf, String> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create data_dir {}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("cannot make data_dir {} private: {e}", dir.display()))?;
    let path = dir.join("hearth.sqlite3");
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    for suffix in ["", "-wal", "-shm"] {
        let file = dir.join(format!("hearth.sqlite3{suffix}"));
        if file.exists() {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("cannot make {} private: {e}", file.display()))?;
        }
    }
    Ok(path)
}

/// Page cache per connection, in KiB. The writer's holds the pages every batch touches: the
/// newest leaf of each sensor's range in the dedup and history indexes of `events` (two 4 KiB
/// pages per sensor, 16 MiB for 2,000 sensors), wherever the table has grown to. SQLite's
/// default (2 MiB) made it read pages back from the file and spill dirty ones into the WAL in
/// mid-transaction: most of the CPU spent per event in `hearth bench --embedded`.
fn cache_kib(name: &str) -> i64 {
    if name == "writer" {
        16 * 1024
    } else {
        8 * 1024
    }
}

fn setup(conn: &mut Connection, cache_kib: i64) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "cache_size", -cache_kib)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // Checkpoint every 16 MiB of WAL rather than 4: a hot index page dirtied by many commits is
    // copied to the database once per checkpoint. The file is cut back after each one.
    conn.pragma_update(None, "wal_autocheckpoint", 4096)?;
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
    let latest = MIGRATIONS.last().map_or(0, |m| m.0);
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version < latest {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Another connection may have migrated meanwhile.
        let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (v, sql) in MIGRATIONS.iter().filter(|m| m.0 > version) {
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", v)?;
        }
        tx.commit()?;
    }
    Ok(())
}

/// Add `n` to a loss-accounting counter.
pub fn bump(conn: &Connection, name: &str, n: u64) -> rusqlite::Result<()> {
    if n > 0 {
        conn.prepare_cached(
            "INSERT INTO stats (name, value) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
        )?
        .execute(rusqlite::params![name, n as i64])?;
    }
    Ok(())
}
