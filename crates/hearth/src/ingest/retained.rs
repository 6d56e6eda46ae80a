//! The retained messages a shared subscription does not bring: a broker sends a topic's
//! retained message to a new ordinary subscription only, so when the ingest's sessions subscribe
//! through `$share/…`, slot 0 of each broker first reads them on a clean connection of its own
//! (QoS 0, nothing to acknowledge): the devices' and bridges' retained configs and states, as a
//! lone ingest would get them.

use std::time::Duration;

use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Disconnect, Packet, Subscribe, SubscribeFilter};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::Message;
use crate::intake::Intake;
use crate::mqtt::{self, Endpoint};

/// Quiet time after which the retained messages are taken to be all sent.
const QUIET: Duration = Duration::from_secs(1);
/// Longest the snapshot takes.
const LONGEST: Duration = Duration::from_secs(10);
/// Most retained messages read.
const MOST: usize = 100_000;

/// Read the retained messages of the ingest's topics and hand them to the appender.
pub async fn snapshot(
    endpoint: &Endpoint,
    intake: &Intake,
    slot: u32,
    tx: Option<&mpsc::Sender<Vec<Message>>>,
) {
    let Some(tx) = tx else { return };
    let mut ep = endpoint.clone();
    ep.client_id = format!("{}-retained", endpoint.client_id);
    ep.clean_session = true;
    let read = async {
        let (mut reader, mut writer, _) = mqtt::connect(&ep).await?;
        let topics = intake.codecs().subscriptions();
        let mut subscribe = Subscribe::new_many(
            topics
                .iter()
                .map(|t| SubscribeFilter::new(t.clone(), QoS::AtMostOnce)),
        );
        subscribe.pkid = 1;
        writer.queue(&subscribe)?;
        writer.flush().await?;
        let mut count = 0usize;
        loop {
            let packets = match tokio::time::timeout(QUIET, reader.packets()).await {
                Ok(p) => p?,
                Err(_) => break,
            };
            let mut messages = Vec::new();
            let mut live = false;
            for packet in packets {
                if let Packet::Publish(p) = packet {
                    if !p.retain {
                        // Live traffic, which the shared subscription brings: the retained
                        // ones came first.
                        live = true;
                        break;
                    }
                    messages.push(Message::new(
                        slot,
                        0,
                        0,
                        QoS::AtMostOnce,
                        intake.decode(&p.topic, &p.payload, crate::event::now_us()),
                    ));
                }
            }
            count += messages.len();
            if !messages.is_empty() && tx.send(messages).await.is_err() {
                break;
            }
            if live || count >= MOST {
                break;
            }
        }
        let _ = writer.queue(&Disconnect);
        let _ = writer.flush().await;
        Ok::<usize, mqtt::MqttError>(count)
    };
    match tokio::time::timeout(LONGEST, read).await {
        Ok(Ok(n)) => info!(
            retained = n,
            "read the retained messages apart from the shared subscription"
        ),
        Ok(Err(e)) => warn!(error = %e, "could not read the retained messages"),
        Err(_) => warn!("the retained messages took too long to read; going on"),
    }
}
