//! Real devices (issue 13): the device corpus (`tests/fixtures/devices/*.json`, messages from
//! Zigbee2MQTT's, Tasmota's, Shelly's and ESPHome's own docs and test fixtures, each with its
//! source) published over MQTT with no configuration but the servers' addresses, through the
//! real intake, on both backends and with the home's own broker: every message gives exactly its
//! expected readings (kind, value in the canonical unit, channel), housekeeping gives none and
//! no dead letter, and the API serves them.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use serde_json::Value;
use support::*;

const ADMIN: &str = "admin-devices-token-0123";

/// (sensor, kind, unit, source unit) → values, sorted.
type Readings = BTreeMap<(String, String, Option<String>, Option<String>), Vec<i64>>;

/// A value compared at a millionth.
fn micro(v: f64) -> i64 {
    (v * 1e6).round() as i64
}

struct Corpus {
    messages: Vec<(String, Vec<u8>)>,
    readings: Readings,
    /// Messages a source subscribes to that hold no reading.
    ignored: usize,
}

fn corpus() -> Corpus {
    let dir = repo_root().join("crates/hearth/tests/fixtures/devices");
    let codecs = hearth::Codecs::defaults(hearth::Limits::default());
    let mut c = Corpus {
        messages: Vec::new(),
        readings: Readings::new(),
        ignored: 0,
    };
    for file in ["zigbee2mqtt", "tasmota", "shelly", "esphome"] {
        let text = std::fs::read_to_string(dir.join(format!("{file}.json"))).expect("corpus");
        let cases: Vec<Value> = serde_json::from_str(&text).expect("corpus JSON");
        for case in cases {
            let topic = case["topic"].as_str().unwrap().to_string();
            // Not every ecosystem topic is subscribed (ESPHome's debug log): those never arrive.
            if !codecs.wants(&topic) {
                continue;
            }
            if case["ignored"].as_bool() == Some(true) {
                c.ignored += 1;
            }
            for r in case["readings"].as_array().into_iter().flatten() {
                c.readings
                    .entry((
                        r["sensor"].as_str().unwrap().to_string(),
                        r["kind"].as_str().unwrap().to_string(),
                        r["unit"].as_str().map(str::to_string),
                        r["source_unit"].as_str().map(str::to_string),
                    ))
                    .or_default()
                    .push(micro(r["value"].as_f64().unwrap()));
            }
            let payload = case["payload"].as_str().unwrap().as_bytes().to_vec();
            c.messages.push((topic, payload));
        }
    }
    for values in c.readings.values_mut() {
        values.sort();
    }
    c
}

fn count(r: &Readings) -> usize {
    r.values().map(Vec::len).sum()
}

