//! The dead letters on Redis (`P:dead`): listed, replayed through the normal path, purged.

use super::queue::{Queue, QueueError};
use super::stream::RawEntry;
use crate::codec::Codecs;
use crate::dead_letter::DeadLetter;
use crate::dlq::{Filter, Letter, Replayed, decode_again};
use crate::event::Event;

impl Queue {
    /// The letters `filter` selects, oldest first.
    pub async fn dead_letters(&self, filter: &Filter) -> Result<Vec<Letter>, QueueError> {
        let queue = self;
        let key = queue.keys.dead();
        let now_ms = crate::event::now_us() / 1000;
        let limit = filter.limit.unwrap_or(usize::MAX);
        let mut out = Vec::new();
        let mut start = "-".to_string();
        loop {
            let mut conn = queue.conn.clone();
            let reply: redis::Value = redis::cmd("XRANGE")
                .arg(&key)
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(500)
                .query_async(&mut conn)
                .await?;
            let page = super::stream::parse_raw(reply)?;
            let Some(last) = page.last() else {
                return Ok(out);
            };
            start = format!("({}", last.id);
            for raw in page {
                let letter = letter(raw);
                if letter.matches(filter, now_ms) {
                    out.push(letter);
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
            }
        }
    }

    /// Remove the letters `filter` selects; returns how many.
    pub async fn purge(&self, filter: &Filter) -> Result<u64, QueueError> {
        let queue = self;
        let letters = queue.dead_letters(filter).await?;
        let mut removed = 0;
        for chunk in letters.chunks(500) {
            let mut cmd = redis::cmd("XDEL");
            cmd.arg(queue.keys.dead());
            for l in chunk {
                cmd.arg(&l.id);
            }
            let mut conn = queue.conn.clone();
            let n: u64 = cmd.query_async(&mut conn).await?;
            removed += n;
        }
        Ok(removed)
    }

    /// Replay the letters `filter` selects through the normal path.
    pub async fn replay(&self, codecs: &Codecs, filter: &Filter) -> Result<Replayed, QueueError> {
        let queue = self;
        let mut report = Replayed::default();
        queue.ensure_route().await?;
        for letter in queue.dead_letters(filter).await? {
            let received_us = crate::event::now_us();
            let mut pipe = redis::pipe();
            pipe.atomic();
            match letter.source.as_str() {
                "notifier" => {
                    let Some(alert) = letter.notification() else {
                        report.skipped += 1;
                        continue;
                    };
                    pipe.cmd("XADD")
                        .arg(queue.keys.notify())
                        .arg("*")
                        .arg("a")
                        .arg(alert.to_string())
                        .ignore();
                }
                source => {
                    let (events, dead) = decode_again(&letter, source, received_us, codecs);
                    if events.is_empty() && dead.is_empty() {
                        report.skipped += 1;
                        continue;
                    }
                    let event_refs: Vec<&Event> = events.iter().collect();
                    let dead_refs: Vec<&DeadLetter> = dead.iter().collect();
                    queue.add_append(&mut pipe, &event_refs, &dead_refs)?;
                    report.events += events.len() as u64;
                    report.rejected_again += u64::from(!dead.is_empty());
                }
            }
            pipe.cmd("XDEL")
                .arg(queue.keys.dead())
                .arg(&letter.id)
                .ignore();
            queue.exec(&pipe).await?;
            report.letters += 1;
        }
        Ok(report)
    }
}

/// A letter as the dead-letter stream holds it.
fn letter(raw: RawEntry) -> Letter {
    let text = |name: &str| {
        raw.field(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    let payload = raw.field("payload").map(<[u8]>::to_vec).unwrap_or_default();
    Letter::new(
        raw.id.clone(),
        text("reason"),
        text("detail"),
        text("topic"),
        text("source"),
        text("at").parse().unwrap_or(0),
        payload,
    )
}
