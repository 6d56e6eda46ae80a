//! The embedded broker against the Eclipse Paho MQTT 3.1.1 interoperability client tests
//! (issue 13): the ten scenarios of `eclipse/paho.mqtt.testing`,
//! `interoperability/client_test.py` (read at commit be3ecc1), written here again in Rust on a
//! client that speaks packets, so that a test can hold back acknowledgements as theirs does
//! (`pause`). Same topics, same steps, same assertions; each scenario's comment names the one it
//! follows. The suite runs against hearth's embedded broker and, as the yardstick, against a
//! private Mosquitto started the same way: a scenario Mosquitto does not pass (the
//! configuration-dependent subscribe failure, with no access list) is not asked of hearth either,
//! and hearth's run of it uses its own way to refuse a subscription (a house login subscribing
//! to another house's topics).
//!
//! Also here: what Paho's suite does not reach, a persistent session's queued and unacknowledged
//! messages across a kill -9 of hearth.

mod support;

use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, LastWill, Login, Packet, PubAck, PubComp, PubRec, PubRel,
    Publish, Subscribe, SubscribeFilter, SubscribeReasonCode, Unsubscribe,
};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOPICS: [&str; 5] = ["TopicA", "TopicA/B", "Topic/C", "TopicA/C", "/TopicA"];
const WILDTOPICS: [&str; 7] = ["TopicA/+", "+/C", "#", "/#", "/+", "+/+", "TopicA/#"];
const MAX: usize = 2 * 1024 * 1024;

/// A message as a client saw it arrive.
#[derive(Debug, Clone)]
struct Got {
    topic: String,
    qos: QoS,
    retain: bool,
}

/// How a client connects.
#[derive(Clone, Default)]
struct Opts {
    clean: bool,
    keep_alive: u16,
    will: Option<(&'static str, &'static [u8])>,
    login: Option<(String, String)>,
}

fn clean() -> Opts {
    Opts {
        clean: true,
        keep_alive: 60,
        ..Opts::default()
    }
}

/// Keep-alive 0: the client asks for none.
fn no_keep_alive() -> Opts {
    Opts {
        keep_alive: 0,
        ..clean()
    }
}

fn kept() -> Opts {
    Opts {
        clean: false,
        ..clean()
    }
}

/// A client that speaks MQTT packets: it acknowledges what it receives (QoS 1: PUBACK; QoS 2:
/// PUBREC, then PUBCOMP on PUBREL) unless paused, when it neither records nor answers them.
struct Client {
    stream: TcpStream,
    buf: BytesMut,
    got: Vec<Got>,
    paused: bool,
    next_pkid: u16,
}

impl Client {
    async fn connect(port: u16, id: &str, opts: Opts) -> Result<(Client, ConnAck), String> {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let mut c = Client {
            stream,
            buf: BytesMut::new(),
            got: Vec::new(),
            paused: false,
            next_pkid: 0,
        };
        let mut connect = Connect::new(id);
        connect.clean_session = opts.clean;
        connect.keep_alive = opts.keep_alive;
        connect.last_will = opts
            .will
            .map(|(t, p)| LastWill::new(t, p.to_vec(), QoS::AtMostOnce, false));
        connect.login = opts.login.map(|(u, p)| Login::new(u, p));
        c.send(Packet::Connect(connect)).await;
        match c.read(Duration::from_secs(5)).await {
            Some(Packet::ConnAck(a)) if a.code == ConnectReturnCode::Success => Ok((c, a)),
            other => Err(format!("no successful CONNACK: {other:?}")),
        }
    }

    async fn send(&mut self, p: Packet) {
        let mut out = BytesMut::new();
        p.write(&mut out, MAX).expect("encode");
        let _ = self.stream.write_all(&out).await;
    }

    /// The next packet within `wait` (none: nothing came, or the connection ended).
    async fn read(&mut self, wait: Duration) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match Packet::read(&mut self.buf, MAX) {
                Ok(p) => return Some(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(_) => return None,
            }
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }

