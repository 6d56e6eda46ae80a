//! The embedded cache and fan-out: in-process, because in embedded mode every reader of them is
//! in this process. The cache holds nothing the store does not: a sensor's stored latest values
//! are read in the first time it is asked for (not at start, which would scan every event); the
//! fan-out is a broadcast channel feeding the API's WebSocket hub.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, mpsc};

use super::store::SqliteStore;
use crate::alerts::Alert;
use crate::event::{Event, Order, PerSensor};
use crate::seam::{FanOut, Fut, LatestCache, Pushed};

/// kind → the newest reading (its JSON is made when read, not at every offer).
type Kinds = HashMap<String, (Order, Event)>;

/// Each sensor's kinds' latest values.
#[derive(Default)]
pub struct MemoryCache {
    latest: Mutex<PerSensor<Kinds>>,
    /// Where values written before this start are read from, and the sensors already read in.
    store: Option<Arc<SqliteStore>>,
    read_in: Mutex<HashSet<(String, String)>>,
}

impl MemoryCache {
    /// A cache that reads a sensor's stored latest values in when first asked for it.
    pub fn over(store: Arc<SqliteStore>) -> MemoryCache {
        MemoryCache {
            store: Some(store),
            ..MemoryCache::default()
        }
    }

    fn offer_now(&self, events: &[&Event]) {
        let Ok(mut latest) = self.latest.lock() else {
            return;
        };
        for e in events {
            let kinds = latest.get_or_insert_with(&e.house_id, &e.sensor_id, Kinds::new);
            let o = e.order();
            match kinds.get_mut(&e.kind) {
                Some(current) if current.0 >= o => {}
                Some(current) => *current = (o, (*e).clone()),
                None => {
                    kinds.insert(e.kind.clone(), (o, (*e).clone()));
                }
            }
        }
    }
}

impl LatestCache for MemoryCache {
    fn offer<'a>(&'a self, events: &'a [&'a Event]) -> Fut<'a, ()> {
        self.offer_now(events);
        Box::pin(async move { Ok(()) })
    }

    fn latest<'a>(
        &'a self,
        house: &'a str,
        sensors: &'a [String],
    ) -> Fut<'a, Vec<HashMap<String, String>>> {
        Box::pin(async move {
            if let Some(store) = &self.store {
                let missing: Vec<String> = match self.read_in.lock() {
                    Ok(r) => sensors
                        .iter()
                        .filter(|s| !r.contains(&(house.to_string(), (*s).clone())))
                        .cloned()
                        .collect(),
                    Err(_) => Vec::new(),
                };
                if !missing.is_empty() {
                    // Offered like any reading: one newer that arrived meanwhile is kept.
                    let stored = store.latest_of(house, missing.clone()).await?;
                    self.offer_now(&stored.iter().collect::<Vec<_>>());
                    if let Ok(mut r) = self.read_in.lock() {
                        r.extend(missing.into_iter().map(|s| (house.to_string(), s)));
                    }
                }
            }
            let latest = self.latest.lock().ok();
            Ok(sensors
                .iter()
                .map(|s| {
                    latest
                        .as_ref()
                        .and_then(|l| l.get(house, s))
                        .map(|kinds| {
                            kinds
                                .iter()
                                .map(|(k, (_, e))| (k.clone(), crate::seam::latest_json(e)))
                                .collect()
                        })
                        .unwrap_or_default()
                })
                .collect())
        })
    }
}

/// Messages a subscriber may fall behind by before it misses some (it is told in the log).
const BACKLOG: usize = 4096;

