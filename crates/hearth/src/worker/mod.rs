//! The worker: from the lanes to the store, the cache and the pushes, written once over the
//! seams and run by `hearth worker`, `hearth up` and the embedded `hearth up` alike.
//!
//! A worker process runs consumers: one for the critical lane, on a thread (and runtime) of its
//! own so that a routine batch busy on the executor never delays a smoke alarm, and
//! [`Backend::routine_consumers`] for the routine lanes. Each consumer holds a fair share of its
//! pool's lanes ([`crate::seam::Ownership`]: leases and fences on the servers, everything
//! embedded), and only the holder of a lane reads it: that is how the events of one sensor are
//! processed one after the other, in append order, by any number of consumers in any number of
//! processes. Taking a lane over starts with its pending entries, oldest first.
//!
//! For each batch ([`batch`]): store the events in one write that proves the lanes are held,
//! evaluate the rules and write their transitions the same way, offer the events to the cache,
//! push the alerts (and the events of watched houses), then acknowledge. Between batches
//! ([`alerting`]): re-push what a lane's former owner left unpushed, sweep for silent sensors;
//! while the store is down, push critical alerts provisionally. A crash
//! anywhere before the acknowledgement hands the batch out again, and the dedup keys make that
//! harmless. A server error at any step is retried in place with backoff, the batch kept in
//! hand; it is never a reason to dead-letter. An entry that fails for its own content is handed
//! out again until `max_deliveries`, then given up on with its dead letters.

mod alerting;
mod batch;
pub mod sequence;

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::alerts::engine::Engine;
use crate::alerts::rules::RuleSet;
use crate::backoff::Backoff;
use crate::config::Config;
use crate::lane::Lane;
use crate::seam::{Backend, FanOut, LatestCache, Parts, Pool, Unavailable};
use crate::shutdown::Shutdown;
use sequence::SequenceTracker;

/// What a consumer needs of the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub batch_size: usize,
    pub max_deliveries: u64,
}

impl Settings {
    pub fn from_config(config: &Config) -> Settings {
        Settings {
            batch_size: config.batch_size,
            max_deliveries: u64::from(config.max_deliveries),
        }
    }
}

/// Run a worker process's consumers, and the backend's tasks beside them, until shutdown.
pub async fn run(
    backend: Arc<dyn Backend>,
    settings: Settings,
    rules: Arc<RuleSet>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    let critical = {
        let (backend, rules, shutdown) = (backend.clone(), rules.clone(), shutdown.clone());
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("hearth-critical".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(consume(
                        backend,
                        settings,
                        rules,
                        Pool::Critical,
                        0,
                        shutdown,
                    )),
                    Err(e) => tracing::error!(error = %e, "cannot start the critical consumer"),
                }
                let _ = done.send(());
            })?;
        finished
    };
    tasks.spawn(async move {
        let _ = critical.await;
    });
    for i in 0..backend.routine_consumers() {
        tasks.spawn(consume(
            backend.clone(),
            settings,
            rules.clone(),
            Pool::Routine,
            i,
            shutdown.clone(),
        ));
    }
    for task in backend.background(&shutdown) {
        tasks.spawn(async move {
            let _ = task.await;
        });
    }
    while let Some(done) = tasks.join_next().await {
        done?;
    }
    Ok(())
}

/// Run one consumer until shutdown. A panic (a bug) does not leave its lanes unserved: it is
/// logged and the consumer starts over with new parts (what it held is handed out again).
pub async fn consume(
    backend: Arc<dyn Backend>,
    settings: Settings,
    rules: Arc<RuleSet>,
    pool: Pool,
    index: usize,
    shutdown: Shutdown,
) {
    use futures_util::FutureExt;
    let mut backoff = Backoff::default();
    while !shutdown.is_set() {
        let name = consumer_name(pool, index);
        let parts = match backend.consumer(pool, &name) {
            Ok(parts) => parts,
            Err(e) => {
                warn!(consumer = %name, error = %e, "worker cannot start, retrying");
                if !shutdown.clone().sleep(backoff.next_delay()).await {
                    return;
                }
                continue;
            }
        };
        let seams = backend.seams();
        let mut consumer = Consumer::new(
            name.clone(),
            pool,
            settings,
            parts,
            seams.cache.clone(),
            seams.fanout.clone(),
            rules.clone(),
            shutdown.clone(),
        );
        let run = std::panic::AssertUnwindSafe(consumer.run());
        match run.catch_unwind().await {
            Ok(()) => return,
            Err(_) => {
                tracing::error!(consumer = %name, "worker panicked; starting over");
                if !shutdown.clone().sleep(Duration::from_secs(1)).await {
                    return;
                }
            }
        }
    }
}

