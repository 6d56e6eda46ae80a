//! MQTT security: the password/ACL example of `deploy/` lets a house's devices publish only under
//! their own prefix, and the ingest refuses a payload that names another house than its topic.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_house_publishes_only_under_its_own_prefix() {
    let mut env = Env::new("acl");
    let passwd = env.scratch.0.join("passwd");
    for (i, (user, password)) in [("house-1", "pw1"), ("hearth", "pwh")].iter().enumerate() {
        let mut cmd = Command::new("mosquitto_passwd");
        if i == 0 {
            cmd.arg("-c");
        }
        let status = cmd
            .arg("-b")
            .arg(&passwd)
            .arg(user)
            .arg(password)
            .status()
            .expect("mosquitto_passwd");
        assert!(status.success());
    }
    // A copy beside the password file: Mosquitto reads it after dropping to its own user, which
    // may not reach into the checkout (a `mktemp -d` clone is private to its owner).
    let acl = env.scratch.0.join("acl");
    std::fs::copy(repo_root().join("deploy/mosquitto-acl.example"), &acl).expect("acl example");
    let broker = Broker::start_with(
        &env.scratch.0,
        0,
        &[
            "allow_anonymous false".into(),
            format!("password_file {}", passwd.display()),
            format!("acl_file {}", acl.display()),
        ],
    );
    env.set(
        "mqtt_url",
        format!("mqtt://hearth:pwh@127.0.0.1:{}", broker.port),
    );
    let _up = env.up().await;

    let reading = |seq: u32| format!(r#"{{"kind":"power","value":5,"seq":{seq}}}"#).into_bytes();
    publish_all_as(
        broker.port,
        &format!("dev-{}", env.name),
        Some(("house-1", "pw1")),
        vec![
            ("hearth/house-1/meter".into(), reading(1)),
            // Not its house: the broker drops it (MQTT 3.1.1 still acknowledges it).
            ("hearth/house-2/meter".into(), reading(1)),
            // Its topic, but the payload names another house: the ingest refuses it.
            (
                "hearth/house-1/meter".into(),
                br#"{"kind":"power","value":5,"seq":2,"house_id":"house-2"}"#.to_vec(),
            ),
            ("hearth/house-1/meter".into(), reading(3)),
        ],
    )
    .await;
    wait_drained(&env, 2, Duration::from_secs(60)).await;
    let pg = env.pg().await;
    let rows = pg
        .query("SELECT house_id, seq FROM events ORDER BY id", &[])
        .await
        .expect("rows");
    let got: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        got,
        [("house-1".to_string(), 1), ("house-1".to_string(), 3)]
    );
    let dead = env.dead_letters().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["reason"], "house_mismatch");

    // Without a password the broker refuses the connection outright.
    let anonymous = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port.to_string(),
            "-t",
            "hearth/house-1/x",
            "-m",
            "1",
        ])
        .output()
        .expect("mosquitto_pub");
    assert!(!anonymous.status.success());
}
