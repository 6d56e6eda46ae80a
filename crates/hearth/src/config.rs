//! Configuration: one struct, filled from `hearth.toml`, then `HEARTH_*` environment variables,
//! then `--set key=value` flags and the named flags (later layers win).
//!
//! Every layer is turned into the same TOML table before it is deserialised, so a key has one
//! name everywhere (`shards` in the file, `HEARTH_SHARDS` in the environment, `--shards` or
//! `--set shards=16` on the command line), and an unknown key or a bad value fails the same way:
//! one line that names the key and where it came from, and exit code 2.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Everything hearth's roles can be told. Field docs are the user-facing reference; the README's
/// table is checked against these names by a test.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// MQTT broker the ingest subscribes to, `mqtt://host:port` (user and password may be given
    /// as `mqtt://user:pass@host:port`).
    pub mqtt_url: String,
    /// MQTT client id of the ingest. It must be stable across restarts: the broker keeps the
    /// persistent session (and the messages queued while hearth was down) under this id.
    pub mqtt_client_id: String,
    /// Redis server holding the streams, leases, counters and the latest-value cache.
    pub redis_url: String,
    /// Prefix of every Redis key hearth writes, so that several installations (or tests) can share
    /// one Redis.
    pub redis_prefix: String,
    /// PostgreSQL database holding events, sensors and the lane fences. Created if missing.
    pub database_url: String,
    /// Number of routine lanes (Redis streams) events are spread over by a hash of the sensor id.
    /// It bounds how many workers can store in parallel. Changing it is refused while events are
    /// queued, because it would move sensors between lanes and break their order.
    pub shards: u16,
    /// Routine consumers started by `hearth worker` and `hearth up` in this process.
    pub workers: u16,
    /// Most MQTT messages the ingest appends in one Redis transaction, and about how many events
    /// a worker reads at once.
    pub batch_size: usize,
    /// Lifetime of a worker's lease on a lane, in milliseconds. A crashed worker's lanes are taken
    /// over after at most this long; it is renewed every third of it.
    pub lease_ttl_ms: u64,
    /// Deliveries after which an event that fails for its own content is dead-lettered.
    /// Server failures (Redis, PostgreSQL down) are retried without limit and never count.
    pub max_deliveries: u32,
    /// Routine queue depth (events, all lanes) above which the ingest stops taking messages from
    /// the broker, which then holds them.
    pub queue_high_watermark: u64,
    /// Routine queue depth below which the ingest resumes.
    pub queue_low_watermark: u64,
    /// Largest accepted MQTT payload in bytes; larger ones are dead-lettered.
    pub max_payload_bytes: usize,
    /// How far in the future a reading's `ts` may be, in seconds, before it is rejected.
    pub max_future_skew_secs: u64,
    /// Minimum interval between two writes of a sensor's `last_seen` in PostgreSQL, in
    /// milliseconds (the exact latest reading is always in the Redis cache).
    pub sensor_touch_interval_ms: u64,
    /// Alert rules and webhooks (see deploy/rules.toml); empty for the built-in defaults.
    pub rules_file: String,
    /// Address of the HTTP server of `hearth up` and `hearth api`: REST API, WebSocket, metrics.
    pub api_listen: String,
    /// Address where `hearth ingest` and `hearth worker` serve `/metrics`; empty for none.
    pub metrics_listen: String,
    /// Messages a WebSocket client may have waiting; one that lets more pile up (it does not
    /// read) is disconnected.
    pub ws_client_buffer: usize,
    /// The admin bearer token (sees every house). When empty, `hearth up` and `hearth api`
    /// make one at start and log it.
    pub admin_token: String,
    /// A store call slower than this (milliseconds) counts as a failure for PostgreSQL's circuit
    /// breaker (5 in a row open it for 2 s).
    pub store_slow_ms: u64,
    /// After SIGTERM/SIGINT, how long a process may take to finish the batch in hand and hand
    /// its lanes back before it exits anyway (what it had not acknowledged stays pending).
    pub shutdown_timeout_ms: u64,
    /// Address of the embedded MQTT broker (`hearth up` with no server URL configured).
    pub mqtt_listen: String,
    /// Folder of the embedded store (`hearth up` with no server URL configured): one SQLite
    /// database holding the queue, events, sensors, alerts and dead letters.
    pub data_dir: String,
    /// Log filter, e.g. `info` or `warn,hearth=debug`.
    pub log: String,
    /// Whether no server URL (`mqtt_url`, `redis_url`, `database_url`) was given in any layer:
    /// then `hearth up` runs the embedded broker and store. Not a key: it is worked out.
    #[serde(skip)]
    pub embedded: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mqtt_url: "mqtt://127.0.0.1:1883".into(),
            mqtt_client_id: "hearth-ingest".into(),
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_prefix: "hearth".into(),
            database_url: "postgres://postgres@127.0.0.1:5432/hearth".into(),
            shards: 8,
            workers: 3,
            batch_size: 1000,
            lease_ttl_ms: 5000,
            max_deliveries: 5,
            queue_high_watermark: 1_000_000,
            queue_low_watermark: 800_000,
            max_payload_bytes: 64 * 1024,
            max_future_skew_secs: 24 * 3600,
            sensor_touch_interval_ms: 10_000,
            rules_file: String::new(),
            api_listen: "127.0.0.1:8080".into(),
            metrics_listen: String::new(),
            ws_client_buffer: 256,
            admin_token: String::new(),
            store_slow_ms: 5_000,
            shutdown_timeout_ms: 10_000,
            mqtt_listen: "127.0.0.1:1883".into(),
            data_dir: "./hearth-data".into(),
            log: "info".into(),
            embedded: false,
        }
    }
}

