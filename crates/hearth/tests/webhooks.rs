//! Webhooks as people run them: by name, over HTTPS, in the formats of the services homes use
//! (generic JSON, ntfy, Slack/Discord, Alertmanager), with headers; a receiver that fails is
//! retried, its breaker opens, its notifications are dead-lettered; no URL is ever shown.
//! The receivers are local HTTPS servers whose certificates a test CA (made with `openssl`)
//! signed.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;

const ADMIN: &str = "webhooks-test-admin-token-01234";

async fn admin_get(addr: &str, path: &str) -> Value {
    let (_, body) = http(addr, "GET", path, Some(ADMIN), None).await;
    serde_json::from_str(&body).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_in_every_format_over_https() {
    let mut env = Env::embedded("hooks_https");
    let pki = Pki::new(&env.scratch.0.join("pki"));
    let good = Hook::https(0, pki.acceptor(&[b"http/1.1"])).await;
    let broken = Hook::https(u32::MAX, pki.acceptor(&[b"http/1.1"])).await;
    let secret = "s3cr3t-topic-9f2c";
    let ca = pki.path("ca.pem");
    let rules = env.scratch.0.join("rules.toml");
    std::fs::write(
        &rules,
        format!(
            r#"{SMOKE_RULE}
[[webhook]]
name = "generic"
url = "{good}/generic"
ca = "{ca}"
headers = {{ Authorization = "Bearer hook-token" }}

[[webhook]]
name = "phone"
format = "ntfy"
url = "{good}/{secret}"
ca = "{ca}"

[[webhook]]
name = "chat"
format = "slack"
url = "{good}/services/T0/B0/{secret}-slack"
ca = "{ca}"

[[webhook]]
name = "am"
format = "alertmanager"
url = "{good}/api/v2/alerts"
ca = "{ca}"
severities = ["critical"]

[[webhook]]
name = "untrusted"
url = "{good}/untrusted-{secret}"

[[webhook]]
name = "broken"
url = "{broken}/{secret}-broken"
ca = "{ca}"
"#,
            good = good.base,
            broken = broken.base,
        ),
    )
    .expect("rules");
    env.set("admin_token", ADMIN)
        .set("rules_file", rules.display());
    let up = env.up().await;
    let addr = up.http_addr().await;
    let port = env.embedded_port.expect("port");

    let smoke = |sensor: &str| {
        (
            format!("hearth/h1/{sensor}"),
            br#"{"kind":"smoke","value":true,"seq":1}"#.to_vec(),
        )
    };
    publish_all(port, "hooks-1", vec![smoke("hall")]).await;
    let requests = eventually(
        "four formats delivered",
        Duration::from_secs(60),
        || async {
            let r = good.requests.lock().ok()?.clone();
            (r.len() >= 4).then_some(r)
        },
    )
    .await;
    let by_path = |prefix: &str| {
        requests
            .iter()
            .find(|r| r.path.starts_with(prefix))
            .unwrap_or_else(|| panic!("nothing POSTed to {prefix}: {requests:?}"))
            .clone()
    };

    let generic = by_path("/generic");
    assert_eq!(generic.header("authorization"), Some("Bearer hook-token"));
    assert_eq!(generic.header("content-type"), Some("application/json"));
    let body: Value = serde_json::from_str(&generic.body).expect("generic JSON");
    assert_eq!(
        (body["type"].as_str(), body["alert"]["rule"].as_str()),
        (Some("alert"), Some("smoke"))
    );

    let ntfy = by_path(&format!("/{secret}"));
    assert!(ntfy.body.contains("smoke at h1/hall"), "{ntfy:?}");
    assert_eq!(ntfy.header("priority"), Some("urgent"));
    assert!(
        ntfy.header("title")
            .is_some_and(|t| t.contains("Smoke detected"))
    );
    assert!(
        ntfy.header("tags")
            .is_some_and(|t| t.contains("rotating_light"))
    );

    let slack: Value = serde_json::from_str(&by_path("/services/").body).expect("slack JSON");
    assert!(
        slack["text"]
            .as_str()
            .is_some_and(|t| t.contains("Smoke detected"))
    );
    assert_eq!(slack["text"], slack["content"], "Discord reads `content`");

    let am: Value = serde_json::from_str(&by_path("/api/v2/alerts").body).expect("AM JSON");
    let item = &am[0];
    assert_eq!(item["labels"]["alertname"], "smoke");
    assert_eq!(item["labels"]["severity"], "critical");
    assert_eq!(item["labels"]["house"], "h1");
    assert!(item["startsAt"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert!(item["endsAt"].is_string());
    assert!(
        requests.iter().all(|r| !r.path.contains("untrusted")),
        "a receiver whose certificate the webhook does not trust gets nothing"
    );

    // The broken receiver: three attempts, then its breaker is open (the fourth is not made);
    // the untrusted one fails its handshake. Each a dead letter, named, without its URL.
    let letters = eventually("two dead letters", Duration::from_secs(60), || async {
        let v = admin_get(&addr, "/api/v1/dlq?reason=webhook_failed").await;
        (v.as_array().map(Vec::len) == Some(2)).then_some(v)
    })
    .await;
    let mut names: Vec<&str> = letters
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["topic"].as_str())
        .collect();
    names.sort();
    assert_eq!(names, ["broken", "untrusted"], "{letters}");
    let text = letters.to_string();
    assert!(
        !text.contains(secret) && !text.contains(&good.base),
        "{text}"
    );
    assert!(text.contains("HTTP 500"), "{text}");
    assert!(text.to_lowercase().contains("certificate"), "{text}");
    assert_eq!(broken.attempts(), 3, "three failures open the breaker");

    // A second alert while the breaker is open: dead-lettered at once, nothing sent there.
    publish_all(port, "hooks-2", vec![smoke("kitchen")]).await;
    eventually(
        "the second alert delivered",
        Duration::from_secs(60),
        || async { (good.requests.lock().ok()?.len() >= 8).then_some(()) },
    )
    .await;
    eventually("its dead letters", Duration::from_secs(60), || async {
        let v = admin_get(&addr, "/api/v1/dlq?reason=webhook_failed").await;
        (v.as_array().map(Vec::len) == Some(4)).then_some(())
    })
    .await;
    assert_eq!(
        broken.attempts(),
        3,
        "nothing sent while the breaker is open"
    );
    let metrics = http_get(&addr, "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "hearth_circuit_open{dependency=\"webhook:broken\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    for leak in [secret, good.base.as_str(), broken.base.as_str()] {
        assert!(!metrics.contains(leak), "{leak} in /metrics");
        assert!(!up.log_text().contains(leak), "{leak} in the log");
    }
}
