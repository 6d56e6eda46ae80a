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
//! Topics hearth reads (its sources': [`crate::codec::sources`]) go to the queue (bad input to
//! the dead letters, with its reason); every message is also forwarded, at QoS 0, to the clients
//! subscribed to a matching filter (`+` and `#` wildcards), so `mosquitto_sub`, Home Assistant or
//! Node-RED work as with any broker. Retained messages and wills are kept in the data folder
//! ([`super::kept`]): discovery and availability rest on them. A client that sends no client id
//! gets one (with a clean session only). Not yet: persistent sessions for subscribers (QoS 1/2
//! out, messages kept while they are away).
//!
//! Who may do what: a client logs in with its house id as user name and a token of that house as
//! password, and then publishes and subscribes under its house's topics only
//! ([`crate::codec::Codecs::topic_house`]); a publish elsewhere is acknowledged (MQTT 3.1.1 has no
//! refusal) but neither stored nor forwarded: it is dead-lettered as `forbidden`. The admin token
//! as password may do anything. Clients without credentials are let in when
//! `mqtt_allow_anonymous` (the default, allowed only while the broker listens on loopback). A
//! second CONNECT with a client id in use takes the session over and closes the first (MQTT
//! 3.1.1 §3.1.4).
//!
//! Every way in is bounded: connections (`mqtt_max_connections`), the time to CONNECT and to
//! finish a packet begun (`mqtt_packet_timeout_ms`), silence (the client's keep-alive, at most
//! `mqtt_max_keep_alive_secs`, and that when it asks for none), packet size, subscription filters
//! per client (`mqtt_max_subscriptions`), and what a subscriber that does not read may have
//! waiting, in bytes (`mqtt_subscriber_buffer_bytes`).

use super::topics::{Routes, Subscriber};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PingResp, PubAck, PubComp, PubRec, Publish, SubAck,
    SubscribeReasonCode, UnsubAck,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tracing::{debug, info, warn};

use super::kept::{Kept, Will};
use crate::auth::{Authenticator, Principal};
use crate::codec::{self, Codecs, Limits};
use crate::event::{Reason, Rejection};
use crate::intake::{Gate, Input, Intake};
use crate::metrics::METRICS;
use crate::mqtt::{self, MqttError, Writer};
use crate::shutdown::Shutdown;

/// Room for the topic and the packet's other fields beside the largest payload accepted: a
/// payload over `max_payload_bytes` is still dead-lettered with its size up to this much more;
/// a larger packet ends the connection.
const PACKET_OVERHEAD: usize = 64 * 1024;

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

/// What the broker needs of the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub limits: Limits,
    pub allow_anonymous: bool,
    pub max_connections: usize,
    pub max_keep_alive: Duration,
    pub packet_timeout: Duration,
    pub max_subscriptions: usize,
    pub subscriber_buffer_bytes: usize,
}

impl Settings {
    pub fn from_config(config: &crate::config::Config) -> Settings {
        Settings {
            limits: Limits::from_config(config),
            allow_anonymous: config.mqtt_allow_anonymous,
            max_connections: config.mqtt_max_connections,
            max_keep_alive: Duration::from_secs(config.mqtt_max_keep_alive_secs),
            packet_timeout: Duration::from_millis(config.mqtt_packet_timeout_ms),
            max_subscriptions: config.mqtt_max_subscriptions,
            subscriber_buffer_bytes: config.mqtt_subscriber_buffer_bytes,
        }
    }

    fn max_packet(&self) -> usize {
        self.limits.max_payload_bytes + PACKET_OVERHEAD
    }
}

/// Who a connected client is.
#[derive(Debug, Clone, PartialEq)]
enum Client {
    /// No credentials (let in by `mqtt_allow_anonymous`): anywhere, as before logins existed.
    Anonymous,
    Known(Principal),
}

impl Client {
    /// Whether it may publish to, or subscribe to, `topic` (a topic or a filter).
    fn may(&self, codecs: &Codecs, topic: &str) -> bool {
        match self {
            Client::Anonymous | Client::Known(Principal::Admin) => true,
            Client::Known(Principal::House(h)) => codecs.topic_house(topic) == Some(h.as_str()),
        }
    }
}

/// What every session of the broker shares.
struct Broker {
    intake: Arc<Intake>,
    auth: Arc<Authenticator>,
    settings: Settings,
    routes: Routes,
    kept: Kept,
}

