//! The entities discovered so far, by the topics they are read from.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use super::{Announcement, Entity};

/// The entities discovered so far, by the topics they are read from. Shared by a process's
/// intakes; filled at start from what the queue kept, and as configs are appended.
pub struct Registry {
    inner: RwLock<Inner>,
    /// Entities held, readable without the lock: most homes have none, and every message asks.
    count: std::sync::atomic::AtomicUsize,
    /// Moves when an entity brings a topic no entity had: the ingest's sessions compare their
    /// subscriptions then ([`Registry::watch`]).
    fresh: tokio::sync::watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            inner: RwLock::default(),
            count: Default::default(),
            fresh: tokio::sync::watch::Sender::new(0),
        }
    }
}

#[derive(Default)]
struct Inner {
    by_config: HashMap<String, Arc<Entity>>,
    /// State and availability topic → config topics.
    by_topic: HashMap<String, Vec<String>>,
}

/// Most entities one installation keeps.
pub const MAX_ENTITIES: usize = 10_000;

impl Registry {
    /// Apply announcements (an entity announced, replaced, or removed).
    pub fn apply(&self, announcements: &[Announcement]) {
        let Ok(mut inner) = self.inner.write() else {
            return;
        };
        let mut fresh = false;
        for a in announcements {
            if let Some(old) = inner.by_config.remove(&a.config_topic) {
                for t in topics_of(&old) {
                    if let Some(list) = inner.by_topic.get_mut(&t) {
                        list.retain(|c| c != &a.config_topic);
                        if list.is_empty() {
                            inner.by_topic.remove(&t);
                        }
                    }
                }
            }
            let Some(entity) = &a.entity else { continue };
            if inner.by_config.len() >= MAX_ENTITIES {
                continue;
            }
            for t in topics_of(entity) {
                let inner = &mut *inner;
                let list = inner.by_topic.entry(t.clone()).or_default();
                if list.is_empty() {
                    fresh = true;
                }
                if !list.contains(&a.config_topic) {
                    list.push(a.config_topic.clone());
                }
            }
            inner
                .by_config
                .insert(a.config_topic.clone(), entity.clone());
        }
        self.count
            .store(inner.by_config.len(), std::sync::atomic::Ordering::Relaxed);
        drop(inner);
        if fresh {
            self.fresh.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    pub fn len(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a config may be kept: a removal, or a config of an entity held, always; a new
    /// entity while fewer than [`MAX_ENTITIES`] are held.
    pub fn admits(&self, a: &Announcement) -> bool {
        a.entity.is_none()
            || self.len() < MAX_ENTITIES
            || self
                .inner
                .read()
                .is_ok_and(|i| i.by_config.contains_key(&a.config_topic))
    }

    /// Whether a config is new, or says something else than the one kept.
    pub fn differs(&self, a: &Announcement) -> bool {
        self.inner.read().map_or(true, |i| {
            i.by_config.get(&a.config_topic).map(|e| e.as_ref()) != a.entity.as_deref()
        })
    }

    /// Whether entities are read from `topic`.
    pub fn reads(&self, topic: &str) -> bool {
        !self.is_empty()
            && self
                .inner
                .read()
                .is_ok_and(|i| i.by_topic.contains_key(topic))
    }

    /// The entities read from `topic`.
    pub fn entities(&self, topic: &str) -> Vec<Arc<Entity>> {
        let Ok(inner) = self.inner.read() else {
            return Vec::new();
        };
        inner
            .by_topic
            .get(topic)
            .into_iter()
            .flatten()
            .filter_map(|c| inner.by_config.get(c).cloned())
            .collect()
    }

    /// Every topic entities are read from.
    pub fn topics(&self) -> Vec<String> {
        self.inner
            .read()
            .map(|i| i.by_topic.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Changes whenever an entity brings a topic no entity had.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.fresh.subscribe()
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registry({} entities)", self.len())
    }
}

fn topics_of(e: &Entity) -> Vec<String> {
    let mut out: Vec<String> = e.state_topic.iter().cloned().collect();
    out.extend(e.availability.iter().map(|a| a.topic.clone()));
    out.retain(|t| !t.is_empty() && !t.contains(['+', '#']) && t.len() <= 1024);
    out.dedup();
    out
}
