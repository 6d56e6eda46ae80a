//! TLS on every link, against real servers configured for TLS by the test itself: a private
//! Mosquitto with a TLS listener that requires a client certificate, a private `redis-server`
//! with `--tls-port` only (client certificates required, Redis's default), a private PostgreSQL
//! (`initdb`) with `ssl = on` that refuses unencrypted connections; hearth's API over HTTPS and
//! the embedded broker's TLS listener. Certificates are made at test time with `openssl`.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::*;

const ADMIN: &str = "tls-test-admin-token-0123456789";

/// A `redis-server` that speaks TLS only, and wants a client certificate.
struct TlsRedis {
    port: u16,
    child: Child,
}

impl TlsRedis {
    fn start(dir: &Path, pki: &Pki) -> TlsRedis {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--bind", "127.0.0.1"])
            .args(["--tls-port", &port.to_string()])
            .args(["--tls-cert-file", &pki.path("server.pem")])
            .args(["--tls-key-file", &pki.path("server.key")])
            .args(["--tls-ca-cert-file", &pki.path("ca.pem")])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        wait_port(port);
        TlsRedis { port, child }
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private PostgreSQL with `ssl = on` (the `pg` certificate, for `localhost` only) that
/// refuses connections without TLS.
fn tls_postgres(dir: &Path, pki: &Pki) -> Postgres {
    let pg = Postgres::init(dir);
    for (from, to) in [("pg.pem", "server.crt"), ("pg.key", "server.key")] {
        let target = pg.data.join(to);
        std::fs::copy(pki.dir.join(from), &target).expect("copy certificate");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        if hearth_bench::mosquitto::running_as_root() {
            let _ = Command::new("chown").arg("postgres:").arg(&target).status();
        }
    }
    let conf = pg.data.join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).expect("postgresql.conf");
    text.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
    std::fs::write(&conf, text).expect("postgresql.conf");
    std::fs::write(
        pg.data.join("pg_hba.conf"),
        "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
    )
    .expect("pg_hba.conf");
    pg.up();
    pg
}

/// `mosquitto_pub` (Mosquitto's own client) publishing `lines` to `topic` at QoS 1 through
/// `args`' connection settings; its exit status.
fn mosquitto_pub(port: u16, args: &[&str], topic: &str, lines: &[String]) -> bool {
    use std::io::Write;
    let mut child = Command::new("timeout")
        .args([
            "20",
            "mosquitto_pub",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .args(args)
        .args(["-q", "1", "-t", topic, "-l"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_pub");
    let mut stdin = child.stdin.take().expect("stdin");
    for line in lines {
        let _ = writeln!(stdin, "{line}");
    }
    drop(stdin);
    child.wait().expect("mosquitto_pub").success()
}

fn readings(count: u64) -> Vec<String> {
    (1..=count)
        .map(|seq| {
            format!(
                r#"{{"kind":"temperature","value":{}.5,"seq":{seq}}}"#,
                18 + seq % 5
            )
        })
        .collect()
}

/// `curl` over HTTPS, trusting `ca`: (succeeded, body).
fn curl(url: &str, ca: &str, token: &str) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert", ca, "-H"])
        .arg(format!("Authorization: Bearer {token}"))
        .arg(url)
        .output()
        .expect("curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_over_tls_on_every_link() {
    let mut env = Env::new("tls_servers");
    let pki = Pki::new(&env.scratch.0.join("pki"));
    let broker = Broker::start_with(
        &env.scratch.0,
        0,
        &[
            format!("cafile {}", pki.path("ca.pem")),
            format!("certfile {}", pki.path("server.pem")),
            format!("keyfile {}", pki.path("server.key")),
            "require_certificate true".to_string(),
        ],
    );
    let redis = TlsRedis::start(&env.scratch.0, &pki);
    let pg = tls_postgres(&env.scratch.0, &pki);
    let client = pki.client_query();
    let ca = pki.path("ca.pem");
    env.database_url = format!(
        "postgres://postgres@localhost:{}/hearth?sslmode=verify-full&sslrootcert={ca}",
        pg.port
    );
    env.set(
        "redis_url",
        format!("rediss://127.0.0.1:{}?{client}", redis.port),
    )
    .set(
        "mqtt_url",
        format!("mqtts://127.0.0.1:{}?{client}", broker.port),
    )
    .set("api_tls_cert", pki.path("server.pem"))
    .set("api_tls_key", pki.path("server.key"))
    .set("grpc_listen", "127.0.0.1:0")
    .set("admin_token", ADMIN);

    let up = env.up().await;
    let addr = up.http_addr().await;
    let port = addr.rsplit_once(':').expect("port").1.to_string();
    let grpc_port = up.grpc_port().await;

    // Devices publish over TLS with their certificate; without one the broker refuses them.
    let tls_args = [
        "--cafile",
        &ca,
        "--cert",
        &pki.path("client.pem"),
        "--key",
        &pki.path("client.key"),
    ];
    for s in 0..4 {
        let topic = format!("hearth/h1/sensor-{s}");
        assert!(mosquitto_pub(broker.port, &tls_args, &topic, &readings(50)));
    }
    assert!(
        !mosquitto_pub(broker.port, &["--cafile", &ca], "hearth/h1/x", &readings(1)),
        "the broker requires a client certificate"
    );

    // Stored once each, in order, read back over TLS too.
    let store = hearth::servers::postgres::connect(&env.database_url)
        .await
        .expect("postgres over tls");
    wait_rows(&store, 200, Duration::from_secs(60)).await;
    assert_exactly_once_in_order(&store, 200).await;
    let status = env.status();
    assert_eq!(status["events"]["stored"], 200, "{status}");

    // The API over HTTPS, checked against the CA; plain HTTP gets no answer.
    let (ok, body) = curl(
        &format!("https://localhost:{port}/api/v1/houses/h1/sensors"),
        &ca,
        ADMIN,
    );
    assert!(ok && body.contains("sensor-3"), "{body}");
    let (ok, _) = curl(
        &format!("https://localhost:{port}/healthz"),
        &pki.path("other-ca.pem"),
        ADMIN,
    );
    assert!(!ok, "a client that does not trust hearth's CA must fail");
    let (status, _) = http(&addr, "GET", "/healthz", None, None).await;
    assert_eq!(status, 0, "plain HTTP on the HTTPS port");

    // gRPC over TLS with the API's certificate; a plaintext gRPC client gets nowhere.
    use hearth::api::grpc::proto;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            std::fs::read(&ca).expect("ca"),
        ))
        .domain_name("localhost");
    let channel = tonic::transport::Channel::from_shared(format!("https://127.0.0.1:{grpc_port}"))
        .expect("url")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("gRPC over TLS");
    let mut grpc = proto::hearth_client::HearthClient::new(channel);
    let mut request = tonic::Request::new(proto::SensorRef {
        house_id: "h1".into(),
        sensor_id: "sensor-3".into(),
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {ADMIN}").parse().expect("metadata"),
    );
    let latest = grpc
        .latest(request)
        .await
        .expect("latest over TLS")
        .into_inner();
    assert_eq!(
        (latest.house_id.as_str(), latest.sensor_id.as_str()),
        ("h1", "sensor-3")
    );
    let plain = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{grpc_port}"))
        .expect("url")
        .connect()
        .await;
    if let Ok(channel) = plain {
        let mut grpc = proto::hearth_client::HearthClient::new(channel);
        let answer = grpc
            .latest(proto::SensorRef {
                house_id: "h1".into(),
                sensor_id: "sensor-3".into(),
            })
            .await;
        assert!(answer.is_err(), "plaintext gRPC on the TLS port");
    }

    // PostgreSQL: each sslmode checks what it says.
    let pg_url = |host: &str, query: &str| {
        format!("postgres://postgres@{host}:{}/postgres?{query}", pg.port)
    };
    let connects = |url: String| async move { hearth::servers::postgres::connect(&url).await };
    let full = format!("sslmode=verify-full&sslrootcert={ca}");
    assert!(connects(pg_url("localhost", &full)).await.is_ok());
    let wrong_name = connects(pg_url("127.0.0.1", &full)).await;
    let Err(e) = wrong_name else {
        panic!("verify-full must refuse a name the certificate lacks");
    };
    let message = e.to_string();
    assert!(message.contains("not valid for name"), "{message}");
    let chain = format!("sslmode=verify-ca&sslrootcert={ca}");
    assert!(connects(pg_url("127.0.0.1", &chain)).await.is_ok());
    assert!(
        connects(pg_url("127.0.0.1", "sslmode=require"))
            .await
            .is_ok()
    );
    let other = format!(
        "sslmode=verify-full&sslrootcert={}",
        pki.path("other-ca.pem")
    );
    assert!(connects(pg_url("localhost", &other)).await.is_err());
    assert!(
        connects(pg_url("localhost", "sslmode=disable"))
            .await
            .is_err(),
        "the server refuses connections without TLS"
    );

    // Redis: the CA and the client certificate both matter; plain Redis gets nowhere.
    let redis_conn = |url: String| async move {
        hearth::servers::conn::connect(&url, Duration::from_secs(2)).await
    };
    let at = format!("127.0.0.1:{}", redis.port);
    assert!(redis_conn(format!("rediss://{at}?{client}")).await.is_ok());
    let untrusted = format!(
        "ca={}&cert={}&key={}",
        pki.path("other-ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key")
    );
    assert!(
        redis_conn(format!("rediss://{at}?{untrusted}"))
            .await
            .is_err()
    );
    let mut anonymous = redis_conn(format!("rediss://{at}?ca={ca}")).await;
    if let Ok(conn) = anonymous.as_mut() {
        // TLS 1.3 reports a refused client certificate on the first read.
        let ping: redis::RedisResult<String> = redis::cmd("PING").query_async(conn).await;
        assert!(ping.is_err(), "redis requires a client certificate");
    }
    assert!(redis_conn(format!("redis://{at}")).await.is_err());

    // MQTT: hearth's own client checks the broker's certificate too.
    let endpoint = |query: String| {
        hearth::mqtt::Endpoint::parse(&format!("mqtts://127.0.0.1:{}?{query}", broker.port), "t")
            .expect("endpoint")
    };
    let other_ca = format!(
        "ca={}&cert={}&key={}",
        pki.path("other-ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key")
    );
    assert!(hearth::mqtt::connect(&endpoint(other_ca)).await.is_err());
    assert!(
        hearth::mqtt::connect(&endpoint(client.clone()))
            .await
            .is_ok()
    );
    drop(up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_tls_listener_refuses_plaintext() {
    let mut env = Env::embedded("tls_embedded");
    let pki = Pki::new(&env.scratch.0.join("pki"));
    let tls_port = free_port();
    env.set("mqtt_tls_listen", format!("127.0.0.1:{tls_port}"))
        .set("mqtt_tls_cert", pki.path("server.pem"))
        .set("mqtt_tls_key", pki.path("server.key"))
        .set("admin_token", ADMIN);
    let up = env.up().await;
    let addr = up.http_addr().await;
    wait_port(tls_port);
    let ca = pki.path("ca.pem");

    assert!(mosquitto_pub(
        tls_port,
        &["--cafile", &ca],
        "hearth/h1/door",
        &readings(20)
    ));
    let stored = eventually("20 readings over TLS", Duration::from_secs(30), || async {
        let (_, body) = http(
            &addr,
            "GET",
            "/api/v1/houses/h1/sensors/door/events?limit=100",
            Some(ADMIN),
            None,
        )
        .await;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let n = v["events"].as_array().map(Vec::len)?;
        (n == 20).then_some(n)
    })
    .await;
    assert_eq!(stored, 20);

    // A client speaking plain MQTT to the TLS listener gets no CONNACK, and is counted.
    assert!(
        !mosquitto_pub(tls_port, &[], "hearth/h1/door", &readings(1)),
        "plain MQTT on the TLS listener"
    );
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", tls_port))
            .await
            .expect("connect");
        // CONNECT, MQTT 3.1.1, clean session, keep-alive 30, client id "raw".
        let connect = [
            0x10, 15, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 30, 0, 3, b'r', b'a', b'w',
        ];
        raw.write_all(&connect).await.expect("write");
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut reply)).await;
        assert_ne!(reply.first(), Some(&0x20), "a CONNACK came back: {reply:?}");
    }
    let metrics = http_get(&addr, "/metrics").await;
    let refused = metric(
        &metrics,
        "hearth_mqtt_refused_total{reason=\"tls_handshake\"}",
    );
    assert!(refused.unwrap_or(0.0) >= 2.0, "{refused:?}");
    // The plain listener is still there for loopback clients.
    assert!(mosquitto_pub(
        env.embedded_port.expect("port"),
        &[],
        "hearth/h1/door",
        &readings(21)[20..]
    ));
}

/// A renewed certificate is served without a restart: the API and the broker's TLS listener
/// read their files again when they change (a client trusting only the new issuer gets through,
/// one trusting only the old one no longer does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let mut env = Env::embedded("tls_renewed");
    let pki = Pki::new(&env.scratch.0.join("pki"));
    let (cert, key) = (pki.path("live.pem"), pki.path("live.key"));
    std::fs::copy(pki.path("server.pem"), &cert).expect("cert");
    std::fs::copy(pki.path("server.key"), &key).expect("key");
    let tls_port = free_port();
    env.set("mqtt_tls_listen", format!("127.0.0.1:{tls_port}"))
        .set("mqtt_tls_cert", &cert)
        .set("mqtt_tls_key", &key)
        .set("api_tls_cert", &cert)
        .set("api_tls_key", &key)
        .set("admin_token", ADMIN);
    let up = env.up().await;
    let port = up
        .http_addr()
        .await
        .rsplit_once(':')
        .expect("port")
        .1
        .to_string();
    wait_port(tls_port);
    let (old, new) = (pki.path("ca.pem"), pki.path("other-ca.pem"));
    let api = format!("https://localhost:{port}/api/v1/houses");
    let publish =
        |ca: &str| mosquitto_pub(tls_port, &["--cafile", ca], "hearth/h1/door", &readings(1));
    assert!(publish(&old) && curl(&api, &old, ADMIN).0);
    assert!(!publish(&new) && !curl(&api, &new, ADMIN).0);

    // Renewed in place: the new certificate first, then its key (a moment where they do not go
    // together, which is served through with the old pair).
    pki.reissued("renewed");
    std::fs::copy(pki.path("renewed.pem"), &cert).expect("cert");
    std::fs::copy(pki.path("renewed.key"), &key).expect("key");
    eventually(
        "the renewed certificate",
        Duration::from_secs(30),
        || async { (publish(&new) && curl(&api, &new, ADMIN).0).then_some(()) },
    )
    .await;
    assert!(!publish(&old) && !curl(&api, &old, ADMIN).0);
    assert!(up.log_text().contains("TLS certificate read again"));
}
