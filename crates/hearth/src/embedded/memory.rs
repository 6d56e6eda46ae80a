//! The embedded cache and fan-out: in-process, because in embedded mode every reader of them is
//! in this process. The cache is warmed from the store at start (it holds nothing the store does
//! not); the fan-out is a broadcast channel feeding the API's WebSocket hub.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::{broadcast, mpsc};

use crate::alerts::Alert;
use crate::alerts::rules::RuleSet;
use crate::event::Event;
use crate::seam::{FanOut, Fut, LatestCache};

/// kind → (order key, JSON).
type Kinds = HashMap<String, (String, String)>;

/// sensor → its kinds' latest values.
#[derive(Default)]
pub struct MemoryCache {
    latest: Mutex<HashMap<String, Kinds>>,
}

impl LatestCache for MemoryCache {
    fn offer<'a>(&'a self, events: &'a [&'a Event]) -> Fut<'a, ()> {
        Box::pin(async move {
            let Ok(mut latest) = self.latest.lock() else {
                return Ok(());
            };
            for e in events {
                let order = crate::cache::order_key(e);
                let kinds = latest.entry(e.sensor_id.clone()).or_default();
                match kinds.get(&e.kind) {
                    Some((current, _)) if *current >= order => {}
                    _ => {
                        kinds.insert(e.kind.clone(), (order, crate::seam::latest_json(e)));
                    }
                }
            }
            Ok(())
        })
    }

    fn latest<'a>(&'a self, sensor: &'a str) -> Fut<'a, HashMap<String, String>> {
        Box::pin(async move {
            Ok(self
                .latest
                .lock()
                .ok()
                .and_then(|l| {
                    l.get(sensor).map(|kinds| {
                        kinds
                            .iter()
                            .map(|(k, (_, json))| (k.clone(), json.clone()))
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
        let message = crate::alerts::Push::Alert {
            house_id: alert.house_id.clone(),
            alert: Box::new(alert.clone()),
        };
        if let Ok(json) = serde_json::to_string(&message) {
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
