//! The safety net under the worker (issue 12): each test puts a fault on work in flight by
//! construction (`test_fault`), not by timing, and checks what a user cares about; each was seen
//! to fail on a deliberately broken build (the mutations are listed in docs/RELIABILITY.md).

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

const WAIT: Duration = Duration::from_secs(60);
const ADMIN: &str = "safety-admin-token";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Backend {
    Servers,
    Embedded,
}

/// The workload: readings with `seq` (h1: 20 sensors × 40), readings without (h2: 10 sensors ×
/// 30, each value unique, so a duplicate shows; h4: one water-leak reading on each of 10
/// sensors, on the critical lane), and smoke alarms that raise, clear and raise again (h3: 10
/// sensors): 1,140 events, 20 alerts.
fn workload() -> Vec<(String, Vec<u8>)> {
    let mut seq_readings = Vec::new();
    for seq in 1..=40 {
        for s in 0..20 {
            let p = json!({"kind": "power", "value": seq, "seq": seq});
            seq_readings.push((format!("hearth/h1/meter-{s}"), p.to_string().into_bytes()));
        }
    }
    let mut no_seq = Vec::new();
    let mut unique = 0;
    for _ in 0..30 {
        for s in 0..10 {
            unique += 1;
            let p = json!({"kind": "energy", "value": unique});
            no_seq.push((format!("hearth/h2/plug-{s}"), p.to_string().into_bytes()));
        }
    }
    let mut critical = Vec::new();
    for (seq, value) in [(1, true), (2, false), (3, true)] {
        for s in 0..10 {
            let p = json!({"kind": "smoke", "value": value, "seq": seq});
            critical.push((format!("hearth/h3/smoke-{s}"), p.to_string().into_bytes()));
        }
    }
    // Critical readings without seq too (one per sensor: a second row is a duplicate).
    for s in 0..10 {
        let p = json!({"kind": "water_leak", "value": false});
        critical.push((format!("hearth/h4/leak-{s}"), p.to_string().into_bytes()));
    }
    // Mixed, so that every batch holds some of each (each sensor's own readings in order).
    let mut out = Vec::new();
    let (mut a, mut b, mut c) = (
        seq_readings.into_iter(),
        no_seq.into_iter(),
        critical.into_iter(),
    );
    for i in 0.. {
        let before = out.len();
        out.extend(a.by_ref().take(3));
        out.extend(b.next());
        if i % 8 == 0 {
            out.extend(c.next());
        }
        if out.len() == before {
            break;
        }
    }
    out.extend(c);
    out
}

const EVENTS: u64 = 20 * 40 + 10 * 30 + 10 * 3 + 10;

/// A query on the store of either backend, as numbers.
async fn numbers(env: &Env, backend: Backend, sql: &str) -> Vec<i64> {
    match backend {
        Backend::Servers => {
            let pg = env.pg().await;
            let row = pg.query_one(sql, &[]).await.expect(sql);
            (0..row.len()).map(|i| row.get::<_, i64>(i)).collect()
        }
        Backend::Embedded => {
            let c = rusqlite::Connection::open_with_flags(
                env.data_file(),
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .expect("sqlite");
            c.query_row(sql, [], |r| {
                let n = r.as_ref().column_count();
                (0..n).map(|i| r.get::<_, i64>(i)).collect()
            })
            .expect(sql)
        }
    }
}

/// Everything published is stored once, in order, every alarm raised and cleared once.
async fn assert_exact(env: &Env, backend: Backend) {
    let rows = numbers(
        env,
        backend,
        "SELECT count(*),
                (SELECT count(*) FROM (SELECT DISTINCT house_id, sensor_id, kind, seq FROM events WHERE seq IS NOT NULL) d),
                (SELECT count(*) FROM events WHERE seq IS NOT NULL),
                (SELECT count(DISTINCT value) FROM events WHERE house_id = 'h2'),
                (SELECT count(*) FROM events WHERE house_id = 'h2'),
                (SELECT count(DISTINCT sensor_id) FROM events WHERE house_id = 'h4'),
                (SELECT count(*) FROM events WHERE house_id = 'h4')
         FROM events",
    )
    .await;
    assert_eq!(rows[0], EVENTS as i64, "every event stored: {rows:?}");
    assert_eq!(rows[1], rows[2], "no event with seq twice: {rows:?}");
    assert_eq!(
        (rows[3], rows[4]),
        (300, 300),
        "no event without seq twice or lost: {rows:?}"
    );
    let out_of_order = numbers(
        env,
        backend,
        "SELECT count(*) FROM (
            SELECT seq, lag(seq) OVER (PARTITION BY house_id, sensor_id, kind ORDER BY id) AS prev
            FROM events WHERE seq IS NOT NULL) x
         WHERE prev IS NOT NULL AND seq <= prev",
    )
    .await;
    assert_eq!(out_of_order[0], 0, "each sensor in order");
    let alerts = numbers(
        env,
        backend,
        "SELECT count(*), count(DISTINCT raised_by),
                (SELECT count(*) FROM alerts WHERE state = 'cleared'),
                (SELECT count(*) FROM alerts WHERE state = 'active')
         FROM alerts",
    )
    .await;
    assert_eq!(
        alerts,
        [20, 20, 10, 10],
        "each alarm raised once per raise, cleared once"
    );
}

