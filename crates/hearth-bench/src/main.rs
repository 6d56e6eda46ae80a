//! `hearth-bench` (run as `hearth bench`): hearth measured end to end against baselines. It
//! starts hearth's processes from the `hearth` binary beside it (or `HEARTH_BIN`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use hearth::config::Config;

#[derive(Parser)]
#[command(
    name = "hearth bench",
    about = "End-to-end benchmark: publish, wait until stored, check, compare with baselines"
)]
struct Cli {
    /// Config file [default: ./hearth.toml when it exists].
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Set any config key (repeatable; wins over file and env).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    #[command(flatten)]
    args: BenchArgs,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Events to publish.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Distinct sensors (each with its own seq).
    #[arg(long, default_value_t = 1_000)]
    sensors: u64,
    /// Target events per second; 0 publishes as fast as the broker takes them.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// hearth worker processes to start.
    #[arg(long, default_value_t = 3)]
    worker_processes: usize,
    /// Routine consumers in each worker process.
    #[arg(long, default_value_t = 1)]
    consumers: u16,
    /// `hearth ingest` processes sharing the broker's messages (shared subscriptions, one
    /// ingest slot each).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
    ingest_processes: u64,
    /// Private brokers the load is split across (a fleet split across brokers; hearth's
    /// `mqtt_url` names them all).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=8))]
    brokers: u64,
    /// MQTT connections publishing the load.
    #[arg(long, default_value_t = 2)]
    publishers: usize,
    /// QoS of the published events (0 or 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// Use this broker instead of a private one started from deploy/mosquitto.conf.
    #[arg(long)]
    broker: Option<String>,
    /// Measure hearth processes already running (configured URLs and prefix) instead of
    /// starting them.
    #[arg(long)]
    external: bool,
    /// Skip the raw and sync baselines.
    #[arg(long)]
    no_baselines: bool,
    /// Events for the sync baseline (it is slow by design).
    #[arg(long, default_value_t = 30_000)]
    sync_events: u64,
    /// Keep the bench's database, Redis keys and logs.
    #[arg(long)]
    keep: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Measure alert latency instead (smoke publish → WebSocket alert) while telemetry flows
    /// and a backlog is queued; uses --backlog, --telemetry-rate, --smoke, --smoke-interval-ms,
    /// --sensors, --worker-processes, --consumers.
    #[arg(long)]
    alert_latency: bool,
    /// Benchmark `hearth up` with nothing configured (embedded broker and SQLite store) instead
    /// of the ingest and worker processes on Redis and PostgreSQL.
    #[arg(long)]
    embedded: bool,
    /// Alert latency: routine events queued before the workers start.
    #[arg(long, default_value_t = 200_000)]
    backlog: u64,
    /// Alert latency: routine telemetry per second while smoke events are published.
    #[arg(long, default_value_t = 10_000)]
    telemetry_rate: u64,
    /// Alert latency: smoke events to publish, each on a sensor of its own.
    #[arg(long, default_value_t = 100)]
    smoke: u64,
    /// Alert latency: milliseconds between smoke events.
    #[arg(long, default_value_t = 100)]
    smoke_interval_ms: u64,
}

/// A mistake in the command line or the configuration: exit code 2.
struct Usage(String);

fn usage(message: impl Into<String>) -> Failure {
    Failure::Usage(Usage(message.into()))
}

enum Failure {
    Usage(Usage),
    Run(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Run(e)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match load_config(&cli) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("hearth bench: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hearth bench: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli.args, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(Usage(e))) => {
            eprintln!("hearth bench: {e}");
            ExitCode::from(2)
        }
        Err(Failure::Run(e)) => {
            eprintln!("hearth bench: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn load_config(cli: &Cli) -> Result<Config, String> {
    let overrides = hearth::config::parse_sets(&cli.set)?;
    hearth::config::load(cli.config.as_deref(), std::env::vars(), &overrides)
        .map_err(|e| e.to_string())
}

/// A report as pretty JSON, or as its table.
fn print_report<R: serde::Serialize>(
    json: bool,
    report: &R,
    table: impl FnOnce() -> String,
) -> Result<(), Failure> {
    Ok(hearth::roles::print_report(json, report, table)?)
}

async fn run(args: BenchArgs, config: Arc<Config>) -> Result<(), Failure> {
    if args.alert_latency {
        if args.smoke == 0 || args.sensors == 0 || args.worker_processes == 0 {
            return Err(usage(
                "bench: --smoke, --sensors and --worker-processes must be > 0",
            ));
        }
        let opts = hearth_bench::alerts::Options {
            backlog: args.backlog,
            telemetry_rate: args.telemetry_rate,
            smoke: args.smoke,
            smoke_interval: std::time::Duration::from_millis(args.smoke_interval_ms),
            sensors: args.sensors,
            worker_processes: args.worker_processes,
            consumers: args.consumers,
            keep: args.keep,
        };
        let report = hearth_bench::alerts::run(config, opts).await?;
        print_report(args.json, &report, || report.table())?;
        if !report.clean() {
            return Err(anyhow::anyhow!(
                "alerts were missed, or events lost, duplicated or reordered (see the report)"
            )
            .into());
        }
        Ok(())
    } else {
        if args.events == 0
            || args.sensors == 0
            || args.publishers == 0
            || args.worker_processes == 0
        {
            return Err(usage(
                "bench: --events, --sensors, --publishers and --worker-processes must be > 0",
            ));
        }
        let opts = hearth_bench::Options {
            events: args.events,
            sensors: args.sensors,
            rate: args.rate,
            worker_processes: args.worker_processes,
            consumers: args.consumers,
            ingest_processes: args.ingest_processes as usize,
            brokers: args.brokers as usize,
            publishers: args.publishers,
            qos: args.qos,
            broker: args.broker,
            external: args.external,
            baselines: !args.no_baselines,
            sync_events: args.sync_events,
            keep: args.keep,
        };
        let report = if args.embedded {
            hearth_bench::embedded::run(config, opts).await?
        } else {
            hearth_bench::run(config, opts).await?
        };
        print_report(args.json, &report, || report.table())?;
        if !report.clean() {
            return Err(anyhow::anyhow!(
                "events were lost, duplicated or reordered (see the report)"
            )
            .into());
        }
        Ok(())
    }
}
