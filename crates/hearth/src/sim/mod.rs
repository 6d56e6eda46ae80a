//! `hearth sim`: simulated houses whose sensors publish over MQTT like real ones
//! ([`model`]), at a steady rate, in staged ramps, or in bursts ([`schedule`]), at QoS 0 or 1,
//! with a progress bar while it runs and a summary at the end.
//!
//! Each sensor publishes on one connection only, so the broker delivers its readings in order;
//! sensors are spread over `connections` connections.

pub mod model;
pub mod schedule;
pub mod wire;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::mqttbytes::QoS;
use serde::Serialize;

use model::Sensor;
use schedule::{Schedule, Stage};

/// The shape of the load over time.
#[derive(Debug, Clone)]
pub enum Profile {
    /// `rate` for the whole duration.
    Steady,
    /// 0 → rate over a third of the time, hold a third, back to 0 (the seed's load profile).
    Ramp,
    /// A tenth of `rate`, with 2 s bursts at `rate` every 10 s.
    Burst,
    /// Explicit stages, `10s:100,30s:1000,10s:0`.
    Stages(Vec<Stage>),
}

#[derive(Debug, Clone)]
pub struct Options {
    pub houses: usize,
    pub sensors_per_house: usize,
    pub rate: f64,
    pub duration: Duration,
    pub profile: Profile,
    pub qos: u8,
    pub connections: usize,
    pub seed: u64,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub sensors: usize,
    pub published: u64,
    pub seconds: f64,
    pub events_per_s: f64,
    pub by_kind: std::collections::BTreeMap<&'static str, u64>,
    pub alarms: u64,
}

impl Options {
    pub fn schedule(&self) -> Schedule {
        let d = self.duration;
        let r = self.rate;
        match &self.profile {
            Profile::Steady => Schedule::steady(r, d),
            Profile::Ramp => Schedule::stages(&[
                Stage {
                    duration: d / 3,
                    from: 0.0,
                    to: r,
                },
                Stage {
                    duration: d / 3,
                    from: r,
                    to: r,
                },
                Stage {
                    duration: d - 2 * (d / 3),
                    from: r,
                    to: 0.0,
                },
            ]),
            Profile::Burst => {
                let mut stages = Vec::new();
                let mut left = d;
                while !left.is_zero() {
                    let quiet = left.min(Duration::from_secs(8));
                    stages.push(Stage {
                        duration: quiet,
                        from: r / 10.0,
                        to: r / 10.0,
                    });
                    left -= quiet;
                    let burst = left.min(Duration::from_secs(2));
                    if !burst.is_zero() {
                        stages.push(Stage {
                            duration: burst,
                            from: r,
                            to: r,
                        });
                    }
                    left -= burst;
                }
                Schedule::stages(&stages)
            }
            Profile::Stages(stages) => Schedule::stages(stages),
        }
    }
}

/// Run the simulation against the broker at `url`.
pub async fn run(url: &str, opts: &Options) -> anyhow::Result<Summary> {
    let endpoint = crate::mqtt::Endpoint::parse(url, "sim")?;
    let schedule = Arc::new(opts.schedule());
    let total = schedule.total();
    let sensors: Vec<Sensor> = (0..opts.houses)
        .flat_map(|h| (0..opts.sensors_per_house).map(move |i| (h, i)))
        .map(|(h, i)| Sensor::new(h, i, opts.seed))
        .collect();
    let sensor_count = sensors.len();
    let connections = opts.connections.clamp(1, sensor_count.max(1));
    // Message g (global order) comes from sensor g % sensors, on connection (g % sensors) % C.
    let mut shares: Vec<Vec<Sensor>> = (0..connections).map(|_| Vec::new()).collect();
    for (i, s) in sensors.into_iter().enumerate() {
        shares[i % connections].push(s);
    }
    let qos = if opts.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let sent = Arc::new(AtomicU64::new(0));
    let by_kind = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
    let alarms = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let run_id = fastrand::u32(..);
    for (c, mut mine) in shares.into_iter().enumerate() {
        // This connection's messages are the global ones g with (g % sensors) % C == c.
        let globals: Vec<u64> = (0..total)
            .filter(|g| (g % sensor_count as u64) as usize % connections == c)
            .collect();
        let count = globals.len() as u64;
        let (schedule, sent, by_kind, alarms) = (
            schedule.clone(),
            sent.clone(),
            by_kind.clone(),
            alarms.clone(),
        );
        let (host, port) = (endpoint.host.clone(), endpoint.port);
        let globals = Arc::new(globals);
        tasks.spawn(async move {
            let due = {
                let globals = globals.clone();
                move |n: u64| schedule.due(globals[n as usize])
            };
            let per = mine.len().max(1);
            let make = |n: u64| {
                let sensor = &mut mine[(globals[n as usize] / connections as u64) as usize % per];
                let (payload, alarm) = sensor.next(crate::event::now_us() / 1000);
                if let Ok(mut k) = by_kind.lock() {
                    *k.entry(sensor.kind.name()).or_insert(0u64) += 1;
                }
                if alarm {
                    alarms.fetch_add(1, Ordering::Relaxed);
                }
                (sensor.topic(), payload)
            };
            let id = format!("hearth-sim-{run_id:08x}-{c}");
            wire::publish(&host, port, &id, count, qos, due, make, sent).await
        });
    }
    let progress = tokio::spawn(progress(sent.clone(), total, started));
    let mut result = Ok(());
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done.map_err(anyhow::Error::from).and_then(|r| r) {
            result = Err(e);
        }
    }
    progress.abort();
    eprintln!();
    result?;
    let seconds = started.elapsed().as_secs_f64();
    let published = sent.load(Ordering::Relaxed);
    let by_kind = by_kind.lock().map(|k| k.clone()).unwrap_or_default();
    Ok(Summary {
        sensors: sensor_count,
        published,
        seconds,
        events_per_s: published as f64 / seconds.max(1e-9),
        by_kind,
        alarms: alarms.load(Ordering::Relaxed),
    })
}

/// A progress bar on stderr: redrawn in place on a terminal, a line every 5 s otherwise.
async fn progress(sent: Arc<AtomicU64>, total: u64, started: Instant) {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last = (0u64, Instant::now());
    let mut tick = tokio::time::interval(Duration::from_millis(if tty { 250 } else { 5000 }));
    loop {
        tick.tick().await;
        let n = sent.load(Ordering::Relaxed);
        let now = Instant::now();
        let rate = (n - last.0) as f64 / now.duration_since(last.1).as_secs_f64().max(1e-3);
        last = (n, now);
        let frac = if total == 0 {
            1.0
        } else {
            n as f64 / total as f64
        };
        let filled = (frac * 30.0).round() as usize;
        let line = format!(
            "sim [{}{}] {:>3.0}%  {n}/{total} events  {rate:.0}/s  {:.0} s",
            "#".repeat(filled.min(30)),
            "-".repeat(30 - filled.min(30)),
            frac * 100.0,
            started.elapsed().as_secs_f64()
        );
        if tty {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
    }
}

impl Summary {
    pub fn table(&self) -> String {
        let kinds: Vec<String> = self
            .by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        format!(
            "published {} events from {} sensors in {:.1} s ({:.0}/s)\nby kind: {}\nsmoke alarms: {}\n",
            self.published,
            self.sensors,
            self.seconds,
            self.events_per_s,
            kinds.join(", "),
            self.alarms
        )
    }
}
