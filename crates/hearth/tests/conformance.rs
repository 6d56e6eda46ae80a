//! One conformance suite per seam (queue, store, cache, fan-out), run against both backends:
//! the servers (Redis Streams, PostgreSQL, Redis, Redis pub/sub, on the shared servers, each test
//! under its own key prefix and database) and the embedded one (SQLite in a scratch folder,
//! in-process cache and channels). The suites are written once against the traits of
//! `hearth::seam`, so the two backends cannot drift apart.

mod support;

use std::sync::Arc;
use std::time::Duration;

use hearth::DeadLetter;
use hearth::Lane;
use hearth::alerts::rules::RuleSet;
use hearth::config::Config;
use hearth::dlq::Filter;
use hearth::event::{Event, Reason, Rejection};
use hearth::seam::{Delivery, HistoryQuery, Pushed, Reader, Seams, Written};
use support::*;

const SHARDS: u16 = 4;

/// Small caps, so that the store suite can pass them.
const CAPS: hearth::Caps = hearth::Caps {
    houses: 3,
    sensors_per_house: 3,
    kinds_per_sensor: 3,
};

/// A backend under test, and what keeps its state alive (and cleans it up).
struct Backend {
    seams: Seams,
    backend: Arc<dyn hearth::seam::Backend>,
    /// Open the queue again on the same state, and a reader on it: a reader started after a
    /// crash.
    reopen: Box<dyn Fn() -> futures_reopen::Reopen + Send + Sync>,
    /// A reader named so, that reads the lanes it is asked (no lease held).
    bare: BareReader,
    _env: Env,
}

impl Backend {
    fn reader(&self, name: &str) -> Box<dyn Reader> {
        (self.bare)(name)
    }
}

/// Makes a reader that holds no lease.
type BareReader = Box<dyn Fn(&str) -> Box<dyn Reader> + Send + Sync>;

mod futures_reopen {
    pub type Reopen =
        std::pin::Pin<Box<dyn std::future::Future<Output = Box<dyn hearth::seam::Reader>> + Send>>;
}

fn servers_config(env: &Env) -> Config {
    Config {
        redis_url: REDIS.into(),
        redis_prefix: env.redis_prefix.clone(),
        database_url: env.database_url.clone(),
        shards: SHARDS,
        max_houses: CAPS.houses,
        max_sensors_per_house: CAPS.sensors_per_house,
        max_kinds_per_sensor: CAPS.kinds_per_sensor,
        ..Config::default()
    }
}

async fn servers(test: &str) -> Backend {
    servers_with(test, Default::default(), |_| {}).await
}

async fn servers_with(test: &str, rules: Arc<RuleSet>, tune: impl FnOnce(&mut Config)) -> Backend {
    let env = Env::new(test);
    hearth::servers::schema::migrate(&env.database_url)
        .await
        .expect("migrate");
    let mut config = servers_config(&env);
    tune(&mut config);
    let servers = hearth::servers::Servers::open(Arc::new(config), rules).expect("open");
    let seams = hearth::seam::Backend::seams(&servers).clone();
    let prefix = env.redis_prefix.clone();
    let reopen = move || -> futures_reopen::Reopen {
        let prefix = prefix.clone();
        Box::pin(async move {
            let queue = hearth::servers::queue::Queue::open(REDIS, &prefix, SHARDS).expect("queue");
            Box::new(hearth::servers::reader::RedisReader::new(
                queue, REDIS, "second",
            )) as Box<dyn Reader>
        })
    };
    let prefix = env.redis_prefix.clone();
    let bare = move |name: &str| -> Box<dyn Reader> {
        let queue = hearth::servers::queue::Queue::open(REDIS, &prefix, SHARDS).expect("queue");
        Box::new(hearth::servers::reader::RedisReader::new(
            queue, REDIS, name,
        ))
    };
    Backend {
        seams,
        backend: Arc::new(servers),
        reopen: Box::new(reopen),
        bare: Box::new(bare),
        _env: env,
    }
}

async fn embedded(test: &str) -> Backend {
    embedded_with(test, Default::default()).await
}

async fn embedded_with(test: &str, rules: Arc<RuleSet>) -> Backend {
    embedded_keeping(test, rules, Default::default()).await
}

async fn embedded_keeping(test: &str, rules: Arc<RuleSet>, keep: hearth::Keep) -> Backend {
    let env = Env::embedded(test);
    let dir = env.scratch.0.join("data");
    let opened = hearth::embedded::Embedded::open(
        &dir,
        SHARDS,
        0,
        rules.clone(),
        CAPS,
        Default::default(),
        keep,
    )
    .await
    .expect("open");
    let reopen = move || -> futures_reopen::Reopen {
        let dir = dir.clone();
        let rules = rules.clone();
        Box::pin(async move {
            let again = hearth::embedded::Embedded::open(
                &dir,
                SHARDS,
                0,
                rules,
                CAPS,
                Default::default(),
                Default::default(),
            )
            .await
            .expect("reopen");
            Box::new(hearth::embedded::reader::SqliteReader::new(
                (*again.queue).clone(),
            )) as Box<dyn Reader>
        })
    };
    let queue = (*opened.queue).clone();
    let bare = move |_: &str| -> Box<dyn Reader> {
        Box::new(hearth::embedded::reader::SqliteReader::new(queue.clone()))
    };
    Backend {
        seams: opened.seams.clone(),
        backend: Arc::new(opened),
        reopen: Box::new(reopen),
        bare: Box::new(bare),
        _env: env,
    }
}

/// Read `lanes` until a read hands out nothing (each read waits at most a moment).
async fn drain(r: &mut Box<dyn Reader>, lanes: &[Lane], max: usize) -> Vec<Delivery> {
    let mut all = Vec::new();
    loop {
        let got = r
            .read(lanes, max, Duration::from_millis(50))
            .await
            .expect("read");
        if got.is_empty() {
            return all;
        }
        all.extend(got);
    }
}

fn event(house: &str, sensor: &str, kind: &str, seq: i64, ts_ms: i64) -> Event {
    Event {
        house_id: house.into(),
        sensor_id: sensor.into(),
        kind: kind.into(),
        value: seq as f64,
        unit: None,
        source_unit: None,
        seq: Some(seq),
        ts_ms,
        received_us: ts_ms * 1000,
        ingest_id: None,
    }
}

fn seqs_of(deliveries: &[hearth::seam::Delivery], sensor: &str) -> Vec<i64> {
    deliveries
        .iter()
        .flat_map(|d| &d.events)
        .filter(|e| e.sensor_id == sensor)
        .filter_map(|e| e.seq)
        .collect()
}

// ---- the queue ------------------------------------------------------------------------------