    /// Take packets for `wait`, answering publishes; stop early when `until` is true of one.
    async fn pump(&mut self, wait: Duration, until: impl Fn(&Packet) -> bool) -> Option<Packet> {
        let deadline = Instant::now() + wait;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let p = self.read(left).await?;
            match &p {
                Packet::Publish(m) if !self.paused => {
                    self.got.push(Got {
                        topic: m.topic.clone(),
                        qos: m.qos,
                        retain: m.retain,
                    });
                    match m.qos {
                        QoS::AtMostOnce => {}
                        QoS::AtLeastOnce => self.send(Packet::PubAck(PubAck::new(m.pkid))).await,
                        QoS::ExactlyOnce => self.send(Packet::PubRec(PubRec::new(m.pkid))).await,
                    }
                }
                Packet::PubRel(r) if !self.paused => {
                    self.send(Packet::PubComp(PubComp::new(r.pkid))).await
                }
                _ => {}
            }
            if until(&p) {
                return Some(p);
            }
        }
        None
    }

    async fn wait(&mut self, secs: f64) {
        self.pump(Duration::from_secs_f64(secs), |_| false).await;
    }

    fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
        self.next_pkid
    }

    async fn subscribe(&mut self, filters: &[(&str, QoS)]) -> Vec<SubscribeReasonCode> {
        let pkid = self.pkid();
        let mut s = Subscribe::new_many(
            filters
                .iter()
                .map(|(f, q)| SubscribeFilter::new(f.to_string(), *q)),
        );
        s.pkid = pkid;
        self.send(Packet::Subscribe(s)).await;
        match self
            .pump(
                Duration::from_secs(5),
                |p| matches!(p, Packet::SubAck(a) if a.pkid == pkid),
            )
            .await
        {
            Some(Packet::SubAck(a)) => a.return_codes,
            other => panic!("no SUBACK: {other:?}"),
        }
    }

    async fn unsubscribe(&mut self, filter: &str) {
        let pkid = self.pkid();
        let mut u = Unsubscribe::new(filter);
        u.pkid = pkid;
        self.send(Packet::Unsubscribe(u)).await;
        self.pump(
            Duration::from_secs(5),
            |p| matches!(p, Packet::UnsubAck(a) if a.pkid == pkid),
        )
        .await
        .expect("UNSUBACK");
    }

    /// Publish and finish the exchange (PUBACK; PUBREC, PUBREL, PUBCOMP).
    async fn publish(&mut self, topic: &str, payload: &[u8], qos: QoS, retain: bool) {
        let mut p = Publish::new(topic, qos, payload.to_vec());
        p.retain = retain;
        if qos != QoS::AtMostOnce {
            p.pkid = self.pkid();
        }
        let pkid = p.pkid;
        self.send(Packet::Publish(p)).await;
        let wait = Duration::from_secs(5);
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                self.pump(wait, |p| matches!(p, Packet::PubAck(a) if a.pkid == pkid))
                    .await
                    .expect("PUBACK");
            }
            QoS::ExactlyOnce => {
                self.pump(wait, |p| matches!(p, Packet::PubRec(a) if a.pkid == pkid))
                    .await
                    .expect("PUBREC");
                self.send(Packet::PubRel(PubRel::new(pkid))).await;
                self.pump(wait, |p| matches!(p, Packet::PubComp(a) if a.pkid == pkid))
                    .await
                    .expect("PUBCOMP");
            }
        }
    }

    async fn disconnect(mut self) -> Vec<Got> {
        self.send(Packet::Disconnect).await;
        self.wait(0.1).await;
        self.got
    }
}

/// Paho's `cleanup`: both client ids' sessions cleaned, every retained message removed.
async fn cleanup(port: u16) {
    for id in ["myclientid", "myclientid2"] {
        let (c, _) = Client::connect(port, id, clean()).await.expect("connect");
        c.disconnect().await;
    }
    let (mut c, _) = Client::connect(port, "clean retained", clean())
        .await
        .expect("connect");
    c.subscribe(&[("#", QoS::AtMostOnce)]).await;
    c.wait(2.0).await;
    let retained: Vec<String> = c
        .got
        .iter()
        .filter(|g| g.retain)
        .map(|g| g.topic.clone())
        .collect();
    for topic in retained {
        c.publish(&topic, b"", QoS::AtMostOnce, true).await;
    }
    c.disconnect().await;
}

