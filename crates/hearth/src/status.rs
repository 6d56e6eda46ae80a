//! `hearth status`: the state of the queue as one snapshot, for people (a table) and scripts
//! (`--json`): per lane its depth in events, its entries, pending and lag (in entries), owner and
//! consumers; the dead letters; the live consumers; and the loss accounting.

use std::collections::HashMap;

use serde::Serialize;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Status {
    pub lanes: Vec<LaneStatus>,
    pub dead_letters: u64,
    /// Dead letters removed by their retention, ever.
    pub dead_letters_expired: u64,
    pub consumers_alive: HashMap<String, u64>,
    pub events: Accounting,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LaneStatus {
    pub lane: String,
    /// Events appended and not yet acknowledged (stored or dead-lettered).
    pub depth: u64,
    /// Entries (record batches) in the stream.
    pub entries: u64,
    /// Entries delivered to a consumer, not yet acknowledged.
    pub pending: u64,
    /// Entries not yet delivered (`null` when Redis cannot tell).
    pub lag: Option<u64>,
    /// The consumer holding the lane's lease.
    pub owner: Option<String>,
    pub consumers: Vec<ConsumerStatus>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ConsumerStatus {
    pub name: String,
    pub pending: u64,
    pub idle_ms: u64,
}

/// The loss accounting: every event appended is either finished (stored, found already stored,
/// or dead-lettered) or in flight. After a run has drained, `in_flight` is 0 and `stored` is the
/// rows in `events`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Accounting {
    /// Events appended to the lanes by the ingest.
    pub received: u64,
    pub stored: u64,
    pub duplicates: u64,
    pub dead_lettered: u64,
    pub rejected_at_ingest: u64,
    /// Events of entries not yet acknowledged: the sum of the lanes' depths.
    pub in_flight: u64,
    pub rejected_by_reason: HashMap<String, u64>,
}

impl Accounting {
    /// The accounting from the counters (Redis `P:stats`, or the embedded `stats` table) and the
    /// lanes they describe.
    pub fn from_counters(stats: &HashMap<String, u64>, lanes: &[LaneStatus]) -> Accounting {
        let get = |k: &str| stats.get(k).copied().unwrap_or(0);
        Accounting {
            received: lanes
                .iter()
                .filter_map(|l| crate::lane::Lane::parse(&l.lane))
                .map(|l| get(&stat::appended(l)))
                .sum(),
            stored: get(stat::STORED),
            duplicates: get(stat::DUPLICATES),
            dead_lettered: get(stat::DEAD_LETTERED),
            rejected_at_ingest: get(stat::REJECTED),
            in_flight: lanes.iter().map(|l| l.depth).sum(),
            rejected_by_reason: stats
                .iter()
                .filter_map(|(k, v)| Some((k.strip_prefix("rejected:")?.to_string(), *v)))
                .collect(),
        }
    }
}

/// Events appended to a lane and not acknowledged, from the counters.
/// Epoch milliseconds as RFC 3339 (UTC, seconds), for tables.
pub fn when(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

/// Counters kept in `P:stats`, shared by every process: the loss accounting of `hearth status`.
pub mod stat {
    /// Rejections written to the dead-letter stream by the ingest (and `rejected:{reason}`).
    pub const REJECTED: &str = "rejected";
    /// Rows inserted into `events`.
    pub const STORED: &str = "stored";
    /// Events whose row already existed when written: broker redeliveries, duplicate publishes,
    /// and the retry of a batch whose first attempt had committed.
    pub const DUPLICATES: &str = "duplicates";
    /// Events a worker moved to the dead-letter stream.
    pub const DEAD_LETTERED: &str = "dead_lettered";
    /// Dead letters removed by their retention (age or count).
    pub const DEAD_EXPIRED: &str = "dead_expired";

    /// Events appended to a lane by the ingest (a broker redelivery counts again).
    pub fn appended(lane: crate::lane::Lane) -> String {
        format!("in:{}", lane.name())
    }

    /// Events of a lane's acknowledged entries (stored, already there, or dead-lettered).
    pub fn finished(lane: crate::lane::Lane) -> String {
        format!("out:{}", lane.name())
    }
}

pub fn lane_depth(stats: &HashMap<String, u64>, lane: crate::lane::Lane) -> u64 {
    let get = |k: &str| stats.get(k).copied().unwrap_or(0);
    get(&stat::appended(lane)).saturating_sub(get(&stat::finished(lane)))
}

impl Status {
    /// Everything appended has been stored or dead-lettered, and nothing waits in a lane.
    pub fn drained(&self) -> bool {
        self.lanes
            .iter()
            .all(|l| l.depth == 0 && l.entries == 0 && l.pending == 0)
    }

    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<12} {:>9} {:>8} {:>8} {:>8}  {:<36} CONSUMERS",
            "LANE", "DEPTH", "ENTRIES", "PENDING", "LAG", "OWNER"
        );
        for l in &self.lanes {
            let consumers: Vec<String> = l
                .consumers
                .iter()
                .filter(|c| c.pending > 0 || Some(&c.name) == l.owner.as_ref())
                .map(|c| format!("{}({})", c.name, c.pending))
                .collect();
            let _ = writeln!(
                out,
                "{:<12} {:>9} {:>8} {:>8} {:>8}  {:<36} {}",
                l.lane,
                l.depth,
                l.entries,
                l.pending,
                l.lag.map(|v| v.to_string()).unwrap_or_else(|| "?".into()),
                l.owner.as_deref().unwrap_or("-"),
                consumers.join(" ")
            );
        }
        let total: u64 = self.lanes.iter().map(|l| l.depth).sum();
        let e = &self.events;
        let _ = writeln!(out, "{:<12} {:>9}", "total", total);
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "dead letters      {} ({} removed by their retention)",
            self.dead_letters, self.dead_letters_expired
        );
        let _ = writeln!(
            out,
            "consumers alive   routine {}, critical {}",
            self.consumers_alive.get("routine").unwrap_or(&0),
            self.consumers_alive.get("critical").unwrap_or(&0)
        );
        let _ = writeln!(
            out,
            "events            received {}, stored {}, duplicates {}, dead-lettered by workers {}, in flight {}",
            e.received, e.stored, e.duplicates, e.dead_lettered, e.in_flight
        );
        let mut reasons: Vec<_> = e.rejected_by_reason.iter().collect();
        reasons.sort();
        let reasons: Vec<String> = reasons.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(
            out,
            "rejected at ingest {}{}",
            e.rejected_at_ingest,
            if reasons.is_empty() {
                String::new()
            } else {
                format!(" ({})", reasons.join(", "))
            }
        );
        out
    }
}
