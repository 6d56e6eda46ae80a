//! Scale-out (issue 14): several `hearth ingest` processes, started the same way, share the
//! broker's messages through shared subscriptions, one ingest slot (a persistent session) each,
//! and keep every sensor's order and every event exactly once while they are killed.

mod support;

use std::time::{Duration, Instant};

use support::*;

const READY: Duration = Duration::from_secs(60);
const DRAIN: Duration = Duration::from_secs(300);

/// Three ingest processes, identical, `ingest_slots = 3`, one SIGKILLed every 3 s and started
/// again while 30,000 events flow: every event stored once and in its sensor's order, and the
/// queue received about one append per event (not one per process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_ingests_share_the_broker_through_kills() {
    let mut env = Env::new("scale3");
    let broker = Broker::start(&env.scratch.0);
    env.set("mqtt_url", broker.url())
        .set("ingest_slots", 3)
        .set("batch_size", 200)
        .set("shutdown_timeout_ms", 5000);
    let workers: Vec<Hearth> = (0..2)
        .map(|i| env.hearth(&format!("worker-{i}"), &["worker", "--workers", "2"]))
        .collect();
    for w in &workers {
        w.wait_log("worker started", READY).await;
    }
    let mut ingests: Vec<Hearth> = (0..3)
        .map(|i| env.hearth(&format!("ingest-{i}"), &["ingest"]))
        .collect();
    // The first one takes the three slots, then hands two over as the others join.
    eventually("each ingest to hold a slot", READY, || async {
        ingests
            .iter()
            .all(|i| i.log_text().contains("subscribed"))
            .then_some(())
    })
    .await;
    let (sensors, per_sensor) = (100usize, 300u64);
    let expected = (sensors as u64 * per_sensor) as i64;
    let publisher = publish_paced(
        &env,
        broker.port,
        interleaved("h1", sensors, per_sensor),
        2_000,
    );
    let started = Instant::now();
    let mut kills = 0;
    let mut victim = 0;
    while !publisher.is_finished() && kills < 20 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        ingests[victim].restart();
        kills += 1;
        victim = (victim + 1) % ingests.len();
    }
    publisher.await.expect("publisher");
    let status = wait_drained(&env, expected as u64, DRAIN).await;
    let received = status["events"]["received"].as_u64().unwrap_or(0);
    eprintln!(
        "scale: {expected} published through 3 ingests, {kills} SIGKILLs, {received} appended, \
         drained {:.1} s after the start",
        started.elapsed().as_secs_f64()
    );
    assert!(kills >= 3, "ingests were killed during the run");
    let pg = env.pg().await;
    assert_exactly_once_in_order(&pg, expected).await;
    assert!(
        received <= expected as u64 * 11 / 10,
        "about one append per event: {received} for {expected}"
    );
    for i in &ingests {
        let log = i.log_text();
        eprintln!(
            "scale: {}: {} slots taken, {} handed over",
            i.label,
            log.matches("ingest slot taken").count(),
            log.matches("handing ingest slot over").count()
        );
        assert!(!i.log_text().contains("panicked"), "{} panicked", i.label);
    }
    drop(workers);
}

/// A fleet split across two brokers: one `mqtt_url` naming both, one session on each, every
/// event of both stored once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ingest_reads_two_brokers() {
    let mut env = Env::new("scale2b");
    let a = Broker::start(&env.scratch.0.join("a"));
    let b = Broker::start(&env.scratch.0.join("b"));
    env.set("mqtt_url", format!("{},{}", a.url(), b.url()));
    let up = env.hearth("up", &["up"]);
    eventually("a session on each broker", READY, || async {
        (up.log_text().matches("subscribed").count() >= 2).then_some(())
    })
    .await;
    let (ida, idb) = (format!("pa-{}", env.name), format!("pb-{}", env.name));
    tokio::join!(
        publish_all(a.port, &ida, interleaved("east", 10, 100)),
        publish_all(b.port, &idb, interleaved("west", 10, 100)),
    );
    let pg = env.pg().await;
    wait_rows(&pg, 2_000, DRAIN).await;
    wait_drained(&env, 2_000, DRAIN).await;
    assert_exactly_once_in_order(&pg, 2_000).await;
    let houses: i64 = pg
        .query_one("SELECT count(DISTINCT house_id) FROM events", &[])
        .await
        .expect("houses")
        .get(0);
    assert_eq!(houses, 2, "both brokers' houses");
}
