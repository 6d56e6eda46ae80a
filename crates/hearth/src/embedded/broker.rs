//! The embedded MQTT broker (MQTT 3.1.1 on rumqttc's codec): devices publish to hearth itself.
//!
//! Why not an off-the-shelf broker crate in-process: a broker acknowledges a QoS 1 PUBLISH when
//! it holds the message, in memory (rumqttd keeps no disk state), and hearth would take it from
//! there: a kill -9 between the two loses acknowledged messages. Here the broker *is* the
//! ingest: the messages of one socket read are decoded by the same codecs as `hearth ingest`,
//! appended to the embedded queue (one group commit, on disk), and only then are their PUBACKs
//! (QoS 1) or PUBRECs (QoS 2) written. A device whose message was not acknowledged sends it
//! again; storing is idempotent.
//!
//! Topics hearth reads (`hearth/+/+`, `maison/capteurs/+`) go to the queue (bad input to the
//! dead letters, with its reason); every message is also forwarded, at QoS 0, to the clients
//! subscribed to a matching filter (`+` and `#` wildcards), so `mosquitto_sub` works as with any
//! broker. No retained messages, wills or persistent outbound sessions: nothing downstream of
//! hearth depends on them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PingResp, PubAck, PubComp, PubRec, Publish, SubAck,
    SubscribeReasonCode, UnsubAck,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::backoff::Backoff;
use crate::codec::{self, Limits};
use crate::event::Event;
use crate::metrics::METRICS;
use crate::mqtt::{self, MqttError, Writer};
use crate::queue::DeadLetter;
use crate::seam::EventQueue;
use crate::shutdown::Shutdown;

/// Largest packet accepted (a payload over `max_payload_bytes` is still dead-lettered, with its
/// size, up to this).
const MAX_PACKET: usize = 1024 * 1024;
/// Messages a subscriber may have waiting before it is disconnected as too slow.
const SUBSCRIBER_BUFFER: usize = 10_000;

/// Bind the broker's address, with an error that says what to do when it is taken.
pub async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!(
                "mqtt_listen {addr} is already in use (another MQTT broker?): set HEARTH_MQTT_LISTEN \
                 to a free address, or use that broker with HEARTH_MQTT_URL (and Redis and \
                 PostgreSQL URLs)"
            )
        } else {
            anyhow::anyhow!("cannot listen on mqtt_listen {addr}: {e}")
        }
    })
}

struct Subscriber {
    id: u64,
    filters: Vec<String>,
    tx: mpsc::Sender<(String, Bytes)>,
}

/// The broker's shared state: who subscribed to what.
#[derive(Default)]
struct Routes {
    subscribers: Mutex<Vec<Subscriber>>,
    next: AtomicU64,
}

impl Routes {
    fn forward(&self, topic: &str, payload: &Bytes) {
        let Ok(mut subs) = self.subscribers.lock() else {
            return;
        };
        subs.retain(|s| {
            if !s.filters.iter().any(|f| matches(f, topic)) {
                return true;
            }
            // A subscriber that lets its buffer fill is dropped (it reconnects), never waited for.
            s.tx.try_send((topic.to_string(), payload.clone())).is_ok()
        });
    }
}

