//! The configuration's layers, keys and values.

use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn layers_apply_in_order_flags_win() {
    let dir = std::env::temp_dir().join(format!("hearth-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("hearth.toml");
    std::fs::write(&file, "shards = 4\nworkers = 2\nbatch_size = 10\n").unwrap();
    let cfg = load(
        Some(&file),
        env(&[
            ("HEARTH_WORKERS", "5"),
            ("HEARTH_BATCH_SIZE", "20"),
            ("PATH", "/x"),
        ]),
        &[("batch-size".into(), "30".into())],
    )
    .unwrap();
    assert_eq!((cfg.shards, cfg.workers, cfg.batch_size), (4, 5, 30));
}

#[test]
fn embedded_with_the_home_s_broker_when_only_mqtt_url_is_set() {
    let cfg = load(
        None,
        env(&[("HEARTH_MQTT_URL", "mqtt://homebroker:1883")]),
        &[],
    )
    .unwrap();
    assert!(cfg.embedded && cfg.external_broker);
    let cfg = load(None, env(&[]), &[]).unwrap();
    assert!(cfg.embedded && !cfg.external_broker);
}

#[test]
fn embedded_only_when_no_server_url_is_set() {
    assert!(load(None, env(&[]), &[]).unwrap().embedded);
    let cfg = load(None, env(&[("HEARTH_REDIS_URL", "redis://r:6379")]), &[]).unwrap();
    assert!(!cfg.embedded);
    assert_eq!(cfg.database_url, Config::default().database_url);
    let flags = [("database-url".to_string(), "postgres://x/y".to_string())];
    assert!(!load(None, env(&[]), &flags).unwrap().embedded);
}

#[test]
fn unknown_keys_are_named_in_the_spelling_of_their_layer() {
    let cfg = load(None, env(&[("HEARTH_SHRADS", "4")]), &[]).unwrap();
    assert!(
        cfg.warnings[0].contains("HEARTH_SHRADS"),
        "{:?}",
        cfg.warnings
    );
    let err = load(None, env(&[]), &[("shrads".into(), "4".into())]).unwrap_err();
    assert!(err.to_string().contains("--shrads"), "{err}");
    let dir = std::env::temp_dir().join(format!("hearth-cfg-u-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("hearth.toml");
    std::fs::write(&file, "shrads = 4\n").unwrap();
    let err = load(Some(&file), env(&[]), &[]).unwrap_err();
    assert!(err.to_string().contains("shrads"), "{err}");
}

#[test]
fn durations_parse_and_never_panic() {
    use std::time::Duration;
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
    assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
    assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
    for bad in [
        "99999999999999999999999h",
        "1e308s",
        "-1s",
        "NaNs",
        "3w",
        "",
        "h",
    ] {
        assert!(parse_duration(bad).is_err(), "{bad}");
    }
}

#[test]
fn kubernetes_service_links_are_ignored_silently() {
    let cfg = load(
        None,
        env(&[
            ("HEARTH_PORT", "tcp://10.0.0.1:8080"),
            ("HEARTH_PORT_8080_TCP", "tcp://10.0.0.1:8080"),
            ("HEARTH_PORT_8080_TCP_ADDR", "10.0.0.1"),
            ("HEARTH_PORT_8080_TCP_PORT", "8080"),
            ("HEARTH_PORT_8080_TCP_PROTO", "tcp"),
            ("HEARTH_SERVICE_HOST", "10.0.0.1"),
            ("HEARTH_SERVICE_PORT", "8080"),
            ("HEARTH_SERVICE_PORT_HTTP", "8080"),
            ("HEARTH_API_SERVICE_HOST", "10.0.0.2"),
        ]),
        &[],
    )
    .unwrap();
    assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
}

#[test]
fn values_are_read_as_their_keys_type() {
    let cfg = load(
        None,
        env(&[
            ("HEARTH_ADMIN_TOKEN", "1234567890123456"),
            ("HEARTH_MQTT_CLIENT_ID", "42"),
            ("HEARTH_MQTT_ALLOW_ANONYMOUS", "false"),
        ]),
        &[],
    )
    .unwrap();
    assert_eq!(cfg.admin_token, "1234567890123456");
    assert_eq!(cfg.mqtt_client_id, "42");
    assert!(!cfg.mqtt_allow_anonymous);
    let err = load(None, env(&[("HEARTH_WORKERS", "two")]), &[]).unwrap_err();
    assert!(err.to_string().contains("HEARTH_WORKERS"), "{err}");
}

#[test]
fn admin_tokens_are_long_and_anonymous_mqtt_stays_on_loopback() {
    let err = load(None, env(&[("HEARTH_ADMIN_TOKEN", "a")]), &[]).unwrap_err();
    assert!(err.to_string().contains("at least 16"), "{err}");
    let err = load(None, env(&[("HEARTH_MQTT_LISTEN", "0.0.0.0:1883")]), &[]).unwrap_err();
    assert!(err.to_string().contains("mqtt_allow_anonymous"), "{err}");
    assert!(
        load(
            None,
            env(&[
                ("HEARTH_MQTT_LISTEN", "0.0.0.0:1883"),
                ("HEARTH_MQTT_ALLOW_ANONYMOUS", "false")
            ]),
            &[]
        )
        .is_ok()
    );
}

#[test]
fn bad_values_are_one_line() {
    let err = load(None, env(&[("HEARTH_SHARDS", "many")]), &[]).unwrap_err();
    let msg = err.to_string();
    assert!(
        !msg.contains('\n') && msg.contains("HEARTH_SHARDS"),
        "{msg}"
    );
    let err = load(None, env(&[("HEARTH_SHARDS", "0")]), &[]).unwrap_err();
    assert!(err.to_string().contains("shards must be"), "{err}");
    let err = load(None, env(&[("HEARTH_REDIS_URL", "localhost:6379")]), &[]).unwrap_err();
    assert!(err.to_string().contains("redis_url"), "{err}");
}
