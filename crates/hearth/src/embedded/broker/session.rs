//! One client's connection to the embedded broker: its login (credentials, client id, will,
//! session), its packets (publishes appended, kept if retained and queued for persistent
//! sessions before they are acknowledged; subscriptions and the retained messages they receive;
//! acknowledgements of what it was sent), its outbound messages ([`super::outbound`]), and its
//! end (the will).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PingResp, PubAck, PubComp, PubRec, PubRel, Publish, SubAck,
    SubscribeReasonCode, UnsubAck,
};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::super::kept::Will;
use super::super::topics::Message;
use super::outbound::{Outbound, Settled};
use super::throttle::Throttle;
use super::{Broker, Client, backpressure};
use crate::auth::{Principal, Refused};
use crate::codec;
use crate::event::{Reason, Rejection};
use crate::intake::Input;
use crate::metrics::METRICS;
use crate::mqtt::{self, MqttError, Writer};
use crate::rate::Place;
use crate::shutdown::Shutdown;

/// The longest client id taken, in bytes (MQTT 3.1.1 asks servers to take 23 at least;
/// Mosquitto takes 65,535): it is a persistent session's key on disk.
const MAX_CLIENT_ID: usize = 256;

/// The longest subscription filter taken, in bytes (kept on disk for a persistent session;
/// the ecosystems' longest topics are under 200).
const MAX_FILTER: usize = 1024;

/// A client's connection: who, its session, what it is sent.
struct Session {
    id: u64,
    who: Client,
    client_id: String,
    /// Clean session off: kept while the client is away.
    persistent: bool,
    /// Messages for the client's subscriptions. The broker's routes hold the only sender: when
    /// they cut off a client that does not keep up, this ends.
    outbound: Outbound,
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
    /// Clean session off, and whether its session was kept from before.
    persistent: bool,
    present: bool,
    /// Its last will, kept under `key` until the session ends.
    will: Option<Will>,
    key: String,
    /// Packets read with the CONNECT.
    first: Vec<Packet>,
    /// Its place among its house's connections, held until it ends.
    _place: Option<Place<String>>,
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
            Err(Refused::Unavailable(e)) => {
                warn!(error = %e, "cannot check MQTT credentials now");
                return not_let_in(writer, ConnectReturnCode::ServiceUnavailable).await;
            }
            // Past the lookups' rate (`token_lookups_per_second`): a flood of made-up passwords.
            Err(Refused::TooMany { .. }) => {
                METRICS.mqtt_refused.with("too_many_logins").add(1);
                return not_let_in(writer, ConnectReturnCode::ServiceUnavailable).await;
            }
        },
        None if settings.allow_anonymous => Some(Client::Anonymous),
        None => None,
    };
    // Counted and logged; the CONNACK says why.
    let refuse = |code, reason: &'static str| {
        METRICS.mqtt_refused.with(reason).add(1);
        info!(client = %codec::truncate(&c.client_id, 64), reason, "mqtt login refused");
        code
    };
    let Some(who) = who else {
        let code = match &c.login {
            Some(_) => refuse(ConnectReturnCode::BadUserNamePassword, "bad_credentials"),
            None => refuse(ConnectReturnCode::NotAuthorized, "anonymous"),
        };
        return not_let_in(writer, code).await;
    };
    // One house's clients hold at most their share of the connections.
    let Ok(place) = broker.place(&who) else {
        let code = refuse(ConnectReturnCode::ServiceUnavailable, "house_connections");
        return not_let_in(writer, code).await;
    };
    // A client id is kept (a session's key, in the data folder): a long one is refused; one is
    // needed to keep a session: an empty one only with a clean session.
    if c.client_id.len() > MAX_CLIENT_ID || (c.client_id.is_empty() && !c.clean_session) {
        return not_let_in(writer, refuse(ConnectReturnCode::BadClientId, "client_id")).await;
    }
    let client_id = match c.client_id.is_empty() {
        true => format!("auto-{}", uuid::Uuid::new_v4().simple()),
        false => c.client_id.clone(),
    };
    let will = c.last_will.as_ref().map(|w| Will {
        topic: w.topic.clone(),
        payload: w.message.clone(),
        retain: w.retain,
    });
    // A will goes where its client may publish.
    if will
        .as_ref()
        .is_some_and(|w| !who.may(broker.intake.codecs(), &w.topic))
    {
        return not_let_in(writer, refuse(ConnectReturnCode::NotAuthorized, "will")).await;
    }
    let persistent = !c.clean_session;
    let (present, sessions) = broker.routes.persistent(&client_id);
    if persistent && !present && sessions >= settings.max_sessions {
        let code = refuse(ConnectReturnCode::ServiceUnavailable, "sessions_full");
        return not_let_in(writer, code).await;
    }
    // Kept before the CONNACK: a new persistent session (or a kept one forgotten, by a clean
    // one), and the will.
    if persistent != present
        && let Err(e) = broker.kept.sessions.start(&client_id, persistent).await
    {
        warn!(error = %e, "cannot keep a client's session now");
        return not_let_in(writer, ConnectReturnCode::ServiceUnavailable).await;
    }
    let present = persistent && present;
    let key = uuid::Uuid::new_v4().simple().to_string();
    if let Some(w) = &will
        && let Err(e) = broker.kept.set_will(&key, w).await
    {
        warn!(error = %e, "cannot keep a client's will now");
        return not_let_in(writer, ConnectReturnCode::ServiceUnavailable).await;
    }
    writer.queue(&ConnAck::new(ConnectReturnCode::Success, present))?;
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
        persistent,
        present,
        will,
        key,
        first: packets.collect(),
        _place: place,
    }))
}

