//! Seeing and measuring hearth: Prometheus metrics consistent with the rows stored, sequence
//! gaps counted, the alert rules and dashboard checked with the real tools, `hearth sim` and a
//! small `hearth bench` end to end.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

const READY: Duration = Duration::from_secs(60);
const DRAIN: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_agree_with_the_rows_stored_and_pass_promtool() {
    let mut env = Env::new("metrics");
    let broker = Broker::start(&env.scratch.0);
    env.set("mqtt_url", broker.url())
        .set("api_listen", "127.0.0.1:0");
    let up = env.up().await;
    let addr = up.http_addr().await;

    let mut payloads = interleaved("h1", 40, 50);
    payloads.push(("hearth/h1/s1".into(), b"{not json".to_vec()));
    publish_all(broker.port, &format!("pub-{}", env.name), payloads).await;
    wait_drained(&env, 2_000, DRAIN).await;

    let pg = env.pg().await;
    let rows = count_events(&pg).await as f64;
    assert_eq!(rows, 2_000.0);
    let text = http_get(&addr, "/metrics").await;
    assert_eq!(
        metric(&text, "hearth_events_stored_total"),
        Some(rows),
        "{text}"
    );
    assert_eq!(
        metric(&text, "hearth_events_received_total{source=\"mqtt\"}"),
        Some(rows)
    );
    assert_eq!(
        metric(
            &text,
            "hearth_event_latency_seconds_count{lane=\"routine\"}"
        ),
        Some(rows)
    );
    assert_eq!(
        metric(
            &text,
            "hearth_accounting_events_total{outcome=\"received\"}"
        ),
        Some(rows)
    );
    assert_eq!(
        metric(&text, "hearth_accounting_events_total{outcome=\"stored\"}"),
        Some(rows)
    );
    assert_eq!(
        metric(&text, "hearth_accounting_in_flight_events"),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &text,
            "hearth_events_rejected_total{reason=\"malformed_json\"}"
        ),
        Some(1.0)
    );
    assert_eq!(metric(&text, "hearth_dead_letters"), Some(1.0));
    assert_eq!(metric(&text, "hearth_sequence_gaps_total"), Some(0.0));
    assert!(metric(&text, "process_resident_memory_bytes").unwrap_or(0.0) > 0.0);
    for name in hearth::metrics::NAMES {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} is not exported"
        );
    }
    promtool(&["check", "metrics"], Some(&text));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_in_a_sensors_seq_is_counted() {
    let mut env = Env::new("gaps");
    let broker = Broker::start(&env.scratch.0);
    env.set("mqtt_url", broker.url())
        .set("metrics_listen", "127.0.0.1:0");
    let worker = env.hearth("worker", &["worker", "--workers", "1"]);
    worker.wait_log("took lane", READY).await;
    let addr = worker.http_addr().await;
    let ingest = env.hearth("ingest", &["ingest"]);
    ingest.wait_log("subscribed", READY).await;

    // seq 1, 2, 3, then 7: 4, 5 and 6 never arrived. Another sensor counts without a gap.
    let msgs = [
        (1, "a"),
        (2, "a"),
        (1, "b"),
        (3, "a"),
        (2, "b"),
        (7, "a"),
        (3, "b"),
    ];
    let payloads = msgs
        .iter()
        .map(|(seq, s)| {
            let p = serde_json::json!({"kind": "power", "value": 10, "seq": seq});
            (format!("hearth/h1/sensor-{s}"), p.to_string().into_bytes())
        })
        .collect();
    publish_all(broker.port, &format!("pub-{}", env.name), payloads).await;
    wait_drained(&env, msgs.len() as u64, DRAIN).await;
    let text = http_get(&addr, "/metrics").await;
    assert_eq!(
        metric(&text, "hearth_sequence_gaps_total"),
        Some(3.0),
        "{text}"
    );
}

