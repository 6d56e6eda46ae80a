//! The `hearth` command line: parse flags, load the configuration, run one command.
//! Exit codes: 0 success, 1 runtime failure, 2 bad usage or bad configuration.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use hearth::config::{self, Config};
use hearth::roles::{self, RoleError};
use hearth::{shutdown, sim};
use tools::{ConfigAction, DlqAction, TokenAction, seams};

mod tools;

#[derive(Parser)]
#[command(name = "hearth", version, about = "Event backbone for connected homes")]
struct Cli {
    /// Config file [default: $HEARTH_CONFIG, else the first of ./hearth.toml and
    /// /etc/hearth/hearth.toml that exists].
    #[arg(short, long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Set any config key, e.g. `--set batch_size=500` (repeatable; wins over file and env).
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// MQTT broker, mqtt://host:port [env: HEARTH_MQTT_URL].
    #[arg(long, global = true)]
    mqtt_url: Option<String>,
    /// Redis server, redis://host:port [env: HEARTH_REDIS_URL].
    #[arg(long, global = true)]
    redis_url: Option<String>,
    /// PostgreSQL database, postgres://user@host:port/db [env: HEARTH_DATABASE_URL].
    #[arg(long, global = true)]
    database_url: Option<String>,
    /// Prefix of hearth's Redis keys [env: HEARTH_REDIS_PREFIX].
    #[arg(long, global = true)]
    redis_prefix: Option<String>,
    /// Routine lanes [env: HEARTH_SHARDS].
    #[arg(long, global = true)]
    shards: Option<String>,
    /// Routine consumers in this process [env: HEARTH_WORKERS].
    #[arg(long, global = true)]
    workers: Option<String>,
    /// HTTP address of `hearth up` [env: HEARTH_API_LISTEN].
    #[arg(long, global = true)]
    api_listen: Option<String>,
    /// Where `hearth ingest` / `hearth worker` serve /metrics [env: HEARTH_METRICS_LISTEN].
    #[arg(long, global = true)]
    metrics_listen: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Everything in one process: ingest, workers and the API (with no server URL configured:
    /// an embedded broker and store too).
    Up {
        /// Also run the simulator (10 houses, 20 events/s), so that data and alerts flow at once.
        #[arg(long)]
        demo: bool,
    },
    /// Only the ingest: MQTT to the Redis lanes.
    Ingest,
    /// Only workers: Redis lanes to PostgreSQL and the cache.
    Worker,
    /// Only the HTTP API and WebSocket push.
    Api,
    /// House tokens for the API.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Dead letters: list, replay through the normal path, or purge.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// A completion script for a shell, on stdout (e.g. `hearth completions bash >
    /// /etc/bash_completion.d/hearth`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// The configuration: check it, or print it as loaded (secrets masked).
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Create or upgrade the database schema.
    Migrate,
    /// Queue depth, pending, owners, dead letters and loss accounting.
    Status {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// End-to-end benchmark: publish, wait until stored, check, compare with baselines (runs
    /// the `hearth-bench` program installed beside this one; `hearth bench --help` lists its
    /// options).
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Simulated houses and sensors publishing over MQTT.
    Sim(SimArgs),
}

#[derive(clap::Args)]
struct SimArgs {
    /// Houses to simulate.
    #[arg(long, default_value_t = 10)]
    houses: usize,
    /// Sensors per house (temperature, humidity, motion, door, light, power, window, co2,
    /// battery, smoke, then again).
    #[arg(long, default_value_t = 10)]
    sensors_per_house: usize,
    /// Events per second over all sensors (the peak rate for ramp and burst).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// How long to run: 500ms, 30s, 5m, 1h.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: std::time::Duration,
    /// steady, ramp (0 → rate → 0), burst (rate/10 with 2 s bursts at rate every 10 s).
    #[arg(long, default_value = "steady", value_parser = ["steady", "ramp", "burst"])]
    profile: String,
    /// Explicit stages instead of a profile: `10s:100,30s:1000,10s:0` ramps to each rate in
    /// turn; `30s:=500` holds 500.
    #[arg(long)]
    stages: Option<String>,
    /// QoS of the readings (0 or 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// MQTT connections the sensors are spread over.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Seed of the sensors' randomness (the same seed plays the same readings).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

/// A report as pretty JSON, or as its table.
fn print_report<R: serde::Serialize>(
    json: bool,
    report: &R,
    table: impl FnOnce() -> String,
) -> Result<(), RoleError> {
    Ok(roles::print_report(json, report, table)?)
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    hearth::config::parse_duration(s)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Bench { args } = &cli.command {
        return bench(&cli, args);
    }
    if let Command::Completions { shell } = cli.command {
        use clap::CommandFactory;
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "hearth", &mut script);
        // A closed pipe (`| head`) is the reader's choice, not a failure.
        let _ = std::io::Write::write_all(&mut std::io::stdout(), &script);
        return ExitCode::SUCCESS;
    }
    let config = match load_config(&cli) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("hearth: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config.log, &config.log_format);
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    if let Err(e) = hearth::arm_fault(&config.test_fault) {
        eprintln!("hearth: {e}");
        return ExitCode::from(2);
    }
    // The ingest is one session and one appender, waiting on sockets: on a single thread it
    // spends nothing on waking tasks across threads. Everything else gets the multi-threaded
    // runtime.
    let runtime = if matches!(cli.command, Command::Ingest | Command::Worker) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hearth: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(RoleError::Config(e)) => {
            eprintln!("hearth: {e}");
            ExitCode::from(2)
        }
        Err(RoleError::Runtime(e)) => {
            eprintln!("hearth: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `hearth bench`: the bench is a tool of its own (the `hearth-bench` crate), installed beside
/// this binary; it gets the same configuration (file and overrides) and finds this binary to
/// start hearth's processes with.
fn bench(cli: &Cli, args: &[String]) -> ExitCode {
    let program = match std::env::current_exe() {
        Ok(exe) => exe.with_file_name("hearth-bench"),
        Err(e) => {
            eprintln!("hearth: {e}");
            return ExitCode::from(1);
        }
    };
    let overrides = match overrides(cli) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("hearth: {e}");
            return ExitCode::from(2);
        }
    };
    let mut cmd = std::process::Command::new(&program);
    if let Some(file) = &cli.config {
        cmd.arg("--config").arg(file);
    }
    for (k, v) in overrides {
        cmd.arg("--set").arg(format!("{k}={v}"));
    }
    if let Ok(exe) = std::env::current_exe() {
        cmd.env("HEARTH_BIN", exe);
    }
    match cmd.args(args).status() {
        Ok(status) => ExitCode::from(status.code().unwrap_or(1).clamp(0, 255) as u8),
        Err(e) => {
            eprintln!(
                "hearth: cannot run {} ({e}); build it with `cargo build --release` at the workspace root",
                program.display()
            );
            ExitCode::from(1)
        }
    }
}

/// The `--set` pairs and the flags that stand for config keys, in the order they apply.
fn overrides(cli: &Cli) -> Result<Vec<(String, String)>, String> {
    let mut overrides = config::parse_sets(&cli.set)?;
    for (key, value) in [
        ("mqtt_url", &cli.mqtt_url),
        ("redis_url", &cli.redis_url),
        ("database_url", &cli.database_url),
        ("redis_prefix", &cli.redis_prefix),
        ("shards", &cli.shards),
        ("workers", &cli.workers),
        ("api_listen", &cli.api_listen),
        ("metrics_listen", &cli.metrics_listen),
    ] {
        if let Some(v) = value {
            overrides.push((key.to_string(), v.clone()));
        }
    }
    Ok(overrides)
}

fn load_config(cli: &Cli) -> Result<Config, String> {
    let overrides = overrides(cli)?;
    config::load(cli.config.as_deref(), std::env::vars(), &overrides).map_err(|e| e.to_string())
}

fn init_logging(filter: &str, format: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // Validated with the rest of the config.
    let targets: tracing_subscriber::filter::Targets = filter.parse().unwrap_or_default();
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(targets);
    if format == "json" {
        registry.with(fmt.json()).init();
    } else {
        registry
            .with(fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())))
            .init();
    }
}

async fn run(command: Command, config: Arc<Config>) -> Result<(), RoleError> {
    let (trigger, shutdown) = shutdown::channel();
    let grace = std::time::Duration::from_millis(config.shutdown_timeout_ms);
    match command {
        Command::Up { demo } => {
            trigger.on_signals(grace);
            roles::up(config, shutdown, demo).await
        }
        Command::Ingest => {
            trigger.on_signals(grace);
            roles::ingest(config, shutdown).await
        }
        Command::Worker => {
            trigger.on_signals(grace);
            roles::worker(config, shutdown).await
        }
        Command::Api => {
            trigger.on_signals(grace);
            roles::api(config, shutdown).await
        }
        Command::Token { action } => tools::token(action, &config).await,
        Command::Dlq { action } => tools::dlq(action, &config).await,
        Command::Config { action } => tools::config(action, &config),
        Command::Migrate => {
            let applied = hearth::servers::schema::migrate(&config.database_url)
                .await
                .map_err(|e| anyhow::anyhow!("migrate: {e}"))?;
            if applied.is_empty() {
                println!("schema is up to date");
            } else {
                println!("applied migrations {applied:?}");
            }
            Ok(())
        }
        // Run by `main` before any runtime starts.
        Command::Bench { .. } | Command::Completions { .. } => Ok(()),
        Command::Sim(args) => {
            let profile = match (&args.stages, args.profile.as_str()) {
                (Some(spec), _) => sim::Profile::Stages(
                    sim::schedule::Schedule::parse(spec)
                        .map_err(|e| RoleError::Config(format!("--stages: {e}")))?,
                ),
                (None, "ramp") => sim::Profile::Ramp,
                (None, "burst") => sim::Profile::Burst,
                (None, _) => sim::Profile::Steady,
            };
            if args.houses == 0
                || args.sensors_per_house == 0
                || args.rate.is_nan()
                || args.rate <= 0.0
            {
                return Err(RoleError::Config(
                    "sim: --houses, --sensors-per-house and --rate must be > 0".into(),
                ));
            }
            let opts = sim::Options {
                houses: args.houses,
                sensors_per_house: args.sensors_per_house,
                rate: args.rate,
                duration: args.duration,
                profile,
                qos: args.qos,
                connections: args.connections.max(1),
                seed: args.seed,
            };
            let summary = sim::run(&config.first_mqtt_url(), &opts).await?;
            print_report(args.json, &summary, || summary.table())
        }
        Command::Status { json } => {
            let status = seams(&config)
                .await?
                .queue
                .status()
                .await
                .map_err(|e| anyhow::anyhow!("status: {e}"))?;
            print_report(json, &status, || status.table())
        }
    }
}
