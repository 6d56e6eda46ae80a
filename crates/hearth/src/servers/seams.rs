//! The seams on the production servers: the queue on Redis Streams ([`crate::servers::queue`]), the store
//! on PostgreSQL ([`crate::servers::store`]), the cache in Redis ([`crate::servers::cache`]), the fan-out on Redis
//! pub/sub. Each method is the code the production roles run; the distributed worker
//! (`worker/`) adds lane leases and fences on top of the same calls.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tokio::sync::Mutex;
use tracing::warn;

use crate::alerts::rules::RuleSet;
use crate::alerts::{Alert, AlertState};
use crate::backoff::Backoff;
use crate::codec::Limits;
use crate::config::Config;
use crate::dead_letter::DeadLetter;
use crate::dlq::{Filter, Letter, Replayed};
use crate::event::Event;
use crate::lane::Lane;
use crate::seam::{
    Delivery, EventQueue, EventStore, FanOut, Fut, HistoryEvent, HistoryQuery, HouseView, Lanes,
    LatestCache, Seams, SensorRow, TokenInfo, Unavailable, Written,
};
use crate::servers::cache::Cache;
use crate::servers::queue::{Done, Queue, QueueError};
use crate::servers::store::{Db, Store, describe};

fn pg(e: tokio_postgres::Error) -> Unavailable {
    Unavailable(format!("database: {}", describe(&e)))
}

/// Open the four seams on the configured servers (connections are made on first use).
pub fn open(config: &Config) -> Result<Seams, QueueError> {
    let queue = Queue::from_config(config)?;
    Ok(Seams {
        queue: Arc::new(RedisQueue::new(queue.clone(), &config.redis_url, "api")),
        store: Arc::new(PgStore::new(
            &config.database_url,
            crate::caps::Caps::from_config(config),
        )),
        cache: Arc::new(RedisCache {
            cache: Cache::new(queue.conn.clone(), queue.keys.clone()),
            queue: queue.clone(),
        }),
        fanout: Arc::new(RedisFanOut {
            queue,
            redis_url: config.redis_url.clone(),
        }),
    })
}

/// The queue on Redis Streams, read by one consumer of the `workers` group.
pub struct RedisQueue {
    pub queue: Queue,
    redis_url: String,
    consumer: String,
    /// The connection blocking reads use (a reader's own).
    reader: Mutex<Option<MultiplexedConnection>>,
    /// Lanes whose pending entries (left by earlier readers) this reader took over.
    claimed: std::sync::Mutex<std::collections::HashSet<Lane>>,
}

impl RedisQueue {
    pub fn new(queue: Queue, redis_url: &str, consumer: &str) -> RedisQueue {
        RedisQueue {
            queue,
            redis_url: redis_url.to_string(),
            consumer: consumer.to_string(),
            reader: Mutex::new(None),
            claimed: Default::default(),
        }
    }

    async fn read_lanes(&self, which: Lanes, max: usize) -> Result<Vec<Delivery>, QueueError> {
        let mut slot = self.reader.lock().await;
        if slot.is_none() {
            self.queue.ensure_groups().await?;
            *slot = Some(
                crate::servers::queue::connect(&self.redis_url, Duration::from_secs(5)).await?,
            );
        }
        let Some(conn) = slot.as_mut() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let mut push = |lane: Lane, entries: Vec<crate::servers::queue::StreamEntry>| {
            for entry in entries {
                out.push(Delivery {
                    lane,
                    events: entry.decode().unwrap_or_default(),
                    id: entry.id,
                });
            }
        };
        // A new reader first takes back what earlier ones left pending, lane by lane.
        let unclaimed: Vec<Lane> = match self.claimed.lock() {
            Ok(mut claimed) => self
                .queue
                .lanes()
                .into_iter()
                .filter(|l| which.includes(*l) && claimed.insert(*l))
                .collect(),
            Err(_) => Vec::new(),
        };
        {
            for lane in unclaimed {
                let mut cursor = "0-0".to_string();
                loop {
                    let (next, entries) = self
                        .queue
                        .claim_pending(conn, &self.consumer, lane, &cursor, max.max(1))
                        .await?;
                    push(lane, entries);
                    if next == "0-0" {
                        break;
                    }
                    cursor = next;
                }
            }
        }
        let block = Duration::from_millis(1);
        let count = max.max(1);
        for lanes in [
            vec![Lane::Critical],
            Lane::routine(self.queue.shards).collect(),
        ] {
            let lanes: Vec<Lane> = lanes.into_iter().filter(|l| which.includes(*l)).collect();
            if lanes.is_empty() {
                continue;
            }
            for (lane, entries) in self
                .queue
                .read_new(conn, &self.consumer, &lanes, count, block)
                .await?
            {
                push(lane, entries);
            }
        }
        // Critical entries first, whatever order the lanes answered in.
        out.sort_by_key(|d| d.lane != Lane::Critical);
        Ok(out)
    }
}

