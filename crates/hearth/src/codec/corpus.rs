//! The device corpus (`tests/fixtures/devices/*.json`: messages from each ecosystem's own docs and
//! test fixtures, each with its source) decoded by the codecs: every message gives exactly its
//! expected readings, housekeeping gives none and no rejection. The same corpus runs through the
//! real intake on both backends in `tests/devices.rs`.

use serde_json::Value;

use super::{Codecs, Limits};

/// 2027-01-15: after every message of the corpus (a reading stamped ahead is refused).
const NOW_US: i64 = 1_800_000_000_000_000;

pub const CORPUS: &[(&str, &str)] = &[
    (
        "zigbee2mqtt",
        include_str!("../../tests/fixtures/devices/zigbee2mqtt.json"),
    ),
    (
        "tasmota",
        include_str!("../../tests/fixtures/devices/tasmota.json"),
    ),
    (
        "shelly",
        include_str!("../../tests/fixtures/devices/shelly.json"),
    ),
    (
        "esphome",
        include_str!("../../tests/fixtures/devices/esphome.json"),
    ),
];

/// (sensor, kind, value, unit, source unit), sorted.
type Reading = (String, String, f64, Option<String>, Option<String>);

fn expected(case: &Value) -> Vec<Reading> {
    let mut out: Vec<Reading> = case["readings"]
        .as_array()
        .map(|r| r.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|r| {
            (
                r["sensor"].as_str().unwrap_or_default().to_string(),
                r["kind"].as_str().unwrap_or_default().to_string(),
                r["value"].as_f64().unwrap_or(f64::NAN),
                r["unit"].as_str().map(str::to_string),
                r["source_unit"].as_str().map(str::to_string),
            )
        })
        .collect();
    out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    out
}

/// What a decode gave, as the corpus states it, sorted.
fn readings_of(d: &super::Decoded) -> Vec<Reading> {
    let mut got: Vec<Reading> = d
        .events
        .iter()
        .map(|e| {
            (
                e.sensor_id.clone(),
                e.kind.clone(),
                e.value,
                crate::kinds::unit_or_canonical(&e.kind, e.unit.clone()),
                e.source_unit.clone(),
            )
        })
        .collect();
    got.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    got
}

/// The same readings, values at a millionth.
fn same(got: &[Reading], want: &[Reading]) -> bool {
    got.len() == want.len()
        && got.iter().zip(want).all(|(g, w)| {
            (&g.0, &g.1, &g.3, &g.4) == (&w.0, &w.1, &w.3, &w.4)
                && (g.2 - w.2).abs() <= 1e-6 * w.2.abs().max(1.0)
        })
}

#[test]
fn every_corpus_message_gives_its_expected_readings() {
    let codecs = Codecs::defaults(Limits::default());
    let mut failures = Vec::new();
    let mut readings = 0;
    for (ecosystem, json) in CORPUS {
        let cases: Vec<Value> = serde_json::from_str(json).expect("corpus is JSON");
        for case in &cases {
            let topic = case["topic"].as_str().unwrap_or_default();
            let payload = case["payload"].as_str().unwrap_or_default();
            let ignored = case["ignored"].as_bool() == Some(true);
            // A topic no source subscribes to never reaches a codec: housekeeping only.
            match codecs.ecosystem(topic) {
                None if ignored => continue,
                e => assert_eq!(e.map(|e| e.name()), Some(*ecosystem), "{topic}"),
            }
            let d = codecs.decode(topic, payload.as_bytes(), NOW_US);
            assert!(d.events.iter().all(|e| e.house_id == "home"));
            let got = readings_of(&d);
            let want = expected(case);
            readings += want.len();
            let same = same(&got, &want);
            if !same || !d.rejections.is_empty() || (ignored != d.is_ignored()) {
                failures.push(format!(
                    "{topic} {payload}\n  want {want:?}\n  got  {got:?}\n  rejections {:?}",
                    d.rejections
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(readings >= 63, "{readings} expected readings in the corpus");
}

/// Home Assistant discovery: each case's config read by the codecs and applied as the intake
/// applies it (one registry per case: several cases describe the same device), then its
/// messages give exactly their readings.
#[test]
fn every_discovered_entity_reads_as_documented() {
    let cases: Vec<Value> = serde_json::from_str(include_str!(
        "../../tests/fixtures/devices/ha_discovery.json"
    ))
    .expect("corpus is JSON");
    let mut failures = Vec::new();
    let mut readings = 0;
    for case in &cases {
        let codecs = Codecs::defaults(Limits::default());
        let config_topic = case["config_topic"].as_str().unwrap_or_default();
        let config = case["config"].as_str().unwrap_or_default();
        let d = codecs.decode(config_topic, config.as_bytes(), NOW_US);
        let refused: Vec<&str> = d.rejections.iter().map(|r| r.reason.as_str()).collect();
        let expect = case["expect"].as_str().unwrap_or_default();
        let as_expected = match expect {
            "entity" => refused.is_empty() && d.announcements.len() == 1,
            "unsupported" => refused == ["unsupported_template"],
            _ => refused.is_empty() && d.events.is_empty(),
        };
        if !as_expected {
            failures.push(format!(
                "{config_topic}: expected {expect}, got {refused:?}"
            ));
        }
        codecs.discovery.apply(&d.announcements);
        for m in case["messages"].as_array().into_iter().flatten() {
            let topic = m["topic"].as_str().unwrap_or_default();
            let payload = m["payload"].as_str().unwrap_or_default();
            // A topic nothing subscribes to never reaches a codec.
            if !codecs.wants(topic) {
                if !expected(m).is_empty() {
                    failures.push(format!("{topic} is not subscribed"));
                }
                continue;
            }
            let d = codecs.decode(topic, payload.as_bytes(), NOW_US);
            codecs.discovery.apply(&d.announcements);
            let got = readings_of(&d);
            let want = expected(m);
            readings += want.len();
            let same = same(&got, &want);
            if !same || !d.rejections.is_empty() {
                failures.push(format!(
                    "{config_topic} then {topic} {payload}\n  want {want:?}\n  got  {got:?}\n  rejections {:?}",
                    d.rejections
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(readings >= 30, "{readings} expected readings");
}
