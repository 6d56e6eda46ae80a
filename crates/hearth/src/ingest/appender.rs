//! The appender: batch the sessions' messages, XADD them through the intake, then hand their
//! PUBACKs back to the session each came from. Routine messages wait here, unacknowledged, while
//! the gate is closed (backpressure) and, with shared slots, while the readings before them in
//! their sensor's `seq` are not appended yet ([`crate::seam::EventQueue::admit`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::mqttbytes::QoS;
use tokio::sync::mpsc;
use tracing::warn;

use super::{Message, Router};
use crate::backoff::Backoff;
use crate::intake::{Input, Intake};
use crate::metrics::METRICS;
use crate::shutdown::Shutdown;

/// Routine messages held back at most, in batches (`batch_size` messages each).
const HELD_BATCHES: usize = 10;

/// How often messages waiting for their order are offered again.
const ORDER_RETRY: Duration = Duration::from_millis(20);

/// Append what the sessions read until they all stop (or shutdown while the queue is
/// unreachable: the broker redelivers what was not acknowledged). `order_wait`: shared slots,
/// keep each sensor's order, waiting at most that long for a gap.
pub async fn run(
    intake: Arc<Intake>,
    mut rx: mpsc::Receiver<Vec<Message>>,
    router: Arc<Router>,
    batch_size: usize,
    order_wait: Option<Duration>,
    shutdown: Shutdown,
) {
    let pressure = intake.gate();
    // Held back by the gate, oldest first.
    let mut held: VecDeque<Message> = VecDeque::new();
    // Held back for their sensor's order, oldest first.
    let mut waiting: VecDeque<Message> = VecDeque::new();
    // Held messages are bounded here, not by the broker's in-flight window (Mosquitto was
    // measured sending 44,000 unacknowledged QoS 1 messages with `max_inflight_messages 1000`):
    // past `max_held` the appender stops taking messages, the channel fills, the sessions stop
    // reading their sockets, and TCP makes the broker queue the rest.
    let max_held = batch_size * HELD_BATCHES;
    loop {
        let mut batch: Vec<Message> = Vec::with_capacity(batch_size);
        let taking = held.len() + waiting.len() < max_held;
        let releasing = !held.is_empty() && !pressure.is_closed();
        tokio::select! {
            chunk = rx.recv(), if taking => match chunk {
                Some(chunk) => batch.extend(chunk),
                None => break,
            },
            _ = pressure.changed.notified(), if !held.is_empty() => {}
            _ = std::future::ready(()), if releasing => {}
            _ = tokio::time::sleep(ORDER_RETRY), if !waiting.is_empty() => {}
        }
        while batch.len() < batch_size && taking {
            match rx.try_recv() {
                Ok(chunk) => batch.extend(chunk),
                Err(_) => break,
            }
        }
        router.room();
        // Held messages go out one batch at a time, oldest first, so that the depth is checked
        // again between batches; routine messages wait behind them to keep their order. Those
        // waiting for their order are older still: they go first.
        let paused = pressure.is_closed();
        let mut ready: VecDeque<Message> = std::mem::take(&mut waiting);
        if !paused {
            ready.extend(held.drain(..held.len().min(batch_size)));
        }
        for m in batch {
            if (paused || !held.is_empty()) && !m.input.is_critical() {
                held.push_back(m);
            } else {
                ready.push_back(m);
            }
        }
        // One batch at a time, the gate checked before each: once it closes, the routine
        // messages not yet appended go back to the front of the held ones, in order, so a
        // burst runs at most one batch past the high watermark.
        let mut back: Vec<Message> = Vec::new();
        while !ready.is_empty() {
            let mut chunk: Vec<Message> = Vec::with_capacity(batch_size);
            while chunk.len() < batch_size
                && let Some(m) = ready.pop_front()
            {
                if intake.holds(&m.input) {
                    back.push(m);
                } else {
                    chunk.push(m);
                }
            }
            if let Some(wait) = order_wait {
                let Some(admitted) = admit(&intake, &chunk, wait, &shutdown).await else {
                    router.close();
                    return;
                };
                let mut kept = Vec::with_capacity(chunk.len());
                for (mut m, ok) in chunk.into_iter().zip(admitted) {
                    if ok {
                        kept.push(m);
                    } else {
                        if m.waiting_since.is_none() {
                            m.waiting_since = Some(Instant::now());
                            METRICS.order_waits.add(1);
                        }
                        waiting.push_back(m);
                    }
                }
                chunk = kept;
            }
            if chunk.is_empty() {
                continue;
            }
            let inputs: Vec<&Input> = chunk.iter().map(|m| &m.input).collect();
            if !intake.append_until_done(&inputs, &shutdown).await {
                router.close();
                return;
            }
            router.ack(
                chunk
                    .iter()
                    .filter(|m| m.qos != QoS::AtMostOnce)
                    .map(|m| (m.slot, m.generation, m.pkid)),
            );
        }
        for m in back.into_iter().rev() {
            held.push_front(m);
        }
    }
    router.close();
}

/// Which of `chunk` may be appended now in their sensors' order; one that has waited `wait`
/// may (its gap is a reading lost upstream). Retried until the queue answers; none on shutdown.
async fn admit(
    intake: &Intake,
    chunk: &[Message],
    wait: Duration,
    shutdown: &Shutdown,
) -> Option<Vec<bool>> {
    let now = Instant::now();
    let offered: Vec<(&Input, u64)> = chunk
        .iter()
        .map(|m| {
            let waited = m.waiting_since.map_or(Duration::ZERO, |s| now - s);
            let ms = if waited >= wait {
                u64::MAX
            } else {
                waited.as_millis() as u64
            };
            (&m.input, ms)
        })
        .collect();
    let mut backoff = Backoff::default();
    loop {
        match intake.admit(&offered).await {
            Ok(admitted) => {
                for ((_, ms), ok) in offered.iter().zip(&admitted) {
                    if *ok && *ms == u64::MAX {
                        METRICS.order_gave_up.add(1);
                    }
                }
                return Some(admitted);
            }
            Err(e) => {
                crate::metrics::dependency_error("redis");
                if backoff.attempts().is_multiple_of(20) {
                    warn!(error = %e, "order check failed, retrying (nothing acknowledged)");
                }
                if !shutdown.clone().sleep(backoff.next_delay()).await {
                    return None;
                }
            }
        }
    }
}
