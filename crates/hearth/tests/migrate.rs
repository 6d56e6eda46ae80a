//! Upgrades keep existing data: a store of the last schema before identity became (house,
//! sensor), filled as that version filled it (a shared `kitchen`, re-homed to the house that
//! wrote it last; rule state keyed by sensor alone, one transition key left by a reading stamped
//! a day ahead), migrated by this version on both backends; and the Redis side (latest values
//! under old keys, events queued under the old routing).

mod support;

use hearth::Lane;
use hearth::event::Event;
use hearth::servers::queue::Queue;
use rusqlite::params;
use support::*;

/// An order key of the earlier versions: the reading's stamp, seq, receive time.
fn old_key(ts_ms: i64, seq: i64, received_us: i64) -> String {
    format!("{ts_ms:015}1{seq:020}{received_us:017}")
}

const NOW_MS: i64 = 1_764_139_200_000;
const DAY_MS: i64 = 86_400_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_from_schema_1_keeps_every_house_s_data() {
    postgres_from(1, "migrate_pg1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_from_schema_2_keeps_every_house_s_data() {
    postgres_from(2, "migrate_pg2").await;
}

/// A database as version `from` of the schema left it, with data, migrated to the last.
/// A database of this test as schema version `from` left it (no data yet).
async fn postgres_at(env: &Env, from: usize) -> tokio_postgres::Client {
    let admin = connect_pg(PG_ADMIN).await;
    admin
        .batch_execute(&format!("CREATE DATABASE \"hearth_t_{}\"", env.name))
        .await
        .expect("create database");
    let pg = env.pg().await;
    pg.batch_execute(
        "CREATE TABLE schema_migrations (version int PRIMARY KEY, name text NOT NULL,
         applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .expect("schema_migrations");
    for (version, name, sql) in &hearth::servers::schema::MIGRATIONS[..from] {
        pg.batch_execute(sql).await.expect("old migration");
        pg.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await
        .expect("record");
    }
    pg
}

async fn postgres_from(from: usize, name: &str) {
    let env = Env::new(name);
    let pg = postgres_at(&env, from).await;
    // As that version left it: both houses' `kitchen` in one row, re-homed to h2.
    pg.batch_execute(&format!(
        "INSERT INTO events (house_id, sensor_id, kind, value, seq, ts, received_at)
         VALUES ('h1', 'kitchen', 'temperature', 20.5, 1, to_timestamp({t}), to_timestamp({t})),
                ('h2', 'kitchen', 'humidity', 40, 1, to_timestamp({t}), to_timestamp({t})),
                ('h2', 'smoke1', 'smoke', 1, 1, to_timestamp({t}), to_timestamp({t}));
         INSERT INTO sensors (sensor_id, house_id, kinds, first_seen, last_seen)
         VALUES ('kitchen', 'h2', '{{humidity,temperature}}', to_timestamp({t}), to_timestamp({t})),
                ('smoke1', 'h2', '{{smoke}}', to_timestamp({t}), to_timestamp({t}));",
        t = NOW_MS / 1000,
    ))
    .await
    .expect("version 1 data");
    if from >= 2 {
        pg.batch_execute(&format!(
            "UPDATE sensors SET interval_ms = 1000 WHERE sensor_id = 'kitchen';
             INSERT INTO alerts (house_id, sensor_id, lane, rule, kind, severity, state, message,
                                 raised_at, raised_by)
             VALUES ('h2', 'smoke1', 'critical', 'smoke', 'smoke', 'critical', 'active', 'Smoke',
                     to_timestamp({t}), 'smoke1/smoke/1');
             INSERT INTO rule_state (sensor_id, rule, transition_key)
             VALUES ('smoke1', 'smoke', '{key}');
             INSERT INTO tokens (hash, house_id) VALUES ('\\x0102030405060708', 'h1');",
            t = NOW_MS / 1000,
            key = old_key(NOW_MS + DAY_MS, 1, NOW_MS * 1000),
        ))
        .await
        .expect("version 2 data");
    }

    let applied = hearth::servers::schema::migrate(&env.database_url)
        .await
        .expect("migrate");
    assert_eq!(
        applied,
        hearth::servers::schema::MIGRATIONS[from..]
            .iter()
            .map(|m| m.0)
            .collect::<Vec<_>>()
    );
    let interval = (from >= 2).then_some(1000.0);

    let rows: Vec<(String, String, Vec<String>, Option<f64>)> = pg
        .query(
            "SELECT house_id, sensor_id, kinds, interval_ms FROM sensors ORDER BY 1, 2",
            &[],
        )
        .await
        .expect("sensors")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        rows,
        [
            (
                "h1".into(),
                "kitchen".into(),
                vec!["temperature".into()],
                None
            ),
            (
                "h2".into(),
                "kitchen".into(),
                vec!["humidity".into()],
                interval
            ),
            ("h2".into(), "smoke1".into(), vec!["smoke".into()], None),
        ],
        "each house's sensor with its own kinds"
    );
    let houses: Vec<String> = pg
        .query("SELECT house_id FROM houses ORDER BY 1", &[])
        .await
        .expect("houses")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(houses, ["h1", "h2"]);
    if from >= 2 {
        let state = pg
            .query_one(
                "SELECT house_id, transition_key FROM rule_state WHERE sensor_id = 'smoke1'",
                &[],
            )
            .await
            .expect("rule state");
        assert_eq!(state.get::<_, String>(0), "h2");
        assert_eq!(
            state.get::<_, String>(1),
            old_key(NOW_MS, 1, NOW_MS * 1000),
            "the key a day ahead now counts from its receipt"
        );
        let token = pg
            .query_one("SELECT id, house_id FROM tokens", &[])
            .await
            .expect("token");
        assert_eq!(
            (token.get::<_, String>(0), token.get::<_, String>(1)),
            ("010203040506".into(), "h1".into())
        );
    }
    assert_eq!(count_events(&pg).await, 3);
    // The same ids in another house are now another alarm.
    pg.execute(
        "INSERT INTO alerts (house_id, sensor_id, lane, rule, kind, severity, state, message,
                             raised_at, raised_by)
         VALUES ('h1', 'smoke1', 'critical', 'smoke', 'smoke', 'critical', 'active', 'Smoke',
                 now(), 'h1/smoke1/smoke/1')",
        &[],
    )
    .await
    .expect("a second open alarm of another house");
    assert!(
        hearth::servers::schema::migrate(&env.database_url)
            .await
            .expect("again")
            .is_empty()
    );
}

