//! The command line's contract: exit codes and one-line errors for bad configuration, and a
//! README that documents every configuration key.

mod support;

use support::*;

#[test]
fn unknown_key_or_bad_value_is_one_line_and_exit_code_2() {
    let env = Env::new("cli");
    for (args, extra_env, needle) in [
        (vec!["--set", "shrads=4", "status"], None, "--shrads"),
        (
            vec!["status"],
            Some(("HEARTH_BATCH_SIZE", "many")),
            "HEARTH_BATCH_SIZE",
        ),
        (
            vec!["status"],
            Some(("HEARTH_ADMIN_TOKEN", "short")),
            "admin_token",
        ),
        (vec!["--shards", "lots", "status"], None, "shards"),
        (
            vec!["--redis-url", "localhost:6379", "status"],
            None,
            "redis_url",
        ),
    ] {
        let mut cmd = env.command(&args);
        if let Some((k, v)) = extra_env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run hearth");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    let mut bad_file = env.command(&["--config", "hearth.toml", "status"]);
    std::fs::write(
        env.scratch.0.join("hearth.toml"),
        "shards = 4\nwrokers = 2\n",
    )
    .unwrap();
    let out = bad_file.output().expect("run hearth");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrokers"));
}

/// The environment is shared with the rest of the world: an unknown `HEARTH_*` variable is a
/// warning, and the ones Kubernetes injects for a Service named `hearth` are not even that.
#[test]
fn unknown_environment_variables_warn_and_service_links_pass() {
    let env = Env::new("cli_env");
    let run = |vars: &[(&str, &str)]| {
        let mut cmd = env.command(&["status"]);
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run hearth");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(0), "{vars:?}: {stderr}");
        stderr
    };
    let typo = run(&[("HEARTH_BATCH_SIZ", "4")]);
    assert!(typo.contains("HEARTH_BATCH_SIZ"), "{typo}");
    let k8s = run(&[
        ("HEARTH_PORT", "tcp://10.0.0.1:8080"),
        ("HEARTH_PORT_8080_TCP_ADDR", "10.0.0.1"),
        ("HEARTH_SERVICE_HOST", "10.0.0.1"),
        ("HEARTH_SERVICE_PORT", "8080"),
        // Typed by their keys: a numeric token or client id is a string.
        ("HEARTH_ADMIN_TOKEN", "1234567890123456"),
        ("HEARTH_MQTT_CLIENT_ID", "42"),
    ]);
    assert!(!k8s.contains("WARN"), "{k8s}");
}

#[test]
fn readme_documents_every_config_key() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    for key in hearth::config::keys() {
        assert!(
            readme.contains(&format!("| `{key}` |")),
            "README's configuration table lacks `{key}`"
        );
    }
}
