//! `hearth bench --embedded`: the same measurement on `hearth up` with nothing configured (its
//! own broker, SQLite): publish to the embedded broker, wait until every event is stored, check
//! lost / duplicated / out of order in the SQLite file, report throughput, latency, CPU and
//! memory, against the same baselines (a private Mosquitto's raw throughput; the synchronous
//! PostgreSQL consumer), unless `--no-baselines`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::mosquitto::Mosquitto;
use super::publish;
use super::{
    Baselines, Checked, HearthRun, Options, ProcessStats, Report, Role, drop_database,
    run_baselines, wait_until_stored, workspace,
};
use hearth::config::{Config, SERVER_URLS};
use hearth::metrics::cpu_seconds;

pub async fn run(config: Arc<Config>, opts: Options) -> anyhow::Result<Report> {
    let (run_id, dir) = workspace("e")?;
    let baselines = if opts.baselines {
        let broker = Mosquitto::start(&dir.join("mosquitto"), 0)?;
        let baselines = run_baselines(&config, &opts, &run_id, broker.port).await?;
        drop_database(&config, &run_id).await;
        baselines
    } else {
        Baselines::default()
    };

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
    let started_wall = hearth::event::now_us();
    let publisher = {
        let load = opts.load(&run_id);
        let (sent, id) = (sent.clone(), format!("bench-pub-{run_id}"));
        tokio::spawn(async move { publish::publish("127.0.0.1", port, &id, &load, sent).await })
    };
    let file = data.join("hearth.sqlite3");
    let stored = wait_stored(&file, opts.events, &publisher, &sent).await?;
    let publish_seconds = publisher.await??.as_secs_f64();
    let processes = vec![ProcessStats::of("up (embedded)", up.pid(), cpu_before)];
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
    // One process, with a critical and a routine worker.
    Ok(Report::new(&opts, 1, 2, hearth, baselines))
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

/// Wait until every event is stored (progress: the store's `stored + duplicates` counters; the
/// final word: the rows). Returns the rows stored.
async fn wait_stored(
    file: &Path,
    expected: u64,
    publisher: &tokio::task::JoinHandle<anyhow::Result<Duration>>,
    sent: &AtomicU64,
) -> anyhow::Result<u64> {
    let progress = || {
        let path = file.to_path_buf();
        async move {
            tokio::task::spawn_blocking(move || finished(&path))
                .await
                .unwrap_or(0)
        }
    };
    let count = || {
        let path = file.to_path_buf();
        async move {
            let rows = tokio::task::spawn_blocking(move || {
                open(&path)?.query_row("SELECT count(*) FROM events", [], |r| r.get::<_, i64>(0))
            })
            .await??;
            Ok(rows as u64)
        }
    };
    wait_until_stored(expected, publisher, sent, progress, count).await
}

async fn measure(
    file: PathBuf,
    expected: u64,
    stored: u64,
    started_wall_us: i64,
    publish_seconds: f64,
    processes: Vec<ProcessStats>,
) -> anyhow::Result<HearthRun> {
    let checked = tokio::task::spawn_blocking(move || {
        let c = open(&file)?;
        let (rows, distinct, last_stored_us): (i64, i64, Option<i64>) = c.query_row(
            "SELECT count(*), (SELECT count(*) FROM (SELECT DISTINCT house_id, sensor_id, kind, seq FROM events)),
                    max(stored_us)
             FROM events",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        let out_of_order: i64 = c.query_row(
            "SELECT count(*) FROM (
                SELECT seq, lag(seq) OVER (PARTITION BY house_id, sensor_id ORDER BY id) AS prev FROM events
             ) WHERE prev IS NOT NULL AND seq <= prev",
            [],
            |r| r.get(0),
        )?;
        let mut st = c.prepare("SELECT stored_us - received_us, stored_us - ts * 1000 FROM events")?;
        let (receive_us, publish_us) = st
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?
            .into_iter()
            .unzip();
        Ok::<_, rusqlite::Error>(Checked {
            rows,
            distinct,
            out_of_order,
            last_stored_us,
            receive_us,
            publish_us,
        })
    })
    .await??;
    Ok(checked.run(
        expected,
        stored,
        started_wall_us,
        publish_seconds,
        processes,
    ))
}
