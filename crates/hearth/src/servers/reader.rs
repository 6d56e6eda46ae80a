//! A consumer's reading of the lanes on Redis Streams ([`RedisReader`]): through the `workers`
//! consumer group under the consumer's own name, pending entries of a lane first.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use super::conn::Conn;
use super::keys::Group;
use super::queue::{Queue, QueueError};
use super::stream::{Done, StreamEntry};
use super::txn::Txn;
use crate::dead_letter::DeadLetter;
use crate::lane::Lane;
use crate::seam::{Delivery, Fut, Reader, Unreadable, Written};

/// One consumer's reads: pending entries of a lane first (from the start of the lane's pending
/// list, XAUTOCLAIM, when the lane is new to this reader or retaken), then new ones (XREADGROUP,
/// blocking up to the wait).
pub struct RedisReader {
    queue: Queue,
    redis_url: String,
    consumer: String,
    /// The connection blocking reads tie up (a reader's own); reopened after an error.
    conn: Option<Conn>,
    /// Lanes whose pending entries are being taken, and from which cursor.
    recovering: BTreeMap<Lane, String>,
    /// Lanes this reader has read.
    seen: HashSet<Lane>,
    /// Recent average of events per entry, to size reads in events.
    entry_size: f64,
    /// Read new entries only of lanes whose lease names this consumer, checked just before each
    /// read (a consumer of the worker; a bare reader reads what it is asked).
    leased: bool,
}

impl RedisReader {
    pub fn new(queue: Queue, redis_url: &str, consumer: &str) -> RedisReader {
        RedisReader {
            queue,
            redis_url: redis_url.to_string(),
            consumer: consumer.to_string(),
            conn: None,
            recovering: BTreeMap::new(),
            seen: HashSet::new(),
            entry_size: 1.0,
            leased: false,
        }
    }

    /// A reader that takes new entries only from lanes it holds the lease of. Its owner learns
    /// of a lost lease at the next renewal, a third of the lease time later; until then it would
    /// go on reading the lane, and entries it took after the lane's new owner had looked through
    /// the pending list would sit in its own pending list, stored by nobody (seen after a Redis
    /// restart had expired every lease at once).
    pub fn leased(mut self) -> RedisReader {
        self.leased = true;
        self
    }

    /// Of `lanes`, those whose lease names this consumer now.
    async fn still_held(&self, lanes: &[Lane]) -> Result<Vec<Lane>, QueueError> {
        let mut conn = self.queue.conn.clone();
        let mut cmd = redis::cmd("MGET");
        for lane in lanes {
            cmd.arg(self.queue.keys.lease(*lane));
        }
        let owners: Vec<Option<String>> = cmd.query_async(&mut conn).await?;
        Ok(lanes
            .iter()
            .zip(owners)
            .filter(|(_, o)| o.as_deref() == Some(self.consumer.as_str()))
            .map(|(l, _)| *l)
            .collect())
    }

    async fn read_lanes(
        &mut self,
        lanes: &[Lane],
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        if self.conn.is_none() {
            self.queue.ensure_groups().await?;
            self.conn = Some(
                super::queue::connect(&self.redis_url, wait + super::queue::REPLY_TIMEOUT).await?,
            );
        }
        for lane in lanes {
            if self.seen.insert(*lane) {
                self.recovering.insert(*lane, "0-0".into());
            }
        }
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Vec::new());
        };
        // Entries are batches of events: ask for about `max` events' worth of them.
        let count = ((max as f64 / self.entry_size).ceil() as usize).clamp(1, max.max(1));
        // Pending entries first, lane by lane, until some are found or none is left.
        while let Some((lane, cursor)) = self
            .recovering
            .iter()
            .find(|(l, _)| lanes.contains(l))
            .map(|(l, c)| (*l, c.clone()))
        {
            let (next, entries) = self
                .queue
                .claim_pending(conn, &self.consumer, lane, &cursor, count)
                .await?;
            if next == "0-0" {
                self.recovering.remove(&lane);
            } else {
                self.recovering.insert(lane, next);
            }
            if !entries.is_empty() {
                return Ok(entries
                    .into_iter()
                    .map(|e| delivery(lane, e, true))
                    .collect());
            }
        }
        let held;
        let lanes = if self.leased {
            held = self.still_held(lanes).await?;
            if held.is_empty() {
                // Lost them all: the owner notices at its next renewal; nothing to read until.
                tokio::time::sleep(wait.min(Duration::from_millis(100))).await;
                return Ok(Vec::new());
            }
            &held[..]
        } else {
            lanes
        };
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Vec::new());
        };
        let batch = self
            .queue
            .read_new(conn, &self.consumer, lanes, count, wait)
            .await?;
        let (entries, events) = batch
            .iter()
            .flat_map(|(_, e)| e)
            .fold((0, 0), |(n, ev), e| (n + 1, ev + e.count.unwrap_or(1)));
        if entries > 0 {
            self.entry_size =
                0.8 * self.entry_size + 0.2 * (events as f64 / entries as f64).max(1.0);
        }
        let mut out: Vec<Delivery> = batch
            .into_iter()
            .flat_map(|(lane, entries)| entries.into_iter().map(move |e| delivery(lane, e, false)))
            .collect();
        // Critical entries first, whatever order the lanes answered in.
        out.sort_by_key(|d| d.lane != Lane::Critical);
        Ok(out)
    }
}

