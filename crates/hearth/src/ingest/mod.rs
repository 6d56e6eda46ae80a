//! Ingest: from the MQTT broker to the lanes, acknowledging nothing before it is in Redis.
//!
//! One MQTT session (fixed client id, clean session off, QoS 1) so the broker keeps messages for
//! hearth while it is down. Acknowledgements are manual: a message's PUBACK is sent only after
//! the XADD pipeline holding its events (and dead letters) has been answered by Redis. Until then
//! the broker counts the message as in flight and redelivers it if the session breaks, and stops
//! sending once its in-flight window is full: that is the backpressure. When the routine lanes
//! are deeper than `queue_high_watermark`, the ingest holds routine messages unacknowledged (the
//! broker keeps the rest) until the depth is back under `queue_low_watermark`; critical messages
//! still pass.
//!
//! Tasks: the MQTT loop (poll, decode), the appender (batch, XADD, PUBACK) and the depth watch.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{Notify, mpsc};
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::codec::{self, Limits};
use crate::config::Config;
use crate::queue::{DeadLetter, Lane, Queue};
use crate::shutdown::Shutdown;

/// The largest MQTT packet hearth accepts from the broker. It is the protocol's own maximum, so
/// that an oversize payload is read and dead-lettered, never a reason for the connection to fail
/// (which would make the broker redeliver it forever). The broker's `max_packet_size` is the
/// real bound.
const MAX_INCOMING_PACKET: usize = 256 * 1024 * 1024;

const ACK_CHANNEL: usize = 1 << 20;

/// One MQTT message, decoded, waiting for its XADD and then its PUBACK.
struct Message {
    ack: Ack,
    /// The MQTT connection it came on: a PUBACK is only valid on that one.
    generation: u64,
    events: Vec<crate::event::Event>,
    dead: Vec<DeadLetter>,
}

#[derive(Clone, Copy)]
struct Ack {
    qos: QoS,
    pkid: u16,
}

impl Message {
    /// Only critical events (and maybe rejections): may pass while routine traffic is held.
    fn critical_only(&self) -> bool {
        !self.events.is_empty() && self.events.iter().all(|e| e.is_critical())
    }
}

/// Parse `mqtt://[user[:password]@]host[:port]`.
pub fn mqtt_options(url: &str, client_id: &str) -> anyhow::Result<MqttOptions> {
    let rest = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
        .ok_or_else(|| anyhow::anyhow!("mqtt_url must start with mqtt://, got {url:?}"))?;
    let rest = rest.trim_end_matches('/');
    let (creds, hostport) = match rest.rsplit_once('@') {
        Some((c, h)) => (Some(c), h),
        None => (None, rest),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| anyhow::anyhow!("bad port in mqtt_url {url:?}"))?,
        ),
        None => (hostport, 1883),
    };
    let mut opts = MqttOptions::new(client_id, host.trim_matches(['[', ']']), port);
    if let Some(c) = creds {
        let (user, pass) = c.split_once(':').unwrap_or((c, ""));
        opts.set_credentials(user, pass);
    }
    Ok(opts)
}

