//! Configuration: one struct, filled from a file, then `HEARTH_*` environment variables, then
//! `--set key=value` flags and the named flags (later layers win). The file is `--config`, else
//! `HEARTH_CONFIG`, else the first of [`SEARCH_PATH`] that exists. Any string key may be given as
//! `{key}_file` instead (`admin_token_file`, `HEARTH_DATABASE_URL_FILE`): the value is the
//! file's content, for secrets kept out of the environment and the config.
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
    /// as `mqtt://user:pass@host:port`); over TLS `mqtts://host:port` (8883 by default), with
    /// `?ca=FILE` (the system's roots otherwise) and `&cert=FILE&key=FILE` for a client
    /// certificate, PEM files. Several brokers, comma-separated, for a fleet split across
    /// brokers: the ingest holds sessions on each.
    pub mqtt_url: String,
    /// MQTT client id of the ingest. It must be stable across restarts: the broker keeps the
    /// persistent session (and the messages queued while hearth was down) under this id. With
    /// `ingest_slots` above 1, slot `k` is `{mqtt_client_id}-{k}`.
    pub mqtt_client_id: String,
    /// Broker sessions the ingest processes share, per broker (1..=64). Each is held by one
    /// `hearth ingest` at a time (a lease in Redis), and every process started the same way takes
    /// a fair share: set it to at least the most ingest processes that will run. With 1, one
    /// process ingests and the others stand by; above 1 the sessions subscribe through a shared
    /// subscription (`$share/hearth/…`), and each sensor's readings are put back in `seq` order
    /// across processes before they are appended (see `ingest_order_wait_ms`).
    pub ingest_slots: u16,
    /// Longest a reading waits at the ingest for the readings of its sensor before it (a `seq`
    /// gap) when ingest slots are shared; past it, it is appended anyway (a lost reading).
    pub ingest_order_wait_ms: u64,
    /// Redis server holding the streams, leases, counters and the latest-value cache; over TLS
    /// `rediss://host:port` with `?ca=FILE` (the system's roots otherwise) and
    /// `&cert=FILE&key=FILE` for a client certificate; a Redis Cluster as
    /// `redis+cluster://host:port,host:port…` (seed nodes).
    pub redis_url: String,
    /// Replicas that must hold an append before the intake acknowledges it (Redis `WAIT`): with
    /// 1 or more, a master's failover loses nothing acknowledged; 0 (the default) acknowledges on
    /// the master's answer.
    pub redis_wait_replicas: u32,
    /// Longest the intake waits for those replicas; past it the append counts as failed and the
    /// message is taken again (its copy is not stored twice).
    pub redis_wait_timeout_ms: u64,
    /// Prefix of every Redis key hearth writes, so that several installations (or tests) can share
    /// one Redis.
    pub redis_prefix: String,
    /// PostgreSQL database holding events, sensors and the lane fences. Created if missing. TLS
    /// as libpq spells it: `?sslmode=require|verify-ca|verify-full` with `sslrootcert=FILE`
    /// (the system's roots otherwise) and `sslcert=FILE&sslkey=FILE`; without `sslmode`, no TLS.
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
    /// About how many events the embedded worker reads and stores in one SQLite transaction
    /// (at most what is queued: a quiet home still stores each reading at once). A commit costs
    /// the index pages it touches, whatever their number of rows, so large batches are what let
    /// one SQLite file keep up with a burst.
    pub embedded_batch_size: usize,
    /// Lifetime of a worker's lease on a lane, in milliseconds. A crashed worker's lanes are taken
    /// over after at most this long; it is renewed every third of it.
    pub lease_ttl_ms: u64,
    /// Deliveries after which an event that fails for its own content is dead-lettered.
    /// Server failures (Redis, PostgreSQL down) are retried without limit and never count.
    pub max_deliveries: u32,
    /// Routine queue depth (events, all lanes) above which every intake stops taking: the MQTT
    /// ingest and the embedded broker stop reading publishers (the broker or the client then
    /// holds the messages), `POST /events` answers 503 with `Retry-After`.
    pub queue_high_watermark: u64,
    /// Routine queue depth below which the intakes take again (the gap is the hysteresis).
    pub queue_low_watermark: u64,
    /// Largest accepted MQTT payload in bytes; larger ones are dead-lettered.
    pub max_payload_bytes: usize,
    /// Most readings one MQTT message or one `POST /events` may hold; a message with more is
    /// refused whole (`too_many_readings`, one dead letter).
    pub max_readings_per_message: usize,
    /// How far in the future a reading's `ts` may be, in seconds, before it is rejected. A
    /// reading stamped ahead within it is stored with its stamp but ordered (latest value,
    /// rules) as if stamped when it was received.
    pub max_future_skew_secs: u64,
    /// Most houses hearth keeps data of; readings of a new house past it are dead-lettered
    /// (`too_many_houses`).
    pub max_houses: u64,
    /// Most sensors per house; readings of a new sensor past it are dead-lettered
    /// (`too_many_sensors`).
    pub max_sensors_per_house: u64,
    /// Most kinds per sensor; readings of a new kind past it are dead-lettered
    /// (`too_many_kinds`).
    pub max_kinds_per_sensor: u64,
    /// Dead letters older than this (seconds) are removed, and counted
    /// (`hearth_dead_letters_expired_total`); 0 keeps them whatever their age.
    pub dead_letter_max_age_secs: u64,
    /// Most dead letters kept: past it the oldest are removed, and counted; 0 for no limit.
    pub dead_letter_max_count: u64,
    /// Days readings are kept (by when they were received); 0 keeps them forever. Rollups are
    /// kept whatever this says (minute ones: `rollup_minute_days`). PostgreSQL drops whole
    /// partitions (a reading may stay up to a partition's width longer: 1 day up to 31, 7 up to
    /// 400, else 30); SQLite deletes rows.
    pub retention_days: u32,
    /// Kinds kept for days of their own, `kind=days` comma-separated (`power=30,motion=7`; 0:
    /// forever); the others keep `retention_days`.
    pub retention_by_kind: String,
    /// Days a cleared alert is kept after it cleared; 0 keeps them forever.
    pub alert_retention_days: u32,
    /// Days minute rollups are kept, by their minute; 0 keeps them forever. Hour and day
    /// rollups are always kept.
    pub rollup_minute_days: u32,
    /// PostgreSQL: how far apart (hours of receipt) two copies of a reading with the same dedup
    /// key are still known as one. A broker's redelivery comes within the ingest's restart.
    pub dedup_window_hours: u32,
    /// Minimum interval between two writes of a sensor's `last_seen` in PostgreSQL, in
    /// milliseconds (the exact latest reading is always in the Redis cache).
    pub sensor_touch_interval_ms: u64,
    /// Alert rules and webhooks (see deploy/rules.toml); empty for the built-in defaults.
    pub rules_file: String,
    /// Where events come from: comma-separated `ecosystem[:prefix][@house]` (ecosystems:
    /// native, minimal, zigbee2mqtt, tasmota, ha_discovery, shelly, esphome). Empty: every
    /// ecosystem at its default topics, for `default_house`.
    pub sources: String,
    /// The house readings of device ecosystems go to when their source names none (a one-home
    /// setup needs no other).
    pub default_house: String,
    /// Address of the HTTP server of `hearth up` and `hearth api`: REST API, WebSocket, metrics.
    pub api_listen: String,
    /// PEM certificate chain of the API's server: with `api_tls_key`, `api_listen` speaks HTTPS
    /// only (and `metrics_listen` too), and `grpc_listen` TLS.
    pub api_tls_cert: String,
    /// PEM private key of `api_tls_cert`.
    pub api_tls_key: String,
    /// Address of the gRPC API (`proto/hearth/v1/hearth.proto`) of `hearth up` and `hearth api`;
    /// empty for none.
    pub grpc_listen: String,
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
    /// Address of the embedded MQTT broker (`hearth up` with no server URL configured; unused
    /// when `mqtt_url` names the home's broker).
    pub mqtt_listen: String,
    /// Address of the embedded broker's TLS listener (MQTT over TLS, usually port 8883); empty
    /// for none. With it, `mqtt_listen` may be empty: TLS only.
    pub mqtt_tls_listen: String,
    /// PEM certificate chain of the embedded broker's TLS listener.
    pub mqtt_tls_cert: String,
    /// PEM private key of `mqtt_tls_cert`.
    pub mqtt_tls_key: String,
    /// Embedded broker: whether clients without credentials may connect (and publish or
    /// subscribe anywhere). Allowed only while `mqtt_listen` is a loopback address: on any other
    /// address, clients log in with their house id and a token of that house.
    pub mqtt_allow_anonymous: bool,
    /// Embedded broker: most client connections at once; more are refused.
    pub mqtt_max_connections: usize,
    /// Embedded broker: most connections of one house's clients (logged in with a house token)
    /// at once, so that one house cannot take every connection; more are refused (CONNACK 3).
    pub mqtt_connections_per_house: usize,
    /// Embedded broker: the longest keep-alive honoured, in seconds; a client asking for more,
    /// or for none (0), is dropped after this long without a packet.
    pub mqtt_max_keep_alive_secs: u64,
    /// Embedded broker: a packet begun must be whole within this (milliseconds), or the client
    /// is dropped.
    pub mqtt_packet_timeout_ms: u64,
    /// Embedded broker: most subscription filters per client.
    pub mqtt_max_subscriptions: usize,
    /// Embedded broker: publishes per second of one house's clients (logged in with a house
    /// token, all its connections together), after a burst of `mqtt_publish_burst`; past it,
    /// the broker holds their publishes while the house owes, at most one burst's worth
    /// (nothing is refused or lost: the clients wait for their acknowledgements). Anonymous
    /// (loopback) and admin clients are not limited.
    pub mqtt_publishes_per_second: u32,
    /// Embedded broker: publishes a house's clients may send at once before
    /// `mqtt_publishes_per_second` applies (a bridge's start: every device's state and
    /// discovery configs).
    pub mqtt_publish_burst: u32,
    /// Embedded broker: bytes of messages a subscriber may have waiting; one that lets more
    /// pile up (it does not read) is disconnected.
    pub mqtt_subscriber_buffer_bytes: usize,
    /// Embedded broker: most retained messages kept (devices announce themselves and their
    /// state with them); one more is delivered but not kept.
    pub mqtt_max_retained: usize,
    /// Embedded broker: most bytes (topics and payloads) of retained messages kept.
    pub mqtt_max_retained_bytes: usize,
    /// Embedded broker: most persistent sessions (clients connecting with clean session off)
    /// kept; a new one past it is refused.
    pub mqtt_max_sessions: usize,
    /// Embedded broker: most QoS 1 and 2 messages queued for one persistent session (while its
    /// client is away, or not acknowledged yet); one more is not queued for it.
    pub mqtt_max_queued_messages: usize,
    /// Embedded broker: most bytes of messages queued for one persistent session.
    pub mqtt_max_queued_bytes: usize,
    /// HTTP and gRPC: most connections at once, each; more wait in the kernel's backlog.
    pub http_max_connections: usize,
    /// HTTP: a request's headers must arrive within this (milliseconds), and a request (body
    /// included; WebSocket sessions aside) must be answered within ten times it.
    pub http_header_timeout_ms: u64,
    /// API (HTTP, WebSocket, gRPC): requests a house token may make per second, in each API
    /// process, after a burst of `api_request_burst`; past it, 429 with `Retry-After`. The admin
    /// token is not limited.
    pub api_requests_per_second: u32,
    /// API: requests a house token may make at once before `api_requests_per_second` applies.
    pub api_request_burst: u32,
    /// API: WebSocket clients and gRPC subscriptions one house's tokens may hold at once, in
    /// each API process (of `http_max_connections` in all); past it, 429 `too_many_clients`.
    /// The admin token is not limited.
    pub push_clients_per_house: usize,
    /// Store lookups per second, in each process, of tokens it never saw or saw unknown (API
    /// requests and the embedded broker's logins; a token seen as a house's is looked up again
    /// freely): a flood of made-up tokens costs the store no more; past it, 429 (CONNACK 3).
    pub token_lookups_per_second: u32,
    /// Folder of the embedded store (`hearth up` with neither `redis_url` nor `database_url`): one SQLite
    /// database holding the queue, events, sensors, alerts and dead letters.
    pub data_dir: String,
    /// Log filter, e.g. `info` or `warn,hearth=debug`.
    pub log: String,
    /// `text` (one line per event, for people) or `json` (one JSON object per line, for log
    /// collectors: `timestamp`, `level`, `target`, `fields`).
    pub log_format: String,
    /// For tests only: a fault point to crash or stall at (see `fault.rs`), e.g. `after_store`,
    /// `after_ack@3`, `pause_before_store=2000`. Empty in any real use.
    pub test_fault: String,
    /// Whether neither `redis_url` nor `database_url` was given in any layer: then `hearth up`
    /// keeps the queue and store in its data folder. Not a key: it is worked out.
    #[serde(skip)]
    pub embedded: bool,
    /// Whether `mqtt_url` was given: embedded, `hearth up` then takes its events from that
    /// broker (the home's own) instead of running one. Not a key: it is worked out.
    #[serde(skip)]
    pub external_broker: bool,
    /// What loading found odd but not wrong (an unknown `HEARTH_*` variable), to log once the
    /// log is set up. Not a key.
    #[serde(skip)]
    pub warnings: Vec<String>,
    /// The config file read, if any. Not a key.
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mqtt_url: "mqtt://127.0.0.1:1883".into(),
            mqtt_client_id: "hearth-ingest".into(),
            ingest_slots: 1,
            ingest_order_wait_ms: 15_000,
            sources: String::new(),
            default_house: "home".into(),
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_wait_replicas: 0,
            redis_wait_timeout_ms: 1_000,
            redis_prefix: "hearth".into(),
            database_url: "postgres://postgres@127.0.0.1:5432/hearth".into(),
            shards: 8,
            workers: 3,
            batch_size: 1000,
            embedded_batch_size: 10_000,
            lease_ttl_ms: 5000,
            max_deliveries: 5,
            queue_high_watermark: 1_000_000,
            queue_low_watermark: 800_000,
            max_payload_bytes: 64 * 1024,
            max_readings_per_message: 1000,
            max_future_skew_secs: 300,
            max_houses: 10_000,
            max_sensors_per_house: 1_000,
            max_kinds_per_sensor: 64,
            dead_letter_max_age_secs: 7 * 24 * 3600,
            dead_letter_max_count: 100_000,
            retention_days: 0,
            retention_by_kind: String::new(),
            alert_retention_days: 0,
            rollup_minute_days: 0,
            dedup_window_hours: 6,
            sensor_touch_interval_ms: 10_000,
            rules_file: String::new(),
            api_listen: "127.0.0.1:8080".into(),
            api_tls_cert: String::new(),
            api_tls_key: String::new(),
            grpc_listen: String::new(),
            metrics_listen: String::new(),
            ws_client_buffer: 256,
            admin_token: String::new(),
            store_slow_ms: 5_000,
            shutdown_timeout_ms: 10_000,
            mqtt_listen: "127.0.0.1:1883".into(),
            mqtt_tls_listen: String::new(),
            mqtt_tls_cert: String::new(),
            mqtt_tls_key: String::new(),
            mqtt_allow_anonymous: true,
            mqtt_max_connections: 1024,
            mqtt_connections_per_house: 256,
            mqtt_max_keep_alive_secs: 300,
            mqtt_packet_timeout_ms: 30_000,
            mqtt_max_subscriptions: 128,
            mqtt_publishes_per_second: 200,
            mqtt_publish_burst: 2_000,
            mqtt_subscriber_buffer_bytes: 4 * 1024 * 1024,
            mqtt_max_retained: 10_000,
            mqtt_max_retained_bytes: 64 * 1024 * 1024,
            mqtt_max_sessions: 100,
            mqtt_max_queued_messages: 1_000,
            mqtt_max_queued_bytes: 16 * 1024 * 1024,
            http_max_connections: 1024,
            http_header_timeout_ms: 10_000,
            api_requests_per_second: 100,
            api_request_burst: 200,
            push_clients_per_house: 64,
            token_lookups_per_second: 200,
            data_dir: "./hearth-data".into(),
            log: "info".into(),
            log_format: "text".into(),
            test_fault: String::new(),
            embedded: false,
            external_broker: false,
            warnings: Vec::new(),
            file: None,
        }
    }
}