/// Version 3 left events without the unit they were sent in: kept, with none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_from_schema_3_keeps_its_events_without_a_source_unit() {
    let env = Env::new("migrate_pg3");
    let pg = postgres_at(&env, 3).await;
    pg.batch_execute(
        "INSERT INTO events (house_id, sensor_id, kind, value, unit, seq, ts, received_at)
         VALUES ('h1', 'kitchen', 'temperature', 20.5, '°C', 1, now(), now())",
    )
    .await
    .expect("version 3 data");
    hearth::servers::schema::migrate(&env.database_url)
        .await
        .expect("migrate");
    let row = pg
        .query_one("SELECT value, unit, source_unit FROM events", &[])
        .await
        .expect("the event");
    assert_eq!(row.get::<_, f64>(0), 20.5);
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("°C"));
    assert_eq!(row.get::<_, Option<String>>(2), None);
    let latest: i32 = pg
        .query_one("SELECT max(version) FROM schema_migrations", &[])
        .await
        .expect("version")
        .get(0);
    assert_eq!(latest as usize, hearth::servers::schema::MIGRATIONS.len());
}

/// A data folder's file as schema version `from` left it (no data yet).
fn sqlite_at(dir: &std::path::Path, from: usize) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(dir.join("hearth.sqlite3")).expect("sqlite");
    for (v, sql) in &hearth::embedded::db::migrations()[..from] {
        c.execute_batch(sql).expect("old schema");
        c.pragma_update(None, "user_version", v).expect("version");
    }
    c
}

