//! The bench's load: `events` readings from `sensors` sensors, each sensor with its own `seq`,
//! published at QoS 1 (or 0) over several MQTT connections, as fast as the broker takes them or
//! at a target rate. A sensor always publishes on the same connection, so the broker delivers
//! its readings in order.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use rumqttc::QoS;

use hearth::sim::wire;

/// What to publish.
#[derive(Debug, Clone)]
pub struct Load {
    pub events: u64,
    pub sensors: u64,
    /// Events per second over all connections; 0 for as fast as possible.
    pub rate: u64,
    pub connections: usize,
    pub qos: QoS,
    /// Prefix of sensor ids, unique to a run, so a run's rows can be told from others'.
    pub sensor_prefix: String,
    /// First topic level (`hearth` for hearth's native format).
    pub topic_root: String,
}

impl Load {
    /// Topic and payload of the `i`-th event (0-based): sensor `i % sensors`, seq `i / sensors + 1`.
    pub fn event(&self, i: u64, ts_ms: i64) -> (String, Vec<u8>) {
        let sensor = i % self.sensors;
        let seq = i / self.sensors + 1;
        let (kind, value) = match sensor % 4 {
            0 => ("temperature", 18.0 + (seq % 80) as f64 / 10.0),
            1 => ("humidity", 30.0 + (seq % 40) as f64),
            2 => ("power", 100.0 + (seq % 900) as f64),
            _ => ("light", (seq % 1000) as f64),
        };
        let topic = format!(
            "{}/house-{}/{}-{sensor}",
            self.topic_root,
            sensor / 50,
            self.sensor_prefix
        );
        let payload = format!(r#"{{"kind":"{kind}","value":{value},"seq":{seq},"ts":{ts_ms}}}"#);
        (topic, payload.into_bytes())
    }
}

/// Publish the load to the broker at `host:port`. `sent` counts events acknowledged by the
/// broker (QoS 1) or written (QoS 0), for progress displays. Returns when all are.
pub async fn publish(
    host: &str,
    port: u16,
    client_prefix: &str,
    load: &Load,
    sent: Arc<AtomicU64>,
) -> anyhow::Result<Duration> {
    publish_to(&[(host.to_string(), port)], client_prefix, load, sent).await
}

/// [`publish`] to several brokers: connection `c` (and so its sensors) to broker `c % n`, as a
/// fleet split across brokers.
pub async fn publish_to(
    brokers: &[(String, u16)],
    client_prefix: &str,
    load: &Load,
    sent: Arc<AtomicU64>,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..load.connections {
        let load = load.clone();
        let sent = sent.clone();
        let (host, port) = brokers[c % brokers.len()].clone();
        let id = format!("{client_prefix}-{c}");
        tasks.spawn(async move {
            let mine: Vec<u64> = (0..load.events)
                .filter(|i| (i % load.sensors) as usize % load.connections == c)
                .collect();
            let rate = load.rate as f64 / load.connections as f64;
            let due = |n: u64| (rate > 0.0).then(|| Duration::from_secs_f64(n as f64 / rate));
            let make = |n: u64| load.event(mine[n as usize], hearth::event::now_us() / 1000);
            let count = mine.len() as u64;
            wire::publish(&host, port, &id, count, load.qos, due, make, sent).await
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(started.elapsed())
}
