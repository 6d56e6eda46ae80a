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
mod check;
pub mod embedded;
pub mod mosquitto;
pub mod process;
pub mod publish;
mod report;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use rumqttc::QoS;
use serde::Serialize;

use check::{Checked, Stats, measure, percentiles, wait_stored, wait_until_stored};
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
    /// `hearth ingest` processes sharing the broker (`ingest_slots` = this number when > 1).
    pub ingest_processes: usize,
    /// Private brokers the load is split across (one `mqtt_url` naming them all).
    pub brokers: usize,
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
    pub ingest_processes: usize,
    pub brokers: usize,
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
    // More private brokers, for a fleet split across them.
    let mut more = Vec::new();
    for b in 1..opts.brokers.max(1) {
        if private.is_none() {
            anyhow::bail!("--brokers above 1 needs the bench's private brokers");
        }
        more.push(Mosquitto::start(&dir.join(format!("mosquitto-{b}")), 0)?);
    }
    let brokers: Vec<(String, u16)> = std::iter::once((host.clone(), port))
        .chain(more.iter().map(|m| ("127.0.0.1".to_string(), m.port)))
        .collect();
    let all_urls: Vec<String> = std::iter::once(broker_url.clone())
        .chain(more.iter().map(Mosquitto::url))
        .collect();

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
        hearth::servers::schema::migrate(&database_url).await?;
        let mut child_config = (*config).clone();
        child_config.mqtt_url = all_urls.join(",");
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
        let ingests = opts.ingest_processes.max(1);
        child_config.ingest_slots = ingests as u16;
        for i in 0..ingests {
            let name = if ingests == 1 {
                "ingest".to_string()
            } else {
                format!("ingest-{}", i + 1)
            };
            roles.push(Role::spawn(&name, &["ingest"], &child_config, &dir)?);
        }
        for role in &roles {
            // With several, each logs it once the first has handed it a slot.
            let needle = if role.name.starts_with("ingest") {
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
    let db = hearth::servers::postgres::connect(&database_url).await?;
    let stats = Stats::open(&config.redis_url, &prefix).await?;
    let sent = Arc::new(AtomicU64::new(0));
    let started_wall = hearth::event::now_us();
    let publisher = {
        let (mut load, sent, brokers, id) = (
            load.clone(),
            sent.clone(),
            brokers.clone(),
            format!("bench-pub-{run_id}"),
        );
        load.connections = load.connections.max(brokers.len());
        tokio::spawn(async move { publish::publish_to(&brokers, &id, &load, sent).await })
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
    hearth::servers::schema::migrate(&db).await?;
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
            ingest_processes: opts.ingest_processes.max(1),
            brokers: opts.brokers.max(1),
            ratios: Ratios {
                vs_raw: baselines.raw_events_per_s.map(|r| hearth.events_per_s / r),
                vs_sync: baselines.sync_events_per_s.map(|s| hearth.events_per_s / s),
            },
            hearth,
            baselines,
        }
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
        hearth::servers::postgres::connect(&with_database(&config.database_url, "postgres")).await
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
