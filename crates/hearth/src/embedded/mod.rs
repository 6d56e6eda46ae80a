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
pub mod notifier;
pub mod queue;
pub mod store;
pub mod worker;

use std::path::Path;
use std::sync::Arc;

use tokio::task::JoinHandle;

use crate::alerts::rules::RuleSet;
use crate::seam::{Lanes, Seams};
use crate::shutdown::Shutdown;

/// Reader connections of the API's queries: one house's heavy read holds one of them, and the
/// others keep answering the other houses.
const READERS: usize = 3;

/// The data folder's lock: one `hearth up` per data folder (two would both work the same queue).
/// Held until dropped; the operating system releases it when the process dies, even by kill -9.
pub struct Lock {
    _file: std::fs::File,
}

/// The pid of the `hearth up` holding the data folder, if one runs (its workers are alive).
pub fn holder(data_dir: &Path) -> Option<u32> {
    let path = data_dir.join("hearth.lock");
    let file = std::fs::File::open(&path).ok()?;
    match file.try_lock_shared() {
        Ok(()) => None, // nobody holds it
        Err(_) => std::fs::read_to_string(&path).ok()?.trim().parse().ok(),
    }
}

/// Take the data folder for this process, or say which one holds it.
pub fn lock(data_dir: &Path) -> Result<Lock, String> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| format!("cannot create data_dir {}: {e}", data_dir.display()))?;
    let path = data_dir.join("hearth.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {
            let _ = file.set_len(0);
            let _ =
                std::io::Write::write_all(&mut &file, std::process::id().to_string().as_bytes());
            Ok(Lock { _file: file })
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            Err(format!(
                "data_dir {} is in use by another hearth (pid {}): stop it, or give this one another HEARTH_DATA_DIR",
                data_dir.display(),
                holder.trim()
            ))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(format!("cannot lock {}: {e}", path.display())),
    }
}

/// The embedded backend: the four seams, and the concrete parts the workers need.
pub struct Embedded {
    pub seams: Seams,
    pub queue: Arc<queue::SqliteQueue>,
    pub store: Arc<store::SqliteStore>,
    pub cache: Arc<memory::MemoryCache>,
    pub fanout: Arc<memory::ChannelFanOut>,
}

impl Embedded {
    /// Open the data folder (created if missing); the cache reads each sensor in from the store
    /// when first asked for it. A sensor's
    /// row is rewritten at most every `touch_interval_ms` (`sensor_touch_interval_ms`).
    /// `rules` says which alert transitions get a webhook notification.
    pub async fn open(
        data_dir: &Path,
        shards: u16,
        touch_interval_ms: u64,
        rules: &RuleSet,
        caps: crate::caps::Caps,
        retention: crate::dead_letter::Retention,
    ) -> Result<Embedded, String> {
        // Opening creates or migrates the schema: file work, off the executor.
        let dir = data_dir.to_path_buf();
        let (writer, reader) = tokio::task::spawn_blocking(move || {
            Ok::<_, String>((
                db::Sqlite::open(&dir, "writer")?,
                db::Sqlite::pool(&dir, "reader", READERS)?,
            ))
        })
        .await
        .map_err(|e| e.to_string())??;
        let queue = Arc::new(queue::SqliteQueue::new(
            writer.clone(),
            reader.clone(),
            shards,
            data_dir.to_path_buf(),
            retention,
        ));
        let store = Arc::new(store::SqliteStore::new(
            writer,
            reader,
            touch_interval_ms,
            rules,
            caps,
        ));
        let cache = Arc::new(memory::MemoryCache::over(store.clone()));
        let fanout = Arc::new(memory::ChannelFanOut::default());
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

    /// Start the critical and the routine worker, and the webhook notifier if a webhook is set.
    pub fn workers(
        &self,
        rules: Arc<RuleSet>,
        batch_size: usize,
        shutdown: &Shutdown,
    ) -> Vec<JoinHandle<()>> {
        let notifier = (!rules.webhooks.is_empty()).then(|| {
            tokio::spawn(notifier::run(
                self.store.clone(),
                rules.clone(),
                shutdown.clone(),
            ))
        });
        let sweeper = tokio::spawn(sweep_dead_letters(self.queue.clone(), shutdown.clone()));
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
            .chain(notifier)
            .chain(std::iter::once(sweeper))
            .collect()
    }
}

/// Remove the dead letters past their retention every [`crate::dead_letter::RETENTION_SWEEP`].
async fn sweep_dead_letters(queue: Arc<queue::SqliteQueue>, mut shutdown: Shutdown) {
    loop {
        match queue.expire_dead_letters().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(letters = n, "dead letters past their retention removed"),
            Err(e) => tracing::warn!(error = %e, "dead-letter retention sweep failed"),
        }
        if !shutdown.sleep(crate::dead_letter::RETENTION_SWEEP).await {
            return;
        }
    }
}
