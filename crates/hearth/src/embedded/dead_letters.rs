//! The embedded dead letters (the `dead` table): held to their retention, listed, replayed
//! through the normal path, purged (the twin of the servers' `servers/dead_letters.rs`).

use super::db::bump;
use super::queue::{SqliteQueue, cap_dead, insert};
use crate::codec::Codecs;
use crate::dlq::{Filter, Letter, Replayed};
use crate::event::Event;
use crate::seam::Unavailable;
use crate::status::stat;

impl SqliteQueue {
    /// Remove the dead letters past their retention (age and count), counted in
    /// `dead_expired`; returns how many.
    pub async fn expire_dead_letters(&self) -> Result<u64, Unavailable> {
        let retention = self.retention;
        self.db
            .call(move |c| {
                let tx = c.transaction()?;
                let mut n = 0;
                if retention.max_age_ms > 0 {
                    let oldest = crate::event::now_us() / 1000 - retention.max_age_ms as i64;
                    n += tx.execute("DELETE FROM dead WHERE at < ?1", [oldest])? as u64;
                }
                n += cap_dead(&tx, retention.max_count)?;
                bump(&tx, stat::DEAD_EXPIRED, n)?;
                tx.commit()?;
                Ok(n)
            })
            .await
    }

    async fn all_letters(&self) -> Result<Vec<Letter>, Unavailable> {
        self.reader
            .call(|c| {
                let mut st = c.prepare_cached(
                    "SELECT id, reason, detail, topic, source, at, payload FROM dead ORDER BY id",
                )?;
                let rows = st.query_map([], |r| {
                    Ok(Letter::new(
                        r.get::<_, i64>(0)?.to_string(),
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    ))
                })?;
                rows.collect()
            })
            .await
    }

    /// The letters `filter` selects, oldest first.
    pub async fn letters(&self, filter: &Filter) -> Result<Vec<Letter>, Unavailable> {
        {
            let now_ms = crate::event::now_us() / 1000;
            Ok(self
                .all_letters()
                .await?
                .into_iter()
                .filter(|l| l.matches(filter, now_ms))
                .take(filter.limit.unwrap_or(usize::MAX))
                .collect())
        }
    }

    /// Decode the letters `filter` selects again and queue what they give; a webhook's letter
    /// goes back to the notifier.
    pub async fn replay_letters(
        &self,
        codecs: &Codecs,
        filter: &Filter,
    ) -> Result<Replayed, Unavailable> {
        {
            let mut report = Replayed::default();
            for letter in self.letters(filter).await? {
                let id: i64 = letter.id.parse().unwrap_or(-1);
                if letter.source == "notifier" {
                    // A webhook that failed: its notification is queued for the notifier again.
                    let Some(alert) = letter.notification() else {
                        report.skipped += 1;
                        continue;
                    };
                    self.db
                        .call(move |c| {
                            let tx = c.transaction()?;
                            tx.execute(
                                "INSERT INTO notify (alert) VALUES (?1)",
                                [alert.to_string()],
                            )?;
                            tx.execute("DELETE FROM dead WHERE id = ?1", [id])?;
                            tx.commit()
                        })
                        .await?;
                    report.letters += 1;
                    continue;
                }
                let received_us = crate::event::now_us();
                let (events, dead) =
                    crate::dlq::decode_again(&letter, &letter.source, received_us, codecs);
                if events.is_empty() && dead.is_empty() {
                    report.skipped += 1;
                    continue;
                }
                let refs: Vec<&Event> = events.iter().collect();
                let entries = self.entries(&refs)?;
                report.events += events.len() as u64;
                report.rejected_again += u64::from(!dead.is_empty());
                report.letters += 1;
                // The letter's events and its removal: one transaction.
                self.db
                    .call(move |c| {
                        let tx = c.transaction()?;
                        insert(&tx, &entries, &dead)?;
                        tx.execute("DELETE FROM dead WHERE id = ?1", [id])?;
                        tx.commit()
                    })
                    .await?;
                self.appended.notify_waiters();
            }
            Ok(report)
        }
    }

    /// Remove the letters `filter` selects; how many went.
    pub async fn purge_letters(&self, filter: &Filter) -> Result<u64, Unavailable> {
        {
            let ids: Vec<i64> = self
                .letters(filter)
                .await?
                .iter()
                .filter_map(|l| l.id.parse().ok())
                .collect();
            self.db
                .call(move |c| {
                    let tx = c.transaction()?;
                    let mut removed = 0;
                    for id in &ids {
                        removed += tx.execute("DELETE FROM dead WHERE id = ?1", [id])? as u64;
                    }
                    tx.commit()?;
                    Ok(removed)
                })
                .await
        }
    }
}
