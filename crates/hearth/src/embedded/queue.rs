//! The embedded queue: the `queue` table of the SQLite database, one row per record batch of one
//! lane, as a Redis stream entry is.
//!
//! Appends are group-committed: concurrent callers (one per broker connection) hand their batch
//! to one appender task, which writes every batch waiting into one transaction and answers each
//! caller after the COMMIT, so the broker acknowledges only what is on disk. A row stays in the
//! table (pending) until acknowledged, and a queue opened later (after a crash) hands it out
//! again. Counters mirror
//! the Redis ones (`in:{lane}`, `out:{lane}`, `stored`, ...), so the loss accounting is the same
//! and the depth of a lane is two counters read, not a scan. The consumers' reading is
//! [`super::reader`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, params};
use tokio::sync::{Notify, mpsc, oneshot};

use super::db::{Sqlite, bump};
use super::kept::Infos;
use crate::codec::Codecs;
use crate::dead_letter::{DeadLetter, Retention};
use crate::dlq::{Filter, Letter, Replayed};
use crate::event::Event;
use crate::lane::Lane;
use crate::seam::{DeviceInfo, EventQueue, Fut, Unavailable};
use crate::status::stat;
use crate::status::{Accounting, LaneStatus, Status, lane_depth};

/// A lane's rows to insert: (lane, number of events, JSON body).
pub(super) type Entries = Vec<(Lane, u64, String)>;

struct Append {
    entries: Entries,
    dead: Vec<DeadLetter>,
    done: oneshot::Sender<Result<(), Unavailable>>,
}

/// Batches the appender writes in one transaction at most.
const GROUP_COMMIT_MAX: usize = 256;

#[derive(Clone)]
pub struct SqliteQueue {
    pub(super) db: Sqlite,
    /// For `status` and the dead letters: a scan there never delays an append or an ack.
    pub(super) reader: Sqlite,
    pub(super) shards: u16,
    /// Rows handed out and not acknowledged yet: id → lane.
    pub(super) in_flight: Arc<Mutex<HashMap<i64, Lane>>>,
    /// Rows up to this id were queued before this process opened the queue: an earlier one may
    /// have handed them out (and stored them) before it stopped, so they go out as redelivered.
    pub(super) opened_at: i64,
    /// The data folder, whose lock says whether a `hearth up` (and its workers) runs on it.
    data_dir: std::path::PathBuf,
    appends: mpsc::Sender<Append>,
    /// Woken after each append, so that readers need not poll.
    pub appended: Arc<Notify>,
    pub(super) retention: Retention,
}

impl SqliteQueue {
    /// The queue on the writer connection (appends, reads, acknowledgements) and the reader
    /// (depths, status, dead letters).
    pub async fn new(
        db: Sqlite,
        reader: Sqlite,
        shards: u16,
        data_dir: std::path::PathBuf,
        retention: Retention,
    ) -> Result<SqliteQueue, Unavailable> {
        let opened_at = db
            .call(|c| c.query_row("SELECT coalesce(max(id), 0) FROM queue", [], |r| r.get(0)))
            .await?;
        let (appends, rx) = mpsc::channel(1024);
        let appended = Arc::new(Notify::new());
        tokio::spawn(appender(db.clone(), rx, appended.clone(), retention));
        Ok(SqliteQueue {
            db,
            reader,
            shards,
            in_flight: Arc::default(),
            opened_at,
            data_dir,
            appends,
            appended,
            retention,
        })
    }

    /// `in:` and `out:` counters, from the reader.
    async fn counters(&self) -> Result<HashMap<String, u64>, Unavailable> {
        self.reader
            .call(|c| {
                let mut st = c.prepare_cached(
                    "SELECT name, value FROM stats WHERE name LIKE 'in:%' OR name LIKE 'out:%'",
                )?;
                let rows = st.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
                rows.collect()
            })
            .await
    }

    pub fn shards(&self) -> u16 {
        self.shards
    }

    fn lanes(&self) -> Vec<Lane> {
        std::iter::once(Lane::Critical)
            .chain(Lane::routine(self.shards))
            .collect()
    }

    /// The events grouped into one entry per lane, in arrival order.
    pub(super) fn entries(&self, events: &[&Event]) -> Result<Entries, Unavailable> {
        Lane::group(events, self.shards)
            .into_iter()
            .map(|(lane, list)| {
                let body = serde_json::to_string(&list)
                    .map_err(|e| Unavailable(format!("encode: {e}")))?;
                Ok((lane, list.len() as u64, body))
            })
            .collect()
    }
}

