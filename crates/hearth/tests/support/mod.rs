//! Test support: real servers, isolated per test.
//!
//! Each test gets its own PostgreSQL database and Redis key prefix on the shared servers, and,
//! where it publishes in bulk or breaks the broker, a private Mosquitto started from
//! `deploy/mosquitto.conf` on a free port (the shared broker keeps Debian's limits, which drop
//! under bursts). hearth runs as real processes of the built binary, killed when the test ends.
#![allow(dead_code)]

use std::io::{BufRead, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::Value;

pub const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const REDIS: &str = "redis://127.0.0.1:6379";

/// A rules file's smoke rule (critical, raised on `true`), for tests that add webhooks to it.
pub const SMOKE_RULE: &str = "[[rule]]\nname = \"smoke\"\ntype = \"boolean\"\nkinds = [\"smoke\"]\nseverity = \"critical\"\nmessage = \"Smoke detected\"\n";

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A scratch directory removed at drop (kept when the test failed, for its logs).
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("hearth-test-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A private Mosquitto configured by `deploy/mosquitto.conf` (hearth's own harness).
pub struct Broker {
    pub port: u16,
    inner: hearth_bench::mosquitto::Mosquitto,
}

impl Broker {
    pub fn start(dir: &Path) -> Broker {
        Broker::start_with(dir, 0, &[])
    }

    /// Start with `extra` lines; each replaces the base line with the same first word.
    pub fn start_with(dir: &Path, port: u16, extra: &[String]) -> Broker {
        let inner =
            hearth_bench::mosquitto::Mosquitto::start_with(&dir.join("mosquitto"), port, extra)
                .expect("start mosquitto");
        Broker {
            port: inner.port,
            inner,
        }
    }

    pub fn url(&self) -> String {
        self.inner.url()
    }

    /// Stop with a signal (`TERM`, `KILL`) and start again on the same port and state.
    pub fn restart(&mut self, signal: &str) {
        self.inner.stop(signal);
        self.inner.restart().expect("restart mosquitto");
    }
}

pub fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `redis-server` of our own, AOF on, in the test's scratch directory: for the tests that
/// break Redis (the shared one is never touched).
pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    fsync: &'static str,
    child: Option<Child>,
}

impl Redis {
    pub fn start(dir: &Path, fsync: &'static str) -> Redis {
        let dir = dir.join("redis");
        std::fs::create_dir_all(&dir).expect("redis dir");
        let mut r = Redis {
            port: free_port(),
            dir,
            fsync,
            child: None,
        };
        r.up();
        r
    }

    pub fn up(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--appendonly", "yes", "--appendfsync", self.fsync])
            .args(["--save", "", "--dir"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        self.child = Some(child);
        wait_port(self.port);
        // Loading the AOF: the port answers before the data is there.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "ping"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG")
        {
            assert!(Instant::now() < deadline, "redis did not load");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn down(&mut self, signal: &str) {
        if let Some(child) = self.child.take() {
            hearth_bench::mosquitto::stop_child(child, signal);
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.down("KILL");
    }
}

/// One test's isolated slice of the shared Redis and PostgreSQL.
pub struct Env {
    pub name: String,
    pub database_url: String,
    pub redis_prefix: String,
    pub scratch: Scratch,
    /// Extra `HEARTH_*` settings for every process of this test.
    pub settings: Vec<(String, String)>,
    /// Embedded mode: no server URL is given, the broker listens on this port and the store is
    /// in `scratch/data`.
    pub embedded_port: Option<u16>,
}

impl Env {
    pub fn new(test: &str) -> Env {
        let name = format!(
            "{}_{}_{}",
            test,
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        Env {
            database_url: format!("postgres://postgres@127.0.0.1:5432/hearth_t_{name}"),
            redis_prefix: format!("t-{name}"),
            scratch: Scratch::new(&name),
            settings: Vec::new(),
            embedded_port: None,
            name,
        }
    }

    /// A test of `hearth up` with nothing configured: its embedded broker on a free port, its
    /// data folder in this test's scratch directory.
    pub fn embedded(test: &str) -> Env {
        let mut env = Env::new(test);
        env.embedded_port = Some(free_port());
        env
    }

    /// The embedded store's database file.
    pub fn data_file(&self) -> PathBuf {
        self.scratch.0.join("data/hearth.sqlite3")
    }

    pub fn set(&mut self, key: &str, value: impl ToString) -> &mut Self {
        self.settings.push((key.to_string(), value.to_string()));
        self
    }

    /// Start `hearth <args>` with this test's settings.
    pub fn hearth(&self, label: &str, args: &[&str]) -> Hearth {
        Hearth::spawn(self, label, args)
    }

    /// `hearth up` with this test's settings, once it has subscribed to the broker.
    pub async fn up(&self) -> Hearth {
        let up = self.hearth("up", &["up"]);
        up.wait_log("subscribed", Duration::from_secs(60)).await;
        up
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hearth"));
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("HEARTH_")) {
            cmd.env_remove(k);
        }
        cmd.current_dir(&self.scratch.0);
        match self.embedded_port {
            Some(port) => {
                cmd.env("HEARTH_MQTT_LISTEN", format!("127.0.0.1:{port}"))
                    .env("HEARTH_DATA_DIR", self.scratch.0.join("data"));
            }
            None => {
                cmd.env("HEARTH_DATABASE_URL", &self.database_url)
                    .env("HEARTH_REDIS_URL", REDIS)
                    .env("HEARTH_REDIS_PREFIX", &self.redis_prefix)
                    .env("HEARTH_MQTT_CLIENT_ID", format!("ingest-{}", self.name));
            }
        }
        cmd.env("HEARTH_LEASE_TTL_MS", "2000")
            // Tests run in parallel: never the default port.
            .env("HEARTH_API_LISTEN", "127.0.0.1:0")
            .env("HEARTH_LOG", "info");
        for (k, v) in &self.settings {
            cmd.env(format!("HEARTH_{}", k.to_ascii_uppercase()), v);
        }
        cmd.args(args);
        cmd
    }

    /// `hearth status --json`, parsed.
    pub fn status(&self) -> Value {
        let out = self
            .command(&["status", "--json"])
            .output()
            .expect("run hearth status");
        assert!(
            out.status.success(),
            "hearth status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// The dead-letter stream, oldest first, each entry's fields as text.
    pub async fn dead_letters(&self) -> Vec<std::collections::HashMap<String, String>> {
        type Entries = Vec<(String, Vec<(String, Vec<u8>)>)>;
        let mut redis = self.redis().await;
        let entries: Entries = redis::cmd("XRANGE")
            .arg(format!("{}:dead", self.redis_prefix))
            .arg("-")
            .arg("+")
            .query_async(&mut redis)
            .await
            .expect("dead letters");
        entries
            .into_iter()
            .map(|(_, fields)| {
                fields
                    .into_iter()
                    .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
                    .collect()
            })
            .collect()
    }

    pub async fn pg(&self) -> tokio_postgres::Client {
        connect_pg(&self.database_url).await
    }

    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(REDIS)
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test data kept: {}", self.scratch.0.display());
            return;
        }
        if self.embedded_port.is_some() {
            return; // nothing on the shared servers
        }
        let db = format!("hearth_t_{}", self.name);
        let prefix = self.redis_prefix.clone();
        let cleanup = async move {
            let admin = connect_pg(PG_ADMIN).await;
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
                .await;
            hearth_bench::process::drop_keys(REDIS, &prefix).await;
        };
        // Drop may run inside or outside a runtime.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(cleanup);
            }
        })
        .join();
    }
}

pub async fn connect_pg(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("postgres");
    tokio::spawn(conn);
    client
}

/// A running hearth process; killed at drop, its log printed if the test failed.
pub struct Hearth {
    pub label: String,
    child: Option<Child>,
    pub log: PathBuf,
    args: Vec<String>,
    command: Option<Command>,
}

impl Hearth {
    fn spawn(env: &Env, label: &str, args: &[&str]) -> Hearth {
        let log = env.scratch.0.join(format!("{label}.log"));
        let mut h = Hearth {
            label: label.to_string(),
            child: None,
            log,
            args: args.iter().map(|s| s.to_string()).collect(),
            command: Some(env.command(args)),
        };
        h.start();
        h
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let cmd = self.command.as_mut().expect("command");
        cmd.stdout(Stdio::null()).stderr(log);
        self.child = Some(cmd.spawn().expect("spawn hearth"));
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Still running (never restarted, never crashed)?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Has the process ended (a zombie not yet reaped counts)?
    fn exited(&self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid())) {
            Ok(stat) => stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
                .unwrap_or(false),
            Err(_) => true,
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again with the same arguments, appending to the same log.
    pub fn restart(&mut self) {
        self.kill9();
        writeln!(
            std::fs::OpenOptions::new()
                .append(true)
                .open(&self.log)
                .expect("log"),
            "----- restarted -----"
        )
        .ok();
        self.start();
    }

    /// Wait until the process ends by itself (a signal, a fault's abort, an exit): whether it did
    /// within `timeout`.
    pub async fn ended_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if !self.alive() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Wait for the process to exit by itself; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The address its HTTP server listens on (from its log; start it with port 0).
    pub async fn http_addr(&self) -> String {
        self.listening_addr("http listening").await
    }

    /// The port of its gRPC server (from its log; start it with `grpc_listen` port 0).
    pub async fn grpc_port(&self) -> u16 {
        let addr = self.listening_addr("grpc listening").await;
        addr.rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .expect("a port")
    }

    /// The `addr=` of the log line holding `needle`, once it is there.
    async fn listening_addr(&self, needle: &str) -> String {
        self.wait_log(needle, Duration::from_secs(60)).await;
        let text = self.log_text();
        let line = text
            .lines()
            .find(|l| l.contains(needle))
            .expect("listening line");
        line.split("addr=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .expect("addr=")
            .to_string()
    }

    /// Wait until the log holds `needle` (how tests know a role is ready).
    pub async fn wait_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_text().contains(needle) {
                return;
            }
            if self.exited() {
                panic!("{} exited before logging {needle:?}", self.label);
            }
            if Instant::now() > deadline {
                panic!("{}: no {needle:?} in its log after {timeout:?}", self.label);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Hearth {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!("---- log of {} ({:?}) ----", self.label, self.args);
            for l in tail {
                eprintln!("{l}");
            }
        }
    }
}

/// Poll `check` until it returns `Some`, at most `timeout` (a bound, not an assertion on speed).
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn count_events(pg: &tokio_postgres::Client) -> i64 {
    pg.query_one("SELECT count(*) FROM events", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(-1)
}

/// The three assertions of a no-loss run: `expected` rows, each (sensor, kind, seq) once, and
/// within each sensor `seq` increasing with `events.id`.
pub async fn assert_exactly_once_in_order(pg: &tokio_postgres::Client, expected: i64) {
    let rows = count_events(pg).await;
    let distinct: i64 = pg
        .query_one(
            "SELECT count(*) FROM (SELECT DISTINCT house_id, sensor_id, kind, seq FROM events) d",
            &[],
        )
        .await
        .expect("distinct")
        .get(0);
    let out_of_order: i64 = pg
        .query_one(
            "SELECT count(*) FROM (
                SELECT seq, lag(seq) OVER (PARTITION BY house_id, sensor_id ORDER BY id) AS prev FROM events
             ) x WHERE prev IS NOT NULL AND seq <= prev",
            &[],
        )
        .await
        .expect("order")
        .get(0);
    assert_eq!(rows, expected, "rows stored");
    assert_eq!(distinct, expected, "distinct (sensor, kind, seq)");
    assert_eq!(out_of_order, 0, "per-sensor order violations");
}

/// Publish `payloads` at QoS 1 as fast as the broker takes them; returns once every one was
/// PUBACKed by the broker.
pub async fn publish_all(port: u16, client_id: &str, payloads: Vec<(String, Vec<u8>)>) {
    publish_all_as(port, client_id, None, payloads).await
}

/// [`publish_all`], logged in as `(user, password)`.
pub async fn publish_all_as(
    port: u16,
    client_id: &str,
    credentials: Option<(&str, &str)>,
    payloads: Vec<(String, Vec<u8>)>,
) {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    if let Some((user, password)) = credentials {
        opts.set_credentials(user, password);
    }
    opts.set_keep_alive(Duration::from_secs(30))
        .set_inflight(500)
        .set_max_packet_size(2 * 1024 * 1024, 2 * 1024 * 1024);
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let total = payloads.len();
    let sender = tokio::spawn(async move {
        for (topic, payload) in payloads {
            client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .expect("publish");
        }
        client
    });
    let mut acked = 0;
    let deadline = Instant::now() + Duration::from_secs(300);
    while acked < total {
        assert!(
            Instant::now() < deadline,
            "publisher: {acked}/{total} acked"
        );
        let Ok(polled) = tokio::time::timeout(Duration::from_secs(30), eventloop.poll()).await
        else {
            panic!("publisher: {acked}/{total} acked, then silence");
        };
        match polled {
            Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(e) => panic!("publisher connection failed: {e}"),
        }
    }
    let client = sender.await.expect("sender");
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
}

/// `n` events per sensor from `sensors` sensors, interleaved (seq 1 of every sensor, then 2...),
/// as (topic, payload) in the native format.
pub fn interleaved(house: &str, sensors: usize, per_sensor: u64) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::with_capacity(sensors * per_sensor as usize);
    for seq in 1..=per_sensor {
        for s in 0..sensors {
            let kind = if s % 2 == 0 {
                "temperature"
            } else {
                "humidity"
            };
            let payload =
                serde_json::json!({"kind": kind, "value": 20.0 + (seq % 10) as f64, "seq": seq});
            out.push((
                format!("hearth/{house}/sensor-{s}"),
                payload.to_string().into_bytes(),
            ));
        }
    }
    out
}

/// Wait until the ingest has appended at least `received` events and `hearth status` shows
/// nothing queued, pending or in flight. (Publishers get their PUBACK from the broker before
/// hearth has the message: an empty queue alone does not mean the run is over.)
pub async fn wait_drained(env: &Env, received: u64, timeout: Duration) -> Value {
    eventually("the queue to drain", timeout, || async {
        let s = env.status();
        let busy: u64 = s["lanes"]
            .as_array()
            .map(|l| {
                l.iter()
                    .map(|x| {
                        ["depth", "entries", "pending"]
                            .iter()
                            .map(|f| x[*f].as_u64().unwrap_or(0))
                            .sum::<u64>()
                    })
                    .sum()
            })
            .unwrap_or(u64::MAX);
        let seen = s["events"]["received"].as_u64().unwrap_or(0);
        (seen >= received && busy == 0 && s["events"]["in_flight"] == 0).then_some(s)
    })
    .await
}

pub fn read_lines(path: &Path) -> Vec<String> {
    std::fs::File::open(path)
        .map(|f| {
            std::io::BufReader::new(f)
                .lines()
                .map_while(Result::ok)
                .collect()
        })
        .unwrap_or_default()
}

/// GET `http://{addr}{path}`, the body as text (a bare HTTP/1.1 client: enough for /metrics).
pub async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    let response = String::from_utf8_lossy(&response).to_string();
    let (head, body) = response.split_once("\r\n\r\n").expect("http response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// The value of a metric line `name{labels} value` (labels as written, or none).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(series))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// An HTTP request with an optional bearer token; (status, body).
pub async fn http(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let (status, _, body) = http_with_head(addr, method, path, token, body).await;
    (status, body)
}

/// [`http`], with the response's head (status line and headers) too: (status, head, body).
pub async fn http_with_head(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    let response = String::from_utf8_lossy(&response).to_string();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // Bodies of `Connection: close` responses from axum are not chunked unless streamed.
    (status, head.to_string(), body.to_string())
}

/// `hearth token create --house H`.
pub fn token_for(env: &Env, house: &str) -> String {
    let out = env
        .command(&["token", "create", "--house", house])
        .output()
        .expect("hearth token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(!token.is_empty() && !token.contains(char::is_whitespace));
    token
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Open the WebSocket; `Err(status)` when the server refused the upgrade.
pub async fn ws_connect(addr: &str, query: &str, token: Option<&str>) -> Result<Ws, u16> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{addr}/api/v1/ws?{query}")
        .into_client_request()
        .expect("request");
    if let Some(t) = token {
        request.headers_mut().insert(
            "Authorization",
            format!("Bearer {t}").parse().expect("header"),
        );
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("websocket: {e}"),
    }
}

/// Open the WebSocket and read its `hello`.
pub async fn ws_hello(addr: &str, query: &str, token: Option<&str>) -> Ws {
    let mut ws = ws_connect(addr, query, token).await.expect("websocket");
    let hello = ws_next(&mut ws, Duration::from_secs(10))
        .await
        .expect("hello");
    assert_eq!(hello["type"], "hello");
    ws
}

/// The next JSON text message, skipping pings; `None` after `wait`.
pub async fn ws_next(ws: &mut Ws, wait: Duration) -> Option<Value> {
    use futures_util::StreamExt;
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) => {
                return serde_json::from_str(&t).ok();
            }
            Ok(Some(Ok(_))) => continue,
            _ => return None,
        }
    }
}

/// A local HTTP (or HTTPS) server that records what is POSTed to it (a webhook receiver).
pub struct Hook {
    /// `{base}/hook`.
    pub url: String,
    /// `http://127.0.0.1:PORT` (or `https://`).
    pub base: String,
    /// The bodies that were JSON.
    pub bodies: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    /// Every request answered 200.
    pub requests: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    attempts: std::sync::Arc<AtomicU32>,
}

/// A request a [`Hook`] accepted.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    /// Names lowercase.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Hook {
    pub async fn start() -> Hook {
        Hook::failing(0).await
    }

    /// A receiver that answers 500 to its first `failures` requests, then 200.
    pub async fn failing(failures: u32) -> Hook {
        Hook::serve(failures, None).await
    }

    /// The same over HTTPS, with `acceptor`'s certificate.
    pub async fn https(failures: u32, acceptor: hearth::tls::TlsAcceptor) -> Hook {
        Hook::serve(failures, Some(acceptor)).await
    }

    async fn serve(failures: u32, tls: Option<hearth::tls::TlsAcceptor>) -> Hook {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let base = format!("{scheme}://{}", listener.local_addr().expect("addr"));
        let hook = Hook {
            url: format!("{base}/hook"),
            base,
            bodies: Default::default(),
            requests: Default::default(),
            attempts: Default::default(),
        };
        let (bodies, requests, tries) = (
            hook.bodies.clone(),
            hook.requests.clone(),
            hook.attempts.clone(),
        );
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (bodies, requests, tries, tls) =
                    (bodies.clone(), requests.clone(), tries.clone(), tls.clone());
                tokio::spawn(async move {
                    let answer = |n: u32| n >= failures;
                    match tls {
                        None => hook_exchange(stream, &tries, answer, &bodies, &requests).await,
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                hook_exchange(stream, &tries, answer, &bodies, &requests).await
                            }
                        }
                    }
                });
            }
        });
        hook
    }

    pub fn received(&self) -> Vec<Value> {
        self.bodies.lock().unwrap().clone()
    }

    /// Requests received, answered 500 or 200.
    pub fn attempts(&self) -> u32 {
        self.attempts.load(Ordering::SeqCst)
    }
}

