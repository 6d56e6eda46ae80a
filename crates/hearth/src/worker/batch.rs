//! One batch, from the reader to the acknowledgement: store, rules (and their transitions,
//! fenced like the rows), cache, pushes, ack, in that order, each retried in place on a server
//! error; then the pushed alerts marked pushed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::Consumer;
use crate::alerts::{Alert, AlertState};
use crate::backoff::Backoff;
use crate::dead_letter::DeadLetter;
use crate::event::{Event, Reason, Rejection};
use crate::lane::Lane;
use crate::metrics::METRICS;
use crate::seam::{Delivery, Unavailable, WriteError, Written};

/// How often the set of watched houses is read again even if no one advertised a new watch
/// (watches expire).
const WATCHED_REFRESH: Duration = Duration::from_secs(5);

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

impl Consumer {
    pub(super) async fn process(&mut self, batch: Vec<Delivery>) {
        let (mut entries, unreadable): (Vec<Delivery>, Vec<Delivery>) =
            batch.into_iter().partition(|d| d.unreadable.is_none());
        for entry in unreadable {
            if let Some(letter) = entry.unreadable_letter() {
                self.refuse(&entry, vec![letter]).await;
            }
        }
        if entries.is_empty() {
            return;
        }
        let started = Instant::now();
        let Some(stored) = self.store_entries(&mut entries).await else {
            return; // shutdown: the batch stays pending for the lanes' next owner
        };
        crate::fault::hit("after_store");
        let Stored {
            inserted,
            refused,
            capped,
        } = stored;
        let is_refused = |e: usize| refused.iter().any(|(r, _, _)| *r == e);
        let is_capped = |e: usize, i: usize| capped.iter().any(|(ce, ci, _)| *ce == e && *ci == i);
        let done: Vec<Delivery> = entries
            .iter()
            .enumerate()
            .filter(|(e, _)| !is_refused(*e))
            .map(|(_, d)| d.clone())
            .collect();
        let finished: u64 = done.iter().map(|d| d.events.len() as u64).sum();
        // What was stored: what the rules, the cache and the pushes see.
        let events: Vec<&Event> = entries
            .iter()
            .enumerate()
            .filter(|(e, _)| !is_refused(*e))
            .flat_map(|(e, entry)| {
                entry
                    .events
                    .iter()
                    .enumerate()
                    .filter(move |(i, _)| !is_capped(e, *i))
                    .map(|(_, ev)| ev)
            })
            .collect();
        let written = Written {
            stored: inserted,
            duplicates: finished
                .saturating_sub(inserted)
                .saturating_sub(capped.len() as u64),
            capped: capped.iter().map(|(_, _, why)| (0, why.clone())).collect(),
        };
        let letters = capped_letters(&entries, &capped);
        let lanes: Vec<Lane> = done.iter().map(|d| d.lane).collect();
        let Some(alerts) = self.evaluate_rules(&events, &lanes).await else {
            // Shutdown, or a lane lost on the way: nothing is acknowledged, and what is still
            // ours is taken again from the pending list.
            for lane in lanes {
                self.parts.reader.retake(lane);
            }
            return;
        };
        crate::fault::hit("after_rules");
        self.observe_stored(&entries, &events, &written, started);
        if !self
            .finish(&events, &alerts, &done, &written, &letters)
            .await
        {
            return;
        }
        crate::fault::hit("after_ack");
        self.pushed(&alerts).await;
        debug!(
            consumer = %self.name,
            entries = entries.len(),
            events = events.len(),
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
                    entries[e].lane, entries[e].id
                ),
                topic: format!("hearth/{}/{}", event.house_id, event.sensor_id),
                payload: serde_json::to_vec(event).unwrap_or_default(),
                source: "worker",
                at_ms: crate::event::now_us() / 1000,
            });
        }
        for (e, letters) in by_entry {
            self.refuse(&entries[e], letters).await;
        }
    }

    /// After the rules: the cache, the pushes, then the acknowledgement, each retried until it
    /// goes through (a crash in between leaves the entries pending; a newer cached value is
    /// never replaced by an older one, and an alert pushed twice is the same alert). Retried
    /// through a shutdown too: the batch in hand is finished before the worker stops.
    async fn finish(
        &mut self,
        events: &[&Event],
        alerts: &[Alert],
        done: &[Delivery],
        written: &Written,
        letters: &[DeadLetter],
    ) -> bool {
        let mut backoff = Backoff::default();
        let mut offered = false;
        let mut alerted = alerts.is_empty();
        let mut published = false;
        loop {
            let result = async {
                if !offered {
                    self.cache.offer(events).await?;
                    offered = true;
                }
                if !alerted {
                    self.fanout.push_alerts(alerts).await?;
                    alerted = true;
                }
                if !published {
                    self.publish_events(events).await?;
                    published = true;
                }
                self.parts.reader.ack(done, written, letters).await
            }
            .await;
            match result {
                Ok(()) => return true,
                Err(e) => {
                    crate::metrics::dependency_error(super::dependency(&e));
                    warn!(consumer = %self.name, error = %e, "cache, push or ack failed after the write, retrying");
                    // The batch is written: finishing it comes before stopping, so a shutdown
                    // does not end the retries (the process's grace period bounds them).
                    if self.shutdown.is_set() {
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    } else {
                        let _ = self.shutdown.clone().sleep(backoff.next_delay()).await;
                    }
                }
            }
        }
    }

    /// Metrics of a stored batch: counts, latency per event, gaps in sensors' seq.
    fn observe_stored(
        &mut self,
        entries: &[Delivery],
        events: &[&Event],
        written: &Written,
        started: Instant,
    ) {
        let now = crate::event::now_us();
        METRICS.stored.add(written.stored);
        METRICS.duplicates.add(written.duplicates);
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
        let gaps = self.sequences.observe(events.iter().copied());
        if gaps > 0 {
            METRICS.sequence_gaps.add(gaps);
            debug!(consumer = %self.name, gaps, "readings missing from sensors' seq");
        }
    }

    /// Store the entries' events, retrying server errors. Returns what was stored, refused and
    /// capped, or `None` on shutdown.
    async fn store_entries(&mut self, entries: &mut Vec<Delivery>) -> Option<Stored> {
        let mut backoff = Backoff::default();
        loop {
            let fences = self.parts.ownership.held();
            entries.retain(|e| fences.iter().any(|(l, _)| *l == e.lane));
            if entries.is_empty() {
                return Some(Stored::default());
            }
            crate::fault::pause("pause_before_store").await;
            crate::fault::hit("before_store");
            let all: Vec<&Event> = entries.iter().flat_map(|e| &e.events).collect();
            // Item index → (entry, event).
            let places: Vec<(usize, usize)> = entries
                .iter()
                .enumerate()
                .flat_map(|(e, entry)| (0..entry.events.len()).map(move |i| (e, i)))
                .collect();
            let redelivered = entries.iter().any(|e| e.redelivered);
            let store = self.parts.store.clone();
            let result = match store.write(&fences, &all, redelivered).await {
                Err(WriteError::Content(e)) => {
                    debug!(consumer = %self.name, error = %e, "batch refused, isolating the culprit");
                    self.isolate(entries, &fences).await
                }
                other => other.map(|w| Stored {
                    inserted: w.stored,
                    refused: Vec::new(),
                    capped: w
                        .capped
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
                Err(WriteError::Fenced(lanes)) => {
                    warn!(consumer = %self.name, lanes = ?lanes, "fenced out of lanes by a newer owner");
                    self.parts.ownership.lost(&lanes);
                }
                Err(e) => {
                    if let WriteError::Unavailable(u) = &e {
                        crate::metrics::dependency_error(super::dependency(u));
                        warn!(consumer = %self.name, error = %e, "store failed, retrying");
                    }
                    if self.pool == crate::seam::Pool::Critical {
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
    async fn isolate(
        &mut self,
        entries: &[Delivery],
        fences: &[crate::seam::Fence],
    ) -> Result<Stored, WriteError> {
        let mut stored = Stored::default();
        for (e, entry) in entries.iter().enumerate() {
            for (i, event) in entry.events.iter().enumerate() {
                match self.parts.store.write(fences, &[event], true).await {
                    Ok(w) => {
                        stored.inserted += w.stored;
                        stored
                            .capped
                            .extend(w.capped.into_iter().map(|(_, why)| (e, i, why)));
                    }
                    Err(WriteError::Content(detail)) => stored.refused.push((e, i, detail)),
                    Err(err) => return Err(err),
                }
            }
        }
        Ok(stored)
    }

    /// An entry that failed for its own content (unreadable, or events the store refused):
    /// handed out again until `max_deliveries`, then given up on with its `letters`.
    pub(super) async fn refuse(&mut self, entry: &Delivery, letters: Vec<DeadLetter>) {
        let mut backoff = Backoff::default();
        loop {
            let result = async {
                let deliveries = self.parts.reader.deliveries(entry).await?;
                if deliveries < self.settings.max_deliveries {
                    return Ok(false);
                }
                self.parts.reader.give_up(entry, &letters).await?;
                for l in &letters {
                    METRICS.rejected.with(l.reason).add(1);
                    warn!(consumer = %self.name, lane = %entry.lane, id = %entry.id, reason = l.reason, detail = %l.detail, deliveries, "dead-lettered");
                }
                Ok::<_, crate::seam::Unavailable>(true)
            }
            .await;
            match result {
                Ok(true) => return,
                Ok(false) => {
                    // Taken again through the pending list, with the lane's other leftovers.
                    self.parts.reader.retake(entry.lane);
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

    /// Evaluate the rules on stored `events` (of `lanes`) and write what changed. `None` on
    /// shutdown or when a lane was lost meanwhile (the lane's next owner evaluates the batch
    /// again).
    async fn evaluate_rules(&mut self, events: &[&Event], lanes: &[Lane]) -> Option<Vec<Alert>> {
        let mut backoff = Backoff::default();
        loop {
            let result: Result<Vec<Alert>, WriteError> = async {
                let to_load = self.engine.to_load(events);
                if !to_load.is_empty() {
                    let states = self.parts.alerts.load_states(&to_load).await?;
                    self.engine.load(&to_load, states);
                }
                let outcome = self.engine.evaluate(events);
                let alerts = if outcome.is_empty() {
                    Vec::new()
                } else {
                    let fences: Vec<crate::seam::Fence> = self
                        .parts
                        .ownership
                        .held()
                        .into_iter()
                        .filter(|(l, _)| lanes.contains(l))
                        .collect();
                    let mut wanted: Vec<Lane> = lanes.to_vec();
                    wanted.sort();
                    wanted.dedup();
                    if fences.len() != wanted.len() {
                        return Err(WriteError::Fenced(Vec::new()));
                    }
                    self.parts.alerts.write_outcome(&fences, &outcome).await?
                };
                self.engine.commit(outcome, events);
                Ok(alerts)
            }
            .await;
            match result {
                Ok(alerts) => {
                    for a in &alerts {
                        if a.state == AlertState::Active {
                            METRICS.alerts.with(a.severity.as_str()).add(1);
                        }
                        info!(alert = a.id, rule = %a.rule, sensor = %a.sensor_id, state = a.state.as_str(), "alert");
                    }
                    return Some(alerts);
                }
                Err(WriteError::Fenced(lost)) => {
                    warn!(consumer = %self.name, lanes = ?lost, "fenced out while writing alerts");
                    self.parts.ownership.lost(&lost);
                    self.engine.forget();
                    return None;
                }
                Err(e) => {
                    if let WriteError::Unavailable(u) = &e {
                        crate::metrics::dependency_error(super::dependency(u));
                    }
                    warn!(consumer = %self.name, error = %e, "writing alerts failed, retrying");
                    self.engine.forget();
                    if !self.shutdown.clone().sleep(backoff.next_delay()).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Before a batch's pushes: read the watched houses again if a watch was advertised since
    /// they were read (so a subscription answered before this batch's events were stored gets
    /// them), or every [`WATCHED_REFRESH`].
    async fn refresh_watched(&mut self) -> Result<(), Unavailable> {
        let changes = self.fanout.watch_changes().await?;
        if changes != self.watched.changes || self.watched.read.elapsed() >= WATCHED_REFRESH {
            // Counted first: a watch advertised in between is read again at the next batch.
            let houses = self.fanout.watched().await?;
            self.watched = super::Watched {
                read: Instant::now(),
                changes,
                houses,
            };
        }
        Ok(())
    }

    /// Publish the events of watched houses (read again first if a watch was advertised since
    /// they were read).
    async fn publish_events(&mut self, events: &[&Event]) -> Result<(), Unavailable> {
        if events.is_empty() {
            return Ok(());
        }
        self.refresh_watched().await?;
        let watched = &self.watched.houses;
        if watched.is_empty() {
            return Ok(());
        }
        let all = watched.contains("*");
        let messages = crate::alerts::event_messages(events, |h| all || watched.contains(h));
        if messages.is_empty() {
            return Ok(());
        }
        self.fanout.publish(&messages).await
    }

    /// Note that `alerts` were pushed (best effort: if this fails, the lane's next owner pushes
    /// them again, and a client sees the same alert twice).
    async fn pushed(&mut self, alerts: &[Alert]) {
        if alerts.is_empty() {
            return;
        }
        if let Err(e) = self.parts.alerts.mark_pushed(alerts).await {
            warn!(consumer = %self.name, error = %e, "could not mark alerts pushed");
        }
    }
}

/// One dead letter per entry for its events past a cap, holding those events.
fn capped_letters(entries: &[Delivery], capped: &Capped) -> Vec<DeadLetter> {
    let mut by_entry: BTreeMap<usize, (Vec<Rejection>, Vec<&Event>)> = BTreeMap::new();
    for (e, i, why) in capped {
        let slot = by_entry.entry(*e).or_default();
        slot.0.push(why.clone());
        slot.1.extend(entries[*e].events.get(*i));
    }
    by_entry
        .into_iter()
        .filter_map(|(e, (why, events))| {
            let context = format!("lane {}, entry {}", entries[e].lane, entries[e].id);
            DeadLetter::of_events(&events, &why, &context)
        })
        .collect()
}
