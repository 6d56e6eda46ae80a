//! `hearth bench --embedded`: the same measurement on `hearth up` with nothing configured (its
//! own broker, SQLite): publish to the embedded broker, wait until every event is stored, check
//! lost / duplicated / out of order in the SQLite file, report throughput, latency, CPU and
//! memory, against the same baselines (a private Mosquitto's raw throughput; the synchronous
//! PostgreSQL consumer), unless `--no-baselines`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rumqttc::QoS;
use rusqlite::{Connection, OpenFlags};

use super::mosquitto::Mosquitto;
use super::publish::{self, Load};
use super::{
    Baselines, HearthRun, Options, ProcessStats, Ratios, Report, Role, baseline, cpu_seconds,
    machine, peak_rss_kb, percentiles, with_database,
};
use crate::config::{Config, SERVER_URLS};

pub async fn run(config: Arc<Config>, opts: Options) -> anyhow::Result<Report> {
    let run_id = format!("e{}x{:04x}", std::process::id(), fastrand::u16(..));
    let dir = std::env::temp_dir().join(format!("hearth-bench-{run_id}"));
    std::fs::create_dir_all(&dir)?;
    let qos = if opts.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let load = |root: &str, events: u64, rate: u64, qos: QoS| Load {
        events,
        sensors: opts.sensors,
        rate,
        connections: opts.publishers,
        qos,
        sensor_prefix: format!("s{run_id}"),
        topic_root: root.into(),
    };

    let mut baselines = Baselines::default();
    if opts.baselines {
        let broker = Mosquitto::start(&dir.join("mosquitto"), 0)?;
        eprintln!("bench: raw baseline, {} events", opts.events);
        let raw = load("rawbench", opts.events, 0, QoS::AtLeastOnce);
        baselines.raw_events_per_s = Some(baseline::raw(broker.port, &raw, &run_id).await?);
        let db = with_database(&config.database_url, &format!("hearth_bench_{run_id}"));
        crate::store::migrate(&db).await?;
        baselines.sync_events = opts.sync_events.min(opts.events);
        eprintln!("bench: sync baseline, {} events", baselines.sync_events);
        let sync = load("syncbench", baselines.sync_events, 0, QoS::AtLeastOnce);
        baselines.sync_events_per_s = Some(baseline::sync(broker.port, &sync, &run_id, &db).await?);
        if let Ok(admin) =
            crate::store::connect(&with_database(&config.database_url, "postgres")).await
        {
            let _ = admin
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS \"hearth_bench_{run_id}\" WITH (FORCE)"
                ))
                .await;
        }
    }

    // `hearth up` with nothing configured, on a free port and its own data folder.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let data = dir.join("data");
    let mut child = (*config).clone();
    child.mqtt_listen = format!("127.0.0.1:{port}");
    child.data_dir = data.display().to_string();
    child.api_listen = "127.0.0.1:0".into();
    child.log = "warn,hearth=info".into();
    let mut up = Role::spawn_without(&["up"], &child, &dir, SERVER_URLS)?;
    up.wait_log("subscribed", Duration::from_secs(60))?;
    let cpu_before = cpu_seconds(up.pid()).unwrap_or(0.0);

    let sent = Arc::new(AtomicU64::new(0));
    let started_wall = crate::event::now_us();
    let publisher = {
        let (load, sent, id) = (
            load("hearth", opts.events, opts.rate, qos),
            sent.clone(),
            format!("bench-pub-{run_id}"),
        );
        tokio::spawn(async move { publish::publish("127.0.0.1", port, &id, &load, sent).await })
    };
    let file = data.join("hearth.sqlite3");
    let stored = wait_stored(&file, opts.events, &publisher, &sent).await?;
    let publish_seconds = publisher.await??.as_secs_f64();
    let processes = vec![ProcessStats {
        role: "up (embedded)".into(),
        cpu_seconds: cpu_seconds(up.pid()).unwrap_or(0.0) - cpu_before,
        peak_rss_mb: peak_rss_kb(up.pid()).unwrap_or(0) as f64 / 1024.0,
    }];
    let hearth = measure(
        file,
        opts.events,
        stored,
        started_wall,
        publish_seconds,
        processes,
    )
    .await?;
    up.stop();
    if opts.keep {
        eprintln!("bench: kept {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: machine(),
        events: opts.events,
        sensors: opts.sensors,
        target_rate: opts.rate,
        qos: opts.qos,
        worker_processes: 1,
        consumers_per_process: 2,
        ratios: Ratios {
            vs_raw: baselines.raw_events_per_s.map(|r| hearth.events_per_s / r),
            vs_sync: baselines.sync_events_per_s.map(|s| hearth.events_per_s / s),
        },
        hearth,
        baselines,
    })
}