/// Open (and so migrate) a data folder.
async fn open(dir: &std::path::Path) -> hearth::embedded::Embedded {
    hearth::embedded::Embedded::open(
        dir,
        8,
        0,
        Default::default(),
        Default::default(),
        Default::default(),
        Default::default(),
    )
    .await
    .expect("open and migrate")
}

/// Version 5 left events without the unit they were sent in: kept, with none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_from_schema_5_keeps_its_events_without_a_source_unit() {
    let env = Env::embedded("migrate_sqlite5");
    let dir = env.scratch.0.join("data");
    std::fs::create_dir_all(&dir).expect("data dir");
    {
        let c = sqlite_at(&dir, 5);
        c.execute_batch(&format!(
            "INSERT INTO events (house_id, sensor_id, kind, value, unit, seq, ts, received_us,
                                 stored_us, critical)
             VALUES ('h1', 'kitchen', 'temperature', 20.5, '°C', 1, {NOW_MS}, {us}, {us}, 0);",
            us = NOW_MS * 1000
        ))
        .expect("version 5 data");
    }
    let e = open(&dir).await;
    drop(e);
    let c = rusqlite::Connection::open(dir.join("hearth.sqlite3")).expect("sqlite");
    let (value, unit, source_unit): (f64, Option<String>, Option<String>) = c
        .query_row("SELECT value, unit, source_unit FROM events", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .expect("the event");
    assert_eq!(
        (value, unit.as_deref(), source_unit),
        (20.5, Some("°C"), None)
    );
    let version: i64 = c
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .expect("version");
    assert_eq!(version, hearth::embedded::db::migrations().len() as i64);
}

