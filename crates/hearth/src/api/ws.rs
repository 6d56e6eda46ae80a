//! WebSocket push: `GET /api/v1/ws?house=H&events=true&alerts=true` (token in the
//! `Authorization` header or `?token=`).
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
use crate::backoff::Backoff;
use crate::seam::FanOut;

const PING_EVERY: Duration = Duration::from_secs(20);
const PONG_WITHIN: Duration = Duration::from_secs(60);
const SEND_WITHIN: Duration = Duration::from_secs(10);
/// Largest message or frame a client may send.
const MAX_INBOUND: usize = 4 * 1024;
/// How long a watched house stays watched without being advertised again.
const WATCH_TTL_MS: i64 = 15_000;

/// What a client listens to.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    /// `None`: every house (admin only).
    pub house: Option<String>,
    pub events: bool,
    pub alerts: bool,
}

struct Client {
    sub: Subscription,
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
}

#[derive(Deserialize)]
struct Head {
    #[serde(rename = "type")]
    kind: String,
    house_id: String,
}

impl Hub {
    pub fn new(fanout: Arc<dyn FanOut>, buffer: usize) -> Hub {
        Hub {
            fanout,
            buffer: buffer.max(1),
            clients: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            running: AtomicBool::new(false),
        }
    }

    pub fn clients(&self) -> usize {
        self.clients.lock().map(|c| c.len()).unwrap_or(0)
    }

    fn add(self: &Arc<Self>, sub: Subscription, tx: mpsc::Sender<Arc<str>>) -> u64 {
        if !self.running.swap(true, Ordering::SeqCst) {
            tokio::spawn(self.clone().relay());
            tokio::spawn(self.clone().advertise());
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut clients) = self.clients.lock() {
            clients.insert(id, Client { sub, tx });
        }
        id
    }

    fn remove(&self, id: u64) {
        if let Ok(mut clients) = self.clients.lock() {
            clients.remove(&id);
        }
    }

    /// Hand a pushed message to the clients it is for; drop the ones whose buffer is full.
    pub fn dispatch(&self, message: &str) {
        let Ok(head) = serde_json::from_str::<Head>(message) else {
            return;
        };
        let text: Arc<str> = Arc::from(message);
        let Ok(mut clients) = self.clients.lock() else {
            return;
        };
        let mut slow = Vec::new();
        for (id, c) in clients.iter() {
            let wants = match head.kind.as_str() {
                "alert" => c.sub.alerts,
                _ => c.sub.events,
            };
            let house = c.sub.house.as_deref().is_none_or(|h| h == head.house_id);
            if wants && house && c.tx.try_send(text.clone()).is_err() {
                slow.push(*id);
            }
        }
        for id in slow {
            // Dropping the sender tells the client's task to close the connection.
            clients.remove(&id);
            info!(client = id, "websocket client too slow, disconnecting");
        }
    }

    /// Subscribe to the fan-out and dispatch (the subscription reconnects by itself).
    async fn relay(self: Arc<Self>) {
        let mut backoff = Backoff::default();
        loop {
            match self.fanout.subscribe().await {
                Ok(mut messages) => {
                    backoff.reset();
                    while let Some(text) = messages.recv().await {
                        self.dispatch(&text);
                    }
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
                    .filter(|c| c.sub.events)
                    .map(|c| c.sub.house.clone().unwrap_or_else(|| "*".into()))
                    .collect(),
                Err(_) => continue,
            };
            let houses: Vec<String> = houses.into_iter().collect();
            if let Err(e) = self.fanout.watch(&houses, WATCH_TTL_MS).await {
                debug!(error = %e, "could not advertise watched houses");
            }
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
        ("token" = Option<String>, Query, description = "The bearer token, for clients that cannot set headers"),
    ),
    responses(
        (status = 101, description = "Switching to the WebSocket: JSON messages `{type: \"alert\", house_id, alert}` and `{type: \"events\", house_id, events}`"),
        (status = 400, body = super::error::ErrorBody),
        (status = 401, body = super::error::ErrorBody),
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
        .find(|k| !["house", "events", "alerts", "token"].contains(&k.as_str()))
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
    let ws = ws.map_err(|_| {
        ApiError::BadRequest("this route is a WebSocket: send an upgrade request".into())
    })?;
    // An upgraded connection leaves the HTTP server's connection count: the hub keeps its own.
    if state.hub.clients() >= state.config.http_max_connections {
        return Err(ApiError::Unavailable(
            "too many WebSocket clients; retry later".into(),
        ));
    }
    let hub = state.hub.clone();
    // Clients have nothing to send but pongs and a close: a few KiB per message is plenty, and
    // all a client can make the server buffer.
    Ok(ws
        .max_message_size(MAX_INBOUND)
        .max_frame_size(MAX_INBOUND)
        .on_upgrade(move |socket| serve(hub, socket, sub)))
}

async fn serve(hub: Arc<Hub>, socket: WebSocket, sub: Subscription) {
    let (tx, mut rx) = mpsc::channel::<Arc<str>>(hub.buffer);
    hub.advertise_now(&sub).await;
    let id = hub.add(sub.clone(), tx);
    let (mut sender, mut receiver) = socket.split();
    let hello = serde_json::json!({
        "type": "hello",
        "house": sub.house,
        "events": sub.events,
        "alerts": sub.alerts,
    });
    let _ = sender.send(Message::Text(hello.to_string().into())).await;
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    let mut last_pong = Instant::now();
    loop {
        tokio::select! {
            message = rx.recv() => match message {
                Some(text) => {
                    let send = sender.send(Message::Text(text.as_ref().into()));
                    if !matches!(tokio::time::timeout(SEND_WITHIN, send).await, Ok(Ok(()))) {
                        info!(client = id, "websocket client too slow (send stalled), disconnecting");
                        break;
                    }
                }
                None => {
                    let close = Message::Close(Some(CloseFrame {
                        code: close_code::POLICY,
                        reason: "too slow: messages were not read".into(),
                    }));
                    let _ = tokio::time::timeout(Duration::from_secs(1), sender.send(close)).await;
                    break;
                }
            },
            _ = ping.tick() => {
                if last_pong.elapsed() > PONG_WITHIN {
                    break;
                }
                let sent = tokio::time::timeout(SEND_WITHIN, sender.send(Message::Ping(Vec::new().into()))).await;
                if !matches!(sent, Ok(Ok(()))) {
                    break;
                }
            }
            incoming = receiver.next() => match incoming {
                Some(Ok(Message::Pong(_))) => last_pong = Instant::now(),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => last_pong = Instant::now(),
            },
        }
    }
    hub.remove(id);
    debug!(client = id, "websocket closed");
}
