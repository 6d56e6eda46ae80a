//! The dashboard end to end in Debian's Chromium, driven by Playwright (`tests/browser/`):
//! a value changes after an MQTT publish, a smoke alarm appears, Acknowledge changes its state,
//! a device announced by Home Assistant discovery shows its readings and availability.
//! Once on the servers (Mosquitto, Redis, PostgreSQL) and once embedded (no server at all).
//! The screenshots go to `target/dashboard.png` and `target/dashboard-embedded.png`
//! (`docs/dashboard.png` is a copy of one).

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

const ADMIN: &str = "admin-browser-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_live_values_and_alerts_in_a_browser() {
    let mut env = Env::new("browser");
    let broker = Broker::start(&env.scratch.0);
    env.set("mqtt_url", broker.url());
    in_a_browser(env, broker.port, "dashboard.png").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_on_the_embedded_backend_in_a_browser() {
    let env = Env::embedded("browser_e");
    let port = env.embedded_port.expect("port");
    in_a_browser(env, port, "dashboard-embedded.png").await;
}

async fn in_a_browser(mut env: Env, mqtt_port: u16, screenshot: &str) {
    let dir = repo_root().join("tests/browser");
    // Both tests of this file may get here at once: one installs, the other waits.
    static NPM: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let installing = NPM.lock().unwrap_or_else(|e| e.into_inner());
    if !dir.join("node_modules/playwright-core").exists() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .expect("npm (Debian packages nodejs and npm; scripts/services.sh installs them)");
        assert!(status.success(), "npm ci in tests/browser");
    }
    drop(installing);
    let house = format!("house-{}", std::process::id());
    // Devices of the ecosystems (discovery among them) feed the test's house.
    env.set("admin_token", ADMIN).set("default_house", &house);
    let up = env.up().await;
    let addr = up.http_addr().await;
    publish_all(
        mqtt_port,
        &format!("pub-{}", env.name),
        vec![(
            format!("hearth/{house}/living-temp"),
            br#"{"kind":"temperature","value":21.5,"seq":1}"#.to_vec(),
        )],
    )
    .await;
    wait_drained(&env, 1, Duration::from_secs(60)).await;

    let screenshot = repo_root().join("target").join(screenshot);
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("dashboard.mjs")
            .current_dir(&dir)
            .env("HEARTH_URL", format!("http://{addr}/"))
            .env("HEARTH_TOKEN", ADMIN)
            .env("MQTT_PORT", mqtt_port.to_string())
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
        "discovered device shown",
        "screenshot saved",
    ] {
        assert!(said.contains(step), "{step}");
    }
}
