//! The embedded broker's persistent sessions, in the SQLite file (MQTT 3.1.1 §3.1.2.4, §4.4): a
//! client that connects with clean session off keeps its subscriptions and the QoS 1 and 2
//! messages meant for it (while it is away, and those it has not acknowledged yet) across its
//! absences and across a kill -9 of hearth.
//!
//! Each write comes before the packet that depends on it: a session before its CONNACK, a
//! subscription before its SUBACK, a message's outbox rows before the PUBACK of the PUBLISH that
//! brought it; a row goes when its client acknowledges it (PUBACK, or PUBCOMP after the PUBREC
//! marked it released). A session started with clean session on forgets what was kept.

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use rusqlite::params;

use super::db::Sqlite;
use crate::seam::Unavailable;

/// A persistent session as kept: its subscriptions, and the size of its outbox.
#[derive(Debug, Clone, Default)]
pub struct Stored {
    pub client_id: String,
    pub filters: Vec<(String, QoS)>,
    pub waiting: usize,
    pub waiting_bytes: usize,
}

/// A message waiting in a session's outbox.
#[derive(Debug, Clone)]
pub struct Waiting {
    pub row: i64,
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    /// Its PUBREC came: what is left is the PUBREL.
    pub released: bool,
}

/// A message to put in a session's outbox.
#[derive(Debug, Clone)]
pub struct Enqueue {
    pub client_id: String,
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
}

pub fn qos_of(n: i64) -> QoS {
    match n {
        2 => QoS::ExactlyOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::AtMostOnce,
    }
}

/// Every persistent session, read at start.
pub fn load(c: &rusqlite::Connection) -> rusqlite::Result<Vec<Stored>> {
    let mut sessions: std::collections::BTreeMap<String, Stored> = c
        .prepare("SELECT client_id FROM mqtt_sessions")?
        .query_map([], |r| r.get::<_, String>(0))?
        .map(|id| {
            id.map(|id| {
                let s = Stored {
                    client_id: id.clone(),
                    ..Stored::default()
                };
                (id, s)
            })
        })
        .collect::<rusqlite::Result<_>>()?;
    let mut st = c.prepare("SELECT client_id, filter, qos FROM mqtt_subscriptions")?;
    let subs = st.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    for sub in subs {
        let (id, filter, qos) = sub?;
        if let Some(s) = sessions.get_mut(&id) {
            s.filters.push((filter, qos_of(qos)));
        }
    }
    let mut st = c.prepare(
        "SELECT client_id, COUNT(*), COALESCE(SUM(LENGTH(topic) + LENGTH(payload)), 0)
         FROM mqtt_outbox GROUP BY client_id",
    )?;
    let sizes = st.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    for size in sizes {
        let (id, n, bytes) = size?;
        if let Some(s) = sessions.get_mut(&id) {
            s.waiting = usize::try_from(n).unwrap_or(0);
            s.waiting_bytes = usize::try_from(bytes).unwrap_or(0);
        }
    }
    Ok(sessions.into_values().collect())
}

/// The persistent sessions' rows, written on the broker's SQLite writer.
#[derive(Clone)]
pub struct Sessions {
    writer: Sqlite,
}

impl Sessions {
    pub fn new(writer: Sqlite) -> Sessions {
        Sessions { writer }
    }

    /// Start a persistent session for `client_id`, or (`persistent` false) forget the one it had.
    pub async fn start(&self, client_id: &str, persistent: bool) -> Result<(), Unavailable> {
        let id = client_id.to_string();
        self.writer
            .call(move |c| {
                let tx = c.transaction()?;
                tx.execute("DELETE FROM mqtt_sessions WHERE client_id = ?1", [&id])?;
                tx.execute("DELETE FROM mqtt_subscriptions WHERE client_id = ?1", [&id])?;
                tx.execute("DELETE FROM mqtt_outbox WHERE client_id = ?1", [&id])?;
                if persistent {
                    tx.execute(
                        "INSERT INTO mqtt_sessions (client_id, at_us) VALUES (?1, ?2)",
                        params![id, crate::event::now_us()],
                    )?;
                }
                tx.commit()
            })
            .await
    }

    /// Keep a session's new subscriptions (filter, granted QoS) and forget the `removed` ones.
    pub async fn subscriptions(
        &self,
        client_id: &str,
        added: Vec<(String, QoS)>,
        removed: Vec<String>,
    ) -> Result<(), Unavailable> {
        let id = client_id.to_string();
        self.writer
            .call(move |c| {
                let tx = c.transaction()?;
                {
                    let mut put = tx.prepare_cached(
                        "INSERT INTO mqtt_subscriptions (client_id, filter, qos) VALUES (?1, ?2, ?3)
                         ON CONFLICT (client_id, filter) DO UPDATE SET qos = excluded.qos",
                    )?;
                    for (filter, qos) in &added {
                        put.execute(params![id, filter, *qos as i64])?;
                    }
                    let mut remove = tx.prepare_cached(
                        "DELETE FROM mqtt_subscriptions WHERE client_id = ?1 AND filter = ?2",
                    )?;
                    for filter in &removed {
                        remove.execute(params![id, filter])?;
                    }
                }
                tx.commit()
            })
            .await
    }

    /// Put messages in their sessions' outboxes, in one transaction: their rows, in order.
    pub async fn enqueue(&self, messages: Vec<Enqueue>) -> Result<Vec<i64>, Unavailable> {
        self.writer
            .call(move |c| {
                let tx = c.transaction()?;
                let mut rows = Vec::with_capacity(messages.len());
                {
                    let mut put = tx.prepare_cached(
                        "INSERT INTO mqtt_outbox (client_id, topic, payload, qos) VALUES (?1, ?2, ?3, ?4)",
                    )?;
                    for m in &messages {
                        put.execute(params![m.client_id, m.topic, m.payload.as_ref(), m.qos as i64])?;
                        rows.push(tx.last_insert_rowid());
                    }
                }
                tx.commit()?;
                Ok(rows)
            })
            .await
    }

    /// A session's outbox, oldest first.
    pub async fn waiting(&self, client_id: &str) -> Result<Vec<Waiting>, Unavailable> {
        let id = client_id.to_string();
        self.writer
            .call(move |c| {
                let mut st = c.prepare_cached(
                    "SELECT id, topic, payload, qos, released FROM mqtt_outbox
                     WHERE client_id = ?1 ORDER BY id",
                )?;
                st.query_map([id], |r| {
                    Ok(Waiting {
                        row: r.get(0)?,
                        topic: r.get(1)?,
                        payload: Bytes::from(r.get::<_, Vec<u8>>(2)?),
                        qos: qos_of(r.get(3)?),
                        released: r.get(4)?,
                    })
                })?
                .collect()
            })
            .await
    }

    /// Rows acknowledged by their client (`done`: gone) or half-way (`released`: PUBREC came).
    pub async fn delivered(&self, done: Vec<i64>, released: Vec<i64>) -> Result<(), Unavailable> {
        if done.is_empty() && released.is_empty() {
            return Ok(());
        }
        self.writer
            .call(move |c| {
                let tx = c.transaction()?;
                {
                    let mut remove = tx.prepare_cached("DELETE FROM mqtt_outbox WHERE id = ?1")?;
                    for row in &done {
                        remove.execute([row])?;
                    }
                    let mut release =
                        tx.prepare_cached("UPDATE mqtt_outbox SET released = 1 WHERE id = ?1")?;
                    for row in &released {
                        release.execute([row])?;
                    }
                }
                tx.commit()
            })
            .await
    }
}