impl Config {
    /// The brokers of `mqtt_url`, in order (one, or several comma-separated).
    pub fn mqtt_urls(&self) -> Vec<String> {
        self.mqtt_url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// The first broker of `mqtt_url`: the one the simulator and the readiness probe use.
    pub fn first_mqtt_url(&self) -> String {
        self.mqtt_urls().into_iter().next().unwrap_or_default()
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

/// `--set KEY=VALUE` flags as (key, value) pairs, for [`load`]'s overrides.
pub fn parse_sets(sets: &[String]) -> Result<Vec<(String, String)>, String> {
    sets.iter()
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("--set expects KEY=VALUE, got {kv:?}"))?;
            Ok((k.trim().to_string(), v.to_string()))
        })
        .collect()
}

/// Load the configuration: the file ([`files::config_file`]), then the environment, then `overrides`.
pub fn load(
    explicit_file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    overrides: &[(String, String)],
) -> Result<Config, ConfigError> {
    let mut table = toml::Table::new();
    let env: Vec<(String, String)> = env.into_iter().collect();
    let defaults = default_table();

    let file = config_file(explicit_file, &env);
    if let Some(path) = &file {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let origin = path.display().to_string();
        let parsed: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            origin: origin.clone(),
            message: one_line(&e.to_string()),
        })?;
        let parsed = resolve_files(parsed, &defaults, &origin, |k| k.to_string())?;
        check_layer(&parsed, &origin, |k| k.to_string())?;
        table.extend(parsed);
    }

    // The environment is shared with everything else in the process's world: a variable hearth
    // does not know is warned about, not fatal (Kubernetes' service links, which a Service named
    // `hearth` injects as HEARTH_PORT, HEARTH_SERVICE_HOST..., are not even warned about).
    let mut warnings = Vec::new();
    let mut env_layer = toml::Table::new();
    let mut env_files = toml::Table::new();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("HEARTH_") else {
            continue;
        };
        let key = rest.to_ascii_lowercase();
        if key == "config" {
            continue; // the file's name, read above
        }
        if file_variant(&key, &defaults).is_some() {
            env_files.insert(key, toml::Value::String(value));
            continue;
        }
        match defaults.get(&key) {
            Some(default) => {
                let value = typed(default, &value).map_err(|message| ConfigError::Invalid {
                    origin: "environment".into(),
                    message: format!("{name}: {message}"),
                })?;
                env_layer.insert(key, value);
            }
            None if is_service_link(rest) => {}
            None => warnings.push(format!(
                "ignoring the environment variable {name}: hearth has no key {key}"
            )),
        }
    }
    for (key, value) in env_files {
        let stem = file_variant(&key, &defaults)
            .unwrap_or_default()
            .to_string();
        let env_name = |k: &str| format!("HEARTH_{}", k.to_ascii_uppercase());
        if env_layer.contains_key(&stem) {
            return Err(ConfigError::Invalid {
                origin: "environment".into(),
                message: format!("both {} and {} are set", env_name(&stem), env_name(&key)),
            });
        }
        let path = value.as_str().unwrap_or_default();
        let content = read_value_file(path, "environment", &env_name(&key))?;
        env_layer.insert(stem, toml::Value::String(content));
    }
    table.extend(env_layer);

    let mut flag_layer = toml::Table::new();
    for (key, value) in overrides {
        let key = key.replace('-', "_");
        let spelled = format!("--{}", key.replace('_', "-"));
        if let Some(stem) = file_variant(&key, &defaults) {
            let content = read_value_file(value, "flags", &spelled)?;
            flag_layer.insert(stem.to_string(), toml::Value::String(content));
            continue;
        }
        let default = defaults.get(&key).ok_or_else(|| ConfigError::Invalid {
            origin: "flags".into(),
            message: format!("unknown key {spelled}"),
        })?;
        let value = typed(default, value).map_err(|message| ConfigError::Invalid {
            origin: "flags".into(),
            message: format!("{spelled}: {message}"),
        })?;
        flag_layer.insert(key, value);
    }
    table.extend(flag_layer);

    let embedded = !STORE_URLS.iter().any(|k| table.contains_key(*k));
    let external_broker = table.contains_key("mqtt_url");
    let mut config: Config =
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid {
                origin: "config".into(),
                message: one_line(&e.to_string()),
            })?;
    config.embedded = embedded;
    config.external_broker = external_broker;
    config.warnings = warnings;
    config.file = file;
    config.validate()?;
    Ok(config)
}

