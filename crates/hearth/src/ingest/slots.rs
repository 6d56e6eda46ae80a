//! The ingest's broker sessions, as slots shared out among the ingest processes.
//!
//! A slot is one persistent MQTT session: slot `b * ingest_slots + k` is session `k` on broker
//! `b` of `mqtt_url`. Exactly one process may hold a slot's session at a time (two holding one
//! client id would take it from each other in a loop, each takeover redelivering the in-flight
//! window), and every slot must be held by someone while any ingest lives: a broker keeps
//! handing a shared subscription's messages to a member that is away (Mosquitto 2 was measured
//! queueing half of them there), and those are read only once that session is back.

use std::time::Duration;

use crate::seam::Fut;

/// The slots this process holds, kept to a fair share of the live ingest processes.
pub trait Slots: Send {
    /// Renew what is held, hand back what is past the share, take free ones up to it; returns
    /// the slots held now.
    fn rebalance(&mut self) -> Fut<'_, Vec<u32>>;
    /// How often [`Slots::rebalance`] runs.
    fn period(&self) -> Duration;
    /// Hand every slot back (stopping).
    fn release(&mut self) -> Fut<'_, ()>;
}

/// All slots, always: one process alone with its broker sessions (the embedded store).
pub struct AllSlots(pub u32);

impl Slots for AllSlots {
    fn rebalance(&mut self) -> Fut<'_, Vec<u32>> {
        let all = (0..self.0).collect();
        Box::pin(async move { Ok(all) })
    }

    fn period(&self) -> Duration {
        Duration::from_secs(3600)
    }

    fn release(&mut self) -> Fut<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}
