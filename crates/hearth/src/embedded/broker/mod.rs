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
//! the dead letters, with its reason); every message is also forwarded to the clients subscribed
//! to a matching filter (`+` and `#` wildcards; at the lower of its QoS and the highest their
//! matching filters were granted: [`outbound`]), so `mosquitto_sub`, Home Assistant or
//! Node-RED work as with any broker. Retained messages and wills are kept in the data folder
//! ([`super::kept`]): discovery and availability rest on them. A client that sends no client id
//! gets one (with a clean session only). A client with clean session off keeps its session
//! ([`super::sessions`]): its subscriptions, and the QoS 1 and 2 messages for it, queued while
//! it is away and re-sent when it comes back until it acknowledges them, across restarts.
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
//! Every way in is bounded: connections (`mqtt_max_connections`, and
//! `mqtt_connections_per_house` of one house's clients), the time to CONNECT and to
//! finish a packet begun (`mqtt_packet_timeout_ms`), silence (the client's keep-alive, at most
//! `mqtt_max_keep_alive_secs`, and that when it asks for none), packet size, subscription filters
//! per client (`mqtt_max_subscriptions`), what a subscriber that does not read may have
//! waiting, in bytes (`mqtt_subscriber_buffer_bytes`), and persistent sessions: how many
//! (`mqtt_max_sessions`) and what each may have queued (`mqtt_max_queued_messages`,
//! `mqtt_max_queued_bytes`; past them a message is not queued for it, and counted as
//! `hearth_mqtt_refused_total{reason="session_full"}`), and each house's publishes, all its
//! clients together (`mqtt_publishes_per_second` after `mqtt_publish_burst`): past that rate
//! the broker holds the publishes of the house's clients for as long as it owes, at most one
//! burst's worth ([`throttle`]; counted in `hearth_mqtt_throttled_total`), so they wait for
//! their PUBACKs and TCP slows them down; nothing is refused. Critical readings (a smoke alarm)
//! are never held.

mod outbound;
mod session;
mod throttle;

use super::topics::{Message, Routes};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use super::kept::{Kept, Left};
use crate::auth::{Authenticator, Principal};
use crate::codec::{self, Codecs, Limits};
use crate::intake::{Gate, Intake};
use crate::metrics::METRICS;
use crate::mqtt::{self, MqttError};
use crate::rate::{Buckets, Full, Place, Places, Rate};
use crate::seam::Unavailable;
use crate::shutdown::Shutdown;

/// Room for the topic and the packet's other fields beside the largest payload accepted: a
/// payload over `max_payload_bytes` is still dead-lettered with its size up to this much more;
/// a larger packet ends the connection.
const PACKET_OVERHEAD: usize = 64 * 1024;

/// The largest message relayed whatever `max_payload_bytes`: the bridges' own state is bigger
/// than any reading (Zigbee2MQTT's retained `bridge/devices` lists every device with its
/// definition, some 4 KiB each), and Home Assistant and the bridge's frontend read it here.
const MIN_RELAYED: usize = 1024 * 1024;

/// Where the broker accepts clients: `mqtt_listen` (plain), `mqtt_tls_listen` (TLS), or both.
pub struct Listeners {
    plain: Option<TcpListener>,
    tls: Option<(TcpListener, crate::tls::TlsAcceptor)>,
}

impl Listeners {
    /// Bind the configured addresses (an empty one is not listened on).
    pub async fn bind(config: &crate::config::Config) -> anyhow::Result<Listeners> {
        let plain = match config.mqtt_listen.as_str() {
            "" => None,
            addr => Some(bind(addr).await?),
        };
        let tls = match config.mqtt_tls_listen.as_str() {
            "" => None,
            addr => {
                let acceptor =
                    crate::tls::acceptor(&config.mqtt_tls_cert, &config.mqtt_tls_key, &[b"mqtt"])
                        .map_err(|e| anyhow::anyhow!("mqtt_tls_cert: {e}"))?
                        .ok_or_else(|| anyhow::anyhow!("mqtt_tls_listen needs mqtt_tls_cert"))?;
                Some((bind(addr).await?, acceptor))
            }
        };
        Ok(Listeners { plain, tls })
    }