#[test]
fn alert_rules_pass_promtool_check_and_their_tests() {
    let dir = repo_root().join("deploy/prometheus");
    promtool(
        &["check", "rules", &dir.join("alerts.yml").to_string_lossy()],
        None,
    );
    let out = Command::new("promtool")
        .args(["test", "rules", "alerts.test.yml"])
        .current_dir(&dir)
        .output()
        .expect("promtool (Debian package prometheus; scripts/services.sh installs it)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every alert rule points to its section of the runbook, and the section exists.
#[test]
fn every_alert_has_a_runbook_section() {
    let root = repo_root();
    let rules = std::fs::read_to_string(root.join("deploy/prometheus/alerts.yml")).expect("rules");
    let runbook = std::fs::read_to_string(root.join("docs/RUNBOOK.md")).expect("runbook");
    let sections: Vec<String> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(|h| h.trim().to_ascii_lowercase())
        .collect();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 6, "{alerts:?}");
    for alert in alerts {
        let anchor = alert.to_ascii_lowercase();
        assert!(
            rules.contains(&format!("runbook_url: \"docs/RUNBOOK.md#{anchor}\"")),
            "{alert} has no runbook_url"
        );
        assert!(sections.contains(&anchor), "no runbook section for {alert}");
    }
}

#[test]
fn dashboard_and_alerts_only_use_exported_metrics() {
    let root = repo_root();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/hearth.json")).expect("dashboard"),
    )
    .expect("the dashboard is JSON");
    let mut exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    assert!(exprs.len() >= 10, "a dashboard of the essentials");
    let rules = std::fs::read_to_string(root.join("deploy/prometheus/alerts.yml")).expect("rules");
    exprs.extend(rules.lines().map(str::to_string));
    for expr in exprs {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("hearth_") || word.starts_with("process_") {
                let base = word
                    .trim_end_matches("_bucket")
                    .trim_end_matches("_sum")
                    .trim_end_matches("_count");
                assert!(
                    hearth::metrics::NAMES.contains(&base),
                    "{word} is used but not exported"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_readings_are_all_stored_without_gaps() {
    let mut env = Env::new("sim");
    let broker = Broker::start(&env.scratch.0);
    env.set("mqtt_url", broker.url())
        .set("api_listen", "127.0.0.1:0");
    let up = env.up().await;
    let addr = up.http_addr().await;

    let out = env
        .command(&[
            "sim",
            "--houses",
            "3",
            "--sensors-per-house",
            "10",
            "--rate",
            "400",
        ])
        .args(["--duration", "2s", "--profile", "ramp", "--json"])
        .output()
        .expect("hearth sim");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("summary JSON");
    let published = summary["published"].as_u64().expect("published");
    assert!(published > 300, "{summary}");
    assert_eq!(summary["sensors"], 30);

    wait_drained(&env, published, DRAIN).await;
    let pg = env.pg().await;
    assert_eq!(count_events(&pg).await as u64, published);
    let kinds: i64 = pg
        .query_one("SELECT count(DISTINCT kind) FROM events", &[])
        .await
        .expect("kinds")
        .get(0);
    assert_eq!(kinds, 10, "every kind of the mix");
    let text = http_get(&addr, "/metrics").await;
    assert_eq!(metric(&text, "hearth_sequence_gaps_total"), Some(0.0));
}

#[test]
fn small_bench_is_clean_prints_both_ratios_and_its_json_parses() {
    let env = Env::new("bench");
    let out = env
        .command(&[
            "bench",
            "--events",
            "3000",
            "--sensors",
            "60",
            "--worker-processes",
            "2",
        ])
        .args(["--sync-events", "300", "--json"])
        .output()
        .expect("hearth bench");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bench JSON");
    let h = &report["hearth"];
    assert_eq!(
        (
            h["lost"].as_u64(),
            h["duplicated"].as_u64(),
            h["out_of_order"].as_u64()
        ),
        (Some(0), Some(0), Some(0)),
        "{report}"
    );
    assert_eq!(h["stored"], 3000);
    assert!(report["ratios"]["vs_raw"].as_f64().unwrap_or(0.0) > 0.0);
    assert!(report["ratios"]["vs_sync"].as_f64().unwrap_or(0.0) > 0.0);
    assert!(h["receive_to_stored_ms"]["p99"].as_f64().is_some());

    // The table for people, from the same code.
    let out = env
        .command(&[
            "bench",
            "--events",
            "500",
            "--sensors",
            "20",
            "--worker-processes",
            "1",
        ])
        .args(["--sync-events", "100"])
        .output()
        .expect("hearth bench");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(
        table.contains("vs raw")
            && table.contains("vs sync")
            && table.contains("lost 0, duplicated 0, out of order 0"),
        "{table}"
    );
}

fn promtool(args: &[&str], stdin: Option<&str>) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/services.sh installs it)");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write");
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
