//! The embedded broker as a home's broker (issue 13): retained messages and last wills, kept in
//! the data folder across a kill -9, bounded; client ids assigned to clients that send none;
//! `homeassistant/status` `online` at start so that devices announce themselves again.

mod support;

use std::time::Duration;

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use rusqlite::{Connection, OpenFlags};
use support::*;

fn options(port: u16, client_id: &str) -> MqttOptions {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(2 * 1024 * 1024, 2 * 1024 * 1024);
    opts
}

/// Subscribe to `filter` and collect what arrives within `wait`: (topic, payload, retain).
async fn collect(port: u16, filter: &str, wait: Duration) -> Vec<(String, String, bool)> {
    let (client, mut events) =
        AsyncClient::new(options(port, &format!("sub-{}", free_port())), 100);
    client
        .subscribe(filter, QoS::AtMostOnce)
        .await
        .expect("subscribe");
    let mut got = Vec::new();
    let _ = tokio::time::timeout(wait, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => got.push((
                    p.topic.clone(),
                    String::from_utf8_lossy(&p.payload).into_owned(),
                    p.retain,
                )),
                Ok(_) => {}
                // Not listening yet (a restart): the event loop connects again.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await;
    got
}

/// Publish `(topic, payload, retain)` at QoS 1 and wait for every PUBACK.
async fn publish(port: u16, client_id: &str, messages: &[(&str, &str, bool)]) {
    let (client, mut events) = AsyncClient::new(options(port, client_id), 100);
    for (topic, payload, retain) in messages {
        client
            .publish(
                *topic,
                QoS::AtLeastOnce,
                *retain,
                payload.as_bytes().to_vec(),
            )
            .await
            .expect("publish");
    }
    let mut acked = 0;
    tokio::time::timeout(Duration::from_secs(20), async {
        while acked < messages.len() {
            if let Event::Incoming(Packet::PubAck(_)) = events.poll().await.expect("poll") {
                acked += 1;
            }
        }
    })
    .await
    .expect("every PUBACK");
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), events.poll()).await;
}

