//! The WebSocket's resume and subscriptions, on both backends: a client dropped during a burst of
//! alerts reconnects with `since=` the last `seq` it saw and gets every alert it missed, once,
//! in order; a `since` that was never given out is answered `resync`; `subscribe` and
//! `unsubscribe` on an open socket change what it is sent, within what its token may see; a new
//! subscription gets the first reading stored after it was answered.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use support::*;

const ADMIN: &str = "push-test-admin-token-012345678";
const ALERTS: usize = 60;

/// `hearth up` with the smoke rule on `backend`, and `settings`.
async fn start(backend: Backend, name: &str, settings: &[(&str, &str)]) -> (Scratch, Target) {
    let scratch = Scratch::new(&format!("{name}-rules-{}", std::process::id()));
    let rules = scratch.0.join("rules.toml");
    std::fs::write(&rules, SMOKE_RULE).expect("rules");
    let rules = rules.display().to_string();
    let mut all = vec![("rules_file", rules.as_str())];
    all.extend_from_slice(settings);
    let target = Target::start(backend, name, ADMIN, &all).await;
    (scratch, target)
}

fn smoke(house: &str, sensor: &str) -> (String, Vec<u8>) {
    (
        format!("hearth/{house}/{sensor}"),
        br#"{"kind":"smoke","value":true,"seq":1}"#.to_vec(),
    )
}

/// The alert messages among the next ones, until `count` of them or `wait` without any.
async fn alerts(ws: &mut Ws, count: usize, wait: Duration) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < count {
        match ws_next(ws, wait).await {
            Some(m) if m["type"] == "alert" => out.push(m),
            Some(m) if m["type"] == "resync" => panic!("unexpected resync: {m}"),
            Some(_) => {}
            None => break,
        }
    }
    out
}

async fn resume(backend: Backend, name: &str) {
    // The reconnecting client is registered for live pushes a second before its missed alerts
    // are read: the pushes of that second reach it both ways, and must be sent once.
    let (_rules, t) = start(backend, name, &[("test_fault", "pause_before_replay=1000")]).await;
    let (env, addr, port) = (&t.env, t.addr.clone(), t.mqtt_port);
    let mut ws = ws_hello(&addr, "house=h1&events=false", Some(ADMIN)).await;

    // A burst of alarms over about three seconds; the client drops after the first ten
    // alerts it gets, stays away a moment, and comes back while the burst goes on: what it
    // missed is replayed while new ones arrive live.
    let burst: Vec<_> = (0..ALERTS)
        .map(|i| smoke("h1", &format!("smoke-{i}")))
        .collect();
    let publisher = publish_paced(env, port, burst, 20);
    let first = alerts(&mut ws, 10, Duration::from_secs(60)).await;
    assert_eq!(first.len(), 10, "the first alerts arrive");
    drop(ws);
    let last = first.last().expect("one")["seq"].as_u64().expect("a seq");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut ws = ws_connect(
        &addr,
        &format!("house=h1&events=false&since={last}"),
        Some(ADMIN),
    )
    .await
    .expect("websocket again");
    let mut rest = alerts(&mut ws, ALERTS - first.len(), Duration::from_secs(30)).await;
    publisher.await.expect("publisher");
    // Nothing more: a repeat would show here.
    rest.extend(alerts(&mut ws, 1, Duration::from_secs(2)).await);
    let (_, body) = http(&addr, "GET", "/api/v1/alerts?limit=1000", Some(ADMIN), None).await;
    let stored: Value = serde_json::from_str(&body).expect("alerts");
    assert_eq!(stored.as_array().map(Vec::len), Some(ALERTS));
    let all: Vec<&Value> = first.iter().chain(&rest).collect();
    let seqs: Vec<u64> = all
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "in order, none twice: {seqs:?}"
    );
    let ids: BTreeSet<i64> = all
        .iter()
        .map(|m| m["alert"]["id"].as_i64().expect("id"))
        .collect();
    assert_eq!(
        (all.len(), ids.len()),
        (ALERTS, ALERTS),
        "every alert once, across the drop"
    );

    // A transition after the resume arrives live, once.
    let id = all[0]["alert"]["id"].as_i64().expect("id");
    let (status, _) = http(
        &addr,
        "POST",
        &format!("/api/v1/alerts/{id}/ack"),
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let live = alerts(&mut ws, 2, Duration::from_secs(3)).await;
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0]["alert"]["state"], "acknowledged");
    assert!(live[0]["seq"].as_u64() > seqs.last().copied());

    // A `since` never given out: the client is told to re-read.
    let never = seqs.last().expect("seq") + 1_000_000;
    let mut ws = ws_connect(&addr, &format!("since={never}"), Some(ADMIN))
        .await
        .expect("websocket");
    let mut told = false;
    while let Some(m) = ws_next(&mut ws, Duration::from_secs(3)).await {
        told |= m["type"] == "resync";
    }
    assert!(told, "resync expected");
}

