//! Property tests over the codecs and topic parsing: whatever arrives, `decode` does not panic,
//! and every message becomes events that satisfy every rule, or rejections with a reason and a
//! detail (at least one of the two), or, for a device ecosystem's topic only, nothing at all
//! (housekeeping).

use proptest::prelude::*;

use super::sources::Ecosystem;
use super::{Codecs, Decoded, Limits, http, native, reading};
use crate::event::Reason;
use crate::event::{ValueRule, is_valid_id, value_rule};

const NOW_US: i64 = 1_764_139_200_000_000;

/// Events are valid; rejections are explained; nothing is silently dropped.
fn check(topic: &str, payload: &[u8]) {
    let limits = Limits::default();
    let codecs = Codecs::defaults(limits.clone());
    let d = codecs.decode(topic, payload, NOW_US);
    let device = !matches!(
        codecs.ecosystem(topic),
        None | Some(Ecosystem::Native | Ecosystem::Minimal)
    );
    assert!(
        !d.events.is_empty() || !d.rejections.is_empty() || device,
        "{topic:?} {payload:?}: neither an event nor a rejection"
    );
    for e in d.events.iter().filter(|_| device) {
        assert_eq!(e.house_id, "home", "{e:?}");
    }
    for r in &d.rejections {
        assert!(
            !r.detail.is_empty(),
            "rejection {:?} without detail",
            r.reason
        );
    }
    for e in &d.events {
        assert!(is_valid_id(&e.house_id) && is_valid_id(&e.sensor_id) && is_valid_id(&e.kind));
        assert!(e.value.is_finite(), "{e:?}");
        match value_rule(&e.kind) {
            ValueRule::Boolean => assert!(e.value == 0.0 || e.value == 1.0, "{e:?}"),
            ValueRule::Range(lo, hi) => assert!((lo..=hi).contains(&e.value), "{e:?}"),
            ValueRule::Finite => {}
        }
        assert!(e.seq.is_none_or(|s| s >= 0), "{e:?}");
        assert!(
            e.ts_ms <= NOW_US / 1000 + limits.max_future_skew_ms,
            "{e:?} too far in the future"
        );
        if let ["hearth", house, sensor] = topic.split('/').collect::<Vec<_>>()[..] {
            assert_eq!((e.house_id.as_str(), e.sensor_id.as_str()), (house, sensor));
        }
    }
}

fn id() -> BoxedStrategy<String> {
    prop_oneof![
        "[a-z0-9_.-]{1,12}",
        Just("..".to_string()),
        Just(String::new()),
        "[ -~]{0,8}",
        "\\PC{0,8}",
        Just("x".repeat(65)),
    ]
    .boxed()
}

fn topic() -> BoxedStrategy<String> {
    prop_oneof![
        (id(), id()).prop_map(|(h, s)| format!("hearth/{h}/{s}")),
        id().prop_map(|s| format!("maison/capteurs/{s}")),
        "\\PC{0,40}",
        Just("hearth/h1/s1/extra".to_string()),
        Just("hearth/h1/s\u{0}1".to_string()),
        device_topic(),
    ]
    .boxed()
}

/// The device ecosystems' topics, with any device name.
fn device_topic() -> BoxedStrategy<String> {
    let name = prop_oneof!["[a-zA-Z0-9 _/.-]{0,20}", "\\PC{0,12}", id()];
    (
        name,
        prop_oneof![
            Just("zigbee2mqtt/{}"),
            Just("zigbee2mqtt/{}/availability"),
            Just("zigbee2mqtt/bridge/{}"),
            Just("tele/{}/SENSOR"),
            Just("tele/{}/LWT"),
            Just("tele/{}/STATE"),
            Just("stat/{}/POWER2"),
            Just("{}/events/rpc"),
            Just("{}/online"),
            Just("{}/sensor/outside_temperature/state"),
            Just("{}/binary_sensor/{}/state"),
            Just("{}/status"),
        ],
    )
        .prop_map(|(name, pattern)| pattern.replace("{}", &name))
        .boxed()
}

/// What the ecosystems publish, with any values in their places.
fn device_payload() -> BoxedStrategy<Vec<u8>> {
    let text = prop_oneof![
        Just("ON"),
        Just("OFF"),
        Just("online"),
        Just("Offline"),
        Just("nan"),
        Just("true"),
        Just("12.5"),
        Just("-1e999"),
        Just(""),
    ];
    prop_oneof![
        text.prop_map(|t| t.as_bytes().to_vec()),
        (number(), number(), number()).prop_map(|(a, b, c)| {
            format!(
                r#"{{"temperature":{a},"humidity":{b},"contact":{c},"occupancy":{c},"state":"ON","linkquality":{b},"state_l1":{c},"battery":{b},"voltage":{a}}}"#
            )
            .into_bytes()
        }),
        (number(), number(), any::<bool>()).prop_map(|(a, b, f)| {
            let unit = if f { "F" } else { "C" };
            format!(
                r#"{{"Time":"2024-01-01T00:00:00","DS18B20-1":{{"Temperature":{a}}},"DS18B20-2":{{"Temperature":{b}}},"ENERGY":{{"Total":{b},"Power":[{a},{b}]}},"TempUnit":"{unit}"}}"#
            )
            .into_bytes()
        }),
        (number(), number(), number()).prop_map(|(a, b, ts)| {
            format!(
                r#"{{"src":"shelly-x","method":"NotifyStatus","params":{{"ts":{ts},"switch:0":{{"apower":{a},"aenergy":{{"total":{b}}},"output":{a}}},"temperature:100":{{"tC":{b}}},"flood:1":{{"alarm":{a}}}}}}}"#
            )
            .into_bytes()
        }),
        r#"\{"state":"[a-z]{0,8}"\}"#.prop_map(String::into_bytes),
    ]
    .boxed()
}

