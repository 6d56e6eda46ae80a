//! The durable pipeline end to end, on real servers: MQTT (a private Mosquitto from
//! `deploy/mosquitto.conf`, or the shared one for the seed's literal command), Redis, PostgreSQL,
//! and hearth's own role processes.

mod support;

use std::time::Duration;

use support::*;

const READY: Duration = Duration::from_secs(60);
const DRAIN: Duration = Duration::from_secs(180);

/// 20,000 events from 200 sensors through 3 workers in 2 processes: every one stored once, in
/// order per sensor, and the queue drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_20k_is_stored_exactly_once_in_order() {
    let env = Env::new("burst");
    let broker = Broker::start(&env.scratch.0);
    let mut env = env;
    env.set("mqtt_url", broker.url());
    let mut w1 = env.hearth("worker-a", &["worker", "--workers", "2"]);
    let mut w2 = env.hearth("worker-b", &["worker", "--workers", "1"]);
    w1.wait_log("took lane", READY).await;
    w2.wait_log("worker started", READY).await;
    let mut ingest = env.hearth("ingest", &["ingest"]);
    ingest.wait_log("subscribed", READY).await;

    publish_all(
        broker.port,
        &format!("pub-{}", env.name),
        interleaved("h1", 200, 100),
    )
    .await;

    let pg = env.pg().await;
    wait_rows(&pg, 20_000, DRAIN).await;
    let status = wait_drained(&env, 20_000, DRAIN).await;
    assert_exactly_once_in_order(&pg, 20_000).await;
    assert_eq!(status["events"]["stored"], 20_000);
    assert_eq!(status["dead_letters"], 0);
    let table = env.command(&["status"]).output().expect("hearth status");
    let table = String::from_utf8_lossy(&table.stdout);
    let total: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("total"))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    assert_eq!(total, ["total", "0"], "{table}");
    assert!(table.contains("in flight 0"), "{table}");
    assert!(
        w1.alive() && w2.alive() && ingest.alive(),
        "no process restarted"
    );
}

/// The same run while one of the two worker processes is SIGKILLed in the middle and started
/// again: nothing lost, nothing twice, order kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_sigkill_mid_run_loses_nothing() {
    let mut env = Env::new("sigkill");
    let broker = Broker::start(&env.scratch.0);
    env.set("mqtt_url", broker.url());
    // Small batches so that the kill lands with batches in flight, not between two big ones.
    env.set("batch_size", 200);
    let w1 = env.hearth("worker-a", &["worker", "--workers", "2"]);
    let mut w2 = env.hearth("worker-b", &["worker", "--workers", "1"]);
    w1.wait_log("took lane", READY).await;
    w2.wait_log("worker started", READY).await;
    let ingest = env.hearth("ingest", &["ingest"]);
    ingest.wait_log("subscribed", READY).await;

    let publisher = publish_in_background(&env, broker.port, interleaved("h1", 200, 100));
    let pg = env.pg().await;
    // Kill when a part is stored and the rest is still coming or queued.
    wait_rows(&pg, 3_000, DRAIN).await;
    let before = count_events(&pg).await;
    w2.kill9();
    eprintln!("killed worker-b with {before} rows stored");
    tokio::time::sleep(Duration::from_millis(500)).await;
    w2.restart();
    publisher.await.expect("publisher");

    wait_rows(&pg, 20_000, DRAIN).await;
    wait_drained(&env, 20_000, DRAIN).await;
    assert!(before < 20_000, "the kill happened mid-run");
    assert_exactly_once_in_order(&pg, 20_000).await;
}

