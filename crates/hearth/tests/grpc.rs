//! The gRPC API with the client generated from `proto/hearth/v1/hearth.proto`: a stream of
//! readings stored exactly once across a worker that dies mid-batch, a subscription that resumes
//! with nothing missed or repeated, latest values, history, alerts and acknowledgement, another
//! house refused, and the health and reflection services. `hearth api` (gRPC) and `hearth worker`
//! run as separate processes on the servers.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use hearth::api::grpc::proto;
use proto::hearth_client::HearthClient;
use support::*;
use tonic::transport::Channel;

const ADMIN: &str = "grpc-test-admin-token-0123456789";

fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("metadata"),
    );
    request
}

fn reading(house: &str, sensor: &str, kind: &str, value: f64, seq: i64) -> proto::Reading {
    proto::Reading {
        house_id: house.into(),
        sensor_id: sensor.into(),
        kind: kind.into(),
        value,
        unit: None,
        seq: Some(seq),
        ts: None,
    }
}

async fn client(port: u16) -> HearthClient<Channel> {
    let url = format!("http://127.0.0.1:{port}");
    eventually("the gRPC server", Duration::from_secs(30), || async {
        HearthClient::connect(url.clone()).await.ok()
    })
    .await
}

/// Alert pushes from `stream` until `count` of them, or `wait` without one.
async fn alert_pushes(
    stream: &mut tonic::Streaming<proto::Push>,
    count: usize,
    wait: Duration,
) -> Vec<proto::AlertPush> {
    let mut out = Vec::new();
    while out.len() < count {
        match tokio::time::timeout(wait, stream.message()).await {
            Ok(Ok(Some(proto::Push {
                body: Some(proto::push::Body::Alert(a)),
            }))) => out.push(a),
            Ok(Ok(Some(proto::Push {
                body: Some(proto::push::Body::Resync(r)),
            }))) => panic!("unexpected resync: {r:?}"),
            Ok(Ok(Some(_))) => {}
            _ => break,
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_ingest_subscribe_and_walls() {
    let mut env = Env::new("grpc");
    let rules = env.scratch.0.join("rules.toml");
    std::fs::write(&rules, SMOKE_RULE).expect("rules");
    env.set("admin_token", ADMIN)
        .set("rules_file", rules.display())
        .set("grpc_listen", "127.0.0.1:0");
    let api = env.hearth("api", &["api"]);
    let port = api.grpc_port().await;
    // The first worker dies right after committing its first batch, before acknowledging it:
    // the next worker gets that batch again.
    let mut first = env.hearth(
        "worker-1",
        &[
            "worker",
            "--set",
            "test_fault=after_store@1",
            "--set",
            "batch_size=100",
        ],
    );
    let mut grpc = client(port).await;

    // 1,200 readings of 3 sensors over one stream, in batches the worker stores 100 at a time.
    let readings: Vec<proto::Reading> = (1..=400)
        .flat_map(|seq| {
            (0..3).map(move |s| {
                reading(
                    "h1",
                    &format!("t-{s}"),
                    "temperature",
                    20.0 + (seq % 7) as f64,
                    seq,
                )
            })
        })
        .collect();
    let reply = grpc
        .ingest_stream(authed(futures_util::stream::iter(readings.clone()), ADMIN))
        .await
        .expect("ingest stream")
        .into_inner();
    assert_eq!((reply.accepted, reply.rejected), (1200, 0));
    assert!(
        first.ended_within(Duration::from_secs(60)).await,
        "the worker died"
    );
    assert!(
        first
            .log_text()
            .contains("test fault: aborting at after_store"),
        "the worker died mid-batch"
    );
    let _second = env.hearth("worker-2", &["worker"]);
    // A client that retries the last part of its stream: stored once all the same.
    let again = grpc
        .ingest_stream(authed(
            futures_util::stream::iter(readings[1000..].to_vec()),
            ADMIN,
        ))
        .await
        .expect("ingest stream again")
        .into_inner();
    assert_eq!(again.accepted, 200);
    let pg = env.pg().await;
    wait_rows(&pg, 1200, Duration::from_secs(60)).await;
    assert_exactly_once_in_order(&pg, 1200).await;

    // Latest values and history, as REST gives them.
    // (The cache follows the store: the last value shows once its batch's cache write is done.)
    eventually("the latest value", Duration::from_secs(30), || {
        let mut grpc = grpc.clone();
        async move {
            let latest = grpc
                .latest(authed(
                    proto::SensorRef {
                        house_id: "h1".into(),
                        sensor_id: "t-0".into(),
                    },
                    ADMIN,
                ))
                .await
                .expect("latest")
                .into_inner();
            (latest.latest.get("temperature")?.seq == Some(400)).then_some(())
        }
    })
    .await;
    let page = grpc
        .history(authed(
            proto::HistoryRequest {
                house_id: "h1".into(),
                sensor_id: "t-1".into(),
                limit: 50,
                ..Default::default()
            },
            ADMIN,
        ))
        .await
        .expect("history")
        .into_inner();
    assert_eq!(page.events.len(), 50);
    assert!(!page.next_cursor.is_empty());

    // A subscription to h1's alerts, dropped after 5 of 20 alarms, resumed from the last seq.
    let mut stream = grpc
        .subscribe(authed(
            proto::SubscribeRequest {
                house_id: "h1".into(),
                alerts: true,
                ..Default::default()
            },
            ADMIN,
        ))
        .await
        .expect("subscribe")
        .into_inner();
    for i in 0..20 {
        grpc.ingest(authed(
            reading("h1", &format!("smoke-{i}"), "smoke", 1.0, 1),
            ADMIN,
        ))
        .await
        .expect("ingest");
    }
    let first_part = alert_pushes(&mut stream, 5, Duration::from_secs(30)).await;
    assert_eq!(first_part.len(), 5);
    drop(stream);
    let since = first_part.last().expect("one").seq;
    let mut stream = grpc
        .subscribe(authed(
            proto::SubscribeRequest {
                house_id: "h1".into(),
                alerts: true,
                since,
                ..Default::default()
            },
            ADMIN,
        ))
        .await
        .expect("subscribe again")
        .into_inner();
    let rest = alert_pushes(&mut stream, 15, Duration::from_secs(30)).await;
    let more = alert_pushes(&mut stream, 1, Duration::from_secs(2)).await;
    let all: Vec<&proto::AlertPush> = first_part.iter().chain(&rest).chain(&more).collect();
    let seqs: Vec<u64> = all.iter().map(|a| a.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let ids: BTreeSet<i64> = all
        .iter()
        .filter_map(|a| a.alert.as_ref().map(|a| a.id))
        .collect();
    assert_eq!(
        (all.len(), ids.len()),
        (20, 20),
        "each alarm once across the drop"
    );

    // Alerts and acknowledgement.
    let alerts = grpc
        .alerts(authed(
            proto::AlertsRequest {
                house_id: "h1".into(),
                ..Default::default()
            },
            ADMIN,
        ))
        .await
        .expect("alerts")
        .into_inner()
        .alerts;
    assert_eq!(alerts.len(), 20);
    let acked = grpc
        .acknowledge(authed(
            proto::AcknowledgeRequest { id: alerts[0].id },
            ADMIN,
        ))
        .await
        .expect("acknowledge")
        .into_inner();
    assert_eq!(acked.state, proto::AlertState::Acknowledged as i32);

    // The walls: a house token of h1 may not touch h2; no token is no call.
    let token = token_for(&env, "h1");
    let denied = grpc
        .ingest(authed(reading("h2", "x", "temperature", 20.0, 1), &token))
        .await
        .expect_err("another house's reading");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let denied = grpc
        .latest(authed(
            proto::SensorRef {
                house_id: "h2".into(),
                sensor_id: "x".into(),
            },
            &token,
        ))
        .await
        .expect_err("another house's values");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let subscribed = grpc
        .subscribe(authed(
            proto::SubscribeRequest {
                house_id: "h2".into(),
                alerts: true,
                ..Default::default()
            },
            &token,
        ))
        .await;
    let Err(denied) = subscribed else {
        panic!("another house's pushes");
    };
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let others = grpc
        .alerts(authed(proto::AlertsRequest::default(), &token))
        .await
        .expect("own alerts")
        .into_inner()
        .alerts;
    assert!(others.iter().all(|a| a.house_id == "h1"));
    let anonymous = grpc
        .latest(tonic::Request::new(proto::SensorRef {
            house_id: "h1".into(),
            sensor_id: "t-0".into(),
        }))
        .await
        .expect_err("no token");
    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);

    // A message past the size bound (64 KiB) is refused before it is read.
    let mut huge = reading("h1", "t-0", "temperature", 20.0, 999);
    huge.unit = Some("x".repeat(100 * 1024));
    let refused = grpc
        .ingest(authed(huge, ADMIN))
        .await
        .expect_err("a 100 KiB reading");
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");

    // Health and reflection.
    let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("url")
        .connect()
        .await
        .expect("channel");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "hearth.v1.Hearth".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(futures_util::stream::iter(vec![request]))
        .await
        .expect("reflection")
        .into_inner();
    let answer = answers.message().await.expect("answer").expect("one");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("not a service list: {answer:?}");
    };
    assert!(
        list.service.iter().any(|s| s.name == "hearth.v1.Hearth"),
        "{list:?}"
    );
}

/// Past `http_max_connections`, a gRPC client waits in the backlog and is served once another
/// leaves (embedded: the same server code).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_connections_are_capped() {
    let mut env = Env::embedded("grpc_cap");
    env.set("admin_token", ADMIN)
        .set("http_max_connections", 1)
        .set("grpc_listen", "127.0.0.1:0");
    let up = env.up().await;
    let port = up.grpc_port().await;
    let ask = |mut grpc: HearthClient<Channel>| async move {
        grpc.alerts(authed(proto::AlertsRequest::default(), ADMIN))
            .await
            .map(|r| r.into_inner().alerts.len())
    };
    let first = client(port).await;
    assert_eq!(ask(first.clone()).await.expect("the first client"), 0);
    let url = format!("http://127.0.0.1:{port}");
    let second = HearthClient::new(Channel::from_shared(url).expect("url").connect_lazy());
    let waiting = tokio::spawn(ask(second));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !waiting.is_finished(),
        "a connection past the cap is not served"
    );
    drop(first);
    let served = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("served once the first left")
        .expect("task");
    assert_eq!(served.expect("the second client"), 0);
}