pub async fn run(config: Arc<Config>, shutdown: Shutdown) -> anyhow::Result<()> {
    let queue = Queue::open(&config.redis_url, &config.redis_prefix, config.shards)?;
    let mut opts = mqtt_options(&config.mqtt_url, &config.mqtt_client_id)?;
    opts.set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(MAX_INCOMING_PACKET, 64 * 1024);
    // PUBACKs travel to the MQTT loop through this channel, which the loop drains one per poll
    // while it reads publishes ten at a time. The appender must never wait on it: the MQTT loop
    // may itself be waiting for the appender to take decoded messages. Its size is a bound, not
    // an allocation; the broker's in-flight window keeps the real number of acks far below it.
    let (client, eventloop) = AsyncClient::new(opts, ACK_CHANNEL);

    let pressure = Arc::new(Pressure::new(
        config.queue_high_watermark,
        config.queue_low_watermark,
    ));
    let watcher = tokio::spawn(watch_depth(
        queue.clone(),
        pressure.clone(),
        shutdown.clone(),
    ));
    let (tx, rx) = mpsc::channel::<Message>(config.batch_size * 4);
    let generation = Arc::new(AtomicU64::new(0));
    let appender = tokio::spawn(append(
        queue,
        client.clone(),
        rx,
        generation.clone(),
        pressure,
        config.batch_size,
        shutdown.clone(),
    ));
    let limits = Limits {
        max_payload_bytes: config.max_payload_bytes,
        max_future_skew_ms: (config.max_future_skew_secs * 1000) as i64,
    };
    info!(url = %config.mqtt_url, client_id = %config.mqtt_client_id, "ingest started");
    let mut eventloop = eventloop;
    mqtt_loop(&mut eventloop, &client, tx, &generation, &limits, shutdown).await;

    // Flush what was decoded, then say goodbye so the broker keeps the session for us.
    if let Err(e) = appender.await {
        warn!(error = %e, "appender ended abnormally");
    }
    watcher.abort();
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    info!("ingest stopped");
    Ok(())
}

