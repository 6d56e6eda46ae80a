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

/// The README's promise, literally: in a network namespace where no Redis, PostgreSQL or broker
/// can be reached, `hearth up` with nothing configured takes the seed's `mosquitto_pub` (default
/// host and port) and serves the reading. Needs `unshare` (util-linux) and user namespaces.
#[test]
fn the_seed_command_works_where_no_server_exists() {
    let scratch = Scratch::new(&format!("emb_netns_{}", std::process::id()));
    let script = format!(
        r#"set -u
ip link set lo up
redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 && echo "REDIS REACHABLE"
pg_isready -q -h 127.0.0.1 2>/dev/null && echo "POSTGRES REACHABLE"
HEARTH_ADMIN_TOKEN={ADMIN} HEARTH_LOG=warn "{bin}" up > up.log 2>&1 &
for _ in $(seq 100); do curl -sf http://127.0.0.1:8080/healthz >/dev/null && break; sleep 0.1; done
mosquitto_pub -h localhost -t "maison/capteurs/temperature" -m '{{"temp": 22.5}}'
for _ in $(seq 100); do
  out=$(curl -sf -H "Authorization: Bearer {ADMIN}" http://127.0.0.1:8080/api/v1/houses/maison/sensors)
  case "$out" in *22.5*) echo "SHOWN $out"; break;; esac
  sleep 0.1
done
kill %1; wait
"#,
        bin = env!("CARGO_BIN_EXE_hearth"),
    );
    let out = Command::new("unshare")
        .args(["-rn", "bash", "-c", &script])
        .current_dir(&scratch.0)
        .output()
        .expect("unshare (util-linux)");
    let said = String::from_utf8_lossy(&out.stdout);
    eprintln!("{said}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        !said.contains("REACHABLE"),
        "a server was reachable: {said}"
    );
    assert!(said.contains("SHOWN"), "the reading was not served: {said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_flows_data_at_once() {
    let mut env = Env::embedded("emb_demo");
    env.set("admin_token", ADMIN)
        .set("api_listen", "127.0.0.1:0");
    let up = env.hearth("up", &["up", "--demo"]);
    let addr = up.http_addr().await;
    let houses = eventually("simulated houses", Duration::from_secs(30), || async {
        let v = get(&addr, "/api/v1/houses").await;
        (v.as_array().map(Vec::len).unwrap_or(0) >= 5).then_some(v)
    })
    .await;
    let house = houses[0]["house_id"].as_str().expect("house").to_string();
    eventually("latest values", Duration::from_secs(30), || async {
        let v = get(&addr, &format!("/api/v1/houses/{house}/sensors")).await;
        v.as_array()
            .is_some_and(|s| {
                s.iter()
                    .any(|s| s["latest"].as_object().is_some_and(|l| !l.is_empty()))
            })
            .then_some(())
    })
    .await;
}

/// Publish at QoS 1 and kill hearth -9 once `kill_after` PUBACKs came back, mid-stream. Returns
/// the indices of the payloads that were acknowledged (before the connection died).
async fn publish_until_killed(
    port: u16,
    payloads: Vec<(String, Vec<u8>)>,
    kill_after: usize,
    up: &mut Hearth,
) -> Vec<usize> {
    use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Outgoing, Packet, QoS};
    let mut opts = MqttOptions::new("killer", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_inflight(200);
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let total = payloads.len();
    let sender = tokio::spawn(async move {
        for (topic, payload) in payloads {
            if client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut index_of = std::collections::HashMap::new();
    let mut sent = 0;
    let mut acked = Vec::new();
    loop {
        let polled = tokio::time::timeout(Duration::from_secs(30), eventloop.poll())
            .await
            .expect("publisher stalled");
        match polled {
            Ok(MqttEvent::Outgoing(Outgoing::Publish(pkid))) => {
                index_of.insert(pkid, sent);
                sent += 1;
            }
            Ok(MqttEvent::Incoming(Packet::PubAck(ack))) => {
                acked.push(index_of[&ack.pkid]);
                if acked.len() == kill_after {
                    up.kill9();
                }
                assert!(acked.len() < total, "the kill came too late");
            }
            Ok(_) => {}
            Err(_) => break, // the broker died with the process
        }
    }
    sender.abort();
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_publish_keeps_every_acknowledged_message() {
    let mut env = Env::embedded("emb_midkill");
    env.set("api_listen", "127.0.0.1:0").set("batch_size", 200);
    let mut up = env.up().await;
    let port = env.embedded_port.expect("port");
    let (sensors, per_sensor) = (10usize, 400i64);
    let payloads: Vec<(String, Vec<u8>)> = (1..=per_sensor)
        .flat_map(|seq| {
            (0..sensors).map(move |s| {
                (
                    format!("hearth/mid/s{s}"),
                    format!(r#"{{"kind":"power","value":{seq},"seq":{seq}}}"#).into_bytes(),
                )
            })
        })
        .collect();
    let keys: Vec<(String, i64)> = (1..=per_sensor)
        .flat_map(|seq| (0..sensors).map(move |s| (format!("s{s}"), seq)))
        .collect();
    let acked = publish_until_killed(port, payloads, 1500, &mut up).await;
    up.restart();
    wait_port(port);
    eventually("the queue drained", Duration::from_secs(60), || async {
        (scalar(&env, "SELECT count(*) FROM queue") == 0).then_some(())
    })
    .await;
    let conn = db(&env);
    let mut stored = conn
        .prepare("SELECT count(*) FROM events WHERE sensor_id = ?1 AND seq = ?2")
        .expect("prepare");
    let mut lost = Vec::new();
    for i in &acked {
        let (sensor, seq) = &keys[*i];
        let n: i64 = stored
            .query_row(rusqlite::params![sensor, seq], |r| r.get(0))
            .expect("count");
        if n != 1 {
            lost.push((sensor.clone(), *seq, n));
        }
    }
    let rows = scalar(&env, "SELECT count(*) FROM events");
    eprintln!(
        "acknowledged before kill -9: {}, rows after restart: {rows}",
        acked.len()
    );
    assert!(
        lost.is_empty(),
        "acknowledged but not stored once: {lost:?}"
    );
    assert_eq!(
        scalar(
            &env,
            "SELECT count(*) FROM (SELECT DISTINCT sensor_id, kind, seq FROM events)"
        ),
        rows,
        "no duplicates"
    );
}
