//! A client's packets while its house owes publishes (past `mqtt_publishes_per_second`): the
//! acknowledgements of what it was sent, its pings and its critical readings (a smoke alarm)
//! are handled at once; its other publishes, and whatever else it sent after the first of them,
//! wait in order until the pause is over.
//! Reading goes on while what waits is small, so that a client paused for another client of its
//! house keeps its keep-alive and its deliveries; past [`HOLD_BYTES`] it stops, and TCP slows
//! the client down.

use std::time::Duration;

use rumqttc::mqttbytes::v4::{Packet, Publish};
use tokio::time::Instant;

/// Bytes of packets held before reading stops.
const HOLD_BYTES: usize = 64 * 1024;

#[derive(Default)]
pub(super) struct Throttle {
    until: Option<Instant>,
    held: Vec<Packet>,
    bytes: usize,
}

impl Throttle {
    /// Of the packets just read, those to handle now (all of them, unless paused; then the
    /// acknowledgements, pings, and publishes `critical` says are).
    pub(super) fn sort(
        &mut self,
        packets: Vec<Packet>,
        critical: impl Fn(&Publish) -> bool,
    ) -> Vec<Packet> {
        if self.until.is_none() {
            return packets;
        }
        let mut now = Vec::new();
        for p in packets {
            match p {
                Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) | Packet::PingReq => {
                    now.push(p)
                }
                Packet::Publish(ref publish) if critical(publish) => now.push(p),
                p => {
                    self.bytes += match &p {
                        Packet::Publish(p) => p.topic.len() + p.payload.len(),
                        _ => 16,
                    };
                    self.held.push(p);
                }
            }
        }
        now
    }

    /// Hold the publishes read from now on for `owed`.
    pub(super) fn pause(&mut self, owed: Duration) {
        self.until = Some(Instant::now() + owed);
    }

    /// Until when it is paused.
    pub(super) fn until(&self) -> Option<Instant> {
        self.until
    }

    /// Whether the client may be read: what waits is small.
    pub(super) fn may_read(&self) -> bool {
        self.bytes < HOLD_BYTES
    }

    /// The pause is over: what was held, in the order it came.
    pub(super) fn resume(&mut self) -> Vec<Packet> {
        self.until = None;
        self.bytes = 0;
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::QoS;
    use rumqttc::mqttbytes::v4::PubAck;

    #[test]
    fn paused_publishes_wait_and_acks_and_pings_do_not() {
        let publish =
            || Packet::Publish(Publish::new("hearth/h1/s", QoS::AtLeastOnce, vec![0; 100]));
        let smoke = Packet::Publish(Publish::new("hearth/h1/smoke", QoS::AtLeastOnce, vec![1]));
        let critical = |p: &Publish| p.topic.ends_with("smoke");
        let mut t = Throttle::default();
        assert_eq!(
            t.sort(vec![publish()], critical).len(),
            1,
            "not paused: all at once"
        );
        t.pause(Duration::from_secs(1));
        let now = t.sort(
            vec![
                publish(),
                Packet::PubAck(PubAck::new(1)),
                Packet::Disconnect,
                smoke.clone(),
                Packet::PingReq,
            ],
            critical,
        );
        assert_eq!(
            now,
            vec![Packet::PubAck(PubAck::new(1)), smoke, Packet::PingReq]
        );
        assert!(t.may_read());
        for _ in 0..700 {
            t.sort(vec![publish()], critical);
        }
        assert!(!t.may_read(), "past 64 KiB held");
        let held = t.resume();
        assert_eq!(held.len(), 702);
        assert_eq!(held[1], Packet::Disconnect, "in the order it came");
        assert!(t.until().is_none() && t.may_read());
    }
}
