//! Ingest: from an MQTT broker to the queue, through the one intake ([`crate::intake`]),
//! acknowledging nothing before it is durably appended.
//!
//! One MQTT session (fixed client id, clean session off, QoS 1) so the broker keeps messages for
//! hearth while it is down. Acknowledgements are manual: a message's PUBACK is sent only after
//! the append holding its events (and dead letter) has returned, and only
//! on the connection the message came on (after a reconnect the broker redelivers it instead).
//! Until then the broker counts the message as in flight and stops sending once its in-flight
//! window is full: that is the backpressure. When the routine lanes are deeper than
//! `queue_high_watermark`, the ingest holds routine messages unacknowledged (the broker keeps the
//! rest) until the depth is back under `queue_low_watermark`; critical messages still pass.
//!
//! Two tasks: the session loop (read and decode publishes, write PUBACKs a batch at a time,
//! keep-alive, reconnect) and the appender (batch, append, hand the PUBACKs back).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    Disconnect, Packet, PingReq, PubAck, Publish, Subscribe, SubscribeReasonCode,
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::alerts::mqtt::AlertFeed;
use crate::backoff::Backoff;
use crate::config::Config;
use crate::intake::{Input, Intake};
use crate::metrics::{self, METRICS};
use crate::mqtt::{self, Endpoint};
use crate::shutdown::Shutdown;

/// One MQTT message, decoded, waiting for its append and then its PUBACK.
struct Message {
    pkid: u16,
    qos: QoS,
    /// The MQTT connection it came on: a PUBACK is only valid on that one.
    generation: u64,
    input: Input,
}

/// PUBACKs to send: (connection generation, packet id).
type Acks = Vec<(u64, u16)>;

/// Run the ingest; `alerts` (the fan-out's pushes) are published back to the broker, retained
/// ([`crate::alerts::mqtt`]).
pub async fn run(
    config: Arc<Config>,
    intake: Arc<Intake>,
    alerts: Option<AlertFeed>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let mut endpoint = Endpoint::parse(&config.mqtt_url, &config.mqtt_client_id)?;
    endpoint.clean_session = false;
    // Decoded messages go to the appender in chunks (one per socket read of up to 64 KiB, some
    // 700 small messages); the bound keeps memory bounded whatever the broker sends (QoS 0
    // floods included): 16 chunks is a few batches ahead, about 10 MB at most. (256 chunks
    // measured 299 MB of peak RSS under saturation.)
    let (tx, rx) = mpsc::channel::<Vec<Message>>(16);
    // The appender took a chunk: a session loop that stopped reading (channel full) reads again.
    let room = Arc::new(tokio::sync::Notify::new());
    // PUBACKs come back unbounded: the appender must never wait on the session loop, which may
    // itself be waiting for the appender to take messages. The broker's in-flight window bounds
    // them in practice.
    let (ack_tx, ack_rx) = mpsc::unbounded_channel::<Acks>();
    let appender = tokio::spawn(append(
        intake.clone(),
        rx,
        room.clone(),
        ack_tx,
        config.batch_size,
        shutdown.clone(),
    ));
    info!(url = %config.mqtt_url, client_id = %config.mqtt_client_id, "ingest started");
    session(&endpoint, tx, &room, ack_rx, &intake, alerts, shutdown).await;
    if let Err(e) = appender.await {
        warn!(error = %e, "appender ended abnormally");
    }
    info!("ingest stopped");
    Ok(())
}

