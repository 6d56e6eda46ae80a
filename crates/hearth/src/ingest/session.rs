//! One slot's MQTT session: connect (again), subscribe, read and decode publishes, write the
//! PUBACKs the appender hands back, publish the alerts (slot 0 of a broker). On stop (the slot
//! handed over) or shutdown, stop reading, send the PUBACKs of what was taken, then DISCONNECT so
//! that the broker keeps the session for the next holder.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    Disconnect, Packet, PingReq, PubAck, Publish, Subscribe, SubscribeFilter, SubscribeReasonCode,
};
use tokio::sync::{OwnedMutexGuard, mpsc, watch};
use tracing::{info, warn};

use super::{Message, Router};
use crate::alerts::mqtt::AlertFeed;
use crate::backoff::Backoff;
use crate::intake::Intake;
use crate::metrics::{self, METRICS};
use crate::mqtt::{self, Endpoint};
use crate::shutdown::Shutdown;

/// The share group of the ingest's subscriptions when slots are shared.
pub const SHARE_GROUP: &str = "$share/hearth/";

/// Longest a stopping session waits for the PUBACKs of what it took.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Connections made by this process, so that a PUBACK never goes out on a later connection than
/// its message came on (the broker redelivers it there instead).
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// What one session is.
pub struct Spec {
    pub slot: u32,
    pub endpoint: Endpoint,
    /// Subscribe through [`SHARE_GROUP`].
    pub shared: bool,
    /// The alerts this session publishes to its broker (slot 0 of each broker).
    pub feed: Option<Arc<tokio::sync::Mutex<Option<AlertFeed>>>>,
}

impl Spec {
    fn filter(&self, topic: &str) -> String {
        if self.shared {
            format!("{SHARE_GROUP}{topic}")
        } else {
            topic.to_string()
        }
    }
}

