//! Redis Cluster (issue 14): the pipeline on a real 6-node cluster (3 masters, 3 replicas)
//! started by the test, through the failover of a master.
//!
//! The window a failover can lose is made to happen, not waited for: the workers and the
//! replica of one master are paused (SIGSTOP) while a batch of readings is published, so that
//! what that master appends exists nowhere else; then the master is SIGKILLed and its replica,
//! resumed, promoted. With `redis_wait_replicas = 1` the ingest acknowledges nothing the replica
//! does not hold, and every reading is stored once, in order; with the default (0) exactly the
//! readings appended to that master's lanes in the window are lost.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hearth::Lane;
use hearth::servers::conn::slot;
use hearth::servers::keys::Keys;
use support::*;

const READY: Duration = Duration::from_secs(60);
const NODE_TIMEOUT_MS: u64 = 2000;
const SHARDS: u16 = 8;

/// One `redis-server` of the cluster, its config (node id, epoch) kept across restarts.
struct Node {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn start(dir: &Path) -> Node {
        let port = free_port();
        let dir = dir.join(format!("redis-{port}"));
        std::fs::create_dir_all(&dir).expect("node dir");
        let mut node = Node {
            port,
            dir,
            child: None,
        };
        node.up();
        node
    }

    /// A server outside any cluster, with `args`.
    fn plain(dir: &Path, args: &[&str]) -> Node {
        let port = free_port();
        let dir = dir.join(format!("redis-{port}"));
        std::fs::create_dir_all(&dir).expect("node dir");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--repl-timeout",
                "1",
                "--appendonly",
                "no",
                "--save",
                "",
                "--dir",
            ])
            .arg(&dir)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        wait_port(port);
        Node {
            port,
            dir,
            child: Some(child),
        }
    }

    fn up(&mut self) {
        let timeout = NODE_TIMEOUT_MS.to_string();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes", "--cluster-config-file"])
            .arg(self.dir.join("nodes.conf"))
            .args(["--cluster-node-timeout", &timeout])
            // A replica paused longer than the node timeout may still be promoted.
            .args(["--cluster-replica-validity-factor", "0"])
            // A master drops a replica silent for a second: the window below is then exact.
            .args(["--repl-timeout", "1"])
            .args(["--appendonly", "no", "--save", "", "--dir"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        self.child = Some(child);
        wait_port(self.port);
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args(["-s", sig, &self.pid().to_string()])
            .status();
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Until this master has exactly `n` replicas connected.
    async fn wait_replicas(&self, n: usize) {
        let line = format!("connected_slaves:{n}");
        eventually(
            &format!(":{} to have {n} replicas", self.port),
            READY,
            || async {
                self.cli(&["info", "replication"])
                    .contains(&line)
                    .then_some(())
            },
        )
        .await
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.signal("CONT");
        self.kill();
    }
}

/// A line of `CLUSTER NODES`.
struct Seen {
    id: String,
    port: u16,
    master: bool,
    failed: bool,
    master_id: String,
    slots: Vec<(u16, u16)>,
}

struct Cluster {
    nodes: Vec<Node>,
}

impl Cluster {
    /// Six nodes, made a cluster of 3 masters with a replica each.
    async fn start(dir: &Path) -> Cluster {
        let nodes: Vec<Node> = (0..6).map(|_| Node::start(dir)).collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        let out = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = Cluster { nodes };
        cluster.wait_healthy(3, 3).await;
        cluster
    }

    fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// The cluster as a live node sees it.
    fn seen(&self) -> Vec<Seen> {
        let Some(node) = self.nodes.iter().find(|n| n.child.is_some()) else {
            return Vec::new();
        };
        node.cli(&["cluster", "nodes"])
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let port = f.get(1)?.split([':', '@']).nth(1)?.parse().ok()?;
                Some(Seen {
                    id: f[0].to_string(),
                    port,
                    master: f[2].contains("master"),
                    failed: f[2].contains("fail"),
                    master_id: f[3].to_string(),
                    slots: f[8..]
                        .iter()
                        .filter_map(|r| match r.split_once('-') {
                            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                            None => r.parse().ok().map(|s| (s, s)),
                        })
                        .collect(),
                })
            })
            .collect()
    }

    /// Until every live node says the cluster is ok, with `masters` live masters and `replicas`
    /// live replicas.
    async fn wait_healthy(&self, masters: usize, replicas: usize) {
        eventually(
            &format!("the cluster to be ok with {masters} masters, {replicas} replicas"),
            READY,
            || async {
                let ok = self
                    .nodes
                    .iter()
                    .filter(|n| n.child.is_some())
                    .all(|n| n.cli(&["cluster", "info"]).contains("cluster_state:ok"));
                let seen = self.seen();
                let live = |m: bool| seen.iter().filter(|s| s.master == m && !s.failed).count();
                (ok && live(true) == masters && live(false) == replicas).then_some(())
            },
        )
        .await
    }

    /// The master serving `slot`, and its replica.
    fn serving(&self, slot: u16) -> (usize, usize) {
        let seen = self.seen();
        let master = seen
            .iter()
            .find(|s| {
                s.master && !s.failed && s.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))
            })
            .expect("a master serves the slot");
        let replica = seen
            .iter()
            .find(|s| !s.master && s.master_id == master.id)
            .expect("the master has a replica");
        let index = |port: u16| self.nodes.iter().position(|n| n.port == port).unwrap();
        (index(master.port), index(replica.port))
    }
}