pub struct ChannelFanOut {
    tx: broadcast::Sender<String>,
    /// The last alert pushes, numbered from this start's clock in microseconds (so a number is
    /// greater than any a previous run gave), for clients that reconnect.
    kept: std::sync::Mutex<Kept>,
    /// Moved by every [`FanOut::watch`].
    watch_changes: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct Kept {
    /// The number this run started from (the first push is one more).
    origin: u64,
    last: u64,
    pushes: std::collections::VecDeque<(u64, String)>,
}

impl Default for ChannelFanOut {
    fn default() -> Self {
        ChannelFanOut {
            tx: broadcast::channel(BACKLOG).0,
            kept: std::sync::Mutex::new({
                let origin = u64::try_from(crate::event::now_us()).unwrap_or(0);
                Kept {
                    origin,
                    last: origin,
                    pushes: Default::default(),
                }
            }),
            watch_changes: Default::default(),
        }
    }
}

impl ChannelFanOut {
    /// Whether anyone listens (events are serialised for pushing only then).
    pub fn has_subscribers(&self) -> bool {
        self.tx.receiver_count() > 0
    }
}

impl FanOut for ChannelFanOut {
    fn publish<'a>(&'a self, messages: &'a [String]) -> Fut<'a, ()> {
        // No subscriber is not an error: as with Redis pub/sub, a push reaches who listens now.
        for message in messages {
            let _ = self.tx.send(message.clone());
        }
        Box::pin(async move { Ok(()) })
    }

    /// To WebSocket clients; the webhook jobs were written with the transitions.
    fn push_alerts<'a>(&'a self, alerts: &'a [Alert]) -> Fut<'a, ()> {
        // Numbered, kept and sent under one lock: numbers in the order of sending.
        if let Ok(mut kept) = self.kept.lock() {
            for alert in alerts {
                if let Some(json) = crate::alerts::alert_message(alert) {
                    kept.last += 1;
                    let message = crate::seam::with_seq(&json, kept.last);
                    let seq = kept.last;
                    kept.pushes.push_back((seq, message.clone()));
                    if kept.pushes.len() > crate::seam::KEPT_ALERT_PUSHES {
                        kept.pushes.pop_front();
                    }
                    let _ = self.tx.send(message);
                }
            }
        }
        Box::pin(async move { Ok(()) })
    }

    fn alerts_since(&self, since: u64) -> Fut<'_, Option<Vec<String>>> {
        let found = self.kept.lock().ok().and_then(|kept| {
            let kept_since = kept
                .pushes
                .binary_search_by_key(&since, |(seq, _)| *seq)
                .is_ok();
            let from_origin =
                since == kept.origin && kept.pushes.len() < crate::seam::KEPT_ALERT_PUSHES;
            crate::seam::resumable(since, kept.last, kept_since, from_origin).then(|| {
                kept.pushes
                    .iter()
                    .filter(|(seq, _)| *seq > since)
                    .map(|(_, m)| m.clone())
                    .collect()
            })
        });
        Box::pin(async move { Ok(found) })
    }

    fn subscribe(&self) -> Fut<'_, mpsc::Receiver<Pushed>> {
        let mut rx = self.tx.subscribe();
        Box::pin(async move {
            let (tx, out) = mpsc::channel(BACKLOG);
            tokio::spawn(async move {
                loop {
                    let pushed = match rx.recv().await {
                        Ok(m) => Pushed::Message(m),
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(missed = n, "push subscriber fell behind");
                            Pushed::Gap
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    };
                    if tx.send(pushed).await.is_err() {
                        return;
                    }
                }
            });
            Ok(out)
        })
    }

    fn alerts_pushed(&self) -> Fut<'_, u64> {
        let last = self.kept.lock().map(|k| k.last).unwrap_or(0);
        Box::pin(async move { Ok(last) })
    }

    fn watch<'a>(&'a self, houses: &'a [String], _ttl_ms: i64) -> Fut<'a, ()> {
        if !houses.is_empty() {
            self.watch_changes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        Box::pin(async move { Ok(()) })
    }

    /// Everything while anyone listens (the clients' hub filters by house).
    fn watched(&self) -> Fut<'_, std::collections::HashSet<String>> {
        let all = self.has_subscribers();
        Box::pin(async move {
            Ok(if all {
                std::iter::once("*".to_string()).collect()
            } else {
                Default::default()
            })
        })
    }

    fn watch_changes(&self) -> Fut<'_, u64> {
        let changes = self.watch_changes.load(std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move { Ok(changes) })
    }
}