/// Hold the session until `stop` or shutdown.
pub async fn run(
    spec: Spec,
    tx: mpsc::Sender<Vec<Message>>,
    router: Arc<Router>,
    intake: Arc<Intake>,
    mut topics_changed: watch::Receiver<u64>,
    mut stop: watch::Receiver<bool>,
    mut shutdown: Shutdown,
) {
    let (mut acks, room) = router.join(spec.slot);
    let mut feed: Option<OwnedMutexGuard<Option<AlertFeed>>> = match &spec.feed {
        Some(f) => Some(f.clone().lock_owned().await),
        None => None,
    };
    let mut no_feed: Option<AlertFeed> = None;
    let mut next_publish: u16 = 0;
    let mut tx = Some(tx);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let endpoint = &spec.endpoint;
    if spec.shared && spec.feed.is_some() {
        // A shared subscription brings no retained message: read them once, apart.
        super::retained::snapshot(endpoint, &intake, spec.slot, tx.as_ref()).await;
    }
    loop {
        if *stop.borrow() {
            break;
        }
        let (mut reader, mut writer, present) = match mqtt::connect(endpoint).await {
            Ok(c) => c,
            Err(e) => {
                metrics::dependency_error("mqtt");
                if backoff.attempts() <= 1 || backoff.attempts().is_multiple_of(20) {
                    warn!(error = %e, slot = spec.slot, "broker connection failed, reconnecting");
                }
                if tx.is_none() || !shutdown.sleep(backoff.next_delay()).await {
                    break;
                }
                continue;
            }
        };
        backoff.reset();
        let generation = GENERATION.fetch_add(1, Ordering::Relaxed) + 1;
        let mut outstanding: usize = 0;
        let mut stopping_since: Option<Instant> = None;
        info!(session_present = present, slot = spec.slot, client_id = %endpoint.client_id, "connected to broker");
        let topics = intake.codecs().subscriptions();
        let mut subscribed: BTreeSet<String> = topics.iter().cloned().collect();
        let mut subscribe = Subscribe::new_many(
            topics
                .iter()
                .map(|t| SubscribeFilter::new(spec.filter(t), QoS::AtLeastOnce)),
        );
        subscribe.pkid = 1;
        // The broker's own drop counter, where it has one: upstream loss hearth can see.
        subscribe.filters.push(SubscribeFilter::new(
            BROKER_DROPPED.to_string(),
            QoS::AtMostOnce,
        ));
        let mut ping = tokio::time::interval(endpoint.keep_alive / 2);
        ping.tick().await;
        let mut last_heard = Instant::now();
        let mut next_subscription: u16 = 1;
        let alerts: &mut Option<AlertFeed> = match feed.as_mut() {
            Some(g) => g,
            None => &mut no_feed,
        };
        let result: Result<bool, mqtt::MqttError> = async {
            writer.queue(&subscribe)?;
            // The recent alerts' state, in case a transition happened while disconnected.
            if let Some(f) = alerts.as_ref() {
                for (topic, payload) in f.recent().await {
                    next_publish = next_publish.wrapping_add(1).max(1);
                    writer.queue(&alert_publish(topic, payload, next_publish))?;
                }
            }
            writer.flush().await?;
            let mut grace = tokio::time::interval(Duration::from_millis(100));
            loop {
                if tx.is_none() && outstanding == 0 {
                    // Stopping, and everything taken is acknowledged.
                    writer.queue(&Disconnect)?;
                    writer.flush().await?;
                    return Ok(true);
                }
                tokio::select! {
                    batch = acks.recv() => {
                        let Some(batch) = batch else {
                            // The appender is done: what it took is acknowledged or redelivered.
                            writer.queue(&Disconnect)?;
                            writer.flush().await?;
                            return Ok(true);
                        };
                        let mut batches = vec![batch];
                        while let Ok(more) = acks.try_recv() {
                            batches.push(more);
                        }
                        for (g, pkid) in batches.into_iter().flatten() {
                            if g == generation {
                                writer.queue(&PubAck::new(pkid))?;
                                outstanding = outstanding.saturating_sub(1);
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
                                Packet::Publish(p) => {
                                    if p.qos != QoS::AtMostOnce {
                                        outstanding += 1;
                                    }
                                    messages.push(Message::new(
                                        spec.slot,
                                        generation,
                                        p.pkid,
                                        p.qos,
                                        intake.decode(&p.topic, &p.payload, crate::event::now_us()),
                                    ));
                                }
                                Packet::SubAck(ack) => subscribed_ok(&ack.return_codes, &topics),
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
                    pushed = crate::alerts::mqtt::next(alerts), if alerts.is_some() => {
                        let Some(pushed) = pushed else {
                            *alerts = None;
                            continue;
                        };
                        let messages = crate::alerts::mqtt::to_publish(alerts.as_ref(), &pushed).await;
                        if !messages.is_empty() {
                            for (topic, payload) in messages {
                                next_publish = next_publish.wrapping_add(1).max(1);
                                writer.queue(&alert_publish(topic, payload, next_publish))?;
                            }
                            writer.flush().await?;
                        }
                    }
                    // Entities discovered on topics no subscription brings yet.
                    _ = topics_changed.changed() => {
                        let codecs = intake.codecs();
                        let fresh: Vec<String> = codecs
                            .subscriptions()
                            .into_iter()
                            .filter(|t| !subscribed.contains(t))
                            .collect();
                        if !fresh.is_empty() {
                            next_subscription = next_subscription.wrapping_add(1).max(2);
                            let mut more = Subscribe::new_many(fresh.iter().map(|t| {
                                SubscribeFilter::new(spec.filter(t), QoS::AtLeastOnce)
                            }));
                            more.pkid = next_subscription;
                            writer.queue(&more)?;
                            writer.flush().await?;
                            info!(topics = ?fresh, slot = spec.slot, "subscribed to discovered entities");
                            subscribed.extend(fresh);
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
                    _ = grace.tick(), if stopping_since.is_some() => {
                        if stopping_since.is_some_and(|s| s.elapsed() > STOP_GRACE) {
                            warn!(slot = spec.slot, outstanding, "stopping without every PUBACK: the broker redelivers the rest");
                            writer.queue(&Disconnect)?;
                            writer.flush().await?;
                            return Ok(true);
                        }
                    }
                    _ = stop.changed(), if tx.is_some() => {
                        if *stop.borrow() {
                            tx = None;
                            stopping_since = Some(Instant::now());
                        }
                    }
                    _ = shutdown.wait(), if tx.is_some() => {
                        // Stop taking messages; the appender appends what it has.
                        tx = None;
                        stopping_since = Some(Instant::now());
                    }
                }
            }
        }
        .await;
        match result {
            Ok(_) => break,
            Err(e) => {
                metrics::dependency_error("mqtt");
                warn!(error = %e, slot = spec.slot, generation, "broker connection lost, reconnecting");
                if tx.is_none() {
                    // Stopping: what was not acknowledged is redelivered to the next holder.
                    break;
                }
            }
        }
    }
    router.leave(spec.slot);
    info!(slot = spec.slot, "session ended");
}

/// Mosquitto's count of messages dropped for queue or in-flight limits, since it started.
pub const BROKER_DROPPED: &str = "$SYS/broker/publish/messages/dropped";

fn broker_stat(p: &Publish) {
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

fn subscribed_ok(codes: &[SubscribeReasonCode], topics: &[String]) {
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