/// Write entries and dead letters (and their counters) inside the caller's transaction.
pub(super) fn insert(
    c: &Connection,
    entries: &Entries,
    dead: &[DeadLetter],
) -> rusqlite::Result<()> {
    let mut add =
        c.prepare_cached("INSERT INTO queue (lane, critical, n, body) VALUES (?1, ?2, ?3, ?4)")?;
    for (lane, n, body) in entries {
        add.execute(params![
            lane.name(),
            *lane == Lane::Critical,
            *n as i64,
            body
        ])?;
        bump(c, &stat::appended(*lane), *n)?;
    }
    let mut letter = c.prepare_cached(
        "INSERT INTO dead (reason, detail, topic, payload, source, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for d in dead {
        letter.execute(params![
            d.reason, d.detail, d.topic, d.payload, d.source, d.at_ms
        ])?;
        // Only what the ingest refused counts as rejected (as on Redis).
        if !matches!(d.source, "mqtt" | "http") {
            continue;
        }
        bump(c, stat::REJECTED, 1)?;
        bump(c, &format!("rejected:{}", d.reason), 1)?;
    }
    Ok(())
}

/// Hold the dead letters to `max` (0: no limit), the oldest going first; returns how many went
/// (the caller counts them). One indexed delete: ids grow with each letter.
pub(super) fn cap_dead(c: &Connection, max: u64) -> rusqlite::Result<u64> {
    if max == 0 {
        return Ok(0);
    }
    Ok(
        c.prepare_cached("DELETE FROM dead WHERE id <= (SELECT max(id) FROM dead) - ?1")?
            .execute([max as i64])? as u64,
    )
}

/// Write every waiting append in one transaction; answer each after the COMMIT.
async fn appender(
    db: Sqlite,
    mut rx: mpsc::Receiver<Append>,
    appended: Arc<Notify>,
    retention: Retention,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < GROUP_COMMIT_MAX {
            match rx.try_recv() {
                Ok(a) => batch.push(a),
                Err(_) => break,
            }
        }
        let (work, replies): (Vec<(Entries, Vec<DeadLetter>)>, Vec<_>) = batch
            .into_iter()
            .map(|a| ((a.entries, a.dead), a.done))
            .unzip();
        let result = db
            .call(move |c| {
                let tx = c.transaction()?;
                let mut letters = 0;
                for (entries, dead) in &work {
                    insert(&tx, entries, dead)?;
                    letters += dead.len();
                }
                // A flood of bad input is bounded as it comes, not at the next sweep.
                if letters > 0 {
                    let expired = cap_dead(&tx, retention.max_count)?;
                    bump(&tx, stat::DEAD_EXPIRED, expired)?;
                }
                tx.commit()
            })
            .await;

        for reply in replies {
            let _ = reply.send(result.clone());
        }
        appended.notify_waiters();
    }
}

impl SqliteQueue {
    fn keep_infos(
        &self,
        table: Infos,
        rows: Vec<(String, String, DeviceInfo)>,
        max: u64,
    ) -> Fut<'_, ()> {
        Box::pin(async move {
            if rows.is_empty() {
                return Ok(());
            }
            self.db
                .call(move |c| super::kept::keep_infos(c, table, &rows, max))
                .await
        })
    }

    fn infos<'a>(&'a self, table: Infos, house: &'a str) -> Fut<'a, HashMap<String, DeviceInfo>> {
        let house = house.to_string();
        Box::pin(async move {
            self.reader
                .call(move |c| super::kept::infos(c, table, &house))
                .await
        })
    }
}

