//! WebSocket push: `GET /api/v1/ws?house=H&events=true&alerts=true&since=SEQ` (token in the
//! `Authorization` header or `?token=`).
//!
//! Alert messages carry a `seq`; a client that reconnects with `since=` the last `seq` it saw
//! gets the alert pushes it missed, in order, then the live ones, none twice (a message it is
//! sent live is skipped when the replay already had it); when they are no longer kept it is
//! told `{"type": "resync"}` and re-reads `/api/v1/alerts`. Events are pushed live only. On an
//! open socket a client sends `{"type": "subscribe", "house": H, "events": …, "alerts": …}` or
//! `{"type": "unsubscribe", "house": H}`, answered `subscribed`, `unsubscribed` or `error`
//! ([`super::subscribe`], which also bounds how many messages a client may send: past that it is
//! disconnected, close code 1008, "too many messages").
//!
//! Workers publish alert transitions and the events of watched houses on the Redis channel
//! `P:push`; every API process subscribes to it and fans messages out to its clients, so the API
//! scales apart from the workers. Each client has a bounded buffer: one that does not read fills
//! it and is disconnected (close code 1008, "too slow"), and never slows the others. The hub
//! keeps `P:watched` up to date so that workers publish events only for houses someone watches.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{RawQuery, State};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::AppState;
use super::auth::Principal;
use super::error::ApiError;
use super::params::query_pairs;
pub use super::subscribe::Subscription;
use super::subscribe::{Allowance, request};
use crate::backoff::Backoff;
use crate::metrics::METRICS;
use crate::rate::{Full, Place, Places};
use crate::seam::FanOut;

const PING_EVERY: Duration = Duration::from_secs(20);
const PONG_WITHIN: Duration = Duration::from_secs(60);
const SEND_WITHIN: Duration = Duration::from_secs(10);
/// Largest message or frame a client may send.
const MAX_INBOUND: usize = 4 * 1024;
/// How long a watched house stays watched without being advertised again.
const WATCH_TTL_MS: i64 = 15_000;

struct Client {
    subs: Vec<Subscription>,
    tx: mpsc::Sender<Arc<str>>,
}

/// The clients of this process, and the fan-out subscription feeding them.
pub struct Hub {
    fanout: Arc<dyn FanOut>,
    /// Messages a client may have waiting before it is dropped as too slow.
    buffer: usize,
    clients: Mutex<HashMap<u64, Client>>,
    next: AtomicU64,
    running: AtomicBool,
    /// Whether the relay holds its subscription to the fan-out (a client is answered once it
    /// does: what is pushed from then on reaches it).
    subscribed: tokio::sync::watch::Sender<bool>,
    /// The clients served or about to be, in all and per house token.
    seats: Places<String>,
}

/// How many push clients (WebSocket connections, gRPC subscriptions) an API process serves at
/// once: in all (`http_max_connections`), and per house token (`push_clients_per_house`; the
/// admin token is not limited), so that one house cannot take every place.
#[derive(Debug, Clone, Copy)]
pub struct SeatLimits {
    pub total: usize,
    pub per_house: usize,
}

/// A client's place, taken before it is served ([`Hub::seat`]) and given back when dropped.
pub(crate) type Seat = Place<String>;

/// How long a client's answer waits for the relay's first subscription (the fan-out's server
/// may be down: the client is then answered anyway, and gets what is pushed once it is back).
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(5);

#[derive(Deserialize)]
struct Head {
    #[serde(rename = "type")]
    kind: String,
    house_id: String,
    /// Alert pushes' number.
    seq: Option<u64>,
}

/// A client registered with the hub: its id, its live pushes, the alert pushes it missed, and
/// the last alert `seq` among them.
pub(crate) struct Attached {
    pub id: u64,
    pub rx: mpsc::Receiver<Arc<str>>,
    pub missed: Vec<String>,
    pub last_seq: u64,
}

use crate::alerts::RESYNC;

/// Whether a live push should go out: not an alert push the replay already sent (by `seq`);
/// `last_seq` follows what went out. After a `resync` it starts over: what comes next was not
/// replayed, and may be numbered anew (a Redis without persistence, restarted).
///
/// Alert pushes carry their `seq` first ([`crate::seam::with_seq`] and the servers' push
/// script write it so): it is read off the front, without parsing the message (an events push
/// can be tens of KiB, and every client's session sees every push of its houses).
pub(crate) fn fresh(last_seq: &mut u64, text: &str) -> bool {
    match crate::pushes::seq_of(text) {
        Some(seq) if seq <= *last_seq => false,
        Some(seq) => {
            *last_seq = seq;
            true
        }
        None => {
            if text == RESYNC {
                *last_seq = 0;
            }
            true
        }
    }
}