/// `testBasic`: connect and disconnect; a session at QoS 2 gets its own three messages; a second
/// CONNECT on one socket and a wrong protocol name are refused.
async fn basic(port: u16) -> Result<(), String> {
    let (a, _) = Client::connect(port, "myclientid", clean()).await?;
    a.disconnect().await;
    let (mut a, ack) = Client::connect(port, "myclientid", clean()).await?;
    check(
        !ack.session_present,
        "session present after a clean connect",
    )?;
    a.subscribe(&[(TOPICS[0], QoS::ExactlyOnce)]).await;
    a.publish(TOPICS[0], b"qos 0", QoS::AtMostOnce, false).await;
    a.publish(TOPICS[0], b"qos 1", QoS::AtLeastOnce, false)
        .await;
    a.publish(TOPICS[0], b"qos 2", QoS::ExactlyOnce, false)
        .await;
    a.wait(2.0).await;
    let got = a.disconnect().await;
    check(got.len() == 3, &format!("3 messages, got {got:?}"))?;
    // A second CONNECT on the same socket: the connection ends.
    let (mut a, _) = Client::connect(port, "myclientid", clean()).await?;
    a.send(Packet::Connect(Connect::new("myclientid"))).await;
    let answered = a.read(Duration::from_secs(5)).await;
    check(
        !matches!(answered, Some(Packet::ConnAck(ref c)) if c.code == ConnectReturnCode::Success),
        "a second CONNECT accepted",
    )?;
    // Protocol name "hj": no successful CONNACK.
    let mut raw = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let body = [
        &[0x00, 0x02, b'h', b'j', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x01][..],
        b"x",
    ]
    .concat();
    let _ = raw
        .write_all(&[&[0x10, body.len() as u8][..], &body].concat())
        .await;
    let mut answer = [0u8; 4];
    let read = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut answer)).await;
    let accepted = matches!(read, Ok(Ok(4))) && answer[0] == 0x20 && answer[3] == 0;
    check(!accepted, "protocol name hj accepted")
}

/// `test_retained_messages`: three retained messages at QoS 0, 1, 2 reach a later subscriber;
/// once cleared (empty payloads), none does.
async fn retained_messages(port: u16) -> Result<(), String> {
    let (mut a, ack) = Client::connect(port, "myclientid", clean()).await?;
    check(!ack.session_present, "session present")?;
    a.publish(TOPICS[1], b"qos 0", QoS::AtMostOnce, true).await;
    a.publish(TOPICS[2], b"qos 1", QoS::AtLeastOnce, true).await;
    a.publish(TOPICS[3], b"qos 2", QoS::ExactlyOnce, true).await;
    a.wait(1.0).await;
    a.subscribe(&[(WILDTOPICS[5], QoS::ExactlyOnce)]).await;
    a.wait(1.0).await;
    let got = a.disconnect().await;
    check(got.len() == 3, &format!("3 retained messages, got {got:?}"))?;
    let (mut a, _) = Client::connect(port, "myclientid", clean()).await?;
    a.publish(TOPICS[1], b"", QoS::AtMostOnce, true).await;
    a.publish(TOPICS[2], b"", QoS::AtLeastOnce, true).await;
    a.publish(TOPICS[3], b"", QoS::ExactlyOnce, true).await;
    a.wait(1.0).await;
    a.subscribe(&[(WILDTOPICS[5], QoS::ExactlyOnce)]).await;
    a.wait(1.0).await;
    let got = a.disconnect().await;
    check(got.is_empty(), &format!("no retained message, got {got:?}"))
}

/// `test_zero_length_clientid`: refused with clean session off, accepted with it on.
async fn zero_length_clientid(port: u16) -> Result<(), String> {
    check(
        Client::connect(port, "", kept()).await.is_err(),
        "an empty client id kept a session",
    )?;
    let (c, _) = Client::connect(port, "", clean()).await?;
    c.disconnect().await;
    Ok(())
}

