//! The embedded broker's routing: who subscribed to which topic filters, which session holds
//! each client id, and MQTT's filter matching (`+`, `#`, `$` topics kept apart).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc};
use tracing::debug;

pub(super) struct Subscriber {
    pub(super) id: u64,
    pub(super) filters: Vec<String>,
    pub(super) tx: mpsc::UnboundedSender<(String, Bytes)>,
    /// Bytes (topic and payload) sent to the session and not yet written to its socket.
    pub(super) queued: Arc<AtomicUsize>,
}

/// The broker's shared state: who subscribed to what, which session holds each client id.
#[derive(Default)]
pub(super) struct Routes {
    pub(super) subscribers: Mutex<Vec<Subscriber>>,
    /// Client id → the session holding it, and how to tell it it was taken over.
    pub(super) clients: Mutex<HashMap<String, (u64, Arc<Notify>)>>,
    pub(super) next: AtomicU64,
    /// Bytes a subscriber may have waiting.
    pub(super) buffer_bytes: usize,
}

impl Routes {
    pub(super) fn forward(&self, topic: &str, payload: &Bytes) {
        let Ok(mut subs) = self.subscribers.lock() else {
            return;
        };
        let size = topic.len() + payload.len();
        subs.retain(|s| {
            if !s.filters.iter().any(|f| matches(f, topic)) {
                return true;
            }
            // A subscriber that lets its buffer fill (in bytes) is dropped, never waited for:
            // its session ends (its receiver sees the sender gone) and the client reconnects.
            if s.queued.load(Ordering::Relaxed) + size > self.buffer_bytes {
                return false;
            }
            s.queued.fetch_add(size, Ordering::Relaxed);
            s.tx.send((topic.to_string(), payload.clone())).is_ok()
        });
    }

    /// Hold `client_id` for session `id`: a session that held it is told to end.
    pub(super) fn take_over(&self, client_id: &str, id: u64, kicked: Arc<Notify>) {
        if client_id.is_empty() {
            return;
        }
        if let Ok(mut clients) = self.clients.lock()
            && let Some((old, notify)) = clients.insert(client_id.to_string(), (id, kicked))
        {
            debug!(client = %client_id, old, "client id taken over by a new connection");
            notify.notify_one();
        }
    }

    /// Forget session `id`'s subscriptions and client id (unless taken over meanwhile).
    pub(super) fn leave(&self, client_id: &str, id: u64) {
        if let Ok(mut subs) = self.subscribers.lock() {
            subs.retain(|s| s.id != id);
        }
        if let Ok(mut clients) = self.clients.lock()
            && clients
                .get(client_id)
                .is_some_and(|(holder, _)| *holder == id)
        {
            clients.remove(client_id);
        }
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