/// Whether `HEARTH_{rest}` is one of the variables Kubernetes sets for a Service named `hearth`
/// (or `hearth-...`): `HEARTH_SERVICE_HOST`, `HEARTH_SERVICE_PORT[_NAME]`, `HEARTH_PORT`,
/// `HEARTH_PORT_8080_TCP[_PROTO|_PORT|_ADDR]`.
fn is_service_link(rest: &str) -> bool {
    let parts: Vec<&str> = rest.split('_').collect();
    parts.last() == Some(&"PORT")
        || parts
            .windows(2)
            .any(|w| w[0] == "SERVICE" && matches!(w[1], "HOST" | "PORT"))
        || parts.windows(3).any(|w| {
            w[0] == "PORT" && w[1].parse::<u16>().is_ok() && matches!(w[2], "TCP" | "UDP" | "SCTP")
        })
}

/// The keys that name a server; with none of them set, `hearth up` runs embedded with its own
/// broker.
mod files;
mod mask;
mod validate;

pub use files::SEARCH_PATH;
use files::{config_file, file_variant, read_value_file, resolve_files};

pub const SERVER_URLS: &[&str] = &["mqtt_url", "redis_url", "database_url"];

/// The keys that name where the queue and store live; with neither set, `hearth up` keeps them in
/// its data folder (with the home's broker when `mqtt_url` is set, else its own).
pub const STORE_URLS: &[&str] = &["redis_url", "database_url"];

