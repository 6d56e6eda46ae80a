//! Workers: from the lanes to PostgreSQL and the latest-value cache.
//!
//! A worker process runs several consumers. Each consumer owns a fair share of its pool's lanes
//! through leases ([`crate::servers::lease`]), and only the owner of a lane reads it: that is how
//! the events of one sensor are processed one after the other, in stream order, by any number of
//! workers in any number of processes. Taking a lane over (its owner died, or left) starts with
//! the lane's pending entries (XAUTOCLAIM from the start), oldest first, before any new entry.
//!
//! For each batch: decode, store in one transaction that checks the lanes' fencing tokens, update
//! the cache, then XACK. A server error at any step is retried in place with backoff, the batch
//! kept in hand; it is never a reason to dead-letter. An entry that fails for its own content
//! stays pending and is retried until `max_deliveries`, then moved to the dead-letter stream
//! together with its XACK.
//!
//! The critical lane is its own pool, with one consumer per worker process, so that a critical
//! event never waits behind a routine batch. That consumer runs on a thread (and runtime) of its
//! own: a routine batch busy decoding or building its statement on the process's executor never
//! delays it; the operating system shares the cores between them.

mod alerting;
pub mod sensors;
pub mod sequence;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use tracing::{debug, info, warn};

use crate::alerts::engine::Engine;
use crate::alerts::rules::RuleSet;
use crate::backoff::Backoff;
use crate::config::Config;
use crate::dead_letter::DeadLetter;
use crate::event::{Event, Reason, Rejection};
use crate::lane::Lane;
use crate::servers::cache::Cache;
use crate::servers::lease::Leases;
use crate::servers::queue::{self, Batch, Done, Queue, QueueError, StreamEntry};
use crate::servers::store::{Store, StoreError};
use crate::shutdown::Shutdown;
use sensors::SensorMemo;
use sequence::SequenceTracker;

use crate::metrics::{self, METRICS};

/// A set of lanes shared out among the consumers that serve it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    Routine,
    Critical,
}

