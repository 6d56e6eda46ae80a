//! `hearth up` with nothing configured (issue 6): the embedded broker and store, no Redis,
//! PostgreSQL or Mosquitto involved. The seed's literal `mosquitto_pub` is stored and served by
//! the API the dashboard reads; kill -9 and a restart lose no acknowledged event and store none
//! twice; the critical lane and dead letters work as on the servers.

mod support;

use std::process::Command;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use serde_json::Value;
use support::*;

const ADMIN: &str = "admin-embedded";

async fn get(addr: &str, path: &str) -> Value {
    let out = tokio::process::Command::new("curl")
        .args(["-sf", "-H", &format!("Authorization: Bearer {ADMIN}")])
        .arg(format!("http://{addr}{path}"))
        .output()
        .await
        .expect("curl");
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn db(env: &Env) -> Connection {
    Connection::open_with_flags(env.data_file(), OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open the embedded store")
}

fn scalar(env: &Env, sql: &str) -> i64 {
    db(env).query_row(sql, [], |r| r.get(0)).expect(sql)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_mosquitto_pub_is_stored_and_shown_without_any_server() {
    let mut env = Env::embedded("emb_seed");
    env.set("admin_token", ADMIN)
        .set("api_listen", "127.0.0.1:0");
    let up = env.up().await;
    let addr = up.http_addr().await;
    let port = env.embedded_port.expect("port").to_string();
    // The seed's command, pointed at the embedded broker.
    let status = Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", &port])
        .args([
            "-t",
            "maison/capteurs/temperature",
            "-m",
            r#"{"temp": 22.5}"#,
        ])
        .status()
        .expect("mosquitto_pub (Debian package mosquitto-clients)");
    assert!(status.success());
    // A critical reading and a bad payload, at QoS 1.
    for (topic, payload) in [
        (
            "hearth/home/hall-smoke",
            r#"{"kind":"smoke","value":true,"seq":1}"#,
        ),
        ("hearth/home/kitchen", "not json"),
    ] {
        let status = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-q",
                "1",
                "-t",
                topic,
                "-m",
                payload,
            ])
            .status()
            .expect("mosquitto_pub");
        assert!(status.success());
    }

    let sensors = eventually(
        "the reading in the API",
        Duration::from_secs(30),
        || async {
            let v = get(&addr, "/api/v1/houses/maison/sensors").await;
            (v[0]["latest"]["temperature"]["value"] == 22.5).then_some(v)
        },
    )
    .await;
    assert_eq!(sensors[0]["sensor_id"], "temperature");
    let history = get(&addr, "/api/v1/sensors/temperature/events").await;
    assert_eq!(history["events"].as_array().map(Vec::len), Some(1));
    assert_eq!(history["events"][0]["value"], 22.5);
    assert_eq!(
        scalar(
            &env,
            "SELECT count(*) FROM events WHERE sensor_id = 'temperature'"
        ),
        1
    );

    // The smoke alarm is raised, listed, and acknowledged through the API.
    let alert = eventually("the smoke alert", Duration::from_secs(30), || async {
        let v = get(&addr, "/api/v1/alerts?state=active").await;
        v.as_array()
            .and_then(|a| a.iter().find(|a| a["rule"] == "smoke").cloned())
    })
    .await;
    let out = Command::new("curl")
        .args([
            "-sf",
            "-X",
            "POST",
            "-H",
            &format!("Authorization: Bearer {ADMIN}"),
        ])
        .arg(format!("http://{addr}/api/v1/alerts/{}/ack", alert["id"]))
        .output()
        .expect("curl");
    let acked: Value = serde_json::from_slice(&out.stdout).expect("ack JSON");
    assert_eq!(acked["state"], "acknowledged");

    // Bad input is dead-lettered with its reason; the accounting adds up.
    let letters = get(&addr, "/api/v1/dlq").await;
    assert_eq!(letters[0]["reason"], "malformed_json", "{letters}");
    let pipeline = eventually("the queue drained", Duration::from_secs(30), || async {
        let v = get(&addr, "/api/v1/pipeline").await;
        (v["queue"]["events"]["in_flight"] == 0 && v["queue"]["events"]["stored"] == 2).then_some(v)
    })
    .await;
    assert_eq!(pipeline["queue"]["events"]["received"], 2);
    assert_eq!(pipeline["queue"]["events"]["rejected_at_ingest"], 1);
    // `hearth status` reads the same data folder.
    let status = env.status();
    assert_eq!(status["events"]["stored"], 2, "{status}");
    assert_eq!(status["dead_letters"], 1);

    // The dashboard is served, the readiness says embedded.
    let ready = get(&addr, "/readyz").await;
    assert_eq!(ready["backend"], "embedded");
    assert_eq!(ready["ready"], true);
    let page = Command::new("curl")
        .args(["-sf", &format!("http://{addr}/")])
        .output()
        .expect("curl");
    assert!(String::from_utf8_lossy(&page.stdout).contains("<html"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_lose_nothing_acknowledged_and_store_nothing_twice() {
    let mut env = Env::embedded("emb_kill");
    env.set("admin_token", ADMIN)
        .set("api_listen", "127.0.0.1:0")
        .set("batch_size", 200);
    let mut up = env.up().await;
    let port = env.embedded_port.expect("port");
    let house = "killed";
    let (sensors, per_round, rounds) = (20, 100u64, 3u64);
    let mut interrupted = Vec::new();
    for round in 0..rounds {
        // Every message of the round is PUBACKed (durable) before the kill.
        let payloads: Vec<(String, Vec<u8>)> = (1..=per_round)
            .flat_map(|i| {
                let seq = round * per_round + i;
                (0..sensors).map(move |s| {
                    (
                        format!("hearth/{house}/s{s}"),
                        format!(r#"{{"kind":"power","value":{seq},"seq":{seq}}}"#).into_bytes(),
                    )
                })
            })
            .collect();
        publish_all(port, &format!("pub-{round}"), payloads).await;
        // Kill -9 at once, likely while workers are writing; note what was still queued.
        up.kill9();
        interrupted.push(scalar(&env, "SELECT coalesce(sum(n), 0) FROM queue"));
        up.restart();
        wait_port(port);
    }
    let expected = (sensors as u64 * per_round * rounds) as i64;
    eventually("every event stored", Duration::from_secs(120), || async {
        (scalar(&env, "SELECT count(*) FROM events") == expected
            && scalar(&env, "SELECT count(*) FROM queue") == 0)
            .then_some(())
    })
    .await;
    eprintln!("events still queued at each kill -9: {interrupted:?}");
    assert_eq!(
        scalar(
            &env,
            "SELECT count(*) FROM (SELECT DISTINCT sensor_id, kind, seq FROM events)"
        ),
        expected,
        "each (sensor, kind, seq) once"
    );
    assert_eq!(
        scalar(
            &env,
            "SELECT count(*) FROM (
                SELECT seq, lag(seq) OVER (PARTITION BY sensor_id ORDER BY id) AS prev FROM events
             ) WHERE prev IS NOT NULL AND seq <= prev"
        ),
        0,
        "per-sensor order"
    );
    let stat = |name: &str| {
        db(&env)
            .query_row("SELECT value FROM stats WHERE name = ?1", [name], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap_or(0)
    };
    // A batch written but not acknowledged when killed comes back as duplicates: the counters
    // move with the acknowledgement, as on Redis, so they add up whatever the kills hit.
    assert!(stat("stored") <= expected, "stored counter");
    let received: i64 = db(&env)
        .query_row(
            "SELECT sum(value) FROM stats WHERE name LIKE 'in:%'",
            [],
            |r| r.get(0),
        )
        .expect("received");
    assert_eq!(
        received,
        stat("stored") + stat("duplicates"),
        "received = stored + duplicates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_broker_port_is_a_clear_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let mut env = Env::embedded("emb_port");
    env.embedded_port = Some(port);
    env.set("api_listen", "127.0.0.1:0");
    let out = env.command(&["up"]).output().expect("run hearth up");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("already in use") && stderr.contains("HEARTH_MQTT_LISTEN"),
        "{stderr}"
    );
}
