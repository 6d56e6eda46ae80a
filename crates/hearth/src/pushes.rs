//! A subscription to the fan-out that misses no alert push: where the backend's subscription
//! has a gap ([`Pushed::Gap`]: it was lost and made again, or fell behind), the alert pushes
//! numbered since the last one passed on are read back from the fan-out's log
//! ([`FanOut::alerts_since`]) and passed on first; when they are no longer kept (or cannot be
//! read now), [`RESYNC`] is passed on instead, and the reader re-reads the alerts. Events are
//! pushed live only: those of a gap are not made up for (the latest values are in the cache).
//!
//! Used by every reader of the pushes: the API's WebSocket hub and the MQTT alert feeds.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::alerts::RESYNC;
use crate::seam::{FanOut, Pushed, Unavailable};

/// Messages a reader may fall behind by (the backend's subscription holds as many again).
const BACKLOG: usize = 4096;

/// The `seq` of an alert push (its JSON starts with it), none for any other message.
pub fn seq_of(message: &str) -> Option<u64> {
    let rest = message.strip_prefix(r#"{"seq":"#)?;
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..digits].parse().ok()
}

/// Every message published from now on, in order, each alert push once.
pub async fn subscribe(fanout: Arc<dyn FanOut>) -> Result<mpsc::Receiver<String>, Unavailable> {
    // The last number before subscribing: what is pushed between the two is read back first
    // (and comes live too, then skipped).
    let mut last = fanout.alerts_pushed().await?;
    let mut pushed = fanout.subscribe().await?;
    let (tx, rx) = mpsc::channel(BACKLOG);
    tokio::spawn(async move {
        // The first catch-up reads back what came between the two calls above.
        let mut incoming = Pushed::Gap;
        loop {
            let messages = match incoming {
                Pushed::Message(m) => vec![m],
                Pushed::Gap => match fanout.alerts_since(last).await {
                    Ok(Some(kept)) => kept,
                    Ok(None) | Err(_) => {
                        tracing::warn!(since = last, "alert pushes missed: readers resync");
                        vec![RESYNC.to_string()]
                    }
                },
            };
            for message in messages {
                match seq_of(&message) {
                    Some(seq) if seq <= last => continue,
                    Some(seq) => last = seq,
                    None => {}
                }
                if tx.send(message).await.is_err() {
                    return;
                }
            }
            match pushed.recv().await {
                Some(p) => incoming = p,
                None => return,
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_alert_push_is_known_by_its_leading_seq() {
        assert_eq!(seq_of(r#"{"seq":42,"type":"alert"}"#), Some(42));
        assert_eq!(seq_of(r#"{"type":"events","seq":42}"#), None);
        assert_eq!(seq_of(RESYNC), None);
    }
}