/// Versions 6 and 7 had no broker sessions: what the broker kept (retained messages, discovery
/// configs) and the events stay, and no session is made up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_from_schema_7_keeps_what_the_broker_kept() {
    let env = Env::embedded("migrate_sqlite7");
    let dir = env.scratch.0.join("data");
    std::fs::create_dir_all(&dir).expect("data dir");
    {
        let c = sqlite_at(&dir, 7);
        c.execute_batch(&format!(
            "INSERT INTO events (house_id, sensor_id, kind, value, unit, seq, ts, received_us,
                                 stored_us, critical, source_unit)
             VALUES ('h1', 'kitchen', 'temperature', 20.5, NULL, 1, {NOW_MS}, {us}, {us}, 0, '°F');
             INSERT INTO retained (topic, payload) VALUES ('zigbee2mqtt/lamp/availability', x'6f6e');
             INSERT INTO discovery (topic, payload) VALUES ('homeassistant/sensor/a/t/config', x'7b7d');",
            us = NOW_MS * 1000
        ))
        .expect("version 7 data");
    }
    let e = open(&dir).await;
    drop(e);
    let c = rusqlite::Connection::open(dir.join("hearth.sqlite3")).expect("sqlite");
    let count = |table: &str| -> i64 {
        c.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .expect(table)
    };
    assert_eq!(
        [
            count("events"),
            count("retained"),
            count("discovery"),
            count("mqtt_sessions"),
            count("mqtt_outbox"),
        ],
        [1, 1, 1, 0, 0]
    );
    let version: i64 = c
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .expect("version");
    assert_eq!(version, hearth::embedded::db::migrations().len() as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_from_schema_1_keeps_every_house_s_data() {
    sqlite_from(1, "migrate_sqlite1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_from_schema_2_keeps_every_house_s_data() {
    sqlite_from(2, "migrate_sqlite2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_from_schema_3_keeps_every_house_s_data() {
    sqlite_from(3, "migrate_sqlite3").await;
}

/// Version 5 tracks which state of an alert was pushed: the alerts from before count as pushed
/// (nobody is alerted twice by an upgrade), and the new ones are not until they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_from_schema_4_counts_its_alerts_pushed() {
    let env = Env::embedded("migrate_sqlite4");
    let dir = env.scratch.0.join("data");
    std::fs::create_dir_all(&dir).expect("data dir");
    {
        let c = sqlite_at(&dir, 4);
        c.execute_batch(&format!(
            "INSERT INTO alerts (house_id, sensor_id, rule, kind, severity, state, message,
                                 raised_at, raised_by)
             VALUES ('h2', 'smoke1', 'smoke', 'smoke', 'critical', 'active', 'Smoke', {NOW_MS}, 'x'),
                    ('h2', 'door', 'intrusion', 'alarm', 'critical', 'cleared', 'Alarm', {NOW_MS}, 'y');"
        ))
        .expect("version 4 data");
    }
    let e = open(&dir).await;
    for lane in std::iter::once(hearth::Lane::Critical).chain(hearth::Lane::routine(8)) {
        let left = e.seams.alerts.unpushed(lane).await.expect("unpushed");
        assert!(left.is_empty(), "{lane}: {left:?}");
    }
    assert_eq!(
        e.seams
            .alerts
            .list(None, None, 10)
            .await
            .expect("list")
            .len(),
        2
    );
    let c = rusqlite::Connection::open(dir.join("hearth.sqlite3")).expect("sqlite");
    let version: i64 = c
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .expect("version");
    assert_eq!(version, hearth::embedded::db::migrations().len() as i64);
}

/// A data folder as version `from` of the schema left it, with data, opened by this version.
async fn sqlite_from(from: usize, name: &str) {
    let env = Env::embedded(name);
    let dir = env.scratch.0.join("data");
    std::fs::create_dir_all(&dir).expect("data dir");
    {
        let c = sqlite_at(&dir, from);
        let t = NOW_MS;
        let r = NOW_MS * 1000;
        for (house, sensor, kind, value) in [
            ("h1", "kitchen", "temperature", 20.5),
            ("h2", "kitchen", "humidity", 40.0),
            ("h2", "smoke1", "smoke", 1.0),
        ] {
            c.execute(
                "INSERT INTO events (house_id, sensor_id, kind, value, seq, ts, received_us,
                                     stored_us, critical)
                 VALUES (?1, ?2, ?3, ?4, 1, ?5, ?6, ?6, 0)",
                params![house, sensor, kind, value, t, r],
            )
            .expect("event");
        }
        c.execute_batch(&format!(
            "INSERT INTO sensors (sensor_id, house_id, kinds, first_seen, last_seen)
             VALUES ('kitchen', 'h2', 'humidity,temperature', {t}, {t}),
                    ('smoke1', 'h2', 'smoke', {t}, {t});
             INSERT INTO alerts (house_id, sensor_id, rule, kind, severity, state, message,
                                 raised_at, raised_by)
             VALUES ('h2', 'smoke1', 'smoke', 'smoke', 'critical', 'active', 'Smoke', {t}, 'x');
             INSERT INTO rule_state (sensor_id, rule, transition_key) VALUES ('smoke1', 'smoke', '{key}');
             INSERT INTO tokens (hash, house_id, created_at) VALUES (x'0102030405060708', 'h1', {t});",
            key = old_key(NOW_MS + DAY_MS, 1, r),
        ))
        .expect("version 1 data");
        if from >= 2 {
            c.execute_batch("UPDATE sensors SET interval_ms = 1000 WHERE sensor_id = 'kitchen'")
                .expect("version 2 data");
        }
        if from >= 3 {
            c.execute_batch("INSERT INTO notify (alert) VALUES ('{}')")
                .expect("version 3 data");
        }
    }
    let e = open(&dir).await;
    let store = &e.seams.store;
    let h1 = store
        .sensor("h1", "kitchen")
        .await
        .expect("h1")
        .expect("h1's kitchen");
    assert_eq!(h1.kinds, ["temperature"]);
    let h2 = store
        .sensor("h2", "kitchen")
        .await
        .expect("h2")
        .expect("h2's kitchen");
    assert_eq!(h2.kinds, ["humidity"]);
    let houses: Vec<String> = store
        .houses(None)
        .await
        .expect("houses")
        .into_iter()
        .map(|h| h.house_id)
        .collect();
    assert_eq!(houses, ["h1", "h2"]);
    let tokens = store.tokens().await.expect("tokens");
    assert_eq!(tokens[0].id, "010203040506");
    let c = rusqlite::Connection::open(dir.join("hearth.sqlite3")).expect("sqlite");
    let (house, key): (String, String) = c
        .query_row(
            "SELECT house_id, transition_key FROM rule_state WHERE sensor_id = 'smoke1'",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .expect("rule state");
    assert_eq!(house, "h2");
    assert_eq!(key, old_key(NOW_MS, 1, NOW_MS * 1000));
    let version: i64 = c
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .expect("version");
    assert_eq!(version, hearth::embedded::db::migrations().len() as i64);
    let interval: Option<f64> = c
        .query_row(
            "SELECT interval_ms FROM sensors WHERE house_id = 'h2' AND sensor_id = 'kitchen'",
            [],
            |row| row.get(0),
        )
        .expect("interval");
    assert_eq!(
        interval,
        (from >= 2).then_some(1000.0),
        "kept from version 2 on"
    );
    let jobs: i64 = c
        .query_row("SELECT count(*) FROM notify", [], |row| row.get(0))
        .expect("notify");
    assert_eq!(jobs, i64::from(from >= 3), "webhook jobs kept");
    let events: i64 = c
        .query_row("SELECT count(*) FROM events", [], |row| row.get(0))
        .expect("events");
    assert_eq!(events, 3);
    // The latest values read in through the migrated index.
    let latest = e
        .seams
        .cache
        .latest("h2", &["kitchen".to_string()])
        .await
        .expect("latest");
    assert!(latest[0].contains_key("humidity"), "{latest:?}");
}

/// Latest values cached under the old keys (`P:latest:{sensor}`) move to their houses' keys;
/// events queued under the old routing are drained before appends route by (house, sensor).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keys_and_routing_move_to_house_and_sensor() {
    let env = Env::new("migrate_redis");
    let mut redis = env.redis().await;
    let p = &env.redis_prefix;
    let value = |house: &str, v: f64| {
        format!(
            "{}{{\"value\":{v},\"unit\":null,\"ts\":{NOW_MS},\"seq\":1,\"received_us\":{},\"house_id\":\"{house}\"}}",
            old_key(NOW_MS, 1, NOW_MS * 1000),
            NOW_MS * 1000
        )
    };
    let _: () = redis::cmd("HSET")
        .arg(format!("{p}:latest:kitchen"))
        .arg("temperature")
        .arg(value("h1", 20.5))
        .arg("humidity")
        .arg(value("h2", 40.0))
        .query_async(&mut redis)
        .await
        .expect("old cache");
    let queue = Queue::open(REDIS, p, 8).expect("queue");
    let cache = hearth::servers::cache::Cache::new(queue.conn.clone(), queue.keys.clone());
    assert_eq!(cache.migrate_unscoped().await.expect("migrate"), 1);
    let h1 = cache
        .latest("h1", &["kitchen".to_string()])
        .await
        .expect("h1");
    let h2 = cache
        .latest("h2", &["kitchen".to_string()])
        .await
        .expect("h2");
    assert_eq!(
        (
            h1[0].keys().map(String::as_str).collect::<Vec<_>>(),
            h2[0].keys().map(String::as_str).collect::<Vec<_>>()
        ),
        (vec!["temperature"], vec!["humidity"])
    );
    let old: bool = redis::cmd("EXISTS")
        .arg(format!("{p}:latest:kitchen"))
        .query_async(&mut redis)
        .await
        .expect("exists");
    assert!(!old, "the old key is gone");

    // Five routine events queued by the earlier version (counters only: no route recorded).
    let _: () = redis::cmd("HSET")
        .arg(format!("{p}:stats"))
        .arg("in:routine-3")
        .arg(5)
        .query_async(&mut redis)
        .await
        .expect("old counters");
    let e = Event {
        house_id: "h1".into(),
        sensor_id: "kitchen".into(),
        kind: "temperature".into(),
        value: 21.0,
        unit: None,
        source_unit: None,
        seq: Some(2),
        ts_ms: NOW_MS,
        received_us: NOW_MS * 1000,
        ingest_id: None,
    };
    let err = queue.append(&[&e], &[]).await.expect_err("held back");
    assert!(err.to_string().contains("earlier hearth version"), "{err}");
    // The workers drained them.
    let _: () = redis::cmd("HSET")
        .arg(format!("{p}:stats"))
        .arg("out:routine-3")
        .arg(5)
        .query_async(&mut redis)
        .await
        .expect("drained");
    queue.append(&[&e], &[]).await.expect("appended");
    let route: String = redis::cmd("HGET")
        .arg(format!("{p}:meta"))
        .arg("route")
        .query_async(&mut redis)
        .await
        .expect("route");
    assert_eq!(route, "house-sensor");
    let lane = Lane::for_event(&e, 8);
    let depth: Vec<(Lane, u64)> = queue.depths().await.expect("depths");
    assert_eq!(depth.iter().find(|(l, _)| *l == lane).map(|d| d.1), Some(1));
}

