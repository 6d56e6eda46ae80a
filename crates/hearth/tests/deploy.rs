//! The deploy files agree with hearth and with each other: `deploy/compose.yaml` (its services,
//! ports, URLs, mounted files, hearth's environment), the `Dockerfile` (non-root, its ports and
//! environment), the Mosquitto configuration the compose file mounts (deploy/mosquitto.conf but
//! for its listener and data folder), Prometheus's scrape target and Grafana's provisioning; every
//! `HEARTH_*` setting is one of hearth's keys, and `hearth config check` accepts it. No container
//! engine is needed: the files are read, and hearth itself judges its settings.

mod support;

use std::collections::BTreeMap;
use std::path::Path;

use support::*;
use yaml_rust2::{Yaml, YamlLoader};

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Yaml {
    YamlLoader::load_from_str(&read(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .remove(0)
}

/// A service's `environment` as a map.
fn environment(service: &Yaml) -> BTreeMap<String, String> {
    service["environment"]
        .as_hash()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            let value = match v {
                Yaml::String(s) => s.clone(),
                Yaml::Integer(i) => i.to_string(),
                other => panic!("environment value {other:?}"),
            };
            (k.as_str().expect("name").to_string(), value)
        })
        .collect()
}

fn strings(node: &Yaml) -> Vec<String> {
    node.as_vec()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

/// The container ports a service publishes (`host:port:container` or `port:container`).
fn published(service: &Yaml) -> Vec<u16> {
    strings(&service["ports"])
        .iter()
        .map(|p| p.rsplit(':').next().expect("port").parse().expect("a port"))
        .collect()
}

fn port_of(address: &str) -> u16 {
    address
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no port in {address:?}"))
}

/// Every `HEARTH_*` name must be one of hearth's keys (or its `_file` variant).
fn assert_known_keys<'a>(names: impl IntoIterator<Item = &'a String>, origin: &str) {
    let defaults = toml::Table::try_from(hearth::config::Config::default()).expect("keys");
    for name in names {
        let key = name
            .strip_prefix("HEARTH_")
            .unwrap_or_else(|| panic!("{origin}: {name} is not a HEARTH_ setting"))
            .to_ascii_lowercase();
        let stem = key.strip_suffix("_file").unwrap_or(&key);
        assert!(
            defaults.contains_key(&key) || defaults.contains_key(stem),
            "{origin}: {name} is not a hearth key"
        );
    }
}

/// `hearth config check` with `env` (and nothing else): exit 0; its report.
fn config_check(label: &str, env: &BTreeMap<String, String>) -> String {
    let scratch = Scratch::new(&format!("deploy-{label}-{}", std::process::id()));
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_hearth"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("HEARTH_")) {
        cmd.env_remove(k);
    }
    let out = cmd
        .current_dir(&scratch.0)
        .envs(env)
        .args(["config", "check"])
        .output()
        .expect("hearth config check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "config check with {env:?}: {text}");
    assert!(!text.contains("ignoring"), "{text}");
    text
}

/// The setting lines of a Mosquitto file, without `skip`'s keys.
fn settings(conf: &str, skip: &[&str]) -> Vec<String> {
    conf.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter(|l| !skip.contains(&l.split_whitespace().next().unwrap_or("")))
        .map(str::to_string)
        .collect()
}