/// A configuration problem: shown as one line, exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad config in {origin}: {message}")]
    Invalid { origin: String, message: String },
}

/// Where the file layer comes from: an explicit `--config`, else `./hearth.toml` if present.
pub fn load(
    explicit_file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    overrides: &[(String, String)],
) -> Result<Config, ConfigError> {
    let mut table = toml::Table::new();

    let file = match explicit_file {
        Some(p) => Some(p.to_path_buf()),
        None => Some(PathBuf::from("hearth.toml")).filter(|p| p.exists()),
    };
    if let Some(path) = file {
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let origin = path.display().to_string();
        let parsed: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            origin: origin.clone(),
            message: one_line(&e.to_string()),
        })?;
        check_layer(&parsed, &origin, |k| k.to_string())?;
        table.extend(parsed);
    }

    let mut env_layer = toml::Table::new();
    for (name, value) in env {
        if let Some(key) = name.strip_prefix("HEARTH_") {
            env_layer.insert(key.to_ascii_lowercase(), scalar(&value));
        }
    }
    check_layer(&env_layer, "environment", |k| {
        format!("HEARTH_{}", k.to_ascii_uppercase())
    })?;
    table.extend(env_layer);

    let mut flag_layer = toml::Table::new();
    for (key, value) in overrides {
        flag_layer.insert(key.replace('-', "_"), scalar(value));
    }
    check_layer(&flag_layer, "flags", |k| {
        format!("--{}", k.replace('_', "-"))
    })?;
    table.extend(flag_layer);

    let embedded = !SERVER_URLS.iter().any(|k| table.contains_key(*k));
    let mut config: Config =
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid {
                origin: "config".into(),
                message: one_line(&e.to_string()),
            })?;
    config.embedded = embedded;
    config.validate()?;
    Ok(config)
}

/// The keys that name a server; with none of them set, `hearth up` runs embedded.
pub const SERVER_URLS: &[&str] = &["mqtt_url", "redis_url", "database_url"];

impl Config {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |message: String| {
            Err(ConfigError::Invalid {
                origin: "config".into(),
                message,
            })
        };
        if self.shards == 0 || self.shards > 1024 {
            return bad(format!("shards must be 1..=1024, got {}", self.shards));
        }
        if self.batch_size == 0 || self.batch_size > 10_000 {
            return bad(format!(
                "batch_size must be 1..=10000, got {}",
                self.batch_size
            ));
        }
        if self.lease_ttl_ms < 300 {
            return bad(format!(
                "lease_ttl_ms must be >= 300, got {}",
                self.lease_ttl_ms
            ));
        }
        if self.store_slow_ms == 0 {
            return bad("store_slow_ms must be >= 1".into());
        }
        if self.data_dir.is_empty() {
            return bad("data_dir must not be empty".into());
        }
        if self.shutdown_timeout_ms == 0 {
            return bad("shutdown_timeout_ms must be >= 1".into());
        }
        if self.ws_client_buffer == 0 {
            return bad("ws_client_buffer must be >= 1".into());
        }
        if self.max_deliveries == 0 {
            return bad("max_deliveries must be >= 1".into());
        }
        if self.queue_low_watermark >= self.queue_high_watermark {
            return bad(format!(
                "queue_low_watermark ({}) must be below queue_high_watermark ({})",
                self.queue_low_watermark, self.queue_high_watermark
            ));
        }
        if !self.redis_prefix.chars().all(is_id_char) || self.redis_prefix.is_empty() {
            return bad(format!(
                "redis_prefix must match [A-Za-z0-9_.-]+, got {:?}",
                self.redis_prefix
            ));
        }
        for (key, url, schemes) in [
            ("mqtt_url", &self.mqtt_url, &["mqtt", "tcp"][..]),
            ("redis_url", &self.redis_url, &["redis"][..]),
            (
                "database_url",
                &self.database_url,
                &["postgres", "postgresql"][..],
            ),
        ] {
            let scheme = url.split("://").next().unwrap_or_default();
            if !url.contains("://") || !schemes.contains(&scheme) {
                return bad(format!(
                    "{key} must start with {}://, got {url:?}",
                    schemes[0]
                ));
            }
        }
        for (key, addr) in [
            ("api_listen", &self.api_listen),
            ("metrics_listen", &self.metrics_listen),
            ("mqtt_listen", &self.mqtt_listen),
        ] {
            if !(addr.is_empty() && key == "metrics_listen")
                && addr.parse::<std::net::SocketAddr>().is_err()
            {
                return bad(format!(
                    "{key} must be host:port with an IP address, got {addr:?}"
                ));
            }
        }
        if self
            .log
            .parse::<tracing_subscriber::filter::Targets>()
            .is_err()
        {
            return bad(format!("log is not a valid filter: {:?}", self.log));
        }
        Ok(())
    }
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

