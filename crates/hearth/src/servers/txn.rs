//! Writes that go to Redis together ([`Txn`]): one transaction on one server; on a cluster, one
//! per slot ([`Group`]), sent in the order their groups were first written to.
//!
//! What a cluster loses is the atomicity *between* groups: a process that dies between two of
//! them leaves the first written and not the second. Callers order their groups so that this is
//! always a redelivery, never a loss: dead letters before the acknowledgement of their entry,
//! lanes' entries before the removal of the letter they replay (README, "Redis Cluster").

use std::time::Duration;

use redis::{Pipeline, RedisResult};

use super::conn::Conn;
use super::keys::{Group, Keys};

/// Commands grouped by the slot their keys share.
pub struct Txn {
    keys: Keys,
    atomic: bool,
    parts: Vec<(Group, Pipeline)>,
}

/// Replicas a write must reach before it counts as done (`redis_wait_replicas`).
#[derive(Debug, Clone, Copy)]
pub struct Replicas {
    pub count: u32,
    pub timeout: Duration,
}

/// Fewer replicas than asked acknowledged a write in time.
#[derive(Debug, thiserror::Error)]
#[error("{acked} of {wanted} replicas acknowledged the write within {timeout:?}")]
pub struct NotReplicated {
    pub acked: u32,
    pub wanted: u32,
    pub timeout: Duration,
}

/// Why writes did not count as done.
#[derive(Debug, thiserror::Error)]
pub enum Unwritten {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis: {0}")]
    NotReplicated(#[from] NotReplicated),
}

impl Txn {
    /// Transactions (MULTI/EXEC per group).
    pub fn new(keys: &Keys) -> Txn {
        Txn {
            keys: keys.clone(),
            atomic: true,
            parts: Vec::new(),
        }
    }

    /// Pipelines (no MULTI), grouped the same way.
    pub fn pipelined(keys: &Keys) -> Txn {
        Txn {
            atomic: false,
            ..Txn::new(keys)
        }
    }

    /// The commands of `group`'s part.
    pub fn on(&mut self, group: Group) -> &mut Pipeline {
        let group = self.keys.group(group);
        let i = match self.parts.iter().position(|(g, _)| *g == group) {
            Some(i) => i,
            None => {
                let mut pipe = redis::pipe();
                if self.atomic {
                    pipe.atomic();
                }
                self.parts.push((group, pipe));
                self.parts.len() - 1
            }
        };
        &mut self.parts[i].1
    }

    /// Send every part, one after the other, in order.
    pub async fn exec(&self, conn: &Conn) -> RedisResult<()> {
        let mut conn = conn.clone();
        for (_, pipe) in self
            .parts
            .iter()
            .filter(|(_, p)| p.cmd_iter().next().is_some())
        {
            pipe.exec_async(&mut conn).await?;
        }
        Ok(())
    }

    /// Send every part, each followed by a wait for `replicas` to hold it (on the same
    /// connection: [`Conn::exec_waiting`]).
    pub async fn exec_replicated(
        &self,
        conn: &Conn,
        replicas: Option<Replicas>,
    ) -> Result<(), Unwritten> {
        let Some(r) = replicas.filter(|r| r.count > 0) else {
            return Ok(self.exec(conn).await?);
        };
        let mut conn = conn.clone();
        for (group, pipe) in self
            .parts
            .iter()
            .filter(|(_, p)| p.cmd_iter().next().is_some())
        {
            let key = self.keys.key_of(group);
            let acked = conn.exec_waiting(&key, pipe, r.count, r.timeout).await?;
            if acked < r.count {
                return Err(NotReplicated {
                    acked,
                    wanted: r.count,
                    timeout: r.timeout,
                }
                .into());
            }
        }
        Ok(())
    }
}
