//! The codecs' own cases: the native and minimal forms, the reasons of rejections, topics
//! and houses, bounds.

use super::*;

const NOW_US: i64 = 1_764_139_200_000_000;

fn dec(topic: &str, payload: &str) -> Decoded {
    decode(topic, payload.as_bytes(), NOW_US, &Limits::default())
}

fn reason(topic: &str, payload: &str) -> &'static str {
    let d = dec(topic, payload);
    assert!(d.events.is_empty(), "{payload} gave {:?}", d.events);
    assert_eq!(d.rejections.len(), 1, "{payload}");
    d.rejections[0].reason.as_str()
}

#[test]
fn native_single_and_array() {
    let d = dec(
        "hearth/h1/s1",
        r#"{"kind":"temperature","value":22.5,"unit":"°C","seq":42,"ts":1764139200123}"#,
    );
    assert!(d.rejections.is_empty(), "{:?}", d.rejections);
    let e = &d.events[0];
    assert_eq!(
        (e.house_id.as_str(), e.sensor_id.as_str(), e.kind.as_str()),
        ("h1", "s1", "temperature")
    );
    assert_eq!(
        (e.value, e.seq, e.ts_ms),
        (22.5, Some(42), 1_764_139_200_123)
    );
    assert_eq!(e.unit.as_deref(), Some("°C"));
    assert!(e.ingest_id.is_none());

    let d = dec(
        "hearth/h1/s1",
        r#"[{"kind":"motion","value":true},{"kind":"door","value":false,"ts":"2025-11-26T06:40:00.5+01:00"}]"#,
    );
    assert_eq!(d.events.len(), 2, "{:?}", d.rejections);
    assert_eq!(d.events[0].value, 1.0);
    assert!(d.events[0].ingest_id.is_some());
    assert_eq!(d.events[0].ts_ms, NOW_US / 1000);
    assert_eq!(d.events[1].value, 0.0);
    assert_eq!(d.events[1].ts_ms, 1_764_135_600_500);
}