impl EventQueue for SqliteQueue {
    fn name(&self) -> &'static str {
        "embedded"
    }

    fn keep_discovery<'a>(&'a self, configs: &'a [(String, Vec<u8>)]) -> Fut<'a, ()> {
        let configs = configs.to_vec();
        Box::pin(async move {
            if configs.is_empty() {
                return Ok(());
            }
            self.db
                .call(move |c| super::kept::keep_discovery(c, &configs))
                .await
        })
    }

    fn discovery(&self) -> Fut<'_, Vec<(String, Vec<u8>)>> {
        Box::pin(async move { self.db.call(super::kept::discovery).await })
    }

    fn keep_devices<'a>(
        &'a self,
        devices: &'a [(String, String, DeviceInfo)],
        max: u64,
    ) -> Fut<'a, ()> {
        self.keep_infos(Infos::Devices, devices.to_vec(), max)
    }

    fn devices<'a>(&'a self, house: &'a str) -> Fut<'a, HashMap<String, DeviceInfo>> {
        self.infos(Infos::Devices, house)
    }

    fn keep_catalog<'a>(&'a self, devices: &'a [(String, DeviceInfo)], max: u64) -> Fut<'a, ()> {
        let rows = devices
            .iter()
            .map(|(house, d)| (house.clone(), d.device_id.clone(), d.clone()))
            .collect();
        self.keep_infos(Infos::Catalog, rows, max)
    }

    fn catalog<'a>(&'a self, house: &'a str) -> Fut<'a, HashMap<String, DeviceInfo>> {
        self.infos(Infos::Catalog, house)
    }

    fn append<'a>(&'a self, events: &'a [&'a Event], dead: &'a [&'a DeadLetter]) -> Fut<'a, ()> {
        Box::pin(async move {
            if events.is_empty() && dead.is_empty() {
                return Ok(());
            }
            let (done, answer) = oneshot::channel();
            let append = Append {
                entries: self.entries(events)?,
                dead: dead.iter().map(|d| (*d).clone()).collect(),
                done,
            };
            self.appends
                .send(append)
                .await
                .map_err(|_| Unavailable("embedded queue: the appender stopped".into()))?;
            answer
                .await
                .map_err(|_| Unavailable("embedded queue: the appender stopped".into()))?
        })
    }

    fn depths(&self) -> Fut<'_, Vec<(Lane, u64)>> {
        Box::pin(async move {
            let counters = self.counters().await?;
            let mut lanes: BTreeSet<Lane> = self.lanes().into_iter().collect();
            lanes.extend(
                counters
                    .keys()
                    .filter_map(|k| k.strip_prefix("in:"))
                    .filter_map(Lane::parse),
            );
            Ok(lanes
                .into_iter()
                .map(|l| (l, lane_depth(&counters, l)))
                .collect())
        })
    }

    fn status(&self) -> Fut<'_, Status> {
        Box::pin(async move {
            type Snapshot = (Vec<(String, u64)>, u64, HashMap<String, u64>);
            let (per_lane, dead_letters, stats): Snapshot = self
                .reader
                .call(|c| {
                    let mut st =
                        c.prepare_cached("SELECT lane, count(*) FROM queue GROUP BY lane")?;
                    let lanes = st
                        .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    let dead: i64 = c.query_row("SELECT count(*) FROM dead", [], |r| r.get(0))?;
                    let mut st = c.prepare_cached("SELECT name, value FROM stats")?;
                    let stats = st
                        .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
                        .collect::<rusqlite::Result<HashMap<String, u64>>>()?;
                    Ok((lanes, dead as u64, stats))
                })
                .await?;
            let in_flight = self.in_flight.lock().map(|f| f.clone()).unwrap_or_default();
            // The configured lanes, and any other that still holds rows or counts (`shards` was
            // changed): nothing queued is hidden.
            let mut all: BTreeSet<Lane> = self.lanes().into_iter().collect();
            all.extend(per_lane.iter().filter_map(|(l, _)| Lane::parse(l)));
            all.extend(
                stats
                    .keys()
                    .filter_map(|k| k.strip_prefix("in:"))
                    .filter_map(Lane::parse),
            );
            let owner = super::holder(&self.data_dir).map(|pid| format!("hearth up (pid {pid})"));
            let mut lanes = Vec::new();
            for lane in all {
                let name = lane.name();
                let entries = per_lane
                    .iter()
                    .find(|(l, _)| *l == name)
                    .map(|(_, e)| *e)
                    .unwrap_or(0);
                let depth = lane_depth(&stats, lane);
                let pending = in_flight.values().filter(|l| **l == lane).count() as u64;
                lanes.push(LaneStatus {
                    lane: name,
                    depth,
                    entries,
                    pending,
                    lag: Some(entries.saturating_sub(pending)),
                    owner: owner.clone(),
                    consumers: Vec::new(),
                });
            }
            Ok(Status {
                events: Accounting::from_counters(&stats, &lanes),
                dead_letters_expired: stats.get(stat::DEAD_EXPIRED).copied().unwrap_or(0),
                lanes,
                dead_letters,
                // One critical and one routine worker in the `hearth up` holding the folder.
                consumers_alive: HashMap::from([
                    ("routine".to_string(), u64::from(owner.is_some())),
                    ("critical".to_string(), u64::from(owner.is_some())),
                ]),
            })
        })
    }

    fn dead_letters<'a>(&'a self, filter: &'a Filter) -> Fut<'a, Vec<Letter>> {
        Box::pin(self.letters(filter))
    }

    fn replay<'a>(&'a self, codecs: &'a Codecs, filter: &'a Filter) -> Fut<'a, Replayed> {
        Box::pin(self.replay_letters(codecs, filter))
    }

    fn purge<'a>(&'a self, filter: &'a Filter) -> Fut<'a, u64> {
        Box::pin(self.purge_letters(filter))
    }

    fn circuits(&self) -> Fut<'_, BTreeMap<String, bool>> {
        // Nothing embedded is reached over a network: there is no circuit to open.
        Box::pin(async move { Ok(BTreeMap::new()) })
    }

    fn ready(&self) -> Fut<'_, (&'static str, bool)> {
        Box::pin(async move {
            let ok = self
                .db
                .call(|c| c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0)))
                .await
                .is_ok();
            Ok(("embedded", ok))
        })
    }

    fn expire_dead_letters(&self) -> Fut<'_, u64> {
        Box::pin(async move { SqliteQueue::expire_dead_letters(self).await })
    }
}