impl EventQueue for RedisQueue {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn append<'a>(&'a self, events: &'a [&'a Event], dead: &'a [&'a DeadLetter]) -> Fut<'a, ()> {
        Box::pin(async move { Ok(self.queue.append(events, dead).await?) })
    }

    fn read(&self, lanes: Lanes, max: usize) -> Fut<'_, Vec<Delivery>> {
        Box::pin(async move {
            let read = self.read_lanes(lanes, max).await;
            if read.is_err() {
                // The connection may be broken: the next read opens a new one and claims again.
                *self.reader.lock().await = None;
                if let Ok(mut claimed) = self.claimed.lock() {
                    claimed.clear();
                }
            }
            Ok(read?)
        })
    }

    fn ack<'a>(
        &'a self,
        done: &'a [Delivery],
        written: &'a Written,
        dead: &'a [DeadLetter],
    ) -> Fut<'a, ()> {
        Box::pin(async move {
            let mut by_lane: BTreeMap<Lane, Vec<Done>> = BTreeMap::new();
            for d in done {
                by_lane.entry(d.lane).or_default().push(Done {
                    id: d.id.clone(),
                    events: d.events.len() as u64,
                });
            }
            let acks: Vec<(Lane, Vec<Done>)> = by_lane.into_iter().collect();
            let mut pipe = redis::pipe();
            pipe.atomic();
            self.queue
                .add_dead(&mut pipe, dead, written.capped.len() as u64);
            self.queue
                .add_ack(&mut pipe, &acks, written.stored, written.duplicates);
            Ok(self.queue.exec(&pipe).await?)
        })
    }

    fn depths(&self) -> Fut<'_, Vec<(Lane, u64)>> {
        Box::pin(async move { Ok(self.queue.depths().await?) })
    }

    fn status(&self) -> Fut<'_, crate::status::Status> {
        Box::pin(async move { Ok(crate::status::collect(&self.queue).await?) })
    }

    fn dead_letters<'a>(&'a self, filter: &'a Filter) -> Fut<'a, Vec<Letter>> {
        Box::pin(async move { Ok(crate::dlq::list(&self.queue, filter).await?) })
    }

    fn replay<'a>(&'a self, limits: &'a Limits, filter: &'a Filter) -> Fut<'a, Replayed> {
        Box::pin(async move { Ok(crate::dlq::replay(&self.queue, limits, filter).await?) })
    }

    fn purge<'a>(&'a self, filter: &'a Filter) -> Fut<'a, u64> {
        Box::pin(async move { Ok(crate::dlq::purge(&self.queue, filter).await?) })
    }

    fn circuits(&self) -> Fut<'_, BTreeMap<String, bool>> {
        Box::pin(async move { Ok(crate::breaker::shared(&self.queue).await?) })
    }

    fn ready(&self) -> Fut<'_, (&'static str, bool)> {
        Box::pin(async move {
            let mut conn = self.queue.conn.clone();
            let ok = redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .is_ok();
            Ok(("redis", ok))
        })
    }
}

/// The store on PostgreSQL: one shared connection for queries, one for writes.
pub struct PgStore {
    db: Db,
    url: String,
    writer: Mutex<Option<Store>>,
    caps: crate::caps::Caps,
}

