//! The tools of the command line: `hearth token` (house tokens) and `hearth dlq` (dead
//! letters), on the store and queue of the configured backend.

use std::sync::Arc;

use clap::Subcommand;
use hearth::config::Config;
use hearth::roles::RoleError;

use super::{parse_duration, print_report};

#[derive(Subcommand)]
pub enum DlqAction {
    /// Print the selected dead letters, oldest first.
    List {
        #[command(flatten)]
        filter: DlqFilter,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Send the selected dead letters through the normal path again, and remove them.
    Replay {
        #[command(flatten)]
        filter: DlqFilter,
    },
    /// Remove the selected dead letters.
    Purge {
        #[command(flatten)]
        filter: DlqFilter,
    },
}

/// Which dead letters (every condition must hold).
#[derive(clap::Args)]
pub struct DlqFilter {
    /// Only this reason (e.g. malformed_json, out_of_range, webhook_failed).
    #[arg(long)]
    reason: Option<String>,
    /// Only letters about this house.
    #[arg(long)]
    house: Option<String>,
    /// Only letters about this sensor (of any house, unless --house is given too).
    #[arg(long)]
    sensor: Option<String>,
    /// Only letters at least this old: 30s, 10m, 1h.
    #[arg(long, value_parser = parse_duration)]
    older_than: Option<std::time::Duration>,
    /// Only letters younger than this.
    #[arg(long, value_parser = parse_duration)]
    newer_than: Option<std::time::Duration>,
    /// At most this many, oldest first.
    #[arg(long)]
    limit: Option<usize>,
}

impl From<DlqFilter> for hearth::dlq::Filter {
    fn from(f: DlqFilter) -> Self {
        hearth::dlq::Filter {
            reason: f.reason,
            house: f.house,
            sensor: f.sensor,
            older_than: f.older_than,
            newer_than: f.newer_than,
            limit: f.limit,
            codecs: None,
        }
    }
}

#[derive(Subcommand)]
pub enum ConfigAction {
    /// Load and check the configuration (file, environment, flags); exit 2 with one line naming
    /// the key if anything is wrong.
    Check,
    /// Print the configuration as loaded, every key, as TOML (secrets masked).
    Print,
}

/// `hearth config check|print`: the configuration was loaded (and checked) before this runs.
pub fn config(action: ConfigAction, config: &Config) -> Result<(), RoleError> {
    match action {
        ConfigAction::Check => {
            let file = match &config.file {
                Some(f) => f.display().to_string(),
                None => "none (defaults, environment and flags)".into(),
            };
            let mode = match (config.embedded, config.external_broker) {
                (true, false) => "embedded (broker and store in the data folder)",
                (true, true) => "embedded store, the home's broker",
                (false, _) => "servers",
            };
            println!("config ok\nfile: {file}\nmode: {mode}");
            for warning in &config.warnings {
                println!("warning: {warning}");
            }
        }
        ConfigAction::Print => {
            let text = toml::to_string(&config.masked())
                .map_err(|e| RoleError::Config(format!("config print: {e}")))?;
            print!("{text}");
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum TokenAction {
    /// Make a token for one house; prints the token alone on stdout (it is stored hashed and
    /// cannot be shown again; its id is on stderr).
    Create {
        /// The house the token may see.
        #[arg(long)]
        house: String,
        /// It stops working after this long: 30d, 12h, 90m.
        #[arg(long, value_parser = parse_duration)]
        expires: Option<std::time::Duration>,
    },
    /// List the tokens: id, house, created, expires (never the secret).
    List {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by its id: every process refuses it within a second.
    Revoke {
        /// The token's id, from `hearth token list`.
        id: String,
    },
}

/// The queue, store, cache and fan-out the tools (`status`, `dlq`, `token`) work on: the
/// embedded store's data folder when no server URL is set (as `hearth up`), else the servers.
pub async fn seams(config: &Arc<Config>) -> Result<hearth::seam::Seams, RoleError> {
    if !config.embedded {
        return hearth::servers::Servers::open(config.clone(), Default::default())
            .map(|s| hearth::seam::Backend::seams(&s).clone())
            .map_err(|e| RoleError::Config(e.to_string()));
    }
    let dir = std::path::Path::new(&config.data_dir);
    if !dir.join("hearth.sqlite3").exists() {
        return Err(RoleError::Config(format!(
            "no embedded store in data_dir {} (run `hearth up` there first, or set the server URLs)",
            dir.display()
        )));
    }
    hearth::embedded::Embedded::open(
        dir,
        config.shards,
        config.sensor_touch_interval_ms,
        Default::default(),
        hearth::Caps::from_config(config),
        hearth::Retention::from_config(config),
        hearth::Keep::from_config(config),
    )
    .await
    .map(|e| e.seams)
    .map_err(|e| anyhow::anyhow!("embedded store: {e}").into())
}

/// `hearth token create | list | revoke`.
pub async fn token(action: TokenAction, config: &Arc<Config>) -> Result<(), RoleError> {
    if !config.embedded {
        hearth::servers::schema::migrate(&config.database_url)
            .await
            .map_err(|e| anyhow::anyhow!("token: {e}"))?;
    }
    let store = seams(config).await?.store;
    let fail = |e: hearth::seam::Unavailable| anyhow::anyhow!("token: {e}");
    match action {
        TokenAction::Create { house, expires } => {
            if !hearth::event::is_valid_id(&house) {
                return Err(RoleError::Config(format!(
                    "--house must match [A-Za-z0-9_.-]{{1,64}}, got {house:?}"
                )));
            }
            let (token, hash) = hearth::api::auth::new_token();
            let id = hearth::api::auth::token_id(&hash);
            let expires_at = expires.map(|d| {
                hearth::event::now_us() / 1000
                    + i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
            });
            store
                .create_token(&id, &hash, &house, expires_at)
                .await
                .map_err(fail)?;
            eprintln!("token {id} for house {house}");
            println!("{token}");
        }
        TokenAction::List { json } => {
            let tokens = store.tokens().await.map_err(fail)?;
            print_report(json, &tokens, || {
                let mut out = format!(
                    "{:<14} {:<24} {:<20} {}\n",
                    "id", "house", "created", "expires"
                );
                for t in &tokens {
                    out.push_str(&format!(
                        "{:<14} {:<24} {:<20} {}\n",
                        t.id,
                        t.house_id,
                        hearth::status::when(t.created_at),
                        t.expires_at.map_or("never".into(), hearth::status::when)
                    ));
                }
                out
            })?;
        }
        TokenAction::Revoke { id } => {
            if store.revoke(&id).await.map_err(fail)? {
                println!("revoked token {id}");
            } else {
                return Err(RoleError::Config(format!("no token with id {id:?}")));
            }
        }
    }
    Ok(())
}

/// `hearth dlq list | replay | purge`.
pub async fn dlq(action: DlqAction, config: &Arc<Config>) -> Result<(), RoleError> {
    let queue = seams(config).await?.queue;
    let fail = |e: hearth::seam::Unavailable| anyhow::anyhow!("dlq: {e}");
    match action {
        DlqAction::List { filter, json } => {
            let letters = queue.dead_letters(&filter.into()).await.map_err(fail)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&letters).map_err(anyhow::Error::from)?
                );
            } else {
                for l in &letters {
                    println!(
                        "{}  {:<16} {:<8} {:<28} {}  {}",
                        l.id,
                        l.reason,
                        l.source,
                        l.topic,
                        l.detail,
                        l.payload.chars().take(120).collect::<String>()
                    );
                }
                eprintln!("{} dead letter(s)", letters.len());
            }
        }
        DlqAction::Replay { filter } => {
            let codecs = hearth::Codecs::from_config(config);
            let mut filter: hearth::dlq::Filter = filter.into();
            filter.codecs = Some(std::sync::Arc::new(codecs.clone()));
            let r = queue.replay(&codecs, &filter).await.map_err(fail)?;
            println!(
                "replayed {} letter(s): {} event(s) queued, {} rejected again, {} skipped (nothing replayable)",
                r.letters, r.events, r.rejected_again, r.skipped
            );
        }
        DlqAction::Purge { filter } => {
            let n = queue.purge(&filter.into()).await.map_err(fail)?;
            println!("purged {n} dead letter(s)");
        }
    }
    Ok(())
}