/// Read one request; answer 200 (recording it) when `ok(attempt)`, else 500.
async fn hook_exchange<S>(
    mut stream: S,
    tries: &AtomicU32,
    ok: impl Fn(u32) -> bool,
    bodies: &std::sync::Mutex<Vec<Value>>,
    requests: &std::sync::Mutex<Vec<Received>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = stream.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let mut lines = head.lines();
        let path = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("")
            .to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let len = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .unwrap_or(0);
        if body.len() < len {
            continue;
        }
        if !ok(tries.fetch_add(1, Ordering::SeqCst)) {
            let _ = stream
                .write_all(
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await;
            let _ = stream.shutdown().await;
            return;
        }
        let body = body[..len].to_string();
        if let Ok(v) = serde_json::from_str(&body) {
            bodies.lock().unwrap().push(v);
        }
        requests.lock().unwrap().push(Received {
            path,
            headers,
            body,
        });
        break;
    }
    let _ = stream
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .await;
    let _ = stream.shutdown().await;
}

/// Publish `payloads` from a task of its own, so the test can act while they flow.
pub fn publish_in_background(
    env: &Env,
    port: u16,
    payloads: Vec<(String, Vec<u8>)>,
) -> tokio::task::JoinHandle<()> {
    let id = format!("pub-{}", env.name);
    tokio::spawn(async move { publish_all(port, &id, payloads).await })
}