impl PgStore {
    pub fn new(url: &str, caps: crate::caps::Caps) -> PgStore {
        PgStore {
            db: Db::new(url),
            url: url.to_string(),
            writer: Mutex::new(None),
            caps,
        }
    }
}

const SENSOR_COLUMNS: &str =
    "sensor_id, house_id, kinds, (extract(epoch FROM first_seen) * 1000)::int8,
    (extract(epoch FROM last_seen) * 1000)::int8";

fn sensor_row(r: &tokio_postgres::Row) -> SensorRow {
    SensorRow {
        sensor_id: r.get(0),
        house_id: r.get(1),
        kinds: r.get(2),
        first_seen: r.get(3),
        last_seen: r.get(4),
    }
}

impl EventStore for PgStore {
    fn write<'a>(&'a self, events: &'a [&'a Event]) -> Fut<'a, Written> {
        Box::pin(async move {
            let mut slot = self.writer.lock().await;
            if slot.as_ref().is_none_or(Store::is_closed) {
                *slot = Some(Store::connect(&self.url, Duration::from_secs(30)).await?);
            }
            let Some(store) = slot.as_mut() else {
                return Ok(Written::default());
            };
            let memo = crate::worker::sensors::SensorMemo::new(0);
            let capped = store
                .admit(&memo.unknown(events), events, &self.caps)
                .await?;
            let kept: Vec<&Event> = events
                .iter()
                .enumerate()
                .filter(|(i, _)| !capped.iter().any(|(c, _)| c == i))
                .map(|(_, e)| *e)
                .collect();
            let sensors = memo.to_record(&kept);
            // No fences: this writer owns no lanes (the distributed worker passes its own).
            let stored = store.write(&[], &kept, &sensors, true).await?;
            Ok(Written {
                stored,
                duplicates: kept.len() as u64 - stored,
                capped,
            })
        })
    }

    fn houses<'a>(&'a self, only: Option<&'a str>) -> Fut<'a, Vec<HouseView>> {
        Box::pin(async move {
            let client = self.db.client().await?;
            let rows = client
                .query(
                    "SELECT house_id, count(*) FROM sensors
                     WHERE $1::text IS NULL OR house_id = $1
                     GROUP BY house_id ORDER BY house_id",
                    &[&only],
                )
                .await
                .map_err(pg)?;
            Ok(rows
                .iter()
                .map(|r| HouseView {
                    house_id: r.get(0),
                    sensors: r.get(1),
                })
                .collect())
        })
    }

    fn sensors<'a>(&'a self, house: &'a str) -> Fut<'a, Vec<SensorRow>> {
        Box::pin(async move {
            let client = self.db.client().await?;
            let rows = client
                .query(
                    &format!(
                        "SELECT {SENSOR_COLUMNS} FROM sensors WHERE house_id = $1
                         ORDER BY sensor_id LIMIT 10000"
                    ),
                    &[&house],
                )
                .await
                .map_err(pg)?;
            Ok(rows.iter().map(sensor_row).collect())
        })
    }

    fn sensor<'a>(&'a self, house: &'a str, sensor: &'a str) -> Fut<'a, Option<SensorRow>> {
        Box::pin(async move {
            let client = self.db.client().await?;
            Ok(client
                .query_opt(
                    &format!(
                        "SELECT {SENSOR_COLUMNS} FROM sensors WHERE house_id = $1 AND sensor_id = $2"
                    ),
                    &[&house, &sensor],
                )
                .await
                .map_err(pg)?
                .as_ref()
                .map(sensor_row))
        })
    }

    fn history<'a>(&'a self, q: &'a HistoryQuery) -> Fut<'a, Vec<HistoryEvent>> {
        Box::pin(async move {
            let client = self.db.client().await?;
            let rows = client
                .query(
                    "SELECT id, kind, value, unit, seq, (extract(epoch FROM ts) * 1000)::int8 AS ms
                     FROM events
                     WHERE house_id = $8 AND sensor_id = $1
                       AND ($2::text IS NULL OR kind = $2)
                       AND ($3::int8 IS NULL OR ts >= timestamptz 'epoch' + $3 * interval '1 millisecond')
                       AND ($4::int8 IS NULL OR ts < timestamptz 'epoch' + $4 * interval '1 millisecond')
                       AND ($5::int8 IS NULL OR (ts, id) < (timestamptz 'epoch' + $5 * interval '1 millisecond', $6))
                     ORDER BY ts DESC, id DESC
                     LIMIT $7",
                    &[
                        &q.sensor,
                        &q.kind,
                        &q.from,
                        &q.to,
                        &q.cursor.map(|c| c.0),
                        &q.cursor.map(|c| c.1).unwrap_or(0),
                        &q.limit,
                        &q.house,
                    ],
                )
                .await
                .map_err(pg)?;
            Ok(rows
                .iter()
                .map(|r| HistoryEvent {
                    id: r.get(0),
                    kind: r.get(1),
                    value: r.get(2),
                    unit: r.get(3),
                    seq: r.get(4),
                    ts: r.get(5),
                })
                .collect())
        })
    }

    fn alerts<'a>(
        &'a self,
        house: Option<&'a str>,
        state: Option<AlertState>,
        limit: i64,
    ) -> Fut<'a, Vec<Alert>> {
        Box::pin(async move {
            let client = self.db.client().await?;
            Ok(crate::servers::alerts::list(&*client, house, state, limit).await?)
        })
    }

    fn alert(&self, id: i64) -> Fut<'_, Option<Alert>> {
        Box::pin(async move {
            let client = self.db.client().await?;
            Ok(crate::servers::alerts::get(&*client, id).await?)
        })
    }

    fn acknowledge<'a>(&'a self, id: i64, by: &'a str) -> Fut<'a, Option<(Alert, bool)>> {
        Box::pin(async move {
            let client = self.db.client().await?;
            Ok(crate::servers::alerts::acknowledge(&*client, id, by).await?)
        })
    }

    fn mark_pushed<'a>(&'a self, alerts: &'a [Alert]) -> Fut<'a, ()> {
        Box::pin(async move {
            let client = self.db.client().await?;
            Ok(crate::servers::alerts::mark_pushed(&*client, alerts).await?)
        })
    }

    fn token_house<'a>(&'a self, hash: &'a [u8]) -> Fut<'a, Option<String>> {
        Box::pin(async move {
            let client = self.db.client().await?;
            Ok(client
                .query_opt(
                    "SELECT house_id FROM tokens
                     WHERE hash = $1 AND (expires_at IS NULL OR expires_at > now())",
                    &[&hash],
                )
                .await
                .map_err(pg)?
                .map(|r| r.get(0)))
        })
    }

    fn create_token<'a>(
        &'a self,
        id: &'a str,
        hash: &'a [u8],
        house: &'a str,
        expires_at: Option<i64>,
    ) -> Fut<'a, ()> {
        Box::pin(async move {
            let client = self.db.client().await?;
            client
                .execute(
                    "INSERT INTO tokens (id, hash, house_id, expires_at)
                     VALUES ($1, $2, $3, timestamptz 'epoch' + $4::int8 * interval '1 millisecond')",
                    &[&id, &hash, &house, &expires_at],
                )
                .await
                .map_err(pg)?;
            Ok(())
        })
    }

    fn tokens(&self) -> Fut<'_, Vec<TokenInfo>> {
        Box::pin(async move {
            let client = self.db.client().await?;
            let rows = client
                .query(
                    "SELECT id, house_id, (extract(epoch FROM created_at) * 1000)::int8,
                            (extract(epoch FROM expires_at) * 1000)::int8
                     FROM tokens ORDER BY created_at, id",
                    &[],
                )
                .await
                .map_err(pg)?;
            Ok(rows
                .iter()
                .map(|r| TokenInfo {
                    id: r.get(0),
                    house_id: r.get(1),
                    created_at: r.get(2),
                    expires_at: r.get(3),
                })
                .collect())
        })
    }

    fn revoke<'a>(&'a self, id: &'a str) -> Fut<'a, bool> {
        Box::pin(async move {
            let client = self.db.client().await?;
            let n = client
                .execute("DELETE FROM tokens WHERE id = $1", &[&id])
                .await
                .map_err(pg)?;
            Ok(n > 0)
        })
    }

    fn ready(&self) -> Fut<'_, (&'static str, bool)> {
        Box::pin(async move {
            let ok = match self.db.client().await {
                Ok(c) => c.simple_query("SELECT 1").await.is_ok(),
                Err(_) => false,
            };
            Ok(("postgres", ok))
        })
    }
}

