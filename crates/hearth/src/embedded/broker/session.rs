//! One client's connection to the embedded broker: its login (credentials, client id, will), its
//! packets (publishes appended before they are acknowledged, retained ones kept, subscriptions
//! and the retained messages they receive), its outbound messages, and its end (the will).

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
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use tracing::{debug, info, warn};

use super::super::kept::Will;
use super::super::topics::Subscriber;
use super::{Broker, Client, backpressure};
use crate::auth::Principal;
use crate::codec;
use crate::event::{Reason, Rejection};
use crate::intake::Input;
use crate::metrics::METRICS;
use crate::mqtt::{self, MqttError, Writer};
use crate::shutdown::Shutdown;

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
pub(super) async fn session(
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
