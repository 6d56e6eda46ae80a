//! `hearth bench`: hearth measured end to end, honestly, against two baselines run on the same
//! machine in the same invocation.
//!
//! It starts a private Mosquitto from `deploy/mosquitto.conf` (so the shared broker's default
//! limits cannot lose events), runs the `raw` and `sync` baselines ([`baseline`]), starts hearth's
//! own role processes (one ingest, N worker processes) on a fresh database and Redis prefix,
//! publishes the load ([`publish`]), waits until every event is stored, and then checks in
//! PostgreSQL that none is lost, none duplicated and none out of order per sensor. It reports
//! throughput, receive → stored latency percentiles (exact, from every row), CPU per event and
//! peak memory of hearth's processes, and hearth's ratio to each baseline.

pub mod alerts;
pub mod baseline;
pub mod embedded;
pub mod mosquitto;
pub mod process;
pub mod publish;
mod report;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rumqttc::QoS;
use serde::Serialize;

use hearth::config::Config;
use hearth::metrics::{cpu_seconds, peak_rss_kb};
use mosquitto::Mosquitto;
use process::{Role, workspace};
use publish::Load;
use report::machine;

/// What `hearth bench` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub events: u64,
    pub sensors: u64,
    pub rate: u64,
    pub worker_processes: usize,
    pub consumers: u16,
    pub publishers: usize,
    pub qos: u8,
    pub broker: Option<String>,
    pub external: bool,
    pub baselines: bool,
    pub sync_events: u64,
    pub keep: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub command: String,
    pub machine: Machine,
    pub events: u64,
    pub sensors: u64,
    pub target_rate: u64,
    pub qos: u8,
    pub worker_processes: usize,
    pub consumers_per_process: u16,
    pub hearth: HearthRun,
    pub baselines: Baselines,
    pub ratios: Ratios,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub memory_gib: f64,
}

#[derive(Debug, Serialize)]
pub struct HearthRun {
    pub stored: u64,
    pub seconds: f64,
    pub events_per_s: f64,
    pub publish_seconds: f64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub receive_to_stored_ms: Percentiles,
    pub publish_to_stored_ms: Percentiles,
    /// CPU time of hearth's processes during the run, per stored event (µs).
    pub cpu_us_per_event: Option<f64>,
    pub processes: Vec<ProcessStats>,
}

#[derive(Debug, Serialize)]
pub struct ProcessStats {
    pub role: String,
    pub cpu_seconds: f64,
    pub peak_rss_mb: f64,
}

#[derive(Debug, Serialize, Default)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

#[derive(Debug, Serialize, Default)]
pub struct Baselines {
    pub raw_events_per_s: Option<f64>,
    pub sync_events_per_s: Option<f64>,
    pub sync_events: u64,
}

#[derive(Debug, Serialize, Default)]
pub struct Ratios {
    pub vs_raw: Option<f64>,
    pub vs_sync: Option<f64>,
}

impl Report {
    /// Everything published was stored exactly once, in order.
    pub fn clean(&self) -> bool {
        self.hearth.lost == 0 && self.hearth.duplicated == 0 && self.hearth.out_of_order == 0
    }
}

impl Options {
    fn qos(&self) -> QoS {
        if self.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        }
    }

    /// The run's load: hearth's native topics at the asked rate and QoS.
    fn load(&self, run_id: &str) -> Load {
        Load {
            events: self.events,
            sensors: self.sensors,
            rate: self.rate,
            connections: self.publishers,
            qos: self.qos(),
            sensor_prefix: format!("s{run_id}"),
            topic_root: "hearth".into(),
        }
    }
}

impl ProcessStats {
    /// What the process `pid` used since it had used `cpu_before` seconds.
    fn of(role: &str, pid: u32, cpu_before: f64) -> ProcessStats {
        ProcessStats {
            role: role.into(),
            cpu_seconds: cpu_seconds(pid).unwrap_or(0.0) - cpu_before,
            peak_rss_mb: peak_rss_kb(pid).unwrap_or(0) as f64 / 1024.0,
        }
    }
}

