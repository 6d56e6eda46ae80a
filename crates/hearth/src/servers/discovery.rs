//! Home Assistant discovery configs on the servers: one Redis hash, `P:discovery` (config topic
//! → payload), written before the messages that brought them are acknowledged, read by every
//! ingest at start.

use redis::AsyncCommands;

use super::queue::{Queue, QueueError};

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
}
