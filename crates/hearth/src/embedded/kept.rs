//! What the embedded broker keeps across restarts, in the SQLite file: retained messages and
//! the last wills of connected clients (MQTT 3.1.1 §3.3.1.3, §3.1.2.5).
//!
//! Home Assistant discovery and every ecosystem's availability rest on them: a device announces
//! its entities and its `online` state as retained messages, and leaves a will (`offline`) for
//! the broker to publish if it vanishes. Both are written before the client is acknowledged (a
//! retained PUBLISH's PUBACK comes after its row is committed; a CONNECT's CONNACK after its will
//! is), so a kill -9 of hearth loses neither. A will still stored when hearth starts belongs to a
//! client that was cut off by the stop: it is published then, as the client's connection ended
//! without a DISCONNECT.
//!
//! Bounded: at most `mqtt_max_retained` retained messages and `mqtt_max_retained_bytes` of them;
//! a retained message past either is delivered to current subscribers but not kept, and counted
//! (`hearth_mqtt_refused_total{reason="retained_full"}`).

use std::collections::BTreeMap;
use std::sync::Mutex;

use bytes::Bytes;
use rusqlite::params;

use super::db::Sqlite;
use super::topics::matches;
use crate::metrics::METRICS;
use crate::seam::Unavailable;

/// Keep Home Assistant discovery configs (an empty payload forgets its topic's), in one
/// transaction.
pub fn keep_discovery(
    c: &mut rusqlite::Connection,
    configs: &[(String, Vec<u8>)],
) -> rusqlite::Result<()> {
    put_or_remove(
        c,
        Topics::Discovery,
        configs.iter().map(|(t, p)| (t, p.as_slice())),
    )
}

/// The two tables of (topic, payload) rows.
#[derive(Debug, Clone, Copy)]
enum Topics {
    Retained,
    Discovery,
}

/// Put each (topic, payload), or remove the topic's row where the payload is empty, in one
/// transaction.
fn put_or_remove<'r>(
    c: &mut rusqlite::Connection,
    table: Topics,
    rows: impl Iterator<Item = (&'r String, &'r [u8])>,
) -> rusqlite::Result<()> {
    let (put, remove) = match table {
        Topics::Retained => (
            "INSERT INTO retained (topic, payload) VALUES (?1, ?2)
             ON CONFLICT (topic) DO UPDATE SET payload = excluded.payload",
            "DELETE FROM retained WHERE topic = ?1",
        ),
        Topics::Discovery => (
            "INSERT INTO discovery (topic, payload) VALUES (?1, ?2)
             ON CONFLICT (topic) DO UPDATE SET payload = excluded.payload",
            "DELETE FROM discovery WHERE topic = ?1",
        ),
    };
    let tx = c.transaction()?;
    {
        let mut put = tx.prepare_cached(put)?;
        let mut remove = tx.prepare_cached(remove)?;
        for (topic, payload) in rows {
            match payload.is_empty() {
                true => remove.execute([topic])?,
                false => put.execute(params![topic, payload])?,
            };
        }
    }
    tx.commit()
}

/// Every discovery config kept.
pub fn discovery(c: &mut rusqlite::Connection) -> rusqlite::Result<Vec<(String, Vec<u8>)>> {
    let mut st = c.prepare("SELECT topic, payload FROM discovery")?;
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect()
}

/// Keep which device each (house, sensor) belongs to (`devices`), or what bridges say of each
/// (house, device) (`catalog`): rows of (house, key, device). A house holding `max` rows takes
/// no new key (its known ones are still updated).
pub fn keep_infos(
    c: &mut rusqlite::Connection,
    table: Infos,
    rows: &[(String, String, crate::seam::DeviceInfo)],
    max: u64,
) -> rusqlite::Result<()> {
    let tx = c.transaction()?;
    {
        // `WHERE true` keeps SQLite from reading `ON CONFLICT` as a join's (its documented
        // parsing ambiguity of INSERT … SELECT … ON CONFLICT).
        let mut put = tx.prepare_cached(match table {
            Infos::Devices => {
                "INSERT INTO devices (house_id, sensor_id, info)
                 SELECT ?1, ?2, ?3 WHERE true AND (
                   EXISTS (SELECT 1 FROM devices WHERE house_id = ?1 AND sensor_id = ?2)
                   OR (SELECT COUNT(*) FROM devices WHERE house_id = ?1) < ?4)
                 ON CONFLICT (house_id, sensor_id) DO UPDATE SET info = excluded.info"
            }
            Infos::Catalog => {
                "INSERT INTO catalog (house_id, device_id, info)
                 SELECT ?1, ?2, ?3 WHERE true AND (
                   EXISTS (SELECT 1 FROM catalog WHERE house_id = ?1 AND device_id = ?2)
                   OR (SELECT COUNT(*) FROM catalog WHERE house_id = ?1) < ?4)
                 ON CONFLICT (house_id, device_id) DO UPDATE SET info = excluded.info"
            }
        })?;
        for (house, key, info) in rows {
            put.execute(params![
                house,
                key,
                serde_json::to_string(info).unwrap_or_default(),
                i64::try_from(max).unwrap_or(i64::MAX)
            ])?;
        }
    }
    tx.commit()
}

/// Which of the two device tables.
#[derive(Debug, Clone, Copy)]
pub enum Infos {
    Devices,
    Catalog,
}