/// Hold the MQTT session: connect (again), subscribe, read and decode publishes, write the
/// PUBACKs the appender hands back. On shutdown, stop reading, send the last PUBACKs, then
/// DISCONNECT so the broker keeps the session for the next start.
async fn session(
    endpoint: &Endpoint,
    tx: mpsc::Sender<Vec<Message>>,
    room: &tokio::sync::Notify,
    mut acks: mpsc::UnboundedReceiver<Acks>,
    intake: &Intake,
    mut alerts: Option<AlertFeed>,
    mut shutdown: Shutdown,
) {
    let mut next_publish: u16 = 0;
    let mut tx = Some(tx);
    let mut generation = 0u64;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let (mut reader, mut writer, present) = match mqtt::connect(endpoint).await {
            Ok(c) => c,
            Err(e) => {
                metrics::dependency_error("mqtt");
                if backoff.attempts() <= 1 || backoff.attempts().is_multiple_of(20) {
                    warn!(error = %e, "broker connection failed, reconnecting");
                }
                if tx.is_none() || !shutdown.sleep(backoff.next_delay()).await {
                    return;
                }
                continue;
            }
        };
        backoff.reset();
        generation += 1;
        info!(session_present = present, generation, "connected to broker");
        let topics = intake.codecs().subscriptions();
        let mut subscribe = Subscribe::new_many(topics.iter().map(|t| {
            rumqttc::mqttbytes::v4::SubscribeFilter::new(t.to_string(), QoS::AtLeastOnce)
        }));
        subscribe.pkid = 1;
        // The broker's own drop counter, where it has one: upstream loss hearth can see.
        subscribe
            .filters
            .push(rumqttc::mqttbytes::v4::SubscribeFilter::new(
                BROKER_DROPPED.to_string(),
                QoS::AtMostOnce,
            ));
        let mut ping = tokio::time::interval(endpoint.keep_alive / 2);
        ping.tick().await;
        let mut last_heard = Instant::now();
        let mut next_subscription: u16 = 1;
        let result: Result<(), mqtt::MqttError> = async {
            writer.queue(&subscribe)?;
            // The recent alerts' state, in case a transition happened while disconnected.
            if let Some(feed) = &alerts {
                for (topic, payload) in feed.recent().await {
                    next_publish = next_publish.wrapping_add(1).max(1);
                    writer.queue(&alert_publish(topic, payload, next_publish))?;
                }
            }
            writer.flush().await?;
            loop {
                tokio::select! {
                    batch = acks.recv() => {
                        let Some(batch) = batch else {
                            // The appender is done: everything it took is acknowledged.
                            writer.queue(&Disconnect)?;
                            writer.flush().await?;
                            return Ok(());
                        };
                        let mut batches = vec![batch];
                        while let Ok(more) = acks.try_recv() {
                            batches.push(more);
                        }
                        for (g, pkid) in batches.into_iter().flatten() {
                            if g == generation {
                                writer.queue(&PubAck::new(pkid))?;
                            }
                        }
                        writer.flush().await?;
                    }
                    // Read only while the appender has room: when it is full (backpressure),
                    // the socket is left unread and TCP holds the broker back.
                    packets = reader.packets(), if tx.as_ref().is_some_and(|t| t.capacity() > 0) => {
                        last_heard = Instant::now();
                        let mut messages = Vec::new();
                        for packet in packets? {
                            match packet {
                                Packet::Publish(p) if p.topic.starts_with("$SYS/") => broker_stat(&p),
                                Packet::Publish(p) => messages.push(Message {
                                    pkid: p.pkid,
                                    qos: p.qos,
                                    generation,
                                    input: intake.decode(&p.topic, &p.payload, crate::event::now_us()),
                                }),
                                Packet::SubAck(ack) => subscribed(&ack.return_codes, &topics),
                                _ => {}
                            }
                        }
                        if !messages.is_empty()
                            && let Some(sender) = &tx
                            && sender.send(messages).await.is_err()
                        {
                            tx = None;
                        }
                    }
                    _ = room.notified(), if tx.as_ref().is_some_and(|t| t.capacity() == 0) => {}
                    // Alert transitions, to the home's automations (retained, QoS 1; one missed
                    // while the connection is down is made up by the next transition).
                    pushed = crate::alerts::mqtt::next(&mut alerts), if alerts.is_some() => {
                        match pushed.as_deref().and_then(crate::alerts::mqtt::alert_of) {
                            Some(alert) => {
                                for (topic, payload) in crate::alerts::mqtt::messages(&alert) {
                                    next_publish = next_publish.wrapping_add(1).max(1);
                                    writer.queue(&alert_publish(topic, payload, next_publish))?;
                                }
                                writer.flush().await?;
                            }
                            None if pushed.is_none() => alerts = None,
                            None => {}
                        }
                    }
                    // Entities discovered on topics no subscription brings yet.
                    _ = intake.codecs().discovery.changed.notified() => {
                        let codecs = intake.codecs();
                        let fresh: Vec<String> = codecs
                            .discovery
                            .take_new_topics()
                            .into_iter()
                            .filter(|t| codecs.needs_subscription(t))
                            .collect();
                        if !fresh.is_empty() {
                            next_subscription = next_subscription.wrapping_add(1).max(2);
                            let mut more = Subscribe::new_many(fresh.iter().map(|t| {
                                rumqttc::mqttbytes::v4::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce)
                            }));
                            more.pkid = next_subscription;
                            writer.queue(&more)?;
                            writer.flush().await?;
                            info!(topics = ?fresh, "subscribed to discovered entities");
                        }
                    }
                    _ = ping.tick() => {
                        if tx.as_ref().is_some_and(|t| t.capacity() == 0) {
                            // Not reading: silence from the broker says nothing.
                            last_heard = Instant::now();
                        }
                        if tx.is_some() && last_heard.elapsed() > endpoint.keep_alive * 2 {
                            return Err(mqtt::MqttError::Closed);
                        }
                        writer.queue(&PingReq)?;
                        writer.flush().await?;
                    }
                    _ = shutdown.wait(), if tx.is_some() => {
                        // Stop taking messages; the appender drains what it has, then the acks
                        // channel closes.
                        tx = None;
                    }
                }
            }
        }
        .await;
        match result {
            Ok(()) => return,
            Err(e) => {
                metrics::dependency_error("mqtt");
                warn!(error = %e, generation, "broker connection lost, reconnecting");
                if tx.is_none() {
                    // Shutting down: what was not acknowledged is redelivered next session.
                    return;
                }
            }
        }
    }
}