/// Wait until at least `rows` events are stored.
pub async fn wait_rows(pg: &tokio_postgres::Client, rows: i64, timeout: Duration) {
    eventually(&format!("{rows} rows"), timeout, || async {
        (count_events(pg).await >= rows).then_some(())
    })
    .await
}

/// [`publish_in_background`] at about `per_second`, in tenth-of-a-second slices (each slice on a
/// connection of its own, one after the other, so each sensor's readings stay in order).
pub fn publish_paced(
    env: &Env,
    port: u16,
    payloads: Vec<(String, Vec<u8>)>,
    per_second: usize,
) -> tokio::task::JoinHandle<()> {
    let id = format!("pub-{}", env.name);
    let slice = (per_second / 10).max(1);
    tokio::spawn(async move {
        let start = Instant::now();
        let mut rest = payloads;
        let mut n = 0u32;
        while !rest.is_empty() {
            let tail = rest.split_off(slice.min(rest.len()));
            publish_all(port, &format!("{id}-{n}"), rest).await;
            rest = tail;
            n += 1;
            let due = start + Duration::from_millis(100) * n;
            tokio::time::sleep_until(due.into()).await;
        }
    })
}

/// `GET /api/v1/houses/{house}/sensors` with `token`: the sensors listed (none if the answer is
/// not a list).
pub async fn house_sensors(addr: &str, token: &str, house: &str) -> Vec<Value> {
    let (_, body) = http(
        addr,
        "GET",
        &format!("/api/v1/houses/{house}/sensors"),
        Some(token),
        None,
    )
    .await;
    serde_json::from_str(&body).unwrap_or_default()
}