impl Hub {
    /// A place for a client of `who`, within the limits; refused: 503 past the process's, 429
    /// `too_many_clients` past the house's (counted in `hearth_api_refused_total{rate="clients"}`).
    pub(crate) fn seat(&self, who: &Principal) -> Result<Seat, ApiError> {
        let house = match who {
            Principal::House(h) => Some(h),
            Principal::Admin => None,
        };
        self.seats.take(house).map_err(|full| match full {
            Full::All => ApiError::Unavailable("too many WebSocket clients; retry later".into()),
            Full::Key(held) => {
                METRICS.api_refused.with("clients").add(1);
                if let Some(h) = house {
                    crate::rate::held_back(h, "push_clients_per_house");
                }
                ApiError::Crowded(format!(
                    "this house has {held} push clients here, the most it may (push_clients_per_house)"
                ))
            }
        })
    }

    pub fn new(fanout: Arc<dyn FanOut>, buffer: usize, limits: SeatLimits) -> Hub {
        Hub {
            fanout,
            buffer: buffer.max(1),
            clients: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            running: AtomicBool::new(false),
            subscribed: tokio::sync::watch::channel(false).0,
            seats: Places::new(limits.total, limits.per_house),
        }
    }

    /// With the first client: start the relay and the advertising. Then wait (at most
    /// [`SUBSCRIBE_WAIT`]) until the relay is subscribed.
    async fn start(self: &Arc<Self>) {
        if !self.running.swap(true, Ordering::SeqCst) {
            tokio::spawn(self.clone().relay());
            tokio::spawn(self.clone().advertise());
        }
        let mut subscribed = self.subscribed.subscribe();
        let _ = tokio::time::timeout(SUBSCRIBE_WAIT, subscribed.wait_for(|s| *s)).await;
    }