/// `test_offline_message_queueing`: a persistent session subscribed at QoS 2 gets, when it comes
/// back, the QoS 1 and 2 messages published while it was away (QoS 0 ones: the broker's choice).
async fn offline_message_queueing(port: u16) -> Result<(), String> {
    let (mut a, _) = Client::connect(port, "myclientid", kept()).await?;
    a.subscribe(&[(WILDTOPICS[5], QoS::ExactlyOnce)]).await;
    a.disconnect().await;
    let (mut b, ack) = Client::connect(port, "myclientid2", clean()).await?;
    check(!ack.session_present, "session present")?;
    b.publish(TOPICS[1], b"qos 0", QoS::AtMostOnce, false).await;
    b.publish(TOPICS[2], b"qos 1", QoS::AtLeastOnce, false)
        .await;
    b.publish(TOPICS[3], b"qos 2", QoS::ExactlyOnce, false)
        .await;
    b.wait(2.0).await;
    b.disconnect().await;
    let (mut a, ack) = Client::connect(port, "myclientid", kept()).await?;
    check(ack.session_present, "no session present")?;
    a.wait(2.0).await;
    let got = a.disconnect().await;
    check(
        got.len() == 2 || got.len() == 3,
        &format!("2 or 3 messages, got {got:?}"),
    )
}

/// `test_overlapping_subscriptions`: one message at the highest QoS, or one per subscription.
async fn overlapping_subscriptions(port: u16) -> Result<(), String> {
    let (mut a, _) = Client::connect(port, "myclientid", clean()).await?;
    a.subscribe(&[
        (WILDTOPICS[6], QoS::ExactlyOnce),
        (WILDTOPICS[0], QoS::AtLeastOnce),
    ])
    .await;
    a.publish(
        TOPICS[3],
        b"overlapping topic filters",
        QoS::ExactlyOnce,
        false,
    )
    .await;
    a.wait(1.0).await;
    let got = a.disconnect().await;
    let qos: Vec<QoS> = got.iter().map(|g| g.qos).collect();
    check(
        qos == [QoS::ExactlyOnce]
            || qos == [QoS::ExactlyOnce, QoS::AtLeastOnce]
            || qos == [QoS::AtLeastOnce, QoS::ExactlyOnce],
        &format!("one message at QoS 2, or one per subscription: {got:?}"),
    )
}

/// `test_keepalive`: a client silent past 1.5 × its keep-alive (5 s) is cut off, and its will
/// published.
async fn keepalive(port: u16) -> Result<(), String> {
    let opts = Opts {
        keep_alive: 5,
        will: Some((TOPICS[4], b"keepalive expiry")),
        ..clean()
    };
    let (_a, _) = Client::connect(port, "myclientid", opts).await?;
    let (mut b, _) = Client::connect(port, "myclientid2", no_keep_alive()).await?;
    b.subscribe(&[(TOPICS[4], QoS::ExactlyOnce)]).await;
    b.wait(15.0).await;
    let got = b.disconnect().await;
    check(got.len() == 1, &format!("the will, got {got:?}"))
}

/// `test_redelivery_on_reconnect`: messages a persistent session did not acknowledge are sent
/// again when it reconnects.
async fn redelivery_on_reconnect(port: u16) -> Result<(), String> {
    let (mut b, _) = Client::connect(port, "myclientid2", kept()).await?;
    b.subscribe(&[(WILDTOPICS[6], QoS::ExactlyOnce)]).await;
    b.paused = true;
    b.publish(TOPICS[1], b"", QoS::AtLeastOnce, false).await;
    b.publish(TOPICS[3], b"", QoS::ExactlyOnce, false).await;
    b.wait(1.0).await;
    let got = b.disconnect().await;
    check(
        got.is_empty(),
        &format!("nothing taken while paused: {got:?}"),
    )?;
    let (mut b, _) = Client::connect(port, "myclientid2", kept()).await?;
    b.wait(3.0).await;
    let got = b.disconnect().await;
    check(got.len() == 2, &format!("2 messages again, got {got:?}"))
}