/// Readings stored before the rollups (PostgreSQL 4, SQLite 8) are summed into them by the
/// migration: counts, min, max, sums and last values per minute, hour and day.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_are_built_from_the_readings_already_stored() {
    // (seq, ms after 2026-01-01, value): two in one minute (the later one last), one an hour on.
    let readings = [(1, 0, 20.0), (2, 30_000, 22.0), (3, 3_600_000, 18.0)];
    let start: i64 = 1_767_225_600_000;
    let expected = [
        (
            "minute",
            vec![
                (start, 2, 20.0, 22.0, 42.0, 22.0),
                (start + 3_600_000, 1, 18.0, 18.0, 18.0, 18.0),
            ],
        ),
        (
            "hour",
            vec![
                (start, 2, 20.0, 22.0, 42.0, 22.0),
                (start + 3_600_000, 1, 18.0, 18.0, 18.0, 18.0),
            ],
        ),
        ("day", vec![(start, 3, 18.0, 22.0, 60.0, 18.0)]),
    ];

    let env = Env::new("migrate_pg_rollups");
    let pg = postgres_at(&env, 4).await;
    for (seq, at, value) in readings {
        pg.execute(
            "INSERT INTO events (house_id, sensor_id, kind, value, seq, ts, received_at)
             VALUES ('h1', 'kitchen', 'temperature', $1, $2,
                     timestamptz 'epoch' + $3::int8 * interval '1 millisecond', now())",
            &[&value, &(seq as i64), &(start + at)],
        )
        .await
        .expect("version 4 data");
    }
    hearth::servers::schema::migrate(&env.database_url)
        .await
        .expect("migrate");
    for (step, rows) in &expected {
        let got: Vec<(i64, i64, f64, f64, f64, f64)> = pg
            .query(
                "SELECT (extract(epoch FROM bucket) * 1000)::int8, n, low, high, total, last
                 FROM rollups WHERE step = $1 ORDER BY bucket",
                &[step],
            )
            .await
            .expect("rollups")
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
            .collect();
        assert_eq!(&got, rows, "postgres {step}");
    }

    let env = Env::embedded("migrate_sqlite_rollups");
    let dir = env.scratch.0.join("data");
    std::fs::create_dir_all(&dir).expect("data dir");
    {
        let c = sqlite_at(&dir, 8);
        for (seq, at, value) in readings {
            c.execute(
                "INSERT INTO events (house_id, sensor_id, kind, value, seq, ts, received_us,
                                     stored_us, critical)
                 VALUES ('h1', 'kitchen', 'temperature', ?1, ?2, ?3, 0, 0, 0)",
                rusqlite::params![value, seq, start + at],
            )
            .expect("version 8 data");
        }
    }
    drop(open(&dir).await);
    let c = rusqlite::Connection::open(dir.join("hearth.sqlite3")).expect("sqlite");
    for (step, rows) in &expected {
        let mut st = c
            .prepare("SELECT bucket, n, low, high, total, last FROM rollups WHERE step = ?1 ORDER BY bucket")
            .expect("prepare");
        let got: Vec<(i64, i64, f64, f64, f64, f64)> = st
            .query_map([step], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })
            .expect("rollups")
            .map(|r| r.expect("row"))
            .collect();
        assert_eq!(&got, rows, "sqlite {step}");
    }
}