/// The latest values in Redis (`P:latest:{house}:{sensor}`), compared and set by a Lua script.
pub struct RedisCache {
    cache: Cache,
    queue: Queue,
}

impl LatestCache for RedisCache {
    fn offer<'a>(&'a self, events: &'a [&'a Event]) -> Fut<'a, ()> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            self.cache.add_update(&mut pipe, events);
            Ok(self.queue.exec(&pipe).await?)
        })
    }

    fn latest<'a>(
        &'a self,
        house: &'a str,
        sensors: &'a [String],
    ) -> Fut<'a, Vec<HashMap<String, String>>> {
        Box::pin(async move { Ok(self.cache.latest(house, sensors).await?) })
    }
}

/// Pushes through Redis pub/sub (`P:push`) to every API process; webhook jobs on `P:notify`.
pub struct RedisFanOut {
    queue: Queue,
    redis_url: String,
}

impl FanOut for RedisFanOut {
    fn publish(&self, message: String) -> Fut<'_, ()> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.cmd("PUBLISH")
                .arg(self.queue.keys.push())
                .arg(message)
                .ignore();
            Ok(self.queue.exec(&pipe).await?)
        })
    }

    fn push_alert<'a>(&'a self, rules: &'a RuleSet, alert: &'a Alert) -> Fut<'a, ()> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            crate::alerts::add_push(&mut pipe, &self.queue.keys, rules, alert);
            Ok(self.queue.exec(&pipe).await?)
        })
    }

    fn subscribe(&self) -> Fut<'_, tokio::sync::mpsc::Receiver<String>> {
        Box::pin(async move {
            let (tx, rx) = tokio::sync::mpsc::channel(4096);
            let channel = self.queue.keys.push();
            let url = self.redis_url.clone();
            // Subscribed before returning, so that nothing published after this call is missed.
            let first = subscribe(&url, &channel).await?;
            tokio::spawn(relay(url, channel, first, tx));
            Ok(rx)
        })
    }

    fn watch<'a>(&'a self, houses: &'a [String], ttl_ms: i64) -> Fut<'a, ()> {
        Box::pin(async move {
            let key = self.queue.keys.watched();
            let now = crate::event::now_us() / 1000;
            let mut pipe = redis::pipe();
            pipe.cmd("ZREMRANGEBYSCORE")
                .arg(&key)
                .arg("-inf")
                .arg(now)
                .ignore();
            for h in houses {
                pipe.cmd("ZADD").arg(&key).arg(now + ttl_ms).arg(h).ignore();
            }
            Ok(self.queue.exec(&pipe).await?)
        })
    }
}

async fn subscribe(url: &str, channel: &str) -> Result<redis::aio::PubSub, QueueError> {
    let client = redis::Client::open(url)?;
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channel).await?;
    Ok(pubsub)
}

/// Forward `P:push` to `tx` until the receiver is dropped, resubscribing after a failure.
async fn relay(
    url: String,
    channel: String,
    first: redis::aio::PubSub,
    tx: tokio::sync::mpsc::Sender<String>,
) {
    use futures_util::StreamExt;
    let mut backoff = Backoff::default();
    let mut current = Some(first);
    loop {
        let pubsub = match current.take() {
            Some(p) => Ok(p),
            None => subscribe(&url, &channel).await,
        };
        match pubsub {
            Ok(mut pubsub) => {
                backoff.reset();
                let mut messages = pubsub.on_message();
                while let Some(msg) = messages.next().await {
                    if let Ok(text) = msg.get_payload::<String>()
                        && tx.send(text).await.is_err()
                    {
                        return;
                    }
                }
            }
            Err(e) => {
                crate::metrics::dependency_error("redis");
                warn!(error = %e, "push subscription lost, reconnecting");
            }
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}
