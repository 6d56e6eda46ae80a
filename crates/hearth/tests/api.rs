//! Alerts and the API end to end: a smoke alarm from MQTT to the right WebSocket client and a
//! webhook, acknowledged through the REST API; tokens and parameters checked on every route; a
//! slow WebSocket client dropped; the offline rule; HTTP ingestion.

mod support;

use std::time::Duration;

use support::*;

const READY: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(30);
const ADMIN: &str = "admin-secret-token";

fn rules_with_webhook(env: &Env, url: &str) -> String {
    let path = env.scratch.0.join("rules.toml");
    std::fs::write(
        &path,
        format!(
            r#"{SMOKE_RULE}
[[webhook]]
url = "{url}"
severities = ["critical"]
"#
        ),
    )
    .expect("rules");
    path.display().to_string()
}

/// A smoke event over MQTT: an alert row, a push to that house's WebSocket client (not to
/// another house's), a webhook POST; acknowledging it through the API changes its state and
/// pushes the change. Ingest, worker and API run as separate processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_alarm_reaches_its_house_socket_and_webhook_and_ack_is_pushed() {
    let hook = Hook::start().await;
    let mut env = Env::new("smoke");
    let broker = Broker::start(&env.scratch.0);
    let rules = rules_with_webhook(&env, &hook.url);
    env.set("mqtt_url", broker.url())
        .set("admin_token", ADMIN)
        .set("rules_file", rules);
    let worker = env.hearth("worker", &["worker", "--workers", "1"]);
    worker.wait_log("took lane", READY).await;
    let api = env.hearth("api", &["api"]);
    let addr = api.http_addr().await;
    let ingest = env.hearth("ingest", &["ingest"]);
    ingest.wait_log("subscribed", READY).await;

    let (t1, t2) = (token_for(&env, "h1"), token_for(&env, "h2"));
    let mut c1 = ws_connect(&addr, "house=h1", Some(&t1))
        .await
        .expect("h1 socket");
    let mut c2 = ws_connect(&addr, "house=h2", Some(&t2))
        .await
        .expect("h2 socket");
    for c in [&mut c1, &mut c2] {
        let hello = ws_next(c, WAIT).await.expect("hello");
        assert_eq!(hello["type"], "hello");
    }

    publish_all(
        broker.port,
        &format!("pub-{}", env.name),
        vec![(
            "hearth/h1/kitchen-smoke".into(),
            br#"{"kind":"smoke","value":true,"seq":1}"#.to_vec(),
        )],
    )
    .await;

    let alert = loop {
        let m = ws_next(&mut c1, WAIT)
            .await
            .expect("a push to the h1 client");
        if m["type"] == "alert" {
            break m["alert"].clone();
        }
    };
    assert_eq!(alert["rule"], "smoke");
    assert_eq!(alert["state"], "active");
    assert_eq!(alert["severity"], "critical");
    assert_eq!(alert["raised_by"], "h1/kitchen-smoke/smoke/1");
    let id = alert["id"].as_i64().expect("id");

    let pg = env.pg().await;
    let row = pg
        .query_one("SELECT state, house_id FROM alerts WHERE id = $1", &[&id])
        .await
        .expect("alert row");
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1)),
        ("active".into(), "h1".into())
    );

    let posted = eventually("the webhook POST", WAIT, || async {
        hook.received()
            .into_iter()
            .find(|b| b["alert"]["state"] == "active")
    })
    .await;
    assert_eq!(posted["alert"]["id"], id);

    // Another house's token can neither see nor acknowledge it.
    let (status, _) = http(
        &addr,
        "POST",
        &format!("/api/v1/alerts/{id}/ack"),
        Some(&t2),
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, body) = http(
        &addr,
        "POST",
        &format!("/api/v1/alerts/{id}/ack"),
        Some(&t1),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let acked: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(acked["state"], "acknowledged");
    assert_eq!(acked["acknowledged_by"], "house:h1");

    let change = loop {
        let m = ws_next(&mut c1, WAIT)
            .await
            .expect("the acknowledgement push");
        if m["type"] == "alert" && m["alert"]["state"] == "acknowledged" {
            break m;
        }
    };
    assert_eq!(change["alert"]["id"], id);
    eventually("the webhook POST of the acknowledgement", WAIT, || async {
        hook.received()
            .into_iter()
            .find(|b| b["alert"]["state"] == "acknowledged")
    })
    .await;

    // Nothing of h1 went to h2's client.
    while let Some(m) = ws_next(&mut c2, Duration::from_millis(500)).await {
        assert_ne!(m["house_id"], "h1", "h2's client got {m}");
    }
}

