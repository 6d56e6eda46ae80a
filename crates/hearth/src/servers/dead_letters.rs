//! The dead letters on Redis (`P:dead`): written (beside an append or an acknowledgement),
//! held to their retention, listed, replayed through the normal path, purged.

use super::keys::Group;
use super::queue::{Queue, QueueError, xadd_letter};
use super::stream::RawEntry;
use super::txn::Txn;
use crate::codec::Codecs;
use crate::dead_letter::DeadLetter;
use crate::dlq::{Filter, Letter, Replayed, decode_again};
use crate::event::Event;
use crate::status::stat;

impl Queue {
    /// Remove the dead letters past their retention (age and count); returns how many.
    pub async fn expire_dead_letters(&self) -> Result<u64, QueueError> {
        let now_ms = crate::event::now_us() as u64 / 1000;
        let min_id = match self.retention.max_age_ms {
            0 => 0,
            age => now_ms.saturating_sub(age),
        };
        let mut conn = self.conn.clone();
        let n: u64 = redis::cmd("EVAL")
            .arg(EXPIRE_DEAD)
            .arg(2)
            .arg(self.keys.dead())
            .arg(self.keys.stats())
            .arg(min_id)
            .arg(self.retention.max_count)
            .arg("=")
            .query_async(&mut conn)
            .await?;
        Ok(n)
    }

    /// Add to `pipe` dead letters a worker writes beside an acknowledgement (events it did not
    /// store: past a cap), and the `events` they hold to the dead-lettered count.
    pub fn add_dead(&self, pipe: &mut redis::Pipeline, letters: &[DeadLetter], events: u64) {
        let dead = self.keys.dead();
        for letter in letters {
            xadd_letter(pipe, &dead, letter);
        }
        self.add_dead_cap(pipe, letters.len());
        if events > 0 {
            pipe.cmd("HINCRBY")
                .arg(self.keys.stats())
                .arg(stat::DEAD_LETTERED)
                .arg(events)
                .ignore();
        }
    }

    /// After `letters` new dead letters, hold the stream to its count (approximately: whole
    /// nodes of the stream, cheap), counting what goes.
    pub(super) fn add_dead_cap(&self, pipe: &mut redis::Pipeline, letters: usize) {
        if letters == 0 || self.retention.max_count == 0 {
            return;
        }
        pipe.cmd("EVAL")
            .arg(EXPIRE_DEAD)
            .arg(2)
            .arg(self.keys.dead())
            .arg(self.keys.stats())
            .arg(0)
            .arg(self.retention.max_count)
            .arg("~")
            .ignore();
    }

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
            // On a cluster the letter's removal comes after its events' lanes.
            let mut txn = Txn::new(&queue.keys);
            match letter.source.as_str() {
                "notifier" => {
                    let Some(alert) = letter.notification() else {
                        report.skipped += 1;
                        continue;
                    };
                    txn.on(Group::Global)
                        .cmd("XADD")
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
                    queue.add_append(&mut txn, &event_refs, &dead_refs)?;
                    report.events += events.len() as u64;
                    report.rejected_again += u64::from(!dead.is_empty());
                }
            }
            txn.on(Group::Global)
                .cmd("XDEL")
                .arg(queue.keys.dead())
                .arg(&letter.id)
                .ignore();
            txn.exec(&queue.conn).await?;
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

/// Trim the dead-letter stream below a minimum id (age; 0: none) and to a length (0: none),
/// exactly (`=`) or by whole nodes (`~`), and count what went in `dead_expired`.
///
/// KEYS: dead stream, stats. ARGV: min id (epoch ms), max length, `=` or `~`.
const EXPIRE_DEAD: &str = r#"
local n = 0
if tonumber(ARGV[1]) > 0 then
  n = n + redis.call('XTRIM', KEYS[1], 'MINID', ARGV[1])
end
if tonumber(ARGV[2]) > 0 then
  n = n + redis.call('XTRIM', KEYS[1], 'MAXLEN', ARGV[3], ARGV[2])
end
if n > 0 then
  redis.call('HINCRBY', KEYS[2], 'dead_expired', n)
end
return n
"#;