/// Publishing the same (sensor, kind, seq) twice stores one row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_publish_is_stored_once() {
    let mut env = Env::new("dup");
    let broker = Broker::start(&env.scratch.0);
    env.set("mqtt_url", broker.url());
    let _up = env.up().await;

    let msg = br#"{"kind":"temperature","value":21.5,"seq":7}"#.to_vec();
    let marker = br#"{"kind":"temperature","value":22,"seq":8}"#.to_vec();
    publish_all(
        broker.port,
        &format!("pub-{}", env.name),
        vec![
            ("hearth/h1/s1".into(), msg.clone()),
            ("hearth/h1/s1".into(), msg),
            ("hearth/h1/s1".into(), marker),
        ],
    )
    .await;
    let pg = env.pg().await;
    wait_drained(&env, 3, DRAIN).await;
    let rows = pg
        .query("SELECT seq, value FROM events ORDER BY id", &[])
        .await
        .expect("rows");
    let got: Vec<(i64, f64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(got, vec![(7, 21.5), (8, 22.0)]);
    let status = env.status();
    assert_eq!(status["events"]["duplicates"], 1);
}

/// The seed's literal command, on the shared broker at localhost:1883.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_mosquitto_pub_command_is_stored() {
    let mut env = Env::new("seed");
    env.set("mqtt_url", "mqtt://127.0.0.1:1883");
    let up = env.up().await;

    let status = std::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "localhost",
            "-t",
            "maison/capteurs/temperature",
            "-m",
            r#"{"temp": 22.5}"#,
        ])
        .status()
        .expect("mosquitto_pub");
    assert!(status.success());

    let pg = env.pg().await;
    let row = eventually("the seed's event", DRAIN, || async {
        pg.query_opt(
            "SELECT house_id, sensor_id, kind, value FROM events WHERE kind = 'temperature'",
            &[],
        )
        .await
        .ok()
        .flatten()
    })
    .await;
    let got: (String, String, String, f64) = (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(
        got,
        (
            "maison".into(),
            "temperature".into(),
            "temperature".into(),
            22.5
        )
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count_events(&pg).await, 1);
    drop(up);
    forget_session(&format!("ingest-{}", env.name));
}

/// Erase a persistent session this test left on the shared broker.
fn forget_session(client_id: &str) {
    let _ = std::process::Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-i",
            client_id,
            "-t",
            "hearth/none",
            "-W",
            "1",
        ])
        .output();
}

/// Bad input interleaved with good: every good event stored, every bad message in the
/// dead-letter stream with its reason, no process restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_dead_lettered_and_the_rest_flows() {
    let mut env = Env::new("bad");
    let broker = Broker::start(&env.scratch.0);
    env.set("mqtt_url", broker.url());
    let mut up = env.up().await;

    let bad: Vec<(&str, String, &str)> = vec![
        (
            "hearth/h1/s1",
            "{\"kind\": \"temperature\", \"value\": 21".into(),
            "malformed_json",
        ),
        (
            "hearth/h1/s1",
            r#"{"kind":"temperature","value":"warm","seq":1000}"#.into(),
            "wrong_type",
        ),
        (
            "hearth/h1/s1",
            r#"{"kind":"temperature","value":NaN,"seq":1001}"#.into(),
            "malformed_json",
        ),
        (
            "hearth/h1/s1",
            r#"{"kind":"humidity","value":140,"seq":1002}"#.into(),
            "out_of_range",
        ),
        (
            "hearth/h1/s1",
            format!(
                r#"{{"kind":"power","value":1,"seq":1003,"pad":"{}"}}"#,
                "x".repeat(70_000)
            ),
            "payload_too_large",
        ),
        (
            "hearth/h1/bad$id",
            r#"{"kind":"power","value":1}"#.into(),
            "bad_id",
        ),
    ];
    let mut payloads = Vec::new();
    let mut seq = 0;
    for (topic, payload, _) in &bad {
        for _ in 0..5 {
            seq += 1;
            let good = serde_json::json!({"kind": "temperature", "value": 20.5, "seq": seq});
            payloads.push(("hearth/h1/s1".to_string(), good.to_string().into_bytes()));
        }
        payloads.push((topic.to_string(), payload.clone().into_bytes()));
    }
    // Good events after the last bad one: once they are stored, every message was handled.
    for _ in 0..5 {
        seq += 1;
        let good = serde_json::json!({"kind": "temperature", "value": 20.5, "seq": seq});
        payloads.push(("hearth/h1/s1".to_string(), good.to_string().into_bytes()));
    }
    publish_all(broker.port, &format!("pub-{}", env.name), payloads).await;

    let status = wait_drained(&env, seq as u64, DRAIN).await;
    let pg = env.pg().await;
    assert_exactly_once_in_order(&pg, seq).await;
    assert_eq!(status["dead_letters"], bad.len());

    let dead = env.dead_letters().await;
    let reasons: Vec<&str> = dead.iter().map(|d| d["reason"].as_str()).collect();
    let expected: Vec<&str> = bad.iter().map(|(_, _, r)| *r).collect();
    assert_eq!(reasons, expected);
    for (letter, (topic, payload, _)) in dead.iter().zip(&bad) {
        assert_eq!(letter["topic"], *topic);
        assert!(!letter["detail"].is_empty());
        assert!(
            !letter["payload"].is_empty() && payload.starts_with(&letter["payload"]),
            "raw payload kept"
        );
    }
    assert!(up.alive(), "no process restarted");
}