/// A house's rows of one device table: key → device.
pub fn infos(
    c: &mut rusqlite::Connection,
    table: Infos,
    house: &str,
) -> rusqlite::Result<std::collections::HashMap<String, crate::seam::DeviceInfo>> {
    let mut st = c.prepare_cached(match table {
        Infos::Devices => "SELECT sensor_id, info FROM devices WHERE house_id = ?1",
        Infos::Catalog => "SELECT device_id, info FROM catalog WHERE house_id = ?1",
    })?;
    let rows = st.query_map([house], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })?;
    let mut out = std::collections::HashMap::new();
    for row in rows {
        let (key, json) = row?;
        if let Ok(info) = serde_json::from_str(&json) {
            out.insert(key, info);
        }
    }
    Ok(out)
}

/// A client's last will, as the broker publishes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
}

/// What the last run left to the broker: wills to publish, persistent sessions to restore.
#[derive(Debug, Default)]
pub struct Left {
    pub wills: Vec<Will>,
    pub sessions: Vec<super::sessions::Stored>,
}

/// Retained messages (kept in memory too, for subscriptions), wills and persistent sessions
/// (`sessions.rs`).
pub struct Kept {
    writer: Sqlite,
    pub sessions: super::sessions::Sessions,
    retained: Mutex<BTreeMap<String, Bytes>>,
    max_count: usize,
    max_bytes: usize,
}

impl Kept {
    /// Read the retained messages in; the wills left by the last run are returned, to publish,
    /// and the persistent sessions, to restore.
    pub async fn open(
        writer: Sqlite,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<(Kept, Left), Unavailable> {
        let (retained, left) = writer
            .call(|c| {
                let mut st = c.prepare("SELECT topic, payload FROM retained")?;
                let retained = st
                    .query_map([], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                let mut st =
                    c.prepare("SELECT topic, payload, retain FROM wills ORDER BY at_us")?;
                let wills = st
                    .query_map([], |r| {
                        Ok(Will {
                            topic: r.get(0)?,
                            payload: Bytes::from(r.get::<_, Vec<u8>>(1)?),
                            retain: r.get(2)?,
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                let sessions = super::sessions::load(c)?;
                Ok((retained, Left { wills, sessions }))
            })
            .await?;
        let kept = Kept {
            sessions: super::sessions::Sessions::new(writer.clone()),
            writer,
            retained: Mutex::new(
                retained
                    .into_iter()
                    .map(|(t, p)| (t, Bytes::from(p)))
                    .collect(),
            ),
            max_count,
            max_bytes,
        };
        Ok((kept, left))
    }

    /// Keep `updates` (topic, payload; an empty payload removes the topic's message) on disk,
    /// then in memory. One past the bounds is not kept (and counted).
    pub async fn retain(&self, updates: Vec<(String, Bytes)>) -> Result<(), Unavailable> {
        let mut admitted = Vec::with_capacity(updates.len());
        if let Ok(held) = self.retained.lock() {
            let mut count = held.len();
            let mut bytes: usize = held.iter().map(|(t, p)| t.len() + p.len()).sum();
            for (topic, payload) in updates {
                let old = held.get(&topic).map(|p| topic.len() + p.len());
                let new = (!payload.is_empty()).then(|| topic.len() + payload.len());
                let count_after = count - usize::from(old.is_some()) + usize::from(new.is_some());
                let bytes_after = bytes - old.unwrap_or(0) + new.unwrap_or(0);
                if new.is_some() && (count_after > self.max_count || bytes_after > self.max_bytes) {
                    METRICS.mqtt_refused.with("retained_full").add(1);
                    continue;
                }
                (count, bytes) = (count_after, bytes_after);
                admitted.push((topic, payload));
            }
        }
        if admitted.is_empty() {
            return Ok(());
        }
        let rows = admitted.clone();
        self.writer
            .call(move |c| {
                put_or_remove(
                    c,
                    Topics::Retained,
                    rows.iter().map(|(t, p)| (t, p.as_ref())),
                )
            })
            .await?;
        if let Ok(mut held) = self.retained.lock() {
            for (topic, payload) in admitted {
                match payload.is_empty() {
                    true => held.remove(&topic),
                    false => held.insert(topic, payload),
                };
            }
        }
        Ok(())
    }

    /// The retained messages a new subscription to `filter` receives.
    pub fn matching(&self, filter: &str) -> Vec<(String, Bytes)> {
        self.retained
            .lock()
            .map(|held| {
                held.iter()
                    .filter(|(t, _)| matches(filter, t))
                    .map(|(t, p)| (t.clone(), p.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Keep a connected session's will until it ends.
    pub async fn set_will(&self, session: &str, will: &Will) -> Result<(), Unavailable> {
        let (session, will) = (session.to_string(), will.clone());
        self.writer
            .call(move |c| {
                c.execute(
                    "INSERT INTO wills (session, topic, payload, retain, at_us) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        session,
                        will.topic,
                        will.payload.as_ref(),
                        will.retain,
                        crate::event::now_us()
                    ],
                )
                .map(|_| ())
            })
            .await
    }

    /// Forget a session's will (it disconnected, or its will was published).
    pub async fn clear_will(&self, session: &str) -> Result<(), Unavailable> {
        let session = session.to_string();
        self.writer
            .call(move |c| {
                c.execute("DELETE FROM wills WHERE session = ?1", [session])
                    .map(|_| ())
            })
            .await
    }

    /// Forget every will (those of the last run, once published).
    pub async fn clear_wills(&self) -> Result<(), Unavailable> {
        self.writer
            .call(|c| c.execute("DELETE FROM wills", []).map(|_| ()))
            .await
    }
}
