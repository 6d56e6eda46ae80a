//! How a run is checked: waiting until every event is stored (or nothing moves any more), then
//! counting in the store what was lost, duplicated or stored out of order per sensor, with the
//! receive → stored latency of every row.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{HearthRun, Percentiles, ProcessStats};

/// Wait until `expected` rows are stored, or nothing has moved for 30 s after the publisher
/// finished (then the rest is lost). Progress is read from hearth's `stored` counter in Redis
/// (cheap, unlike counting rows while they are written); the final word is PostgreSQL's.
pub(crate) async fn wait_stored(
    db: &tokio_postgres::Client,
    stats: &Stats,
    pattern: &str,
    expected: u64,
    publisher: &tokio::task::JoinHandle<anyhow::Result<Duration>>,
    sent: &AtomicU64,
) -> anyhow::Result<u64> {
    let count = || async {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM events WHERE sensor_id LIKE $1",
                &[&pattern],
            )
            .await?
            .get(0);
        Ok::<u64, anyhow::Error>(n as u64)
    };
    wait_until_stored(
        expected,
        publisher,
        sent,
        || stats.stored_since_start(),
        count,
    )
    .await
}

/// Poll `progress` (a cheap counter of events finished) until it reaches `expected` and
/// `count` (the rows, the final word) agrees, or nothing has moved for 30 s after the publisher
/// finished (the rest is then lost). Returns `count`.
pub(crate) async fn wait_until_stored<P, PF, C, CF>(
    expected: u64,
    publisher: &tokio::task::JoinHandle<anyhow::Result<Duration>>,
    sent: &AtomicU64,
    mut progress: P,
    count: C,
) -> anyhow::Result<u64>
where
    P: FnMut() -> PF,
    PF: std::future::Future<Output = u64>,
    C: Fn() -> CF,
    CF: std::future::Future<Output = anyhow::Result<u64>>,
{
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last = (0, Instant::now());
    loop {
        let progress = progress().await;
        if tty {
            eprint!(
                "\rbench: published {:>9} / {expected}  stored {:>9} / {expected}   ",
                sent.load(Ordering::Relaxed),
                progress
            );
        }
        if progress >= expected {
            let stored = count().await?;
            if stored >= expected {
                if tty {
                    eprintln!();
                }
                return Ok(stored);
            }
        }
        if progress != last.0 {
            last = (progress, Instant::now());
        } else if publisher.is_finished() && last.1.elapsed() > Duration::from_secs(30) {
            if tty {
                eprintln!();
            }
            eprintln!("bench: nothing stored for 30 s; counting the rest as lost");
            return count().await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// hearth's `stored` counter, relative to its value when the run started.
pub(crate) struct Stats {
    pub(crate) conn: hearth::servers::conn::Conn,
    pub(crate) key: String,
    pub(crate) start: u64,
}

impl Stats {
    pub(crate) async fn open(redis_url: &str, prefix: &str) -> anyhow::Result<Stats> {
        let mut conn =
            hearth::servers::queue::connect(redis_url, hearth::servers::queue::REPLY_TIMEOUT)
                .await?;
        let key = hearth::servers::keys::Keys::new(prefix).stats();
        let start: Option<u64> = redis::cmd("HGET")
            .arg(&key)
            .arg(hearth::status::stat::STORED)
            .query_async(&mut conn)
            .await?;
        Ok(Stats {
            conn,
            key,
            start: start.unwrap_or(0),
        })
    }

    pub(crate) async fn stored_since_start(&self) -> u64 {
        let mut conn = self.conn.clone();
        let now: Option<u64> = redis::cmd("HGET")
            .arg(&self.key)
            .arg(hearth::status::stat::STORED)
            .query_async(&mut conn)
            .await
            .unwrap_or(None);
        now.unwrap_or(0).saturating_sub(self.start)
    }
}

pub(crate) async fn measure(
    db: &tokio_postgres::Client,
    pattern: &str,
    expected: u64,
    stored: u64,
    started_wall_us: i64,
    publish_seconds: f64,
    processes: Vec<ProcessStats>,
) -> anyhow::Result<HearthRun> {
    let row = db
        .query_one(
            "SELECT count(*), count(DISTINCT (house_id, sensor_id, kind, seq)),
                    (extract(epoch FROM max(stored_at)) * 1e6)::bigint
             FROM events WHERE sensor_id LIKE $1",
            &[&pattern],
        )
        .await?;
    let (rows, distinct, last_us): (i64, i64, Option<i64>) = (row.get(0), row.get(1), row.get(2));
    let out_of_order: i64 = db
        .query_one(
            "SELECT count(*) FROM (
                SELECT seq, lag(seq) OVER (PARTITION BY house_id, sensor_id ORDER BY id) AS prev
                FROM events WHERE sensor_id LIKE $1
             ) x WHERE prev IS NOT NULL AND seq <= prev",
            &[&pattern],
        )
        .await?
        .get(0);
    let rows_lat = db
        .query(
            "SELECT (extract(epoch FROM stored_at - received_at) * 1e6)::bigint,
                    (extract(epoch FROM stored_at - ts) * 1e6)::bigint
             FROM events WHERE sensor_id LIKE $1",
            &[&pattern],
        )
        .await?;
    let checked = Checked {
        rows,
        distinct,
        out_of_order,
        last_stored_us: last_us,
        receive_us: rows_lat.iter().map(|r| r.get(0)).collect(),
        publish_us: rows_lat.iter().map(|r| r.get(1)).collect(),
    };
    Ok(checked.run(
        expected,
        stored,
        started_wall_us,
        publish_seconds,
        processes,
    ))
}

/// What a store holds after a run, read by the checker.
pub(crate) struct Checked {
    pub(crate) rows: i64,
    /// Distinct (sensor, kind, seq).
    pub(crate) distinct: i64,
    /// Rows whose seq does not grow with storage order within their sensor.
    pub(crate) out_of_order: i64,
    /// When the last row was stored (epoch µs).
    pub(crate) last_stored_us: Option<i64>,
    /// Per row: receive → stored, publish (ts) → stored, in µs.
    pub(crate) receive_us: Vec<i64>,
    pub(crate) publish_us: Vec<i64>,
}

impl Checked {
    pub(crate) fn run(
        mut self,
        expected: u64,
        stored: u64,
        started_wall_us: i64,
        publish_seconds: f64,
        processes: Vec<ProcessStats>,
    ) -> HearthRun {
        let seconds = self
            .last_stored_us
            .map(|l| (l - started_wall_us) as f64 / 1e6)
            .unwrap_or(0.0)
            .max(1e-6);
        let cpu: f64 = processes.iter().map(|p| p.cpu_seconds).sum();
        let distinct = self.distinct;
        HearthRun {
            stored,
            seconds,
            events_per_s: distinct as f64 / seconds,
            publish_seconds,
            lost: expected.saturating_sub(distinct as u64),
            duplicated: (self.rows - distinct) as u64,
            out_of_order: self.out_of_order as u64,
            receive_to_stored_ms: percentiles(&mut self.receive_us),
            publish_to_stored_ms: percentiles(&mut self.publish_us),
            cpu_us_per_event: (!processes.is_empty() && distinct > 0)
                .then(|| cpu * 1e6 / distinct as f64),
            processes,
        }
    }
}

/// Exact percentiles (in ms) of microsecond samples.
pub(crate) fn percentiles(us: &mut [i64]) -> Percentiles {
    if us.is_empty() {
        return Percentiles::default();
    }
    us.sort_unstable();
    let at = |q: f64| {
        let i = ((q * us.len() as f64).ceil() as usize).clamp(1, us.len()) - 1;
        us[i] as f64 / 1000.0
    };
    Percentiles {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        p999: at(0.999),
        max: us[us.len() - 1] as f64 / 1000.0,
    }
}
