//! The dashboard end to end in Debian's Chromium, driven by Playwright (`tests/browser/`):
//! a value changes after an MQTT publish, a smoke alarm appears, Acknowledge changes its state.
//! The screenshot goes to `target/dashboard.png` (`docs/dashboard.png` is a copy of one).

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

const ADMIN: &str = "admin-browser";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_live_values_and_alerts_in_a_browser() {
    let dir = repo_root().join("tests/browser");
    if !dir.join("node_modules/playwright-core").exists() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .expect("npm (Debian packages nodejs and npm; scripts/services.sh installs them)");
        assert!(status.success(), "npm ci in tests/browser");
    }
    let mut env = Env::new("browser");
    let broker = Broker::start(&env.scratch.0);
    env.set("mqtt_url", broker.url()).set("admin_token", ADMIN);
    let up = env.up().await;
    let addr = up.http_addr().await;
    let house = format!("house-{}", std::process::id());
    publish_all(
        broker.port,
        &format!("pub-{}", env.name),
        vec![(
            format!("hearth/{house}/living-temp"),
            br#"{"kind":"temperature","value":21.5,"seq":1}"#.to_vec(),
        )],
    )
    .await;
    wait_drained(&env, 1, Duration::from_secs(60)).await;

    let screenshot = repo_root().join("target/dashboard.png");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("dashboard.mjs")
            .current_dir(&dir)
            .env("HEARTH_URL", format!("http://{addr}/"))
            .env("HEARTH_TOKEN", ADMIN)
            .env("MQTT_PORT", broker.port.to_string())
            .env("HOUSE", &house)
            .env("SCREENSHOT", &screenshot)
            .output()
            .expect("node")
    })
    .await
    .expect("join");
    let said = String::from_utf8_lossy(&out.stdout);
    eprintln!("{said}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the browser test failed");
    for step in [
        "value changed after an MQTT publish",
        "smoke alert shown",
        "alert acknowledged",
        "screenshot saved",
    ] {
        assert!(said.contains(step), "{step}");
    }
}