/// Version 5 kept `events` as one table: it becomes the partition `events_legacy` of the
/// partitioned table, read as before; the next rows take ids after its own, a reading it holds
/// received again is stored once, and retention (90 days) leaves it while it is younger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_from_schema_5_keeps_its_events_as_a_partition() {
    let env = Env::new("migrate_pg5");
    let pg = postgres_at(&env, 5).await;
    let now_us = hearth::event::now_us();
    pg.execute(
        "INSERT INTO events (house_id, sensor_id, kind, value, seq, ts, received_at)
         SELECT 'h1', 'kitchen', 'temperature', g, g, now(),
                timestamptz 'epoch' + $1::int8 * interval '1 microsecond'
         FROM generate_series(1, 100) g",
        &[&now_us],
    )
    .await
    .expect("version 5 data");
    hearth::servers::schema::migrate(&env.database_url)
        .await
        .expect("migrate");
    let count = |sql: &'static str| {
        let pg = &pg;
        async move { pg.query_one(sql, &[]).await.expect(sql).get::<_, i64>(0) }
    };
    assert_eq!(count("SELECT count(*) FROM events").await, 100);
    assert_eq!(count("SELECT count(*) FROM events_legacy").await, 100);
    let config = hearth::config::Config {
        database_url: env.database_url.clone(),
        redis_url: REDIS.into(),
        redis_prefix: env.redis_prefix.clone(),
        retention_days: 90,
        ..Default::default()
    };
    let servers = hearth::servers::Servers::open(std::sync::Arc::new(config), Default::default())
        .expect("open");
    let store = hearth::seam::Backend::seams(&servers).store.clone();
    let reading = |seq: i64, received_us: i64| Event {
        house_id: "h1".into(),
        sensor_id: "kitchen".into(),
        kind: "temperature".into(),
        value: seq as f64,
        unit: None,
        source_unit: None,
        seq: Some(seq),
        ts_ms: received_us / 1000,
        received_us,
        ingest_id: None,
    };
    // seq 100 again, an hour later (a broker's redelivery), and seq 101.
    let again = reading(100, now_us + 3_600_000_000);
    let next = reading(101, now_us + 3_600_000_000);
    let written = store
        .write(&[], &[&again, &next], false)
        .await
        .expect("write after the upgrade");
    assert_eq!(written.stored, 1);
    assert_eq!(count("SELECT count(*) FROM events").await, 101);
    assert_eq!(
        count("SELECT count(*) FROM events WHERE seq = 101 AND keep_days = 90 AND id > 100").await,
        1
    );
    let expired = store.expire(now_us).await.expect("expire");
    assert!(expired.partitions.is_empty(), "{expired:?}");
    assert_eq!(count("SELECT count(*) FROM events_legacy").await, 100);
    // Four months on (90 days after its partition's end), the legacy rows (class 0, which the
    // configuration no longer names) follow the longest retention configured: dropped.
    let later = store
        .expire(now_us + 121 * 86_400_000_000)
        .await
        .expect("expire later");
    assert!(
        later.partitions.contains(&"events_legacy".to_string()),
        "{later:?}"
    );
    assert_eq!(
        count("SELECT count(*) FROM events WHERE seq <= 100").await,
        0
    );
}
