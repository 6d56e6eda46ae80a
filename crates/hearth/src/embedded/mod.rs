//! The embedded backend, twin of [`crate::servers`]: `hearth up` with no server URL configured
//! runs everything in one process on one data folder: the embedded MQTT [`broker`], the queue,
//! store and alerts in SQLite ([`queue`], [`store`], [`alerts`], on threads of their own,
//! [`db`]), the cache and fan-out in memory ([`memory`]); the same worker, intake, API and
//! dashboard as on the servers, through the same seams.
//!
//! | seam | here |
//! |------|------|
//! | [`EventQueue`](crate::seam::EventQueue), [`Reader`](crate::seam::Reader) | [`queue`] |
//! | [`Ownership`](crate::seam::Ownership) | every lane, held by the one process |
//! | [`EventStore`](crate::seam::EventStore) | [`store`] |
//! | [`AlertStore`](crate::seam::AlertStore) | [`alerts`] |
//! | [`LatestCache`](crate::seam::LatestCache), [`FanOut`](crate::seam::FanOut) | [`memory`] |
//!
//! The guarantees are the distributed ones, scale aside: the broker acknowledges a message after
//! the COMMIT holding it; a worker acknowledges a queue entry after the COMMIT of its rows, and
//! the rows' dedup keys make a redelivery harmless; each lane is read in order by one consumer;
//! the critical lane has a consumer of its own; bad input goes to the dead letters with a
//! reason. A kill -9 at any point leaves every acknowledged event stored or still queued, none
//! twice.

pub mod alerts;
pub mod broker;
pub mod db;
mod dead_letters;
pub mod kept;
pub mod memory;
pub mod notifier;
pub mod queue;
pub mod reader;
pub mod retention;
mod rollups;
pub mod sessions;
pub mod store;
mod topics;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::alerts::rules::RuleSet;
use crate::lane::Lane;
use crate::seam::{Backend, Fence, Fut, Ownership, Parts, Pool, Seams, Unavailable};
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

/// The embedded backend: the seams, and the concrete parts its tasks need.
pub struct Embedded {
    pub seams: Seams,
    pub queue: Arc<queue::SqliteQueue>,
    pub store: Arc<store::SqliteStore>,
    pub alerts: Arc<alerts::SqliteAlerts>,
    pub cache: Arc<memory::MemoryCache>,
    pub fanout: Arc<memory::ChannelFanOut>,
    rules: Arc<RuleSet>,
    /// The file's writer, for the broker's retained messages and wills.
    writer: db::Sqlite,
}

impl Embedded {
    /// Open the data folder (created if missing); the cache reads each sensor in from the store
    /// when first asked for it. A sensor's row is rewritten at most every `touch_interval_ms`
    /// (`sensor_touch_interval_ms`). `rules` say which alert transitions get a webhook
    /// notification, and what the offline sweep looks for.
    pub async fn open(
        data_dir: &Path,
        shards: u16,
        touch_interval_ms: u64,
        rules: Arc<RuleSet>,
        caps: crate::caps::Caps,
        retention: crate::dead_letter::Retention,
        keep: crate::keep::Keep,
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
        let queue = Arc::new(
            queue::SqliteQueue::new(
                writer.clone(),
                reader.clone(),
                shards,
                data_dir.to_path_buf(),
                retention,
            )
            .await
            .map_err(|e| e.to_string())?,
        );
        let store = Arc::new(store::SqliteStore::new(
            writer.clone(),
            reader.clone(),
            touch_interval_ms,
            caps,
            keep,
        ));
        let alerts = Arc::new(alerts::SqliteAlerts::new(
            writer.clone(),
            reader,
            rules.clone(),
            shards,
        ));
        let cache = Arc::new(memory::MemoryCache::over(store.clone()));
        let fanout = Arc::new(memory::ChannelFanOut::default());
        Ok(Embedded {
            seams: Seams {
                queue: queue.clone(),
                store: store.clone(),
                alerts: alerts.clone(),
                cache: cache.clone(),
                fanout: fanout.clone(),
            },
            queue,
            store,
            alerts,
            cache,
            fanout,
            rules,
            writer,
        })
    }
}

/// One process holds every lane: ownership is trivial, and the store checks no fence.
struct Everything {
    lanes: Vec<Lane>,
    taken: bool,
}

impl Ownership for Everything {
    /// Every lane, the first time (so that what a crash left is read and pushed first).
    fn rebalance(&mut self) -> Fut<'_, Vec<Lane>> {
        let taken = if self.taken {
            Vec::new()
        } else {
            self.taken = true;
            self.lanes.clone()
        };
        Box::pin(async move { Ok(taken) })
    }

    fn held(&mut self) -> Vec<Fence> {
        self.lanes.iter().map(|l| (*l, 0)).collect()
    }

    fn lost(&mut self, _lanes: &[Lane]) {}

    fn period(&self) -> Duration {
        Duration::from_millis(500)
    }

    fn release(&mut self) -> Fut<'_, ()> {
        Box::pin(async move { Ok(()) })
    }
}

impl Backend for Embedded {
    fn seams(&self) -> &Seams {
        &self.seams
    }

    /// Every consumer reads the one queue (its name is the servers' affair).
    fn consumer(&self, pool: Pool, _name: &str) -> Result<Parts, Unavailable> {
        Ok(Parts {
            reader: Box::new(reader::SqliteReader::new((*self.queue).clone())),
            ownership: Box::new(Everything {
                lanes: pool.lanes(self.queue.shards()),
                taken: false,
            }),
            store: self.store.clone(),
            alerts: self.alerts.clone(),
        })
    }

    /// One: a second would share the same lanes, and SQLite writes one transaction at a time.
    fn routine_consumers(&self) -> usize {
        1
    }

    /// Dead-letter retention, and the webhook notifier when a webhook is set.
    fn background(&self, shutdown: &Shutdown) -> Vec<JoinHandle<()>> {
        let mut tasks = vec![tokio::spawn(crate::sweeps::dead_letters(
            self.seams.queue.clone(),
            shutdown.clone(),
        ))];
        tasks.push(tokio::spawn(crate::sweeps::retention(
            self.seams.store.clone(),
            shutdown.clone(),
        )));
        tasks.push(tokio::spawn(crate::sweeps::rollups(
            self.seams.store.clone(),
            shutdown.clone(),
        )));
        if !self.rules.webhooks.is_empty() {
            tasks.push(tokio::spawn(notifier::run(
                self.alerts.clone(),
                self.rules.clone(),
                shutdown.clone(),
            )));
        }
        tasks
    }
}

impl Embedded {
    /// The broker's retained messages, and the wills and sessions the last run left
    /// ([`kept::Kept`]).
    pub async fn kept(
        &self,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<(kept::Kept, kept::Left), crate::seam::Unavailable> {
        kept::Kept::open(self.writer.clone(), max_count, max_bytes).await
    }
}