/// A PostgreSQL cluster of our own (`initdb` + `pg_ctl`, run as the `postgres` user when the
/// tests run as root, since PostgreSQL refuses to run as root).
pub struct Postgres {
    pub port: u16,
    pub data: PathBuf,
    bin: PathBuf,
}

fn pg_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server package (/usr/lib/postgresql)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("pg_ctl").exists())
        .collect();
    versions.sort();
    versions.pop().expect("pg_ctl")
}

pub fn as_postgres(program: &Path) -> Command {
    if hearth_bench::mosquitto::running_as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Postgres {
    pub fn start(dir: &Path) -> Postgres {
        let pg = Postgres::init(dir);
        pg.up();
        pg
    }

    /// `initdb` only: the cluster is configured by the caller, then started with [`Postgres::up`].
    pub fn init(dir: &Path) -> Postgres {
        let base = dir.join("pg");
        std::fs::create_dir_all(&base).expect("pg dir");
        let pg = Postgres {
            port: free_port(),
            data: base.join("data"),
            bin: pg_bin(),
        };
        if hearth_bench::mosquitto::running_as_root() {
            // The scratch directory and this one must be reachable by the postgres user.
            let _ = Command::new("chmod").arg("755").arg(dir).status();
            let _ = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&base)
                .status();
        }
        let out = as_postgres(&pg.bin.join("initdb"))
            .args(["-D"])
            .arg(&pg.data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg
    }

    fn ctl(&self, args: &[&str]) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.data.display()
        );
        let out = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-o", &opts, "-l"])
            .arg(self.data.join("log"))
            .args(args)
            .output()
            .expect("pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn up(&self) {
        self.ctl(&["-w", "start"]);
    }

    /// Stop: `fast` rolls back open transactions and disconnects everyone.
    pub fn down(&self) {
        self.ctl(&["-w", "-m", "fast", "stop"]);
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// A new P-256 key, unencrypted.
const NEW_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

/// A test PKI, made with the `openssl` command: a CA; a server certificate for `localhost` and 127.0.0.1; one for `localhost`
/// only (PostgreSQL's, to show the name check); a client certificate; a CA nobody trusts.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).expect("pki dir");
        let pki = Pki {
            dir: dir.to_path_buf(),
        };
        pki.ca("ca");
        pki.ca("other-ca");
        pki.leaf("server", "DNS:localhost,IP:127.0.0.1", "serverAuth");
        pki.leaf("pg", "DNS:localhost", "serverAuth");
        pki.leaf("client", "DNS:hearth-client", "clientAuth");
        // Mosquitto drops to its own user: it must read them (a test's throwaway keys).
        for entry in std::fs::read_dir(dir).expect("pki").flatten() {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o644));
        }
        pki
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn ca(&self, name: &str) {
        self.openssl(
            &[
                &["req", "-x509"][..],
                &NEW_KEY,
                &[
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.pem"),
                ],
                &[
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN=hearth test {name}"),
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
            ]
            .concat(),
        );
    }

    /// A server certificate for `localhost` and 127.0.0.1 issued by the other CA (`{name}.pem`,
    /// `{name}.key`): the renewal of `server`, as far as a client trusting only one CA can tell.
    pub fn reissued(&self, name: &str) {
        self.leaf_of("other-ca", name, "DNS:localhost,IP:127.0.0.1", "serverAuth");
    }

    fn leaf(&self, name: &str, san: &str, usage: &str) {
        self.leaf_of("ca", name, san, usage);
    }

    fn leaf_of(&self, ca: &str, name: &str, san: &str, usage: &str) {
        self.openssl(
            &[
                &["req"][..],
                &NEW_KEY,
                &[
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                ],
                &["-subj", &format!("/CN={name}")],
            ]
            .concat(),
        );
        std::fs::write(
            self.dir.join(format!("{name}.ext")),
            format!(
                "subjectAltName={san}\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage={usage}\n"
            ),
        )
        .expect("ext file");
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ]);
    }

    /// `ca=…&cert=…&key=…` for a client link.
    pub fn client_query(&self) -> String {
        format!(
            "ca={}&cert={}&key={}",
            self.path("ca.pem"),
            self.path("client.pem"),
            self.path("client.key")
        )
    }
}

