//! The names of hearth's Redis keys, each under the configured prefix, named once.

use crate::lane::Lane;

/// Key names under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_string(),
        }
    }
    pub fn stream(&self, lane: Lane) -> String {
        format!("{}:stream:{}", self.prefix, lane.name())
    }
    pub fn dead(&self) -> String {
        format!("{}:dead", self.prefix)
    }
    pub fn lease(&self, lane: Lane) -> String {
        self.lease_of(&lane.name())
    }
    /// The lease on anything named (a lane, an ingest slot `ingest-{n}`).
    pub fn lease_of(&self, name: &str) -> String {
        format!("{}:lease:{name}", self.prefix)
    }
    /// The last `seq` appended per sensor of a lane (hash: `{house}/{sensor}` → seq), kept when
    /// ingest slots are shared ([`super::order`]).
    pub fn order(&self, lane: Lane) -> String {
        format!("{}:order:{}", self.prefix, lane.name())
    }
    pub fn consumers(&self, pool: &str) -> String {
        format!("{}:consumers:{pool}", self.prefix)
    }
    pub fn stats(&self) -> String {
        format!("{}:stats", self.prefix)
    }
    pub fn meta(&self) -> String {
        format!("{}:meta", self.prefix)
    }
    /// Pub/sub channel of WebSocket pushes.
    pub fn push(&self) -> String {
        format!("{}:push", self.prefix)
    }
    /// Stream of alert transitions waiting for their webhooks.
    pub fn notify(&self) -> String {
        format!("{}:notify", self.prefix)
    }
    /// Houses watched by WebSocket clients (sorted set, score: until when, epoch ms).
    pub fn watched(&self) -> String {
        format!("{}:watched", self.prefix)
    }
    /// Circuit states of every process (hash: `{dependency}|{process}` → `{0|1}:{epoch ms}`).
    pub fn circuits(&self) -> String {
        format!("{}:circuits", self.prefix)
    }
    /// House tokens, cached (hash → house id).
    pub fn tokens(&self) -> String {
        format!("{}:tokens", self.prefix)
    }
    /// A sensor's latest values (hash: kind → order key + JSON).
    pub fn latest(&self, house_id: &str, sensor_id: &str) -> String {
        format!("{}:latest:{house_id}:{sensor_id}", self.prefix)
    }
    pub fn latest_prefix(&self) -> String {
        format!("{}:latest:", self.prefix)
    }
    /// What bridges say of a house's devices (hash: device → JSON).
    pub fn catalog(&self, house_id: &str) -> String {
        format!("{}:catalog:{house_id}", self.prefix)
    }
    /// Which device each sensor of a house belongs to (hash: sensor → JSON).
    pub fn devices(&self, house_id: &str) -> String {
        format!("{}:devices:{house_id}", self.prefix)
    }
    /// Home Assistant discovery configs (hash: config topic → payload).
    pub fn discovery(&self) -> String {
        format!("{}:discovery", self.prefix)
    }
    pub fn house_sensors(&self, house_id: &str) -> String {
        format!("{}:house:{house_id}:sensors", self.prefix)
    }
}