/// An entry in a lane that a worker cannot read back is retried `max_deliveries` times, then
/// dead-lettered with its XACK, while the events around it are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_entry_is_dead_lettered_after_max_deliveries() {
    let mut env = Env::new("poison");
    let broker = Broker::start(&env.scratch.0);
    env.set("mqtt_url", broker.url())
        .set("max_deliveries", 3)
        .set("shards", 1);
    let _up = env.up().await;

    let mut redis = env.redis().await;
    let stream = format!("{}:stream:routine-0", env.redis_prefix);
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("e")
        .arg("this is not an event")
        .query_async(&mut redis)
        .await
        .expect("xadd");
    publish_all(
        broker.port,
        &format!("pub-{}", env.name),
        interleaved("h1", 3, 10),
    )
    .await;

    let status = wait_drained(&env, 30, DRAIN).await;
    assert_eq!(status["dead_letters"], 1);
    assert_eq!(status["events"]["dead_lettered"], 1);
    let pg = env.pg().await;
    assert_exactly_once_in_order(&pg, 30).await;
    let dead = env.dead_letters().await;
    assert_eq!(dead[0]["reason"], "bad_entry");
    assert_eq!(dead[0]["payload"], "this is not an event");
}

/// With no worker running, the ingest stops taking routine messages once the queue passes the
/// high watermark; the broker keeps the rest, and everything arrives once workers run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_holds_messages_at_the_broker_and_drops_nothing() {
    let mut env = Env::new("backpressure");
    let broker = Broker::start(&env.scratch.0);
    env.set("mqtt_url", broker.url())
        .set("queue_high_watermark", 1000)
        .set("queue_low_watermark", 200)
        .set("batch_size", 100);
    let ingest = env.hearth("ingest", &["ingest"]);
    ingest.wait_log("subscribed", READY).await;

    publish_all(
        broker.port,
        &format!("pub-{}", env.name),
        interleaved("h1", 50, 100),
    )
    .await;
    // Give the ingest time to run past the watermark if it were going to.
    ingest.wait_log("holding routine traffic back", DRAIN).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let depth: u64 = env.status()["lanes"]
        .as_array()
        .expect("lanes")
        .iter()
        .map(|l| l["depth"].as_u64().unwrap_or(0))
        .sum();
    // The ingest counts what it appends between two measures: at most one batch past the mark.
    assert!(
        depth <= 1_000 + 100,
        "held at the watermark (1,000) within a batch (100), got {depth}"
    );
    assert!(
        depth >= 1_000,
        "the queue filled to the watermark, got {depth}"
    );

    let worker = env.hearth("worker", &["worker"]);
    worker.wait_log("took lane", READY).await;
    let pg = env.pg().await;
    wait_rows(&pg, 5_000, DRAIN).await;
    wait_drained(&env, 5_000, DRAIN).await;
    assert_exactly_once_in_order(&pg, 5_000).await;
}
