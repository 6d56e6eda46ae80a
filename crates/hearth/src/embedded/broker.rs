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

use std::collections::HashSet;
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
use crate::queue::{DeadLetter, Lane};
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

/// The broker's shared state: who subscribed to what, and the routine depth last read.
#[derive(Default)]
struct Routes {
    subscribers: Mutex<Vec<Subscriber>>,
    next: AtomicU64,
    depth: Mutex<Option<(std::time::Instant, u64)>>,
}

/// How long a routine depth read serves every session.
const DEPTH_FRESH: Duration = Duration::from_millis(100);

impl Routes {
    /// Events queued in the routine lanes, read at most every [`DEPTH_FRESH`].
    async fn routine_depth(&self, queue: &dyn EventQueue) -> u64 {
        let cached = self.depth.lock().ok().and_then(|d| *d);
        if let Some((at, depth)) = cached
            && at.elapsed() < DEPTH_FRESH
        {
            return depth;
        }
        let depth = queue
            .depths()
            .await
            .map(|d| {
                d.iter()
                    .filter(|(l, _)| *l != Lane::Critical)
                    .map(|(_, n)| n)
                    .sum()
            })
            .unwrap_or(0);
        if let Ok(mut d) = self.depth.lock() {
            *d = Some((std::time::Instant::now(), depth));
        }
        depth
    }
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
            // A subscriber that lets its buffer fill is dropped, never waited for: its session
            // ends (its receiver sees the sender gone) and the client reconnects.
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

/// What the broker needs of the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub limits: Limits,
    /// Routine depth (events) above which the broker stops reading its clients' sockets...
    pub high_watermark: u64,
    /// ... until it is back under this one.
    pub low_watermark: u64,
}

impl Settings {
    pub fn from_config(config: &crate::config::Config) -> Settings {
        Settings {
            limits: Limits::from_config(config),
            high_watermark: config.queue_high_watermark,
            low_watermark: config.queue_low_watermark,
        }
    }
}