async fn mqtt_loop(
    eventloop: &mut EventLoop,
    client: &AsyncClient,
    tx: mpsc::Sender<Message>,
    generation: &AtomicU64,
    limits: &Limits,
    mut shutdown: Shutdown,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let polled = tokio::select! {
            polled = eventloop.poll() => polled,
            _ = shutdown.wait() => return,
        };
        match polled {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                let generation = generation.fetch_add(1, Ordering::SeqCst) + 1;
                info!(
                    session_present = ack.session_present,
                    generation, "connected to broker"
                );
                backoff.reset();
                let filters = codec::SUBSCRIPTIONS
                    .iter()
                    .map(|t| rumqttc::SubscribeFilter::new(t.to_string(), QoS::AtLeastOnce));
                if let Err(e) = client.try_subscribe_many(filters) {
                    warn!(error = %e, "cannot queue the subscription");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                {
                    warn!(codes = ?ack.return_codes, "broker refused a subscription (ACL?)");
                } else {
                    info!(topics = ?codec::SUBSCRIPTIONS, "subscribed");
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let received_us = crate::event::now_us();
                let decoded = codec::decode(&p.topic, &p.payload, received_us, limits);
                let dead = decoded
                    .rejections
                    .iter()
                    .map(|r| {
                        DeadLetter::from_rejection(r, &p.topic, &p.payload, received_us / 1000)
                    })
                    .collect();
                for r in &decoded.rejections {
                    info!(topic = %codec::truncate(&p.topic, 128), reason = r.reason.as_str(), detail = %r.detail, "rejected");
                }
                let msg = Message {
                    ack: Ack {
                        qos: p.qos,
                        pkid: p.pkid,
                    },
                    generation: generation.load(Ordering::SeqCst),
                    events: decoded.events,
                    dead,
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                let delay = backoff.next_delay();
                if backoff.attempts() <= 1 || backoff.attempts() % 20 == 0 {
                    warn!(error = %e, "broker connection failed, reconnecting");
                }
                if !shutdown.sleep(delay).await {
                    return;
                }
            }
        }
    }
}

/// Batch messages, XADD them, then PUBACK them. Ends when the MQTT loop is gone and everything
/// received has been appended (or on shutdown while Redis is unreachable: the broker redelivers
/// what was not acknowledged).
async fn append(
    queue: Queue,
    client: AsyncClient,
    mut rx: mpsc::Receiver<Message>,
    generation: Arc<AtomicU64>,
    pressure: Arc<Pressure>,
    batch_size: usize,
    shutdown: Shutdown,
) {
    let mut held: VecDeque<Message> = VecDeque::new();
    loop {
        let mut batch = Vec::with_capacity(batch_size);
        tokio::select! {
            m = rx.recv() => match m {
                Some(m) => batch.push(m),
                None => return,
            },
            _ = pressure.changed.notified(), if !held.is_empty() => {}
        }
        while batch.len() < batch_size {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let paused = pressure.is_paused();
        let mut ready: Vec<Message> = Vec::new();
        if !paused {
            ready.extend(held.drain(..));
        }
        for m in batch {
            if paused && !m.critical_only() {
                held.push_back(m);
            } else {
                ready.push(m);
            }
        }
        for chunk in ready.chunks(batch_size) {
            if !append_chunk(&queue, chunk, &shutdown).await {
                return;
            }
            let routine = chunk
                .iter()
                .flat_map(|m| &m.events)
                .filter(|e| !e.is_critical())
                .count();
            pressure.appended(routine as u64);
            let current = generation.load(Ordering::SeqCst);
            for m in chunk.iter().filter(|m| m.generation == current) {
                let mut p = rumqttc::Publish::new("", m.ack.qos, Vec::new());
                p.pkid = m.ack.pkid;
                if client.ack(&p).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// XADD one chunk, retrying until Redis answers. Returns false on shutdown.
async fn append_chunk(queue: &Queue, chunk: &[Message], shutdown: &Shutdown) -> bool {
    let events: Vec<crate::event::Event> = chunk
        .iter()
        .flat_map(|m| m.events.iter().cloned())
        .collect();
    let dead: Vec<DeadLetter> = chunk.iter().flat_map(|m| m.dead.iter().cloned()).collect();
    let mut backoff = Backoff::default();
    loop {
        match queue.append(&events, &dead).await {
            Ok(()) => return true,
            Err(e) => {
                if backoff.attempts() % 20 == 0 {
                    warn!(error = %e, events = events.len(), "append to redis failed, retrying (nothing acknowledged)");
                }
                if !shutdown.clone().sleep(backoff.next_delay()).await {
                    return false;
                }
            }
        }
    }
}

/// The routine queue depth as the ingest sees it, and whether it holds routine messages back.
/// Measured every 200 ms, and counted up by the appender in between, so that a fast burst cannot
/// run more than one batch past the high watermark before the next measurement.
struct Pressure {
    depth: AtomicU64,
    paused: AtomicBool,
    high: u64,
    low: u64,
    changed: Notify,
}

impl Pressure {
    fn new(high: u64, low: u64) -> Self {
        Pressure {
            depth: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            high,
            low,
            changed: Notify::new(),
        }
    }

    fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    fn appended(&self, n: u64) {
        self.depth.fetch_add(n, Ordering::SeqCst);
        self.evaluate();
    }

    fn measured(&self, depth: u64) {
        self.depth.store(depth, Ordering::SeqCst);
        self.evaluate();
        self.changed.notify_waiters();
    }

    /// Hysteresis: pause at `high`, resume at `low`.
    fn evaluate(&self) {
        let depth = self.depth.load(Ordering::SeqCst);
        if !self.is_paused() && depth >= self.high {
            warn!(
                depth,
                high = self.high,
                "queue deep: holding routine messages at the broker"
            );
            self.paused.store(true, Ordering::SeqCst);
        } else if self.is_paused() && depth <= self.low {
            info!(
                depth,
                low = self.low,
                "queue drained: taking routine messages again"
            );
            self.paused.store(false, Ordering::SeqCst);
        }
    }
}

/// Measure the routine depth every 200 ms.
async fn watch_depth(queue: Queue, pressure: Arc<Pressure>, mut shutdown: Shutdown) {
    loop {
        if !shutdown.sleep(Duration::from_millis(200)).await {
            return;
        }
        if let Ok(depths) = queue.depths().await {
            let routine = depths
                .iter()
                .filter(|(l, _)| *l != Lane::Critical)
                .map(|(_, n)| n)
                .sum();
            pressure.measured(routine);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_urls() {
        let o = mqtt_options("mqtt://127.0.0.1:1884", "id").unwrap();
        assert_eq!(o.broker_address(), ("127.0.0.1".to_string(), 1884));
        let o = mqtt_options("mqtt://u:p@broker", "id").unwrap();
        assert_eq!(o.broker_address(), ("broker".to_string(), 1883));
        let login = o.credentials().unwrap();
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("u", "p")
        );
        assert!(mqtt_options("http://x", "id").is_err());
        assert!(mqtt_options("mqtt://x:notaport", "id").is_err());
    }
}
