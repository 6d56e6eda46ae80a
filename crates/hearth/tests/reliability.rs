//! Reliability on the shared servers: dead letters you can list, replay and purge; hostile input
//! end to end; graceful shutdown; a stalled worker fenced. (Faults that break a server are in
//! `chaos.rs`, on private servers.)

mod support;

use std::time::{Duration, Instant};

use support::*;

const READY: Duration = Duration::from_secs(60);
const DRAIN: Duration = Duration::from_secs(180);
const ADMIN: &str = "admin-reliability-token";

fn reading(kind: &str, value: f64, seq: u64) -> Vec<u8> {
    serde_json::json!({"kind": kind, "value": value, "seq": seq})
        .to_string()
        .into_bytes()
}

/// `hearth dlq list | replay | purge` and `/api/v1/dlq`: letters selected by reason and sensor;
/// a replayed letter goes through the normal path (here: once the limit that refused it is
/// raised, its events are stored exactly once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_replayed_and_purged() {
    let mut env = Env::new("dlq");
    let broker = Broker::start(&env.scratch.0);
    env.set("mqtt_url", broker.url())
        .set("admin_token", ADMIN)
        .set("max_payload_bytes", 100);
    let up = env.up().await;
    let addr = up.http_addr().await;

    let big: Vec<String> = (1..=4)
        .map(|seq| format!(r#"{{"kind":"power","value":{seq},"seq":{seq}}}"#))
        .collect();
    let mut payloads = vec![
        ("hearth/h1/s1".to_string(), reading("temperature", 20.0, 1)),
        (
            "hearth/h1/meter".to_string(),
            format!("[{}]", big.join(",")).into_bytes(),
        ),
        ("hearth/h1/s3".to_string(), b"{nope".to_vec()),
    ];
    payloads.push(("hearth/h1/s1".to_string(), reading("temperature", 20.5, 2)));
    publish_all(broker.port, &format!("pub-{}", env.name), payloads).await;
    wait_drained(&env, 2, DRAIN).await;
    eventually("two dead letters", DRAIN, || async {
        (env.dead_letters().await.len() == 2).then_some(())
    })
    .await;

    // CLI list, filtered.
    let out = env
        .command(&["dlq", "list", "--reason", "payload_too_large", "--json"])
        .output()
        .expect("dlq list");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["topic"], "hearth/h1/meter");
    let out = env
        .command(&["dlq", "list", "--sensor", "s3", "--json"])
        .output()
        .expect("dlq list");
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(listed[0]["reason"], "malformed_json", "{listed}");

    // API: admin only, parameters checked.
    let house = token_for(&env, "h1");
    assert_eq!(
        http(&addr, "GET", "/api/v1/dlq", Some(&house), None)
            .await
            .0,
        403
    );
    assert_eq!(http(&addr, "GET", "/api/v1/dlq", None, None).await.0, 401);
    assert_eq!(
        http(&addr, "GET", "/api/v1/dlq?limit=lots", Some(ADMIN), None)
            .await
            .0,
        400
    );
    assert_eq!(
        http(
            &addr,
            "GET",
            "/api/v1/dlq?older_than=soon",
            Some(ADMIN),
            None
        )
        .await
        .0,
        400
    );
    let (code, body) = http(&addr, "GET", "/api/v1/dlq", Some(ADMIN), None).await;
    assert_eq!(code, 200, "{body}");
    let all: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(all.as_array().map(Vec::len), Some(2), "{all}");

    // Replay with a limit that now lets the payload through: its 4 events are stored once.
    let out = env
        .command(&["dlq", "replay", "--reason", "payload_too_large"])
        .env("HEARTH_MAX_PAYLOAD_BYTES", "65536")
        .output()
        .expect("dlq replay");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("replayed 1 letter(s): 4 event(s)"), "{said}");
    wait_drained(&env, 6, DRAIN).await;
    let pg = env.pg().await;
    assert_exactly_once_in_order(&pg, 6).await;

    // Replaying what still fails puts it back with its reason; purge removes it.
    let (code, body) = http(
        &addr,
        "POST",
        "/api/v1/dlq/replay?reason=malformed_json",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let replayed: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(replayed["rejected_again"], 1, "{replayed}");
    let dead = env.dead_letters().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["reason"], "malformed_json");
    let (code, body) = http(
        &addr,
        "POST",
        "/api/v1/dlq/purge?sensor=s3",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!((code, body.contains("\"purged\":1")), (200, true), "{body}");
    assert!(env.dead_letters().await.is_empty());
    let out = env.command(&["dlq", "purge"]).output().expect("dlq purge");
    assert!(String::from_utf8_lossy(&out.stdout).contains("purged 0"));
}

