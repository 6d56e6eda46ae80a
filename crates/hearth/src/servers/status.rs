//! `hearth status` on the servers: lanes, consumer groups, leases, dead letters and the loss
//! accounting, read from Redis in one pipeline.

use std::collections::HashMap;

use redis::Value;

use super::lease;
use super::queue::{self, GROUP, Queue, QueueError};
use crate::status::{Accounting, ConsumerStatus, LaneStatus, Status, lane_depth, stat};

impl Queue {
    /// Lanes, consumers, leases, dead letters and the loss accounting (`hearth status`).
    pub async fn status(&self) -> Result<Status, QueueError> {
        let queue = self;
        let lanes = queue.lanes();
        let mut conn = queue.conn.clone();
        let mut pipe = redis::pipe();
        for lane in &lanes {
            let key = queue.stream(*lane);
            pipe.cmd("XLEN").arg(key);
            pipe.cmd("XINFO").arg("GROUPS").arg(key);
            pipe.cmd("XINFO").arg("CONSUMERS").arg(key).arg(GROUP);
        }
        pipe.cmd("XLEN").arg(queue.keys.dead());
        let counters = queue.keys.all_stats(&lanes);
        for key in &counters {
            pipe.cmd("HGETALL").arg(key);
        }
        let now = crate::event::now_us() / 1000;
        for pool in ["routine", "critical"] {
            pipe.cmd("ZCOUNT")
                .arg(queue.keys.consumers(pool))
                .arg(now - 60_000)
                .arg("+inf");
        }
        let replies: Vec<Value> = pipe.ignore_errors().query_async(&mut conn).await?;
        let owners = lease::owners(&mut conn, &queue.keys, &lanes).await?;

        let mut it = replies.into_iter();
        let mut raw_lanes = Vec::new();
        for (lane, owner) in lanes.iter().zip(owners) {
            let entries = it.next().as_ref().and_then(queue::as_u64).unwrap_or(0);
            let groups = it.next().unwrap_or(Value::Nil);
            let consumers = it.next().unwrap_or(Value::Nil);
            raw_lanes.push((*lane, owner, entries, groups, consumers));
        }
        let dead_letters = it.next().as_ref().and_then(queue::as_u64).unwrap_or(0);
        // On a cluster, counters are kept per lane as well: added up.
        let mut stats: HashMap<String, u64> = HashMap::new();
        for _ in &counters {
            let pairs: Vec<(String, u64)> = match it.next() {
                Some(Value::Array(kv)) => kv
                    .chunks(2)
                    .filter_map(|p| Some((queue::as_string(&p[0])?, queue::as_u64(p.get(1)?)?)))
                    .collect(),
                Some(Value::Map(kv)) => kv
                    .iter()
                    .filter_map(|(k, v)| Some((queue::as_string(k)?, queue::as_u64(v)?)))
                    .collect(),
                _ => Vec::new(),
            };
            for (k, v) in pairs {
                *stats.entry(k).or_default() += v;
            }
        }
        let mut consumers_alive = HashMap::new();
        for pool in ["routine", "critical"] {
            let n = it.next().as_ref().and_then(queue::as_u64).unwrap_or(0);
            consumers_alive.insert(pool.to_string(), n);
        }
        let mut lane_status = Vec::new();
        for (lane, owner, entries, groups, consumers) in raw_lanes {
            let group = rows(&groups)
                .into_iter()
                .find(|g| g.get("name").and_then(queue::as_string).as_deref() == Some(GROUP));
            let field = |name: &str| {
                group
                    .as_ref()
                    .and_then(|g| g.get(name))
                    .and_then(queue::as_u64)
            };
            lane_status.push(LaneStatus {
                lane: lane.name(),
                depth: lane_depth(&stats, lane),
                entries,
                pending: field("pending").unwrap_or(0),
                lag: field("lag"),
                owner,
                consumers: rows(&consumers)
                    .into_iter()
                    .map(|c| ConsumerStatus {
                        name: c.get("name").and_then(queue::as_string).unwrap_or_default(),
                        pending: c.get("pending").and_then(queue::as_u64).unwrap_or(0),
                        idle_ms: c.get("idle").and_then(queue::as_u64).unwrap_or(0),
                    })
                    .collect(),
            });
        }
        Ok(Status {
            events: Accounting::from_counters(&stats, &lane_status),
            lanes: lane_status,
            dead_letters,
            dead_letters_expired: stats.get(stat::DEAD_EXPIRED).copied().unwrap_or(0),
            consumers_alive,
        })
    }
}

/// XINFO replies: a list of flat field/value arrays (RESP2) or maps (RESP3).
fn rows(v: &Value) -> Vec<HashMap<String, Value>> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| match item {
            Value::Array(kv) => Some(
                kv.chunks(2)
                    .filter_map(|p| Some((queue::as_string(&p[0])?, p.get(1)?.clone())))
                    .collect(),
            ),
            Value::Map(kv) => Some(
                kv.iter()
                    .filter_map(|(k, v)| Some((queue::as_string(k)?, v.clone())))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}
