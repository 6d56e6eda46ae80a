//! The load client of `hearth sim` and of the bench, on [`crate::mqtt`]: publishes and
//! acknowledges in batches, one write for many packets, so that the load's own client is never
//! what limits a measurement.
//!
//! QoS 1 publishes keep at most 1000 unacknowledged, packet ids cycling through 1..=65535 (with
//! far fewer in flight, an id is never reused while pending).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Disconnect, Packet, PubAck, Publish, Subscribe};
use tokio::sync::Semaphore;

use crate::mqtt::{self, Endpoint};

/// Unacknowledged publishes at most, and the slice of them taken at once.
const INFLIGHT: usize = 1000;
const CREDIT_SLICE: u32 = 100;

fn endpoint(host: &str, port: u16, client_id: &str) -> Endpoint {
    Endpoint {
        host: host.to_string(),
        port,
        client_id: client_id.to_string(),
        credentials: None,
        clean_session: true,
        keep_alive: Duration::ZERO,
        max_packet: 1 << 20,
        tls: None,
    }
}

/// Publish `count` messages made by `make(n)`, `n` in 0..count, at QoS 1 (or 0), message `n`
/// not before `due(n)` after the start (`None`: at once, as fast as the broker takes them).
/// `done` counts acknowledged (QoS 1) or written (QoS 0) messages.
#[allow(clippy::too_many_arguments)]
pub async fn publish<F, D>(
    host: &str,
    port: u16,
    client_id: &str,
    count: u64,
    qos: QoS,
    due: D,
    mut make: F,
    done: Arc<AtomicU64>,
) -> anyhow::Result<()>
where
    F: FnMut(u64) -> (String, Vec<u8>),
    D: Fn(u64) -> Option<Duration>,
{
    let (mut reader, mut writer, _) = mqtt::connect(&endpoint(host, port, client_id)).await?;
    let inflight = Arc::new(Semaphore::new(INFLIGHT));
    let acker = {
        let inflight = inflight.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut acked = 0;
            while acked < count {
                for p in reader.packets().await? {
                    if let Packet::PubAck(_) = p {
                        acked += 1;
                        done.fetch_add(1, Ordering::Relaxed);
                        inflight.add_permits(1);
                    }
                }
            }
            Ok::<_, anyhow::Error>(())
        })
    };
    let start = Instant::now();
    let mut pkid: u16 = 0;
    // Permits are taken in slices: waiting for single acks would turn the stream into one
    // small write per acknowledgement.
    let mut credit = 0u32;
    for n in 0..count {
        if let Some(at) = due(n).map(|d| start + d)
            && at > Instant::now()
        {
            writer.flush().await?;
            tokio::time::sleep_until(at.into()).await;
        }
        let (topic, payload) = make(n);
        let mut publish = Publish::new(topic, qos, payload);
        if qos != QoS::AtMostOnce {
            if credit == 0 {
                let permits = match inflight.clone().try_acquire_many_owned(CREDIT_SLICE) {
                    Ok(p) => p,
                    Err(_) => {
                        // Send what is queued before waiting, or the broker never sees it.
                        writer.flush().await?;
                        inflight.clone().acquire_many_owned(CREDIT_SLICE).await?
                    }
                };
                credit = permits.num_permits() as u32;
                // They come back one by one, from the acker, as PUBACKs arrive.
                permits.forget();
            }
            credit -= 1;
            pkid = if pkid == u16::MAX { 1 } else { pkid + 1 };
            publish.pkid = pkid;
        } else {
            done.fetch_add(1, Ordering::Relaxed);
        }
        writer.queue(&publish)?;
        if writer.pending() >= 64 * 1024 {
            writer.flush().await?;
        }
    }
    writer.flush().await?;
    if qos != QoS::AtMostOnce {
        acker.await??;
    } else {
        acker.abort();
    }
    writer.queue(&Disconnect)?;
    let _ = writer.flush().await;
    Ok(())
}

/// Subscribe to `filter` at QoS 1 and acknowledge every message, a read's worth of PUBACKs in
/// one write. Returns once `count` messages arrived, or fails after `idle` without any.
pub async fn receive(
    host: &str,
    port: u16,
    client_id: &str,
    filter: &str,
    count: u64,
    idle: Duration,
    subscribed: tokio::sync::oneshot::Sender<()>,
) -> anyhow::Result<()> {
    let (mut reader, mut writer, _) = mqtt::connect(&endpoint(host, port, client_id)).await?;
    let mut subscribe = Subscribe::new(filter, QoS::AtLeastOnce);
    subscribe.pkid = 1;
    writer.queue(&subscribe)?;
    writer.flush().await?;
    let mut subscribed = Some(subscribed);
    let mut received = 0;
    while received < count {
        let packets = tokio::time::timeout(idle, reader.packets())
            .await
            .map_err(|_| {
                anyhow::anyhow!("{received}/{count} received, then nothing for {idle:?}")
            })??;
        for p in packets {
            match p {
                Packet::SubAck(_) => {
                    if let Some(s) = subscribed.take() {
                        let _ = s.send(());
                    }
                }
                Packet::Publish(p) => {
                    received += 1;
                    if p.qos != QoS::AtMostOnce {
                        writer.queue(&PubAck::new(p.pkid))?;
                    }
                }
                _ => {}
            }
        }
        writer.flush().await?;
    }
    Ok(())
}
