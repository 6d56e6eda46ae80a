//! Every setting checked once, at start, with a one-line reason naming the key: a bad value is
//! exit code 2, never a surprise later.

use super::{Config, ConfigError, MIN_ADMIN_TOKEN, is_id_char};

impl Config {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let bad = |message: String| {
            Err(ConfigError::Invalid {
                origin: "config".into(),
                message,
            })
        };
        if !crate::event::is_valid_id(&self.default_house) {
            return bad("default_house must be [A-Za-z0-9_.-]{1,64}".into());
        }
        if let Err(e) = crate::codec::sources::parse(&self.sources, &self.default_house) {
            return bad(e);
        }
        if let Err(e) = crate::keep::parse_by_kind(&self.retention_by_kind) {
            return bad(e);
        }
        for (key, days) in [
            ("retention_days", self.retention_days),
            ("alert_retention_days", self.alert_retention_days),
            ("rollup_minute_days", self.rollup_minute_days),
        ] {
            if days > crate::keep::MAX_DAYS {
                return bad(format!(
                    "{key} must be 0..={}, got {days}",
                    crate::keep::MAX_DAYS
                ));
            }
        }
        if self.dedup_window_hours == 0 || self.dedup_window_hours > 24 * 31 {
            return bad(format!(
                "dedup_window_hours must be 1..=744, got {}",
                self.dedup_window_hours
            ));
        }
        if self.shards == 0 || self.shards > 1024 {
            return bad(format!("shards must be 1..=1024, got {}", self.shards));
        }
        if self.batch_size == 0 || self.batch_size > 10_000 {
            return bad(format!(
                "batch_size must be 1..=10000, got {}",
                self.batch_size
            ));
        }
        if self.embedded_batch_size == 0 || self.embedded_batch_size > 50_000 {
            return bad(format!(
                "embedded_batch_size must be 1..=50000, got {}",
                self.embedded_batch_size
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
        for (key, value) in [
            (
                "max_readings_per_message",
                self.max_readings_per_message as u64,
            ),
            ("max_houses", self.max_houses),
            ("max_sensors_per_house", self.max_sensors_per_house),
            ("max_kinds_per_sensor", self.max_kinds_per_sensor),
            ("mqtt_max_connections", self.mqtt_max_connections as u64),
            ("mqtt_max_keep_alive_secs", self.mqtt_max_keep_alive_secs),
            ("mqtt_packet_timeout_ms", self.mqtt_packet_timeout_ms),
            ("mqtt_max_subscriptions", self.mqtt_max_subscriptions as u64),
            (
                "mqtt_subscriber_buffer_bytes",
                self.mqtt_subscriber_buffer_bytes as u64,
            ),
            ("mqtt_max_retained", self.mqtt_max_retained as u64),
            (
                "mqtt_max_retained_bytes",
                self.mqtt_max_retained_bytes as u64,
            ),
            ("mqtt_max_sessions", self.mqtt_max_sessions as u64),
            (
                "mqtt_max_queued_messages",
                self.mqtt_max_queued_messages as u64,
            ),
            ("mqtt_max_queued_bytes", self.mqtt_max_queued_bytes as u64),
            ("http_max_connections", self.http_max_connections as u64),
            ("push_clients_per_house", self.push_clients_per_house as u64),
            (
                "mqtt_connections_per_house",
                self.mqtt_connections_per_house as u64,
            ),
            ("http_header_timeout_ms", self.http_header_timeout_ms),
            ("redis_wait_timeout_ms", self.redis_wait_timeout_ms),
            (
                "api_requests_per_second",
                u64::from(self.api_requests_per_second),
            ),
            ("api_request_burst", u64::from(self.api_request_burst)),
            (
                "mqtt_publishes_per_second",
                u64::from(self.mqtt_publishes_per_second),
            ),
            ("mqtt_publish_burst", u64::from(self.mqtt_publish_burst)),
            (
                "token_lookups_per_second",
                u64::from(self.token_lookups_per_second),
            ),
        ] {
            if value == 0 {
                return bad(format!("{key} must be >= 1"));
            }
        }
        // Times are added to instants and multiplied: keep them where that cannot overflow.
        for (key, value, max) in [
            (
                "mqtt_max_keep_alive_secs",
                self.mqtt_max_keep_alive_secs,
                65_535,
            ),
            (
                "mqtt_packet_timeout_ms",
                self.mqtt_packet_timeout_ms,
                3_600_000,
            ),
            (
                "http_header_timeout_ms",
                self.http_header_timeout_ms,
                3_600_000,
            ),
            ("redis_wait_timeout_ms", self.redis_wait_timeout_ms, 60_000),
            (
                "max_future_skew_secs",
                self.max_future_skew_secs,
                366 * 86_400,
            ),
            (
                "dead_letter_max_age_secs",
                self.dead_letter_max_age_secs,
                100 * 366 * 86_400,
            ),
        ] {
            if value > max {
                return bad(format!("{key} must be at most {max}, got {value}"));
            }
        }
        if !self.admin_token.is_empty() && self.admin_token.chars().count() < MIN_ADMIN_TOKEN {
            return bad(format!(
                "admin_token must be at least {MIN_ADMIN_TOKEN} characters (it sees every house), got {}",
                self.admin_token.chars().count()
            ));
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
        if self.ingest_slots == 0 || self.ingest_slots > 64 {
            return bad(format!(
                "ingest_slots must be 1..=64, got {}",
                self.ingest_slots
            ));
        }
        let brokers = self.mqtt_urls();
        if brokers.is_empty() || brokers.len() > 16 {
            return bad(format!(
                "mqtt_url must name 1..=16 brokers, got {}",
                brokers.len()
            ));
        }
        let mqtt: Vec<(&str, &String, &[&str])> = brokers
            .iter()
            .map(|u| ("mqtt_url", u, &["mqtt", "tcp", "mqtts", "ssl"][..]))
            .collect();
        for (key, url, schemes) in mqtt.into_iter().chain([
            (
                "redis_url",
                &self.redis_url,
                &["redis", "rediss", "redis+cluster"][..],
            ),
            (
                "database_url",
                &self.database_url,
                &["postgres", "postgresql"][..],
            ),
        ]) {
            let scheme = url.split("://").next().unwrap_or_default();
            if !url.contains("://") || !schemes.contains(&scheme) {
                return bad(format!(
                    "{key} must start with {}://, got {url:?}",
                    schemes[0]
                ));
            }
        }
        let tls_listener = !self.mqtt_tls_listen.is_empty();
        for (key, addr, optional) in [
            ("api_listen", &self.api_listen, false),
            ("metrics_listen", &self.metrics_listen, true),
            ("grpc_listen", &self.grpc_listen, true),
            ("mqtt_listen", &self.mqtt_listen, tls_listener),
            ("mqtt_tls_listen", &self.mqtt_tls_listen, true),
        ] {
            if !(addr.is_empty() && optional) && addr.parse::<std::net::SocketAddr>().is_err() {
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
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return bad(format!(
                "log_format must be text or json, got {:?}",
                self.log_format
            ));
        }
        for (key, addr) in [
            ("mqtt_listen", &self.mqtt_listen),
            ("mqtt_tls_listen", &self.mqtt_tls_listen),
        ] {
            if self.embedded
                && !self.external_broker
                && self.mqtt_allow_anonymous
                && addr
                    .parse::<std::net::SocketAddr>()
                    .is_ok_and(|a| !a.ip().is_loopback())
            {
                return bad(format!(
                    "{key} {addr} is not a loopback address while mqtt_allow_anonymous is true: anyone on the network could publish into any house; set mqtt_allow_anonymous = false (devices then log in with their house id and a house token)"
                ));
            }
        }
        for (cert_key, cert, key_key, key) in [
            (
                "api_tls_cert",
                &self.api_tls_cert,
                "api_tls_key",
                &self.api_tls_key,
            ),
            (
                "mqtt_tls_cert",
                &self.mqtt_tls_cert,
                "mqtt_tls_key",
                &self.mqtt_tls_key,
            ),
        ] {
            if cert.is_empty() != key.is_empty() {
                return bad(format!(
                    "{cert_key} and {key_key} go together: set both or neither"
                ));
            }
        }
        if tls_listener && self.mqtt_tls_cert.is_empty() {
            return bad("mqtt_tls_listen needs mqtt_tls_cert and mqtt_tls_key".into());
        }
        if self.redis_url.starts_with("rediss+cluster://") {
            return bad(
                "redis_url: a Redis Cluster over TLS is not supported yet (rediss+cluster://)"
                    .into(),
            );
        }
        Ok(())
    }
}