/// `test_subscribe_failure`: a filter the client may not subscribe to is refused (0x80).
async fn subscribe_failure(port: u16, refused: &(Opts, String)) -> Result<(), String> {
    let (mut a, _) = Client::connect(port, "myclientid", refused.0.clone()).await?;
    let codes = a.subscribe(&[(&refused.1, QoS::ExactlyOnce)]).await;
    a.disconnect().await;
    check(
        codes == [SubscribeReasonCode::Failure],
        &format!("0x80, got {codes:?}"),
    )
}

/// `test_dollar_topics`: `+/+` does not match a topic starting with `$`.
async fn dollar_topics(port: u16) -> Result<(), String> {
    let (mut b, _) = Client::connect(port, "myclientid2", no_keep_alive()).await?;
    b.subscribe(&[(WILDTOPICS[5], QoS::ExactlyOnce)]).await;
    b.wait(1.0).await;
    b.got.clear();
    b.publish(&format!("${}", TOPICS[1]), b"", QoS::AtLeastOnce, false)
        .await;
    b.wait(0.2).await;
    let got = b.disconnect().await;
    check(got.is_empty(), &format!("no message, got {got:?}"))
}

/// `test_unsubscribe`: after unsubscribing one of three topics, two messages of three arrive.
async fn unsubscribe(port: u16) -> Result<(), String> {
    let (mut b, _) = Client::connect(port, "myclientid2", clean()).await?;
    for t in &TOPICS[..3] {
        b.subscribe(&[(t, QoS::ExactlyOnce)]).await;
    }
    b.wait(1.0).await;
    b.unsubscribe(TOPICS[0]).await;
    let (mut a, _) = Client::connect(port, "myclientid", clean()).await?;
    for t in &TOPICS[..3] {
        a.publish(t, b"", QoS::AtLeastOnce, false).await;
    }
    b.wait(2.0).await;
    let got = b.disconnect().await;
    a.disconnect().await;
    check(got.len() == 2, &format!("2 messages, got {got:?}"))
}

fn check(ok: bool, what: &str) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what.to_string()) }
}

/// The ten scenarios in Paho's order (unittest's: by name), after its cleanup; each one's
/// outcome. `refused`: how a subscription is refused on this broker, if it can be.
async fn suite(
    port: u16,
    refused: Option<(Opts, String)>,
) -> Vec<(&'static str, Result<(), String>)> {
    cleanup(port).await;
    let mut out = vec![
        ("testBasic", basic(port).await),
        ("test_dollar_topics", dollar_topics(port).await),
        ("test_keepalive", keepalive(port).await),
        (
            "test_offline_message_queueing",
            offline_message_queueing(port).await,
        ),
        (
            "test_overlapping_subscriptions",
            overlapping_subscriptions(port).await,
        ),
        (
            "test_redelivery_on_reconnect",
            redelivery_on_reconnect(port).await,
        ),
        ("test_retained_messages", retained_messages(port).await),
    ];
    let failure = match &refused {
        Some(r) => subscribe_failure(port, r).await,
        None => Err("no way to refuse a subscription configured".into()),
    };
    out.push(("test_subscribe_failure", failure));
    out.push(("test_unsubscribe", unsubscribe(port).await));
    out.push((
        "test_zero_length_clientid",
        zero_length_clientid(port).await,
    ));
    for (name, outcome) in &out {
        eprintln!("{name}: {outcome:?}");
    }
    out
}