/// Names that exist in `Config`, so a layer can be checked before it is merged and the error can
/// use the spelling of that layer (`HEARTH_SHRADS`, `--shrads`, `shrads`).
pub fn keys() -> Vec<String> {
    match toml::Value::try_from(Config::default()) {
        Ok(toml::Value::Table(t)) => t.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

fn check_layer(
    layer: &toml::Table,
    origin: &str,
    spell: impl Fn(&str) -> String,
) -> Result<(), ConfigError> {
    let known = keys();
    for key in layer.keys() {
        if !known.iter().any(|k| k == key) {
            return Err(ConfigError::Invalid {
                origin: origin.into(),
                message: format!("unknown key {}", spell(key)),
            });
        }
    }
    Ok(())
}

/// An environment or flag value as a TOML scalar: `16` is an integer, `true` a boolean, anything
/// else a string, so that `HEARTH_SHARDS=16` and `HEARTH_REDIS_URL=redis://x` both work.
fn scalar(raw: &str) -> toml::Value {
    if let Ok(i) = raw.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    match raw {
        "true" => toml::Value::Boolean(true),
        "false" => toml::Value::Boolean(false),
        _ => toml::Value::String(raw.to_string()),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn layers_apply_in_order_flags_win() {
        let dir = std::env::temp_dir().join(format!("hearth-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("hearth.toml");
        std::fs::write(&file, "shards = 4\nworkers = 2\nbatch_size = 10\n").unwrap();
        let cfg = load(
            Some(&file),
            env(&[
                ("HEARTH_WORKERS", "5"),
                ("HEARTH_BATCH_SIZE", "20"),
                ("PATH", "/x"),
            ]),
            &[("batch-size".into(), "30".into())],
        )
        .unwrap();
        assert_eq!((cfg.shards, cfg.workers, cfg.batch_size), (4, 5, 30));
    }

    #[test]
    fn embedded_only_when_no_server_url_is_set() {
        assert!(load(None, env(&[]), &[]).unwrap().embedded);
        let cfg = load(None, env(&[("HEARTH_REDIS_URL", "redis://r:6379")]), &[]).unwrap();
        assert!(!cfg.embedded);
        assert_eq!(cfg.database_url, Config::default().database_url);
        let flags = [("database-url".to_string(), "postgres://x/y".to_string())];
        assert!(!load(None, env(&[]), &flags).unwrap().embedded);
    }

    #[test]
    fn unknown_keys_are_named_in_the_spelling_of_their_layer() {
        let err = load(None, env(&[("HEARTH_SHRADS", "4")]), &[]).unwrap_err();
        assert!(err.to_string().contains("HEARTH_SHRADS"), "{err}");
        let err = load(None, env(&[]), &[("shrads".into(), "4".into())]).unwrap_err();
        assert!(err.to_string().contains("--shrads"), "{err}");
    }

    #[test]
    fn bad_values_are_one_line() {
        let err = load(None, env(&[("HEARTH_SHARDS", "many")]), &[]).unwrap_err();
        let msg = err.to_string();
        assert!(!msg.contains('\n') && msg.contains("shards"), "{msg}");
        let err = load(None, env(&[("HEARTH_SHARDS", "0")]), &[]).unwrap_err();
        assert!(err.to_string().contains("shards must be"), "{err}");
        let err = load(None, env(&[("HEARTH_REDIS_URL", "localhost:6379")]), &[]).unwrap_err();
        assert!(err.to_string().contains("redis_url"), "{err}");
    }
}
