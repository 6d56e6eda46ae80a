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

const ADMIN: &str = "admin-embedded-token";

async fn get(addr: &str, path: &str) -> Value {
    let out = tokio::process::Command::new("curl")
        .args(["-sf", "-H", &format!("Authorization: Bearer {ADMIN}")])
        .arg(format!("http://{addr}{path}"))
        .output()
        .await
        .expect("curl");
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// POST with the admin token; the JSON answer.
fn post(addr: &str, path: &str) -> Value {
    let out = Command::new("curl")
        .args([
            "-sf",
            "-X",
            "POST",
            "-H",
            &format!("Authorization: Bearer {ADMIN}"),
        ])
        .arg(format!("http://{addr}{path}"))
        .output()
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

/// Rows whose `seq` does not grow with storage order within their sensor.
fn out_of_order(env: &Env) -> i64 {
    scalar(
        env,
        "SELECT count(*) FROM (
            SELECT seq, lag(seq) OVER (PARTITION BY house_id, sensor_id ORDER BY id) AS prev FROM events
         ) WHERE prev IS NOT NULL AND seq <= prev",
    )
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
    let history = get(&addr, "/api/v1/houses/maison/sensors/temperature/events").await;
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
    let acked = post(&addr, &format!("/api/v1/alerts/{}/ack", alert["id"]));
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
    assert_eq!(status["consumers_alive"]["critical"], 1, "{status}");
    assert!(
        status["lanes"][0]["owner"]
            .as_str()
            .is_some_and(|o| o.starts_with("hearth up"))
    );

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

/// Wait until `expected` events are stored and the queue is empty, then check each (sensor, kind,
/// seq) is stored once, in order.
async fn stored_once_in_order(env: &Env, expected: i64) {
    eventually("every event stored", Duration::from_secs(120), || async {
        (scalar(env, "SELECT count(*) FROM events") == expected
            && scalar(env, "SELECT count(*) FROM queue") == 0)
            .then_some(())
    })
    .await;
    assert_eq!(
        scalar(
            env,
            "SELECT count(*) FROM (SELECT DISTINCT house_id, sensor_id, kind, seq FROM events)"
        ),
        expected,
        "each (sensor, kind, seq) once"
    );
    assert_eq!(out_of_order(env), 0, "per-sensor order");
}

/// Round `round` of a kill test: `per_round` readings of each of `sensors` sensors, their `seq`
/// going on from the rounds before, interleaved.
fn round_of(house: &str, sensors: usize, per_round: u64, round: u64) -> Vec<(String, Vec<u8>)> {
    (1..=per_round)
        .flat_map(|i| {
            let seq = round * per_round + i;
            (0..sensors).map(move |s| {
                (
                    format!("hearth/{house}/s{s}"),
                    format!(r#"{{"kind":"power","value":{seq},"seq":{seq}}}"#).into_bytes(),
                )
            })
        })
        .collect()
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
        let payloads = round_of(house, sensors, per_round, round);
        publish_all(port, &format!("pub-{round}"), payloads).await;
        // Kill -9 at once, likely while workers are writing; note what was still queued.
        up.kill9();
        interrupted.push(scalar(&env, "SELECT coalesce(sum(n), 0) FROM queue"));
        up.restart();
        wait_port(port);
    }
    let expected = (sensors as u64 * per_round * rounds) as i64;
    stored_once_in_order(&env, expected).await;
    eprintln!("events still queued at each kill -9: {interrupted:?}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hearth_per_data_folder() {
    let mut env = Env::embedded("emb_lock");
    env.set("api_listen", "127.0.0.1:0");
    let _first = env.up().await;
    // A second one on the same folder, its broker on another port.
    let mut second = env.command(&["up"]);
    second.env("HEARTH_MQTT_LISTEN", format!("127.0.0.1:{}", free_port()));
    let out = second.output().expect("run hearth up");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("in use by another hearth"), "{stderr}");
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
            "SELECT count(*) FROM (SELECT DISTINCT house_id, sensor_id, kind, seq FROM events)"
        ),
        rows,
        "no duplicates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_get_what_devices_publish() {
    let mut env = Env::embedded("emb_sub");
    env.set("api_listen", "127.0.0.1:0");
    let _up = env.up().await;
    let port = env.embedded_port.expect("port").to_string();
    let broker = ["-h", "127.0.0.1", "-p", port.as_str()];
    let sub = std::process::Command::new("mosquitto_sub")
        .args(broker)
        .args(["-t", "hearth/#", "-C", "1", "-W", "20"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    // Publish until the subscriber, which may not be subscribed yet, has its message.
    let published = r#"{"kind":"power","value":1,"seq":1}"#;
    let out = tokio::task::spawn_blocking(move || sub.wait_with_output());
    for _ in 0..50 {
        Command::new("mosquitto_pub")
            .args(broker)
            .args(["-t", "hearth/h/plug", "-m", published])
            .status()
            .expect("mosquitto_pub");
        if out.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = out.await.expect("join").expect("mosquitto_sub");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), published);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos_2_message_sent_again_before_its_release_is_stored_once() {
    use rumqttc::mqttbytes::QoS;
    use rumqttc::mqttbytes::v4::{Packet, PubRel, Publish};
    let mut env = Env::embedded("emb_qos2");
    env.set("api_listen", "127.0.0.1:0");
    let _up = env.up().await;
    let port = env.embedded_port.expect("port");
    let ep =
        hearth::mqtt::Endpoint::parse(&format!("mqtt://127.0.0.1:{port}"), "qos2").expect("url");
    let (mut reader, mut writer, _) = hearth::mqtt::connect(&ep).await.expect("connect");
    // No seq: only the packet id tells the second copy from a new reading.
    let mut publish = Publish::new(
        "hearth/h/meter",
        QoS::ExactlyOnce,
        r#"{"kind":"power","value":5}"#,
    );
    publish.pkid = 7;
    writer.queue(&publish).expect("queue");
    publish.dup = true;
    writer.queue(&publish).expect("queue");
    writer.flush().await.expect("flush");
    let mut recs = 0;
    while recs < 2 {
        for p in reader.packets().await.expect("read") {
            recs += usize::from(matches!(p, Packet::PubRec(_)));
        }
    }
    writer.queue(&PubRel::new(7)).expect("queue");
    writer.flush().await.expect("flush");
    eventually("the reading stored", Duration::from_secs(30), || async {
        (scalar(&env, "SELECT count(*) FROM queue") == 0
            && scalar(&env, "SELECT count(*) FROM events") >= 1)
            .then_some(())
    })
    .await;
    assert_eq!(scalar(&env, "SELECT count(*) FROM events"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_high_watermark_the_broker_holds_clients_and_loses_nothing() {
    let mut env = Env::embedded("emb_backpressure");
    // The routine worker holds its first batch 4 s: meanwhile the queue fills to the watermark
    // and the broker holds the client.
    env.set("api_listen", "127.0.0.1:0")
        .set("queue_high_watermark", 200)
        .set("queue_low_watermark", 50)
        .set("batch_size", 50)
        .set("test_fault", "pause_before_store=4000@1")
        .set("log", "info,hearth::embedded::broker=debug");
    let up = env.up().await;
    let port = env.embedded_port.expect("port");
    let publisher = publish_in_background(&env, port, interleaved("bp", 50, 100));
    up.wait_log("holding the client", Duration::from_secs(30))
        .await;
    // One socket read (64 KiB, about 1,000 of these messages) may be appended past the mark
    // before the next read waits: never more.
    let mut max = 0;
    for _ in 0..10 {
        let depth = env.status()["lanes"]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter(|x| x["lane"] != "critical")
                    .map(|x| x["depth"].as_u64().unwrap_or(0))
                    .sum::<u64>()
            })
            .unwrap_or(0);
        max = max.max(depth);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(max >= 200, "the queue filled to the watermark, depth {max}");
    assert!(max <= 200 + 1_200, "held at the watermark, depth {max}");
    publisher
        .await
        .expect("every message acknowledged in the end");
    eventually("every event stored", Duration::from_secs(120), || async {
        (scalar(&env, "SELECT count(*) FROM events") == 5000).then_some(())
    })
    .await;
    assert_eq!(out_of_order(&env), 0);
}

/// The queue on its own (no process): rows of a lane that `shards` no longer names are still
/// handed out and counted, and a row that cannot be read back is dead-lettered, not dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_rows_are_never_stranded_or_silently_dropped() {
    use hearth::seam::{Reader, Written};
    let env = Env::embedded("emb_rows");
    let dir = env.scratch.0.join("data");
    {
        let e = hearth::embedded::Embedded::open(
            &dir,
            16,
            0,
            Default::default(),
            Default::default(),
            Default::default(),
            Default::default(),
        )
        .await
        .expect("open");
        let events: Vec<hearth::event::Event> = (0..40)
            .map(|i| hearth::event::Event {
                house_id: "h".into(),
                sensor_id: format!("s{i}"),
                kind: "power".into(),
                value: 1.0,
                unit: None,
                source_unit: None,
                seq: Some(1),
                ts_ms: 1_000,
                received_us: 1_000_000,
                ingest_id: None,
            })
            .collect();
        let refs: Vec<&hearth::event::Event> = events.iter().collect();
        e.seams.queue.append(&refs, &[]).await.expect("append");
    }
    {
        let raw = Connection::open(env.data_file()).expect("open");
        raw.execute(
            "INSERT INTO queue (lane, critical, n, body) VALUES ('routine-1', 0, 3, 'not json')",
            [],
        )
        .expect("insert");
        raw.execute(
            "INSERT INTO stats (name, value) VALUES ('in:routine-1', 3)
             ON CONFLICT (name) DO UPDATE SET value = value + 3",
            [],
        )
        .expect("count");
    }
    // Reopened with fewer shards: lanes routine-2..15 are not configured any more.
    let e = hearth::embedded::Embedded::open(
        &dir,
        2,
        0,
        Default::default(),
        Default::default(),
        Default::default(),
        Default::default(),
    )
    .await
    .expect("reopen");
    let q = &e.seams.queue;
    let before = q.status().await.expect("status");
    assert_eq!(before.events.in_flight, 43, "every queued event is counted");
    let mut r = hearth::embedded::reader::SqliteReader::new((*e.queue).clone());
    let lanes: Vec<hearth::Lane> = hearth::Lane::routine(2).collect();
    let got = r
        .read(&lanes, 1000, std::time::Duration::from_millis(100))
        .await
        .expect("read");
    let (got, unreadable): (Vec<_>, Vec<_>) = got.into_iter().partition(|d| d.unreadable.is_none());
    let events: usize = got.iter().map(|d| d.events.len()).sum();
    assert_eq!(events, 40, "every readable row is handed out");
    assert_eq!(unreadable.len(), 1, "and the unreadable one, saying so");
    let letter = unreadable[0].unreadable_letter().expect("a letter");
    r.give_up(&unreadable[0], &[letter]).await.expect("give up");
    r.ack(
        &got,
        &Written {
            stored: 40,
            ..Written::default()
        },
        &[],
    )
    .await
    .expect("ack");
    let letters = q
        .dead_letters(&hearth::dlq::Filter::default())
        .await
        .expect("letters");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason, "bad_entry");
    let after = q.status().await.expect("status");
    assert_eq!(after.events.in_flight, 0);
    assert_eq!(after.events.dead_lettered, 3);
    assert_eq!(after.events.received, 43);
}

/// The offline rule on the embedded store: a sensor that stops reporting is declared offline
/// after `multiple` × its usual interval (at least `min_silence`), and is back with its next
/// reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_sensor_goes_offline_and_comes_back() {
    let mut env = Env::embedded("emb_offline");
    let rules = env.scratch.0.join("rules.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nname = \"offline\"\ntype = \"offline\"\nmultiple = 3\nmin_silence = \"1s\"\nseverity = \"warning\"\n",
    )
    .expect("rules");
    env.set("api_listen", "127.0.0.1:0")
        .set("rules_file", rules.display().to_string())
        .set("sensor_touch_interval_ms", 50);
    let _up = env.up().await;
    let port = env.embedded_port.expect("port");
    let reading = |seq: u64| {
        let p = serde_json::json!({"kind": "co2", "value": 600, "seq": seq});
        vec![("hearth/h1/co2-1".to_string(), p.to_string().into_bytes())]
    };
    for seq in 1..=12 {
        publish_all(port, &format!("pub-{seq}"), reading(seq)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let state = |env: &Env| {
        db(env)
            .query_row(
                "SELECT state FROM alerts WHERE sensor_id = 'co2-1' AND rule = 'offline'
                 ORDER BY id DESC LIMIT 1",
                [],
                |r| r.get::<_, String>(0),
            )
            .ok()
    };
    assert_eq!(state(&env), None, "not offline while reporting");
    eventually("the offline alert", Duration::from_secs(30), || async {
        state(&env).filter(|s| s == "active")
    })
    .await;
    publish_all(port, "pub-back", reading(13)).await;
    eventually(
        "the offline alert to clear",
        Duration::from_secs(30),
        || async { state(&env).filter(|s| s == "cleared") },
    )
    .await;
}

/// Webhooks on the embedded store: a smoke alarm is POSTed, so is its acknowledgement; a
/// webhook that keeps failing is dead-lettered (`webhook_failed`), and replaying the letter
/// queues the notification again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_posted_and_failures_dead_lettered() {
    let hook = Hook::start().await;
    let mut env = Env::embedded("emb_hook");
    let nowhere = format!("http://127.0.0.1:{}/nowhere", free_port());
    let rules = env.scratch.0.join("rules.toml");
    std::fs::write(
        &rules,
        format!(
            "[[rule]]\nname = \"smoke\"\ntype = \"boolean\"\nkinds = [\"smoke\"]\nseverity = \"critical\"\nmessage = \"Smoke detected\"\n\n\
             [[webhook]]\nurl = \"{}\"\nseverities = [\"critical\"]\n\n\
             [[webhook]]\nurl = \"{nowhere}\"\nseverities = [\"critical\"]\n",
            hook.url
        ),
    )
    .expect("rules");
    env.set("api_listen", "127.0.0.1:0")
        .set("admin_token", ADMIN)
        .set("rules_file", rules.display().to_string());
    let up = env.up().await;
    let addr = up.http_addr().await;
    let port = env.embedded_port.expect("port");
    let smoke = br#"{"kind":"smoke","value":true,"seq":1}"#.to_vec();
    publish_all(port, "hook", vec![("hearth/h/hall".into(), smoke)]).await;
    let posted = eventually("the webhook POST", Duration::from_secs(30), || async {
        hook.bodies.lock().ok()?.first().cloned()
    })
    .await;
    assert_eq!(posted["alert"]["rule"], "smoke");
    assert_eq!(posted["alert"]["state"], "active");
    let id = posted["alert"]["id"].clone();
    let acked = post(&addr, &format!("/api/v1/alerts/{id}/ack"));
    assert_eq!(acked["state"], "acknowledged");
    eventually(
        "the POST of the acknowledgement",
        Duration::from_secs(30),
        || async {
            let bodies = hook.bodies.lock().ok()?;
            bodies
                .iter()
                .any(|b| b["alert"]["state"] == "acknowledged")
                .then_some(())
        },
    )
    .await;
    let letters = eventually(
        "the failed webhook's letters",
        Duration::from_secs(60),
        || async {
            let v = get(&addr, "/api/v1/dlq?reason=webhook_failed").await;
            (v.as_array().map(Vec::len) == Some(2)).then_some(v)
        },
    )
    .await;
    assert_eq!(letters[0]["source"], "notifier");
    assert_eq!(
        letters[0]["topic"], "webhook-2",
        "a webhook is named by its position when unnamed"
    );
    let delivered = hook.received().len();
    let replayed = post(&addr, "/api/v1/dlq/replay?reason=webhook_failed");
    assert_eq!(replayed["letters"], 2, "{replayed}");
    // Queued for the notifier again, failing again: two new letters.
    let first_ids: Vec<Value> = letters
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| l["id"].clone())
        .collect();
    eventually(
        "the replayed notifications",
        Duration::from_secs(60),
        || async {
            let v = get(&addr, "/api/v1/dlq?reason=webhook_failed").await;
            let fresh = v
                .as_array()?
                .iter()
                .filter(|l| !first_ids.contains(&l["id"]))
                .count();
            (fresh == 2).then_some(())
        },
    )
    .await;
    // Replayed to the webhook that failed only: the one that had them gets nothing twice.
    assert_eq!(
        hook.received().len(),
        delivered,
        "no duplicate to the working webhook"
    );
}

/// The latest values are the store's: after a restart (the in-memory cache starts empty) a
/// sensor's are read back in when first asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_values_survive_a_restart() {
    let mut env = Env::embedded("emb_latest");
    let api = format!("127.0.0.1:{}", free_port());
    env.set("api_listen", &api).set("admin_token", ADMIN);
    let mut up = env.up().await;
    let port = env.embedded_port.expect("port");
    let readings = (1..=3)
        .map(|seq| {
            let p = format!(r#"{{"kind":"power","value":{seq},"seq":{seq}}}"#);
            ("hearth/h/plug".to_string(), p.into_bytes())
        })
        .collect();
    publish_all(port, "latest", readings).await;
    eventually("stored", Duration::from_secs(30), || async {
        (scalar(&env, "SELECT count(*) FROM events") == 3).then_some(())
    })
    .await;
    up.restart();
    wait_port(port);
    let latest = eventually(
        "the latest value after the restart",
        Duration::from_secs(30),
        || async {
            let v = get(&api, "/api/v1/houses/h/sensors/plug/latest").await;
            v["latest"]["power"]["seq"].as_i64().map(|_| v)
        },
    )
    .await;
    assert_eq!(latest["latest"]["power"]["seq"], 3);
    assert_eq!(latest["latest"]["power"]["value"], 3.0);
}

/// A home that already runs a broker keeps it: with only `mqtt_url` set, `hearth up` takes its
/// events from that broker (a persistent session, PUBACK after the durable append) into the
/// embedded store. Killed with -9 while the broker still holds or is delivering its messages, it
/// loses none and stores none twice once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_home_s_own_broker_feeds_the_embedded_store_through_kills() {
    let mut env = Env::embedded("emb_home_broker");
    let broker = Broker::start(&env.scratch.0.join("broker"));
    let client_id = format!("home-{}", env.name);
    env.set("mqtt_url", broker.url())
        .set("mqtt_client_id", client_id)
        .set("batch_size", 200);
    let mut up = env.up().await;
    assert!(
        up.log_text().contains("events from the home's broker"),
        "{}",
        up.log_text()
    );
    let house = "home";
    let (sensors, per_round, rounds) = (20, 100u64, 3u64);
    for round in 0..rounds {
        let payloads = round_of(house, sensors, per_round, round);
        publish_all(broker.port, &format!("dev-{round}"), payloads).await;
        up.kill9();
        up.restart();
    }
    let expected = (sensors as u64 * per_round * rounds) as i64;
    stored_once_in_order(&env, expected).await;
    drop(up);
}