fn number() -> BoxedStrategy<String> {
    prop_oneof![
        any::<f64>().prop_map(|v| format!("{v}")),
        any::<i64>().prop_map(|v| v.to_string()),
        Just("1e999".to_string()),
        Just("-1e999".to_string()),
        Just("NaN".to_string()),
        Just("Infinity".to_string()),
        Just("true".to_string()),
        Just("null".to_string()),
        Just("\"22.5\"".to_string()),
        (-100.0..200.0f64).prop_map(|v| format!("{v}")),
    ]
    .boxed()
}

fn reading() -> BoxedStrategy<String> {
    let kind = prop_oneof![
        Just("temperature"),
        Just("humidity"),
        Just("smoke"),
        Just("power"),
        Just("weird-kind"),
        Just("bad kind"),
        Just(""),
    ];
    (
        kind,
        number(),
        proptest::option::of(number()),
        proptest::option::of(prop_oneof![
            number(),
            Just("\"2026-11-26T10:00:00Z\"".to_string()),
            Just("\"not a date\"".to_string()),
            Just("99999999999999".to_string()),
        ]),
        proptest::option::of(id()),
        any::<bool>(),
    )
        .prop_map(|(kind, value, seq, ts, house, drop_value)| {
            let mut fields = vec![format!("\"kind\":\"{kind}\"")];
            if !drop_value {
                fields.push(format!("\"value\":{value}"));
            }
            if let Some(s) = seq {
                fields.push(format!("\"seq\":{s}"));
            }
            if let Some(t) = ts {
                fields.push(format!("\"ts\":{t}"));
            }
            if let Some(h) = house {
                fields.push(format!("\"house_id\":{}", serde_json::json!(h)));
            }
            format!("{{{}}}", fields.join(","))
        })
        .boxed()
}

fn payload() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        reading().prop_map(String::into_bytes),
        proptest::collection::vec(reading(), 0..5)
            .prop_map(|r| format!("[{}]", r.join(",")).into_bytes()),
        (number(), number())
            .prop_map(|(t, h)| format!("{{\"temp\":{t},\"hum\":{h}}}").into_bytes()),
        number().prop_map(String::into_bytes),
        device_payload(),
        proptest::collection::vec(any::<u8>(), 0..200),
        // A valid reading cut anywhere.
        (reading(), any::<prop::sample::Index>()).prop_map(|(r, i)| {
            let b = r.into_bytes();
            let at = i.index(b.len() + 1);
            b[..at].to_vec()
        }),
    ]
    .boxed()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn any_message_is_events_or_reasoned_rejections(topic in topic(), payload in payload()) {
        check(&topic, &payload);
    }

    /// The native codec's direct read of the plain shape gives what the JSON tree gives.
    #[test]
    fn the_plain_native_read_agrees_with_the_tree(payload in payload(), dup in any::<bool>()) {
        // A duplicated field (the tree keeps the last; the direct read refuses and falls back).
        let payload = match (dup, payload.strip_suffix(b"}")) {
            (true, Some(head)) if payload.starts_with(b"{") => {
                [head, b",\"kind\":\"power\"}"].concat()
            }
            _ => payload,
        };
        let ctx = reading::Context {
            house_id: "h1".into(),
            sensor_id: "s1".into(),
            received_us: NOW_US,
            limits: &Limits::default(),
        };
        let direct = native::decode_payload(&ctx, &payload);
        let tree = match serde_json::from_slice(&payload) {
            Ok(v) => native::decode(&ctx, v),
            Err(e) => Decoded::rejected(Reason::MalformedJson, e.to_string()),
        };
        // Events without seq get a random ingest id: not compared.
        let plain = |d: &Decoded| {
            let events: Vec<_> = d.events.iter().cloned().map(|mut e| {
                e.ingest_id = None;
                e
            }).collect();
            format!("{events:?}")
        };
        prop_assert_eq!(plain(&direct), plain(&tree));
        prop_assert_eq!(format!("{:?}", direct.rejections), format!("{:?}", tree.rejections));
    }

    #[test]
    fn any_http_body_is_events_or_reasoned_rejections(payload in payload()) {
        match http::readings(&payload, &Limits::default()) {
            Err(r) => prop_assert!(!r.detail.is_empty()),
            Ok(items) => {
                for item in items {
                    if let Ok(e) = http::event(&item, NOW_US, &Limits::default()) {
                        prop_assert!(e.value.is_finite());
                        prop_assert!(is_valid_id(&e.house_id) && is_valid_id(&e.sensor_id));
                    }
                }
            }
        }
    }
}

#[test]
fn oversize_topics_and_payloads_are_refused() {
    check(
        &format!("hearth/h1/{}", "s".repeat(64 * 1024)),
        b"{\"kind\":\"power\",\"value\":1}",
    );
    check("hearth/h1/s1", &vec![b' '; 70_000]);
    check("hearth/h1/s1", &[0xff, 0xfe, 0x00, 0x80]);
}