/// Entries handed to a worker and not acknowledged, right now.
async fn unacknowledged(env: &Env, backend: Backend) -> u64 {
    match backend {
        Backend::Servers => env.status()["lanes"]
            .as_array()
            .map(|l| l.iter().map(|x| x["pending"].as_u64().unwrap_or(0)).sum())
            .unwrap_or(0),
        Backend::Embedded => numbers(env, backend, "SELECT count(*) FROM queue").await[0] as u64,
    }
}

/// Start the flow with the whole workload queued (the publisher PUBACKed and gone) and no
/// worker having touched it, then a worker armed with `fault`. Returns the environment, the
/// process that will hit the fault, and what else must stay up.
async fn queued_then_armed(
    backend: Backend,
    name: &str,
    fault: &str,
) -> (Env, Hearth, Vec<Hearth>, Option<Broker>) {
    match backend {
        Backend::Servers => {
            let mut env = Env::new(name);
            let broker = Broker::start(&env.scratch.0);
            env.set("mqtt_url", broker.url())
                .set("batch_size", 50)
                .set("admin_token", ADMIN);
            let ingest = env.hearth("ingest", &["ingest"]);
            ingest.wait_log("subscribed", WAIT).await;
            publish_all(broker.port, &format!("pub-{name}"), workload()).await;
            eventually("the workload queued", WAIT, || async {
                (env.status()["events"]["received"].as_u64() == Some(EVENTS)).then_some(())
            })
            .await;
            env.set("test_fault", fault);
            let worker = env.hearth("worker", &["worker", "--workers", "2"]);
            (env, worker, vec![ingest], Some(broker))
        }
        Backend::Embedded => {
            let mut env = Env::embedded(name);
            env.set("batch_size", 50)
                .set("admin_token", ADMIN)
                .set("test_fault", "pause_before_store=600000");
            let mut up = env.up().await;
            let port = env.embedded_port.expect("port");
            publish_all(port, &format!("pub-{name}"), workload()).await;
            eventually("the workload queued", WAIT, || async {
                (env.status()["events"]["received"].as_u64() == Some(EVENTS)).then_some(())
            })
            .await;
            up.kill9();
            env.settings.retain(|(k, _)| k != "test_fault");
            env.set("test_fault", fault);
            let up = env.hearth("up", &["up"]);
            (env, up, Vec::new(), None)
        }
    }
}