/// `per_sensor` readings of each of `sensors` sensors of `house`, interleaved, and how many of
/// them go to lanes whose slot is in `slots` (hash-tagged keys under `prefix`).
fn on_slots(
    house: &str,
    sensors: usize,
    per_sensor: u64,
    prefix: &str,
    slots: &[(u16, u16)],
) -> u64 {
    let keys = Keys::clustered(prefix);
    (0..sensors)
        .filter(|s| {
            let kind = if s % 2 == 0 {
                "temperature"
            } else {
                "humidity"
            };
            let lane = Lane::of(house, &format!("sensor-{s}"), kind, SHARDS);
            let at = slot(keys.stream(lane).as_bytes());
            slots.iter().any(|(a, b)| (*a..=*b).contains(&at))
        })
        .count() as u64
        * per_sensor
}

/// What a failover run left.
struct Run {
    /// Events published.
    expected: i64,
    /// Events of the second batch on the killed master's lanes.
    exposed: i64,
    pg: tokio_postgres::Client,
    _processes: Vec<Hearth>,
    cluster: Cluster,
    broker: Broker,
    hook: Hook,
    env: Env,
}

/// Publish a batch, pause the workers and one master's replica, publish a second batch, kill
/// that master, resume the replica (promoted), restart the master (now its replica), resume
/// the workers.
async fn failover(test: &str, wait_replicas: u32) -> Run {
    let mut env = Env::new(test);
    let cluster = Cluster::start(&env.scratch.0).await;
    let broker = Broker::start(&env.scratch.0);
    let hook = Hook::start().await;
    let rules = env.scratch.0.join("rules.toml");
    std::fs::write(
        &rules,
        format!(
            "[[rule]]\nname = \"smoke\"\ntype = \"boolean\"\nkinds = [\"smoke\"]\n\
             severity = \"critical\"\nmessage = \"Smoke\"\n\n[[webhook]]\nurl = \"{}\"\n",
            hook.url
        ),
    )
    .expect("rules");
    env.set("mqtt_url", broker.url())
        .set("rules_file", rules.display())
        .set("redis_url", cluster.url())
        .set("redis_wait_replicas", wait_replicas)
        .set("shards", SHARDS)
        .set("batch_size", 200);
    let worker = env.hearth("worker", &["worker", "--workers", "2"]);
    worker.wait_log("worker started", READY).await;
    let ingest = env.hearth("ingest", &["ingest"]);
    ingest.wait_log("subscribed", READY).await;

    let sensors = 60;
    let mut first = interleaved("h1", sensors, 20);
    // A smoke alarm: the critical lane, an alert, a push and a webhook job on the cluster too.
    first.push((
        "hearth/h1/smoke-1".into(),
        br#"{"kind":"smoke","value":1,"seq":1}"#.to_vec(),
    ));
    let first_n = first.len() as i64;
    publish_all(broker.port, &format!("pub-a-{}", env.name), first).await;
    let pg = env.pg().await;
    wait_rows(&pg, first_n, READY).await;

    // The master of the lane of h2's sensor-0, and its replica.
    let lane = Lane::of("h2", "sensor-0", "temperature", SHARDS);
    let (m, r) = cluster.serving(slot(
        Keys::clustered(&env.redis_prefix).stream(lane).as_bytes(),
    ));
    let master_slots = cluster
        .seen()
        .into_iter()
        .find(|s| s.port == cluster.nodes[m].port)
        .map(|s| s.slots)
        .unwrap_or_default();
    let mut cluster = cluster;
    worker.signal("STOP");
    cluster.nodes[r].signal("STOP");
    // Until the master has dropped the paused replica, what it appends could still reach the
    // replica's socket buffer (and be read when it resumes): wait for the link to go.
    cluster.nodes[m].wait_replicas(0).await;
    let per_sensor = 30;
    let second = interleaved("h2", sensors, per_sensor);
    let second_n = second.len() as i64;
    let exposed = on_slots("h2", sensors, per_sensor, &env.redis_prefix, &master_slots) as i64;
    assert!(
        exposed > 0,
        "some of the second batch goes to the killed master"
    );
    publish_all(broker.port, &format!("pub-b-{}", env.name), second).await;
    if wait_replicas == 0 {
        // Every reading appended (and acknowledged) before the kill.
        let total = (first_n + second_n) as u64;
        eventually("the second batch appended", READY, || async {
            (env.status()["events"]["received"].as_u64().unwrap_or(0) >= total).then_some(())
        })
        .await;
    } else {
        // The ingest appends what it can and retries the killed master's lanes.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }

    let killed_at = Instant::now();
    cluster.nodes[m].kill();
    cluster.nodes[r].signal("CONT");
    cluster.wait_healthy(3, 2).await;
    eprintln!(
        "cluster: master :{} killed, replica :{} promoted after {:.1} s",
        cluster.nodes[m].port,
        cluster.nodes[r].port,
        killed_at.elapsed().as_secs_f64()
    );
    cluster.nodes[m].up();
    cluster.wait_healthy(3, 3).await;
    worker.signal("CONT");
    Run {
        expected: first_n + second_n,
        exposed,
        pg,
        _processes: vec![worker, ingest],
        cluster,
        broker,
        hook,
        env,
    }
}

/// With `redis_wait_replicas = 1`, a master's failover loses nothing acknowledged: every
/// reading is stored once, in its sensor's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_failover_loses_nothing_when_replicas_are_awaited() {
    let run = failover("cluster_wait", 1).await;
    let (expected, exposed, pg) = (run.expected, run.exposed, &run.pg);
    wait_rows(pg, expected, Duration::from_secs(120)).await;
    // `hearth status` on the cluster: its counters (kept per lane there) add up, nothing queued.
    let status = wait_drained(&run.env, expected as u64, READY).await;
    eprintln!(
        "cluster: replicas awaited: {expected} published, {exposed} exposed, none lost; status: {}",
        status["events"]
    );
    assert_exactly_once_in_order(pg, expected).await;
    let alerts: i64 = pg
        .query_one(
            "SELECT count(*) FROM alerts WHERE sensor_id = 'smoke-1' AND rule = 'smoke'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(alerts, 1, "the smoke alarm raised once");
    // The latest values are cached under the house's hash tag.
    let keys = Keys::clustered(&run.env.redis_prefix);
    let mut conn = hearth::servers::conn::manager(&run.cluster.url(), Duration::from_secs(5))
        .expect("cluster url");
    let latest: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(keys.latest("h2", "sensor-0"))
        .query_async(&mut conn)
        .await
        .expect("latest");
    assert!(
        latest
            .get("temperature")
            .is_some_and(|v| v.contains(r#""seq":30"#)),
        "h2/sensor-0's last reading cached: {latest:?}"
    );
    // The webhook job went through the cluster's notification stream.
    eventually("the smoke alarm's webhook", READY, || async {
        run.hook
            .received()
            .into_iter()
            .find(|b| b["alert"]["state"] == "active")
    })
    .await;
    // The API on the cluster: latest values through the cache, a push through pub/sub.
    let api = run.env.hearth("api", &["api"]);
    let addr = api.http_addr().await;
    let token = token_for(&run.env, "h2");
    assert_eq!(house_sensors(&addr, &token, "h2").await.len(), 60);
    let mut ws = ws_connect(&addr, "house=h2", Some(&token))
        .await
        .expect("h2 socket");
    assert_eq!(
        ws_next(&mut ws, READY).await.expect("hello")["type"],
        "hello"
    );
    publish_all(
        run.broker.port,
        &format!("pub-c-{}", run.env.name),
        vec![(
            "hearth/h2/smoke-2".into(),
            br#"{"kind":"smoke","value":1,"seq":1}"#.to_vec(),
        )],
    )
    .await;
    let alert = loop {
        let m = ws_next(&mut ws, READY)
            .await
            .expect("a push to h2's socket");
        if m["type"] == "alert" {
            break m["alert"].clone();
        }
    };
    assert_eq!(alert["raised_by"], "h2/smoke-2/smoke/1");
}

/// With the default (no replica awaited), exactly the readings the killed master held alone
/// are lost, and no other: the window README states.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_failover_loses_its_unreplicated_appends_by_default() {
    let run = failover("cluster_nowait", 0).await;
    let (expected, exposed, pg) = (run.expected, run.exposed, &run.pg);
    wait_rows(pg, expected - exposed, Duration::from_secs(120)).await;
    // Nothing more comes: what is missing is gone.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rows = count_events(pg).await;
    eprintln!(
        "cluster: no replica awaited: {expected} published, {} stored, {} lost (the killed \
         master's appends in the window: {exposed})",
        rows,
        expected - rows
    );
    assert_eq!(
        rows,
        expected - exposed,
        "lost: exactly the killed master's appends its replica never had"
    );
    let distinct: i64 = pg
        .query_one(
            "SELECT count(*) FROM (SELECT DISTINCT house_id, sensor_id, kind, seq FROM events) d",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(distinct, rows, "no duplicates");
}

/// `redis_wait_replicas` on one server with a replica: while the replica is away nothing is
/// acknowledged (the ingest says why), and everything arrives once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_waits_for_its_replica_too() {
    let mut env = Env::new("replica_wait");
    let broker = Broker::start(&env.scratch.0);
    let primary = Node::plain(&env.scratch.0, &[]);
    let replica = Node::plain(
        &env.scratch.0,
        &["--replicaof", "127.0.0.1", &primary.port.to_string()],
    );
    primary.wait_replicas(1).await;
    env.set("mqtt_url", broker.url())
        .set("redis_url", format!("redis://127.0.0.1:{}", primary.port))
        .set("redis_wait_replicas", 1);
    let worker = env.hearth("worker", &["worker"]);
    worker.wait_log("worker started", READY).await;
    let ingest = env.hearth("ingest", &["ingest"]);
    ingest.wait_log("subscribed", READY).await;
    let pg = env.pg().await;
    publish_all(
        broker.port,
        &format!("pub-a-{}", env.name),
        interleaved("h1", 10, 10),
    )
    .await;
    wait_rows(&pg, 100, READY).await;

    replica.signal("STOP");
    primary.wait_replicas(0).await;
    publish_all(
        broker.port,
        &format!("pub-b-{}", env.name),
        interleaved("h2", 10, 10),
    )
    .await;
    ingest.wait_log("0 of 1 replicas acknowledged", READY).await;
    replica.signal("CONT");
    wait_rows(&pg, 200, READY).await;
    assert_exactly_once_in_order(&pg, 200).await;
}
