//! Ingest slots on the servers: a lease in Redis per slot (`P:lease:ingest-{n}`), renewed every
//! third of `lease_ttl_ms`, and a heartbeat in the `ingest` pool, from which each process
//! computes its fair share (as the workers do for lanes, [`super::ownership`]). A killed
//! process's slots are free once their leases expire, and a survivor takes them over: the
//! broker's queued and in-flight messages of those sessions are not stranded.

use std::collections::BTreeSet;
use std::time::Duration;

use tracing::{info, warn};

use super::lease::{Leased, Leases};
use super::queue::Queue;
use crate::ingest::slots::Slots;
use crate::seam::Fut;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Slot(u32);

impl Leased for Slot {
    fn lease_name(&self) -> String {
        format!("ingest-{}", self.0)
    }
}

pub struct LeasedSlots {
    leases: Leases,
    count: u32,
    held: BTreeSet<Slot>,
    ttl: Duration,
}

impl LeasedSlots {
    /// `count` slots (brokers × `ingest_slots`), leased as `owner` for `ttl`.
    pub fn new(queue: &Queue, count: u32, owner: &str, ttl: Duration) -> LeasedSlots {
        LeasedSlots {
            leases: Leases::new(queue.conn.clone(), queue.keys.clone(), ttl, "ingest", owner),
            count,
            held: BTreeSet::new(),
            ttl,
        }
    }
}

impl Slots for LeasedSlots {
    fn rebalance(&mut self) -> Fut<'_, Vec<u32>> {
        Box::pin(async move {
            let held: Vec<Slot> = self.held.iter().copied().collect();
            for lost in self.leases.renew(&held).await? {
                warn!(
                    slot = lost.0,
                    "ingest slot lost (its lease expired): another process holds it now"
                );
                self.held.remove(&lost);
            }
            let live = self.leases.live_consumers().await?;
            let share = (self.count as usize).div_ceil(live.max(1));
            while self.held.len() > share {
                if let Some(slot) = self.held.pop_last() {
                    info!(slot = slot.0, share, "handing ingest slot over");
                    self.leases.release(slot).await?;
                }
            }
            // Start at a place of our own, so processes do not all race for slot 0.
            let start = crate::event::now_us().unsigned_abs() as u32 % self.count.max(1);
            for i in 0..self.count {
                if self.held.len() >= share {
                    break;
                }
                let slot = Slot((start + i) % self.count);
                if !self.held.contains(&slot) && self.leases.acquire(slot).await? {
                    info!(slot = slot.0, "ingest slot taken");
                    self.held.insert(slot);
                }
            }
            Ok(self.held.iter().map(|s| s.0).collect())
        })
    }

    fn period(&self) -> Duration {
        self.ttl / 3
    }

    fn release(&mut self) -> Fut<'_, ()> {
        Box::pin(async move {
            for slot in std::mem::take(&mut self.held) {
                let _ = self.leases.release(slot).await;
            }
            Ok(self.leases.leave().await?)
        })
    }
}
