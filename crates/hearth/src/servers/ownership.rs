//! Lane ownership on the servers: a lease in Redis says which consumer works a lane, a fencing
//! token in PostgreSQL says whose writes count ([`super::lease`]). A task renews the leases
//! every third of their time; a lane whose lease was lost (a pause longer than the lease) is
//! dropped at the next look, and a write with its old token is refused by the store.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{debug, info, warn};

use super::lease::Leases;
use super::pg::Writer;
use super::queue::Queue;
use crate::lane::Lane;
use crate::seam::{Fence, Fut, Ownership, Pool};

pub struct LeaseOwnership {
    name: String,
    lanes: Vec<Lane>,
    leases: Leases,
    writer: Arc<Writer>,
    /// Lane → fencing token.
    held: BTreeMap<Lane, i64>,
    /// The lanes the renewal task keeps alive; it drops the ones whose lease was lost.
    kept: Arc<Mutex<BTreeSet<Lane>>>,
    renewer: Option<tokio::task::JoinHandle<()>>,
    ttl: Duration,
}

impl LeaseOwnership {
    pub fn new(
        queue: &Queue,
        writer: Arc<Writer>,
        pool: Pool,
        name: &str,
        ttl: Duration,
    ) -> LeaseOwnership {
        LeaseOwnership {
            name: name.to_string(),
            lanes: pool.lanes(queue.shards),
            leases: Leases::new(
                queue.conn.clone(),
                queue.keys.clone(),
                ttl,
                pool.name(),
                name,
            ),
            writer,
            held: BTreeMap::new(),
            kept: Arc::default(),
            renewer: None,
            ttl,
        }
    }

    fn renew_from_now(&mut self) {
        if self.renewer.is_some() {
            return;
        }
        let leases = self.leases.clone();
        let kept = self.kept.clone();
        let period = self.ttl / 3;
        let name = self.name.clone();
        self.renewer = Some(tokio::spawn(async move {
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
        }));
    }

    /// Forget the lanes whose lease the renewal task found lost.
    fn sync(&mut self) {
        let kept = lock(&self.kept);
        self.held.retain(|lane, _| {
            let still = kept.contains(lane);
            if !still {
                warn!(consumer = %self.name, %lane, "lane lost; its pending entries go to the next owner");
            }
            still
        });
    }

    async fn hand_back(&mut self, lane: Lane) {
        self.held.remove(&lane);
        lock(&self.kept).remove(&lane);
        if let Err(e) = self.leases.release(lane).await {
            debug!(consumer = %self.name, %lane, error = %e, "release failed; the lease will expire");
        }
    }
}

impl Ownership for LeaseOwnership {
    /// Hold `ceil(lanes / live consumers)` lanes: take free ones up to that, hand back extras.
    fn rebalance(&mut self) -> Fut<'_, Vec<Lane>> {
        Box::pin(async move {
            self.renew_from_now();
            self.sync();
            let live = self.leases.live_consumers().await?;
            let share = self.lanes.len().div_ceil(live.max(1));
            while self.held.len() > share {
                if let Some(lane) = self.held.keys().next_back().copied() {
                    info!(consumer = %self.name, %lane, share, "handing lane over");
                    self.hand_back(lane).await;
                }
            }
            // Start the search at a place of our own, so consumers do not all race for lane 0.
            let start = offset(&self.name, self.lanes.len());
            let order: Vec<Lane> = self.lanes[start..]
                .iter()
                .chain(&self.lanes[..start])
                .copied()
                .collect();
            let mut taken = Vec::new();
            for lane in order {
                if self.held.len() >= share {
                    break;
                }
                if self.held.contains_key(&lane) || !self.leases.acquire(lane).await? {
                    continue;
                }
                let token = async {
                    let store = self.writer.get().await?;
                    store.take_fence(&lane.name(), &self.name).await
                }
                .await;
                let token = match token {
                    Ok(token) => token,
                    Err(e) => {
                        let _ = self.leases.release(lane).await;
                        self.writer.reset().await;
                        return Err(e.into());
                    }
                };
                debug!(consumer = %self.name, %lane, token, "fence taken");
                self.held.insert(lane, token);
                lock(&self.kept).insert(lane);
                taken.push(lane);
            }
            Ok(taken)
        })
    }

    fn held(&mut self) -> Vec<Fence> {
        self.sync();
        self.held.iter().map(|(l, t)| (*l, *t)).collect()
    }

    fn lost(&mut self, lanes: &[Lane]) {
        for lane in lanes {
            self.held.remove(lane);
            lock(&self.kept).remove(lane);
        }
    }

    fn period(&self) -> Duration {
        self.ttl / 3
    }

    fn release(&mut self) -> Fut<'_, ()> {
        Box::pin(async move {
            for lane in self.held.keys().copied().collect::<Vec<_>>() {
                self.hand_back(lane).await;
            }
            if let Some(renewer) = self.renewer.take() {
                renewer.abort();
            }
            Ok(self.leases.leave().await?)
        })
    }
}

impl Drop for LeaseOwnership {
    fn drop(&mut self) {
        if let Some(renewer) = self.renewer.take() {
            renewer.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn offset(name: &str, n: usize) -> usize {
    let h = name
        .bytes()
        .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
    h % n.max(1)
}
