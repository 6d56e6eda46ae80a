//! The embedded broker's routing: the sessions by client id (which connection holds each, what
//! it subscribed to, whether it persists while its client is away), who gets a message at which
//! QoS, and MQTT's filter matching (`+`, `#`, `$` topics kept apart).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use tokio::sync::{Notify, mpsc};
use tracing::debug;

use super::sessions::{Enqueue, Stored};
use crate::metrics::METRICS;

/// A message on its way to subscribers, at the QoS it was published with.
#[derive(Debug, Clone)]
pub(super) struct Message {
    pub(super) topic: String,
    pub(super) payload: Bytes,
    pub(super) qos: QoS,
}

/// A message for one session, at the QoS it goes out with; `row` is its outbox row (persistent
/// sessions, QoS 1 and 2).
#[derive(Debug)]
pub(super) struct Delivery {
    pub(super) topic: String,
    pub(super) payload: Bytes,
    pub(super) qos: QoS,
    pub(super) row: Option<i64>,
}

impl Delivery {
    pub(super) fn size(&self) -> usize {
        self.topic.len() + self.payload.len()
    }
}

/// One session, connected or (persistent ones) not.
pub(super) struct Session {
    /// The connection holding it, and how to tell that one it was taken over.
    holder: Option<(u64, Arc<Notify>)>,
    filters: Vec<(String, QoS)>,
    persistent: bool,
    /// Where its connection takes deliveries; none while it is away, or after it fell behind.
    tx: Option<mpsc::UnboundedSender<Delivery>>,
    /// Bytes sent to the connection and not yet written to its socket.
    queued: Arc<AtomicUsize>,
    /// Rows in its outbox, and their bytes.
    waiting: (usize, usize),
}

/// What a connection gets when it takes a session.
pub(super) struct Attached {
    pub(super) filters: usize,
    pub(super) rx: mpsc::UnboundedReceiver<Delivery>,
    pub(super) queued: Arc<AtomicUsize>,
}

/// The broker's shared state: its sessions, by client id.
#[derive(Default)]
pub(super) struct Routes {
    pub(super) sessions: Mutex<HashMap<String, Session>>,
    pub(super) next: AtomicU64,
    /// Bytes a connection may have waiting to be written.
    pub(super) buffer_bytes: usize,
    /// Most messages, and bytes, in a persistent session's outbox.
    pub(super) max_waiting: usize,
    pub(super) max_waiting_bytes: usize,
}

impl Routes {
    /// The persistent sessions the last run left, away until their clients come back.
    pub(super) fn restore(&self, stored: Vec<Stored>) {
        if let Ok(mut sessions) = self.sessions.lock() {
            for s in stored {
                sessions.insert(
                    s.client_id,
                    Session {
                        holder: None,
                        filters: s.filters,
                        persistent: true,
                        tx: None,
                        queued: Arc::default(),
                        waiting: (s.waiting, s.waiting_bytes),
                    },
                );
            }
        }
    }

    /// Whether `client_id` has a persistent session, and how many there are.
    pub(super) fn persistent(&self, client_id: &str) -> (bool, usize) {
        self.sessions.lock().map_or((false, 0), |s| {
            (
                s.get(client_id).is_some_and(|x| x.persistent),
                s.values().filter(|x| x.persistent).count(),
            )
        })
    }

    /// Connection `id` takes `client_id`'s session (a connection that held it is told to end);
    /// a clean one starts afresh, a persistent one keeps its subscriptions.
    pub(super) fn attach(
        &self,
        client_id: &str,
        id: u64,
        kicked: Arc<Notify>,
        persistent: bool,
    ) -> Attached {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let old = sessions.remove(client_id);
        if let Some((old, notify)) = old.as_ref().and_then(|s| s.holder.as_ref()) {
            debug!(client = %client_id, old, "client id taken over by a new connection");
            notify.notify_one();
        }
        let kept = old.filter(|s| s.persistent && persistent);
        let (filters, waiting) = kept.map(|s| (s.filters, s.waiting)).unwrap_or_default();
        let attached = Attached {
            filters: filters.len(),
            rx,
            queued: queued.clone(),
        };
        sessions.insert(
            client_id.to_string(),
            Session {
                holder: Some((id, kicked)),
                filters,
                persistent,
                tx: Some(tx),
                queued,
                waiting,
            },
        );
        attached
    }

    /// Connection `id` is gone: a persistent session stays (away), a clean one ends; unless
    /// another connection took it meanwhile.
    pub(super) fn detach(&self, client_id: &str, id: u64) {
        let Ok(mut sessions) = self.sessions.lock() else {
            return;
        };
        let Some(s) = sessions.get_mut(client_id) else {
            return;
        };
        if s.holder.as_ref().is_none_or(|(holder, _)| *holder != id) {
            return;
        }
        match s.persistent {
            true => (s.holder, s.tx) = (None, None),
            false => {
                sessions.remove(client_id);
            }
        }
    }