pub async fn run(config: Arc<Config>, opts: Options) -> anyhow::Result<Report> {
    let (run_id, dir) = workspace("b")?;

    // The broker: a given one, or a private one with hearth's configuration.
    let private = if opts.broker.is_none() || opts.baselines {
        Some(Mosquitto::start(&dir.join("mosquitto"), 0).map_err(|e| {
            anyhow::anyhow!(
                "cannot start a private mosquitto ({}): {e}",
                mosquitto::binary()
            )
        })?)
    } else {
        None
    };
    let broker_url = match (&opts.broker, opts.external, &private) {
        (Some(url), _, _) => url.clone(),
        (None, true, _) => config.mqtt_url.clone(),
        (None, false, Some(m)) => m.url(),
        (None, false, None) => unreachable!("a private broker is started when none is given"),
    };
    let endpoint = hearth::mqtt::Endpoint::parse(&broker_url, "bench")?;
    let (host, port) = (endpoint.host, endpoint.port);

    let baselines = match (&private, opts.baselines) {
        (Some(broker), true) => run_baselines(&config, &opts, &run_id, broker.port).await?,
        _ => Baselines::default(),
    };

    // hearth's own processes, on a fresh database and Redis prefix.
    let (database_url, prefix) = if opts.external {
        (config.database_url.clone(), config.redis_prefix.clone())
    } else {
        (
            with_database(&config.database_url, &format!("hearth_bench_{run_id}")),
            format!("bench-{run_id}"),
        )
    };
    let mut roles = Vec::new();
    if !opts.external {
        hearth::servers::store::migrate(&database_url).await?;
        let mut child_config = (*config).clone();
        child_config.mqtt_url = broker_url.clone();
        child_config.database_url = database_url.clone();
        child_config.redis_prefix = prefix.clone();
        child_config.mqtt_client_id = format!("bench-ingest-{run_id}");
        child_config.workers = opts.consumers;
        child_config.log = "warn,hearth=info".into();
        for i in 0..opts.worker_processes {
            roles.push(Role::spawn(
                &format!("worker-{}", i + 1),
                &["worker"],
                &child_config,
                &dir,
            )?);
        }
        roles.push(Role::spawn("ingest", &["ingest"], &child_config, &dir)?);
        for role in &roles {
            let needle = if role.name == "ingest" {
                "subscribed"
            } else {
                "worker started"
            };
            role.wait_log(needle, Duration::from_secs(60))?;
        }
        // Give the consumers a moment to share the lanes out before the burst.
        tokio::time::sleep(Duration::from_millis(u64::min(config.lease_ttl_ms, 3000))).await;
    }
    let cpu_before: Vec<f64> = roles
        .iter()
        .map(|r| cpu_seconds(r.pid()).unwrap_or(0.0))
        .collect();

    let load = opts.load(&run_id);
    let pattern = format!("s{run_id}-%");
    let db = hearth::servers::store::connect(&database_url).await?;
    let stats = Stats::open(&config.redis_url, &prefix).await?;
    let sent = Arc::new(AtomicU64::new(0));
    let started_wall = hearth::event::now_us();
    let publisher = {
        let (load, sent, host, id) = (
            load.clone(),
            sent.clone(),
            host.clone(),
            format!("bench-pub-{run_id}"),
        );
        tokio::spawn(async move { publish::publish(&host, port, &id, &load, sent).await })
    };
    let stored = wait_stored(&db, &stats, &pattern, opts.events, &publisher, &sent).await?;
    let publish_seconds = publisher.await??.as_secs_f64();

    let processes: Vec<ProcessStats> = roles
        .iter()
        .zip(&cpu_before)
        .map(|(r, before)| ProcessStats::of(&r.name, r.pid(), *before))
        .collect();
    let hearth = measure(
        &db,
        &pattern,
        opts.events,
        stored,
        started_wall,
        publish_seconds,
        processes,
    )
    .await?;

    for role in &mut roles {
        role.stop();
    }
    if !opts.keep {
        cleanup(&config, &run_id, &prefix, opts.external).await;
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!(
            "bench: kept {} (database hearth_bench_{run_id}, prefix {prefix})",
            dir.display()
        );
    }
    Ok(Report::new(
        &opts,
        opts.worker_processes,
        opts.consumers,
        hearth,
        baselines,
    ))
}

