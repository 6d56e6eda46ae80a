//! What a connection sends its client for its subscriptions: QoS 0 as it comes; QoS 1 and 2
//! through a window of [`WINDOW`] messages in flight (MQTT 3.1.1 §4.3), in order, each until its
//! PUBACK, or its PUBREC then PUBCOMP (between them the PUBREL is what is owed).
//!
//! A persistent session's messages have an outbox row, and their packet id follows from it, so a
//! message re-sent after a reconnect or a restart goes with the packet id it first had (§4.4);
//! the ones of a clean session take the next free id.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{PubRel, Publish};
use tokio::sync::mpsc;

use super::super::sessions::Waiting;
use super::super::topics::{Attached, Delivery};
use crate::mqtt::{MqttError, Writer};

/// Most QoS 1 and 2 messages in flight to one client (Mosquitto's default too).
pub const WINDOW: usize = 20;

/// A message sent and not acknowledged yet.
struct InFlight {
    row: Option<i64>,
    qos: QoS,
    /// Its PUBREC came (QoS 2): the PUBREL went, the PUBCOMP is awaited.
    released: bool,
    size: usize,
}

/// One message to send, and whether it may have been sent before (DUP).
struct Next {
    delivery: Delivery,
    dup: bool,
    /// It was counted in the connection's queued bytes (it came through the channel).
    counted: bool,
}

/// What an acknowledgement from the client settles.
#[derive(Debug, Default)]
pub struct Settled {
    /// Rows delivered (gone from the outbox), and their bytes.
    pub done: Vec<i64>,
    pub bytes: usize,
    /// Rows whose PUBREC came (marked released before the PUBREL goes).
    pub released: Vec<i64>,
    /// PUBRELs to send.
    pub pubrels: Vec<u16>,
}

pub struct Outbound {
    rx: mpsc::UnboundedReceiver<Delivery>,
    queued: Arc<AtomicUsize>,
    inflight: HashMap<u16, InFlight>,
    next: VecDeque<Next>,
    next_pkid: u16,
    /// Rows up to this one were read from the outbox when the session resumed: the same rows
    /// arriving through the channel are already on their way.
    resumed_upto: i64,
}

impl Outbound {
    pub fn new(attached: &mut Attached) -> Outbound {
        let (_, empty) = mpsc::unbounded_channel();
        Outbound {
            rx: std::mem::replace(&mut attached.rx, empty),
            queued: attached.queued.clone(),
            inflight: HashMap::new(),
            next: VecDeque::new(),
            next_pkid: 0,
            resumed_upto: 0,
        }
    }

    /// The outbox of a resumed session, oldest first: a released message's PUBREL is sent
    /// again, the others are re-sent (DUP).
    pub fn resume(&mut self, waiting: Vec<Waiting>, writer: &mut Writer) -> Result<(), MqttError> {
        for w in waiting {
            self.resumed_upto = self.resumed_upto.max(w.row);
            if w.released {
                let pkid = pkid_of(w.row);
                writer.queue(&PubRel::new(pkid))?;
                self.inflight.insert(
                    pkid,
                    InFlight {
                        row: Some(w.row),
                        qos: QoS::ExactlyOnce,
                        released: true,
                        size: w.topic.len() + w.payload.len(),
                    },
                );
                continue;
            }
            self.next.push_back(Next {
                delivery: Delivery {
                    topic: w.topic,
                    payload: w.payload,
                    qos: w.qos,
                    row: Some(w.row),
                },
                dup: true,
                counted: false,
            });
        }
        self.fill(writer)
    }

    /// The next delivery from the broker (none: the broker cut this connection off).
    pub async fn recv(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }

    /// Take a delivery, and those behind it already there; write what the window has room for.
    pub fn take(&mut self, first: Delivery, writer: &mut Writer) -> Result<(), MqttError> {
        let mut delivery = Some(first);
        while let Some(d) = delivery {
            if d.row.is_some_and(|row| row <= self.resumed_upto) {
                self.queued.fetch_sub(d.size(), Ordering::Relaxed);
            } else {
                self.next.push_back(Next {
                    delivery: d,
                    dup: false,
                    counted: true,
                });
            }
            delivery = self.rx.try_recv().ok();
        }
        self.fill(writer)
    }

    /// Write messages in order while the window has room.
    pub fn fill(&mut self, writer: &mut Writer) -> Result<(), MqttError> {
        while let Some(n) = self.next.front() {
            let d = &n.delivery;
            let pkid = match d.qos {
                QoS::AtMostOnce => 0,
                _ if self.inflight.len() >= WINDOW => return Ok(()),
                _ => match d.row {
                    Some(row) => pkid_of(row),
                    None => self.free_pkid(),
                },
            };
            // A row's packet id still in flight (ids wrap at 65,535): wait for its ack.
            if pkid != 0 && self.inflight.contains_key(&pkid) {
                return Ok(());
            }
            let Some(n) = self.next.pop_front() else {
                return Ok(());
            };
            let d = n.delivery;
            let size = d.size();
            if n.counted {
                self.queued.fetch_sub(size, Ordering::Relaxed);
            }
            let mut publish = Publish::from_bytes(d.topic, d.qos, d.payload);
            publish.pkid = pkid;
            publish.dup = n.dup && d.qos != QoS::AtMostOnce;
            writer.queue(&publish)?;
            if d.qos != QoS::AtMostOnce {
                self.inflight.insert(
                    pkid,
                    InFlight {
                        row: d.row,
                        qos: d.qos,
                        released: false,
                        size,
                    },
                );
            }
        }
        Ok(())
    }

    /// The client's PUBACK (QoS 1) or PUBCOMP (QoS 2) for `pkid`.
    pub fn completed(&mut self, pkid: u16, settled: &mut Settled) {
        // A PUBCOMP before the PUBREC, or a PUBACK for a QoS 2 message, settles nothing.
        if let Entry::Occupied(f) = self.inflight.entry(pkid)
            && (f.get().qos == QoS::AtLeastOnce || f.get().released)
        {
            let f = f.remove();
            settled.bytes += f.size;
            settled.done.extend(f.row);
        }
    }

    /// The client's PUBREC for `pkid` (QoS 2): the PUBREL is owed (again, if it was lost).
    pub fn received(&mut self, pkid: u16, settled: &mut Settled) {
        if let Some(f) = self.inflight.get_mut(&pkid)
            && f.qos == QoS::ExactlyOnce
        {
            if !f.released {
                f.released = true;
                settled.released.extend(f.row);
            }
            settled.pubrels.push(pkid);
        }
    }

    fn free_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            if !self.inflight.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }
}

/// The packet id of an outbox row's message: 1..=65,535, the same at every (re)send.
fn pkid_of(row: i64) -> u16 {
    (row.rem_euclid(65_535) + 1) as u16
}
