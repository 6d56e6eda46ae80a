//! What a WebSocket client may send on an open socket, and how much: `subscribe` and
//! `unsubscribe` ([`request`]: at most [`MAX_SUBSCRIPTIONS`], each house checked against the
//! client's token), within an [`Allowance`] of messages (a burst, then a steady rate) that a
//! client past it is disconnected for.

use std::time::Instant;

use serde::Deserialize;

use super::auth::Principal;

/// What a client listens to.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    /// `None`: every house (admin only).
    pub house: Option<String>,
    pub events: bool,
    pub alerts: bool,
}

impl Subscription {
    pub(crate) fn wants(&self, kind: &str, house: &str) -> bool {
        let wanted = match kind {
            "alert" => self.alerts,
            _ => self.events,
        };
        wanted && self.house.as_deref().is_none_or(|h| h == house)
    }
}

/// Subscriptions one socket may hold.
pub const MAX_SUBSCRIPTIONS: usize = 32;

/// Messages (of any kind: text, binary, ping, pong) a client may send at once: room to subscribe
/// to every house it may hold, twice over.
pub const INBOUND_BURST: f64 = 2.0 * MAX_SUBSCRIPTIONS as f64;

/// Messages a client may send per second once its burst is spent. Each `subscribe` is a write
/// to the fan-out (`P:watched` on the servers): without a bound one client could make the
/// process write as fast as it can send.
pub const INBOUND_PER_SECOND: f64 = 10.0;

/// A client's messages left: a token bucket of [`INBOUND_BURST`] refilled at
/// [`INBOUND_PER_SECOND`].
pub struct Allowance {
    left: f64,
    at: Instant,
}

impl Default for Allowance {
    fn default() -> Allowance {
        Allowance {
            left: INBOUND_BURST,
            at: Instant::now(),
        }
    }
}

impl Allowance {
    /// Spend one message; `false` when none is left.
    pub fn take(&mut self) -> bool {
        self.take_at(Instant::now())
    }

    fn take_at(&mut self, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * INBOUND_PER_SECOND;
        self.left = (self.left + refill).min(INBOUND_BURST);
        self.at = now;
        if self.left < 1.0 {
            return false;
        }
        self.left -= 1.0;
        true
    }
}

/// What a client may send on an open socket.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum Request {
    Subscribe {
        house: Option<String>,
        #[serde(default = "yes")]
        events: bool,
        #[serde(default = "yes")]
        alerts: bool,
    },
    Unsubscribe {
        house: Option<String>,
    },
}

fn yes() -> bool {
    true
}

/// A client's `subscribe` or `unsubscribe`, applied to `subs`; the answer to send it.
/// The answer, and the subscription added (for the hub to advertise).
pub(crate) fn request(
    who: &Principal,
    subs: &mut Vec<Subscription>,
    text: &str,
) -> (serde_json::Value, Option<Subscription>) {
    let error = |message: String| (serde_json::json!({"type": "error", "error": message}), None);
    let request = match serde_json::from_str::<Request>(text) {
        Ok(r) => r,
        Err(e) => return error(format!("not a subscribe or unsubscribe request: {e}")),
    };
    let house_of = |house: Option<String>| -> Result<Option<String>, String> {
        match (house, who) {
            (Some(h), _) => {
                if !crate::event::is_valid_id(&h) {
                    return Err("house must match [A-Za-z0-9_.-]{1,64}".into());
                }
                who.check(&h).map_err(|e| e.to_string())?;
                Ok(Some(h))
            }
            (None, Principal::House(own)) => Ok(Some(own.clone())),
            (None, Principal::Admin) => Ok(None),
        }
    };
    match request {
        Request::Subscribe {
            house,
            events,
            alerts,
        } => {
            let house = match house_of(house) {
                Ok(h) => h,
                Err(e) => return error(e),
            };
            subs.retain(|s| s.house != house);
            if subs.len() >= MAX_SUBSCRIPTIONS {
                return error(format!("at most {MAX_SUBSCRIPTIONS} subscriptions"));
            }
            let sub = Subscription {
                house: house.clone(),
                events,
                alerts,
            };
            subs.push(sub.clone());
            let answer = serde_json::json!({"type": "subscribed", "house": house, "events": events, "alerts": alerts});
            (answer, Some(sub))
        }
        Request::Unsubscribe { house } => {
            let house = match house_of(house) {
                Ok(h) => h,
                Err(e) => return error(e),
            };
            subs.retain(|s| s.house != house);
            (
                serde_json::json!({"type": "unsubscribed", "house": house}),
                None,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_burst_then_the_steady_rate() {
        let mut allowance = Allowance::default();
        let start = allowance.at;
        let burst = (0..1000).take_while(|_| allowance.take_at(start)).count();
        assert_eq!(burst, INBOUND_BURST as usize);
        assert!(!allowance.take_at(start));
        // One second later: the rate's worth, no more.
        let later = start + Duration::from_secs(1);
        let more = (0..1000).take_while(|_| allowance.take_at(later)).count();
        assert_eq!(more, INBOUND_PER_SECOND as usize);
        // A long silence refills the burst, never beyond it.
        let much_later = later + Duration::from_secs(3600);
        let refilled = (0..1000)
            .take_while(|_| allowance.take_at(much_later))
            .count();
        assert_eq!(refilled, INBOUND_BURST as usize);
    }
}