impl Pki {
    /// An acceptor serving the `server` certificate (for `localhost` and 127.0.0.1).
    pub fn acceptor(&self, alpn: &[&[u8]]) -> hearth::tls::TlsAcceptor {
        hearth::tls::acceptor(&self.path("server.pem"), &self.path("server.key"), alpn)
            .expect("acceptor")
            .expect("certificate given")
    }
}

/// Which backend a test runs `hearth up` on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Backend {
    Servers,
    Embedded,
}

/// A running `hearth up` on one backend (a private Mosquitto on the servers): its API address
/// and its MQTT port.
pub struct Target {
    pub env: Env,
    pub up: Hearth,
    pub addr: String,
    pub mqtt_port: u16,
    pub broker: Option<Broker>,
}

impl Target {
    /// `hearth up` on `backend` with the admin token `admin` and `settings`.
    pub async fn start(
        backend: Backend,
        name: &str,
        admin: &str,
        settings: &[(&str, &str)],
    ) -> Target {
        let (mut env, broker) = match backend {
            Backend::Servers => {
                let env = Env::new(name);
                let broker = Broker::start(&env.scratch.0);
                (env, Some(broker))
            }
            Backend::Embedded => (Env::embedded(name), None),
        };
        if let Some(b) = &broker {
            env.set("mqtt_url", b.url());
        }
        env.set("admin_token", admin);
        for (k, v) in settings {
            env.set(k, v);
        }
        let up = env.up().await;
        let addr = up.http_addr().await;
        let mqtt_port = match &broker {
            Some(b) => b.port,
            None => env.embedded_port.expect("embedded port"),
        };
        Target {
            env,
            up,
            addr,
            mqtt_port,
            broker,
        }
    }
}
