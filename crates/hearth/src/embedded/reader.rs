//! A consumer's reading of the embedded queue: the oldest rows of its lanes not in flight,
//! critical first, stopping at the first row that does not fit (lane order). A row whose events
//! cannot be read back is handed out as unreadable, for the worker to dead-letter (`bad_entry`)
//! with its removal, never dropped. The in-flight set, shared by the process's readers, is what
//! keeps a row from being handed out twice.

use std::collections::{HashMap, HashSet};

use rusqlite::OptionalExtension;

use super::db::bump;
use super::queue::{SqliteQueue, insert};
use crate::dead_letter::DeadLetter;
use crate::event::Event;
use crate::lane::Lane;
use crate::seam::{Delivery, Fut, Reader, Unavailable, Unreadable, Written};
use crate::status::stat;

/// One consumer's reads: the oldest rows of its lanes not handed out to it yet, critical first.
/// A lane it reads for the first time, or is told to retake, is handed out again from its
/// oldest row (what an earlier reader of it left unacknowledged included).
pub struct SqliteReader {
    queue: SqliteQueue,
    /// Row id → how many times this reader handed it out.
    deliveries: HashMap<i64, u64>,
    seen: HashSet<Lane>,
}

impl SqliteReader {
    pub fn new(queue: SqliteQueue) -> SqliteReader {
        SqliteReader {
            queue,
            deliveries: HashMap::new(),
            seen: HashSet::new(),
        }
    }

    /// The rows to hand out now: decoded on the store's thread, each a delivery (an unreadable
    /// one says why).
    async fn take(&mut self, lanes: &[Lane], max: usize) -> Result<Vec<Delivery>, Unavailable> {
        let skip: HashSet<i64> = self
            .queue
            .in_flight
            .lock()
            .map(|f| f.keys().copied().collect())
            .unwrap_or_default();
        let critical = lanes.contains(&Lane::Critical);
        let routine = lanes.iter().any(|l| *l != Lane::Critical);
        let filter = match (critical, routine) {
            (true, true) => "",
            (true, false) => "WHERE critical = 1",
            (false, _) => "WHERE critical = 0",
        };
        let sql = format!(
            "SELECT id, lane, n, body FROM queue {filter} ORDER BY critical DESC, id LIMIT ?1"
        );
        let limit = (skip.len() + max.max(1)) as i64;
        let wanted: Vec<Lane> = lanes.to_vec();
        let shards = self.queue.shards;
        let out = self
            .queue
            .db
            .call(move |c| {
                let mut st = c.prepare_cached(&sql)?;
                let rows = st.query_map([limit], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, String>(3)?,
                    ))
                })?;
                let mut out = Vec::new();
                let mut events = 0;
                for row in rows {
                    let (id, name, n, body) = row?;
                    if skip.contains(&id) {
                        continue;
                    }
                    // Lanes past the configured shards (after `shards` was lowered) go to the
                    // routine reader: they are drained, never stranded.
                    let lane = Lane::parse(&name);
                    let ours = |l: Lane| {
                        wanted.contains(&l)
                            || (routine && matches!(l, Lane::Routine(n) if n >= shards))
                    };
                    if lane.is_some_and(|l| !ours(l)) {
                        continue;
                    }
                    // Stop at the first entry that does not fit: taking a later one instead
                    // would store its events before this one's, out of order.
                    if events > 0 && events + n as usize > max {
                        break;
                    }
                    events += n as usize;
                    let decoded = lane
                        .ok_or_else(|| format!("unknown lane {name:?}"))
                        .and_then(|lane| {
                            serde_json::from_str::<Vec<Event>>(&body)
                                .map(|e| (lane, e))
                                .map_err(|e| e.to_string())
                        });
                    out.push(match decoded {
                        Ok((lane, list)) => Delivery {
                            lane,
                            id: id.to_string(),
                            events: list,
                            ..Delivery::default()
                        },
                        Err(detail) => Delivery {
                            lane: lane.unwrap_or(Lane::Routine(0)),
                            id: id.to_string(),
                            unreadable: Some(Unreadable {
                                detail: format!("queue row {id} of lane {name}: {detail}"),
                                body: body.into_bytes(),
                                events: n as u64,
                            }),
                            ..Delivery::default()
                        },
                    });
                }
                Ok(out)
            })
            .await?;
        let mut out = out;
        if let Ok(mut f) = self.queue.in_flight.lock() {
            for d in &out {
                if let Ok(id) = d.id.parse::<i64>() {
                    f.insert(id, d.lane);
                }
            }
        }
        for d in &mut out {
            if let Ok(id) = d.id.parse::<i64>() {
                let n = self.deliveries.entry(id).or_default();
                *n += 1;
                d.redelivered = *n > 1 || id <= self.queue.opened_at;
            }
        }
        Ok(out)
    }

    fn done(&mut self, id: i64) {
        if let Ok(mut f) = self.queue.in_flight.lock() {
            f.remove(&id);
        }
        self.deliveries.remove(&id);
    }
}