/// Unique among live and past consumers: host, pid, pool, index, and a random tag because pids
/// are reused.
fn consumer_name(pool: Pool, index: usize) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    format!(
        "{host}-{}-{}{index}-{:04x}",
        std::process::id(),
        pool.name(),
        fastrand::u16(..)
    )
}

/// One consumer: its parts, the rules engine's memory, and what it must do between batches.
struct Consumer {
    name: String,
    pool: Pool,
    settings: Settings,
    parts: Parts,
    cache: Arc<dyn LatestCache>,
    fanout: Arc<dyn FanOut>,
    engine: Engine,
    sequences: SequenceTracker,
    shutdown: Shutdown,
    next_rebalance: Instant,
    /// Lanes taken over whose alerts' last transitions may not have been pushed.
    repush: BTreeSet<Lane>,
    /// Critical entries whose alerts were pushed while the store was unreachable.
    provisional: HashSet<String>,
    /// Houses with WebSocket clients watching their events.
    watched: Watched,
    next_sweep: Instant,
}

/// The houses whose events are pushed (`*`: all), as a consumer last read them.
struct Watched {
    read: Instant,
    /// [`crate::seam::FanOut::watch_changes`] when they were read.
    changes: u64,
    houses: HashSet<String>,
}

impl Consumer {
    #[allow(clippy::too_many_arguments)]
    fn new(
        name: String,
        pool: Pool,
        settings: Settings,
        parts: Parts,
        cache: Arc<dyn LatestCache>,
        fanout: Arc<dyn FanOut>,
        rules: Arc<RuleSet>,
        shutdown: Shutdown,
    ) -> Consumer {
        let long_ago = Instant::now()
            .checked_sub(Duration::from_secs(60))
            .unwrap_or_else(Instant::now);
        Consumer {
            name,
            pool,
            settings,
            parts,
            cache,
            fanout,
            engine: Engine::new(rules),
            sequences: SequenceTracker::default(),
            shutdown,
            next_rebalance: Instant::now(),
            repush: BTreeSet::new(),
            provisional: HashSet::new(),
            watched: Watched {
                read: long_ago,
                changes: 0,
                houses: HashSet::new(),
            },
            next_sweep: Instant::now(),
        }
    }

    async fn run(&mut self) {
        info!(consumer = %self.name, pool = self.pool.name(), "worker started");
        let mut backoff = Backoff::default();
        while !self.shutdown.is_set() {
            match self.step().await {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    crate::metrics::dependency_error(dependency(&e));
                    warn!(consumer = %self.name, error = %e, "worker step failed, retrying");
                    // A read whose reply was lost may have handed entries to us: take them
                    // back through the pending list before reading anything new.
                    for (lane, _) in self.parts.ownership.held() {
                        self.parts.reader.retake(lane);
                    }
                    if !self.shutdown.clone().sleep(backoff.next_delay()).await {
                        break;
                    }
                }
            }
        }
        // What was read and not acknowledged stays pending; handing the lanes back lets the
        // next owner take it over at once instead of after the lease time.
        if let Err(e) = self.parts.ownership.release().await {
            tracing::debug!(consumer = %self.name, error = %e, "release failed; the leases will expire");
        }
        info!(consumer = %self.name, "worker stopped");
    }

    async fn step(&mut self) -> Result<(), Unavailable> {
        let period = self.parts.ownership.period();
        if Instant::now() >= self.next_rebalance {
            let taken = self.parts.ownership.rebalance().await?;
            self.next_rebalance = Instant::now() + period;
            if !taken.is_empty() {
                // Another consumer may have stored these lanes' readings in between: start gap
                // tracking and rule state over, read what is pending first, and push what the
                // former owner may have left unpushed.
                self.sequences.clear();
                self.engine.forget();
                for lane in taken {
                    info!(consumer = %self.name, %lane, "took lane");
                    self.parts.reader.retake(lane);
                    self.repush.insert(lane);
                }
            }
        }
        self.housekeeping().await?;
        let lanes: Vec<Lane> = self
            .parts
            .ownership
            .held()
            .into_iter()
            .map(|(l, _)| l)
            .collect();
        if lanes.is_empty() {
            self.shutdown.clone().sleep(period).await;
            return Ok(());
        }
        // Short enough to notice shutdown and rebalance.
        let wait = period.min(Duration::from_millis(1000));
        let batch = self
            .parts
            .reader
            .read(&lanes, self.settings.batch_size, wait)
            .await?;
        if !batch.is_empty() {
            self.process(batch).await;
        }
        Ok(())
    }
}

/// The dependency an error came from, for `hearth_dependency_errors_total`.
fn dependency(e: &Unavailable) -> &'static str {
    let text = e.0.as_str();
    if text.starts_with("redis") {
        "redis"
    } else if text.starts_with("database") {
        "postgres"
    } else {
        "embedded"
    }
}
