//! The names of hearth's Redis keys, each under the configured prefix, named once.
//!
//! On one server they read `P:stream:{lane}`, `P:stats`, `P:latest:{house}:{sensor}`… On a
//! Redis Cluster every key carries a hash tag that says which keys must share a slot, because a
//! transaction or a script touches them together ([`Group`]): a lane's stream, lease, order and
//! counters (`{P:lane:critical}:stream`…), a house's cached values (`{P:house:h1}:latest:s1`…),
//! and the installation's own keys (`{P}:dead`, `{P}:stats`, `{P}:meta`…). Lanes and houses
//! then spread over the masters by the hash of their names.

use crate::lane::Lane;

/// Key names under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    /// Whether the names carry the hash tags of a cluster.
    cluster: bool,
}

/// Keys that a transaction or a script may touch together: one slot on a cluster. On one server
/// every group is one ([`Keys::group`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Group {
    /// The installation's own keys: dead letters, counters, meta, notifications…
    Global,
    /// A lane's stream, lease, order and its counters.
    Lane(Lane),
    /// A house's cached values and devices.
    House(String),
}

impl Keys {
    /// The names on one Redis server.
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_string(),
            cluster: false,
        }
    }
    /// The names on a Redis Cluster (hash-tagged).
    pub fn clustered(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_string(),
            cluster: true,
        }
    }
    /// The names for `redis_url`.
    pub fn for_url(prefix: &str, url: &str) -> Self {
        match super::conn::is_cluster(url) {
            true => Keys::clustered(prefix),
            false => Keys::new(prefix),
        }
    }
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }
    /// The group `g` falls in: itself on a cluster, [`Group::Global`] on one server (where one
    /// transaction may touch any key).
    pub fn group(&self, g: Group) -> Group {
        match self.cluster {
            true => g,
            false => Group::Global,
        }
    }

    /// A key of `group` (any: they share a slot).
    pub fn key_of(&self, group: &Group) -> String {
        match group {
            Group::Global => self.stats(),
            Group::Lane(lane) => self.stream(*lane),
            Group::House(house) => self.house_sensors(house),
        }
    }

    /// The installation's key `name`.
    fn global(&self, name: &str) -> String {
        match self.cluster {
            true => format!("{{{}}}:{name}", self.prefix),
            false => format!("{}:{name}", self.prefix),
        }
    }
    /// A lane's key `name` (a lease's: anything leased, a lane or an ingest slot).
    fn of_lane(&self, name: &str, lane: &str) -> String {
        match self.cluster {
            true => format!("{{{}:lane:{lane}}}:{name}", self.prefix),
            false => format!("{}:{name}:{lane}", self.prefix),
        }
    }
    /// A house's key `name`, then `rest`.
    fn of_house(&self, name: &str, house_id: &str, rest: &str) -> String {
        match self.cluster {
            true => format!("{{{}:house:{house_id}}}:{name}{rest}", self.prefix),
            false => format!("{}:{name}:{house_id}{rest}", self.prefix),
        }
    }

    pub fn stream(&self, lane: Lane) -> String {
        self.of_lane("stream", &lane.name())
    }
    pub fn dead(&self) -> String {
        self.global("dead")
    }
    pub fn lease(&self, lane: Lane) -> String {
        self.lease_of(&lane.name())
    }
    /// The lease on anything named (a lane, an ingest slot `ingest-{n}`).
    pub fn lease_of(&self, name: &str) -> String {
        self.of_lane("lease", name)
    }
    /// The last `seq` appended per sensor of a lane (hash: `{house}/{sensor}` → seq), kept when
    /// ingest slots are shared ([`super::order`]).
    pub fn order(&self, lane: Lane) -> String {
        self.of_lane("order", &lane.name())
    }
    pub fn consumers(&self, pool: &str) -> String {
        self.global(&format!("consumers:{pool}"))
    }
    /// The installation's counters (hash: counter → value).
    pub fn stats(&self) -> String {
        self.global("stats")
    }
    /// Where the counters changed with a lane's entries are kept: the installation's counters
    /// on one server, the lane's own on a cluster. Readers add up [`Keys::all_stats`].
    pub fn stats_of(&self, lane: Lane) -> String {
        match self.cluster {
            true => self.of_lane("stats", &lane.name()),
            false => self.stats(),
        }
    }
    /// Every hash counters are kept in, for `lanes`, each once.
    pub fn all_stats(&self, lanes: &[Lane]) -> Vec<String> {
        let mut all = vec![self.stats()];
        for lane in lanes {
            let key = self.stats_of(*lane);
            if !all.contains(&key) {
                all.push(key);
            }
        }
        all
    }
    pub fn meta(&self) -> String {
        self.global("meta")
    }
    /// Pub/sub channel of WebSocket pushes.
    pub fn push(&self) -> String {
        self.global("push")
    }
    /// The alert pushes kept for clients that reconnect (stream, entry id `{seq}-0`).
    pub fn push_log(&self) -> String {
        self.global("pushlog")
    }
    /// The last alert push's `seq`.
    pub fn push_seq(&self) -> String {
        self.global("pushseq")
    }
    /// Stream of alert transitions waiting for their webhooks.
    pub fn notify(&self) -> String {
        self.global("notify")
    }
    /// Houses watched by WebSocket clients (sorted set, score: until when, epoch ms).
    pub fn watched(&self) -> String {
        self.global("watched")
    }

    /// Counts the advertisements of watched houses (`INCR` with each).
    pub fn watch_changes(&self) -> String {
        self.global("watch_changes")
    }

    /// Circuit states of every process (hash: `{dependency}|{process}` → `{0|1}:{epoch ms}`).
    pub fn circuits(&self) -> String {
        self.global("circuits")
    }
    /// House tokens, cached (hash → house id).
    pub fn tokens(&self) -> String {
        self.global("tokens")
    }
    /// A sensor's latest values (hash: kind → order key + JSON).
    pub fn latest(&self, house_id: &str, sensor_id: &str) -> String {
        self.of_house("latest", house_id, &format!(":{sensor_id}"))
    }
    /// The start of every cached value's key on one server (where earlier versions' keys are
    /// looked for).
    pub fn latest_prefix(&self) -> String {
        format!("{}:latest:", self.prefix)
    }
    /// What bridges say of a house's devices (hash: device → JSON).
    pub fn catalog(&self, house_id: &str) -> String {
        self.of_house("catalog", house_id, "")
    }
    /// Which device each sensor of a house belongs to (hash: sensor → JSON).
    pub fn devices(&self, house_id: &str) -> String {
        self.of_house("devices", house_id, "")
    }
    /// Home Assistant discovery configs (hash: config topic → payload).
    pub fn discovery(&self) -> String {
        self.global("discovery")
    }
    pub fn house_sensors(&self, house_id: &str) -> String {
        match self.cluster {
            true => self.of_house("sensors", house_id, ""),
            false => format!("{}:house:{house_id}:sensors", self.prefix),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::servers::conn::slot;

    #[test]
    fn one_server_keeps_the_names_of_earlier_versions() {
        let k = Keys::new("hearth");
        assert_eq!(k.stream(Lane::Routine(3)), "hearth:stream:routine-3");
        assert_eq!(k.lease_of("ingest-0"), "hearth:lease:ingest-0");
        assert_eq!(k.order(Lane::Critical), "hearth:order:critical");
        assert_eq!(k.latest("h1", "s1"), "hearth:latest:h1:s1");
        assert_eq!(k.catalog("h1"), "hearth:catalog:h1");
        assert_eq!(k.house_sensors("h1"), "hearth:house:h1:sensors");
        assert_eq!(k.stats_of(Lane::Critical), k.stats());
        assert_eq!(
            k.all_stats(&[Lane::Critical, Lane::Routine(0)]),
            ["hearth:stats"]
        );
    }

    #[test]
    fn on_a_cluster_what_goes_together_shares_a_slot() {
        let k = Keys::clustered("hearth");
        let lane = Lane::Routine(2);
        let s = slot(k.stream(lane).as_bytes());
        for key in [k.lease(lane), k.order(lane), k.stats_of(lane)] {
            assert_eq!(slot(key.as_bytes()), s, "{key}");
        }
        let h = slot(k.latest("h1", "a").as_bytes());
        for key in [
            k.latest("h1", "b"),
            k.house_sensors("h1"),
            k.catalog("h1"),
            k.devices("h1"),
        ] {
            assert_eq!(slot(key.as_bytes()), h, "{key}");
        }
        let g = slot(k.dead().as_bytes());
        for key in [
            k.stats(),
            k.meta(),
            k.notify(),
            k.consumers("workers"),
            k.tokens(),
        ] {
            assert_eq!(slot(key.as_bytes()), g, "{key}");
        }
        // Lanes spread: 17 lanes fall in more than one slot.
        let slots: std::collections::HashSet<u16> = std::iter::once(Lane::Critical)
            .chain(Lane::routine(16))
            .map(|l| slot(k.stream(l).as_bytes()))
            .collect();
        assert!(slots.len() > 8);
        assert_eq!(k.all_stats(&[Lane::Critical, Lane::Routine(0)]).len(), 3);
    }
}