fn sqlite_readings(env: &Env) -> Readings {
    let db = Connection::open_with_flags(env.data_file(), OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open the embedded store");
    let mut st = db
        .prepare(
            "SELECT sensor_id, kind, unit, source_unit, value FROM events WHERE house_id = 'home'",
        )
        .unwrap();
    let mut out = Readings::new();
    let rows = st
        .query_map([], |r| {
            Ok((
                (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?),
                r.get::<_, f64>(4)?,
            ))
        })
        .unwrap();
    for row in rows {
        let ((sensor, kind, unit, source_unit), v): ((String, String, Option<String>, _), f64) =
            row.unwrap();
        let unit = hearth::unit_or_canonical(&kind, unit);
        out.entry((sensor, kind, unit, source_unit))
            .or_default()
            .push(micro(v));
    }
    for values in out.values_mut() {
        values.sort();
    }
    out
}

async fn pg_readings(env: &Env) -> Readings {
    let pg = env.pg().await;
    let mut out = Readings::new();
    for row in pg
        .query(
            "SELECT sensor_id, kind, unit, source_unit, value FROM events WHERE house_id = 'home'",
            &[],
        )
        .await
        .unwrap()
    {
        let kind: String = row.get(1);
        let unit = hearth::unit_or_canonical(&kind, row.get(2));
        out.entry((row.get(0), kind, unit, row.get(3)))
            .or_default()
            .push(micro(row.get(4)));
    }
    for values in out.values_mut() {
        values.sort();
    }
    out
}

/// Publish the corpus, wait until its readings are stored, compare, and ask the API.
async fn the_corpus_is_read_as_documented(env: &mut Env, port: u16, servers: bool) {
    let corpus = corpus();
    assert!(count(&corpus.readings) >= 63);
    env.set("admin_token", ADMIN);
    let up = env.up().await;
    publish_all(
        port,
        &format!("devices-{}", env.name),
        corpus.messages.clone(),
    )
    .await;
    let want = count(&corpus.readings);
    let got = eventually(
        "the corpus's readings stored",
        Duration::from_secs(60),
        || async {
            let got = match servers {
                true => pg_readings(env).await,
                false => sqlite_readings(env),
            };
            (count(&got) >= want).then_some(got)
        },
    )
    .await;
    let missing: Vec<_> = corpus
        .readings
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(*v))
        .collect();
    let extra: Vec<_> = got
        .iter()
        .filter(|(k, v)| corpus.readings.get(*k) != Some(*v))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing or different: {missing:#?}\nnot expected: {extra:#?}"
    );
    let addr = up.http_addr().await;
    let metrics = http_get(&addr, "/metrics").await;
    let ignored: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("hearth_messages_ignored_total{"))
        // hearth's own `homeassistant/status` at start is no device's.
        .filter(|l| !l.contains("ha_discovery"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(
        ignored as usize, corpus.ignored,
        "housekeeping counted as ignored"
    );
    let dead = env.dead_letters().await;
    assert!(
        dead.is_empty(),
        "no message of the corpus is dead-lettered: {dead:?}"
    );
    // Served by the API: a Zigbee2MQTT contact sensor is a door (closed: 0).
    let (_, body) = http(
        &addr,
        "GET",
        "/api/v1/houses/home/sensors/Aqara_WindowSensorHome/latest",
        Some(ADMIN),
        None,
    )
    .await;
    let latest: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    assert!(
        latest.to_string().contains("door"),
        "the API serves the device's readings: {latest}"
    );
    // What the bridge says of its devices (its retained `bridge/devices`, as documented at
    // https://www.zigbee2mqtt.io/guide/usage/mqtt_topics_and_messages.html): model and vendor.
    let bridge_devices = br#"[{"ieee_address":"0x00124b0000000000","type":"Coordinator","friendly_name":"Coordinator","definition":null},
        {"ieee_address":"0x00158d0001a2b3c4","type":"EndDevice","friendly_name":"Aqara WindowSensorHome","model_id":"lumi.sensor_magnet.aq2",
         "definition":{"model":"MCCGQ11LM","vendor":"Aqara","description":"Door and window sensor"}}]"#;
    publish_all(
        port,
        &format!("bridge-{}", env.name),
        vec![("zigbee2mqtt/bridge/devices".into(), bridge_devices.to_vec())],
    )
    .await;
    let window = eventually(
        "the bridge's word on a device",
        Duration::from_secs(20),
        || {
            let addr = addr.clone();
            async move {
                house_sensors(&addr, ADMIN, "home")
                    .await
                    .into_iter()
                    .find(|s| {
                        s["sensor_id"] == "Aqara_WindowSensorHome"
                            && s["device"]["model"] == "MCCGQ11LM"
                    })
            }
        },
    )
    .await;
    assert_eq!(window["device"]["manufacturer"], "Aqara", "{window}");
    // Every sensor knows its device: its own, or the one it is a channel of.
    let sensors = house_sensors(&addr, ADMIN, "home").await;
    assert!(!sensors.is_empty());
    for s in &sensors {
        let id = s["sensor_id"].as_str().unwrap();
        let device = &s["device"];
        let of = device["device_id"]
            .as_str()
            .unwrap_or_else(|| panic!("{id}: no device: {s}"));
        assert!(
            id == of || id.starts_with(&format!("{of}.")),
            "{id} of {of}"
        );
        assert!(
            ["zigbee2mqtt", "tasmota", "shelly", "esphome"]
                .contains(&device["ecosystem"].as_str().unwrap_or("")),
            "{s}"
        );
    }
    drop(up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_messages_are_read_as_documented_by_the_embedded_broker() {
    let mut env = Env::embedded("dev_embedded");
    let port = env.embedded_port.unwrap();
    the_corpus_is_read_as_documented(&mut env, port, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_messages_are_read_as_documented_from_the_home_s_broker() {
    let mut env = Env::embedded("dev_home_broker");
    let broker = Broker::start(&env.scratch.0.join("broker"));
    let client_id = format!("home-{}", env.name);
    env.set("mqtt_url", broker.url())
        .set("mqtt_client_id", client_id);
    the_corpus_is_read_as_documented(&mut env, broker.port, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_messages_are_read_as_documented_on_the_servers() {
    let mut env = Env::new("dev_servers");
    let broker = Broker::start(&env.scratch.0.join("broker"));
    env.set("mqtt_url", broker.url());
    the_corpus_is_read_as_documented(&mut env, broker.port, true).await;
}

/// Home Assistant discovery on the servers: the ingest subscribes to a discovered state topic
/// as it appears, and after a restart knows the entity from Redis (the config was not even
/// retained by the broker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovered_entities_are_subscribed_and_kept_on_the_servers() {
    let mut env = Env::new("dev_discovery");
    let broker = Broker::start(&env.scratch.0.join("broker"));
    env.set("mqtt_url", broker.url());
    let mut up = env.up().await;
    let pg = env.pg().await;
    let config = (
        "homeassistant/sensor/Oregon-1/Oregon-1-T/config".to_string(),
        br#"{"device_class":"temperature","unit_of_measurement":"\u00b0F","stat_t":"rtl_433/host/devices/Oregon/1/temperature_F","val_tpl":"{{ value|float|round(1) }}","dev":{"name":"Oregon-1","mdl":"THGR810","mf":"Oregon Scientific"}}"#.to_vec(),
    );
    publish_all(broker.port, "discovery-1", vec![config]).await;
    let stored = |n: i64| {
        let pg = &pg;
        async move {
            let c: i64 = pg
                .query_one(
                    "SELECT count(*) FROM events WHERE house_id = 'home' AND sensor_id = 'Oregon-1.Oregon-1-T' AND kind = 'temperature'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            (c >= n).then_some(())
        }
    };
    // Published until the ingest, subscribed once the config is kept, takes it.
    for i in 0.. {
        publish_all(
            broker.port,
            "rtl",
            vec![(
                "rtl_433/host/devices/Oregon/1/temperature_F".into(),
                b"71.6".to_vec(),
            )],
        )
        .await;
        if stored(1).await.is_some() {
            break;
        }
        assert!(i < 40, "the discovered state topic was never read");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    up.kill9();
    up.restart();
    up.wait_log("subscribed", Duration::from_secs(60)).await;
    let before: i64 = pg
        .query_one(
            "SELECT count(*) FROM events WHERE sensor_id = 'Oregon-1.Oregon-1-T'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    publish_all(
        broker.port,
        "rtl-2",
        vec![(
            "rtl_433/host/devices/Oregon/1/temperature_F".into(),
            b"50".to_vec(),
        )],
    )
    .await;
    eventually("read after the restart", Duration::from_secs(30), || {
        stored(before + 1)
    })
    .await;
    // The 50 °F reading (a 71.6 °F one redelivered after the kill may be stored after it).
    let row = eventually("50 °F stored as 10 °C", Duration::from_secs(30), || {
        let pg = &pg;
        async move {
            pg.query_opt(
                "SELECT value, unit, source_unit FROM events WHERE sensor_id = 'Oregon-1.Oregon-1-T' AND abs(value - 10.0) < 1e-9",
                &[],
            )
            .await
            .unwrap()
        }
    })
    .await;
    assert!((row.get::<_, f64>(0) - 10.0).abs() < 1e-9);
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("°C"));
    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("°F"));
}
