//! `hearth bench --alert-latency`: how long a smoke alarm takes from its MQTT publish to a
//! WebSocket client, while the routine lanes are busy.
//!
//! The scenario: a private broker, an ingest, and first a backlog of routine events published
//! while no worker runs (so the streams hold it, as after an outage); then an API process and the
//! worker processes start, routine telemetry flows at a steady rate, and smoke events (each on a
//! sensor of its own, so each raises its own alert) are published at a fixed interval. A
//! WebSocket client subscribed to alerts records when each alert arrives; latency is receipt time
//! minus publish time, both on this process's monotonic clock. At the end every event (backlog,
//! telemetry and smoke) must be stored exactly once.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rumqttc::QoS;
use serde::Serialize;

use super::mosquitto::Mosquitto;
use super::publish::{self, Load};
use super::{HearthRun, Machine, Percentiles, ProcessStats, Role};
use hearth::config::Config;

/// What the alert-latency scenario does.
#[derive(Debug, Clone)]
pub struct Options {
    /// Routine events queued before the workers start.
    pub backlog: u64,
    /// Routine telemetry per second while the smoke events are published.
    pub telemetry_rate: u64,
    /// Smoke events, one sensor each.
    pub smoke: u64,
    pub smoke_interval: Duration,
    pub sensors: u64,
    pub worker_processes: usize,
    pub consumers: u16,
    pub keep: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub command: String,
    pub machine: Machine,
    pub backlog: u64,
    pub telemetry_rate: u64,
    pub smoke: u64,
    pub smoke_interval_ms: u64,
    pub worker_processes: usize,
    /// Smoke publish → alert received on the WebSocket.
    pub alert_ms: Percentiles,
    pub alerts_received: u64,
    /// Routine events queued when the first and the last smoke event were published.
    pub routine_depth_first: u64,
    pub routine_depth_last: u64,
    /// The whole run's storage check (backlog + telemetry + smoke).
    pub hearth: HearthRun,
}

impl Report {
    pub fn clean(&self) -> bool {
        self.alerts_received == self.smoke
            && self.hearth.lost == 0
            && self.hearth.duplicated == 0
            && self.hearth.out_of_order == 0
    }

    pub fn table(&self) -> String {
        let a = &self.alert_ms;
        let h = &self.hearth;
        format!(
            "hearth bench --alert-latency: {} smoke events every {} ms, {} events/s of telemetry, \
             {} backlogged, {} worker process(es)\n\
             machine: {} cores, {}, {} GiB\n\n\
             smoke publish → WebSocket alert: p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms \
             ({} of {} received)\n\
             routine events queued: {} at the first smoke event, {} at the last\n\
             stored {} in {:.2} s: lost {}, duplicated {}, out of order {}\n",
            self.smoke,
            self.smoke_interval_ms,
            self.telemetry_rate,
            self.backlog,
            self.worker_processes,
            self.machine.cores,
            self.machine.cpu,
            self.machine.memory_gib,
            a.p50,
            a.p90,
            a.p99,
            a.max,
            self.alerts_received,
            self.smoke,
            self.routine_depth_first,
            self.routine_depth_last,
            h.stored,
            h.seconds,
            h.lost,
            h.duplicated,
            h.out_of_order
        )
    }
}

pub async fn run(config: Arc<Config>, opts: Options) -> anyhow::Result<Report> {
    let run_id = format!("a{}x{:04x}", std::process::id(), fastrand::u16(..));
    let dir = std::env::temp_dir().join(format!("hearth-bench-{run_id}"));
    std::fs::create_dir_all(&dir)?;
    let broker = Mosquitto::start(&dir.join("mosquitto"), 0).map_err(|e| {
        anyhow::anyhow!(
            "cannot start a private mosquitto ({}): {e}",
            super::mosquitto::binary()
        )
    })?;
    let database_url =
        super::with_database(&config.database_url, &format!("hearth_bench_{run_id}"));
    let prefix = format!("bench-{run_id}");
    hearth::servers::schema::migrate(&database_url).await?;
    let token = format!("bench-{:016x}", fastrand::u64(..));
    let api_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let mut child = (*config).clone();
    child.mqtt_url = broker.url();
    child.database_url = database_url.clone();
    child.redis_prefix = prefix.clone();
    child.mqtt_client_id = format!("bench-ingest-{run_id}");
    child.workers = opts.consumers;
    child.admin_token = token.clone();
    child.api_listen = api_addr.to_string();
    child.log = "warn,hearth=info".into();

    let result = scenario(&config, &opts, &run_id, &dir, &broker, &child, api_addr).await;
    if !opts.keep {
        super::cleanup(&config, &run_id, &prefix, false).await;
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!(
            "bench: kept {} (database hearth_bench_{run_id}, prefix {prefix})",
            dir.display()
        );
    }
    result
}

