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

/// The config file is found (`--config`, then `HEARTH_CONFIG`, then `./hearth.toml`), any key
/// may come from a file (`{key}_file`, `HEARTH_{KEY}_FILE`), and `hearth config check|print`
/// say what was loaded without printing a secret; a secret file too large, missing, or set
/// beside its key is one line and exit code 2.
#[test]
fn config_files_secret_files_check_and_print() {
    let env = Env::embedded("cli_config");
    let dir = &env.scratch.0;
    let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
    write("hearth.toml", "shards = 5\n");
    write(
        "other.toml",
        "shards = 6\nadmin_token_file = \"token.txt\"\n",
    );
    write("token.txt", "a-secret-admin-token-0123\n");
    write("db.txt", "postgres://hearth:s3cr3t-pw@127.0.0.1:5432/x\n");
    write("big.txt", &"x".repeat(70_000));
    let run = |args: &[&str], vars: &[(&str, &str)]| {
        let mut cmd = env.command(args);
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run hearth");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };

    let (code, out, err) = run(&["config", "print"], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("shards = 5"), "./hearth.toml read: {out}");

    let other = [("HEARTH_CONFIG", "other.toml")];
    let (code, out, err) = run(&["config", "print"], &other);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("shards = 6"), "HEARTH_CONFIG wins: {out}");
    assert!(out.contains("admin_token = \"********\""), "{out}");
    assert!(!out.contains("a-secret"), "the token printed: {out}");
    let (code, out, _) = run(&["config", "check"], &other);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("config ok") && out.contains("other.toml"),
        "{out}"
    );
    let (_, out, _) = run(&["--config", "hearth.toml", "config", "print"], &other);
    assert!(out.contains("shards = 5"), "--config wins: {out}");

    let (code, out, err) = run(
        &["config", "print"],
        &[("HEARTH_DATABASE_URL_FILE", "db.txt")],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("postgres://hearth:********@127.0.0.1:5432/x"),
        "{out}"
    );
    assert!(!out.contains("s3cr3t"), "the password printed: {out}");

    for (vars, needle) in [
        (
            vec![
                ("HEARTH_DATABASE_URL_FILE", "db.txt"),
                ("HEARTH_DATABASE_URL", "postgres://x@h/d"),
            ],
            "both",
        ),
        (vec![("HEARTH_ADMIN_TOKEN_FILE", "big.txt")], "more than"),
        (
            vec![("HEARTH_ADMIN_TOKEN_FILE", "missing.txt")],
            "missing.txt",
        ),
        (vec![("HEARTH_CONFIG", "absent.toml")], "absent.toml"),
    ] {
        let (code, _, err) = run(&["config", "check"], &vars);
        assert_eq!(code, Some(2), "{vars:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{vars:?}: {err}");
        assert!(err.contains(needle), "{vars:?}: {err}");
    }
}

/// `log_format = "json"`: every log line is one JSON object (here the warning about an unknown
/// variable); `hearth completions bash` prints a completion script without any config.
#[test]
fn json_logs_and_shell_completions() {
    let env = Env::embedded("cli_json");
    let out = env
        .command(&["config", "check"])
        .env("HEARTH_LOG_FORMAT", "json")
        .env("HEARTH_BATCH_SIZ", "4")
        .output()
        .expect("run hearth");
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["level"] == "WARN"
            && l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("HEARTH_BATCH_SIZ"))),
        "{stderr}"
    );
    let out = env
        .command(&["completions", "bash"])
        .env("HEARTH_SHARDS", "not a number")
        .output()
        .expect("run hearth");
    assert_eq!(out.status.code(), Some(0));
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(
        script.contains("_hearth()") && script.contains("completions"),
        "{script}"
    );
}
