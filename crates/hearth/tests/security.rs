//! MQTT security on the servers: the password/ACL example of `deploy/` (user = house id, password
//! = a token of that house, as on the embedded broker) lets a house's devices and apps publish
//! and read only under their own prefix, and the ingest refuses a payload that names another
//! house than its topic.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_house_publishes_and_reads_only_under_its_own_prefix() {
    let mut env = Env::new("acl");
    // The scheme of the embedded broker: user = house id, password = a token of that house.
    let (t1, t2) = (token_for(&env, "house-1"), token_for(&env, "house-2"));
    let passwd = env.scratch.0.join("passwd");
    for (i, (user, password)) in [
        ("house-1", t1.as_str()),
        ("house-2", t2.as_str()),
        ("hearth", "pwh"),
    ]
    .iter()
    .enumerate()
    {
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

    // house-1's app listens to everything it can: the broker gives it its own house only.
    let mut opts = rumqttc::MqttOptions::new(format!("app-{}", env.name), "127.0.0.1", broker.port);
    opts.set_credentials("house-1", &t1);
    let (app, mut app_events) = rumqttc::AsyncClient::new(opts, 100);
    app.subscribe("#", rumqttc::QoS::AtMostOnce)
        .await
        .expect("subscribe");
    let heard = tokio::spawn(async move {
        let mut topics = Vec::new();
        let until = tokio::time::Instant::now() + Duration::from_secs(8);
        while let Ok(Ok(event)) = tokio::time::timeout_at(until, app_events.poll()).await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = event {
                topics.push(p.topic);
            }
        }
        topics
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    let reading = |seq: u32| format!(r#"{{"kind":"power","value":5,"seq":{seq}}}"#).into_bytes();
    publish_all_as(
        broker.port,
        &format!("dev-{}", env.name),
        Some(("house-1", &t1)),
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
    publish_all_as(
        broker.port,
        &format!("dev2-{}", env.name),
        Some(("house-2", &t2)),
        vec![("hearth/house-2/meter".into(), reading(7))],
    )
    .await;
    wait_drained(&env, 3, Duration::from_secs(60)).await;
    let pg = env.pg().await;
    let rows = pg
        .query(
            "SELECT house_id, seq FROM events ORDER BY house_id, id",
            &[],
        )
        .await
        .expect("rows");
    let got: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        got,
        [
            ("house-1".to_string(), 1),
            ("house-1".to_string(), 3),
            ("house-2".to_string(), 7)
        ]
    );
    let dead = env.dead_letters().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["reason"], "house_mismatch");
    let topics = heard.await.expect("listener");
    assert!(
        topics.iter().all(|t| t.starts_with("hearth/house-1/")),
        "house-1 read {topics:?}"
    );
    assert!(!topics.is_empty(), "house-1 reads its own house");

    // Without a password, or with another house's token, the broker refuses the connection.
    for args in [vec![], vec!["-u", "house-2", "-P", t1.as_str()]] {
        let refused = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &broker.port.to_string(),
                "-t",
                "hearth/house-2/x",
                "-m",
                "1",
            ])
            .args(&args)
            .output()
            .expect("mosquitto_pub");
        assert!(!refused.status.success(), "{args:?}");
    }
}