    fn add(&self, subs: Vec<Subscription>, tx: mpsc::Sender<Arc<str>>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut clients) = self.clients.lock() {
            clients.insert(id, Client { subs, tx });
        }
        id
    }

    /// A client's subscriptions changed.
    fn set(&self, id: u64, subs: Vec<Subscription>) {
        if let Ok(mut clients) = self.clients.lock()
            && let Some(c) = clients.get_mut(&id)
        {
            c.subs = subs;
        }
    }

    /// A client left.
    pub(crate) fn remove(&self, id: u64) {
        if let Ok(mut clients) = self.clients.lock() {
            clients.remove(&id);
        }
    }

    /// Hand a pushed message to the clients it is for; drop the ones whose buffer is full.
    pub fn dispatch(&self, message: &str) {
        // A resync goes to every client that follows alerts.
        let head = match serde_json::from_str::<Head>(message) {
            Ok(head) => Some(head),
            Err(_) if message == RESYNC => None,
            Err(_) => return,
        };
        let text: Arc<str> = Arc::from(message);
        let Ok(mut clients) = self.clients.lock() else {
            return;
        };
        let mut slow = Vec::new();
        for (id, c) in clients.iter() {
            let wants = c.subs.iter().any(|s| match &head {
                Some(head) => s.wants(&head.kind, &head.house_id),
                None => s.alerts,
            });
            if wants && c.tx.try_send(text.clone()).is_err() {
                slow.push(*id);
            }
        }
        for id in slow {
            // Dropping the sender tells the client's task to close the connection.
            clients.remove(&id);
            info!(client = id, "websocket client too slow, disconnecting");
            METRICS.ws_closed.with("too_slow").add(1);
        }
    }

    /// Subscribe to the fan-out and dispatch (the subscription reconnects by itself, and makes
    /// up for the alert pushes it missed meanwhile: [`crate::pushes`]).
    async fn relay(self: Arc<Self>) {
        let mut backoff = Backoff::default();
        loop {
            match crate::pushes::subscribe(self.fanout.clone()).await {
                Ok(mut messages) => {
                    backoff.reset();
                    self.subscribed.send_replace(true);
                    while let Some(text) = messages.recv().await {
                        self.dispatch(&text);
                    }
                    self.subscribed.send_replace(false);
                }
                Err(e) => warn!(error = %e, "push subscription failed, retrying"),
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// Tell workers which houses' events are watched (`*`: all), every few seconds.
    async fn advertise(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            let houses: HashSet<String> = match self.clients.lock() {
                Ok(c) => c
                    .values()
                    .flat_map(|c| c.subs.iter())
                    .filter(|s| s.events)
                    .map(|s| s.house.clone().unwrap_or_else(|| "*".into()))
                    .collect(),
                Err(_) => continue,
            };
            let houses: Vec<String> = houses.into_iter().collect();
            if let Err(e) = self.fanout.watch(&houses, WATCH_TTL_MS).await {
                debug!(error = %e, "could not advertise watched houses");
            }
        }
    }

    /// Register a client for live pushes, then read the alert pushes it missed since `since`
    /// (registered first: nothing pushed meanwhile is missed; [`fresh`] skips what both bring).
    /// When they are no longer kept, `missed` ends with a `resync` message.
    pub(crate) async fn attach(
        self: &Arc<Self>,
        subs: Vec<Subscription>,
        since: Option<u64>,
    ) -> Attached {
        self.start().await;
        let (tx, rx) = mpsc::channel::<Arc<str>>(self.buffer);
        for sub in &subs {
            self.advertise_now(sub).await;
        }
        let id = self.add(subs.clone(), tx);
        let mut missed = Vec::new();
        let mut last_seq = since.unwrap_or(0);
        if let Some(since) = since {
            crate::fault::pause("pause_before_replay").await;
            match self.fanout.alerts_since(since).await {
                Ok(Some(kept)) => {
                    for message in kept {
                        let Ok(head) = serde_json::from_str::<Head>(&message) else {
                            continue;
                        };
                        last_seq = last_seq.max(head.seq.unwrap_or(0));
                        if subs.iter().any(|s| s.wants(&head.kind, &head.house_id)) {
                            missed.push(message);
                        }
                    }
                }
                // Not replayed: the live pushes all go out (numbered anew, maybe lower).
                Ok(None) | Err(_) => {
                    missed.push(RESYNC.into());
                    last_seq = 0;
                }
            }
        }
        Attached {
            id,
            rx,
            missed,
            last_seq,
        }
    }

    /// Advertise one subscription at once (a new client should not wait for the next round).
    async fn advertise_now(&self, sub: &Subscription) {
        if !sub.events {
            return;
        }
        let house = sub.house.clone().unwrap_or_else(|| "*".into());
        let _ = self.fanout.watch(&[house], WATCH_TTL_MS).await;
    }
}

/// Upgrade to a WebSocket, after checking the token and the subscription.
#[utoipa::path(get, path = "/api/v1/ws", tag = "push",
    params(
        ("house" = Option<String>, Query, description = "The house to follow (a house token: its own; admin without it: all)", pattern = r"^[A-Za-z0-9_.-]{1,64}$"),
        ("events" = Option<bool>, Query, description = "Push stored events (default true)"),
        ("alerts" = Option<bool>, Query, description = "Push alert transitions (default true)"),
        ("since" = Option<u64>, Query, description = "The `seq` of the last alert message seen: the alert pushes after it are sent first (or `resync` when they are no longer kept)"),
        ("token" = Option<String>, Query, description = "The bearer token, for clients that cannot set headers"),
    ),
    responses(
        (status = 101, description = "Switching to the WebSocket: JSON messages `{type: \"alert\", house_id, alert}` and `{type: \"events\", house_id, events}`"),
        (status = 400, body = super::error::ErrorBody),
        (status = 401, body = super::error::ErrorBody),
        (status = 429, description = "Past the token's rate (`too_many_requests`: retry after `Retry-After` seconds), or the house holds `push_clients_per_house` clients of this process already (`too_many_clients`: retry once one left)", body = super::error::ErrorBody),
        (status = 403, body = super::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn upgrade(
    State(state): State<Arc<AppState>>,
    who: Principal,
    RawQuery(raw): RawQuery,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let params = query_pairs(raw)?;
    if let Some(k) = params
        .keys()
        .find(|k| !["house", "events", "alerts", "since", "token"].contains(&k.as_str()))
    {
        return Err(ApiError::BadRequest(format!("unknown parameter {k:?}")));
    }
    let flag = |name: &str| -> Result<bool, ApiError> {
        match params.get(name).map(String::as_str) {
            None | Some("true") | Some("1") => Ok(true),
            Some("false") | Some("0") => Ok(false),
            Some(_) => Err(ApiError::BadRequest(format!(
                "{name} must be true or false"
            ))),
        }
    };
    let house = match (params.get("house"), &who) {
        (Some(h), _) => {
            if !crate::event::is_valid_id(h) {
                return Err(ApiError::BadRequest(
                    "house must match [A-Za-z0-9_.-]{1,64}".into(),
                ));
            }
            who.check(h)?;
            Some(h.clone())
        }
        (None, Principal::House(own)) => Some(own.clone()),
        (None, Principal::Admin) => None,
    };
    let sub = Subscription {
        house,
        events: flag("events")?,
        alerts: flag("alerts")?,
    };
    let since = params
        .get("since")
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                ApiError::BadRequest("since must be the seq of an alert message".into())
            })
        })
        .transpose()?;
    let ws = ws.map_err(|_| {
        ApiError::BadRequest("this route is a WebSocket: send an upgrade request".into())
    })?;
    // An upgraded connection leaves the HTTP server's connection count: the hub keeps its own.
    let seat = state.hub.seat(&who)?;
    let hub = state.hub.clone();
    // Clients have nothing to send but pongs and a close: a few KiB per message is plenty, and
    // all a client can make the server buffer.
    Ok(ws
        .max_message_size(MAX_INBOUND)
        .max_frame_size(MAX_INBOUND)
        .on_upgrade(move |socket| serve(hub, seat, socket, who, sub, since)))
}