/// The two baselines (see the module's documentation), on the private broker at `port`; the
/// sync one writes into the database `hearth_bench_{run_id}`.
async fn run_baselines(
    config: &Config,
    opts: &Options,
    run_id: &str,
    port: u16,
) -> anyhow::Result<Baselines> {
    // As fast as possible, at QoS 1, on topics of their own.
    let base = |root: &str, events: u64| Load {
        events,
        rate: 0,
        qos: QoS::AtLeastOnce,
        topic_root: root.into(),
        ..opts.load(run_id)
    };
    eprintln!("bench: raw baseline, {} events", opts.events);
    let raw_events_per_s = Some(baseline::raw(port, &base("rawbench", opts.events), run_id).await?);
    let db = with_database(&config.database_url, &format!("hearth_bench_{run_id}"));
    hearth::servers::store::migrate(&db).await?;
    let sync_events = opts.sync_events.min(opts.events);
    eprintln!("bench: sync baseline, {sync_events} events");
    let sync_events_per_s =
        Some(baseline::sync(port, &base("syncbench", sync_events), run_id, &db).await?);
    Ok(Baselines {
        raw_events_per_s,
        sync_events_per_s,
        sync_events,
    })
}

impl Report {
    fn new(
        opts: &Options,
        worker_processes: usize,
        consumers_per_process: u16,
        hearth: HearthRun,
        baselines: Baselines,
    ) -> Report {
        Report {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            machine: machine(),
            events: opts.events,
            sensors: opts.sensors,
            target_rate: opts.rate,
            qos: opts.qos,
            worker_processes,
            consumers_per_process,
            ratios: Ratios {
                vs_raw: baselines.raw_events_per_s.map(|r| hearth.events_per_s / r),
                vs_sync: baselines.sync_events_per_s.map(|s| hearth.events_per_s / s),
            },
            hearth,
            baselines,
        }
    }
}

/// Wait until `expected` rows are stored, or nothing has moved for 30 s after the publisher
/// finished (then the rest is lost). Progress is read from hearth's `stored` counter in Redis
/// (cheap, unlike counting rows while they are written); the final word is PostgreSQL's.
async fn wait_stored(
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
async fn wait_until_stored<P, PF, C, CF>(
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
struct Stats {
    conn: redis::aio::MultiplexedConnection,
    key: String,
    start: u64,
}

impl Stats {
    async fn open(redis_url: &str, prefix: &str) -> anyhow::Result<Stats> {
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

    async fn stored_since_start(&self) -> u64 {
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

async fn measure(
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
struct Checked {
    rows: i64,
    /// Distinct (sensor, kind, seq).
    distinct: i64,
    /// Rows whose seq does not grow with storage order within their sensor.
    out_of_order: i64,
    /// When the last row was stored (epoch µs).
    last_stored_us: Option<i64>,
    /// Per row: receive → stored, publish (ts) → stored, in µs.
    receive_us: Vec<i64>,
    publish_us: Vec<i64>,
}

impl Checked {
    fn run(
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
fn percentiles(us: &mut [i64]) -> Percentiles {
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

/// `url` with its database name replaced.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let path_start = base[scheme_end..]
        .find('/')
        .map(|i| i + scheme_end)
        .unwrap_or(base.len());
    let mut out = format!("{}/{name}", &base[..path_start]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// Drop the run's database (the sync baseline's, and hearth's unless external).
async fn drop_database(config: &Config, run_id: &str) {
    if let Ok(admin) =
        hearth::servers::store::connect(&with_database(&config.database_url, "postgres")).await
    {
        let _ = admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"hearth_bench_{run_id}\" WITH (FORCE)"
            ))
            .await;
    }
}

async fn cleanup(config: &Config, run_id: &str, prefix: &str, external: bool) {
    drop_database(config, run_id).await;
    if external {
        return;
    }
    process::drop_keys(&config.redis_url, prefix).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_name_is_replaced() {
        assert_eq!(
            with_database("postgres://u@h:5432/hearth", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            with_database("postgres://u@h/hearth?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
    }

    #[test]
    fn percentiles_are_exact() {
        let mut v: Vec<i64> = (1..=1000).map(|i| i * 1000).collect();
        let p = percentiles(&mut v);
        assert_eq!(
            (p.p50, p.p90, p.p99, p.p999, p.max),
            (500.0, 900.0, 990.0, 999.0, 1000.0)
        );
    }
}