fn failed(outcomes: &[(&'static str, Result<(), String>)]) -> Vec<&'static str> {
    outcomes
        .iter()
        .filter(|(_, o)| o.is_err())
        .map(|(n, _)| *n)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_client_tests_pass_against_the_embedded_broker() {
    let env = Env::embedded("interop");
    let port = env.embedded_port.unwrap();
    let _up = env.up().await;
    // A house's login may subscribe to its own topics only.
    let token = token_for(&env, "h1");
    let house = Opts {
        login: Some(("h1".into(), token)),
        ..clean()
    };
    let outcomes = suite(port, Some((house, "hearth/h2/#".into()))).await;
    assert_eq!(failed(&outcomes), Vec::<&str>::new(), "{outcomes:?}");
}

/// Mosquitto 2 (as `deploy/mosquitto.conf` sets it up) passes 8 of 10, as the issue measured:
/// with no access list it refuses no subscription, and it sends overlapping subscriptions' match
/// once at the QoS of one of them, not the highest (its `allow_duplicate_messages` behaviour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_scenarios_pass_against_mosquitto_but_the_configured_ones() {
    let scratch = Scratch::new("interop_mosquitto");
    let broker = Broker::start(&scratch.0);
    let outcomes = suite(broker.port, None).await;
    assert_eq!(
        failed(&outcomes),
        ["test_overlapping_subscriptions", "test_subscribe_failure"],
        "{outcomes:?}"
    );
}

/// Take what arrives for `secs` and acknowledge it: (topic, payload, dup) in arrival order.
async fn take(c: &mut Client, secs: f64) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Some(p) = c.read(left).await else { break };
        match p {
            Packet::Publish(m) => {
                out.push((
                    m.topic.clone(),
                    String::from_utf8_lossy(&m.payload).into_owned(),
                    m.dup,
                ));
                match m.qos {
                    QoS::AtMostOnce => {}
                    QoS::AtLeastOnce => c.send(Packet::PubAck(PubAck::new(m.pkid))).await,
                    QoS::ExactlyOnce => c.send(Packet::PubRec(PubRec::new(m.pkid))).await,
                }
            }
            Packet::PubRel(r) => c.send(Packet::PubComp(PubComp::new(r.pkid))).await,
            _ => {}
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_sessions_keep_their_messages_across_a_kill_9() {
    let mut env = Env::embedded("interop_kill");
    env.set("mqtt_max_sessions", 2)
        .set("mqtt_max_queued_messages", 5);
    let port = env.embedded_port.unwrap();
    let mut up = env.up().await;
    // `away` subscribes and leaves; `slow` stays and takes messages without acknowledging them.
    let (mut away, ack) = Client::connect(port, "away", kept())
        .await
        .expect("connect");
    assert!(!ack.session_present);
    away.subscribe(&[("home/#", QoS::AtLeastOnce)]).await;
    away.disconnect().await;
    let (mut slow, _) = Client::connect(port, "slow", kept())
        .await
        .expect("connect");
    slow.subscribe(&[("home/#", QoS::ExactlyOnce)]).await;
    // A third persistent session is past `mqtt_max_sessions`; a clean one is not.
    assert!(Client::connect(port, "third", kept()).await.is_err());
    let (mut publisher, _) = Client::connect(port, "publisher", clean())
        .await
        .expect("connect");
    for i in 0..8 {
        let qos = if i % 2 == 0 {
            QoS::AtLeastOnce
        } else {
            QoS::ExactlyOnce
        };
        publisher
            .publish(&format!("home/m{i}"), format!("{i}").as_bytes(), qos, false)
            .await;
    }
    // `slow` was sent the first five (its outbox holds five), and acknowledges none.
    let mut sent = 0;
    while sent < 5 {
        match slow.read(Duration::from_secs(5)).await {
            Some(Packet::Publish(_)) => sent += 1,
            Some(_) => {}
            None => panic!("slow was sent {sent} messages"),
        }
    }
    up.kill9();
    drop((slow, publisher));
    up.restart();
    wait_port(port);
    let expected: Vec<(String, String)> = (0..5)
        .map(|i| (format!("home/m{i}"), format!("{i}")))
        .collect();
    for id in ["away", "slow"] {
        let (mut c, ack) = Client::connect(port, id, kept()).await.expect("reconnect");
        assert!(ack.session_present, "{id}: its session was kept");
        let got = take(&mut c, 2.0).await;
        let messages: Vec<(String, String)> =
            got.iter().map(|(t, p, _)| (t.clone(), p.clone())).collect();
        assert_eq!(messages, expected, "{id}: the first five, in order, once");
        assert!(got.iter().all(|(_, _, dup)| *dup), "{id}: sent again, DUP");
        c.disconnect().await;
        // Acknowledged: not sent again.
        let (mut c, _) = Client::connect(port, id, kept()).await.expect("reconnect");
        assert_eq!(take(&mut c, 1.0).await, Vec::new(), "{id}: nothing more");
        c.disconnect().await;
    }
    // A clean session forgets what was kept, and frees its place.
    let (c, ack) = Client::connect(port, "away", clean())
        .await
        .expect("connect");
    assert!(!ack.session_present);
    c.disconnect().await;
    let (c, ack) = Client::connect(port, "third", kept())
        .await
        .expect("a place was freed");
    assert!(!ack.session_present);
    c.disconnect().await;
}

/// Session `away` subscribes to `home/#` at QoS 1 and leaves; a clean `publisher` connects.
async fn away_and_publisher(port: u16) -> Client {
    let (mut away, _) = Client::connect(port, "away", kept())
        .await
        .expect("connect");
    away.subscribe(&[("home/#", QoS::AtLeastOnce)]).await;
    away.disconnect().await;
    let (publisher, _) = Client::connect(port, "publisher", clean())
        .await
        .expect("connect");
    publisher
}

/// A message is in the outbox of a persistent session before its publisher is acknowledged:
/// hearth stopped dead between the two (a fault point, not a timed kill) loses nothing for the
/// session that was away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_queued_for_a_session_before_its_puback() {
    let mut env = Env::embedded("interop_relay");
    env.set("test_fault", "after_relay");
    let port = env.embedded_port.unwrap();
    let mut up = env.up().await;
    let mut publisher = away_and_publisher(port).await;
    let mut p = Publish::new("home/door", QoS::AtLeastOnce, b"open".to_vec());
    p.pkid = 1;
    publisher.send(Packet::Publish(p)).await;
    let answer = publisher
        .pump(Duration::from_secs(10), |p| matches!(p, Packet::PubAck(_)))
        .await;
    assert!(
        answer.is_none(),
        "no PUBACK: hearth stopped at the fault point"
    );
    assert!(
        up.ended_within(Duration::from_secs(10)).await,
        "hearth aborted"
    );
    env.settings.retain(|(k, _)| k != "test_fault");
    let mut up = env.hearth("up-again", &["up"]);
    up.wait_log("subscribed", Duration::from_secs(60)).await;
    let (mut away, ack) = Client::connect(port, "away", kept())
        .await
        .expect("reconnect");
    assert!(ack.session_present);
    let got = take(&mut away, 2.0).await;
    assert_eq!(
        got.iter()
            .map(|(t, p, _)| (t.as_str(), p.as_str()))
            .collect::<Vec<_>>(),
        [("home/door", "open")]
    );
    away.disconnect().await;
    up.kill9();
}

/// What waits for one persistent session is bounded in bytes too (`mqtt_max_queued_bytes`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_s_queue_is_bounded_in_bytes() {
    let mut env = Env::embedded("interop_bytes");
    env.set("mqtt_max_queued_bytes", 1000);
    let port = env.embedded_port.unwrap();
    let _up = env.up().await;
    let mut publisher = away_and_publisher(port).await;
    // Each message is 9 bytes of topic and 400 of payload: two fit in 1,000 bytes, not three.
    for i in 0..5 {
        let payload = format!("{i}").repeat(400);
        publisher
            .publish(
                &format!("home/m{i:03}"),
                payload.as_bytes(),
                QoS::AtLeastOnce,
                false,
            )
            .await;
    }
    publisher.disconnect().await;
    let (mut away, ack) = Client::connect(port, "away", kept())
        .await
        .expect("reconnect");
    assert!(ack.session_present);
    let got: Vec<String> = take(&mut away, 2.0)
        .await
        .into_iter()
        .map(|(t, _, _)| t)
        .collect();
    assert_eq!(got, ["home/m000", "home/m001"]);
    away.disconnect().await;
}