#[test]
fn seed_minimal_form() {
    let d = dec("maison/capteurs/temperature", r#"{"temp": 22.5}"#);
    assert_eq!(d.events.len(), 1, "{:?}", d.rejections);
    let e = &d.events[0];
    assert_eq!(
        (
            e.house_id.as_str(),
            e.sensor_id.as_str(),
            e.kind.as_str(),
            e.value
        ),
        ("maison", "temperature", "temperature", 22.5)
    );
}

#[test]
fn rejections_have_reasons() {
    let t = "hearth/h1/s1";
    assert_eq!(reason(t, "{not json"), "malformed_json");
    assert_eq!(
        reason(t, r#"{"kind":"temperature","value":NaN}"#),
        "malformed_json"
    );
    assert_eq!(
        reason(t, r#"{"kind":"temperature","value":1e999}"#),
        "malformed_json"
    );
    assert_eq!(
        reason(t, r#"{"kind":"temperature","value":"hot"}"#),
        "wrong_type"
    );
    assert_eq!(
        reason(t, r#"{"kind":"temperature","value":1000}"#),
        "out_of_range"
    );
    assert_eq!(reason(t, r#"{"kind":"smoke","value":2}"#), "out_of_range");
    assert_eq!(reason(t, r#"{"value":1}"#), "missing_field");
    assert_eq!(reason(t, r#"{"kind":"temperature"}"#), "missing_field");
    assert_eq!(reason(t, r#"{"kind":"bad kind","value":1}"#), "bad_id");
    assert_eq!(
        reason(t, r#"{"kind":"power","value":1,"seq":-1}"#),
        "bad_seq"
    );
    assert_eq!(
        reason(t, r#"{"kind":"power","value":1,"seq":1.5}"#),
        "bad_seq"
    );
    assert_eq!(
        reason(t, r#"{"kind":"power","value":1,"ts":"yesterday"}"#),
        "bad_timestamp"
    );
    // ten years ahead, and seconds where milliseconds belong
    assert_eq!(
        reason(t, r#"{"kind":"power","value":1,"ts":2079000000000}"#),
        "bad_timestamp"
    );
    assert_eq!(
        reason(t, r#"{"kind":"power","value":1,"ts":1764139200}"#),
        "bad_timestamp"
    );
    assert_eq!(
        reason(t, r#"{"kind":"power","value":1,"house_id":"h2"}"#),
        "house_mismatch"
    );
    assert_eq!(reason(t, "42"), "wrong_type");
    assert_eq!(reason(t, "[]"), "missing_field");
    assert_eq!(
        reason("hearth/h 1/s1", r#"{"kind":"power","value":1}"#),
        "bad_id"
    );
    assert_eq!(
        reason("hearth/../s1", r#"{"kind":"power","value":1}"#),
        "bad_id"
    );
    assert_eq!(reason("hearth/h1/s1/x", r#"{}"#), "unknown_topic");
    assert_eq!(
        reason("maison/capteurs/temperature", r#"{"temp":"x"}"#),
        "wrong_type"
    );
    let big = format!(
        r#"{{"kind":"power","value":1,"pad":"{}"}}"#,
        "x".repeat(70_000)
    );
    assert_eq!(reason(t, &big), "payload_too_large");
    let d = decode(t, b"\xff\xfe", NOW_US, &Limits::default());
    assert_eq!(d.rejections[0].reason.as_str(), "malformed_json");
}

#[test]
fn topics_and_filters_belong_to_a_house_or_to_none() {
    let codecs = Codecs::defaults(Limits::default());
    let topic_house = |t| codecs.topic_house(t);
    assert_eq!(topic_house("zigbee2mqtt/plug"), Some("home"));
    assert_eq!(topic_house("tele/plug/SENSOR"), Some("home"));
    assert_eq!(topic_house("+/online"), None);
    assert_eq!(topic_house("hearth/h1/kitchen"), Some("h1"));
    assert_eq!(topic_house("hearth/h1/kitchen/set"), Some("h1"));
    assert_eq!(topic_house("maison/capteurs/temperature"), Some("maison"));
    assert_eq!(topic_house("hearth/+/x"), None);
    assert_eq!(topic_house("hearth/h1/#"), Some("h1"));
    assert_eq!(topic_house("hearth/h1/+"), Some("h1"));
    for wide in [
        "#",
        "+/+/+",
        "hearth/#",
        "hearth/+/kitchen",
        "$SYS/#",
        "hearth",
        "maison/#",
    ] {
        assert_eq!(topic_house(wide), None, "{wide}");
    }
}

#[test]
fn a_message_has_a_bounded_number_of_readings() {
    let limits = Limits {
        max_readings: 3,
        ..Limits::default()
    };
    let reading = r#"{"kind":"power","value":1}"#;
    let array = |n: usize| format!("[{}]", vec![reading; n].join(","));
    let d = decode("hearth/h1/s1", array(3).as_bytes(), NOW_US, &limits);
    assert_eq!((d.events.len(), d.rejections.len()), (3, 0));
    let d = decode("hearth/h1/s1", array(4).as_bytes(), NOW_US, &limits);
    assert!(d.events.is_empty());
    assert_eq!(d.rejections.len(), 1);
    assert_eq!(d.rejections[0].reason.as_str(), "too_many_readings");
    // The minimal form counts its keys.
    let d = decode(
        "maison/capteurs/x",
        br#"{"a":1,"b":2,"c":3,"d":4}"#,
        NOW_US,
        &limits,
    );
    assert_eq!(d.rejections[0].reason.as_str(), "too_many_readings");
    // The seed's amplification: 64 KiB of `1`s is one rejection.
    let ones = format!("[{}]", vec!["1"; 32_000].join(","));
    let d = decode("hearth/h1/s1", ones.as_bytes(), NOW_US, &Limits::default());
    assert_eq!(d.rejections.len(), 1, "one rejection, not 32,000");
}

#[test]
fn one_bad_reading_does_not_sink_its_neighbours() {
    let d = dec(
        "hearth/h1/s1",
        r#"[{"kind":"humidity","value":40},{"kind":"humidity","value":400},{"kind":"humidity","value":41}]"#,
    );
    assert_eq!(d.events.len(), 2);
    assert_eq!(d.rejections.len(), 1);
    assert!(
        d.rejections[0].detail.contains("reading 1"),
        "{:?}",
        d.rejections
    );
}