/// Mosquitto's count of messages dropped for queue or in-flight limits, since it started.
const BROKER_DROPPED: &str = "$SYS/broker/publish/messages/dropped";

fn broker_stat(p: &rumqttc::mqttbytes::v4::Publish) {
    let Some(n) = std::str::from_utf8(&p.payload)
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
    else {
        return;
    };
    if p.topic == BROKER_DROPPED {
        if n > METRICS.broker_dropped.get() {
            warn!(dropped = n, "the broker reports dropped messages");
        }
        METRICS.broker_dropped.set(n);
    }
}

/// An alert's message to the broker: QoS 1, retained.
fn alert_publish(topic: String, payload: Vec<u8>, pkid: u16) -> Publish {
    let mut publish = Publish::new(topic, QoS::AtLeastOnce, payload);
    publish.retain = true;
    publish.pkid = pkid;
    publish
}

fn subscribed(codes: &[SubscribeReasonCode], topics: &[String]) {
    // The event filters come first; the broker's $SYS counter, which a broker may refuse, last.
    let events = &codes[..codes.len().min(topics.len())];
    if events
        .iter()
        .any(|c| matches!(c, SubscribeReasonCode::Failure))
    {
        warn!(codes = ?codes, "broker refused a subscription (ACL?)");
    } else {
        info!(?topics, "subscribed");
    }
}

/// Routine messages held back at most, in batches (`batch_size` messages each).
const HELD_BATCHES: usize = 10;

/// Batch messages, XADD them, then hand their PUBACKs to the session loop. Ends when the session
/// loop stops sending and everything received has been appended (or on shutdown while Redis is
/// unreachable: the broker redelivers what was not acknowledged).
async fn append(
    intake: Arc<Intake>,
    mut rx: mpsc::Receiver<Vec<Message>>,
    room: Arc<tokio::sync::Notify>,
    acks: mpsc::UnboundedSender<Acks>,
    batch_size: usize,
    shutdown: Shutdown,
) {
    let pressure = intake.gate();
    let mut held: VecDeque<Message> = VecDeque::new();
    // Held messages are bounded here, not by the broker's in-flight window (Mosquitto was
    // measured sending 44,000 unacknowledged QoS 1 messages with `max_inflight_messages 1000`):
    // past `max_held` the appender stops taking messages, the channel fills, the session stops
    // reading the socket, and TCP makes the broker queue the rest.
    let max_held = batch_size * HELD_BATCHES;
    loop {
        let mut batch: Vec<Message> = Vec::with_capacity(batch_size);
        let taking = held.len() < max_held;
        let releasing = !held.is_empty() && !pressure.is_closed();
        tokio::select! {
            chunk = rx.recv(), if taking => match chunk {
                Some(chunk) => batch.extend(chunk),
                None => return,
            },
            _ = pressure.changed.notified(), if !held.is_empty() => {}
            _ = std::future::ready(()), if releasing => {}
        }
        while batch.len() < batch_size && taking {
            match rx.try_recv() {
                Ok(chunk) => batch.extend(chunk),
                Err(_) => break,
            }
        }
        room.notify_one();
        // Held messages go out one batch at a time, oldest first, so that the depth is checked
        // again between batches; routine messages wait behind them to keep their order.
        let paused = pressure.is_closed();
        let mut ready: Vec<Message> = Vec::new();
        if !paused {
            ready.extend(held.drain(..held.len().min(batch_size)));
        }
        for m in batch {
            if (paused || !held.is_empty()) && !m.input.is_critical() {
                held.push_back(m);
            } else {
                ready.push(m);
            }
        }
        // One batch at a time, the gate checked before each: once it closes, the routine
        // messages not yet appended go back to the front of the held ones, in order, so a
        // burst runs at most one batch past the high watermark.
        let mut ready: VecDeque<Message> = ready.into();
        let mut back: Vec<Message> = Vec::new();
        while !ready.is_empty() {
            let mut chunk: Vec<Message> = Vec::with_capacity(batch_size);
            while chunk.len() < batch_size
                && let Some(m) = ready.pop_front()
            {
                if intake.holds(&m.input) {
                    back.push(m);
                } else {
                    chunk.push(m);
                }
            }
            if chunk.is_empty() {
                continue;
            }
            let inputs: Vec<&Input> = chunk.iter().map(|m| &m.input).collect();
            if !intake.append_until_done(&inputs, &shutdown).await {
                return;
            }
            let pkids: Acks = chunk
                .iter()
                .filter(|m| m.qos != QoS::AtMostOnce)
                .map(|m| (m.generation, m.pkid))
                .collect();
            if !pkids.is_empty() && acks.send(pkids).is_err() {
                return;
            }
        }
        for m in back.into_iter().rev() {
            held.push_front(m);
        }
    }
}