async fn serve(
    hub: Arc<Hub>,
    _seat: Seat,
    socket: WebSocket,
    who: Principal,
    sub: Subscription,
    since: Option<u64>,
) {
    let mut subs = vec![sub.clone()];
    let Attached {
        id,
        mut rx,
        missed,
        mut last_seq,
    } = hub.attach(subs.clone(), since).await;
    let (mut sender, mut receiver) = socket.split();
    let hello = serde_json::json!({
        "type": "hello",
        "house": sub.house,
        "events": sub.events,
        "alerts": sub.alerts,
    });
    let mut outbox: Vec<String> = vec![hello.to_string()];
    outbox.extend(missed);
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    let mut last_pong = Instant::now();
    let mut allowance = Allowance::default();
    'session: loop {
        for text in outbox.drain(..) {
            let send = sender.send(Message::Text(text.into()));
            if !matches!(tokio::time::timeout(SEND_WITHIN, send).await, Ok(Ok(()))) {
                info!(
                    client = id,
                    "websocket client too slow (send stalled), disconnecting"
                );
                METRICS.ws_closed.with("too_slow").add(1);
                break 'session;
            }
        }
        tokio::select! {
            message = rx.recv() => match message {
                Some(text) => {
                    if fresh(&mut last_seq, &text) {
                        outbox.push(text.as_ref().into());
                    }
                }
                None => {
                    close_for_policy(&mut sender, "too slow: messages were not read").await;
                    break;
                }
            },
            _ = ping.tick() => {
                if last_pong.elapsed() > PONG_WITHIN {
                    info!(client = id, "websocket client too slow (no pong within 60 s), disconnecting");
                    METRICS.ws_closed.with("no_pong").add(1);
                    break;
                }
                let sent = tokio::time::timeout(SEND_WITHIN, sender.send(Message::Ping(Vec::new().into()))).await;
                if !matches!(sent, Ok(Ok(()))) {
                    info!(client = id, "websocket client too slow (ping not sent), disconnecting");
                    METRICS.ws_closed.with("too_slow").add(1);
                    break;
                }
            }
            incoming = receiver.next() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) if !allowance.take() => {
                    info!(client = id, "websocket client sent too many messages, disconnecting");
                    METRICS.ws_closed.with("too_many_messages").add(1);
                    close_for_policy(&mut sender, "too many messages").await;
                    break;
                }
                Some(Ok(Message::Pong(_))) => last_pong = Instant::now(),
                Some(Ok(Message::Text(text))) => {
                    last_pong = Instant::now();
                    let (answer, added) = request(&who, &mut subs, &text);
                    if let Some(sub) = added {
                        hub.advertise_now(&sub).await;
                    }
                    hub.set(id, subs.clone());
                    outbox.push(answer.to_string());
                }
                Some(Ok(_)) => last_pong = Instant::now(),
            },
        }
    }
    hub.remove(id);
    debug!(client = id, "websocket closed");
}

/// Close a client's socket for breaking a rule (1008), waiting at most a second for the frame.
async fn close_for_policy<S>(sender: &mut S, reason: &'static str)
where
    S: futures_util::Sink<Message> + Unpin,
{
    let close = Message::Close(Some(CloseFrame {
        code: close_code::POLICY,
        reason: reason.into(),
    }));
    let _ = tokio::time::timeout(Duration::from_secs(1), sender.send(close)).await;
}

#[cfg(test)]
mod tests;