async fn send(ws: &mut Ws, text: &str) {
    use futures_util::SinkExt;
    let message = tokio_tungstenite::tungstenite::Message::Text(text.to_string().into());
    ws.send(message).await.expect("send");
}

async fn subscriptions(backend: Backend, name: &str) {
    let (_rules, t) = start(backend, name, &[]).await;
    let (env, addr, port) = (&t.env, t.addr.clone(), t.mqtt_port);
    let mut ws = ws_hello(&addr, "house=h1&events=false", Some(ADMIN)).await;
    send(
        &mut ws,
        r#"{"type":"subscribe","house":"h2","events":false}"#,
    )
    .await;
    let answer = ws_next(&mut ws, Duration::from_secs(10))
        .await
        .expect("answer");
    assert_eq!(
        (answer["type"].as_str(), answer["house"].as_str()),
        (Some("subscribed"), Some("h2"))
    );
    send(&mut ws, r#"{"type":"unsubscribe","house":"h1"}"#).await;
    let answer = ws_next(&mut ws, Duration::from_secs(10))
        .await
        .expect("answer");
    assert_eq!(answer["type"], "unsubscribed");
    send(&mut ws, r#"{"type":"dance"}"#).await;
    let answer = ws_next(&mut ws, Duration::from_secs(10))
        .await
        .expect("answer");
    assert_eq!(answer["type"], "error");

    publish_all(
        port,
        &format!("pub-{name}"),
        vec![smoke("h1", "hall"), smoke("h2", "attic")],
    )
    .await;
    let got = alerts(&mut ws, 2, Duration::from_secs(5)).await;
    let houses: Vec<&str> = got.iter().filter_map(|m| m["house_id"].as_str()).collect();
    assert_eq!(houses, ["h2"], "h2 subscribed, h1 unsubscribed");

    // A house token subscribes within its house only.
    let token = token_for(env, "h1");
    let mut own = ws_hello(&addr, "events=false", Some(&token)).await;
    send(&mut own, r#"{"type":"subscribe","house":"h2"}"#).await;
    let answer = ws_next(&mut own, Duration::from_secs(10))
        .await
        .expect("answer");
    assert_eq!(answer["type"], "error", "{answer}");
    assert!(
        answer["error"].as_str().is_some_and(|e| e.contains("h2")),
        "{answer}"
    );
}

/// A subscription is served from the first batch stored after it was answered: each round
/// opens a socket on a house no one watched and at once publishes one reading to it, which
/// must be pushed (consumers read the watched houses again when a watch was advertised, not
/// only every few seconds).
async fn pushed_from_the_first_reading(backend: Backend, name: &str) {
    let (_rules, t) = start(backend, name, &[]).await;
    let (addr, port) = (t.addr.clone(), t.mqtt_port);
    for round in 0..5 {
        let house = format!("fresh{round}");
        let query = format!("house={house}&alerts=false");
        let mut ws = ws_hello(&addr, &query, Some(ADMIN)).await;
        publish_all(
            port,
            &format!("pub-{name}-{round}"),
            vec![(
                format!("hearth/{house}/hall"),
                br#"{"kind":"temperature","value":21.5,"seq":1}"#.to_vec(),
            )],
        )
        .await;
        let mut pushed = false;
        // A missed reading is never pushed later: a long wait does not weaken the test.
        while let Some(m) = ws_next(&mut ws, Duration::from_secs(30)).await {
            if m["type"] == "events" {
                pushed = true;
                break;
            }
        }
        assert!(
            pushed,
            "round {round}: the reading to {house} was not pushed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_subscription_gets_the_first_reading_on_the_servers() {
    pushed_from_the_first_reading(Backend::Servers, "push_first").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_subscription_gets_the_first_reading_embedded() {
    pushed_from_the_first_reading(Backend::Embedded, "push_first_emb").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_client_resumes_without_gap_or_repeat_on_the_servers() {
    resume(Backend::Servers, "push_resume").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_client_resumes_without_gap_or_repeat_embedded() {
    resume(Backend::Embedded, "push_resume_emb").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_and_unsubscribe_on_an_open_socket_on_the_servers() {
    subscriptions(Backend::Servers, "push_subs").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_and_unsubscribe_on_an_open_socket_embedded() {
    subscriptions(Backend::Embedded, "push_subs_emb").await;
}