async fn queue_suite(b: Backend) {
    let q = &b.seams.queue;
    // Three sensors, five appends each, interleaved; then one critical event.
    for seq in 1..=5 {
        let batch: Vec<Event> = ["a", "b", "c"]
            .iter()
            .map(|s| event("h", s, "temperature", seq, 1_000 + seq))
            .collect();
        let refs: Vec<&Event> = batch.iter().collect();
        q.append(&refs, &[]).await.expect("append");
    }
    let smoke = event("h", "smoke-1", "smoke", 1, 2_000);
    q.append(&[&smoke], &[]).await.expect("append critical");
    let depth: u64 = q.depths().await.expect("depths").iter().map(|d| d.1).sum();
    assert_eq!(depth, 16, "depth counts every appended event");

    // The critical lane alone, then the rest; the critical entry comes first either way.
    let routine: Vec<Lane> = Lane::routine(SHARDS).collect();
    let mut r = b.reader("one");
    let critical = drain(&mut r, &[Lane::Critical], 100).await;
    assert_eq!(critical.len(), 1);
    assert_eq!(critical[0].lane, Lane::Critical);
    let first = r
        .read(&routine, 1, Duration::from_millis(50))
        .await
        .expect("read");
    assert!(!first.is_empty());
    let rest = drain(&mut r, &routine, 1000).await;
    let all: Vec<_> = first.iter().chain(&rest).cloned().collect();
    for s in ["a", "b", "c"] {
        assert_eq!(seqs_of(&all, s), vec![1, 2, 3, 4, 5], "sensor {s} in order");
    }
    assert!(
        drain(&mut r, &routine, 1000).await.is_empty(),
        "nothing is handed out twice"
    );
    assert_eq!(r.deliveries(&critical[0]).await.expect("deliveries"), 1);

    // Acknowledge the critical entry and the first read; a reader opened later gets the rest,
    // marked redelivered.
    r.ack(&critical, &Written::default(), &[])
        .await
        .expect("ack");
    r.ack(
        &first,
        &Written {
            stored: 1,
            ..Written::default()
        },
        &[],
    )
    .await
    .expect("ack");
    let mut r2 = (b.reopen)().await;
    let again = drain(&mut r2, &routine, 1000).await;
    let mut ids: Vec<&str> = again.iter().map(|d| d.id.as_str()).collect();
    let mut expected: Vec<&str> = rest.iter().map(|d| d.id.as_str()).collect();
    ids.sort();
    expected.sort();
    assert_eq!(ids, expected, "pending entries are delivered again");
    assert!(
        again.iter().all(|d| d.redelivered),
        "and marked redelivered"
    );
    assert!(
        drain(&mut r2, &[Lane::Critical], 100).await.is_empty(),
        "acknowledged"
    );
    // Acknowledged with the dead letter of an event its write refused (past a cap).
    let refused = DeadLetter::of_events(
        &[&again[0].events[0]],
        &[Rejection::new(Reason::TooManyKinds, "too many kinds")],
        "a test",
    )
    .expect("a letter");
    let written = Written {
        capped: vec![(0, Rejection::new(Reason::TooManyKinds, "too many kinds"))],
        ..Written::default()
    };
    r2.ack(&again, &written, &[refused]).await.expect("ack");
    let depth: u64 = q.depths().await.expect("depths").iter().map(|d| d.1).sum();
    assert_eq!(depth, 0);
    let status = q.status().await.expect("status");
    assert_eq!(status.events.received, 16);
    assert_eq!(status.events.in_flight, 0);
    assert_eq!(status.events.stored, 1);
    assert_eq!(status.events.dead_lettered, 1);
    let letters = q.dead_letters(&Filter::default()).await.expect("list");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason, "too_many_kinds");
    assert_eq!(letters[0].source, "worker");
    assert_eq!(q.purge(&Filter::default()).await.expect("purge"), 1);

    // Dead letters: kept with their reason, listed, purged.
    let letter = DeadLetter::from_rejection(
        &Rejection::new(Reason::MalformedJson, "expected value"),
        "mqtt",
        "hearth/h/x",
        b"nope",
        1_000,
    );
    q.append(&[], &[&letter]).await.expect("dead letter");
    let letters = q.dead_letters(&Filter::default()).await.expect("list");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason, "malformed_json");
    assert_eq!(letters[0].payload, "nope");
    let status = q.status().await.expect("status");
    assert_eq!(status.dead_letters, 1);
    assert_eq!(status.events.rejected_at_ingest, 1);
    assert_eq!(q.purge(&Filter::default()).await.expect("purge"), 1);
    assert!(
        q.dead_letters(&Filter::default())
            .await
            .expect("list")
            .is_empty()
    );
    assert!(q.ready().await.expect("ready").1);
    // Discovery configs: kept, replaced, forgotten by an empty payload.
    let config = |t: &str, p: &str| (t.to_string(), p.as_bytes().to_vec());
    q.keep_discovery(&[
        config("homeassistant/sensor/a/t/config", "{}"),
        config("homeassistant/sensor/a/h/config", "{\"x\":1}"),
    ])
    .await
    .expect("keep");
    q.keep_discovery(&[
        config("homeassistant/sensor/a/h/config", "{\"x\":2}"),
        config("homeassistant/sensor/a/t/config", ""),
    ])
    .await
    .expect("replace and forget");
    assert_eq!(
        q.discovery().await.expect("kept"),
        [config("homeassistant/sensor/a/h/config", "{\"x\":2}")]
    );
    // Devices: by house and sensor, replaced, never across houses, bounded per house.
    const MAX: u64 = 1_000;
    let device = |id: &str, model: Option<&str>| hearth::seam::DeviceInfo {
        device_id: id.into(),
        ecosystem: "zigbee2mqtt".into(),
        model: model.map(Into::into),
        manufacturer: None,
    };
    q.keep_devices(
        &[
            ("h1".into(), "lamp".into(), device("lamp", None)),
            ("h1".into(), "lamp.l1".into(), device("lamp", None)),
            ("h2".into(), "lamp".into(), device("other", None)),
        ],
        MAX,
    )
    .await
    .expect("keep devices");
    // A house at its bound takes no new sensor; its known ones are still replaced.
    q.keep_devices(
        &[
            ("h1".into(), "lamp".into(), device("lamp", Some("TS011F"))),
            ("h1".into(), "made_up".into(), device("made_up", None)),
        ],
        2,
    )
    .await
    .expect("replace");
    let h1 = q.devices("h1").await.expect("devices");
    assert_eq!(h1.len(), 2);
    assert_eq!(h1["lamp"], device("lamp", Some("TS011F")));
    assert_eq!(
        q.devices("h2").await.expect("devices")["lamp"].device_id,
        "other"
    );
    assert!(q.devices("h3").await.expect("devices").is_empty());
    // What bridges say of their devices: by house and device.
    q.keep_catalog(
        &[
            ("h1".into(), device("lamp", Some("TS011F"))),
            ("h2".into(), device("lamp", Some("other"))),
            ("h2".into(), device("made_up", Some("other"))),
        ],
        1,
    )
    .await
    .expect("keep catalog");
    assert_eq!(
        q.catalog("h1").await.expect("catalog")["lamp"]
            .model
            .as_deref(),
        Some("TS011F")
    );
    assert_eq!(q.catalog("h2").await.expect("catalog").len(), 1);
}