/// The reasons of the embedded store's dead letters, oldest first.
fn dead_reasons(env: &Env) -> Vec<String> {
    let db = Connection::open_with_flags(env.data_file(), OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open the embedded store");
    db.prepare("SELECT reason FROM dead ORDER BY rowid")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn availability(env: &Env, sensor: &str) -> Vec<f64> {
    let db = Connection::open_with_flags(env.data_file(), OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open the embedded store");
    let mut st = db
        .prepare(
            "SELECT value FROM events WHERE sensor_id = ?1 AND kind = 'availability' ORDER BY id",
        )
        .unwrap();
    st.query_map([sensor], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_reach_later_subscribers_across_a_kill_9() {
    let env = Env::embedded("broker_retained");
    let port = env.embedded_port.unwrap();
    let mut up = env.up().await;
    publish(
        port,
        "device",
        &[
            (
                "homeassistant/sensor/x/temperature/config",
                r#"{"name":"t"}"#,
                true,
            ),
            (
                "zigbee2mqtt/lamp/availability",
                r#"{"state":"online"}"#,
                true,
            ),
            ("house/notes", "not retained", false),
        ],
    )
    .await;
    up.kill9();
    up.restart();
    wait_port(port);
    let got = collect(port, "#", Duration::from_secs(2)).await;
    for (topic, payload) in [
        (
            "homeassistant/sensor/x/temperature/config",
            r#"{"name":"t"}"#,
        ),
        ("zigbee2mqtt/lamp/availability", r#"{"state":"online"}"#),
        // hearth's own birth message, so that devices announce themselves again.
        ("homeassistant/status", "online"),
    ] {
        assert!(
            got.contains(&(topic.into(), payload.into(), true)),
            "{topic} retained: {got:?}"
        );
    }
    assert!(!got.iter().any(|m| m.0 == "house/notes"), "{got:?}");
    // An empty retained message removes the topic's.
    publish(
        port,
        "device",
        &[("homeassistant/sensor/x/temperature/config", "", true)],
    )
    .await;
    let got = collect(port, "homeassistant/sensor/#", Duration::from_secs(1)).await;
    assert!(got.is_empty(), "{got:?}");
    // The retained availability was read as a reading too, once.
    assert_eq!(availability(&env, "lamp"), [1.0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_bounded() {
    let mut env = Env::embedded("broker_retained_cap");
    // hearth's own `homeassistant/status` is one of them.
    env.set("mqtt_max_retained", 3);
    let port = env.embedded_port.unwrap();
    let up = env.up().await;
    let topics: Vec<String> = (0..6).map(|i| format!("notes/{i}")).collect();
    let messages: Vec<(&str, &str, bool)> =
        topics.iter().map(|t| (t.as_str(), "x", true)).collect();
    publish(port, "device", &messages).await;
    let got = collect(port, "notes/#", Duration::from_secs(1)).await;
    assert_eq!(got.len(), 2, "kept up to the bound: {got:?}");
    let addr = up.http_addr().await;
    let metrics = http_get(&addr, "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            r#"hearth_mqtt_refused_total{reason="retained_full"}"#
        ),
        Some(4.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wills_are_published_when_a_client_vanishes_even_across_a_kill_9() {
    let env = Env::embedded("broker_wills");
    let port = env.embedded_port.unwrap();
    let mut up = env.up().await;
    let watcher = tokio::spawn(collect(port, "tele/+/LWT", Duration::from_secs(6)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A Tasmota plug: online, then its socket dies (no DISCONNECT).
    let connect_with_will = |id: &str| {
        let mut opts = options(port, id);
        opts.set_last_will(LastWill::new(
            format!("tele/{id}/LWT"),
            "Offline",
            QoS::AtLeastOnce,
            true,
        ));
        AsyncClient::new(opts, 10)
    };
    let (plug, mut events) = connect_with_will("plug1");
    plug.publish("tele/plug1/LWT", QoS::AtLeastOnce, true, "Online")
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while !matches!(events.poll().await, Ok(Event::Incoming(Packet::PubAck(_)))) {}
    })
    .await
    .expect("online acknowledged");
    drop(events);
    drop(plug);
    // A plug that says goodbye leaves no will.
    let (polite, mut events) = connect_with_will("plug3");
    tokio::time::timeout(Duration::from_secs(10), async {
        while !matches!(events.poll().await, Ok(Event::Incoming(Packet::ConnAck(_)))) {}
    })
    .await
    .expect("connected");
    polite.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(1), events.poll()).await;
    let seen = watcher.await.unwrap();
    assert!(
        seen.contains(&("tele/plug1/LWT".into(), "Offline".into(), false)),
        "the will reached a subscriber: {seen:?}"
    );
    assert!(!seen.iter().any(|m| m.0 == "tele/plug3/LWT"), "{seen:?}");
    eventually("plug1 offline stored", Duration::from_secs(20), || async {
        (availability(&env, "plug1") == [1.0, 0.0]).then_some(())
    })
    .await;
    // A plug connected when hearth is killed: its will is published at the next start.
    let (_plug2, mut events) = connect_with_will("plug2");
    tokio::time::timeout(Duration::from_secs(10), async {
        while !matches!(events.poll().await, Ok(Event::Incoming(Packet::ConnAck(_)))) {}
    })
    .await
    .expect("connected");
    up.kill9();
    drop(events);
    up.restart();
    wait_port(port);
    eventually("plug2 offline stored", Duration::from_secs(20), || async {
        (availability(&env, "plug2") == [0.0]).then_some(())
    })
    .await;
    assert!(availability(&env, "plug3").is_empty());
    // The retained will is what a newcomer sees.
    let got = collect(port, "tele/plug1/LWT", Duration::from_secs(1)).await;
    assert_eq!(got, [("tele/plug1/LWT".into(), "Offline".into(), true)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_an_id_gets_one_with_a_clean_session_only() {
    let env = Env::embedded("broker_client_id");
    let port = env.embedded_port.unwrap();
    let _up = env.up().await;
    let connect = |clean: bool| async move {
        let mut ep =
            hearth::mqtt::Endpoint::parse(&format!("mqtt://127.0.0.1:{port}"), "x").expect("url");
        ep.client_id = String::new();
        ep.clean_session = clean;
        hearth::mqtt::connect(&ep).await.map(|_| ())
    };
    assert!(connect(true).await.is_ok());
    let refused = connect(false).await;
    assert!(refused.is_err(), "{refused:?}");
}

const ADMIN: &str = "admin-broker-token-012345";

/// The reading pushed over the WebSocket for `sensor`, skipping others.
async fn pushed(ws: &mut Ws, sensor: &str) -> serde_json::Value {
    loop {
        let m = ws_next(ws, Duration::from_secs(20))
            .await
            .unwrap_or_else(|| panic!("a push of {sensor}"));
        if m["type"] != "events" {
            continue;
        }
        if let Some(e) = m["events"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["sensor_id"] == sensor)
        {
            return e.clone();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discovered_device_is_read_through_the_api_and_kept_across_a_restart() {
    let mut env = Env::embedded("broker_discovery");
    env.set("admin_token", ADMIN);
    let port = env.embedded_port.unwrap();
    let mut up = env.up().await;
    let addr = up.http_addr().await;
    // A device of no built-in ecosystem announces a soil thermometer, in °F, with its
    // availability topic, as Home Assistant's documentation shows.
    publish(
        port,
        "garden-setup",
        &[(
            "homeassistant/sensor/garden/soil_temperature/config",
            r#"{"name":"Soil temperature","~":"garden","stat_t":"~/soil","dev_cla":"temperature",
                "unit_of_meas":"°F","val_tpl":"{{ value_json.t | float }}","avty_t":"~/status",
                "dev":{"name":"garden","mf":"Acme","mdl":"S1"}}"#,
            true,
        )],
    )
    .await;
    let mut ws = ws_connect(&addr, "house=home", Some(ADMIN))
        .await
        .expect("socket");
    let hello = ws_next(&mut ws, Duration::from_secs(10))
        .await
        .expect("hello");
    assert_eq!(hello["type"], "hello");
    // Workers read who watches every half second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut opts = options(port, "garden");
    opts.set_last_will(LastWill::new(
        "garden/status",
        "offline",
        QoS::AtLeastOnce,
        true,
    ));
    let (device, mut events) = AsyncClient::new(opts, 10);
    device
        .publish("garden/status", QoS::AtLeastOnce, true, "online")
        .await
        .unwrap();
    device
        .publish("garden/soil", QoS::AtLeastOnce, false, r#"{"t": 71.6}"#)
        .await
        .unwrap();
    let mut acked = 0;
    tokio::time::timeout(Duration::from_secs(10), async {
        while acked < 2 {
            if let Ok(Event::Incoming(Packet::PubAck(_))) = events.poll().await {
                acked += 1;
            }
        }
    })
    .await
    .expect("acknowledged");
    let sensor = "garden.soil_temperature";
    let push = pushed(&mut ws, sensor).await;
    assert_eq!(push["kind"], "temperature", "{push}");
    let latest = |addr: String| async move {
        let (_, body) = http(
            &addr,
            "GET",
            &format!("/api/v1/houses/home/sensors/{sensor}/latest"),
            Some(ADMIN),
            None,
        )
        .await;
        serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default()
    };
    let value = eventually("the reading served", Duration::from_secs(20), || {
        let addr = addr.clone();
        async move {
            let v = latest(addr).await;
            v.to_string().contains("temperature").then_some(v)
        }
    })
    .await;
    assert!(
        value.to_string().contains("22"),
        "71.6 °F is 22 °C: {value}"
    );
    // The device as announced: its model and maker.
    let sensors = house_sensors(&addr, ADMIN, "home").await;
    let soil = sensors
        .iter()
        .find(|s| s["sensor_id"] == sensor)
        .expect("listed");
    assert_eq!(soil["device"]["device_id"], "garden", "{soil}");
    assert_eq!(soil["device"]["ecosystem"], "ha_discovery");
    assert_eq!(soil["device"]["model"], "S1");
    assert_eq!(soil["device"]["manufacturer"], "Acme");
    // The device vanishes: its will says offline.
    drop(events);
    drop(device);
    eventually("garden offline", Duration::from_secs(20), || async {
        (availability(&env, "garden") == [1.0, 0.0]).then_some(())
    })
    .await;
    // After a kill -9, the entity is known before anything is announced again.
    up.kill9();
    up.restart();
    wait_port(port);
    publish(port, "garden-2", &[("garden/soil", r#"{"t": 50}"#, false)]).await;
    let db = Connection::open_with_flags(env.data_file(), OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open the embedded store");
    eventually("the second reading stored", Duration::from_secs(20), || async {
        let values: Vec<(f64, Option<String>)> = db
            .prepare(
                "SELECT value, source_unit FROM events WHERE sensor_id = ?1 AND kind = 'temperature' ORDER BY id",
            )
            .unwrap()
            .query_map([sensor], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        (values.len() == 2).then_some(values)
    })
    .await
    .iter()
    .zip([22.0, 10.0])
    .for_each(|((v, unit), want)| {
        assert!((v - want).abs() < 1e-9, "{v} °C, want {want}");
        assert_eq!(unit.as_deref(), Some("°F"));
    });
}

/// A smoke alarm, as the home's automations see it: its state retained on
/// `hearth/{house}/alerts/…` and announced by discovery; no client may forge it.
async fn alerts_reach_the_broker(env: &Env, port: u16) -> Hearth {
    let up = env.up().await;
    publish(
        port,
        "smoke-detector",
        &[(
            "hearth/h1/hall-smoke",
            r#"{"kind":"smoke","value":true,"seq":1}"#,
            false,
        )],
    )
    .await;
    let state_topic = "hearth/h1/alerts/hall-smoke/smoke";
    let got = eventually(
        "the alert retained on the broker",
        Duration::from_secs(30),
        || async {
            let got = collect(port, "hearth/h1/alerts/#", Duration::from_millis(500)).await;
            got.iter()
                .find(|m| m.0 == state_topic)
                .map(|m| serde_json::from_str::<serde_json::Value>(&m.1).unwrap())
        },
    )
    .await;
    assert_eq!(got["problem"], "ON", "{got}");
    assert_eq!(got["state"], "active");
    assert_eq!(got["severity"], "critical");
    let config = collect(
        port,
        "homeassistant/binary_sensor/hearth_h1_hall-smoke_smoke/config",
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(config.len(), 1, "announced once, retained: {config:?}");
    assert!(config[0].1.contains(state_topic), "{config:?}");
    up
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_are_published_by_the_embedded_broker() {
    let env = Env::embedded("broker_alerts");
    let port = env.embedded_port.unwrap();
    let _up = alerts_reach_the_broker(&env, port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_are_published_to_the_home_s_broker_on_the_servers() {
    let mut env = Env::new("broker_alerts_servers");
    // A broker that forgets everything when it dies.
    let mut broker = Broker::start_with(
        &env.scratch.0.join("broker"),
        0,
        &["persistence false".to_string()],
    );
    env.set("mqtt_url", broker.url());
    let up = alerts_reach_the_broker(&env, broker.port).await;
    // It comes back empty; the ingest, reconnecting, publishes the alert's state again.
    broker.restart("KILL");
    let got = eventually(
        "the alert published again",
        Duration::from_secs(30),
        || async {
            let got = collect(
                broker.port,
                "hearth/h1/alerts/#",
                Duration::from_millis(500),
            )
            .await;
            (!got.is_empty()).then_some(got)
        },
    )
    .await;
    assert!(got[0].1.contains(r#""problem":"ON""#), "{got:?}");
    drop(up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_may_publish_a_house_s_alerts() {
    let env = Env::embedded("broker_alert_forge");
    let port = env.embedded_port.unwrap();
    let _up = env.up().await;
    publish(
        port,
        "forger",
        &[(
            "hearth/h1/alerts/hall-smoke/smoke",
            r#"{"problem":"OFF"}"#,
            true,
        )],
    )
    .await;
    let got = collect(port, "hearth/h1/alerts/#", Duration::from_millis(500)).await;
    assert!(got.is_empty(), "neither kept nor forwarded: {got:?}");
    let reasons = dead_reasons(&env);
    assert_eq!(reasons, ["forbidden"]);
}

/// A Zigbee2MQTT bridge's device list is larger than any reading: relayed (retained) to whoever
/// reads it, ignored by hearth, not dead-lettered; a reading that large still is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_s_big_state_is_relayed_not_refused() {
    let env = Env::embedded("broker_big_bridge");
    let port = env.embedded_port.unwrap();
    let up = env.up().await;
    let devices = format!(
        r#"[{}]"#,
        vec![r#"{"friendly_name":"lamp","definition":{"model":"TS011F","vendor":"TuYa"}}"#; 4000]
            .join(",")
    );
    assert!(devices.len() > 256 * 1024);
    let big_reading = format!(r#"{{"temperature":21,"pad":"{}"}}"#, "x".repeat(70_000));
    publish(
        port,
        "zigbee2mqtt-bridge",
        &[
            ("zigbee2mqtt/bridge/devices", devices.as_str(), true),
            ("zigbee2mqtt/lamp", big_reading.as_str(), false),
        ],
    )
    .await;
    let got = collect(port, "zigbee2mqtt/bridge/devices", Duration::from_secs(1)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1.len(), devices.len());
    let reasons = dead_reasons(&env);
    assert_eq!(reasons, ["payload_too_large"], "the oversize reading only");
    let metrics = http_get(&up.http_addr().await, "/metrics").await;
    assert!(
        metric(
            &metrics,
            r#"hearth_messages_ignored_total{ecosystem="zigbee2mqtt"}"#
        ) >= Some(1.0),
        "counted as ignored"
    );
}