fn delivery(lane: Lane, entry: StreamEntry, redelivered: bool) -> Delivery {
    match entry.decode() {
        Ok(events) => Delivery {
            lane,
            id: entry.id,
            events,
            redelivered,
            unreadable: None,
        },
        Err(detail) => Delivery {
            lane,
            unreadable: Some(Unreadable {
                detail,
                events: entry.count.unwrap_or(0),
                body: entry.body.unwrap_or_default(),
            }),
            id: entry.id,
            events: Vec::new(),
            redelivered,
        },
    }
}

impl Reader for RedisReader {
    fn read<'a>(
        &'a mut self,
        lanes: &'a [Lane],
        max: usize,
        wait: Duration,
    ) -> Fut<'a, Vec<Delivery>> {
        Box::pin(async move {
            match self.read_lanes(lanes, max, wait).await {
                Ok(out) => Ok(out),
                Err(e) => {
                    // The connection may be broken, and a read whose reply was lost may have
                    // handed entries to us: take them back through the pending list.
                    self.conn = None;
                    if e.is_missing_group() {
                        let _ = self.queue.ensure_groups().await;
                    }
                    for lane in lanes {
                        self.recovering.insert(*lane, "0-0".into());
                    }
                    Err(e.into())
                }
            }
        })
    }

    fn retake(&mut self, lane: Lane) {
        self.recovering.insert(lane, "0-0".into());
    }

    fn ack<'a>(
        &'a mut self,
        done: &'a [Delivery],
        written: &'a Written,
        dead: &'a [DeadLetter],
    ) -> Fut<'a, ()> {
        Box::pin(async move {
            let mut by_lane: BTreeMap<Lane, Vec<Done>> = BTreeMap::new();
            for d in done {
                by_lane.entry(d.lane).or_default().push(Done {
                    id: d.id.clone(),
                    events: d.count(),
                });
            }
            let acks: Vec<(Lane, Vec<Done>)> = by_lane.into_iter().collect();
            // Dead letters first: on a cluster, where they are a transaction of their own, a
            // crash between the two leaves them written and the entries pending (delivered
            // again), never the entries acknowledged and their letters lost.
            let mut txn = Txn::new(&self.queue.keys);
            self.queue
                .add_dead(txn.on(Group::Global), dead, written.capped.len() as u64);
            self.queue
                .add_ack(&mut txn, &acks, written.stored, written.duplicates);
            Ok(txn.exec(&self.queue.conn).await.map_err(QueueError::from)?)
        })
    }

    fn deliveries<'a>(&'a mut self, entry: &'a Delivery) -> Fut<'a, u64> {
        Box::pin(async move { Ok(self.queue.deliveries(entry.lane, &entry.id).await?) })
    }

    fn give_up<'a>(&'a mut self, entry: &'a Delivery, letters: &'a [DeadLetter]) -> Fut<'a, ()> {
        Box::pin(async move {
            let done = Done {
                id: entry.id.clone(),
                events: entry.count(),
            };
            Ok(self.queue.dead_letter(entry.lane, &done, letters).await?)
        })
    }
}