/// Whether an MQTT topic filter matches a topic.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && !filter.starts_with('$') {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Accept connections until shutdown.
pub async fn serve(
    listener: TcpListener,
    queue: Arc<dyn EventQueue>,
    limits: Limits,
    mut shutdown: Shutdown,
) {
    let routes = Arc::new(Routes::default());
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let (queue, limits, routes, shutdown) = (
                    queue.clone(),
                    limits.clone(),
                    routes.clone(),
                    shutdown.clone(),
                );
                tokio::spawn(async move {
                    match session(stream, queue, limits, routes, shutdown).await {
                        Ok(()) | Err(MqttError::Closed) => debug!(%peer, "mqtt client left"),
                        Err(e) => debug!(%peer, error = %e, "mqtt client dropped"),
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "accepting an MQTT connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn session(
    stream: TcpStream,
    queue: Arc<dyn EventQueue>,
    limits: Limits,
    routes: Arc<Routes>,
    mut shutdown: Shutdown,
) -> Result<(), MqttError> {
    stream.set_nodelay(true)?;
    let (mut reader, mut writer) = mqtt::split(stream, MAX_PACKET);
    let first = tokio::time::timeout(Duration::from_secs(10), reader.packets())
        .await
        .map_err(|_| MqttError::Protocol("no CONNECT within 10 s".into()))??;
    let mut packets = first.into_iter();
    let keep_alive = match packets.next() {
        Some(Packet::Connect(c)) => {
            writer.queue(&ConnAck::new(ConnectReturnCode::Success, false))?;
            writer.flush().await?;
            debug!(client = %c.client_id, "mqtt client connected");
            // Keep-alive 0 turns the check off (MQTT 3.1.1 §3.1.2.10).
            match c.keep_alive {
                0 => Duration::from_secs(365 * 24 * 3600),
                k => Duration::from_secs(u64::from(k)),
            }
        }
        other => {
            return Err(MqttError::Protocol(format!(
                "expected CONNECT, got {other:?}"
            )));
        }
    };
    let id = routes.next.fetch_add(1, Ordering::Relaxed);
    let (tx, mut outbound) = mpsc::channel::<(String, Bytes)>(SUBSCRIBER_BUFFER);
    let mut pending: Vec<Packet> = packets.collect();
    let result = async {
        loop {
            if !pending.is_empty() {
                let done = handle(
                    std::mem::take(&mut pending),
                    &mut writer,
                    &*queue,
                    &limits,
                    &routes,
                    id,
                    &tx,
                )
                .await?;
                writer.flush().await?;
                if done {
                    return Ok(());
                }
            }
            tokio::select! {
                read = tokio::time::timeout(keep_alive * 3 / 2, reader.packets()) => {
                    pending = read.map_err(|_| MqttError::Protocol("keep-alive expired".into()))??;
                }
                Some((topic, payload)) = outbound.recv() => {
                    writer.queue(&Publish::from_bytes(topic, QoS::AtMostOnce, payload))?;
                    while let Ok((topic, payload)) = outbound.try_recv() {
                        writer.queue(&Publish::from_bytes(topic, QoS::AtMostOnce, payload))?;
                    }
                    writer.flush().await?;
                }
                _ = shutdown.wait() => return Ok(()),
            }
        }
    }
    .await;
    if let Ok(mut subs) = routes.subscribers.lock() {
        subs.retain(|s| s.id != id);
    }
    result
}

/// Handle the packets of one read. Their publishes are appended together, acknowledged after.
/// Returns true on DISCONNECT.
async fn handle(
    packets: Vec<Packet>,
    writer: &mut Writer,
    queue: &dyn EventQueue,
    limits: &Limits,
    routes: &Routes,
    id: u64,
    tx: &mpsc::Sender<(String, Bytes)>,
) -> Result<bool, MqttError> {
    let received_us = crate::event::now_us();
    let mut events: Vec<Event> = Vec::new();
    let mut dead: Vec<DeadLetter> = Vec::new();
    let mut forward: Vec<(String, Bytes)> = Vec::new();
    let mut replies: Vec<Packet> = Vec::new();
    let mut disconnect = false;
    for packet in packets {
        match packet {
            Packet::Publish(p) => {
                if codec::SUBSCRIPTIONS.iter().any(|f| matches(f, &p.topic)) {
                    let decoded = codec::decode(&p.topic, &p.payload, received_us, limits);
                    for r in &decoded.rejections {
                        METRICS.rejected.with(r.reason.as_str()).add(1);
                        dead.push(DeadLetter::from_rejection(
                            r,
                            "mqtt",
                            &p.topic,
                            &p.payload,
                            received_us / 1000,
                        ));
                    }
                    events.extend(decoded.events);
                }
                match p.qos {
                    QoS::AtMostOnce => {}
                    QoS::AtLeastOnce => replies.push(Packet::PubAck(PubAck::new(p.pkid))),
                    QoS::ExactlyOnce => replies.push(Packet::PubRec(PubRec::new(p.pkid))),
                }
                forward.push((p.topic, p.payload));
            }
            Packet::PubRel(r) => replies.push(Packet::PubComp(PubComp::new(r.pkid))),
            Packet::Subscribe(s) => {
                let codes = s
                    .filters
                    .iter()
                    .map(|_| SubscribeReasonCode::Success(QoS::AtMostOnce))
                    .collect();
                if let Ok(mut subs) = routes.subscribers.lock() {
                    match subs.iter_mut().find(|x| x.id == id) {
                        Some(x) => x.filters.extend(s.filters.iter().map(|f| f.path.clone())),
                        None => subs.push(Subscriber {
                            id,
                            filters: s.filters.iter().map(|f| f.path.clone()).collect(),
                            tx: tx.clone(),
                        }),
                    }
                }
                replies.push(Packet::SubAck(SubAck::new(s.pkid, codes)));
            }
            Packet::Unsubscribe(u) => {
                if let Ok(mut subs) = routes.subscribers.lock()
                    && let Some(x) = subs.iter_mut().find(|x| x.id == id)
                {
                    x.filters.retain(|f| !u.topics.contains(f));
                }
                replies.push(Packet::UnsubAck(UnsubAck::new(u.pkid)));
            }
            Packet::PingReq => replies.push(Packet::PingResp),
            Packet::Disconnect => disconnect = true,
            _ => {}
        }
    }
    if !events.is_empty() || !dead.is_empty() {
        let event_refs: Vec<&Event> = events.iter().collect();
        let dead_refs: Vec<&DeadLetter> = dead.iter().collect();
        // Until it is on disk nothing is acknowledged; the client waits (and its TCP window
        // fills), it is never told yes too early.
        let mut backoff = Backoff::default();
        while let Err(e) = queue.append(&event_refs, &dead_refs).await {
            warn!(error = %e, "embedded queue append failed, retrying");
            tokio::time::sleep(backoff.next_delay()).await;
        }
        METRICS.received.with("mqtt").add(events.len() as u64);
    }
    for reply in &replies {
        match reply {
            Packet::PubAck(p) => writer.queue(p)?,
            Packet::PubRec(p) => writer.queue(p)?,
            Packet::PubComp(p) => writer.queue(p)?,
            Packet::SubAck(p) => writer.queue(p)?,
            Packet::UnsubAck(p) => writer.queue(p)?,
            Packet::PingResp => writer.queue(&PingResp)?,
            _ => {}
        }
    }
    for (topic, payload) in forward {
        routes.forward(&topic, &payload);
    }
    Ok(disconnect)
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn topic_filters() {
        assert!(matches("hearth/+/+", "hearth/h1/s1"));
        assert!(!matches("hearth/+/+", "hearth/h1"));
        assert!(!matches("hearth/+/+", "hearth/h1/s1/x"));
        assert!(matches("#", "a/b/c"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(!matches("#", "$SYS/broker"));
        assert!(matches("maison/capteurs/+", "maison/capteurs/temperature"));
    }
}