#[test]
fn compose_agrees_with_hearth_and_deploy() {
    let compose = yaml("deploy/compose.yaml");
    let services = &compose["services"];
    let mut names: Vec<&str> = services
        .as_hash()
        .expect("services")
        .keys()
        .filter_map(Yaml::as_str)
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "grafana",
            "hearth",
            "mosquitto",
            "postgres",
            "prometheus",
            "redis"
        ]
    );

    // hearth's settings are its keys, and hearth accepts them: on the servers.
    let hearth = &services["hearth"];
    let env = environment(hearth);
    assert_known_keys(env.keys(), "compose.yaml");
    let report = config_check("compose", &env);
    assert!(report.contains("servers"), "{report}");
    let api_port = port_of(&env["HEARTH_API_LISTEN"]);
    assert_eq!(published(hearth), [api_port]);

    // Each URL names its service and the port that service listens on.
    let mosquitto_conf = read("deploy/compose/mosquitto.conf");
    let listener = mosquitto_conf
        .lines()
        .find_map(|l| l.strip_prefix("listener "))
        .expect("a listener");
    let mqtt_port: u16 = listener
        .trim()
        .parse()
        .expect("listener port only: every address");
    assert_eq!(
        env["HEARTH_MQTT_URL"],
        format!("mqtt://mosquitto:{mqtt_port}")
    );
    assert_eq!(published(&services["mosquitto"]), [mqtt_port]);
    let redis_port = read("deploy/redis.conf")
        .lines()
        .find_map(|l| l.strip_prefix("port "))
        .expect("redis port")
        .trim()
        .to_string();
    assert_eq!(
        env["HEARTH_REDIS_URL"],
        format!("redis://redis:{redis_port}")
    );
    let pg = environment(&services["postgres"]);
    assert_eq!(
        env["HEARTH_DATABASE_URL"],
        format!(
            "postgres://{}:{}@postgres:5432/{}",
            pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"]
        )
    );

    // The files the services mount are in the repository.
    for service in names.iter().map(|n| &services[*n]) {
        for volume in strings(&service["volumes"]) {
            if let Some(rest) = volume.strip_prefix("./") {
                let local = rest.split(':').next().expect("path");
                assert!(
                    repo_root().join("deploy").join(local).exists(),
                    "{volume}: deploy/{local} is missing"
                );
            }
        }
    }
    let redis_command = strings(&services["redis"]["command"]);
    assert!(redis_command.contains(&"/usr/local/etc/redis/redis.conf".to_string()));

    // The broker keeps every setting hearth's no-loss guarantee rests on.
    let local = ["listener", "persistence_location"];
    assert_eq!(
        settings(&mosquitto_conf, &local),
        settings(&read("deploy/mosquitto.conf"), &local),
        "deploy/compose/mosquitto.conf must be deploy/mosquitto.conf but for {local:?}"
    );

    // Prometheus scrapes hearth's API port, with hearth's alert rules.
    let prometheus = yaml("deploy/compose/prometheus.yml");
    let targets = strings(&prometheus["scrape_configs"][0]["static_configs"][0]["targets"]);
    assert_eq!(targets, [format!("hearth:{api_port}")]);
    assert!(strings(&services["prometheus"]["volumes"]).iter().any(|v| {
        v.starts_with("./prometheus/alerts.yml:")
            && strings(&prometheus["rule_files"])
                .contains(&v.split(':').nth(1).unwrap().to_string())
    }));

    // Grafana: its data sources are the compose services, its dashboard where the provider looks.
    let sources = yaml("deploy/grafana/provisioning/datasources/hearth.yaml");
    let urls: Vec<&str> = sources["datasources"]
        .as_vec()
        .expect("datasources")
        .iter()
        .filter_map(|d| d["url"].as_str())
        .collect();
    assert_eq!(urls, ["http://prometheus:9090", "postgres:5432"]);
    let password = sources["datasources"][1]["secureJsonData"]["password"]
        .as_str()
        .expect("password");
    let grafana = &services["grafana"];
    let grafana_env = environment(grafana);
    let variable = password.trim_start_matches("${").trim_end_matches('}');
    assert_eq!(grafana_env.get(variable), Some(&pg["POSTGRES_PASSWORD"]));
    let provider = yaml("deploy/grafana/provisioning/dashboards/hearth.yaml");
    let folder = provider["providers"][0]["options"]["path"]
        .as_str()
        .expect("path");
    assert!(
        strings(&grafana["volumes"])
            .contains(&format!("./grafana/hearth.json:{folder}/hearth.json:ro")),
        "the dashboard is mounted where the provider reads"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/hearth.json")).expect("dashboard");
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for v in ["job", "instance", "pg", "house"] {
        assert!(variables.contains(&v), "dashboard variable {v}");
    }

    // The README says how to start it and where to look.
    let readme = read("README.md");
    for needle in [
        "docker compose -f deploy/compose.yaml up",
        "127.0.0.1:3000",
        "127.0.0.1:9090",
    ] {
        assert!(readme.contains(needle), "README: {needle}");
    }
}

#[test]
fn dockerfile_runs_hearth_as_non_root_with_its_own_settings() {
    let dockerfile = read("Dockerfile");
    let last_stage = dockerfile.rsplit("\nFROM ").next().expect("a final stage");
    let user = last_stage
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER in the final stage");
    assert!(
        !["root", "0", "0:0"].contains(&user.trim()),
        "runs as {user}"
    );
    // ENV lines, joined over their continuations.
    let joined = last_stage.replace("\\\n", " ");
    let env: BTreeMap<String, String> = joined
        .lines()
        .filter_map(|l| l.strip_prefix("ENV "))
        .flat_map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    assert_known_keys(env.keys(), "Dockerfile");
    // The image's own settings are a valid embedded configuration (the data folder aside, which
    // exists only in the image).
    let mut check = env.clone();
    check.remove("HEARTH_DATA_DIR");
    let report = config_check("docker", &check);
    assert!(report.contains("embedded"), "{report}");
    let exposed: Vec<u16> = joined
        .lines()
        .filter_map(|l| l.strip_prefix("EXPOSE "))
        .flat_map(|l| {
            l.split_whitespace()
                .map(|p| p.parse::<u16>().expect("port"))
        })
        .collect();
    assert_eq!(
        exposed,
        [
            port_of(&env["HEARTH_API_LISTEN"]),
            port_of(&env["HEARTH_MQTT_LISTEN"])
        ]
    );
    assert!(Path::new(&repo_root().join(".dockerignore")).exists());
}