    /// Whether `client_id`'s session holds `filter`.
    pub(super) fn holds(&self, client_id: &str, filter: &str) -> bool {
        self.sessions.lock().is_ok_and(|s| {
            s.get(client_id)
                .is_some_and(|x| x.filters.iter().any(|(f, _)| f == filter))
        })
    }

    /// Add (or regrant) and remove a session's filters; how many it holds then.
    pub(super) fn subscribe(
        &self,
        client_id: &str,
        added: &[(String, QoS)],
        removed: &[String],
    ) -> usize {
        let Ok(mut sessions) = self.sessions.lock() else {
            return 0;
        };
        let Some(s) = sessions.get_mut(client_id) else {
            return 0;
        };
        s.filters
            .retain(|(f, _)| !removed.contains(f) && !added.iter().any(|(a, _)| a == f));
        s.filters.extend(added.iter().cloned());
        s.filters.len()
    }

    /// The outbox rows `messages` make: one per persistent session (connected or not) that a
    /// message reaches at QoS 1 or 2, while its outbox has room (past it the message is not
    /// queued for that session, and counted). Returns (message index, row to write).
    pub(super) fn outbox(&self, messages: &[Message]) -> Vec<(usize, Enqueue)> {
        let mut out = Vec::new();
        let Ok(mut sessions) = self.sessions.lock() else {
            return out;
        };
        for (client_id, s) in sessions.iter_mut().filter(|(_, s)| s.persistent) {
            for (i, m) in messages.iter().enumerate() {
                let qos = s.reaches(m);
                if qos.is_none_or(|q| q == QoS::AtMostOnce) {
                    continue;
                }
                let size = m.topic.len() + m.payload.len();
                if s.waiting.0 >= self.max_waiting || s.waiting.1 + size > self.max_waiting_bytes {
                    METRICS.mqtt_refused.with("session_full").add(1);
                    continue;
                }
                s.waiting = (s.waiting.0 + 1, s.waiting.1 + size);
                out.push((
                    i,
                    Enqueue {
                        client_id: client_id.clone(),
                        topic: m.topic.clone(),
                        payload: m.payload.clone(),
                        qos: qos.unwrap_or(QoS::AtLeastOnce),
                    },
                ));
            }
        }
        out
    }

    /// Rows written by [`Routes::outbox`] that could not be kept after all.
    pub(super) fn unqueue(&self, rows: &[(usize, Enqueue)]) {
        for (_, e) in rows {
            self.delivered(&e.client_id, 1, e.topic.len() + e.payload.len());
        }
    }

    /// `n` rows (of `bytes`) left a session's outbox.
    pub(super) fn delivered(&self, client_id: &str, n: usize, bytes: usize) {
        if let Ok(mut sessions) = self.sessions.lock()
            && let Some(s) = sessions.get_mut(client_id)
        {
            s.waiting = (
                s.waiting.0.saturating_sub(n),
                s.waiting.1.saturating_sub(bytes),
            );
        }
    }

    /// Hand `message` to the connected sessions it reaches; `rows` are the outbox rows made for
    /// it, by client id (a persistent session reached at QoS 1 or 2 gets it only with its row).
    pub(super) fn forward(&self, message: &Message, rows: &HashMap<&str, i64>) {
        let Ok(mut sessions) = self.sessions.lock() else {
            return;
        };
        let size = message.topic.len() + message.payload.len();
        for (client_id, s) in sessions.iter_mut() {
            let Some(qos) = s.reaches(message) else {
                continue;
            };
            let row = rows.get(client_id.as_str()).copied();
            if s.persistent && qos != QoS::AtMostOnce && row.is_none() {
                continue;
            }
            let Some(tx) = &s.tx else {
                continue;
            };
            // A connection that lets its buffer fill (in bytes) is cut off, never waited for:
            // it ends (its receiver sees the sender gone), what its session keeps stays kept.
            if s.queued.load(Ordering::Relaxed) + size > self.buffer_bytes {
                s.tx = None;
                continue;
            }
            s.queued.fetch_add(size, Ordering::Relaxed);
            let delivery = Delivery {
                topic: message.topic.clone(),
                payload: message.payload.clone(),
                qos,
                row,
            };
            if tx.send(delivery).is_err() {
                s.tx = None;
            }
        }
    }
}

impl Session {
    /// The QoS `m` reaches this session with (the highest its matching filters were granted,
    /// at most the QoS it was published with), or none.
    fn reaches(&self, m: &Message) -> Option<QoS> {
        let granted = self
            .filters
            .iter()
            .filter(|(f, _)| matches(f, &m.topic))
            .map(|(_, q)| *q as u8)
            .max()?;
        Some(super::sessions::qos_of(i64::from(granted.min(m.qos as u8))))
    }
}

/// Whether an MQTT topic filter matches a topic.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && !filter.starts_with('$') {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}