impl Pool {
    pub fn name(self) -> &'static str {
        match self {
            Pool::Routine => "routine",
            Pool::Critical => "critical",
        }
    }

    fn lanes(self, shards: u16) -> Vec<Lane> {
        match self {
            Pool::Critical => vec![Lane::Critical],
            Pool::Routine => Lane::routine(shards).collect(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum WorkerError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Run the consumers of one worker process (`workers` routine ones and one critical one) and its
/// webhook notifier until shutdown.
pub async fn run(
    config: Arc<Config>,
    rules: Arc<RuleSet>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    let critical = {
        let (config, rules, shutdown) = (config.clone(), rules.clone(), shutdown.clone());
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("hearth-critical".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(consume(config, rules, Pool::Critical, 0, shutdown)),
                    Err(e) => tracing::error!(error = %e, "cannot start the critical consumer"),
                }
                let _ = done.send(());
            })?;
        finished
    };
    tasks.spawn(async move {
        let _ = critical.await;
    });
    for i in 0..config.workers {
        tasks.spawn(consume(
            config.clone(),
            rules.clone(),
            Pool::Routine,
            i.into(),
            shutdown.clone(),
        ));
    }
    if let Ok(queue) = Queue::from_config(&config) {
        tasks.spawn(crate::servers::queue::sweep_dead_letters(
            queue.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(crate::breaker::share(queue, shutdown.clone()));
    }
    if !rules.webhooks.is_empty() {
        tasks.spawn(crate::alerts::notify::run(
            config.clone(),
            rules.clone(),
            shutdown.clone(),
        ));
    }
    while let Some(done) = tasks.join_next().await {
        done?;
    }
    Ok(())
}

/// Run one consumer until shutdown.
pub async fn consume(
    config: Arc<Config>,
    rules: Arc<RuleSet>,
    pool: Pool,
    index: usize,
    shutdown: Shutdown,
) {
    let name = consumer_name(pool, index);
    match Consumer::new(config, rules, pool, name.clone(), shutdown) {
        Ok(mut c) => c.run().await,
        Err(e) => tracing::error!(consumer = %name, error = %e, "worker cannot start"),
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

/// A lane this consumer holds.
struct Held {
    token: i64,
    /// `Some(cursor)` while its pending entries are being taken over, from `cursor` on.
    recovering: Option<String>,
}

/// An entry read from a lane, with its events.
struct Entry {
    lane: Lane,
    raw: StreamEntry,
    events: Vec<Event>,
    /// Taken over from the pending list: some of its events may be stored already.
    redelivered: bool,
}

/// Why the store refused an event: (entry index, event index, detail).
type Refused = Vec<(usize, usize, String)>;

/// Events not stored because they would pass a cap: (entry index, event index, why).
type Capped = Vec<(usize, usize, Rejection)>;

/// What storing a batch did.
#[derive(Default)]
struct Stored {
    inserted: u64,
    /// Refused by the store for their content: retried with their entry, then dead-lettered.
    refused: Refused,
    /// Past a cap: dead-lettered at once, their entry acknowledged.
    capped: Capped,
}

struct Consumer {
    config: Arc<Config>,
    pool: Pool,
    name: String,
    lanes: Vec<Lane>,
    queue: Queue,
    leases: Leases,
    cache: Cache,
    /// The connection blocking reads tie up; reopened after an error.
    reader: Option<MultiplexedConnection>,
    store: Option<Store>,
    held: BTreeMap<Lane, Held>,
    /// The lanes the renewal task keeps alive; it drops the ones whose lease was lost.
    kept: Arc<Mutex<BTreeSet<Lane>>>,
    sensors: SensorMemo,
    shutdown: Shutdown,
    next_rebalance: Instant,
    /// Recent average of events per entry, to size reads in events.
    entry_size: f64,
    sequences: SequenceTracker,
    engine: Engine,
    caps: crate::caps::Caps,
    /// Lanes taken over whose alerts' last transitions may not have been pushed.
    repush: BTreeSet<Lane>,
    /// Critical entries whose alerts were pushed while the store was unreachable.
    provisional: std::collections::HashSet<String>,
    /// Houses with WebSocket clients watching their events (`*`: all), and when it was read.
    watched: (Instant, std::collections::HashSet<String>),
    next_sweep: Instant,
}

impl Consumer {
    fn new(
        config: Arc<Config>,
        rules: Arc<RuleSet>,
        pool: Pool,
        name: String,
        shutdown: Shutdown,
    ) -> Result<Self, QueueError> {
        let queue = Queue::from_config(&config)?;
        let leases = Leases::new(
            queue.conn.clone(),
            queue.keys.clone(),
            Duration::from_millis(config.lease_ttl_ms),
            pool.name(),
            &name,
        );
        Ok(Consumer {
            cache: Cache::new(queue.conn.clone(), queue.keys.clone()),
            lanes: pool.lanes(config.shards),
            sensors: SensorMemo::new(config.sensor_touch_interval_ms),
            caps: crate::caps::Caps::from_config(&config),
            config,
            pool,
            name,
            queue,
            leases,
            reader: None,
            store: None,
            held: BTreeMap::new(),
            kept: Arc::default(),
            shutdown,
            next_rebalance: Instant::now(),
            entry_size: 1.0,
            sequences: SequenceTracker::default(),
            engine: Engine::new(rules),
            repush: BTreeSet::new(),
            provisional: Default::default(),
            // Read at the first batch.
            watched: (
                Instant::now()
                    .checked_sub(Duration::from_secs(60))
                    .unwrap_or_else(Instant::now),
                Default::default(),
            ),
            next_sweep: Instant::now(),
        })
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(self.config.lease_ttl_ms)
    }

    async fn run(&mut self) {
        info!(consumer = %self.name, pool = self.pool.name(), "worker started");
        let renewer = self.spawn_renewer();
        let mut backoff = Backoff::default();
        while !self.shutdown.is_set() {
            match self.step().await {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    metrics::dependency_error(match e {
                        WorkerError::Queue(_) => "redis",
                        WorkerError::Store(_) => "postgres",
                    });
                    warn!(consumer = %self.name, error = %e, "worker step failed, retrying");
                    self.after_error(&e).await;
                    let delay = backoff.next_delay();
                    if !self.shutdown.clone().sleep(delay).await {
                        break;
                    }
                }
            }
        }
        // Whatever we read and did not acknowledge stays pending; handing the lanes back lets
        // the next owner take it over at once instead of after the lease TTL.
        for lane in self.held.keys().copied().collect::<Vec<_>>() {
            self.release(lane).await;
        }
        let _ = self.leases.leave().await;
        renewer.abort();
        info!(consumer = %self.name, "worker stopped");
    }

    async fn after_error(&mut self, e: &WorkerError) {
        match e {
            WorkerError::Queue(q) => {
                self.reader = None;
                if q.is_missing_group() {
                    let _ = self.queue.ensure_groups().await;
                }
                // A read whose reply was lost may have delivered entries to us: take them back
                // through the pending list before reading anything new.
                for held in self.held.values_mut() {
                    held.recovering.get_or_insert_with(|| "0-0".into());
                }
            }
            WorkerError::Store(_) => self.store = None,
        }
    }

    fn spawn_renewer(&self) -> tokio::task::JoinHandle<()> {
        let leases = self.leases.clone();
        let kept = self.kept.clone();
        let period = self.ttl() / 3;
        let name = self.name.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let lanes: Vec<Lane> = lock(&kept).iter().copied().collect();
                match leases.renew(&lanes).await {
                    Ok(lost) if lost.is_empty() => {}
                    Ok(lost) => {
                        warn!(consumer = %name, lanes = ?lost, "lease lost");
                        let mut kept = lock(&kept);
                        for lane in lost {
                            kept.remove(&lane);
                        }
                    }
                    Err(e) => warn!(consumer = %name, error = %e, "lease renewal failed"),
                }
            }
        })
    }

    /// Forget the lanes whose lease the renewal task found lost.
    fn sync_held(&mut self) {
        let kept = lock(&self.kept);
        self.held.retain(|lane, _| {
            let still = kept.contains(lane);
            if !still {
                warn!(consumer = %self.name, %lane, "lane lost; its pending entries go to the next owner");
            }
            still
        });
    }

    async fn step(&mut self) -> Result<(), WorkerError> {
        self.sync_held();
        if Instant::now() >= self.next_rebalance {
            self.rebalance().await?;
            self.next_rebalance = Instant::now() + self.ttl() / 3;
        }
        self.housekeeping().await?;
        if self.held.is_empty() {
            self.shutdown.clone().sleep(self.ttl() / 3).await;
            return Ok(());
        }
        let (batch, redelivered) = self.read().await?;
        if batch.iter().any(|(_, entries)| !entries.is_empty()) {
            self.process(batch, redelivered).await;
        }
        Ok(())
    }

    /// Hold `ceil(lanes / live consumers)` lanes: take free ones up to that, hand back extras.
    async fn rebalance(&mut self) -> Result<(), WorkerError> {
        let live = self.leases.live_consumers().await?;
        let share = self.lanes.len().div_ceil(live);
        while self.held.len() > share {
            if let Some(lane) = self.held.keys().next_back().copied() {
                info!(consumer = %self.name, %lane, share, "handing lane over");
                self.release(lane).await;
            }
        }
        // Start the search at a place of our own, so consumers do not all race for lane 0.
        let start = queue_offset(&self.name, self.lanes.len());
        let order: Vec<Lane> = self.lanes[start..]
            .iter()
            .chain(&self.lanes[..start])
            .copied()
            .collect();
        for lane in order {
            if self.held.len() >= share {
                break;
            }
            if self.held.contains_key(&lane) || !self.leases.acquire(lane).await? {
                continue;
            }
            let owner = self.name.clone();
            let token = match self.store().await?.take_fence(&lane.name(), &owner).await {
                Ok(token) => token,
                Err(e) => {
                    let _ = self.leases.release(lane).await;
                    return Err(e.into());
                }
            };
            info!(consumer = %self.name, %lane, token, "took lane");
            // Another consumer stored this lane's readings in between: start gap tracking and
            // rule state over, and push what it may have left unpushed.
            self.sequences.clear();
            self.engine.forget();
            self.repush.insert(lane);
            self.held.insert(
                lane,
                Held {
                    token,
                    recovering: Some("0-0".into()),
                },
            );
            lock(&self.kept).insert(lane);
        }
        Ok(())
    }

    async fn release(&mut self, lane: Lane) {
        self.held.remove(&lane);
        lock(&self.kept).remove(&lane);
        if let Err(e) = self.leases.release(lane).await {
            debug!(consumer = %self.name, %lane, error = %e, "release failed; the lease will expire");
        }
    }

    async fn store(&mut self) -> Result<&mut Store, StoreError> {
        if self.store.is_none() {
            // Below the lease TTL: a transaction of ours left open by a pause must not block
            // the lane's next owner for longer than it takes to notice we are gone.
            let idle = self.ttl() / 2;
            self.store = Some(Store::connect(&self.config.database_url, idle).await?);
        }
        Ok(self.store.as_mut().expect("just set"))
    }

    /// The next batch: pending entries of a lane being taken over first (then `true`: they may
    /// have been stored already), else new entries of every held lane.
    async fn read(&mut self) -> Result<(Batch, bool), WorkerError> {
        let block = self.block();
        if self.reader.is_none() {
            self.reader =
                Some(queue::connect(&self.config.redis_url, block + queue::REPLY_TIMEOUT).await?);
        }
        let reader = self.reader.as_mut().expect("just set");
        // Entries are batches of events: ask for about `batch_size` events' worth of them.
        let count = ((self.config.batch_size as f64 / self.entry_size).ceil() as usize)
            .clamp(1, self.config.batch_size);
        if let Some((lane, held)) = self.held.iter_mut().find(|(_, h)| h.recovering.is_some()) {
            let cursor = held.recovering.clone().unwrap_or_default();
            let (next, entries) = self
                .queue
                .claim_pending(reader, &self.name, *lane, &cursor, count)
                .await?;
            if next == "0-0" {
                held.recovering = None;
                debug!(consumer = %self.name, lane = %lane, "pending entries taken over");
            } else {
                held.recovering = Some(next);
            }
            return Ok((vec![(*lane, entries)], true));
        }
        let lanes: Vec<Lane> = self.held.keys().copied().collect();
        let batch = self
            .queue
            .read_new(reader, &self.name, &lanes, count, block)
            .await?;
        let (entries, events) = batch
            .iter()
            .flat_map(|(_, e)| e)
            .fold((0, 0), |(n, ev), e| (n + 1, ev + e.count.unwrap_or(1)));
        if entries > 0 {
            self.entry_size =
                0.8 * self.entry_size + 0.2 * (events as f64 / entries as f64).max(1.0);
        }
        Ok((batch, false))
    }

    /// How long a read waits for new entries: short enough to notice shutdown and rebalance.
    fn block(&self) -> Duration {
        (self.ttl() / 3).min(Duration::from_millis(1000))
    }

    async fn process(&mut self, batch: Batch, redelivered: bool) {
        let mut entries = Vec::new();
        for (lane, raws) in batch {
            for raw in raws {
                match raw.decode() {
                    Ok(events) => entries.push(Entry {
                        lane,
                        raw,
                        events,
                        redelivered,
                    }),
                    Err(detail) => {
                        let letter = DeadLetter {
                            reason: Reason::BadEntry.as_str(),
                            detail: format!("{detail} (lane {lane}, entry {})", raw.id),
                            topic: String::new(),
                            payload: raw.body.clone().unwrap_or_default(),
                            source: "worker",
                            at_ms: crate::event::now_us() / 1000,
                        };
                        let events = raw.count.unwrap_or(0);
                        self.refuse(lane, &raw, events, vec![letter]).await;
                    }
                }
            }
        }
        let started = Instant::now();
        let oldest_us = entries
            .iter()
            .flat_map(|e| &e.events)
            .map(|e| e.received_us)
            .min()
            .unwrap_or(0);
        let event_count: usize = entries.iter().map(|e| e.events.len()).sum();
        let Some(Stored {
            inserted,
            refused,
            capped,
        }) = self.store_entries(&mut entries).await
        else {
            return; // shutdown: the batch stays pending for the lanes' next owner
        };
        crate::fault::hit("after_store");

        let is_refused = |e: usize| refused.iter().any(|(r, _, _)| *r == e);
        let is_capped = |e: usize, i: usize| capped.iter().any(|(ce, ci, _)| *ce == e && *ci == i);
        let mut acks: BTreeMap<Lane, Vec<Done>> = BTreeMap::new();
        let mut finished = 0u64;
        for (_, entry) in entries.iter().enumerate().filter(|(i, _)| !is_refused(*i)) {
            finished += entry.events.len() as u64;
            acks.entry(entry.lane).or_default().push(Done {
                id: entry.raw.id.clone(),
                events: entry.events.len() as u64,
            });
        }
        let acks: Vec<(Lane, Vec<Done>)> = acks.into_iter().collect();
        // What was stored: what the rules, the cache and the pushes see.
        let events: Vec<&Event> = entries
            .iter()
            .enumerate()
            .filter(|(i, _)| !is_refused(*i))
            .flat_map(|(e, entry)| {
                entry
                    .events
                    .iter()
                    .enumerate()
                    .filter(move |(i, _)| !is_capped(e, *i))
                    .map(|(_, ev)| ev)
            })
            .collect();
        let capped_letters = capped_letters(&entries, &capped);
        let duplicates = finished
            .saturating_sub(inserted)
            .saturating_sub(capped.len() as u64);
        let lanes: BTreeSet<Lane> = entries.iter().map(|e| e.lane).collect();
        let Some(alerts) = self.evaluate_rules(&events, &lanes).await else {
            // Shutdown, or a lane lost on the way: nothing is acknowledged, and what is still
            // ours is taken again from the pending list.
            for lane in &lanes {
                if let Some(held) = self.held.get_mut(lane) {
                    held.recovering.get_or_insert_with(|| "0-0".into());
                }
            }
            return;
        };
        crate::fault::hit("after_rules");
        self.observe_stored(&entries, &events, inserted, duplicates, started);

        let mut backoff = Backoff::default();
        loop {
            // One round trip: the cache, the pushes, then the acknowledgements (a crash in
            // between leaves the entries pending; a newer value is never replaced by an older
            // one, and an alert pushed twice is the same alert).
            let mut pipe = redis::pipe();
            self.cache.add_update(&mut pipe, &events);
            self.add_pushes(&mut pipe, &alerts, &events);
            self.queue
                .add_dead(&mut pipe, &capped_letters, capped.len() as u64);
            self.queue.add_ack(&mut pipe, &acks, inserted, duplicates);
            let done = self.queue.exec(&pipe).await;
            match done {
                Ok(()) => {
                    crate::fault::hit("after_ack");
                    break;
                }
                Err(e) => {
                    metrics::dependency_error("redis");
                    warn!(consumer = %self.name, error = %e, "cache or ack failed after commit, retrying");
                    if !self.shutdown.clone().sleep(backoff.next_delay()).await {
                        return;
                    }
                }
            }
        }

        self.pushed(&alerts).await;
        debug!(
            consumer = %self.name,
            entries = entries.len(),
            events = event_count,
            oldest_ms = (crate::event::now_us() - oldest_us) / 1000,
            took_ms = started.elapsed().as_millis() as u64,
            "batch done"
        );
        // Entries with refused events: the refused ones are retried with the entry, then
        // dead-lettered one by one.
        let mut by_entry: BTreeMap<usize, Vec<DeadLetter>> = BTreeMap::new();
        for (e, i, detail) in refused {
            let event = &entries[e].events[i];
            by_entry.entry(e).or_default().push(DeadLetter {
                reason: Reason::StoreRejected.as_str(),
                detail: format!(
                    "{detail} (lane {}, entry {})",
                    entries[e].lane, entries[e].raw.id
                ),
                topic: format!("hearth/{}/{}", event.house_id, event.sensor_id),
                payload: serde_json::to_vec(event).unwrap_or_default(),
                source: "worker",
                at_ms: crate::event::now_us() / 1000,
            });
        }
        for (e, letters) in by_entry {
            let entry = &entries[e];
            self.refuse(entry.lane, &entry.raw, entry.events.len() as u64, letters)
                .await;
        }
    }

    /// Metrics of a committed batch: counts, latency per event, gaps in sensors' seq.
    fn observe_stored(
        &mut self,
        entries: &[Entry],
        events: &[&Event],
        inserted: u64,
        duplicates: u64,
        started: Instant,
    ) {
        let now = crate::event::now_us();
        METRICS.stored.add(inserted);
        METRICS.duplicates.add(duplicates);
        METRICS.batch_events.observe(events.len() as f64);
        METRICS
            .store_seconds
            .observe(started.elapsed().as_secs_f64());
        for (pool, critical) in [("critical", true), ("routine", false)] {
            let mut lane_events = entries
                .iter()
                .filter(|e| (e.lane == Lane::Critical) == critical)
                .flat_map(|e| &e.events)
                .peekable();
            if lane_events.peek().is_some() {
                let latency = METRICS.latency.with(pool);
                for e in lane_events {
                    latency.observe((now - e.received_us).max(0) as f64 / 1e6);
                }
            }
        }
        self.sensors.observe(events);
        let gaps = self.sequences.observe(events.iter().copied());
        if gaps > 0 {
            METRICS.sequence_gaps.add(gaps);
            debug!(consumer = %self.name, gaps, "readings missing from sensors' seq");
        }
    }

    /// Store the entries' events, retrying server errors. Returns what was stored, refused and
    /// capped, or `None` on shutdown.
    async fn store_entries(&mut self, entries: &mut Vec<Entry>) -> Option<Stored> {
        let mut backoff = Backoff::default();
        loop {
            self.sync_held();
            entries.retain(|e| self.held.contains_key(&e.lane));
            if entries.is_empty() {
                return Some(Stored::default());
            }
            let all: Vec<(Lane, &Event)> = entries
                .iter()
                .flat_map(|e| e.events.iter().map(move |ev| (e.lane, ev)))
                .collect();
            // Item index → (entry, event).
            let places: Vec<(usize, usize)> = entries
                .iter()
                .enumerate()
                .flat_map(|(e, entry)| (0..entry.events.len()).map(move |i| (e, i)))
                .collect();
            let redelivered = entries.iter().any(|e| e.redelivered);
            let result = match self.write(&all, redelivered).await {
                Err(StoreError::Content(e)) => {
                    debug!(consumer = %self.name, error = %crate::servers::store::describe(&e), "batch refused, isolating the culprit");
                    self.isolate(entries).await
                }
                other => other.map(|(inserted, capped)| Stored {
                    inserted,
                    refused: Vec::new(),
                    capped: capped
                        .into_iter()
                        .map(|(item, why)| (places[item].0, places[item].1, why))
                        .collect(),
                }),
            };
            match result {
                Ok(done) => {
                    self.provisional.clear();
                    return Some(done);
                }
                Err(StoreError::Fenced(lanes)) => {
                    for name in lanes {
                        if let Some(lane) = self.lanes.iter().find(|l| l.name() == name).copied() {
                            warn!(consumer = %self.name, %lane, "fenced out of lane by a newer owner");
                            self.held.remove(&lane);
                            lock(&self.kept).remove(&lane);
                        }
                    }
                }
                Err(e) => {
                    if !matches!(e, StoreError::CircuitOpen) {
                        metrics::dependency_error("postgres");
                        warn!(consumer = %self.name, error = %e, "store failed, retrying");
                        self.store = None;
                    }
                    if self.pool == Pool::Critical {
                        self.push_provisional(entries).await;
                    }
                    if !self.shutdown.clone().sleep(backoff.next_delay()).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Write the events one by one to find which the store refuses.
    async fn isolate(&mut self, entries: &[Entry]) -> Result<Stored, StoreError> {
        let mut stored = Stored::default();
        for (e, entry) in entries.iter().enumerate() {
            for (i, event) in entry.events.iter().enumerate() {
                match self.write(&[(entry.lane, event)], true).await {
                    Ok((n, capped)) => {
                        stored.inserted += n;
                        stored
                            .capped
                            .extend(capped.into_iter().map(|(_, why)| (e, i, why)));
                    }
                    Err(StoreError::Content(err)) => {
                        stored
                            .refused
                            .push((e, i, crate::servers::store::describe(&err)))
                    }
                    Err(err) => return Err(err),
                }
            }
        }
        Ok(stored)
    }

    /// Write events through PostgreSQL's circuit breaker: refused at once while it is open; an
    /// unreachable store, or a call slower than `store_slow_ms`, counts against it (a drowning
    /// database gets room, routine entries waiting in Redis, instead of more load).
    async fn write(
        &mut self,
        items: &[(Lane, &Event)],
        redelivered: bool,
    ) -> Result<(u64, Vec<(usize, Rejection)>), StoreError> {
        let breaker = &crate::breaker::POSTGRES;
        if !breaker.allow() {
            return Err(StoreError::CircuitOpen);
        }
        let started = Instant::now();
        let result = self.write_rows(items, redelivered).await;
        let slow = started.elapsed() > Duration::from_millis(self.config.store_slow_ms);
        match &result {
            Err(StoreError::Unavailable(_)) => breaker.failure(),
            _ if slow => breaker.failure(),
            _ => breaker.success(),
        }
        result
    }

    /// Write events within the caps; returns the rows inserted and the events (by index in
    /// `items`) that would pass a cap, not written.
    async fn write_rows(
        &mut self,
        items: &[(Lane, &Event)],
        redelivered: bool,
    ) -> Result<(u64, Vec<(usize, Rejection)>), StoreError> {
        let lanes: BTreeSet<Lane> = items.iter().map(|(l, _)| *l).collect();
        let fences: Vec<(String, i64)> = lanes
            .iter()
            .filter_map(|l| self.held.get(l).map(|h| (l.name(), h.token)))
            .collect();
        let all: Vec<&Event> = items.iter().map(|(_, e)| *e).collect();
        // Only sensors or kinds this consumer has not written can pass a cap: ask the store
        // about them alone (none, once a sensor's kinds are known).
        let unknown = self.sensors.unknown(&all);
        let capped = if unknown.is_empty() {
            Vec::new()
        } else {
            let caps = self.caps;
            self.store().await?.admit(&unknown, &all, &caps).await?
        };
        let events: Vec<&Event> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| !capped.iter().any(|(c, _)| c == i))
            .map(|(_, e)| *e)
            .collect();
        let seen = self.sensors.to_record(&events);
        crate::fault::pause("pause_before_store").await;
        crate::fault::hit("before_store");
        let n = self
            .store()
            .await?
            .write(&fences, &events, &seen, redelivered)
            .await?;
        self.sensors.recorded(seen);
        Ok((n, capped))
    }

    /// An entry that failed for its own content (unreadable, or events the store refused):
    /// left pending and retried until `max_deliveries`, then its `letters` are dead-lettered
    /// together with its XACK.
    async fn refuse(
        &mut self,
        lane: Lane,
        raw: &StreamEntry,
        events: u64,
        letters: Vec<DeadLetter>,
    ) {
        let mut backoff = Backoff::default();
        loop {
            let result = async {
                let deliveries = self.queue.deliveries(lane, &raw.id).await?;
                if deliveries < u64::from(self.config.max_deliveries) {
                    return Ok::<_, QueueError>(false);
                }
                let done = Done {
                    id: raw.id.clone(),
                    events,
                };
                self.queue.dead_letter(lane, &done, &letters).await?;
                for l in &letters {
                    METRICS.rejected.with(l.reason).add(1);
                    warn!(consumer = %self.name, %lane, id = %raw.id, reason = l.reason, detail = %l.detail, deliveries, "dead-lettered");
                }
                Ok(true)
            }
            .await;
            match result {
                Ok(true) => return,
                Ok(false) => {
                    // Take it again through the pending list, with the lane's other leftovers.
                    if let Some(held) = self.held.get_mut(&lane) {
                        held.recovering.get_or_insert_with(|| "0-0".into());
                    }
                    return;
                }
                Err(e) => {
                    warn!(consumer = %self.name, error = %e, "dead-lettering failed, retrying");
                    if !self.shutdown.clone().sleep(backoff.next_delay()).await {
                        return;
                    }
                }
            }
        }
    }
}

/// One dead letter per entry for its events past a cap, holding those events.
fn capped_letters(entries: &[Entry], capped: &Capped) -> Vec<DeadLetter> {
    let mut by_entry: BTreeMap<usize, (Vec<Rejection>, Vec<&Event>)> = BTreeMap::new();
    for (e, i, why) in capped {
        let slot = by_entry.entry(*e).or_default();
        slot.0.push(why.clone());
        slot.1.extend(entries[*e].events.get(*i));
    }
    by_entry
        .into_iter()
        .filter_map(|(e, (why, events))| {
            let context = format!("lane {}, entry {}", entries[e].lane, entries[e].raw.id);
            DeadLetter::of_events(&events, &why, &context)
        })
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn queue_offset(name: &str, n: usize) -> usize {
    let h = name
        .bytes()
        .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
    h % n.max(1)
}
