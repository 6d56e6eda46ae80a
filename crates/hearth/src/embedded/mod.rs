//! Zero setup: `hearth up` with no server URL configured runs everything in one process on one
//! data folder (SPEC §1): the embedded MQTT [`broker`], the queue and store in SQLite
//! ([`queue`], [`store`], on threads of their own, [`db`]), the cache and fan-out in memory
//! ([`memory`]), two [`worker`]s (critical, routine), and the same API and dashboard.
//!
//! The guarantees are the distributed ones, scale aside: the broker acknowledges a message after
//! the COMMIT holding it; a worker acknowledges a queue entry after the COMMIT of its rows, and
//! the rows' dedup keys make a redelivery harmless; each lane is read in order by one worker;
//! the critical lane has a worker of its own; bad input goes to the dead letters with a reason.
//! A kill -9 at any point leaves every acknowledged event stored or still queued, none twice.

pub mod broker;
pub mod db;
pub mod memory;
pub mod queue;
pub mod store;
pub mod worker;

use std::path::Path;
use std::sync::Arc;

use tokio::task::JoinHandle;

use crate::alerts::rules::RuleSet;
use crate::seam::{Lanes, LatestCache, Seams};
use crate::shutdown::Shutdown;

/// The embedded backend: the four seams, and the concrete parts the workers need.
pub struct Embedded {
    pub seams: Seams,
    pub queue: Arc<queue::SqliteQueue>,
    pub store: Arc<store::SqliteStore>,
    pub cache: Arc<memory::MemoryCache>,
    pub fanout: Arc<memory::ChannelFanOut>,
}

impl Embedded {
    /// Open the data folder (created if missing) and warm the cache from the store. A sensor's
    /// row is rewritten at most every `touch_interval_ms` (`sensor_touch_interval_ms`).
    pub async fn open(
        data_dir: &Path,
        shards: u16,
        touch_interval_ms: u64,
    ) -> Result<Embedded, String> {
        let writer = db::Sqlite::open(data_dir, "writer")?;
        let reader = db::Sqlite::open(data_dir, "reader")?;
        let queue = Arc::new(queue::SqliteQueue::new(writer.clone(), shards));
        let store = Arc::new(store::SqliteStore::new(writer, reader, touch_interval_ms));
        let cache = Arc::new(memory::MemoryCache::default());
        let fanout = Arc::new(memory::ChannelFanOut::default());
        let latest = store.latest_events().await.map_err(|e| e.0)?;
        let refs: Vec<&crate::event::Event> = latest.iter().collect();
        cache.offer(&refs).await.map_err(|e| e.0)?;
        Ok(Embedded {
            seams: Seams {
                queue: queue.clone(),
                store: store.clone(),
                cache: cache.clone(),
                fanout: fanout.clone(),
            },
            queue,
            store,
            cache,
            fanout,
        })
    }

    /// Start the critical and the routine worker.
    pub fn workers(
        &self,
        rules: Arc<RuleSet>,
        batch_size: usize,
        shutdown: &Shutdown,
    ) -> Vec<JoinHandle<()>> {
        [Lanes::Critical, Lanes::Routine]
            .into_iter()
            .map(|lanes| {
                let w = worker::Worker {
                    lanes,
                    queue: self.queue.clone(),
                    store: self.store.clone(),
                    cache: self.cache.clone(),
                    fanout: self.fanout.clone(),
                    rules: rules.clone(),
                    batch_size,
                };
                tokio::spawn(w.run(shutdown.clone()))
            })
            .collect()
    }
}