impl Reader for SqliteReader {
    fn read<'a>(
        &'a mut self,
        lanes: &'a [Lane],
        max: usize,
        wait: std::time::Duration,
    ) -> Fut<'a, Vec<Delivery>> {
        Box::pin(async move {
            for lane in lanes {
                if self.seen.insert(*lane) {
                    self.retake(*lane);
                }
            }
            let appended = self.queue.appended.clone();
            // Registered before reading, so that an append right after the read wakes us.
            let woken = appended.notified();
            let out = self.take(lanes, max).await?;
            if !out.is_empty() {
                return Ok(out);
            }
            tokio::select! {
                _ = woken => {}
                _ = tokio::time::sleep(wait) => {}
            }
            self.take(lanes, max).await
        })
    }

    fn retake(&mut self, lane: Lane) {
        if let Ok(mut f) = self.queue.in_flight.lock() {
            f.retain(|_, l| *l != lane);
        }
    }

    fn ack<'a>(
        &'a mut self,
        done: &'a [Delivery],
        written: &'a Written,
        dead: &'a [DeadLetter],
    ) -> Fut<'a, ()> {
        Box::pin(async move {
            let rows: Vec<(i64, Lane, u64)> = done
                .iter()
                .filter_map(|d| Some((d.id.parse().ok()?, d.lane, d.events.len() as u64)))
                .collect();
            let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
            let (stored, duplicates, capped) = (
                written.stored,
                written.duplicates,
                written.capped.len() as u64,
            );
            let dead = dead.to_vec();
            self.queue
                .db
                .call(move |c| {
                    let tx = c.transaction()?;
                    insert(&tx, &Vec::new(), &dead)?;
                    bump(&tx, stat::DEAD_LETTERED, capped)?;
                    for (id, lane, n) in &rows {
                        let gone = tx
                            .prepare_cached("DELETE FROM queue WHERE id = ?1")?
                            .execute([id])?;
                        // Only an acknowledgement that removed the row counts its events.
                        if gone == 1 {
                            bump(&tx, &stat::finished(*lane), *n)?;
                        }
                    }
                    bump(&tx, stat::STORED, stored)?;
                    bump(&tx, stat::DUPLICATES, duplicates)?;
                    tx.commit()
                })
                .await?;
            if let Ok(mut f) = self.queue.in_flight.lock() {
                for id in &ids {
                    f.remove(id);
                }
            }
            for id in ids {
                self.deliveries.remove(&id);
            }
            Ok(())
        })
    }

    fn deliveries<'a>(&'a mut self, entry: &'a Delivery) -> Fut<'a, u64> {
        let n = entry
            .id
            .parse::<i64>()
            .ok()
            .and_then(|id| self.deliveries.get(&id).copied())
            .unwrap_or(1);
        Box::pin(async move { Ok(n) })
    }

    /// The row goes with its letters, in one transaction.
    fn give_up<'a>(&'a mut self, entry: &'a Delivery, letters: &'a [DeadLetter]) -> Fut<'a, ()> {
        Box::pin(async move {
            let Ok(id) = entry.id.parse::<i64>() else {
                return Ok(());
            };
            let letters = letters.to_vec();
            self.queue
                .db
                .call(move |c| {
                    let tx = c.transaction()?;
                    insert(&tx, &Vec::new(), &letters)?;
                    // The row's own lane and count: an unreadable row may name a lane this
                    // version does not know.
                    let gone: Option<(String, i64)> = tx
                        .query_row(
                            "DELETE FROM queue WHERE id = ?1 RETURNING lane, n",
                            [id],
                            |r| Ok((r.get(0)?, r.get(1)?)),
                        )
                        .optional()?;
                    if let Some((lane, n)) = gone {
                        bump(&tx, &format!("out:{lane}"), n as u64)?;
                        bump(&tx, stat::DEAD_LETTERED, n as u64)?;
                    }
                    tx.commit()
                })
                .await?;
            self.done(id);
            Ok(())
        })
    }
}