async fn scenario(
    config: &Config,
    opts: &Options,
    run_id: &str,
    dir: &std::path::Path,
    broker: &Mosquitto,
    child: &Config,
    api_addr: std::net::SocketAddr,
) -> anyhow::Result<Report> {
    let host = "127.0.0.1";
    let queue =
        hearth::servers::queue::Queue::open(&config.redis_url, &child.redis_prefix, child.shards)?;
    let routine_depth = || async {
        queue.depths().await.map(|d| {
            d.iter()
                .filter(|(lane, _)| matches!(lane, hearth::Lane::Routine(_)))
                .map(|(_, n)| n)
                .sum::<u64>()
        })
    };

    // 1. The backlog: ingest only, no worker yet.
    let mut roles = vec![Role::spawn("ingest", &["ingest"], child, dir)?];
    roles[0].wait_log("subscribed", Duration::from_secs(60))?;
    let backlog = Load {
        events: opts.backlog,
        sensors: opts.sensors,
        rate: 0,
        connections: 2,
        qos: QoS::AtLeastOnce,
        sensor_prefix: format!("s{run_id}b"),
        topic_root: "hearth".into(),
    };
    eprintln!("bench: queueing a backlog of {} events", opts.backlog);
    publish::publish(
        host,
        broker.port,
        &format!("bench-backlog-{run_id}"),
        &backlog,
        Arc::new(AtomicU64::new(0)),
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while routine_depth().await? < opts.backlog {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the ingest did not queue the backlog"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 2. The API, and a client subscribed to every house's alerts.
    roles.push(Role::spawn("api", &["api"], child, dir)?);
    roles[1].wait_log("http listening", Duration::from_secs(60))?;
    let url = format!(
        "ws://{api_addr}/api/v1/ws?events=false&alerts=true&token={}",
        child.admin_token
    );
    let (ws, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
    let published: Arc<Mutex<Vec<Option<Instant>>>> =
        Arc::new(Mutex::new(vec![None; opts.smoke as usize]));
    let received: Arc<Mutex<Vec<Option<Instant>>>> =
        Arc::new(Mutex::new(vec![None; opts.smoke as usize]));
    let smoke_prefix = format!("s{run_id}a-");
    let listener = {
        let (received, smoke_prefix, smoke) = (received.clone(), smoke_prefix.clone(), opts.smoke);
        tokio::spawn(async move {
            let mut ws = ws;
            let mut got = 0;
            while got < smoke {
                let Some(message) = ws.next().await else {
                    break;
                };
                let at = Instant::now();
                let tokio_tungstenite::tungstenite::Message::Text(text) = message? else {
                    continue;
                };
                let value: serde_json::Value = serde_json::from_str(&text)?;
                if value["type"] != "alert" || value["alert"]["state"] != "active" {
                    continue;
                }
                let sensor = value["alert"]["sensor_id"].as_str().unwrap_or_default();
                if let Some(n) = sensor
                    .strip_prefix(&smoke_prefix)
                    .and_then(|n| n.parse::<usize>().ok())
                {
                    let mut r = received.lock().expect("not poisoned");
                    if let Some(slot @ None) = r.get_mut(n) {
                        *slot = Some(at);
                        got += 1;
                    }
                }
            }
            anyhow::Ok(())
        })
    };

    // 3. Workers start on the backlog while telemetry flows.
    let smoke_window = opts.smoke_interval * opts.smoke as u32;
    let telemetry_seconds = smoke_window.as_secs_f64() + 5.0;
    let telemetry = Load {
        events: (opts.telemetry_rate as f64 * telemetry_seconds) as u64,
        sensors: opts.sensors,
        rate: opts.telemetry_rate,
        connections: 2,
        qos: QoS::AtLeastOnce,
        sensor_prefix: format!("s{run_id}t"),
        topic_root: "hearth".into(),
    };
    let started_wall = hearth::event::now_us();
    let telemetry_task = {
        let (load, id) = (telemetry.clone(), format!("bench-telemetry-{run_id}"));
        let port = broker.port;
        tokio::spawn(async move {
            publish::publish(host, port, &id, &load, Arc::new(AtomicU64::new(0))).await
        })
    };
    for i in 0..opts.worker_processes {
        roles.push(Role::spawn(
            &format!("worker-{}", i + 1),
            &["worker"],
            child,
            dir,
        )?);
    }
    for role in &roles[2..] {
        role.wait_log("worker started", Duration::from_secs(60))?;
    }
    let cpu_before: Vec<f64> = roles
        .iter()
        .map(|r| hearth::metrics::cpu_seconds(r.pid()).unwrap_or(0.0))
        .collect();

    // 4. Smoke, one event per interval, each on its own sensor.
    let depth_first = routine_depth().await?;
    eprintln!(
        "bench: {} smoke events, {} routine events queued",
        opts.smoke, depth_first
    );
    {
        let published = published.clone();
        let interval = opts.smoke_interval;
        let smoke_prefix = smoke_prefix.clone();
        hearth::sim::wire::publish(
            host,
            broker.port,
            &format!("bench-smoke-{run_id}"),
            opts.smoke,
            QoS::AtLeastOnce,
            |n| Some(interval * n as u32),
            |n| {
                published.lock().expect("not poisoned")[n as usize] = Some(Instant::now());
                (
                    format!("hearth/house-smoke/{smoke_prefix}{n}"),
                    format!(
                        r#"{{"kind":"smoke","value":true,"seq":1,"ts":{}}}"#,
                        hearth::event::now_us() / 1000
                    )
                    .into_bytes(),
                )
            },
            Arc::new(AtomicU64::new(0)),
        )
        .await?;
    }
    let depth_last = routine_depth().await?;
    if tokio::time::timeout(Duration::from_secs(30), listener)
        .await
        .is_err()
    {
        eprintln!("bench: not every alert arrived within 30 s of the last smoke event");
    }
    telemetry_task.await??;

    // 5. Everything stored exactly once?
    let expected = opts.backlog + telemetry.events + opts.smoke;
    let pattern = format!("s{run_id}%");
    let db = hearth::servers::postgres::connect(&child.database_url).await?;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let depth: u64 = queue.depths().await?.iter().map(|(_, n)| n).sum();
        if depth == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stored: i64 = db
        .query_one(
            "SELECT count(*) FROM events WHERE sensor_id LIKE $1",
            &[&pattern],
        )
        .await?
        .get(0);
    let processes: Vec<ProcessStats> = roles
        .iter()
        .zip(&cpu_before)
        .map(|(r, before)| ProcessStats {
            role: r.name.clone(),
            cpu_seconds: hearth::metrics::cpu_seconds(r.pid()).unwrap_or(0.0) - before,
            peak_rss_mb: hearth::metrics::peak_rss_kb(r.pid()).unwrap_or(0) as f64 / 1024.0,
        })
        .collect();
    let hearth = super::measure(
        &db,
        &pattern,
        expected,
        stored as u64,
        started_wall,
        telemetry_seconds,
        processes,
    )
    .await?;
    for role in &mut roles {
        role.stop();
    }

    let (published, received) = (
        published.lock().expect("not poisoned").clone(),
        received.lock().expect("not poisoned").clone(),
    );
    let mut latencies: Vec<i64> = published
        .iter()
        .zip(&received)
        .filter_map(|(p, r)| Some(r.as_ref()?.duration_since(*p.as_ref()?).as_micros() as i64))
        .collect();
    Ok(Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: super::machine(),
        backlog: opts.backlog,
        telemetry_rate: opts.telemetry_rate,
        smoke: opts.smoke,
        smoke_interval_ms: opts.smoke_interval.as_millis() as u64,
        worker_processes: opts.worker_processes,
        alerts_received: latencies.len() as u64,
        alert_ms: super::percentiles(&mut latencies),
        routine_depth_first: depth_first,
        routine_depth_last: depth_last,
        hearth,
    })
}