/// The hostile corpus through MQTT and HTTP, with valid traffic around every item: each item
/// rejected with its reason, every valid reading stored exactly once and in order, no process
/// restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_corpus_is_rejected_with_reasons_and_valid_traffic_flows() {
    let mut env = Env::new("corpus");
    let broker = Broker::start(&env.scratch.0);
    env.set("mqtt_url", broker.url()).set("admin_token", ADMIN);
    let mut up = env.up().await;
    let addr = up.http_addr().await;

    let ten_years_ms = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64)
        + 10 * 365 * 24 * 3600 * 1000;
    let t = "hearth/h1/s1";
    let corpus: Vec<(String, Vec<u8>, &str)> = vec![
        (
            t.into(),
            b"{\"kind\":\"temperature\",".to_vec(),
            "malformed_json",
        ),
        (t.into(), b"[1, 2".to_vec(), "malformed_json"),
        (
            t.into(),
            br#"{"kind":"temperature","value":"warm"}"#.to_vec(),
            "wrong_type",
        ),
        (t.into(), br#"{"kind":42,"value":1}"#.to_vec(), "wrong_type"),
        (
            t.into(),
            br#"{"kind":"temperature","value":NaN}"#.to_vec(),
            "malformed_json",
        ),
        (
            t.into(),
            br#"{"kind":"temperature","value":Infinity}"#.to_vec(),
            "malformed_json",
        ),
        (
            t.into(),
            br#"{"kind":"temperature","value":1e999}"#.to_vec(),
            "malformed_json",
        ),
        (t.into(), br#"{"value":21.5}"#.to_vec(), "missing_field"),
        (
            t.into(),
            br#"{"kind":"temperature"}"#.to_vec(),
            "missing_field",
        ),
        (
            t.into(),
            br#"{"kind":"temperature","value":21,"seq":-5}"#.to_vec(),
            "bad_seq",
        ),
        (
            t.into(),
            format!(r#"{{"kind":"temperature","value":21,"ts":{ten_years_ms}}}"#).into_bytes(),
            "bad_timestamp",
        ),
        (t.into(), vec![0xff, 0xfe, b'{', 0x80], "malformed_json"),
        (
            t.into(),
            format!(
                r#"{{"kind":"power","value":1,"pad":"{}"}}"#,
                "x".repeat(70_000)
            )
            .into_bytes(),
            "payload_too_large",
        ),
        (
            "hearth/../s1".into(),
            br#"{"kind":"power","value":1}"#.to_vec(),
            "bad_id",
        ),
        (
            // The longest topic MQTT can carry is 65,535 bytes.
            format!("hearth/h1/{}", "s".repeat(65_000)),
            br#"{"kind":"power","value":1}"#.to_vec(),
            "bad_id",
        ),
        (
            t.into(),
            br#"{"kind":"power","value":1,"house_id":"h2"}"#.to_vec(),
            "house_mismatch",
        ),
        (
            t.into(),
            br#"{"kind":"humidity","value":140}"#.to_vec(),
            "out_of_range",
        ),
    ];
    let mut payloads = Vec::new();
    let mut seq = 0;
    for (topic, payload, _) in &corpus {
        for _ in 0..3 {
            seq += 1;
            payloads.push((t.to_string(), reading("temperature", 20.5, seq)));
        }
        payloads.push((topic.clone(), payload.clone()));
    }
    for _ in 0..3 {
        seq += 1;
        payloads.push((t.to_string(), reading("temperature", 20.5, seq)));
    }
    publish_all(broker.port, &format!("pub-{}", env.name), payloads).await;
    wait_drained(&env, seq, DRAIN).await;

    // The same through HTTP: each bad reading refused with its reason, its neighbours accepted.
    let http_bad = [
        (
            r#"{"house_id":"h1","sensor_id":"s2","kind":"temperature","value":"x"}"#,
            "wrong_type",
        ),
        (
            r#"{"house_id":"h1","sensor_id":"../x","kind":"temperature","value":1}"#,
            "bad_id",
        ),
        (
            r#"{"house_id":"h1","sensor_id":"s2","kind":"temperature","value":1,"seq":-1}"#,
            "bad_seq",
        ),
        (
            r#"{"house_id":"h1","sensor_id":"s2","value":1}"#,
            "missing_field",
        ),
    ];
    let mut http_seq = 0;
    for (bad, reason) in http_bad {
        http_seq += 1;
        let good = format!(
            r#"{{"house_id":"h1","sensor_id":"s2","kind":"temperature","value":20,"seq":{http_seq}}}"#
        );
        let (code, body) = http(
            &addr,
            "POST",
            "/api/v1/events",
            Some(ADMIN),
            Some(&format!("[{good},{bad}]")),
        )
        .await;
        assert_eq!(code, 202, "{body}");
        assert!(body.contains(reason), "{bad}: {body}");
    }
    let (code, _) = http(&addr, "POST", "/api/v1/events", Some(ADMIN), Some("{oops")).await;
    assert_eq!(code, 400);
    wait_drained(&env, seq + http_seq, DRAIN).await;

    let pg = env.pg().await;
    assert_exactly_once_in_order(&pg, (seq + http_seq) as i64).await;
    let dead = env.dead_letters().await;
    let reasons: Vec<&str> = dead.iter().map(|d| d["reason"].as_str()).collect();
    let mut expected: Vec<&str> = corpus.iter().map(|(_, _, r)| *r).collect();
    expected.extend(http_bad.iter().map(|(_, r)| *r));
    assert_eq!(reasons, expected);
    assert!(dead.iter().all(|d| !d["detail"].is_empty()));
    assert!(up.alive(), "no process restarted");
    assert!(!up.log_text().contains("panicked"));
}

/// SIGTERM to a worker in the middle of a run: it finishes the batch in hand, hands its lanes
/// back and exits 0 well within `shutdown_timeout_ms`; the other worker takes over at once
/// (no lease to wait out), and everything is stored exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_batch_in_hand_and_exits_in_time() {
    let mut env = Env::new("sigterm");
    let broker = Broker::start(&env.scratch.0);
    env.set("mqtt_url", broker.url())
        .set("batch_size", 200)
        .set("shutdown_timeout_ms", 5000);
    let mut w1 = env.hearth("worker-a", &["worker", "--workers", "2"]);
    let w2 = env.hearth("worker-b", &["worker", "--workers", "2"]);
    w1.wait_log("took lane", READY).await;
    w2.wait_log("worker started", READY).await;
    let ingest = env.hearth("ingest", &["ingest"]);
    ingest.wait_log("subscribed", READY).await;

    let publisher = publish_in_background(&env, broker.port, interleaved("h1", 100, 100));
    let pg = env.pg().await;
    wait_rows(&pg, 2_000, DRAIN).await;
    let asked = Instant::now();
    w1.signal("TERM");
    let code = w1.wait_exit(Duration::from_secs(10));
    let took = asked.elapsed();
    assert_eq!(code, Some(0), "clean exit");
    assert!(w1.log_text().contains("worker stopped"));
    eprintln!("worker-a stopped {took:?} after SIGTERM");
    publisher.await.expect("publisher");
    wait_drained(&env, 10_000, DRAIN).await;
    assert_exactly_once_in_order(&pg, 10_000).await;
}

/// A worker SIGSTOPped past its lease and then SIGCONTinued: its lanes were taken over, and
/// when it wakes its stale fencing token is refused, so nothing is written twice or out of
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_worker_is_fenced_when_it_wakes() {
    let mut env = Env::new("sigstop");
    let broker = Broker::start(&env.scratch.0);
    env.set("mqtt_url", broker.url()).set("batch_size", 100);
    let w1 = env.hearth("worker-a", &["worker", "--workers", "2"]);
    let w2 = env.hearth("worker-b", &["worker", "--workers", "2"]);
    w1.wait_log("took lane", READY).await;
    w2.wait_log("took lane", READY).await;
    let ingest = env.hearth("ingest", &["ingest"]);
    ingest.wait_log("subscribed", READY).await;

    let publisher = publish_in_background(&env, broker.port, interleaved("h1", 100, 150));
    let pg = env.pg().await;
    wait_rows(&pg, 1_000, DRAIN).await;
    w1.signal("STOP");
    // Lease TTL is 2 s in tests: well past it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    w1.signal("CONT");
    publisher.await.expect("publisher");
    wait_drained(&env, 15_000, DRAIN).await;
    assert_exactly_once_in_order(&pg, 15_000).await;
    let woke = w1.log_text();
    assert!(
        woke.contains("lease lost") || woke.contains("lane lost") || woke.contains("fenced out"),
        "the stalled worker noticed it had lost its lanes"
    );
}