/// A worker aborted at `fault` (on its second batch) with work in flight: after a restart,
/// nothing is lost, nothing is stored or alarmed twice, order holds; when the fault left a
/// batch committed but unacknowledged, it was delivered again and found stored.
async fn kill_on_work_in_flight(backend: Backend, name: &str, point: &str) {
    let (mut env, mut worker, _keep, _broker) =
        queued_then_armed(backend, name, &format!("{point}@2")).await;
    assert!(worker.ended_within(WAIT).await, "aborted by the fault");
    assert!(
        worker
            .log_text()
            .contains(&format!("test fault: aborting at {point}")),
        "the fault was hit"
    );
    let in_flight = unacknowledged(&env, backend).await;
    if point != "after_ack" {
        assert!(in_flight > 0, "the abort left a batch unacknowledged");
    }
    env.settings.retain(|(k, _)| k != "test_fault");
    let args: &[&str] = match backend {
        Backend::Servers => &["worker", "--workers", "2"],
        Backend::Embedded => &["up"],
    };
    let _again = env.hearth("again", args);
    let status = wait_drained(&env, EVENTS, WAIT).await;
    assert_exact(&env, backend).await;
    if point == "after_store" || point == "after_rules" {
        assert!(
            status["events"]["duplicates"].as_u64() > Some(0),
            "the committed batch was delivered again and found stored: {status}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_before_store_on_the_servers() {
    kill_on_work_in_flight(Backend::Servers, "safe_before", "before_store").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_before_store_embedded() {
    kill_on_work_in_flight(Backend::Embedded, "safe_before_e", "before_store").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_store_on_the_servers() {
    kill_on_work_in_flight(Backend::Servers, "safe_store", "after_store").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_rules_on_the_servers() {
    kill_on_work_in_flight(Backend::Servers, "safe_rules", "after_rules").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_ack_on_the_servers() {
    kill_on_work_in_flight(Backend::Servers, "safe_ack", "after_ack").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_store_embedded() {
    kill_on_work_in_flight(Backend::Embedded, "safe_store_e", "after_store").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_rules_embedded() {
    kill_on_work_in_flight(Backend::Embedded, "safe_rules_e", "after_rules").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_ack_embedded() {
    kill_on_work_in_flight(Backend::Embedded, "safe_ack_e", "after_ack").await;
}

/// The ingest aborted after its durable append, before its PUBACKs: the broker sends the
/// messages again, and those with `seq` are stored once (those without are the documented
/// exception: they get a new ingest id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_append_before_the_puback() {
    let mut env = Env::new("safe_append");
    let broker = Broker::start(&env.scratch.0);
    env.set("mqtt_url", broker.url())
        .set("test_fault", "after_append@2");
    let mut ingest = env.hearth("ingest", &["ingest"]);
    ingest.wait_log("subscribed", WAIT).await;
    let readings = interleaved("h1", 10, 50);
    let publisher = publish_in_background(&env, broker.port, readings);
    assert!(ingest.ended_within(WAIT).await, "aborted by the fault");
    assert!(ingest.log_text().contains("aborting at after_append"));
    env.settings.retain(|(k, _)| k != "test_fault");
    let _ingest = env.hearth("ingest-again", &["ingest"]);
    let worker = env.hearth("worker", &["worker"]);
    worker.wait_log("took lane", WAIT).await;
    publisher
        .await
        .expect("every message acknowledged in the end");
    let pg = env.pg().await;
    wait_rows(&pg, 500, WAIT).await;
    // All 500 may be stored before the broker sends the unacknowledged ones again (once the
    // restarted ingest takes the aborted one's slot, when its lease expires): wait for them.
    let status = wait_drained(&env, 501, WAIT).await;
    assert_exactly_once_in_order(&pg, 500).await;
    assert!(
        status["events"]["received"].as_u64() > Some(500),
        "the appended but unacknowledged messages came again: {status}"
    );
}

/// The ingest aborted with messages decoded and not yet appended: nothing was acknowledged, the
/// broker sends them again, all are stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_before_append() {
    let mut env = Env::new("safe_before_append");
    let broker = Broker::start(&env.scratch.0);
    env.set("mqtt_url", broker.url())
        .set("test_fault", "before_append@2");
    let mut ingest = env.hearth("ingest", &["ingest"]);
    ingest.wait_log("subscribed", WAIT).await;
    let publisher = publish_in_background(&env, broker.port, interleaved("h1", 10, 50));
    assert!(ingest.ended_within(WAIT).await, "aborted by the fault");
    assert!(ingest.log_text().contains("aborting at before_append"));
    env.settings.retain(|(k, _)| k != "test_fault");
    let _ingest = env.hearth("ingest-again", &["ingest"]);
    let worker = env.hearth("worker", &["worker"]);
    worker.wait_log("took lane", WAIT).await;
    publisher
        .await
        .expect("every message acknowledged in the end");
    let pg = env.pg().await;
    wait_rows(&pg, 500, WAIT).await;
    wait_drained(&env, 500, WAIT).await;
    assert_exactly_once_in_order(&pg, 500).await;
}

/// A worker that holds a batch while its lane is taken over (SIGSTOP past the lease) has its
/// write refused by the fence, not just its lease dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_refuses_a_stale_write() {
    let mut env = Env::new("safe_fence");
    let broker = Broker::start(&env.scratch.0);
    env.set("mqtt_url", broker.url()).set("shards", 1);
    let ingest = env.hearth("ingest", &["ingest"]);
    ingest.wait_log("subscribed", WAIT).await;
    publish_all(broker.port, "pub-fence", interleaved("h1", 5, 20)).await;
    env.set("test_fault", "pause_before_store=3000");
    let a = env.hearth("worker-a", &["worker", "--workers", "1"]);
    env.settings.retain(|(k, _)| k != "test_fault");
    a.wait_log("test fault: pausing", WAIT).await;
    a.signal("STOP");
    // Its lease (2 s in tests) expires; another worker takes the lane, stores, moves the fence.
    let b = env.hearth("worker-b", &["worker", "--workers", "1"]);
    b.wait_log("took lane", WAIT).await;
    let pg = env.pg().await;
    wait_rows(&pg, 100, WAIT).await;
    a.signal("CONT");
    a.wait_log("fenced out of lane", WAIT).await;
    wait_drained(&env, 100, WAIT).await;
    assert_exactly_once_in_order(&pg, 100).await;
}

/// SIGTERM while a worker holds a batch: it writes and acknowledges it, hands its lanes back and
/// exits 0, before `shutdown_timeout_ms` would make it leave anyway.
async fn sigterm_finishes_the_batch(backend: Backend, name: &str) {
    let (env, mut worker, _keep, _broker) =
        queued_then_armed(backend, name, "pause_before_store=1500").await;
    worker.wait_log("test fault: pausing", WAIT).await;
    let stored_before = numbers(&env, backend, "SELECT count(*) FROM events").await[0];
    worker.signal("TERM");
    let code = worker.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(0), "a clean exit");
    let log = worker.log_text();
    assert!(
        !log.contains("took longer than shutdown_timeout_ms"),
        "it did not run out of time"
    );
    let stored_after = numbers(&env, backend, "SELECT count(*) FROM events").await[0];
    assert!(
        stored_after > stored_before,
        "the batch in hand was written"
    );
    assert_eq!(
        unacknowledged(&env, backend).await,
        0,
        "nothing it read is left unacknowledged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_batch_on_the_servers() {
    sigterm_finishes_the_batch(Backend::Servers, "safe_term").await;
}

/// A smoke alarm published behind a routine backlog (one routine lane, so the backlog is in
/// front of it if it were routed there) is alarmed while the backlog is still queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_overtakes_a_routine_backlog() {
    let mut env = Env::new("safe_smoke");
    let broker = Broker::start(&env.scratch.0);
    env.set("mqtt_url", broker.url())
        .set("shards", 1)
        .set("admin_token", ADMIN);
    let ingest = env.hearth("ingest", &["ingest"]);
    ingest.wait_log("subscribed", WAIT).await;
    publish_all(broker.port, "pub-backlog", interleaved("h1", 100, 300)).await;
    publish_all(
        broker.port,
        "pub-smoke",
        vec![(
            "hearth/h9/hall".into(),
            br#"{"kind":"smoke","value":true,"seq":1}"#.to_vec(),
        )],
    )
    .await;
    eventually("all queued", WAIT, || async {
        (env.status()["events"]["received"].as_u64() == Some(30_001)).then_some(())
    })
    .await;
    let api = env.hearth("api", &["api"]);
    let addr = api.http_addr().await;
    let mut ws = ws_connect(&addr, "house=h9&events=false", Some(ADMIN))
        .await
        .expect("ws");
    assert_eq!(
        ws_next(&mut ws, WAIT).await.expect("hello")["type"],
        "hello"
    );
    let _worker = env.hearth("worker", &["worker", "--workers", "1"]);
    let alert = loop {
        let m = ws_next(&mut ws, WAIT).await.expect("the smoke alert");
        if m["type"] == "alert" {
            break m;
        }
    };
    let depth: u64 = env.status()["lanes"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter(|x| x["lane"] != "critical")
                .map(|x| x["depth"].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0);
    assert_eq!(alert["alert"]["sensor_id"], "hall");
    assert!(
        depth > 0,
        "the alarm came before the routine backlog drained"
    );
}

/// An entry that fails for its own content is delivered `max_deliveries` times, no fewer, then
/// dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_entry_is_retried_max_deliveries_times() {
    let mut env = Env::new("safe_retry");
    let broker = Broker::start(&env.scratch.0);
    env.set("mqtt_url", broker.url())
        .set("max_deliveries", 4)
        .set("shards", 1);
    let up = env.up().await;
    let mut redis = env.redis().await;
    let _: String = redis::cmd("XADD")
        .arg(format!("{}:stream:routine-0", env.redis_prefix))
        .arg("*")
        .arg("e")
        .arg("not an event")
        .query_async(&mut redis)
        .await
        .expect("xadd");
    eventually("the dead letter", WAIT, || async {
        (env.status()["dead_letters"] == 1).then_some(())
    })
    .await;
    let log = up.log_text();
    assert!(
        log.contains("deliveries=4"),
        "dead-lettered at the 4th delivery"
    );
    assert_eq!(log.matches("dead-lettered").count(), 1, "once");
}

/// A webhook receiver that fails twice then answers gets the alert once, with no dead letter.
async fn a_webhook_that_recovers(backend: Backend, name: &str) {
    let hook = Hook::failing(2).await;
    let (mut env, broker) = match backend {
        Backend::Servers => {
            let env = Env::new(name);
            let b = Broker::start(&env.scratch.0);
            (env, Some(b))
        }
        Backend::Embedded => (Env::embedded(name), None),
    };
    if let Some(b) = &broker {
        env.set("mqtt_url", b.url());
    }
    let rules = env.scratch.0.join("rules.toml");
    std::fs::write(
        &rules,
        format!(
            "[[rule]]\nname = \"smoke\"\ntype = \"boolean\"\nkinds = [\"smoke\"]\nseverity = \"critical\"\n\n[[webhook]]\nurl = \"{}\"\nseverities = [\"critical\"]\n",
            hook.url
        ),
    )
    .expect("rules");
    env.set("rules_file", rules.display())
        .set("admin_token", ADMIN);
    let _up = env.up().await;
    let port = broker
        .as_ref()
        .map(|b| b.port)
        .or(env.embedded_port)
        .expect("port");
    publish_all(
        port,
        &format!("pub-{name}"),
        vec![(
            "hearth/h/hall".into(),
            br#"{"kind":"smoke","value":true,"seq":1}"#.to_vec(),
        )],
    )
    .await;
    let delivered = eventually("the webhook delivered", WAIT, || async {
        let r = hook.received();
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0]["alert"]["state"], "active");
    assert_eq!(hook.attempts(), 3, "two failures, then the delivery");
    assert_eq!(env.status()["dead_letters"], 0, "nothing dead-lettered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_recovers_on_the_servers() {
    a_webhook_that_recovers(Backend::Servers, "safe_hook").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_recovers_embedded() {
    a_webhook_that_recovers(Backend::Embedded, "safe_hook_e").await;
}