impl Broker {
    /// A message published by the broker itself (a will, its own status): stored if hearth
    /// reads its topic, kept if retained, and forwarded to subscribers. False if a shutdown
    /// came first.
    async fn publish(
        &self,
        topic: &str,
        payload: &Bytes,
        retain: bool,
        shutdown: &Shutdown,
    ) -> bool {
        if self.intake.codecs().wants(topic) {
            let input = self.intake.decode(topic, payload, crate::event::now_us());
            if !self.intake.append_until_done(&[&input], shutdown).await {
                return false;
            }
        }
        if retain
            && let Err(e) = self
                .kept
                .retain(vec![(topic.to_string(), payload.clone())])
                .await
        {
            warn!(error = %e, topic = %codec::truncate(topic, 128), "cannot keep a retained message");
        }
        self.routes.forward(topic, payload);
        true
    }
}

/// The topic Home Assistant's birth message goes to: devices that use discovery announce
/// themselves again when it says `online`.
pub const HA_STATUS: &str = "homeassistant/status";

/// Accept connections until shutdown. First the wills the last run left (their clients were cut
/// off by the stop) are published, and `homeassistant/status` `online` (retained), so that
/// devices announce themselves again.
pub async fn serve(
    listener: TcpListener,
    intake: Arc<Intake>,
    auth: Arc<Authenticator>,
    settings: Settings,
    (kept, left): (Kept, Vec<Will>),
    mut alerts: Option<crate::alerts::mqtt::AlertFeed>,
    mut shutdown: Shutdown,
) {
    let routes = Routes {
        buffer_bytes: settings.subscriber_buffer_bytes,
        ..Routes::default()
    };
    let broker = Arc::new(Broker {
        intake,
        auth,
        settings,
        routes,
        kept,
    });
    for will in &left {
        broker
            .publish(&will.topic, &will.payload, will.retain, &shutdown)
            .await;
    }
    if let Err(e) = broker.kept.clear_wills().await {
        warn!(error = %e, "cannot clear the wills published at start");
    }
    broker
        .publish(HA_STATUS, &Bytes::from_static(b"online"), true, &shutdown)
        .await;
    // The recent alerts' state, in case a transition was not published before a stop.
    if let Some(feed) = &alerts {
        for (topic, payload) in feed.recent().await {
            broker
                .publish(&topic, &Bytes::from(payload), true, &shutdown)
                .await;
        }
    }
    let settings = &broker.settings;
    let connections = Arc::new(tokio::sync::Semaphore::new(settings.max_connections));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            pushed = crate::alerts::mqtt::next(&mut alerts), if alerts.is_some() => {
                match pushed {
                    // Alert transitions, to the home's automations (retained).
                    Some(p) => {
                        if let Some(alert) = crate::alerts::mqtt::alert_of(&p) {
                            for (topic, payload) in crate::alerts::mqtt::messages(&alert) {
                                broker.publish(&topic, &Bytes::from(payload), true, &shutdown).await;
                            }
                        }
                    }
                    None => alerts = None,
                }
                continue;
            }
            _ = shutdown.wait() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(permit) = connections.clone().try_acquire_owned() else {
                    tokio::spawn(refuse(stream, peer));
                    continue;
                };
                let (broker, shutdown) = (broker.clone(), shutdown.clone());
                tokio::spawn(async move {
                    match session(stream, broker, shutdown).await {
                        Ok(()) | Err(MqttError::Closed) => debug!(%peer, "mqtt client left"),
                        Err(e) => debug!(%peer, error = %e, "mqtt client dropped"),
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                warn!(error = %e, "accepting an MQTT connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A connection past `mqtt_max_connections`: told the server is unavailable, and closed.
async fn refuse(stream: TcpStream, peer: std::net::SocketAddr) {
    METRICS.mqtt_refused.with("too_many_connections").add(1);
    debug!(%peer, "mqtt connection refused: too many connections");
    let (_, mut writer) = mqtt::split(stream, 0);
    if writer
        .queue(&ConnAck::new(ConnectReturnCode::ServiceUnavailable, false))
        .is_ok()
    {
        let _ = tokio::time::timeout(Duration::from_secs(1), writer.flush()).await;
    }
}

/// Wait while the gate is closed (the routine lanes reached the high watermark, until they are
/// down to the low one): the client's unread packets stay in its socket, and TCP slows it down.
/// Critical events already queued are not behind the routine ones (their own lane and worker).
async fn backpressure(gate: &Gate) {
    if gate.is_closed() {
        debug!("queue above its high watermark: holding the client");
        gate.open().await;
    }
}

/// The messages sent to a subscriber's session, (topic, payload).
type Outbound = mpsc::UnboundedReceiver<(String, Bytes)>;

/// A client's session: its packets, and what it subscribed to.
struct Session {
    id: u64,
    who: Client,
    /// Messages for the client's subscriptions, and the bytes of them not yet written; made at
    /// its first SUBSCRIBE. The broker's routes hold the only sender: when they drop a client
    /// that does not keep up, this ends.
    outbound: Option<(Outbound, Arc<AtomicUsize>)>,
    /// Subscription filters held.
    filters: usize,
    /// QoS 2 packet ids received and not released yet: a re-sent PUBLISH is not stored again.
    awaiting_release: HashSet<u16>,
}

/// A client let in.
struct Login {
    who: Client,
    client_id: String,
    keep_alive: Duration,
    /// Its last will, kept under `key` until the session ends.
    will: Option<Will>,
    key: String,
    /// Packets read with the CONNECT.
    first: Vec<Packet>,
}

/// Read a CONNECT and answer it: who the client is, its client id (one is assigned to a client
/// that sends none, MQTT 3.1.1 §3.1.3.1), keep-alive and will (kept before the CONNACK); `None`
/// when it was refused (and told so).
async fn login(
    reader: &mut mqtt::Reader,
    writer: &mut Writer,
    broker: &Broker,
) -> Result<Option<Login>, MqttError> {
    let (auth, settings) = (&broker.auth, &broker.settings);
    let first = reader
        .packets_within(settings.packet_timeout, settings.packet_timeout)
        .await?;
    let mut packets = first.into_iter();
    let Some(Packet::Connect(c)) = packets.next() else {
        return Err(MqttError::Protocol("expected CONNECT first".into()));
    };
    let who = match &c.login {
        Some(login) => match auth.principal(&login.password).await {
            Ok(Some(Principal::Admin)) => Some(Client::Known(Principal::Admin)),
            Ok(Some(Principal::House(h))) if h == login.username => {
                Some(Client::Known(Principal::House(h)))
            }
            Ok(_) => None,
            Err(e) => {
                warn!(error = %e, "cannot check MQTT credentials now");
                let _ = writer.queue(&ConnAck::new(ConnectReturnCode::ServiceUnavailable, false));
                flush(writer).await?;
                return Ok(None);
            }
        },
        None if settings.allow_anonymous => Some(Client::Anonymous),
        None => None,
    };
    let Some(who) = who else {
        let (code, reason) = match &c.login {
            Some(_) => (ConnectReturnCode::BadUserNamePassword, "bad_credentials"),
            None => (ConnectReturnCode::NotAuthorized, "anonymous"),
        };
        METRICS.mqtt_refused.with(reason).add(1);
        info!(client = %codec::truncate(&c.client_id, 64), reason, "mqtt login refused");
        writer.queue(&ConnAck::new(code, false))?;
        flush(writer).await?;
        return Ok(None);
    };
    let refuse = |code, reason: &'static str| {
        METRICS.mqtt_refused.with(reason).add(1);
        info!(client = %codec::truncate(&c.client_id, 64), reason, "mqtt login refused");
        ConnAck::new(code, false)
    };
    // A client id is needed to keep a session: an empty one only with a clean session.
    let client_id = match c.client_id.is_empty() {
        true if !c.clean_session => {
            writer.queue(&refuse(ConnectReturnCode::BadClientId, "client_id"))?;
            flush(writer).await?;
            return Ok(None);
        }
        true => format!("auto-{}", uuid::Uuid::new_v4().simple()),
        false => c.client_id.clone(),
    };
    let key = uuid::Uuid::new_v4().simple().to_string();
    let will = c.last_will.as_ref().map(|w| Will {
        topic: w.topic.clone(),
        payload: w.message.clone(),
        retain: w.retain,
    });
    if let Some(w) = &will {
        // A will goes where its client may publish, and is kept before the client is let in.
        if !who.may(broker.intake.codecs(), &w.topic) {
            writer.queue(&refuse(ConnectReturnCode::NotAuthorized, "will"))?;
            flush(writer).await?;
            return Ok(None);
        }
        if let Err(e) = broker.kept.set_will(&key, w).await {
            warn!(error = %e, "cannot keep a client's will now");
            writer.queue(&ConnAck::new(ConnectReturnCode::ServiceUnavailable, false))?;
            flush(writer).await?;
            return Ok(None);
        }
    }
    writer.queue(&ConnAck::new(ConnectReturnCode::Success, false))?;
    flush(writer).await?;
    debug!(client = %codec::truncate(&client_id, 64), who = ?who, "mqtt client connected");
    // Keep-alive 0 asks for none (MQTT 3.1.1 §3.1.2.10), and a client may ask for up to 18 h:
    // neither is honoured past the configured maximum.
    let asked = Duration::from_secs(u64::from(c.keep_alive));
    let keep_alive = if asked.is_zero() {
        settings.max_keep_alive
    } else {
        asked.min(settings.max_keep_alive)
    };
    Ok(Some(Login {
        who,
        client_id,
        keep_alive,
        will,
        key,
        first: packets.collect(),
    }))
}

/// A client's connection, from CONNECT to its end. A will is published when the connection ends
/// without a DISCONNECT (a dropped socket, silence past the keep-alive, a protocol error, a
/// takeover), forgotten on DISCONNECT, and kept for the next start when hearth stops.
async fn session(
    stream: TcpStream,
    broker: Arc<Broker>,
    mut shutdown: Shutdown,
) -> Result<(), MqttError> {
    stream.set_nodelay(true)?;
    let (intake, settings, routes) = (&broker.intake, &broker.settings, &broker.routes);
    let (mut reader, mut writer) = mqtt::split(stream, settings.max_packet());
    let Some(Login {
        who,
        client_id,
        keep_alive,
        will,
        key,
        first,
    }) = login(&mut reader, &mut writer, &broker).await?
    else {
        return Ok(());
    };
    let mut me = Session {
        id: routes.next.fetch_add(1, Ordering::Relaxed),
        who,
        outbound: None,
        filters: 0,
        awaiting_release: HashSet::new(),
    };
    let kicked = Arc::new(Notify::new());
    routes.take_over(&client_id, me.id, kicked.clone());
    let mut pending: Vec<Packet> = first;
    let result: Result<bool, MqttError> = async {
        loop {
            if !pending.is_empty() {
                let done = handle(
                    std::mem::take(&mut pending),
                    &mut writer,
                    &broker,
                    &mut me,
                    &shutdown,
                )
                .await?;
                flush(&mut writer).await?;
                if done {
                    return Ok(true);
                }
            }
            backpressure(intake.gate()).await;
            let outbound = async {
                match me.outbound.as_mut() {
                    Some((rx, _)) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                read = reader.packets_within(keep_alive * 3 / 2, settings.packet_timeout) => {
                    pending = read?;
                }
                message = outbound => match message {
                    Some(first) => {
                        let Some((rx, queued)) = me.outbound.as_mut() else {
                            continue;
                        };
                        let mut next = Some(first);
                        while let Some((topic, payload)) = next {
                            queued.fetch_sub(topic.len() + payload.len(), Ordering::Relaxed);
                            writer.queue(&Publish::from_bytes(topic, QoS::AtMostOnce, payload))?;
                            next = rx.try_recv().ok();
                        }
                        flush(&mut writer).await?;
                    }
                    None => return Err(MqttError::Protocol("subscriber too slow".into())),
                },
                _ = kicked.notified() => {
                    return Err(MqttError::Protocol("client id taken over by a new connection".into()));
                }
                _ = shutdown.wait() => return Ok(false),
            }
        }
    }
    .await;
    routes.leave(&client_id, me.id);
    if let Some(will) = &will {
        let published = match &result {
            // DISCONNECT: the client said goodbye, no will.
            Ok(true) => true,
            // hearth stops: the next start publishes it.
            Ok(false) => false,
            Err(_) => {
                broker
                    .publish(&will.topic, &will.payload, will.retain, &shutdown)
                    .await
            }
        };
        if published && let Err(e) = broker.kept.clear_will(&key).await {
            warn!(error = %e, "cannot forget a session's will");
        }
    }
    result.map(|_| ())
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
    broker: &Broker,
    me: &mut Session,
    shutdown: &Shutdown,
) -> Result<bool, MqttError> {
    let (intake, settings, routes) = (&broker.intake, &broker.settings, &broker.routes);
    let received_us = crate::event::now_us();
    // Retained updates (kept before their PUBACK), and the retained messages new subscriptions
    // receive (after their SUBACK).
    let mut retains: Vec<(String, Bytes)> = Vec::new();
    let mut retained_out: Vec<(String, Bytes)> = Vec::new();
    let mut inputs: Vec<Input> = Vec::new();
    let mut forward: Vec<(String, Bytes)> = Vec::new();
    let mut replies: Vec<Packet> = Vec::new();
    let mut disconnect = false;
    for packet in packets {
        match packet {
            Packet::Publish(p) => {
                // A QoS 2 message re-sent before its PUBREL was stored already.
                let repeat = p.qos == QoS::ExactlyOnce && !me.awaiting_release.insert(p.pkid);
                // A house's alert topics are hearth's word alone.
                let allowed = me.who.may(intake.codecs(), &p.topic)
                    && !crate::alerts::mqtt::is_alert_topic(&p.topic);
                if !allowed && !repeat {
                    METRICS.mqtt_refused.with("forbidden").add(1);
                    let why = Rejection::new(
                        Reason::Forbidden,
                        format!(
                            "{:?} may not publish to {:?}",
                            me.who,
                            codec::truncate(&p.topic, 128)
                        ),
                    );
                    inputs.push(Input::refused(
                        why,
                        "mqtt",
                        &p.topic,
                        &p.payload,
                        received_us / 1000,
                    ));
                }
                if allowed && !repeat && intake.codecs().wants(&p.topic) {
                    inputs.push(intake.decode(&p.topic, &p.payload, received_us));
                }
                match p.qos {
                    QoS::AtMostOnce => {}
                    QoS::AtLeastOnce => replies.push(Packet::PubAck(PubAck::new(p.pkid))),
                    QoS::ExactlyOnce => replies.push(Packet::PubRec(PubRec::new(p.pkid))),
                }
                if allowed && !repeat && p.retain {
                    retains.push((p.topic.clone(), p.payload.clone()));
                }
                if allowed {
                    forward.push((p.topic, p.payload));
                }
            }
            Packet::PubRel(r) => {
                me.awaiting_release.remove(&r.pkid);
                replies.push(Packet::PubComp(PubComp::new(r.pkid)));
            }
            Packet::Subscribe(s) => {
                // Each filter is granted (QoS 0) if the client may read what it matches and
                // holds fewer than `mqtt_max_subscriptions`; refused (0x80) otherwise.
                let mut granted = Vec::new();
                let mut codes = Vec::with_capacity(s.filters.len());
                for f in &s.filters {
                    let ok = me.who.may(intake.codecs(), &f.path)
                        && me.filters + granted.len() < settings.max_subscriptions;
                    if ok {
                        retained_out.extend(broker.kept.matching(&f.path));
                        granted.push(f.path.clone());
                        codes.push(SubscribeReasonCode::Success(QoS::AtMostOnce));
                    } else {
                        METRICS.mqtt_refused.with("subscription").add(1);
                        codes.push(SubscribeReasonCode::Failure);
                    }
                }
                me.filters += granted.len();
                if !granted.is_empty()
                    && let Ok(mut subs) = routes.subscribers.lock()
                {
                    match subs.iter_mut().find(|x| x.id == me.id) {
                        Some(x) => x.filters.extend(granted),
                        None => {
                            let (tx, rx) = mpsc::unbounded_channel();
                            let queued = Arc::new(AtomicUsize::new(0));
                            me.outbound = Some((rx, queued.clone()));
                            subs.push(Subscriber {
                                id: me.id,
                                filters: granted,
                                tx,
                                queued,
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
                    me.filters = x.filters.len();
                }
                replies.push(Packet::UnsubAck(UnsubAck::new(u.pkid)));
            }
            Packet::PingReq => replies.push(Packet::PingResp),
            Packet::Disconnect => disconnect = true,
            _ => {}
        }
    }
    if !inputs.is_empty() {
        // Until it is on disk nothing is acknowledged; the client waits (and its TCP window
        // fills), it is never told yes too early.
        let inputs: Vec<&Input> = inputs.iter().collect();
        if !intake.append_until_done(&inputs, shutdown).await {
            return Err(MqttError::Closed);
        }
    }
    if !retains.is_empty()
        && let Err(e) = broker.kept.retain(retains).await
    {
        // Not kept, so not acknowledged: the client sends it again.
        return Err(MqttError::Protocol(format!(
            "cannot keep a retained message: {e}"
        )));
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
    for (topic, payload) in retained_out {
        let mut publish = Publish::from_bytes(topic, QoS::AtMostOnce, payload);
        publish.retain = true;
        writer.queue(&publish)?;
    }
    for (topic, payload) in forward {
        routes.forward(&topic, &payload);
    }
    Ok(disconnect)
}

#[cfg(test)]
mod tests {
    use crate::embedded::topics::matches;

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