    /// The next client, and whether it came through the TLS listener (its handshake is still
    /// to do, in the client's own task).
    async fn accept(
        &self,
    ) -> std::io::Result<(
        TcpStream,
        std::net::SocketAddr,
        Option<crate::tls::TlsAcceptor>,
    )> {
        let plain = async {
            match &self.plain {
                Some(l) => l.accept().await,
                None => std::future::pending().await,
            }
        };
        let tls = async {
            match &self.tls {
                Some((l, acceptor)) => l.accept().await.map(|a| (a, acceptor.clone())),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            a = plain => a.map(|(s, peer)| (s, peer, None)),
            a = tls => a.map(|((s, peer), acceptor)| (s, peer, Some(acceptor))),
        }
    }
}

/// Bind a broker's address, with an error that says what to do when it is taken.
async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
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
    pub connections_per_house: usize,
    pub max_keep_alive: Duration,
    pub packet_timeout: Duration,
    pub max_subscriptions: usize,
    /// Each house's publishes, all its clients together.
    pub publishes: Rate,
    pub subscriber_buffer_bytes: usize,
    /// Persistent sessions kept; messages and bytes waiting in each.
    pub max_sessions: usize,
    pub max_queued_messages: usize,
    pub max_queued_bytes: usize,
}

impl Settings {
    pub fn from_config(config: &crate::config::Config) -> Settings {
        Settings {
            limits: Limits::from_config(config),
            allow_anonymous: config.mqtt_allow_anonymous,
            max_connections: config.mqtt_max_connections,
            connections_per_house: config.mqtt_connections_per_house,
            max_keep_alive: Duration::from_secs(config.mqtt_max_keep_alive_secs),
            packet_timeout: Duration::from_millis(config.mqtt_packet_timeout_ms),
            max_subscriptions: config.mqtt_max_subscriptions,
            publishes: Rate {
                per_second: config.mqtt_publishes_per_second,
                burst: config.mqtt_publish_burst,
            },
            subscriber_buffer_bytes: config.mqtt_subscriber_buffer_bytes,
            max_sessions: config.mqtt_max_sessions,
            max_queued_messages: config.mqtt_max_queued_messages,
            max_queued_bytes: config.mqtt_max_queued_bytes,
        }
    }

    fn max_packet(&self) -> usize {
        self.limits.max_payload_bytes.max(MIN_RELAYED) + PACKET_OVERHEAD
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
    /// One bucket per house whose clients published lately (`mqtt_publishes_per_second`).
    publishes: Buckets<String>,
    /// The connections of each house's clients (`mqtt_connections_per_house`).
    houses: Places<String>,
}

impl Broker {
    /// How long `who`'s house still owes for its publishes (zero within its rate; anonymous
    /// and admin clients owe nothing).
    fn owes(&self, who: &Client) -> Duration {
        match who {
            Client::Known(Principal::House(house)) => self.publishes.owed(house.clone()),
            _ => Duration::ZERO,
        }
    }

    /// Whether a publish carries a critical reading (a smoke alarm): never held by its house's
    /// rate.
    fn critical(&self, p: &rumqttc::mqttbytes::v4::Publish) -> bool {
        let now = crate::event::now_us();
        let decoded = self.intake.codecs().decode(&p.topic, &p.payload, now);
        decoded.events.iter().any(crate::event::Event::is_critical)
    }

    /// A place among its house's connections for a client of a house (`None` for the others).
    fn place(&self, who: &Client) -> Result<Option<Place<String>>, Full> {
        match who {
            Client::Known(Principal::House(h)) => {
                self.houses.take(Some(h)).map(Some).inspect_err(|_| {
                    crate::rate::held_back(h, "mqtt_connections_per_house");
                })
            }
            _ => Ok(None),
        }
    }

    /// What the publishes among `packets` cost `who`'s house: how long to pause before reading
    /// its client again (zero within the rate; anonymous and admin clients are not limited).
    fn owed(&self, who: &Client, packets: &[rumqttc::mqttbytes::v4::Packet]) -> Duration {
        let Client::Known(Principal::House(house)) = who else {
            return Duration::ZERO;
        };
        let n = packets
            .iter()
            .filter(|p| matches!(p, rumqttc::mqttbytes::v4::Packet::Publish(_)))
            .count();
        let owed = match n {
            0 => Duration::ZERO,
            n => self
                .publishes
                .spend(house.clone(), u32::try_from(n).unwrap_or(u32::MAX)),
        };
        if !owed.is_zero() {
            crate::rate::held_back(house, "mqtt_publishes_per_second");
        }
        owed
    }

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
        let message = Message {
            topic: topic.to_string(),
            payload: payload.clone(),
            qos: QoS::AtLeastOnce,
        };
        if let Err(e) = self.relay(&[message]).await {
            warn!(error = %e, topic = %codec::truncate(topic, 128), "cannot queue a message for a session");
        }
        true
    }

