//! The servers backend: the seams on Redis (the queue on Redis Streams, the latest-value cache,
//! the fan-out on pub/sub, lane leases) and PostgreSQL (events, alerts, fencing tokens). It is
//! the production stack: any number of ingest, worker and API processes share it.
//!
//! | seam | here |
//! |------|------|
//! | [`EventQueue`](crate::seam::EventQueue), [`Reader`](crate::seam::Reader) | [`reader`] on [`queue`] |
//! | [`Ownership`](crate::seam::Ownership) | [`ownership`] on [`lease`] and the store's fences |
//! | [`EventStore`](crate::seam::EventStore) | [`pg`] on [`store`] and [`schema`] |
//! | [`AlertStore`](crate::seam::AlertStore) | [`alerts`] |
//! | [`LatestCache`](crate::seam::LatestCache) | [`cache`] |
//! | [`FanOut`](crate::seam::FanOut) | [`fanout`] |

pub mod alerts;
pub mod cache;
pub mod circuits;
pub mod conn;
pub mod dead_letters;
pub mod discovery;
pub mod fanout;
pub mod keys;
pub mod lease;
pub mod notifier;
pub mod order;
pub mod ownership;
pub mod pg;
pub mod pg_tls;
pub mod postgres;
pub mod queue;
pub mod reader;
pub mod retention;
mod rollups;
pub mod schema;
pub mod slots;
pub mod status;
pub mod store;
pub mod stream;
pub mod txn;

use std::sync::Arc;
use std::time::Duration;

use crate::alerts::rules::RuleSet;
use crate::config::Config;
use crate::seam::{Backend, Parts, Pool, Seams, Unavailable};
use crate::shutdown::Shutdown;

impl From<store::StoreError> for Unavailable {
    fn from(e: store::StoreError) -> Self {
        Unavailable(format!("database: {e}"))
    }
}

/// The servers, as the worker, the API and the intakes use them.
pub struct Servers {
    config: Arc<Config>,
    rules: Arc<RuleSet>,
    queue: queue::Queue,
    seams: Seams,
}

impl Servers {
    /// Open the seams on the configured servers (connections are made on first use).
    pub fn open(config: Arc<Config>, rules: Arc<RuleSet>) -> Result<Servers, queue::QueueError> {
        let queue = queue::Queue::from_config(&config)?;
        let writer = Arc::new(pg::Writer::new(
            &config.database_url,
            Duration::from_secs(30),
        ));
        // One pool of read connections for the store and the alerts (the API's reads).
        let reads = Arc::new(postgres::Db::new(&config.database_url));
        let seams = Seams {
            queue: Arc::new(queue::RedisQueue {
                queue: queue.clone(),
            }),
            store: Arc::new(pg::PgStore::new(&config, writer.clone(), reads.clone())),
            alerts: Arc::new(alerts::PgAlerts::new(
                reads,
                writer,
                rules.clone(),
                config.shards,
            )),
            cache: Arc::new(cache::RedisCache {
                cache: cache::Cache::new(queue.conn.clone(), queue.keys.clone()),
                queue: queue.clone(),
            }),
            fanout: Arc::new(fanout::RedisFanOut {
                queue: queue.clone(),
                redis_url: config.redis_url.clone(),
                rules: rules.clone(),
            }),
        };
        Ok(Servers {
            config,
            rules,
            queue,
            seams,
        })
    }

    /// The ingest's slots (every broker's `ingest_slots`), leased among the ingest processes.
    pub fn ingest_slots(&self) -> Box<dyn crate::ingest::Slots> {
        let count = self.config.mqtt_urls().len() as u32 * u32::from(self.config.ingest_slots);
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "host".into());
        let owner = format!(
            "{host}-{}-ingest-{:04x}",
            std::process::id(),
            fastrand::u16(..)
        );
        Box::new(slots::LeasedSlots::new(
            &self.queue,
            count,
            &owner,
            Duration::from_millis(self.config.lease_ttl_ms),
        ))
    }

    pub fn queue(&self) -> &queue::Queue {
        &self.queue
    }
}

impl Backend for Servers {
    fn seams(&self) -> &Seams {
        &self.seams
    }

    /// A consumer's own reader (its name in the consumer group), lease ownership, and one
    /// PostgreSQL session for its events, alerts and fences.
    fn consumer(&self, pool: Pool, name: &str) -> Result<Parts, Unavailable> {
        let config = &self.config;
        let ttl = Duration::from_millis(config.lease_ttl_ms);
        // Below the lease time: a transaction of ours left open by a pause must not block the
        // lane's next owner for longer than it takes to notice we are gone.
        let writer = Arc::new(pg::Writer::new(&config.database_url, ttl / 2));
        // A consumer reads little (rule states at a lane's takeover): one connection.
        let reads = Arc::new(postgres::Db::sized(&config.database_url, 1));
        Ok(Parts {
            reader: Box::new(
                reader::RedisReader::new(self.queue.clone(), &config.redis_url, name).leased(),
            ),
            ownership: Box::new(ownership::LeaseOwnership::new(
                &self.queue,
                writer.clone(),
                pool,
                name,
                ttl,
            )),
            store: Arc::new(pg::PgStore::new(config, writer.clone(), reads.clone())),
            alerts: Arc::new(alerts::PgAlerts::new(
                reads,
                writer,
                self.rules.clone(),
                config.shards,
            )),
        })
    }

    fn routine_consumers(&self) -> usize {
        usize::from(self.config.workers)
    }

    /// Dead-letter retention, readings' and alerts' retention, the rollups' fold, this process's
    /// circuit states shared for the pipeline view, and the webhook notifier when a webhook is set.
    fn background(&self, shutdown: &Shutdown) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = vec![
            tokio::spawn(crate::sweeps::dead_letters(
                self.seams.queue.clone(),
                shutdown.clone(),
            )),
            tokio::spawn(circuits::share(self.queue.clone(), shutdown.clone())),
            tokio::spawn(crate::sweeps::retention(
                self.seams.store.clone(),
                shutdown.clone(),
            )),
            tokio::spawn(crate::sweeps::rollups(
                self.seams.store.clone(),
                shutdown.clone(),
            )),
        ];
        if !self.rules.webhooks.is_empty() {
            tasks.push(tokio::spawn(notifier::run(
                self.config.clone(),
                self.rules.clone(),
                shutdown.clone(),
            )));
        }
        tasks
    }
}