/// Answer a CONNECT that is not let in with `code`.
async fn not_let_in(
    writer: &mut Writer,
    code: ConnectReturnCode,
) -> Result<Option<Login>, MqttError> {
    writer.queue(&ConnAck::new(code, false))?;
    flush(writer).await?;
    Ok(None)
}

/// A client's connection, from CONNECT to its end. A will is published when the connection ends
/// without a DISCONNECT (a dropped socket, silence past the keep-alive, a protocol error, a
/// takeover), forgotten on DISCONNECT, and kept for the next start when hearth stops.
pub(super) async fn session(
    socket: mqtt::Socket,
    broker: Arc<Broker>,
    mut shutdown: Shutdown,
) -> Result<(), MqttError> {
    let (intake, settings, routes) = (&broker.intake, &broker.settings, &broker.routes);
    let (mut reader, mut writer) = mqtt::split(socket, settings.max_packet());
    let Some(Login {
        who,
        client_id,
        keep_alive,
        persistent,
        present,
        will,
        key,
        first,
        _place,
    }) = login(&mut reader, &mut writer, &broker).await?
    else {
        return Ok(());
    };
    let id = routes.next.fetch_add(1, Ordering::Relaxed);
    let kicked = Arc::new(Notify::new());
    let mut attached = routes.attach(&client_id, id, kicked.clone(), persistent);
    let mut me = Session {
        id,
        who,
        client_id,
        persistent,
        outbound: Outbound::new(&mut attached),
        filters: attached.filters,
        awaiting_release: HashSet::new(),
    };
    let client_id = me.client_id.clone();
    let mut pending: Vec<Packet> = first;
    let result: Result<bool, MqttError> = async {
        // What a kept session's client was owed, first (read after taking the session, so
        // nothing queued meanwhile is missed).
        if present {
            let waiting = broker.kept.sessions.waiting(&me.client_id).await.map_err(|e| {
                MqttError::Protocol(format!("cannot read the session's messages: {e}"))
            })?;
            me.outbound.resume(waiting, &mut writer)?;
            flush(&mut writer).await?;
        }
        // While its house owes, the client's publishes wait (critical ones aside).
        let mut throttle = Throttle::default();
        loop {
            if throttle.until().is_none() && pending.iter().any(|p| matches!(p, Packet::Publish(_))) {
                let owes = broker.owes(&me.who);
                if !owes.is_zero() {
                    throttle.pause(owes);
                }
            }
            let packets = throttle.sort(std::mem::take(&mut pending), |p| broker.critical(p));
            if !packets.is_empty() {
                let owed = broker.owed(&me.who, &packets);
                let done = handle(packets, &mut writer, &broker, &mut me, &shutdown).await?;
                flush(&mut writer).await?;
                if done {
                    return Ok(true);
                }
                if !owed.is_zero() {
                    METRICS.mqtt_throttled.add(1);
                    throttle.pause(owed);
                }
            }
            backpressure(intake.gate()).await;
            let until = throttle.until();
            tokio::select! {
                read = reader.packets_within(keep_alive * 3 / 2, settings.packet_timeout), if throttle.may_read() => {
                    pending = read?;
                }
                _ = tokio::time::sleep_until(until.unwrap_or_else(tokio::time::Instant::now)), if until.is_some() => {
                    pending = throttle.resume();
                    reader.resumed();
                }
                message = me.outbound.recv() => match message {
                    Some(first) => {
                        me.outbound.take(first, &mut writer)?;
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
    routes.detach(&client_id, me.id);
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

/// Handle the packets of one read. Their publishes are appended together, kept (retained) and
/// queued for persistent sessions, then acknowledged. Returns true on DISCONNECT.
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
    let mut forward: Vec<Message> = Vec::new();
    let mut replies: Vec<Packet> = Vec::new();
    let (mut added, mut removed): (Vec<(String, QoS)>, Vec<String>) = (Vec::new(), Vec::new());
    let mut settled = Settled::default();
    // Filters this read subscribes to that the session did not hold.
    let mut fresh = 0;
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
                if allowed && !repeat {
                    forward.push(Message {
                        topic: p.topic,
                        payload: p.payload,
                        qos: p.qos,
                    });
                }
            }
            Packet::PubRel(r) => {
                me.awaiting_release.remove(&r.pkid);
                replies.push(Packet::PubComp(PubComp::new(r.pkid)));
            }
            // Acknowledgements of what the client was sent.
            Packet::PubAck(a) => me.outbound.completed(a.pkid, &mut settled),
            Packet::PubRec(r) => me.outbound.received(r.pkid, &mut settled),
            Packet::PubComp(c) => me.outbound.completed(c.pkid, &mut settled),
            Packet::Subscribe(s) => {
                // Each filter is granted (at the QoS asked) if the client may read what it
                // matches, it is at most MAX_FILTER bytes, and the client holds it already or
                // fewer than `mqtt_max_subscriptions`; refused (0x80) otherwise.
                let mut codes = Vec::with_capacity(s.filters.len());
                for f in &s.filters {
                    let held = added.iter().any(|(a, _)| *a == f.path)
                        || routes.holds(&me.client_id, &f.path);
                    let ok = me.who.may(intake.codecs(), &f.path)
                        && f.path.len() <= MAX_FILTER
                        && (held || me.filters + fresh < settings.max_subscriptions);
                    if ok {
                        fresh += usize::from(!held);
                        retained_out.extend(broker.kept.matching(&f.path));
                        added.retain(|(a, _)| *a != f.path);
                        removed.retain(|r| *r != f.path);
                        added.push((f.path.clone(), f.qos));
                        codes.push(SubscribeReasonCode::Success(f.qos));
                    } else {
                        METRICS.mqtt_refused.with("subscription").add(1);
                        codes.push(SubscribeReasonCode::Failure);
                    }
                }
                replies.push(Packet::SubAck(SubAck::new(s.pkid, codes)));
            }
            Packet::Unsubscribe(u) => {
                added.retain(|(a, _)| !u.topics.contains(a));
                removed.extend(u.topics);
                replies.push(Packet::UnsubAck(UnsubAck::new(u.pkid)));
            }
            Packet::PingReq => replies.push(Packet::PingResp),
            Packet::Disconnect => disconnect = true,
            // MQTT 3.1.1 §3.1.0-2: a second CONNECT is a protocol violation.
            Packet::Connect(_) => return Err(MqttError::Protocol("second CONNECT".into())),
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
    // Kept sessions' subscriptions and deliveries, before the SUBACKs and PUBRELs.
    if me.persistent && (!added.is_empty() || !removed.is_empty()) {
        let (a, r) = (added.clone(), removed.clone());
        if let Err(e) = broker
            .kept
            .sessions
            .subscriptions(&me.client_id, a, r)
            .await
        {
            return Err(MqttError::Protocol(format!(
                "cannot keep a subscription: {e}"
            )));
        }
    }
    if !added.is_empty() || !removed.is_empty() {
        me.filters = routes.subscribe(&me.client_id, &added, &removed);
    }
    if me.persistent && !(settled.done.is_empty() && settled.released.is_empty()) {
        let (done, released) = (settled.done.clone(), settled.released.clone());
        let n = done.len();
        if let Err(e) = broker.kept.sessions.delivered(done, released).await {
            return Err(MqttError::Protocol(format!(
                "cannot mark messages delivered: {e}"
            )));
        }
        routes.delivered(&me.client_id, n, settled.bytes);
    }
    // Other sessions' copies (queued for the persistent ones) before the PUBACKs.
    if let Err(e) = broker.relay(&forward).await {
        return Err(MqttError::Protocol(format!(
            "cannot queue a message for a session: {e}"
        )));
    }
    if !forward.is_empty() {
        crate::fault::hit("after_relay");
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
    for pkid in settled.pubrels {
        writer.queue(&PubRel::new(pkid))?;
    }
    for (topic, payload) in retained_out {
        let mut publish = Publish::from_bytes(topic, QoS::AtMostOnce, payload);
        publish.retain = true;
        writer.queue(&publish)?;
    }
    me.outbound.fill(writer)?;
    Ok(disconnect)
}