    /// Hand messages to the sessions they reach: first into the outboxes of the persistent ones
    /// (one transaction), then to the connected ones.
    async fn relay(&self, messages: &[Message]) -> Result<(), Unavailable> {
        if messages.is_empty() {
            return Ok(());
        }
        let rows = self.routes.outbox(messages);
        let mut by_message: Vec<std::collections::HashMap<&str, i64>> =
            vec![std::collections::HashMap::new(); messages.len()];
        if !rows.is_empty() {
            let ids = match self
                .kept
                .sessions
                .enqueue(rows.iter().map(|(_, e)| e.clone()).collect())
                .await
            {
                Ok(ids) => ids,
                Err(e) => {
                    self.routes.unqueue(&rows);
                    return Err(e);
                }
            };
            for ((i, e), id) in rows.iter().zip(ids) {
                by_message[*i].insert(e.client_id.as_str(), id);
            }
        }
        for (m, rows) in messages.iter().zip(&by_message) {
            self.routes.forward(m, rows);
        }
        Ok(())
    }
}

/// The topic Home Assistant's birth message goes to: devices that use discovery announce
/// themselves again when it says `online`.
pub const HA_STATUS: &str = "homeassistant/status";

/// Accept connections until shutdown. First the wills the last run left (their clients were cut
/// off by the stop) are published, and `homeassistant/status` `online` (retained), so that
/// devices announce themselves again.
pub async fn serve(
    listeners: Listeners,
    intake: Arc<Intake>,
    auth: Arc<Authenticator>,
    settings: Settings,
    (kept, left): (Kept, Left),
    mut alerts: Option<crate::alerts::mqtt::AlertFeed>,
    mut shutdown: Shutdown,
) {
    let routes = Routes {
        buffer_bytes: settings.subscriber_buffer_bytes,
        max_waiting: settings.max_queued_messages,
        max_waiting_bytes: settings.max_queued_bytes,
        ..Routes::default()
    };
    routes.restore(left.sessions);
    let broker = Arc::new(Broker {
        publishes: Buckets::new(settings.publishes),
        houses: Places::new(usize::MAX, settings.connections_per_house),
        intake,
        auth,
        settings,
        routes,
        kept,
    });
    for will in &left.wills {
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
            a = listeners.accept() => a,
            pushed = crate::alerts::mqtt::next(&mut alerts), if alerts.is_some() => {
                match pushed {
                    // Alert transitions, to the home's automations (retained).
                    Some(p) => {
                        for (topic, payload) in crate::alerts::mqtt::to_publish(alerts.as_ref(), &p).await {
                            broker.publish(&topic, &Bytes::from(payload), true, &shutdown).await;
                        }
                    }
                    None => alerts = None,
                }
                continue;
            }
            _ = shutdown.wait() => return,
        };
        match accepted {
            Ok((stream, peer, tls)) => {
                let Ok(permit) = connections.clone().try_acquire_owned() else {
                    tokio::spawn(refuse(stream, peer, tls, settings.packet_timeout));
                    continue;
                };
                let (broker, shutdown) = (broker.clone(), shutdown.clone());
                tokio::spawn(async move {
                    let timeout = broker.settings.packet_timeout;
                    let outcome = match handshake(stream, tls, timeout).await {
                        Ok(socket) => session::session(socket, broker, shutdown).await,
                        Err(e) => Err(e),
                    };
                    match outcome {
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

/// The client's socket, after its TLS handshake when it came through the TLS listener: a
/// handshake not done within `timeout` (the time to finish a packet) ends the connection, and a
/// client speaking plain MQTT there is refused by the handshake itself.
async fn handshake(
    stream: TcpStream,
    tls: Option<crate::tls::TlsAcceptor>,
    timeout: Duration,
) -> Result<mqtt::Socket, MqttError> {
    stream.set_nodelay(true)?;
    let Some(acceptor) = tls else {
        return Ok(mqtt::Socket::Tcp(stream));
    };
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(s)) => Ok(mqtt::Socket::Tls(Box::new(s.into()))),
        Ok(Err(e)) => {
            METRICS.mqtt_refused.with("tls_handshake").add(1);
            Err(MqttError::Protocol(format!("TLS handshake failed: {e}")))
        }
        Err(_) => {
            METRICS.mqtt_refused.with("tls_handshake").add(1);
            Err(MqttError::Protocol("no TLS handshake in time".into()))
        }
    }
}

/// A connection past `mqtt_max_connections`: told the server is unavailable, and closed.
async fn refuse(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    tls: Option<crate::tls::TlsAcceptor>,
    timeout: Duration,
) {
    METRICS.mqtt_refused.with("too_many_connections").add(1);
    debug!(%peer, "mqtt connection refused: too many connections");
    let Ok(socket) = handshake(stream, tls, timeout.min(Duration::from_secs(1))).await else {
        return;
    };
    let (_, mut writer) = mqtt::split(socket, 0);
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