fn open(file: &Path) -> rusqlite::Result<Connection> {
    Connection::open_with_flags(file, OpenFlags::SQLITE_OPEN_READ_ONLY)
}

/// `stored + duplicates` from the store's counters: events finished so far.
fn finished(file: &Path) -> u64 {
    open(file)
        .and_then(|c| {
            c.query_row(
                "SELECT coalesce(sum(value), 0) FROM stats WHERE name IN ('stored', 'duplicates')",
                [],
                |r| r.get::<_, i64>(0),
            )
        })
        .map(|n| n as u64)
        .unwrap_or(0)
}

/// Wait until `expected` events are finished, or nothing has moved for 30 s after the publisher
/// finished (the rest is then lost). Returns the rows stored.
async fn wait_stored(
    file: &Path,
    expected: u64,
    publisher: &tokio::task::JoinHandle<anyhow::Result<Duration>>,
    sent: &AtomicU64,
) -> anyhow::Result<u64> {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last = (0, Instant::now());
    loop {
        let path = file.to_path_buf();
        let progress = tokio::task::spawn_blocking(move || finished(&path)).await?;
        if tty {
            eprint!(
                "\rbench: published {:>9} / {expected}  stored {:>9} / {expected}   ",
                sent.load(Ordering::Relaxed),
                progress
            );
        }
        let stalled = publisher.is_finished() && last.1.elapsed() > Duration::from_secs(30);
        if progress >= expected || stalled {
            if tty {
                eprintln!();
            }
            if stalled {
                eprintln!("bench: nothing stored for 30 s; counting the rest as lost");
            }
            let path = file.to_path_buf();
            let rows = tokio::task::spawn_blocking(move || {
                open(&path)?.query_row("SELECT count(*) FROM events", [], |r| r.get::<_, i64>(0))
            })
            .await??;
            return Ok(rows as u64);
        }
        if progress != last.0 {
            last = (progress, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn measure(
    file: PathBuf,
    expected: u64,
    stored: u64,
    started_wall_us: i64,
    publish_seconds: f64,
    processes: Vec<ProcessStats>,
) -> anyhow::Result<HearthRun> {
    type Counts = (i64, i64, i64, Option<i64>, Vec<i64>, Vec<i64>);
    let (rows, distinct, out_of_order, last_us, mut receive, mut publish): Counts =
        tokio::task::spawn_blocking(move || {
            let c = open(&file)?;
            let (rows, distinct, last): (i64, i64, Option<i64>) = c.query_row(
                "SELECT count(*), (SELECT count(*) FROM (SELECT DISTINCT sensor_id, kind, seq FROM events)),
                        max(stored_us)
                 FROM events",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            let out_of_order: i64 = c.query_row(
                "SELECT count(*) FROM (
                    SELECT seq, lag(seq) OVER (PARTITION BY sensor_id ORDER BY id) AS prev FROM events
                 ) WHERE prev IS NOT NULL AND seq <= prev",
                [],
                |r| r.get(0),
            )?;
            let mut st = c.prepare("SELECT stored_us - received_us, stored_us - ts * 1000 FROM events")?;
            let lat = st
                .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let (receive, publish) = lat.into_iter().unzip();
            Ok::<_, rusqlite::Error>((rows, distinct, out_of_order, last, receive, publish))
        })
        .await??;
    let seconds = last_us
        .map(|l| (l - started_wall_us) as f64 / 1e6)
        .unwrap_or(0.0)
        .max(1e-6);
    let cpu: f64 = processes.iter().map(|p| p.cpu_seconds).sum();
    Ok(HearthRun {
        stored,
        seconds,
        events_per_s: distinct as f64 / seconds,
        publish_seconds,
        lost: expected.saturating_sub(distinct as u64),
        duplicated: (rows - distinct) as u64,
        out_of_order: out_of_order as u64,
        receive_to_stored_ms: percentiles(&mut receive),
        publish_to_stored_ms: percentiles(&mut publish),
        cpu_us_per_event: (distinct > 0).then(|| cpu * 1e6 / distinct as f64),
        processes,
    })
}
