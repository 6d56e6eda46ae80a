//! The embedded cache and fan-out: in-process, because in embedded mode every reader of them is
//! in this process. The cache holds nothing the store does not: a sensor's stored latest values
//! are read in the first time it is asked for (not at start, which would scan every event); the
//! fan-out is a broadcast channel feeding the API's WebSocket hub.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, mpsc};

use super::store::SqliteStore;
use crate::alerts::Alert;
use crate::alerts::rules::RuleSet;
use crate::event::Event;
use crate::seam::{FanOut, Fut, LatestCache};

/// The order of two readings of one (sensor, kind): ts, then seq (a reading with one after one
/// without), then receive time; the same order as the Redis cache's order key.
type Order = (i64, (u8, i64), i64);

fn order(e: &Event) -> Order {
    (
        e.ts_ms.max(0),
        e.seq.map_or((0, 0), |s| (1, s)),
        e.received_us.max(0),
    )
}

/// kind → the newest reading (its JSON is made when read, not at every offer).
type Kinds = HashMap<String, (Order, Event)>;

/// sensor → its kinds' latest values.
#[derive(Default)]
pub struct MemoryCache {
    latest: Mutex<HashMap<String, Kinds>>,
    /// Where values written before this start are read from, and the sensors already read in.
    store: Option<Arc<SqliteStore>>,
    read_in: Mutex<HashSet<String>>,
}

impl MemoryCache {
    /// A cache that reads a sensor's stored latest values in when first asked for it.
    pub fn over(store: Arc<SqliteStore>) -> MemoryCache {
        MemoryCache {
            store: Some(store),
            ..MemoryCache::default()
        }
    }
}

impl LatestCache for MemoryCache {
    fn offer<'a>(&'a self, events: &'a [&'a Event]) -> Fut<'a, ()> {
        Box::pin(async move {
            let Ok(mut latest) = self.latest.lock() else {
                return Ok(());
            };
            for e in events {
                let o = order(e);
                match latest.get_mut(&e.sensor_id) {
                    Some(kinds) => match kinds.get_mut(&e.kind) {
                        Some(current) if current.0 >= o => {}
                        Some(current) => *current = (o, (*e).clone()),
                        None => {
                            kinds.insert(e.kind.clone(), (o, (*e).clone()));
                        }
                    },
                    None => {
                        let kinds = HashMap::from([(e.kind.clone(), (o, (*e).clone()))]);
                        latest.insert(e.sensor_id.clone(), kinds);
                    }
                }
            }
            Ok(())
        })
    }

    fn latest<'a>(&'a self, sensor: &'a str) -> Fut<'a, HashMap<String, String>> {
        Box::pin(async move {
            let known = self
                .read_in
                .lock()
                .map(|r| r.contains(sensor))
                .unwrap_or(false);
            if let (Some(store), false) = (&self.store, known) {
                // Offered like any reading: one newer that arrived meanwhile is kept.
                let stored = store.latest_of(sensor).await?;
                let refs: Vec<&Event> = stored.iter().collect();
                self.offer(&refs).await?;
                if let Ok(mut r) = self.read_in.lock() {
                    r.insert(sensor.to_string());
                }
            }
            Ok(self
                .latest
                .lock()
                .ok()
                .and_then(|l| {
                    l.get(sensor).map(|kinds| {
                        kinds
                            .iter()
                            .map(|(k, (_, e))| (k.clone(), crate::seam::latest_json(e)))
                            .collect()
                    })
                })
                .unwrap_or_default())
        })
    }
}

/// Messages a subscriber may fall behind by before it misses some (it is told in the log).
const BACKLOG: usize = 4096;

pub struct ChannelFanOut {
    tx: broadcast::Sender<String>,
}

impl Default for ChannelFanOut {
    fn default() -> Self {
        ChannelFanOut {
            tx: broadcast::channel(BACKLOG).0,
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
    fn publish(&self, message: String) -> Fut<'_, ()> {
        // No subscriber is not an error: as with Redis pub/sub, a push reaches who listens now.
        let _ = self.tx.send(message);
        Box::pin(async move { Ok(()) })
    }

    fn push_alert<'a>(&'a self, _rules: &'a RuleSet, alert: &'a Alert) -> Fut<'a, ()> {
        if let Some(json) = crate::alerts::alert_message(alert) {
            let _ = self.tx.send(json);
        }
        Box::pin(async move { Ok(()) })
    }

    fn subscribe(&self) -> Fut<'_, mpsc::Receiver<String>> {
        let mut rx = self.tx.subscribe();
        Box::pin(async move {
            let (tx, out) = mpsc::channel(BACKLOG);
            tokio::spawn(async move {
                loop {
                    match rx.recv().await {
                        Ok(m) => {
                            if tx.send(m).await.is_err() {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(missed = n, "push subscriber fell behind");
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            });
            Ok(out)
        })
    }

    fn watch<'a>(&'a self, _houses: &'a [String], _ttl_ms: i64) -> Fut<'a, ()> {
        Box::pin(async move { Ok(()) })
    }
}