/// A duration as people write it: `500ms`, `30s`, `5m`, `2h`, `7d` (a bare number is seconds).
/// Anything else, or one too large to represent, is an error: it comes from flags, rules files
/// and query strings.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let v: f64 = num
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v >= 0.0)
        .ok_or_else(|| {
            format!(
                "duration {:?} is not a number with ms, s, m, h or d",
                truncate(s)
            )
        })?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        "d" => v * 86_400.0,
        _ => {
            return Err(format!(
                "duration {:?}: unit must be ms, s, m, h or d",
                truncate(s)
            ));
        }
    };
    std::time::Duration::try_from_secs_f64(secs)
        .ok()
        // Durations are added to instants: keep them within a few thousand years.
        .filter(|d| d.as_secs() < 100 * 365 * 86_400)
        .ok_or_else(|| format!("duration {:?} is too long", truncate(s)))
}

/// The shortest admin token accepted.
pub const MIN_ADMIN_TOKEN: usize = 16;

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

/// The defaults as a TOML table: every key, with a value of its type.
fn default_table() -> toml::Table {
    match toml::Value::try_from(Config::default()) {
        Ok(toml::Value::Table(t)) => t,
        _ => toml::Table::new(),
    }
}

/// Names that exist in `Config`, so a layer can be checked before it is merged and the error can
/// use the spelling of that layer (`HEARTH_SHRADS`, `--shrads`, `shrads`).
pub fn keys() -> Vec<String> {
    default_table().keys().cloned().collect()
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

/// An environment or flag value, read as the type of its key (the type of its default): a
/// string key takes any text (`HEARTH_ADMIN_TOKEN=123456` is a string), a number key an
/// integer, a boolean key `true` or `false`.
fn typed(default: &toml::Value, raw: &str) -> Result<toml::Value, String> {
    match default {
        toml::Value::String(_) => Ok(toml::Value::String(raw.to_string())),
        toml::Value::Integer(_) => raw
            .trim()
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|_| format!("expected an integer, got {:?}", truncate(raw))),
        toml::Value::Boolean(_) => match raw.trim() {
            "true" | "1" => Ok(toml::Value::Boolean(true)),
            "false" | "0" => Ok(toml::Value::Boolean(false)),
            _ => Err(format!("expected true or false, got {:?}", truncate(raw))),
        },
        _ => Err("this key cannot be set here".into()),
    }
}

fn truncate(s: &str) -> &str {
    crate::event::truncate(s, 64)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests;