/// Accept connections until shutdown.
pub async fn serve(
    listener: TcpListener,
    queue: Arc<dyn EventQueue>,
    settings: Settings,
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
                let (queue, settings, routes, shutdown) = (
                    queue.clone(),
                    settings.clone(),
                    routes.clone(),
                    shutdown.clone(),
                );
                tokio::spawn(async move {
                    match session(stream, queue, settings, routes, shutdown).await {
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

/// Wait while the routine lanes hold more than the high watermark, until they are under the
/// low one: the client's unread packets stay in its socket, and TCP slows it down. Critical
/// events already queued are not behind the routine ones (their own lane, their own worker).
async fn backpressure(queue: &dyn EventQueue, routes: &Routes, settings: &Settings) {
    if routes.routine_depth(queue).await < settings.high_watermark {
        return;
    }
    debug!("queue above its high watermark: holding the client");
    while routes.routine_depth(queue).await >= settings.low_watermark {
        tokio::time::sleep(DEPTH_FRESH / 2).await;
    }
}

/// A client's session: its packets, and what it subscribed to.
struct Session {
    id: u64,
    /// Messages for the client's subscriptions; made at its first SUBSCRIBE. The broker's routes
    /// hold the only sender: when they drop a client that does not keep up, this ends.
    outbound: Option<mpsc::Receiver<(String, Bytes)>>,
    /// QoS 2 packet ids received and not released yet: a re-sent PUBLISH is not stored again.
    awaiting_release: HashSet<u16>,
}

async fn session(
    stream: TcpStream,
    queue: Arc<dyn EventQueue>,
    settings: Settings,
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
    let mut me = Session {
        id: routes.next.fetch_add(1, Ordering::Relaxed),
        outbound: None,
        awaiting_release: HashSet::new(),
    };
    let mut pending: Vec<Packet> = packets.collect();
    let result = async {
        loop {
            if !pending.is_empty() {
                let done = handle(
                    std::mem::take(&mut pending),
                    &mut writer,
                    &*queue,
                    &settings.limits,
                    &routes,
                    &mut me,
                )
                .await?;
                flush(&mut writer).await?;
                if done {
                    return Ok(());
                }
            }
            backpressure(&*queue, &routes, &settings).await;
            let outbound = async {
                match me.outbound.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                read = tokio::time::timeout(keep_alive * 3 / 2, reader.packets()) => {
                    pending = read.map_err(|_| MqttError::Protocol("keep-alive expired".into()))??;
                }
                message = outbound => match message {
                    Some((topic, payload)) => {
                        writer.queue(&Publish::from_bytes(topic, QoS::AtMostOnce, payload))?;
                        if let Some(rx) = me.outbound.as_mut() {
                            while let Ok((topic, payload)) = rx.try_recv() {
                                writer.queue(&Publish::from_bytes(topic, QoS::AtMostOnce, payload))?;
                            }
                        }
                        flush(&mut writer).await?;
                    }
                    None => return Err(MqttError::Protocol("subscriber too slow".into())),
                },
                _ = shutdown.wait() => return Ok(()),
            }
        }
    }
    .await;
    if let Ok(mut subs) = routes.subscribers.lock() {
        subs.retain(|s| s.id != me.id);
    }
    result
}

/// Write what is queued; a client that does not read within 10 s is dropped.
async fn flush(writer: &mut Writer) -> Result<(), MqttError> {
    tokio::time::timeout(Duration::from_secs(10), writer.flush())
        .await
        .map_err(|_| MqttError::Protocol("client not reading".into()))?
}

/// Handle the packets of one read. Their publishes are appended together, acknowledged after.
/// Returns true on DISCONNECT.
async fn handle(
    packets: Vec<Packet>,
    writer: &mut Writer,
    queue: &dyn EventQueue,
    limits: &Limits,
    routes: &Routes,
    me: &mut Session,
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
                // A QoS 2 message re-sent before its PUBREL was stored already.
                let repeat = p.qos == QoS::ExactlyOnce && !me.awaiting_release.insert(p.pkid);
                if !repeat && codec::SUBSCRIPTIONS.iter().any(|f| matches(f, &p.topic)) {
                    let decoded = codec::decode(&p.topic, &p.payload, received_us, limits);
                    dead.extend(decoded.dead_letter(
                        "mqtt",
                        &p.topic,
                        &p.payload,
                        received_us / 1000,
                    ));
                    events.extend(decoded.events);
                }
                match p.qos {
                    QoS::AtMostOnce => {}
                    QoS::AtLeastOnce => replies.push(Packet::PubAck(PubAck::new(p.pkid))),
                    QoS::ExactlyOnce => replies.push(Packet::PubRec(PubRec::new(p.pkid))),
                }
                forward.push((p.topic, p.payload));
            }
            Packet::PubRel(r) => {
                me.awaiting_release.remove(&r.pkid);
                replies.push(Packet::PubComp(PubComp::new(r.pkid)));
            }
            Packet::Subscribe(s) => {
                let codes = s
                    .filters
                    .iter()
                    .map(|_| SubscribeReasonCode::Success(QoS::AtMostOnce))
                    .collect();
                if let Ok(mut subs) = routes.subscribers.lock() {
                    match subs.iter_mut().find(|x| x.id == me.id) {
                        Some(x) => x.filters.extend(s.filters.iter().map(|f| f.path.clone())),
                        None => {
                            let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
                            me.outbound = Some(rx);
                            subs.push(Subscriber {
                                id: me.id,
                                filters: s.filters.iter().map(|f| f.path.clone()).collect(),
                                tx,
                            });
                        }
                    }
                }
                replies.push(Packet::SubAck(SubAck::new(s.pkid, codes)));
            }
            Packet::Unsubscribe(u) => {
                if let Ok(mut subs) = routes.subscribers.lock()
                    && let Some(x) = subs.iter_mut().find(|x| x.id == me.id)
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
