//! The two baselines hearth is measured against, on the same machine in the same run:
//!
//! - `raw`: the broker alone, publisher → plain QoS 1 subscriber. The physical ceiling here: no
//!   pipeline can store faster than the broker delivers.
//! - `sync`: the seed's "before" architecture, a subscriber that inserts each message with its
//!   own INSERT (autocommit) as it arrives.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use super::publish::{self, Load};
use hearth::sim::wire;

/// Events per second delivered to a plain subscriber (which acknowledges in batches, so that
/// it is the broker that is measured).
pub async fn raw(port: u16, load: &Load, tag: &str) -> anyhow::Result<f64> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let filter = format!("{}/#", load.topic_root);
    let (id, events) = (format!("{tag}-raw-sub"), load.events);
    let subscriber = tokio::spawn(async move {
        wire::receive(
            "127.0.0.1",
            port,
            &id,
            &filter,
            events,
            Duration::from_secs(30),
            ready_tx,
        )
        .await
    });
    ready_rx
        .await
        .map_err(|_| anyhow::anyhow!("raw subscriber could not subscribe"))?;
    let started = Instant::now();
    let publisher = spawn_publisher(port, load, &format!("{tag}-raw-pub"));
    subscriber.await??;
    let elapsed = started.elapsed();
    publisher.await??;
    Ok(load.events as f64 / elapsed.as_secs_f64())
}

/// Events per second stored by a subscriber doing one INSERT per message.
pub async fn sync(port: u16, load: &Load, tag: &str, database_url: &str) -> anyhow::Result<f64> {
    let db = hearth::servers::postgres::connect(database_url).await?;
    db.batch_execute(
        "DROP TABLE IF EXISTS sync_events;
         CREATE TABLE sync_events (id bigserial PRIMARY KEY, topic text NOT NULL, kind text NOT NULL,
                                   value double precision NOT NULL, seq bigint, ts bigint)",
    )
    .await?;
    let insert = db
        .prepare(
            "INSERT INTO sync_events (topic, kind, value, seq, ts) VALUES ($1, $2, $3, $4, $5)",
        )
        .await?;
    let (client, mut eventloop) =
        subscriber(port, &format!("{tag}-sync-sub"), &load.topic_root).await?;
    let publisher = spawn_publisher(port, load, &format!("{tag}-sync-pub"));
    let started = Instant::now();
    let mut stored = 0;
    while stored < load.events {
        match tokio::time::timeout(Duration::from_secs(30), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let v: serde_json::Value = serde_json::from_slice(&p.payload)?;
                db.execute(
                    &insert,
                    &[
                        &p.topic,
                        &v["kind"].as_str().unwrap_or_default(),
                        &v["value"].as_f64().unwrap_or_default(),
                        &v["seq"].as_i64(),
                        &v["ts"].as_i64(),
                    ],
                )
                .await?;
                stored += 1;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => anyhow::bail!("sync subscriber: {e}"),
            Err(_) => anyhow::bail!(
                "sync subscriber: {stored}/{} after 30 s of silence",
                load.events
            ),
        }
    }
    let elapsed = started.elapsed();
    publisher.await??;
    let _ = client.try_disconnect();
    db.batch_execute("DROP TABLE sync_events").await?;
    Ok(stored as f64 / elapsed.as_secs_f64())
}

async fn subscriber(
    port: u16,
    id: &str,
    root: &str,
) -> anyhow::Result<(AsyncClient, rumqttc::EventLoop)> {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(60))
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    client
        .subscribe(format!("{root}/#"), QoS::AtLeastOnce)
        .await?;
    loop {
        match eventloop.poll().await? {
            Event::Incoming(Packet::SubAck(_)) => return Ok((client, eventloop)),
            _ => continue,
        }
    }
}

fn spawn_publisher(
    port: u16,
    load: &Load,
    id: &str,
) -> tokio::task::JoinHandle<anyhow::Result<Duration>> {
    let load = load.clone();
    let id = id.to_string();
    tokio::spawn(async move {
        publish::publish("127.0.0.1", port, &id, &load, Arc::new(AtomicU64::new(0))).await
    })
}
