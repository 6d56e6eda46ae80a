//! Lane leases: which consumer may process a lane right now.
//!
//! A lease is a Redis key `P:lease:{lane}` holding the owner's name, with a TTL renewed every third
//! of it while the owner lives. A crashed owner's lease expires and another consumer takes the
//! lane over. A lease alone cannot stop a paused owner that wakes up late, so taking a lane also
//! takes a new fencing token from PostgreSQL ([`crate::servers::store::Store::take_fence`]) and every
//! write checks it: the lease decides who works, the fence decides whose writes count.
//!
//! Consumers also heartbeat into `P:consumers:{pool}` (a sorted set scored by time), so that each
//! can compute its fair share of the pool's lanes and hand lanes over when others join.

use std::time::Duration;

use redis::aio::ConnectionLike;

use super::conn::Conn;

use super::keys::Keys;
use super::queue::QueueError;
use crate::lane::Lane;

/// Extend a lease only if it is still ours.
const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

/// Drop a lease only if it is still ours.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// What a lease can be taken on: a lane, an ingest slot.
pub trait Leased: Copy {
    fn lease_name(&self) -> String;
}

impl Leased for Lane {
    fn lease_name(&self) -> String {
        self.name()
    }
}

#[derive(Clone)]
pub struct Leases {
    conn: Conn,
    keys: Keys,
    ttl: Duration,
    pool: String,
    owner: String,
}

impl Leases {
    pub fn new(conn: Conn, keys: Keys, ttl: Duration, pool: &str, owner: &str) -> Self {
        Leases {
            conn,
            keys,
            ttl,
            pool: pool.to_string(),
            owner: owner.to_string(),
        }
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    fn ttl_ms(&self) -> u64 {
        self.ttl.as_millis() as u64
    }

    /// Take the lane (or slot) if nobody holds it.
    pub async fn acquire(&self, lane: impl Leased) -> Result<bool, QueueError> {
        let mut conn = self.conn.clone();
        let reply: Option<String> = redis::cmd("SET")
            .arg(self.keys.lease_of(&lane.lease_name()))
            .arg(&self.owner)
            .arg("NX")
            .arg("PX")
            .arg(self.ttl_ms())
            .query_async(&mut conn)
            .await?;
        Ok(reply.is_some())
    }

    /// Renew our leases on `lanes` and our heartbeat; returns the lanes we no longer hold.
    pub async fn renew<T: Leased>(&self, lanes: &[T]) -> Result<Vec<T>, QueueError> {
        let mut pipe = redis::pipe();
        pipe.cmd("ZADD")
            .arg(self.keys.consumers(&self.pool))
            .arg(crate::event::now_us() / 1000)
            .arg(&self.owner)
            .ignore();
        for lane in lanes {
            pipe.cmd("EVAL")
                .arg(RENEW)
                .arg(1)
                .arg(self.keys.lease_of(&lane.lease_name()))
                .arg(&self.owner)
                .arg(self.ttl_ms());
        }
        let mut conn = self.conn.clone();
        let kept: Vec<i64> = pipe.query_async(&mut conn).await?;
        Ok(lanes
            .iter()
            .zip(kept)
            .filter(|(_, k)| *k == 0)
            .map(|(l, _)| *l)
            .collect())
    }

    pub async fn release(&self, lane: impl Leased) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        redis::cmd("EVAL")
            .arg(RELEASE)
            .arg(1)
            .arg(self.keys.lease_of(&lane.lease_name()))
            .arg(&self.owner)
            .exec_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Leave the pool (on shutdown), so that others take our share at once.
    pub async fn leave(&self) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        redis::cmd("ZREM")
            .arg(self.keys.consumers(&self.pool))
            .arg(&self.owner)
            .exec_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Heartbeat, then count the consumers of the pool seen alive within one lease TTL (at least
    /// 1: ourselves). Forgets the ones not seen for ten TTLs.
    pub async fn live_consumers(&self) -> Result<usize, QueueError> {
        let now = crate::event::now_us() / 1000;
        let key = self.keys.consumers(&self.pool);
        let mut pipe = redis::pipe();
        pipe.cmd("ZADD")
            .arg(&key)
            .arg(now)
            .arg(&self.owner)
            .ignore();
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(now - 10 * self.ttl_ms() as i64)
            .ignore();
        pipe.cmd("ZCOUNT")
            .arg(&key)
            .arg(now - self.ttl_ms() as i64)
            .arg("+inf");
        let mut conn = self.conn.clone();
        let (n,): (usize,) = pipe.query_async(&mut conn).await?;
        Ok(n.max(1))
    }
}

/// Who holds each lane, for `hearth status`.
pub async fn owners(
    conn: &mut impl ConnectionLike,
    keys: &Keys,
    lanes: &[Lane],
) -> Result<Vec<Option<String>>, QueueError> {
    let mut cmd = redis::cmd("MGET");
    for lane in lanes {
        cmd.arg(keys.lease(*lane));
    }
    Ok(cmd.query_async(conn).await?)
}