/// 401 without a token or with a bad one, 403/404 across houses, 400 on bad parameters, on
/// REST and on the WebSocket. And HTTP ingestion: 202, then stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_houses_and_parameters_are_checked_on_every_route() {
    let mut env = Env::new("auth");
    let broker = Broker::start(&env.scratch.0);
    env.set("mqtt_url", broker.url()).set("admin_token", ADMIN);
    let up = env.up().await;
    let addr = up.http_addr().await;
    let t1 = token_for(&env, "h1");

    let body = r#"[{"house_id":"h1","sensor_id":"s1","kind":"temperature","value":21.5,"seq":1},
                   {"house_id":"h2","sensor_id":"s2","kind":"temperature","value":19,"seq":1},
                   {"house_id":"h1","sensor_id":"s1","kind":"temperature","value":99999,"seq":2}]"#;
    let (status, accepted) = http(&addr, "POST", "/api/v1/events", Some(ADMIN), Some(body)).await;
    assert_eq!(status, 202, "{accepted}");
    let accepted: serde_json::Value = serde_json::from_str(&accepted).expect("json");
    assert_eq!(accepted["accepted"], 2);
    assert_eq!(accepted["rejected"], 1);
    assert_eq!(accepted["reasons"]["out_of_range"], 1);
    assert_eq!(accepted["first_rejected"][0]["reason"], "out_of_range");
    assert_eq!(accepted["first_rejected"][0]["index"], 2);
    wait_drained(&env, 2, WAIT).await;
    let pg = env.pg().await;
    assert_eq!(
        count_events(&pg).await,
        2,
        "HTTP ingestion stored both valid readings"
    );

    let routes = [
        ("GET", "/api/v1/houses/h1/sensors"),
        ("GET", "/api/v1/houses/h1/sensors/s1/latest"),
        ("GET", "/api/v1/houses/h1/sensors/s1/events"),
        (
            "GET",
            "/api/v1/houses/h1/sensors/s1/series?kind=temperature",
        ),
        ("GET", "/api/v1/alerts"),
        ("POST", "/api/v1/alerts/1/ack"),
        ("GET", "/api/v1/pipeline"),
        ("POST", "/api/v1/events"),
        ("GET", "/api/v1/houses"),
        ("GET", "/api/v1/dlq"),
    ];
    for (method, path) in routes {
        for token in [None, Some("not-a-token")] {
            let (status, body) = http(&addr, method, path, token, Some("{}")).await;
            assert_eq!(status, 401, "{method} {path} with {token:?}: {body}");
            let err: serde_json::Value = serde_json::from_str(&body).expect("a JSON error");
            assert_eq!(err["error"], "unauthorized");
        }
    }

    // A house token and another house.
    let forbidden = [
        ("GET", "/api/v1/houses/h2/sensors", 403),
        ("GET", "/api/v1/houses/h2/sensors/s2/latest", 403),
        ("GET", "/api/v1/houses/h2/sensors/s2/events", 403),
        ("GET", "/api/v1/houses/h1/sensors/s2/latest", 404),
        ("GET", "/api/v1/houses/h1/sensors/s2/events", 404),
        (
            "GET",
            "/api/v1/houses/h2/sensors/s2/series?kind=temperature",
            403,
        ),
        (
            "GET",
            "/api/v1/houses/h1/sensors/s2/series?kind=temperature",
            404,
        ),
        ("GET", "/api/v1/alerts?house=h2", 403),
        ("GET", "/api/v1/pipeline", 403),
    ];
    for (method, path, expected) in forbidden {
        let (status, body) = http(&addr, method, path, Some(&t1), None).await;
        assert_eq!(status, expected, "{method} {path}: {body}");
    }
    let other = r#"{"house_id":"h2","sensor_id":"s2","kind":"power","value":1}"#;
    let (status, _) = http(&addr, "POST", "/api/v1/events", Some(&t1), Some(other)).await;
    assert_eq!(status, 403);
    // The houses a token sees.
    let houses = |token: String| {
        let addr = addr.clone();
        async move {
            let (status, body) = http(&addr, "GET", "/api/v1/houses", Some(&token), None).await;
            assert_eq!(status, 200, "{body}");
            let list: serde_json::Value = serde_json::from_str(&body).expect("json");
            list.as_array()
                .expect("array")
                .iter()
                .map(|h| h["house_id"].as_str().unwrap_or_default().to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(houses(ADMIN.to_string()).await, ["h1", "h2"]);
    assert_eq!(houses(t1.clone()).await, ["h1"]);
    // The dashboard itself needs no token (it asks for one), and needs nothing from outside.
    let page = http_get(&addr, "/").await;
    assert!(page.contains("hearth dashboard") && page.contains("/api/v1/ws"));
    for external in ["src=\"http", "href=\"http", "@import", "url(http"] {
        assert!(!page.contains(external), "no CDN: {external}");
    }
    // Its own house works.
    let (status, body) = http(&addr, "GET", "/api/v1/houses/h1/sensors", Some(&t1), None).await;
    assert_eq!(status, 200, "{body}");
    let sensors: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(sensors[0]["sensor_id"], "s1");
    assert_eq!(sensors[0]["latest"]["temperature"]["value"], 21.5);

    let bad = [
        "/api/v1/houses/h1/sensors/s1/events?limit=0",
        "/api/v1/houses/h1/sensors/s1/events?limit=ten",
        "/api/v1/houses/h1/sensors/s1/events?from=yesterday",
        "/api/v1/houses/h1/sensors/s1/events?cursor=zzz",
        "/api/v1/houses/h1/sensors/s1/events?kind=bad%20kind",
        "/api/v1/houses/h1/sensors/s1/events?bogus=1",
        "/api/v1/houses/h1/sensors/s1/events?limit=%ZZ",
        "/api/v1/houses/h1/sensors/bad%24id/events",
        "/api/v1/houses/h1/sensors/s1/series",
        "/api/v1/houses/h1/sensors/s1/series?kind=temperature&step=week",
        "/api/v1/houses/h1/sensors/s1/series?kind=temperature&step=minute&from=0",
        "/api/v1/houses/h1/sensors/s1/series?kind=temperature&bogus=1",
        "/api/v1/alerts?state=done",
        "/api/v1/houses/bad%24id/sensors",
    ];
    for path in bad {
        let (status, body) = http(&addr, "GET", path, Some(ADMIN), None).await;
        assert_eq!(status, 400, "{path}: {body}");
        let err: serde_json::Value = serde_json::from_str(&body).expect("a JSON error");
        assert_eq!(err["error"], "bad_request", "{path}");
    }
    // An empty range is an empty answer (as the history route gives it), not an error.
    let empty = "/api/v1/houses/h1/sensors/s1/series?kind=temperature&from=2000&to=1000";
    let (status, body) = http(&addr, "GET", empty, Some(ADMIN), None).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""points":[]"#), "{body}");
    let (status, _) = http(&addr, "POST", "/api/v1/alerts/abc/ack", Some(ADMIN), None).await;
    assert_eq!(status, 400);
    let (status, _) = http(
        &addr,
        "POST",
        "/api/v1/events",
        Some(ADMIN),
        Some("{not json"),
    )
    .await;
    assert_eq!(status, 400);

    // The WebSocket checks the same.
    assert_eq!(ws_connect(&addr, "house=h1", None).await.err(), Some(401));
    assert_eq!(
        ws_connect(&addr, "house=h1", Some("nope")).await.err(),
        Some(401)
    );
    assert_eq!(
        ws_connect(&addr, "house=h2", Some(&t1)).await.err(),
        Some(403)
    );
    assert_eq!(
        ws_connect(&addr, "house=h1&events=maybe", Some(&t1))
            .await
            .err(),
        Some(400)
    );
    assert!(
        ws_connect(&addr, &format!("token={t1}"), None)
            .await
            .is_ok(),
        "token in the query"
    );
    // ... on the WebSocket only: elsewhere it would end up in logs and browser histories.
    let (status, _) = http(
        &addr,
        "GET",
        &format!("/api/v1/houses/h1/sensors?token={t1}"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 401);

    // History paging, newest first.
    for seq in 3..=7 {
        let e = format!(
            r#"{{"house_id":"h1","sensor_id":"s1","kind":"temperature","value":{seq},"seq":{seq}}}"#
        );
        assert_eq!(
            http(&addr, "POST", "/api/v1/events", Some(&t1), Some(&e))
                .await
                .0,
            202
        );
    }
    wait_drained(&env, 7, WAIT).await;
    let (_, page) = http(
        &addr,
        "GET",
        "/api/v1/houses/h1/sensors/s1/events?limit=4",
        Some(&t1),
        None,
    )
    .await;
    let page: serde_json::Value = serde_json::from_str(&page).expect("json");
    let seqs: Vec<i64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs.len(), 4);
    let cursor = page["next_cursor"].as_str().expect("a next page");
    let (_, rest) = http(
        &addr,
        "GET",
        &format!("/api/v1/houses/h1/sensors/s1/events?limit=4&cursor={cursor}"),
        Some(&t1),
        None,
    )
    .await;
    let rest: serde_json::Value = serde_json::from_str(&rest).expect("json");
    assert_eq!(rest["events"].as_array().unwrap().len(), 2);
    assert!(rest["next_cursor"].is_null());

    // The series: the six stored readings of s1 (21.5, then 3..=7), by minute, hour and day
    // over the default span (the 1,000 steps before now); a span past 10,000 steps is refused.
    for step in ["minute", "hour", "day"] {
        let path = format!("/api/v1/houses/h1/sensors/s1/series?kind=temperature&step={step}");
        let (status, body) = http(&addr, "GET", &path, Some(&t1), None).await;
        assert_eq!(status, 200, "{step}: {body}");
        let series: serde_json::Value = serde_json::from_str(&body).expect("json");
        let points = series["points"].as_array().expect("points");
        let count: i64 = points.iter().map(|p| p["count"].as_i64().unwrap()).sum();
        let high = points
            .iter()
            .map(|p| p["max"].as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert_eq!((count, high), (6, 21.5), "{step}: {body}");
        let wide = format!("{path}&from=0&to=95617584000000");
        assert_eq!(http(&addr, "GET", &wide, Some(&t1), None).await.0, 400);
    }
    // What the insert appended is folded into the rollups by the worker within seconds: s1's
    // six readings counted in each step's rows, no delta left.
    eventually("the rollups folded", WAIT, || async {
        let row = pg
            .query_one(
                "SELECT (SELECT count(*) FROM rollup_deltas),
                        ARRAY(SELECT sum(n)::int8 FROM rollups
                              WHERE house_id = 'h1' AND sensor_id = 's1'
                              GROUP BY step ORDER BY step)",
                &[],
            )
            .await
            .expect("rollups");
        let (left, counted): (i64, Vec<i64>) = (row.get(0), row.get(1));
        (left == 0 && counted == [6, 6, 6]).then_some(())
    })
    .await;

    let (status, doc) = http(&addr, "GET", "/openapi.json", None, None).await;
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&doc).expect("openapi json");
    for path in [
        "/api/v1/events",
        "/api/v1/alerts/{id}/ack",
        "/api/v1/houses/{house}/sensors/{sensor}/series",
        "/api/v1/ws",
        "/readyz",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    assert_eq!(http(&addr, "GET", "/readyz", None, None).await.0, 200);
    assert_eq!(http(&addr, "GET", "/healthz", None, None).await.0, 200);

    // Concurrent reads spread over the API's pool of PostgreSQL connections.
    let reads: Vec<_> = (0..32)
        .map(|_| {
            let addr = addr.clone();
            tokio::spawn(async move {
                http(
                    &addr,
                    "GET",
                    "/api/v1/houses/h1/sensors/s1/events",
                    Some(ADMIN),
                    None,
                )
                .await
            })
        })
        .collect();
    for read in reads {
        assert_eq!(read.await.expect("read").0, 200);
    }
    let pool: i64 = pg
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'hearth-api'",
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .get(0);
    assert_eq!(
        pool as usize,
        hearth::servers::postgres::POOL,
        "the API's connections"
    );
}

/// A client that never reads is disconnected once its buffer is full, while another client of
/// the same house receives everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_client_that_never_reads_is_dropped_and_others_keep_receiving() {
    use futures_util::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut env = Env::new("slowws");
    let broker = Broker::start(&env.scratch.0);
    env.set("mqtt_url", broker.url())
        .set("admin_token", ADMIN)
        .set("ws_client_buffer", 8);
    let up = env.up().await;
    let addr = up.http_addr().await;

    // The sleeper: a raw socket with a tiny receive buffer, upgraded, then never read.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(2048).expect("rcvbuf");
    let mut sleeper = socket
        .connect(addr.parse().expect("addr"))
        .await
        .expect("connect");
    let upgrade = format!(
        "GET /api/v1/ws?house=h1&alerts=false HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer {ADMIN}\r\n\r\n"
    );
    sleeper
        .write_all(upgrade.as_bytes())
        .await
        .expect("upgrade");
    let mut head = [0u8; 12];
    sleeper.read_exact(&mut head).await.expect("101");
    assert_eq!(&head, b"HTTP/1.1 101");

    let mut reader = ws_connect(&addr, "house=h1&alerts=false", Some(ADMIN))
        .await
        .expect("reader");
    // Probe until a reading of the meter (another kind, its lane) comes through, then flood.
    // (A consumer reads the watched houses again before a batch's pushes whenever a watch was
    // advertised since, so a consumer the meter's lane moves to meanwhile pushes it too.)
    let hello = ws_next(&mut reader, WAIT).await.expect("hello");
    assert_eq!(hello["type"], "hello");
    let mut probe = 0u64;
    'probing: loop {
        probe += 1;
        assert!(probe <= 30, "no probe reading reached the reading client");
        let p = serde_json::json!({"kind": "temperature", "value": 1, "seq": probe});
        publish_all(
            broker.port,
            &format!("probe-{}-{probe}", env.name),
            vec![("hearth/h1/meter".to_string(), p.to_string().into_bytes())],
        )
        .await;
        while let Some(m) = ws_next(&mut reader, Duration::from_secs(1)).await {
            if m["type"] == "events" {
                break 'probing;
            }
        }
    }
    let counter = tokio::spawn(async move {
        let mut events = 0;
        let deadline = tokio::time::Instant::now() + 4 * WAIT;
        while events < 20_000 {
            match tokio::time::timeout_at(deadline, reader.next()).await {
                Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) => {
                    let m: serde_json::Value = serde_json::from_str(&t).unwrap_or_default();
                    if let Some(batch) = m["events"].as_array() {
                        events += batch
                            .iter()
                            .filter(|e| e["sensor_id"] == "meter" && e["kind"] == "power")
                            .count();
                    }
                }
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
        events
    });
    // About 2 MB of pushes, in tens of messages: more than the sockets hold.
    for round in 0..20u64 {
        let batch = (1..=1000u64)
            .map(|i| {
                let seq = round * 1000 + i;
                let p = serde_json::json!({"kind": "power", "value": seq, "seq": seq});
                ("hearth/h1/meter".to_string(), p.to_string().into_bytes())
            })
            .collect();
        publish_all(broker.port, &format!("pub-{}-{round}", env.name), batch).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(
        counter.await.expect("counter"),
        20_000,
        "the reading client got every event"
    );

    // The sleeper's connection was closed by the server: reading it now ends. What the server
    // had queued for it drains through its 2 KiB window first, a round trip per window: on a
    // loaded machine that alone took more than 30 s once (a full test run), so it gets 2 min.
    let mut sink = vec![0u8; 64 * 1024];
    let closed = tokio::time::timeout(4 * WAIT, async {
        loop {
            match sleeper.read(&mut sink).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(closed, "the client that never read was disconnected");
    up.wait_log("too slow", WAIT).await;
}

/// A sensor that stops reporting is declared offline after `multiple` × its usual interval (and
/// at least `min_silence`); it is back online with its next reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_sensor_goes_offline_and_comes_back() {
    let mut env = Env::new("offline");
    let broker = Broker::start(&env.scratch.0);
    let rules = env.scratch.0.join("rules.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nname = \"offline\"\ntype = \"offline\"\nmultiple = 3\nmin_silence = \"1s\"\nseverity = \"warning\"\n",
    )
    .expect("rules");
    env.set("mqtt_url", broker.url())
        .set("admin_token", ADMIN)
        .set("rules_file", rules.display().to_string())
        .set("sensor_touch_interval_ms", 50);
    let _up = env.up().await;
    let reading = |seq: u64| {
        let p = serde_json::json!({"kind": "co2", "value": 600, "seq": seq});
        vec![("hearth/h1/co2-1".to_string(), p.to_string().into_bytes())]
    };
    for seq in 1..=12 {
        publish_all(
            broker.port,
            &format!("pub-{}-{seq}", env.name),
            reading(seq),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pg = env.pg().await;
    assert_eq!(
        offline_state(&pg).await,
        None,
        "not offline while reporting"
    );
    let raised = eventually("the offline alert", WAIT, || async {
        offline_state(&pg).await.filter(|s| s == "active")
    })
    .await;
    assert_eq!(raised, "active");
    publish_all(broker.port, &format!("pub-{}-back", env.name), reading(13)).await;
    eventually("the offline alert to clear", WAIT, || async {
        offline_state(&pg).await.filter(|s| s == "cleared")
    })
    .await;
}

async fn offline_state(pg: &tokio_postgres::Client) -> Option<String> {
    pg.query_opt(
        "SELECT state FROM alerts WHERE sensor_id = 'co2-1' AND rule = 'offline' ORDER BY id DESC LIMIT 1",
        &[],
    )
    .await
    .ok()
    .flatten()
    .map(|r| r.get::<_, String>(0))
}

/// A webhook that keeps failing is retried, then its notification goes to the dead letters with
/// its reason, and its circuit opens: the next notification is dead-lettered without waiting
/// out the retries. The alerts themselves are stored and pushed regardless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_webhook_is_dead_lettered() {
    let mut env = Env::new("hookfail");
    let broker = Broker::start(&env.scratch.0);
    // Nothing listens on this port.
    let url = format!("http://127.0.0.1:{}/nowhere", free_port());
    let rules = rules_with_webhook(&env, &url);
    env.set("mqtt_url", broker.url())
        .set("admin_token", ADMIN)
        .set("rules_file", rules);
    let _up = env.up().await;
    // A smoke alarm on `sensor`, and the dead letter of its webhook notification.
    let smoke_letter = |sensor: &'static str| {
        let (env, port) = (&env, broker.port);
        async move {
            let smoke = br#"{"kind":"smoke","value":true,"seq":1}"#.to_vec();
            let topic = format!("hearth/h1/{sensor}");
            publish_all(
                port,
                &format!("pub-{sensor}-{}", env.name),
                vec![(topic, smoke)],
            )
            .await;
            eventually("the failed webhook's dead letter", WAIT, || async {
                env.dead_letters()
                    .await
                    .into_iter()
                    .find(|d| d["reason"] == "webhook_failed" && d["payload"].contains(sensor))
            })
            .await
        }
    };
    let letter = smoke_letter("hall-smoke").await;
    assert_eq!(letter["topic"], "webhook-1", "named, never by its URL");
    assert!(!letter["detail"].contains(&url), "{letter:?}");
    assert!(letter["detail"].contains("circuit now open"), "{letter:?}");
    let second = smoke_letter("attic-smoke").await;
    assert!(second["detail"].contains("circuit open"), "{second:?}");
    assert!(
        letter["payload"].contains("hall-smoke"),
        "the notification is kept to replay"
    );
    let pg = env.pg().await;
    assert_eq!(
        pg.query_one(
            "SELECT count(*) FROM alerts WHERE sensor_id = 'hall-smoke'",
            &[]
        )
        .await
        .expect("alerts")
        .get::<_, i64>(0),
        1
    );
}