/// A lane's order hash (ingest slots shared) records at most its cap of sensors: a device
/// making up sensor ids grows it no further, and a sensor it did not record is admitted as it
/// comes (there is nothing to wait on), while a recorded one's gap still waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_of_sensors_is_bounded_on_redis() {
    use hearth::seam::{EventQueue, Head};
    let env = Env::new("conf_order_cap");
    let mut queue =
        hearth::servers::queue::Queue::open(REDIS, &env.redis_prefix, 1).expect("queue");
    queue.sequenced = Some(3);
    let q = hearth::servers::queue::RedisQueue { queue };
    let events: Vec<Event> = (0..10)
        .map(|i| event("house-o", &format!("s{i}"), "temperature", 5, 1_000))
        .collect();
    for e in &events {
        q.append(&[e], &[]).await.expect("append");
    }
    let mut redis = env.redis().await;
    let recorded: u64 = redis::cmd("HLEN")
        .arg(format!("{}:order:routine-0", env.redis_prefix))
        .query_async(&mut redis)
        .await
        .expect("HLEN");
    assert_eq!(recorded, 3);
    let head = |sensor: &str| Head {
        house_id: "house-o".into(),
        sensor_id: sensor.into(),
        first: 7,
        last: 7,
        waited_ms: 0,
    };
    let admitted = q
        .admit(&[head("s0"), head("s9"), head("made-up")])
        .await
        .expect("admit");
    assert_eq!(admitted, vec![false, true, true]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_on_redis() {
    queue_suite(servers("conf_queue").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_embedded() {
    queue_suite(embedded("conf_queue_e").await).await;
}

// ---- the store ------------------------------------------------------------------------------

async fn store_suite(b: Backend) {
    let s = &b.seams.store;
    let batch: Vec<Event> = (1..=3)
        .map(|i| event("house-1", "kitchen", "temperature", i, 10_000 + i))
        .collect();
    let refs: Vec<&Event> = batch.iter().collect();
    let w = s.write(&[], &refs, true).await.expect("write");
    assert_eq!((w.stored, w.duplicates), (3, 0));
    let w = s.write(&[], &refs, true).await.expect("write again");
    assert_eq!(
        (w.stored, w.duplicates),
        (0, 3),
        "a redelivery stores nothing"
    );

    // Without seq, the ingest id is the dedup key.
    let mut a = event("house-1", "door", "door", 0, 20_000);
    a.seq = None;
    a.ingest_id = Some(uuid::Uuid::new_v4());
    let mut other = a.clone();
    other.ingest_id = Some(uuid::Uuid::new_v4());
    let w = s.write(&[], &[&a, &a, &other], true).await.expect("write");
    assert_eq!((w.stored, w.duplicates), (2, 1));

    // Another house's `kitchen` is another sensor: its seq 1..3 are not duplicates, and it
    // shows in neither house-1's history nor its sensors.
    let theirs: Vec<Event> = (1..=3)
        .map(|i| event("house-2", "kitchen", "humidity", i, 10_000 + i))
        .collect();
    let w = s
        .write(&[], &theirs.iter().collect::<Vec<_>>(), true)
        .await
        .expect("write");
    assert_eq!((w.stored, w.duplicates), (3, 0));

    // History: newest first, paged by (ts, id).
    let page = s
        .history(&HistoryQuery {
            house: "house-1".into(),
            sensor: "kitchen".into(),
            limit: 2,
            ..HistoryQuery::default()
        })
        .await
        .expect("history");
    assert_eq!(
        page.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [Some(3), Some(2)]
    );
    let next = s
        .history(&HistoryQuery {
            house: "house-1".into(),
            sensor: "kitchen".into(),
            limit: 10,
            cursor: Some((page[1].ts, page[1].id)),
            ..HistoryQuery::default()
        })
        .await
        .expect("history");
    assert_eq!(next.iter().map(|e| e.seq).collect::<Vec<_>>(), [Some(1)]);
    let window = s
        .history(&HistoryQuery {
            house: "house-1".into(),
            sensor: "kitchen".into(),
            from: Some(10_002),
            to: Some(10_003),
            limit: 10,
            ..HistoryQuery::default()
        })
        .await
        .expect("history");
    assert_eq!(window.iter().map(|e| e.seq).collect::<Vec<_>>(), [Some(2)]);
    let kinds: Vec<String> = s
        .history(&HistoryQuery {
            house: "house-2".into(),
            sensor: "kitchen".into(),
            limit: 10,
            ..HistoryQuery::default()
        })
        .await
        .expect("history")
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, ["humidity"; 3]);

    // Sensors and houses.
    let sensors = s.sensors("house-1").await.expect("sensors");
    let names: Vec<&str> = sensors.iter().map(|r| r.sensor_id.as_str()).collect();
    assert_eq!(names, ["door", "kitchen"]);
    assert_eq!(sensors[1].kinds, ["temperature"]);
    let houses = s.houses(None).await.expect("houses");
    let houses: Vec<(&str, i64)> = houses
        .iter()
        .map(|h| (h.house_id.as_str(), h.sensors))
        .collect();
    assert_eq!(houses, [("house-1", 2), ("house-2", 1)]);
    assert!(s.houses(Some("other")).await.expect("houses").is_empty());
    let kitchen = s.sensor("house-2", "kitchen").await.expect("sensor");
    assert_eq!(kitchen.map(|k| k.kinds), Some(vec!["humidity".to_string()]));
    assert_eq!(s.sensor("house-2", "door").await.expect("sensor"), None);

    // The caps (3 of each here): refused past them, with a reason, the rest stored.
    let over: Vec<Event> = [
        ("house-1", "kitchen", "humidity"), // second kind
        ("house-1", "kitchen", "co2"),      // third kind
        ("house-1", "kitchen", "noise"),    // fourth kind: refused
        ("house-1", "hall", "motion"),      // third sensor
        ("house-1", "attic", "motion"),     // fourth sensor: refused
        ("house-3", "plug", "power"),       // third house
        ("house-4", "plug", "power"),       // fourth house: refused
    ]
    .iter()
    .map(|(h, sensor, kind)| event(h, sensor, kind, 1, 30_000))
    .collect();
    let w = s
        .write(&[], &over.iter().collect::<Vec<_>>(), true)
        .await
        .expect("write");
    let capped: Vec<(usize, &str)> = w
        .capped
        .iter()
        .map(|(i, r)| (*i, r.reason.as_str()))
        .collect();
    assert_eq!(
        capped,
        [
            (2, "too_many_kinds"),
            (4, "too_many_sensors"),
            (6, "too_many_houses")
        ]
    );
    assert_eq!((w.stored, w.duplicates), (4, 0));
    assert_eq!(s.sensor("house-1", "attic").await.expect("sensor"), None);
    // Written again (a redelivery): the same refused, nothing stored twice.
    let w = s
        .write(&[], &over.iter().collect::<Vec<_>>(), true)
        .await
        .expect("write");
    assert_eq!((w.stored, w.duplicates, w.capped.len()), (0, 4, 3));

    // Tokens by hash, listed by id, revoked, expired; no alert yet.
    let (_, hash) = hearth::api::auth::new_token();
    let id = hearth::api::auth::token_id(&hash);
    s.create_token(&id, &hash, "house-1", None)
        .await
        .expect("token");
    assert_eq!(
        s.token_house(&hash).await.expect("lookup").as_deref(),
        Some("house-1")
    );
    assert_eq!(s.token_house(b"unknown").await.expect("lookup"), None);
    let (_, old) = hearth::api::auth::new_token();
    let old_id = hearth::api::auth::token_id(&old);
    let past = hearth::event::now_us() / 1000 - 1_000;
    s.create_token(&old_id, &old, "house-2", Some(past))
        .await
        .expect("token");
    assert_eq!(s.token_house(&old).await.expect("lookup"), None, "expired");
    let listed = s.tokens().await.expect("tokens");
    assert_eq!(listed.len(), 2);
    assert!(
        listed
            .iter()
            .any(|t| t.id == id && t.house_id == "house-1" && t.expires_at.is_none())
    );
    assert!(
        listed
            .iter()
            .any(|t| t.id == old_id && t.expires_at == Some(past))
    );
    assert!(s.revoke(&id).await.expect("revoke"));
    assert!(!s.revoke(&id).await.expect("revoke again"));
    assert_eq!(s.token_house(&hash).await.expect("lookup"), None, "revoked");
    let alerts = &b.seams.alerts;
    assert!(
        alerts
            .list(None, None, 10)
            .await
            .expect("alerts")
            .is_empty()
    );
    assert_eq!(alerts.acknowledge(42, "admin").await.expect("ack"), None);
    assert!(s.ready().await.expect("ready").1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_on_postgres() {
    store_suite(servers("conf_store").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_embedded() {
    store_suite(embedded("conf_store_e").await).await;
}

// ---- the rollups -----------------------------------------------------------------------------

/// Rollups equal the aggregates of the raw rows they summarise, whatever the batches, the
/// redeliveries, the folds between them and the order of the readings' times: a property, sampled by proptest (cases
/// accumulate in one store, against a model of every distinct reading written so far).
/// A bucket as the model sums it: count, sum, min, max, (time, order) of the last, last value.
type Bucket = (i64, f64, f64, f64, (i64, usize), f64);

async fn rollup_suite(b: Backend) {
    use hearth::series::{SeriesQuery, Step};
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config as PtConfig, TestRunner};
    let s = &b.seams.store;
    // (sensor, kind, seq offset, ts in ms within 3 days, value in thousandths); then batches.
    // A third of the times on an hour grid and a third within four minutes, so that readings
    // of one bucket, of one batch too, often share a time (the last value is then the one
    // stored last).
    let ts = prop_oneof![
        (0..72i64).prop_map(|q| q * 3_600_000),
        0..3 * 86_400_000i64,
        (0..4i64, 0..3i64).prop_map(|(m, s)| m * 60_000 + s * 1_000),
    ];
    let reading = (0..2usize, 0..2usize, 0..40i64, ts, -500_000..500_000i64);
    let case = (
        prop::collection::vec(reading, 1..60),
        prop::collection::vec(1..20usize, 1..6),
        any::<bool>(),
        // Which batches are followed by a fold: a series counts the readings folded and those
        // not folded yet alike.
        prop::collection::vec(any::<bool>(), 1..6),
    );
    let mut runner = TestRunner::new(PtConfig {
        cases: 12,
        ..PtConfig::default()
    });
    // Dedup key → (event, order of its first write).
    let mut model: std::collections::BTreeMap<(String, String, i64), (Event, usize)> =
        std::collections::BTreeMap::new();
    for round in 0..12i64 {
        let (readings, cuts, redeliver, folds) =
            case.new_tree(&mut runner).expect("case").current();
        let mut fold = folds.iter().cycle();
        let events: Vec<Event> = readings
            .iter()
            .map(|(sensor, kind, seq, ts, milli)| {
                let mut e = event(
                    "house-r",
                    ["s0", "s1"][*sensor],
                    ["temperature", "humidity"][*kind],
                    round * 40 + seq,
                    *ts,
                );
                e.value = *milli as f64 / 1000.0;
                // Received when the round runs (a key's copies come within the dedup window,
                // as a redelivery does), whatever the time the device stamped.
                e.received_us = 1_000_000_000_000_000 + round * 1_000_000;
                e
            })
            .collect();
        let mut rest: &[Event] = &events;
        let mut cut = cuts.iter().cycle();
        while !rest.is_empty() {
            let n = (*cut.next().expect("cut")).min(rest.len());
            let (batch, tail) = rest.split_at(n);
            let refs: Vec<&Event> = batch.iter().collect();
            // First as a fresh batch (on PostgreSQL the worker sums its deltas, or the server
            // does when a duplicate fails it), then maybe as a redelivery.
            s.write(&[], &refs, false).await.expect("write");
            if redeliver {
                s.write(&[], &refs, true).await.expect("write again");
            }
            if *fold.next().expect("fold") {
                s.fold_rollups().await.expect("fold");
            }
            for e in batch {
                let key = (e.sensor_id.clone(), e.kind.clone(), e.seq.expect("seq"));
                let order = model.len();
                model.entry(key).or_insert((e.clone(), order));
            }
            rest = tail;
        }
        for sensor in ["s0", "s1"] {
            for kind in ["temperature", "humidity"] {
                for step in Step::ALL {
                    let mut expected: std::collections::BTreeMap<i64, Bucket> =
                        std::collections::BTreeMap::new();
                    for (e, order) in model
                        .values()
                        .filter(|(e, _)| e.sensor_id == sensor && e.kind == kind)
                    {
                        let b = expected.entry(step.bucket(e.ts_ms)).or_insert((
                            0,
                            0.0,
                            f64::MAX,
                            f64::MIN,
                            (i64::MIN, 0),
                            0.0,
                        ));
                        b.0 += 1;
                        b.1 += e.value;
                        b.2 = b.2.min(e.value);
                        b.3 = b.3.max(e.value);
                        if (e.ts_ms, *order) >= b.4 {
                            b.4 = (e.ts_ms, *order);
                            b.5 = e.value;
                        }
                    }
                    let got = s
                        .series(&SeriesQuery {
                            house: "house-r".into(),
                            sensor: sensor.into(),
                            kind: kind.into(),
                            step,
                            from: 0,
                            to: 4 * 86_400_000,
                        })
                        .await
                        .expect("series");
                    assert_eq!(
                        got.len(),
                        expected.len(),
                        "{sensor} {kind} {step:?}: buckets"
                    );
                    for (p, (bucket, (n, sum, min, max, _, last))) in got.iter().zip(&expected) {
                        let what = format!("{sensor} {kind} {step:?} bucket {bucket}");
                        assert_eq!((p.bucket, p.count), (*bucket, *n), "{what}");
                        assert_eq!((p.min, p.max, p.last), (*min, *max, *last), "{what}");
                        assert!((p.avg - sum / *n as f64).abs() < 1e-6, "{what}: avg");
                    }
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_on_postgres() {
    rollup_suite(servers("conf_rollups").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_embedded() {
    rollup_suite(embedded("conf_rollups_e").await).await;
}

/// One process folds for all (a fold upserts every key its deltas name): while one holds the
/// folder's lease, another's folds do nothing and leave the deltas; once the holder stops
/// folding (here: it is gone), the lease runs out and the other takes over. A series counts
/// every reading throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_folds_the_rollups() {
    use hearth::series::{SeriesQuery, Step};
    let first = servers("conf_folder").await;
    let second =
        hearth::servers::Servers::open(Arc::new(servers_config(&first._env)), Default::default())
            .expect("open");
    let other = hearth::seam::Backend::seams(&second).store.clone();
    let s = &first.seams.store;
    let reading = |seq: i64| event("house-f", "s0", "temperature", seq, 1_700_000_000_000 + seq);
    s.write(&[], &[&reading(1)], false).await.expect("write");
    assert_eq!(
        other.fold_rollups().await.expect("fold"),
        1,
        "the other takes the lock"
    );
    s.write(&[], &[&reading(2)], false).await.expect("write");
    assert_eq!(s.fold_rollups().await.expect("fold"), 0, "not the holder");
    let counted = || async {
        s.series(&SeriesQuery {
            house: "house-f".into(),
            sensor: "s0".into(),
            kind: "temperature".into(),
            step: Step::Day,
            from: 0,
            to: 2_000_000_000_000,
        })
        .await
        .expect("series")
        .iter()
        .map(|p| p.count)
        .sum::<i64>()
    };
    assert_eq!(counted().await, 2, "a series counts the deltas left");
    drop(other);
    drop(second);
    eventually(
        "the first to take over",
        Duration::from_secs(30),
        || async { (s.fold_rollups().await.expect("fold") == 1).then_some(()) },
    )
    .await;
    assert_eq!(counted().await, 2);
}

/// A year of one sensor at one reading a minute (525,600 rows), then the series a dashboard
/// asks for, timed (printed, not asserted): `cargo test --release --test conformance --
/// --ignored a_year --nocapture`.
async fn a_year_of_one_sensor(b: Backend, name: &str) {
    use hearth::series::{SeriesQuery, Step};
    let s = &b.seams.store;
    let minutes = 365 * 24 * 60i64;
    let started = std::time::Instant::now();
    for chunk in (0..minutes).collect::<Vec<_>>().chunks(10_000) {
        let batch: Vec<Event> = chunk
            .iter()
            .map(|m| {
                let mut e = event(
                    "house-y",
                    "meter",
                    "power",
                    m + 1,
                    1_700_000_000_000 + m * 60_000,
                );
                e.value = (m % 1440) as f64;
                e
            })
            .collect();
        let refs: Vec<&Event> = batch.iter().collect();
        s.write(&[], &refs, false).await.expect("write");
    }
    eprintln!(
        "{name}: {minutes} readings written in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let end = 1_700_000_000_000 + minutes * 60_000;
    for (label, step, span) in [
        ("the last 6 hours per minute", Step::Minute, 6 * 3_600_000),
        ("the last week per hour", Step::Hour, 7 * 86_400_000),
        ("the last 30 days per hour", Step::Hour, 30 * 86_400_000),
        ("the year per day", Step::Day, 365 * 86_400_000),
    ] {
        let q = SeriesQuery {
            house: "house-y".into(),
            sensor: "meter".into(),
            kind: "power".into(),
            step,
            from: end - span,
            to: end,
        };
        s.series(&q).await.expect("warm");
        let t = std::time::Instant::now();
        let runs = 20;
        let mut points = 0;
        for _ in 0..runs {
            points = s.series(&q).await.expect("series").len();
        }
        eprintln!(
            "{name}: {label}: {points} points in {:.2} ms",
            t.elapsed().as_secs_f64() * 1000.0 / runs as f64
        );
    }
    let t = std::time::Instant::now();
    let rows = s
        .history(&HistoryQuery {
            house: "house-y".into(),
            sensor: "meter".into(),
            from: Some(end - 6 * 3_600_000),
            limit: 1000,
            ..HistoryQuery::default()
        })
        .await
        .expect("history")
        .len();
    eprintln!(
        "{name}: raw rows of the last 6 hours (history, one page): {rows} rows in {:.2} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement (a year of data): run it by name"]
async fn a_year_on_postgres() {
    a_year_of_one_sensor(servers("conf_year").await, "postgres").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement (a year of data): run it by name"]
async fn a_year_embedded() {
    a_year_of_one_sensor(embedded("conf_year_e").await, "embedded").await;
}

// ---- the cache ------------------------------------------------------------------------------

async fn cache_suite(b: Backend) {
    let c = &b.seams.cache;
    let newer = event("h", "s1", "temperature", 5, 50_000);
    let older = event("h", "s1", "temperature", 4, 40_000);
    let humidity = event("h", "s1", "humidity", 1, 10_000);
    c.offer(&[&newer]).await.expect("offer");
    c.offer(&[&older, &humidity]).await.expect("offer");
    let s1 = ["s1".to_string()];
    let latest = c.latest("h", &s1).await.expect("latest").remove(0);
    assert_eq!(latest.len(), 2);
    let t: serde_json::Value = serde_json::from_str(&latest["temperature"]).expect("json");
    assert_eq!(t["value"], 5.0, "never moves backwards");
    assert_eq!(t["seq"], 5);
    assert_eq!(t["ts"], 50_000);
    assert_eq!(t["house_id"], "h");
    // Same time, higher seq: newer.
    let same_ts = event("h", "s1", "temperature", 6, 50_000);
    c.offer(&[&same_ts]).await.expect("offer");
    let latest = c.latest("h", &s1).await.expect("latest").remove(0);
    let t: serde_json::Value = serde_json::from_str(&latest["temperature"]).expect("json");
    assert_eq!(t["seq"], 6);
    // A reading stamped an hour ahead counts as received: the next one replaces it.
    let mut ahead = event("h", "s1", "temperature", 7, 60_000 + 3_600_000);
    ahead.received_us = 60_000_000;
    let next = event("h", "s1", "temperature", 8, 61_000);
    c.offer(&[&ahead]).await.expect("offer");
    c.offer(&[&next]).await.expect("offer");
    let latest = c.latest("h", &s1).await.expect("latest").remove(0);
    let t: serde_json::Value = serde_json::from_str(&latest["temperature"]).expect("json");
    assert_eq!(t["seq"], 8, "a future stamp does not pin the value");
    // Another house's s1 is another sensor.
    let theirs = event("h2", "s1", "temperature", 1, 99_000);
    c.offer(&[&theirs]).await.expect("offer");
    let both = c
        .latest("h", &["s1".to_string(), "unknown".to_string()])
        .await
        .expect("latest");
    let t: serde_json::Value = serde_json::from_str(&both[0]["temperature"]).expect("json");
    assert_eq!(
        (t["seq"].as_i64(), t["house_id"].as_str()),
        (Some(8), Some("h"))
    );
    assert!(both[1].is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_on_redis() {
    cache_suite(servers("conf_cache").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_embedded() {
    cache_suite(embedded("conf_cache_e").await).await;
}

// ---- the fan-out ----------------------------------------------------------------------------

/// An active smoke alert of house `h`.
fn smoke_alert(id: i64) -> hearth::alerts::Alert {
    hearth::alerts::Alert {
        id,
        house_id: "h".into(),
        sensor_id: "s".into(),
        rule: "smoke".into(),
        kind: "smoke".into(),
        severity: hearth::alerts::Severity::Critical,
        state: hearth::alerts::AlertState::Active,
        message: "Smoke".into(),
        value: Some(1.0),
        raised_at: 1,
        raised_by: format!("s/smoke/{id}"),
        acknowledged_at: None,
        acknowledged_by: None,
        cleared_at: None,
        cleared_by: None,
    }
}

/// The next message of a subscription, within 10 s, with no gap before it.
async fn message(next: impl std::future::Future<Output = Option<Pushed>>) -> String {
    match tokio::time::timeout(Duration::from_secs(10), next)
        .await
        .expect("a message within 10 s")
        .expect("open")
    {
        Pushed::Message(m) => m,
        Pushed::Gap => panic!("a gap in a subscription that kept up"),
    }
}

async fn fanout_suite(b: Backend) {
    let f = &b.seams.fanout;
    let mut one = f.subscribe().await.expect("subscribe");
    let mut two = f.subscribe().await.expect("subscribe");
    for i in 0..3 {
        let m = serde_json::json!({"type": "events", "house_id": "h", "n": i}).to_string();
        f.publish(&[m]).await.expect("publish");
    }
    let alert = smoke_alert(7);
    let (mut acked, mut cleared) = (alert.clone(), alert.clone());
    acked.state = hearth::alerts::AlertState::Acknowledged;
    cleared.state = hearth::alerts::AlertState::Cleared;
    f.push_alerts(std::slice::from_ref(&alert))
        .await
        .expect("push");
    let mut first_seq = 0;
    for rx in [&mut one, &mut two] {
        let mut got = Vec::new();
        for _ in 0..4 {
            let m = message(rx.recv()).await;
            got.push(serde_json::from_str::<serde_json::Value>(&m).expect("json"));
        }
        let ns: Vec<_> = got[..3].iter().map(|m| m["n"].as_i64()).collect();
        assert_eq!(ns, [Some(0), Some(1), Some(2)], "in publish order");
        assert_eq!(got[3]["type"], "alert");
        assert_eq!(got[3]["house_id"], "h");
        assert_eq!(got[3]["alert"]["id"], 7);
        first_seq = got[3]["seq"].as_u64().expect("a seq");
    }
    // Alert pushes are numbered in order and kept for clients that reconnect.
    let (since, last): (u64, u64) = {
        f.push_alerts(&[acked, cleared]).await.expect("push");
        let mut seqs = Vec::new();
        for _ in 0..2 {
            let m = message(two.recv()).await;
            let v: serde_json::Value = serde_json::from_str(&m).expect("json");
            seqs.push(v["seq"].as_u64().expect("a seq"));
        }
        assert!(
            first_seq < seqs[0] && seqs[0] < seqs[1],
            "numbered in order"
        );
        (first_seq, seqs[1])
    };
    let kept = f.alerts_since(since).await.expect("since").expect("kept");
    let states: Vec<String> = kept
        .iter()
        .map(|m| serde_json::from_str::<serde_json::Value>(m).expect("json"))
        .map(|v| v["alert"]["state"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        states,
        ["acknowledged", "cleared"],
        "after `since`, in order"
    );
    assert_eq!(f.alerts_pushed().await.expect("pushed"), last);
    assert_eq!(f.alerts_since(last).await.expect("since"), Some(vec![]));
    assert_eq!(
        f.alerts_since(last + 1000).await.expect("since"),
        None,
        "never given out"
    );
    // Every watch moves the count a consumer checks before its pushes.
    let before = f.watch_changes().await.expect("changes");
    f.watch(&["h".to_string()], 1_000).await.expect("watch");
    let after = f.watch_changes().await.expect("changes");
    assert_ne!(before, after, "a watch moves watch_changes");
    f.watch(&["h".to_string()], 1_000).await.expect("watch");
    assert_ne!(
        f.watch_changes().await.expect("changes"),
        after,
        "each watch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_on_redis() {
    fanout_suite(servers("conf_fanout").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_embedded() {
    fanout_suite(embedded("conf_fanout_e").await).await;
}

/// The ids of the alert pushes among the next messages of `rx`, until `want` came (or 10 s
/// passed without a message); every message is counted in `others`.
async fn alert_ids(
    rx: &mut tokio::sync::mpsc::Receiver<String>,
    want: i64,
    others: &mut usize,
) -> Vec<i64> {
    let mut ids = Vec::new();
    while !ids.contains(&want) {
        let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await else {
            break;
        };
        let v: serde_json::Value = serde_json::from_str(&m).expect("json");
        match v["type"].as_str() {
            Some("alert") => ids.push(v["alert"]["id"].as_i64().expect("id")),
            _ => *others += 1,
        }
    }
    ids
}

/// A subscription that lost its connection (its Redis pub/sub client killed) gets the alert
/// pushes of the gap from the log, each once, in order ([`hearth::pushes`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_subscription_misses_no_alert_push_on_redis() {
    let scratch = Scratch::new("conf_push_gap");
    let redis = Redis::start(&scratch.0, "no");
    let url = redis.url();
    let b = servers_with("conf_push_gap", Default::default(), |c| c.redis_url = url).await;
    let f = b.seams.fanout.clone();
    let mut rx = hearth::pushes::subscribe(f.clone())
        .await
        .expect("subscribe");
    f.push_alerts(&[smoke_alert(1)]).await.expect("push");
    let mut others = 0;
    assert_eq!(alert_ids(&mut rx, 1, &mut others).await, [1]);
    // Killed, and pushed to at once: the relay is still waiting to subscribe again.
    let client = redis::Client::open(redis.url()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    let kill = |mut conn: redis::aio::MultiplexedConnection| async move {
        let killed: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut conn)
            .await
            .expect("kill");
        killed
    };
    for id in [2, 4] {
        assert_eq!(kill(conn.clone()).await, 1, "the subscription's connection");
        f.push_alerts(&[smoke_alert(id), smoke_alert(id + 1)])
            .await
            .expect("push");
        // Subscribed again before the next kill.
        let ids = alert_ids(&mut rx, id + 1, &mut others).await;
        assert_eq!(ids, [id, id + 1], "each once, in order");
    }
    assert_eq!(others, 0);

    // Redis flushed under a live subscription: the counter is gone, the next number still
    // greater (the server's clock), so the push is not taken for one already had.
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut conn)
        .await
        .expect("flush");
    f.push_alerts(&[smoke_alert(6)]).await.expect("push");
    assert_eq!(
        alert_ids(&mut rx, 6, &mut others).await,
        [6],
        "after a flush"
    );
    // Redis restarted without persistence: the log and the counter are gone. The reader is
    // told to resync (the gap's pushes cannot be read back), and the next pushes reach it.
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut conn)
        .await
        .expect("flush");
    kill(conn.clone()).await;
    let m = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a message")
        .expect("open");
    assert_eq!(m, hearth::alerts::RESYNC);
    f.push_alerts(&[smoke_alert(7)]).await.expect("push");
    assert_eq!(
        alert_ids(&mut rx, 7, &mut others).await,
        [7],
        "after the resync"
    );
}

/// A subscriber that falls behind the embedded fan-out's channel gets the alert pushes it was
/// overtaken on from the ring of kept pushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_fallen_behind_misses_no_alert_push_embedded() {
    let b = embedded("conf_push_gap_e").await;
    let f = b.seams.fanout.clone();
    let mut rx = hearth::pushes::subscribe(f.clone())
        .await
        .expect("subscribe");
    let flood = |n: usize| -> Vec<String> {
        (0..n)
            .map(|i| serde_json::json!({"type": "events", "house_id": "h", "n": i}).to_string())
            .collect()
    };
    // Unread: the channels between here and `rx` fill up first (each round overtakes the relay
    // and leaves it the channel's last 4,096; the pauses give it time to pass them on, not an
    // assertion on speed), so that the alert waits in the fan-out's own channel, where the next
    // flood overtakes it.
    for _ in 0..3 {
        f.publish(&flood(10_000)).await.expect("publish");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    f.push_alerts(&[smoke_alert(1)]).await.expect("push");
    f.publish(&flood(20_000)).await.expect("publish");
    f.push_alerts(&[smoke_alert(2)]).await.expect("push");
    let mut others = 0;
    assert_eq!(alert_ids(&mut rx, 2, &mut others).await, [1, 2]);
    assert!(others < 40_000, "some events were overtaken: {others}");
}

// ---- dead-letter retention --------------------------------------------------------------------

/// Letters past their age are removed by the sweep and counted; the count cap holds at every
/// append. On Redis a letter's age is its stream id (the time of its XADD).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_expire_on_redis() {
    let env = Env::new("conf_retention");
    let mut queue =
        hearth::servers::queue::Queue::open(REDIS, &env.redis_prefix, SHARDS).expect("queue");
    queue.retention = hearth::Retention {
        max_age_ms: 3_600_000,
        max_count: 0,
    };
    let mut redis = env.redis().await;
    // A letter written two hours ago.
    let old = (hearth::event::now_us() / 1000 - 2 * 3_600_000).to_string();
    let _: String = redis::cmd("XADD")
        .arg(queue.keys.dead())
        .arg(format!("{old}-0"))
        .arg("reason")
        .arg("malformed_json")
        .query_async(&mut redis)
        .await
        .expect("old letter");
    let letter = DeadLetter::from_rejection(
        &Rejection::new(Reason::MalformedJson, "x"),
        "mqtt",
        "hearth/h/s",
        b"{",
        hearth::event::now_us() / 1000,
    );
    queue.append(&[], &[&letter]).await.expect("new letter");
    assert_eq!(queue.expire_dead_letters().await.expect("sweep"), 1);
    let status = queue.status().await.expect("status");
    assert_eq!((status.dead_letters, status.dead_letters_expired), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_expire_embedded() {
    let env = Env::embedded("conf_retention_e");
    let e = hearth::embedded::Embedded::open(
        &env.scratch.0.join("data"),
        SHARDS,
        0,
        Default::default(),
        CAPS,
        hearth::Retention {
            max_age_ms: 3_600_000,
            max_count: 3,
        },
        Default::default(),
    )
    .await
    .expect("open");
    let now = hearth::event::now_us() / 1000;
    let letter = |at_ms| {
        DeadLetter::from_rejection(
            &Rejection::new(Reason::MalformedJson, "x"),
            "mqtt",
            "hearth/h/s",
            b"{",
            at_ms,
        )
    };
    let old = letter(now - 2 * 3_600_000);
    e.seams.queue.append(&[], &[&old]).await.expect("old");
    assert_eq!(e.queue.expire_dead_letters().await.expect("sweep"), 1);
    // Five at once with a cap of three: the two oldest go as they are written.
    let five: Vec<DeadLetter> = (0..5).map(|i| letter(now + i)).collect();
    e.seams
        .queue
        .append(&[], &five.iter().collect::<Vec<_>>())
        .await
        .expect("five");
    let status = e.seams.queue.status().await.expect("status");
    assert_eq!((status.dead_letters, status.dead_letters_expired), (3, 3));
}

/// The embedded cache reads a sensor's latest values in from the store when first asked (after a
/// restart): in the caches' order, a reading stamped ahead counting as received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_values_read_in_from_the_embedded_store_keep_the_order() {
    let env = Env::embedded("conf_read_in");
    let dir = env.scratch.0.join("data");
    let open = || async {
        hearth::embedded::Embedded::open(
            &dir,
            SHARDS,
            0,
            Default::default(),
            CAPS,
            Default::default(),
            Default::default(),
        )
        .await
        .expect("open")
    };
    let first = open().await;
    let mut ahead = event("h", "s1", "temperature", 1, 60_000 + 240_000);
    ahead.received_us = 60_000_000;
    let next = event("h", "s1", "temperature", 2, 61_000);
    let old = event("h", "s1", "humidity", 1, 10_000);
    let w = first
        .seams
        .store
        .write(&[], &[&ahead, &next, &old], true)
        .await
        .expect("write");
    assert_eq!(w.stored, 3);
    drop(first);
    let again = open().await;
    let latest = again
        .seams
        .cache
        .latest("h", &["s1".to_string()])
        .await
        .expect("latest")
        .remove(0);
    let t: serde_json::Value = serde_json::from_str(&latest["temperature"]).expect("json");
    assert_eq!(t["seq"], 2, "the reading stamped ahead counts as received");
    let h: serde_json::Value = serde_json::from_str(&latest["humidity"]).expect("json");
    assert_eq!(h["seq"], 1, "every kind is found");
}

// ---- the reader: retake and give up -----------------------------------------------------------

async fn reader_suite(b: Backend) {
    let q = &b.seams.queue;
    let batch: Vec<Event> = (1..=3)
        .map(|i| event("h", "s", "temperature", i, 1_000 + i))
        .collect();
    for e in &batch {
        q.append(&[e], &[]).await.expect("append");
    }
    let lane = Lane::for_event(&batch[0], SHARDS);
    let mut r = b.reader("retaker");
    let first = drain(&mut r, &[lane], 100).await;
    assert_eq!(seqs_of(&first, "s"), [1, 2, 3]);
    assert!(first.iter().all(|d| !d.redelivered), "new entries");
    // Taken again (after an error): the same entries, in order, marked redelivered, counted.
    r.retake(lane);
    let again = drain(&mut r, &[lane], 100).await;
    assert_eq!(seqs_of(&again, "s"), [1, 2, 3]);
    assert!(again.iter().all(|d| d.redelivered));
    assert_eq!(r.deliveries(&again[0]).await.expect("deliveries"), 2);
    // Given up for its content: gone from the queue with its letter, in one step.
    let letter = DeadLetter::of_events(
        &[&again[0].events[0]],
        &[Rejection::new(Reason::OutOfRange, "a test")],
        "a test",
    )
    .expect("a letter");
    r.give_up(&again[0], &[letter]).await.expect("give up");
    r.ack(&again[1..], &Written::default(), &[])
        .await
        .expect("ack");
    r.retake(lane);
    assert!(drain(&mut r, &[lane], 100).await.is_empty(), "none left");
    let status = q.status().await.expect("status");
    assert_eq!(status.events.in_flight, 0);
    assert_eq!(status.events.dead_lettered, 1);
    let letters = q.dead_letters(&Filter::default()).await.expect("letters");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason, "out_of_range");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_on_redis() {
    reader_suite(servers("conf_reader").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_embedded() {
    reader_suite(embedded("conf_reader_e").await).await;
}

// ---- ownership and fencing ----------------------------------------------------------------------

/// A consumer alone holds every lane of its pool, with fences its writes pass.
async fn ownership_suite(b: &Backend) -> hearth::seam::Parts {
    let mut c = b
        .backend
        .consumer(hearth::seam::Pool::Routine, "owner-1")
        .expect("consumer");
    let taken = c.ownership.rebalance().await.expect("rebalance");
    let routine: Vec<Lane> = Lane::routine(SHARDS).collect();
    assert_eq!(taken.len(), routine.len(), "alone, it takes every lane");
    let held = c.ownership.held();
    let mut lanes: Vec<Lane> = held.iter().map(|f| f.0).collect();
    lanes.sort();
    assert_eq!(lanes, routine);
    assert!(
        c.ownership.rebalance().await.expect("again").is_empty(),
        "nothing newly taken"
    );
    let e = event("h", "s", "temperature", 1, 1_000);
    let w = c.store.write(&held, &[&e], false).await.expect("write");
    assert_eq!(w.stored, 1);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ownership_embedded() {
    let b = embedded("conf_own_e").await;
    let mut c = ownership_suite(&b).await;
    c.ownership.release().await.expect("release");
}

/// A consumer that lost its lanes (here: handed back, as after a pause past the lease) writes
/// nothing with its old fences, events or alerts; the new owner's writes count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ownership_and_fencing_on_the_servers() {
    let b = servers_with("conf_own", alert_rules(), |_| {}).await;
    let mut old = ownership_suite(&b).await;
    let stale = old.ownership.held();
    old.ownership.release().await.expect("release");
    let mut new = b
        .backend
        .consumer(hearth::seam::Pool::Routine, "owner-2")
        .expect("consumer");
    assert_eq!(
        new.ownership.rebalance().await.expect("rebalance").len(),
        SHARDS as usize
    );
    let e = event("h", "s", "temperature", 2, 2_000);
    match old.store.write(&stale, &[&e], false).await {
        Err(hearth::seam::WriteError::Fenced(lost)) => assert!(!lost.is_empty()),
        other => panic!("a stale fence must be refused, got {other:?}"),
    }
    let smoke = event("h", "s", "smoke", 3, 3_000);
    let outcome = evaluate(&b, &[&smoke]).await;
    match old.alerts.write_outcome(&stale, &outcome).await {
        Err(hearth::seam::WriteError::Fenced(_)) => {}
        other => panic!("a stale fence must be refused, got {other:?}"),
    }
    let history = |b: &Backend| {
        let store = b.seams.store.clone();
        async move {
            store
                .history(&HistoryQuery {
                    house: "h".into(),
                    sensor: "s".into(),
                    limit: 10,
                    ..HistoryQuery::default()
                })
                .await
                .expect("history")
                .len()
        }
    };
    assert_eq!(history(&b).await, 1, "the stale write stored nothing");
    assert!(
        b.seams
            .alerts
            .list(None, None, 10)
            .await
            .expect("list")
            .is_empty()
    );
    let held = new.ownership.held();
    let w = new.store.write(&held, &[&e], false).await.expect("write");
    assert_eq!(w.stored, 1);
    let raised = new
        .alerts
        .write_outcome(&held, &outcome)
        .await
        .expect("alerts");
    assert_eq!(raised.len(), 1);
    new.ownership.release().await.expect("release");
}

// ---- the alert store --------------------------------------------------------------------------

fn alert_rules() -> Arc<RuleSet> {
    Arc::new(
        RuleSet::parse(
            r#"
            [[rule]]
            name = "smoke"
            type = "boolean"
            kinds = ["smoke"]
            severity = "critical"
            message = "Smoke"

            [[rule]]
            name = "offline"
            type = "offline"
            multiple = 1.0
            min_silence = "10m"
            severity = "warning"
            message = "Sensor offline"
            "#,
        )
        .expect("rules"),
    )
}

/// What the rules make of `events`, from the rule states the store holds (as a worker that just
/// took the lane over would see them).
async fn evaluate(b: &Backend, events: &[&Event]) -> hearth::alerts::engine::Outcome {
    let mut engine = hearth::alerts::engine::Engine::new(alert_rules());
    let keys = engine.to_load(events);
    let stored = b.seams.alerts.load_states(&keys).await.expect("states");
    engine.load(&keys, stored);
    engine.evaluate(events)
}

async fn alerts_suite(b: Backend) {
    let a = &b.seams.alerts;
    let smoke = |house: &str, value: f64, seq: i64| {
        let mut e = event(house, "detector", "smoke", seq, 10_000 + seq);
        e.value = value;
        e
    };
    // The same sensor id in two houses: two alerts.
    let (one, two) = (smoke("h1", 1.0, 1), smoke("h2", 1.0, 1));
    let raised = a
        .write_outcome(&[], &evaluate(&b, &[&one, &two]).await)
        .await
        .expect("raise");
    assert_eq!(raised.len(), 2);
    assert!(
        raised
            .iter()
            .all(|x| x.state == hearth::alerts::AlertState::Active)
    );
    let id = |house: &str| {
        raised
            .iter()
            .find(|x| x.house_id == house)
            .expect("alert")
            .id
    };
    // Raised again (a redelivery, or the alarm still sounding): still one open alert each.
    let again = a
        .write_outcome(&[], &evaluate(&b, &[&one, &two]).await)
        .await
        .expect("again");
    assert!(again.is_empty(), "no second alert: {again:?}");
    assert_eq!(a.list(None, None, 10).await.expect("list").len(), 2);

    // Unpushed until marked pushed, on the lane of the events that raised them.
    let lane = Lane::for_event(&one, SHARDS);
    assert_eq!(a.unpushed(lane).await.expect("unpushed").len(), 2);
    a.mark_pushed(&raised).await.expect("pushed");
    assert!(a.unpushed(lane).await.expect("unpushed").is_empty());

    // Acknowledged once; again changes nothing; the other house's alert is untouched.
    let (acked, changed) = a
        .acknowledge(id("h1"), "admin")
        .await
        .expect("ack")
        .expect("found");
    assert!(changed);
    assert_eq!(acked.state, hearth::alerts::AlertState::Acknowledged);
    assert_eq!(acked.acknowledged_by.as_deref(), Some("admin"));
    let (_, changed) = a
        .acknowledge(id("h1"), "admin")
        .await
        .expect("ack")
        .expect("found");
    assert!(!changed, "idempotent");
    let h2 = a.get(id("h2")).await.expect("get").expect("found");
    assert_eq!(h2.state, hearth::alerts::AlertState::Active);
    let active = a
        .list(None, Some(hearth::alerts::AlertState::Active), 10)
        .await
        .expect("list");
    assert_eq!(active.iter().map(|x| x.id).collect::<Vec<_>>(), [id("h2")]);
    let mine = a.list(Some("h1"), None, 10).await.expect("list");
    assert_eq!(mine.iter().map(|x| x.id).collect::<Vec<_>>(), [id("h1")]);

    // Cleared by a reading (the new rule state loaded from the store), then not acknowledged.
    let clear = smoke("h2", 0.0, 2);
    let cleared = a
        .write_outcome(&[], &evaluate(&b, &[&clear]).await)
        .await
        .expect("clear");
    assert_eq!(cleared.len(), 1);
    assert_eq!(cleared[0].id, id("h2"));
    assert_eq!(cleared[0].state, hearth::alerts::AlertState::Cleared);
    let (after, changed) = a
        .acknowledge(id("h2"), "admin")
        .await
        .expect("ack")
        .expect("found");
    assert!(!changed, "a cleared alert is not acknowledged");
    assert_eq!(after.state, hearth::alerts::AlertState::Cleared);
    // Raised again after clearing: a new alert.
    let back = smoke("h2", 1.0, 3);
    let raised = a
        .write_outcome(&[], &evaluate(&b, &[&back]).await)
        .await
        .expect("raise");
    assert_eq!(raised.len(), 1);
    assert_ne!(raised[0].id, id("h2"));
    assert_eq!(a.get(424_242).await.expect("get"), None);

    // The offline sweep: a sensor silent for an hour (its usual interval a second) raises one
    // alert, once; the same sensor id heard just now in another house does not.
    let now_us = hearth::event::now_us();
    for (house, start_us) in [("h1", now_us - 3_600_000_000), ("h2", now_us)] {
        for i in 0..3 {
            let mut e = event(house, "thermo", "temperature", i, 1_000 + i);
            e.received_us = start_us + i * 1_000_000;
            b.seams.store.write(&[], &[&e], false).await.expect("write");
        }
    }
    let swept = a.sweep_offline().await.expect("sweep");
    let silent: Vec<(&str, &str, &str)> = swept
        .iter()
        .map(|x| (x.house_id.as_str(), x.sensor_id.as_str(), x.rule.as_str()))
        .collect();
    assert_eq!(silent, [("h1", "thermo", "offline")]);
    assert!(a.sweep_offline().await.expect("sweep").is_empty(), "once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_on_postgres() {
    // Every write records its sensors, as the embedded backend here (touch interval 0).
    let b = servers_with("conf_alerts", alert_rules(), |c| {
        c.sensor_touch_interval_ms = 0
    })
    .await;
    alerts_suite(b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_embedded() {
    alerts_suite(embedded_with("conf_alerts_e", alert_rules()).await).await;
}

// ---- retention ------------------------------------------------------------------------------

/// Raw access to a backend's tables, for what the seams do not show (rows, partitions, alerts).
enum Raw {
    Pg(tokio_postgres::Client),
    Sqlite(std::path::PathBuf),
}

impl Raw {
    async fn count(&self, sql: &str) -> i64 {
        match self {
            Raw::Pg(c) => c.query_one(sql, &[]).await.expect(sql).get(0),
            Raw::Sqlite(p) => rusqlite::Connection::open(p)
                .expect("open")
                .query_row(sql, [], |r| r.get(0))
                .expect(sql),
        }
    }

    /// The partitions holding readings (none on SQLite).
    async fn partitions(&self) -> Vec<String> {
        match self {
            Raw::Pg(c) => c
                .query(
                    "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                     WHERE c.relkind = 'r' AND c.relname LIKE 'events_k%' ORDER BY 1",
                    &[],
                )
                .await
                .expect("partitions")
                .iter()
                .map(|r| r.get(0))
                .collect(),
            Raw::Sqlite(_) => Vec::new(),
        }
    }

    /// A cleared alert, cleared `ago_days` before `now_ms`.
    async fn cleared_alert(&self, sensor: &str, now_ms: i64, ago_days: i64) {
        let at = now_ms - ago_days * 86_400_000;
        match self {
            Raw::Pg(c) => {
                c.execute(
                    "INSERT INTO alerts (house_id, sensor_id, lane, rule, kind, severity, state,
                                         message, raised_at, raised_by, cleared_at)
                     VALUES ('house-r', $1, 'routine-0', 'r', 'smoke', 'critical', 'cleared', 'm',
                             to_timestamp($2::float8 / 1000), 'k', to_timestamp($2::float8 / 1000))",
                    &[&sensor, &(at as f64)],
                )
                .await
                .expect("alert");
            }
            Raw::Sqlite(p) => {
                rusqlite::Connection::open(p)
                    .expect("open")
                    .execute(
                        "INSERT INTO alerts (house_id, sensor_id, rule, kind, severity, state,
                                             message, raised_at, raised_by, cleared_at)
                         VALUES ('house-r', ?1, 'r', 'smoke', 'critical', 'cleared', 'm', ?2, 'k', ?2)",
                        rusqlite::params![sensor, at],
                    )
                    .expect("alert");
            }
        }
    }
}

/// Readings of two classes (`power` 1 day, the rest 7), received 40, 10 and 3 days and an hour
/// ago, and cleared alerts (kept 1 day): the sweep removes exactly what expired, and the
/// rollups still count every reading; what is left is read back; a reading of an expired time
/// received late is stored again (its partition made anew). On PostgreSQL the expired
/// partitions are dropped whole and the others left; a copy of a reading received again within
/// `dedup_window_hours` is stored once.
async fn retention_suite(b: Backend, raw: Raw) {
    use hearth::series::{SeriesQuery, Step};
    let s = &b.seams.store;
    let now_us = hearth::event::now_us();
    let day_us = 86_400_000_000i64;
    // The days' ages count back from the last noon (UTC), so that a reading and its copy an
    // hour later fall in the same day's partition whatever the time the test runs at.
    let hour_us = 3_600_000_000i64;
    let noon_us = (now_us - 12 * hour_us) / day_us * day_us + 12 * hour_us;
    let received = [
        noon_us - 40 * day_us,
        noon_us - 10 * day_us,
        noon_us - 3 * day_us,
        now_us - hour_us,
    ];
    let mut batch = Vec::new();
    for kind in ["temperature", "power"] {
        for (i, at) in received.iter().enumerate() {
            let mut e = event("house-r", "meter", kind, i as i64 + 1, 0);
            e.received_us = *at;
            e.ts_ms = e.received_us / 1000;
            batch.push(e);
        }
    }
    let refs: Vec<&Event> = batch.iter().collect();
    assert_eq!(s.write(&[], &refs, false).await.expect("write").stored, 8);
    // The newest again, received an hour later (a broker's redelivery): one row.
    let mut again = batch[3].clone();
    again.received_us += 3_600_000_000;
    assert_eq!(
        s.write(&[], &[&again], false).await.expect("again").stored,
        0
    );
    // One received an hour after its original, and one two hours after, past midnight
    // (PostgreSQL: in the next day's partition, found by the probe within dedup_window_hours):
    // none stored.
    let mut twice = batch[1].clone();
    twice.received_us += 3_600_000_000;
    let mut late_evening = event("house-e", "meter", "temperature", 1, 0);
    late_evening.received_us = (now_us - 2 * day_us) / day_us * day_us - 3_600_000_000;
    late_evening.ts_ms = late_evening.received_us / 1000;
    let stored = s
        .write(&[], &[&late_evening], false)
        .await
        .expect("evening");
    assert_eq!(stored.stored, 1);
    let mut next_day = late_evening.clone();
    next_day.received_us += 2 * 3_600_000_000;
    let written = s.write(&[], &[&next_day, &twice], false).await;
    assert_eq!(written.expect("next day").stored, 0);
    let now_ms = now_us / 1000;
    raw.cleared_alert("old", now_ms, 3).await;
    raw.cleared_alert("new", now_ms, 0).await;
    let before = raw.partitions().await;
    let expired = s.expire(now_us).await.expect("expire");
    assert_eq!(expired.alerts, 1, "{expired:?}");
    let kept = |kind: &'static str| {
        let raw = &raw;
        async move {
            raw.count(&format!(
                "SELECT count(*) FROM events WHERE house_id = 'house-r' AND kind = '{kind}'"
            ))
            .await
        }
    };
    // temperature: the 3-day and 1-hour readings; power: the 1-hour one.
    assert_eq!(kept("temperature").await, 2, "{expired:?}");
    assert_eq!(kept("power").await, 1, "{expired:?}");
    assert_eq!(
        raw.count("SELECT count(*) FROM alerts WHERE house_id = 'house-r'")
            .await,
        1
    );
    match &raw {
        Raw::Pg(_) => {
            // 40 and 10 days of class 7, 40, 10 and 3 days of class 1.
            assert_eq!(expired.partitions.len(), 5, "{expired:?}");
            let after = raw.partitions().await;
            for p in &before {
                assert_eq!(
                    after.contains(p),
                    !expired.partitions.contains(p),
                    "{p}: {before:?} → {after:?}"
                );
            }
            assert!(expired.partitions.iter().all(|p| before.contains(p)));
        }
        Raw::Sqlite(_) => assert_eq!(expired.readings, 5, "{expired:?}"),
    }
    // Read back: history holds what is left, the rollups everything.
    let history = s
        .history(&hearth::seam::HistoryQuery {
            house: "house-r".into(),
            sensor: "meter".into(),
            kind: Some("temperature".into()),
            from: None,
            to: None,
            cursor: None,
            limit: 100,
        })
        .await
        .expect("history");
    assert_eq!(history.len(), 2);
    for kind in ["temperature", "power"] {
        let points = s
            .series(&SeriesQuery {
                house: "house-r".into(),
                sensor: "meter".into(),
                kind: kind.into(),
                step: Step::Day,
                // The oldest reading is 40 days before the last noon: its day starts up to 41.5 days ago.
                from: now_ms - 42 * 86_400_000,
                to: now_ms + 86_400_000,
            })
            .await
            .expect("series");
        assert_eq!(points.iter().map(|p| p.count).sum::<i64>(), 4, "{kind}");
    }
    // Again: nothing more to remove.
    let second = s.expire(now_us).await.expect("expire again");
    assert_eq!(second, Default::default());
    // A late reading of an expired time is stored (and goes at the next sweep), beside a new
    // one (SQLite keeps the newest row whatever its age: see embedded::retention).
    let mut late = event("house-r", "meter", "power", 99, 0);
    late.received_us = now_us - 20 * day_us;
    late.ts_ms = late.received_us / 1000;
    let mut fresh = event("house-r", "meter", "temperature", 100, 0);
    fresh.received_us = now_us;
    fresh.ts_ms = now_us / 1000;
    let written = s.write(&[], &[&late, &fresh], false).await.expect("late");
    assert_eq!(written.stored, 2);
    assert_eq!(kept("power").await, 2);
    s.expire(now_us).await.expect("expire the late one");
    assert_eq!(kept("power").await, 1);

    // Minute rollups are kept 5 days by their minute: a series of minutes shows none older (the
    // 40- and 10-day-old readings, the late one of 20 days), hours and days count them all.
    let series = |step: Step, kind: &'static str| async move {
        s.series(&SeriesQuery {
            house: "house-r".into(),
            sensor: "meter".into(),
            kind: kind.into(),
            step,
            from: now_ms - 42 * 86_400_000,
            to: now_ms + 86_400_000,
        })
        .await
        .expect("series")
        .iter()
        .map(|p| p.count)
        .sum::<i64>()
    };
    s.fold_rollups().await.expect("fold");
    // temperature: 3 days and 1 hour ago, and `fresh`; power: 3 days and 1 hour ago.
    assert_eq!(series(Step::Minute, "temperature").await, 3);
    assert_eq!(series(Step::Minute, "power").await, 2);
    let days = (
        series(Step::Day, "temperature").await,
        series(Step::Day, "power").await,
    );
    assert_eq!(days, (5, 5));
    // Four days on, the sweep deletes the minutes older than a day: the 3-day-old ones of both
    // kinds and house-e's of 2 days; the series of minutes no longer show them, the days do.
    let four_days_on = s.expire(now_us + 4 * day_us).await.expect("expire minutes");
    assert_eq!(four_days_on.rollups, 3, "{four_days_on:?}");
    assert_eq!(series(Step::Minute, "temperature").await, 2);
    assert_eq!(series(Step::Minute, "power").await, 1);
    assert_eq!(
        (
            series(Step::Day, "temperature").await,
            series(Step::Day, "power").await
        ),
        days
    );
}

fn keep_for_tests() -> hearth::Keep {
    hearth::Keep {
        days: 7,
        by_kind: [("power".to_string(), 1)].into(),
        alert_days: 1,
        minute_rollup_days: 5,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_on_postgres() {
    let b = servers_with("conf_keep", Default::default(), |c| {
        c.retention_days = 7;
        c.retention_by_kind = "power=1".into();
        c.alert_retention_days = 1;
        c.rollup_minute_days = 5;
    })
    .await;
    let raw = Raw::Pg(b._env.pg().await);
    retention_suite(b, raw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_embedded() {
    let b = embedded_keeping("conf_keep_e", Default::default(), keep_for_tests()).await;
    let raw = Raw::Sqlite(b._env.data_file());
    retention_suite(b, raw).await;
}
