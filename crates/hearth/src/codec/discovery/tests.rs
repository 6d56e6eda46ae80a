//! Discovery's cases: configs, templates, states, the registry.

use super::*;

fn entity(config: &str) -> Entity {
    let levels = ["sensor", "node", "temperature", "config"];
    let a = announcement("t", &levels, config.as_bytes())
        .unwrap()
        .unwrap();
    a.entity.unwrap().as_ref().clone()
}

#[test]
fn abbreviations_and_the_base_topic_are_expanded() {
    let e = entity(
        r#"{"~":"home/living","stat_t":"~/state","dev_cla":"temperature","unit_of_meas":"°F",
            "val_tpl":"{{ value_json.t | float }}","avty_t":"~/avail","dev":{"name":"Living room","mf":"Acme","mdl":"T1"}}"#,
    );
    assert_eq!(e.state_topic.as_deref(), Some("home/living/state"));
    assert_eq!(e.availability[0].topic, "home/living/avail");
    assert_eq!(
        (e.kind.as_str(), e.unit.as_deref()),
        ("temperature", Some("°F"))
    );
    assert_eq!(
        (e.device.as_str(), e.sensor.as_str()),
        ("Living_room", "Living_room")
    );
    assert_eq!(e.manufacturer.as_deref(), Some("Acme"));
    assert_eq!(
        state(&e, br#"{"t":"71.6"}"#).unwrap(),
        Some(serde_json::json!(71.6))
    );
}

#[test]
fn templates_of_the_subset_evaluate_and_others_are_refused() {
    let eval = |t: &str, p: &str| Template::parse(t).unwrap().eval(p).unwrap();
    assert_eq!(
        eval("{{ value }}", "21.5"),
        Some(Value::String("21.5".into()))
    );
    assert_eq!(
        eval("{{ value_json.a.b }}", r#"{"a":{"b":3}}"#),
        Some(serde_json::json!(3))
    );
    assert_eq!(
        eval("{{ value_json['a'] }}", r#"{"a":true}"#),
        Some(Value::Bool(true))
    );
    assert_eq!(
        eval("{{ value | int }}", "21.7"),
        Some(serde_json::json!(21.0))
    );
    assert_eq!(
        eval("{{ value_json.t | round(1) }}", r#"{"t":21.66}"#),
        Some(serde_json::json!(21.7))
    );
    assert_eq!(
        eval("{{ (value_json.x | float) }}", r#"{"x":"2"}"#),
        Some(serde_json::json!(2.0))
    );
    assert_eq!(eval("{{ value_json.missing }}", r#"{"x":1}"#), None);
    for bad in [
        "{{ value | float * 10 }}",
        "{% if value == 'ON' %}on{% endif %}",
        "{{ states('sensor.x') }}",
        "{{ now() }}",
        "{{ value_json.x | float | multiply(2) }}",
        "plain",
    ] {
        assert!(Template::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn an_unsupported_template_is_refused_once_and_kept() {
    let levels = ["sensor", "node", "power", "config"];
    let a = announcement(
        "t",
        &levels,
        br#"{"stat_t":"n/p","val_tpl":"{{ value | float * 1000 }}","dev_cla":"power"}"#,
    )
    .unwrap()
    .unwrap();
    assert_eq!(a.refused.unwrap().reason, Reason::UnsupportedTemplate);
    assert!(a.entity.unwrap().unsupported);
}

#[test]
fn binary_states_follow_payload_on_and_off() {
    let levels = ["binary_sensor", "hall", "front_door", "config"];
    let a = announcement(
        "t",
        &levels,
        br#"{"stat_t":"hall/door","dev_cla":"door","pl_on":"open","pl_off":"closed"}"#,
    )
    .unwrap()
    .unwrap();
    let e = a.entity.unwrap();
    assert_eq!(
        (e.kind.as_str(), e.sensor.as_str()),
        ("door", "hall.front_door")
    );
    assert_eq!(state(&e, b"open").unwrap(), Some(Value::Bool(true)));
    assert_eq!(state(&e, b"closed").unwrap(), Some(Value::Bool(false)));
    assert_eq!(state(&e, b"ajar").unwrap(), None);
}

#[test]
fn the_registry_indexes_topics_and_forgets_removed_entities() {
    let r = Registry::default();
    let levels = ["sensor", "node", "temperature", "config"];
    let a = announcement("t", &levels, br#"{"stat_t":"n/t","avty_t":"n/status"}"#)
        .unwrap()
        .unwrap();
    let fresh = r.watch();
    r.apply(&[a]);
    assert!(r.reads("n/t") && r.reads("n/status"));
    assert!(fresh.has_changed().unwrap(), "new topics are told");
    let mut topics = r.topics();
    topics.sort();
    assert_eq!(topics, ["n/status", "n/t"]);
    let removed = announcement("t", &levels, b"").unwrap().unwrap();
    r.apply(&[removed]);
    assert!(!r.reads("n/t") && r.is_empty());
}

#[test]
fn past_the_most_entities_a_new_config_is_refused_and_not_kept() {
    let codecs = crate::codec::Codecs::defaults(crate::codec::Limits::default());
    let announced: Vec<Announcement> = (0..MAX_ENTITIES)
        .map(|i| {
            let topic = format!("homeassistant/sensor/n/e{i}/config");
            let levels = ["sensor", "n", "x", "config"];
            announcement(&topic, &levels, br#"{"stat_t":"n/state"}"#)
                .unwrap()
                .unwrap()
        })
        .collect();
    codecs.discovery.apply(&announced);
    assert_eq!(codecs.discovery.len(), MAX_ENTITIES);
    let config = br#"{"stat_t":"n/other","dev_cla":"temperature"}"#;
    let d = codecs.decode(
        "homeassistant/sensor/n/new/config",
        config,
        1_764_139_200_000_000,
    );
    assert!(d.announcements.is_empty(), "not kept");
    assert_eq!(d.rejections[0].reason, Reason::TooManySensors);
    // A held entity may still change, and go.
    let d = codecs.decode(
        "homeassistant/sensor/n/e7/config",
        config,
        1_764_139_200_000_000,
    );
    assert_eq!((d.announcements.len(), d.rejections.len()), (1, 0));
    let d = codecs.decode(
        "homeassistant/sensor/n/e8/config",
        b"",
        1_764_139_200_000_000,
    );
    assert_eq!(d.announcements.len(), 1);
}
