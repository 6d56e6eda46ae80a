//! What the intakes learn about devices, on the servers: Home Assistant discovery configs in one
//! Redis hash, `P:discovery` (config topic → payload), written before the messages that brought
//! them are acknowledged and read by every ingest at start; which device each sensor belongs to
//! in `P:devices:{house}` (sensor → JSON), read by the API.

use std::collections::HashMap;

use redis::AsyncCommands;

use super::queue::{Queue, QueueError};
use crate::seam::DeviceInfo;

/// HSET KEYS[1] ARGV[1] ARGV[2] if the field is there already or the hash holds fewer than
/// ARGV[3] fields.
const PUT_BOUNDED: &str = r#"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 or redis.call('HLEN', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
return 0
"#;

impl Queue {
    /// Keep configs (an empty payload forgets its topic's), in one transaction.
    pub async fn keep_discovery(&self, configs: &[(String, Vec<u8>)]) -> Result<(), QueueError> {
        if configs.is_empty() {
            return Ok(());
        }
        let key = self.keys.discovery();
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (topic, payload) in configs {
            match payload.is_empty() {
                true => pipe.hdel(&key, topic).ignore(),
                false => pipe.hset(&key, topic, payload.as_slice()).ignore(),
            };
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    /// Every config kept.
    pub async fn discovery(&self) -> Result<Vec<(String, Vec<u8>)>, QueueError> {
        let mut conn = self.conn.clone();
        let all: Vec<(String, Vec<u8>)> = conn.hgetall(self.keys.discovery()).await?;
        Ok(all)
    }

    /// Keep which device each (house, sensor) belongs to, at most `max` sensors per house.
    pub async fn keep_devices(
        &self,
        devices: &[(String, String, DeviceInfo)],
        max: u64,
    ) -> Result<(), QueueError> {
        let rows: Vec<(String, &str, &DeviceInfo)> = devices
            .iter()
            .map(|(house, sensor, info)| (self.keys.devices(house), sensor.as_str(), info))
            .collect();
        self.keep_infos(&rows, max).await
    }

    /// A house's sensors' devices.
    pub async fn devices(&self, house: &str) -> Result<HashMap<String, DeviceInfo>, QueueError> {
        self.infos(self.keys.devices(house)).await
    }

    /// Keep what bridges say of their devices, at most `max` devices per house.
    pub async fn keep_catalog(
        &self,
        devices: &[(String, DeviceInfo)],
        max: u64,
    ) -> Result<(), QueueError> {
        let rows: Vec<(String, &str, &DeviceInfo)> = devices
            .iter()
            .map(|(house, info)| (self.keys.catalog(house), info.device_id.as_str(), info))
            .collect();
        self.keep_infos(&rows, max).await
    }

    /// What bridges said of a house's devices.
    pub async fn catalog(&self, house: &str) -> Result<HashMap<String, DeviceInfo>, QueueError> {
        self.infos(self.keys.catalog(house)).await
    }

    /// (hash, field, device) rows, in one round trip; a hash holding `max` fields takes no new
    /// one (the names come from devices: a hostile one could make up names without end).
    async fn keep_infos(
        &self,
        rows: &[(String, &str, &DeviceInfo)],
        max: u64,
    ) -> Result<(), QueueError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (key, field, info) in rows {
            let json = serde_json::to_string(info).unwrap_or_default();
            pipe.cmd("EVAL")
                .arg(PUT_BOUNDED)
                .arg(1)
                .arg(key)
                .arg(*field)
                .arg(json)
                .arg(max)
                .ignore();
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    async fn infos(&self, key: String) -> Result<HashMap<String, DeviceInfo>, QueueError> {
        let mut conn = self.conn.clone();
        let all: HashMap<String, String> = conn.hgetall(key).await?;
        Ok(all
            .into_iter()
            .filter_map(|(s, j)| Some((s, serde_json::from_str(&j).ok()?)))
            .collect())
    }
}
