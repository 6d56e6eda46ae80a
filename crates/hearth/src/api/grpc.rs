//! gRPC (`proto/hearth/v1/hearth.proto`, on tonic): the REST API's contract over HTTP/2, served
//! on `grpc_listen` by `hearth up` and `hearth api`. Every call goes through the same cores as
//! its REST route (the intake for `Ingest`, the store and alerts seams, the WebSocket hub for
//! `Subscribe`), with the same bearer tokens (metadata `authorization: Bearer TOKEN`) and the
//! same house walls; REST's errors map to gRPC codes (400 → INVALID_ARGUMENT, 401 →
//! UNAUTHENTICATED, 403 → PERMISSION_DENIED, 404 → NOT_FOUND, 503 → UNAVAILABLE…). The health
//! (`grpc.health.v1`) and reflection (`grpc.reflection.v1`) services are served beside it.
//! Bounds: `http_max_connections` connections, 256 calls at once on each, a 64 KiB message, a
//! call within the HTTP request time; `Subscribe` streams count among the house's push clients
//! (`push_clients_per_house`, with its WebSocket clients; past it `RESOURCE_EXHAUSTED`).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, Streaming};

use super::AppState;
use super::auth::Principal;
use super::error::ApiError;
use super::ws::{Subscription, fresh};
use crate::alerts::{Alert, AlertState, Push};
use crate::shutdown::Shutdown;

/// The code generated from `proto/hearth/v1/hearth.proto` (held to its generator's style).
#[allow(clippy::all)]
pub mod proto {
    tonic::include_proto!("hearth.v1");

    /// The encoded descriptors of the proto file, for the reflection service.
    pub const DESCRIPTORS: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/hearth_descriptors.bin"));
}

use proto::hearth_server::{Hearth, HearthServer};

/// Readings of a stream appended together, at most.
const STREAM_BATCH: usize = 500;

/// Serve gRPC on `listener` until shutdown.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let tls = !state.config.api_tls_cert.is_empty();
    tracing::info!(%addr, tls, "grpc listening");
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<HearthServer<Service>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::DESCRIPTORS)
        .build_v1()?;
    let limits = super::Limits::from_config(&state.config);
    let mut server = tonic::transport::Server::builder();
    // HTTPS's certificate, when the API has one: gRPC over TLS too.
    let (cert, key) = (&state.config.api_tls_cert, &state.config.api_tls_key);
    if !cert.is_empty() && !key.is_empty() {
        let identity = tonic::transport::Identity::from_pem(
            std::fs::read(cert).map_err(|e| anyhow::anyhow!("api_tls_cert {cert}: {e}"))?,
            std::fs::read(key).map_err(|e| anyhow::anyhow!("api_tls_key {key}: {e}"))?,
        );
        server = server.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
    }
    server
        .timeout(limits.request_timeout)
        .concurrency_limit_per_connection(256)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            HearthServer::new(Service { state })
                .max_decoding_message_size(64 * 1024)
                .max_encoding_message_size(4 * 1024 * 1024),
        )
        .serve_with_incoming_shutdown(incoming(listener, limits.max_connections), async move {
            shutdown.wait().await
        })
        .await?;
    Ok(())
}

/// Accepted connections, at most `max` at once (`http_max_connections`, as the HTTP server):
/// each holds a permit until it closes, and past `max` the next ones wait in the kernel's
/// backlog.
fn incoming(
    listener: TcpListener,
    max: usize,
) -> impl Stream<Item = std::io::Result<Counted>> + Send + 'static {
    let permits = Arc::new(tokio::sync::Semaphore::new(max.max(1)));
    futures_util::stream::unfold((listener, permits), |(listener, permits)| async move {
        let permit = permits.clone().acquire_owned().await.ok()?;
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let counted = Counted {
                        stream,
                        _permit: permit,
                    };
                    return Some((Ok(counted), (listener, permits)));
                }
                Err(e) => {
                    // Out of descriptors, say: wait instead of spinning.
                    tracing::warn!(error = %e, "accepting a gRPC connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

/// A connection counted against the cap while it lives.
struct Counted {
    stream: tokio::net::TcpStream,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl tonic::transport::server::Connected for Counted {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

pub struct Service {
    state: Arc<AppState>,
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let message = e.to_string();
        match e {
            ApiError::BadRequest(_) => Status::invalid_argument(message),
            ApiError::Unauthorized => Status::unauthenticated(message),
            ApiError::Forbidden(_) => Status::permission_denied(message),
            ApiError::NotFound(_) => Status::not_found(message),
            ApiError::Conflict(_) => Status::failed_precondition(message),
            ApiError::TooLarge(_) => Status::resource_exhausted(message),
            ApiError::Timeout(_) => Status::deadline_exceeded(message),
            ApiError::Unavailable(_) => Status::unavailable(message),
            ApiError::TooMany(_) | ApiError::Crowded(_) => Status::resource_exhausted(message),
        }
    }
}

impl Service {
    /// Who the call's bearer token is.
    async fn who<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        Ok(super::auth::authenticate(&self.state, token).await?)
    }

    async fn ingest(
        &self,
        who: &Principal,
        readings: &[proto::Reading],
    ) -> Result<proto::IngestReply, Status> {
        let body = serde_json::to_vec(&readings.iter().map(json_of).collect::<Vec<_>>())
            .map_err(|e| Status::internal(e.to_string()))?;
        let accepted = super::events::ingest(&self.state, who, &body).await?;
        Ok(proto::IngestReply {
            accepted: accepted.accepted as u64,
            rejected: accepted.rejected as u64,
            reasons: accepted
                .reasons
                .into_iter()
                .map(|(k, v)| (k, v as u64))
                .collect(),
        })
    }
}

/// A reading as `POST /events` takes it.
fn json_of(r: &proto::Reading) -> serde_json::Value {
    let mut v = serde_json::json!({
        "house_id": r.house_id,
        "sensor_id": r.sensor_id,
        "kind": r.kind,
        "value": r.value,
    });
    if let Some(unit) = &r.unit {
        v["unit"] = unit.clone().into();
    }
    if let Some(seq) = r.seq {
        v["seq"] = seq.into();
    }
    if let Some(ts) = r.ts {
        v["ts"] = ts.into();
    }
    v
}

fn state_of(s: AlertState) -> proto::AlertState {
    match s {
        AlertState::Active => proto::AlertState::Active,
        AlertState::Acknowledged => proto::AlertState::Acknowledged,
        AlertState::Cleared => proto::AlertState::Cleared,
    }
}

fn alert_of(a: Alert) -> proto::Alert {
    proto::Alert {
        id: a.id,
        house_id: a.house_id,
        sensor_id: a.sensor_id,
        rule: a.rule,
        kind: a.kind,
        severity: a.severity.as_str().into(),
        state: state_of(a.state).into(),
        message: a.message,
        value: a.value,
        raised_at: a.raised_at,
        raised_by: a.raised_by,
        acknowledged_at: a.acknowledged_at,
        acknowledged_by: a.acknowledged_by,
        cleared_at: a.cleared_at,
        cleared_by: a.cleared_by,
    }
}

/// A hub message (the WebSocket's JSON) as a gRPC push.
fn push_of(text: &str) -> Option<proto::Push> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    if value["type"] == "resync" {
        let reason = value["reason"].as_str().unwrap_or_default().to_string();
        return Some(proto::Push {
            body: Some(proto::push::Body::Resync(proto::Resync { reason })),
        });
    }
    let body = match serde_json::from_value::<Push>(value).ok()? {
        Push::Alert { seq, alert, .. } => proto::push::Body::Alert(proto::AlertPush {
            seq: seq.unwrap_or(0),
            alert: Some(alert_of(*alert)),
        }),
        Push::Events { house_id, events } => proto::push::Body::Events(proto::EventsPush {
            house_id,
            events: events
                .into_iter()
                .map(|e| proto::PushedEvent {
                    sensor_id: e.sensor_id,
                    kind: e.kind,
                    value: e.value,
                    unit: e.unit,
                    seq: e.seq,
                    ts: e.ts,
                })
                .collect(),
        }),
    };
    Some(proto::Push { body: Some(body) })
}

type PushStream = Pin<Box<dyn Stream<Item = Result<proto::Push, Status>> + Send>>;

#[tonic::async_trait]
impl Hearth for Service {
    async fn ingest(
        &self,
        request: Request<proto::Reading>,
    ) -> Result<Response<proto::IngestReply>, Status> {
        let who = self.who(&request).await?;
        let reply = Service::ingest(self, &who, &[request.into_inner()]).await?;
        Ok(Response::new(reply))
    }

    /// Readings appended a batch at a time as they arrive; the reply, once all are queued.
    async fn ingest_stream(
        &self,
        request: Request<Streaming<proto::Reading>>,
    ) -> Result<Response<proto::IngestReply>, Status> {
        let who = self.who(&request).await?;
        let mut stream = request.into_inner();
        let mut total = proto::IngestReply::default();
        let mut batch = Vec::with_capacity(STREAM_BATCH);
        loop {
            let next = stream.message().await?;
            let end = next.is_none();
            batch.extend(next);
            if batch.len() >= STREAM_BATCH || (end && !batch.is_empty()) {
                let reply = Service::ingest(self, &who, &batch).await?;
                batch.clear();
                total.accepted += reply.accepted;
                total.rejected += reply.rejected;
                for (reason, n) in reply.reasons {
                    *total.reasons.entry(reason).or_default() += n;
                }
            }
            if end {
                return Ok(Response::new(total));
            }
        }
    }

    type SubscribeStream = PushStream;

    async fn subscribe(
        &self,
        request: Request<proto::SubscribeRequest>,
    ) -> Result<Response<PushStream>, Status> {
        let who = self.who(&request).await?;
        let r = request.into_inner();
        let house = match (r.house_id.as_str(), &who) {
            ("", Principal::House(own)) => Some(own.clone()),
            ("", Principal::Admin) => None,
            (h, _) => {
                super::params::valid_id("house", h)?;
                who.check(h)?;
                Some(h.to_string())
            }
        };
        let sub = Subscription {
            house,
            events: r.events,
            alerts: r.alerts,
        };
        let since = (r.since > 0).then_some(r.since);
        let hub = self.state.hub.clone();
        let seat = hub.seat(&who)?;
        let attached = hub.attach(vec![sub], since).await;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<proto::Push, Status>>(64);
        tokio::spawn(async move {
            let id = attached.id;
            let mut live = attached.rx;
            let mut last_seq = attached.last_seq;
            let mut sent = true;
            for text in attached.missed {
                if let Some(push) = push_of(&text) {
                    sent &= tx.send(Ok(push)).await.is_ok();
                }
            }
            while sent {
                tokio::select! {
                    message = live.recv() => match message {
                        Some(text) => {
                            if fresh(&mut last_seq, &text)
                                && let Some(push) = push_of(&text)
                            {
                                sent = tx.send(Ok(push)).await.is_ok();
                            }
                        }
                        // Too slow: the hub let it go.
                        None => {
                            let _ = tx.send(Err(Status::resource_exhausted("too slow: pushes were not read"))).await;
                            break;
                        }
                    },
                    _ = tx.closed() => break,
                }
            }
            hub.remove(id);
            drop(seat);
        });
        Ok(Response::new(Box::pin(tokio_stream_of(rx))))
    }

    async fn latest(
        &self,
        request: Request<proto::SensorRef>,
    ) -> Result<Response<proto::LatestReply>, Status> {
        let who = self.who(&request).await?;
        let r = request.into_inner();
        let view = super::sensors::latest_of(&self.state, &who, r.house_id, r.sensor_id).await?;
        let latest = view
            .latest
            .into_iter()
            .map(|(kind, v)| {
                let value = proto::LatestValue {
                    value: v["value"].as_f64().unwrap_or_default(),
                    unit: v["unit"].as_str().map(str::to_string),
                    ts: v["ts"].as_i64().unwrap_or_default(),
                    seq: v["seq"].as_i64(),
                    received_us: v["received_us"].as_i64().unwrap_or_default(),
                };
                (kind, value)
            })
            .collect();
        Ok(Response::new(proto::LatestReply {
            house_id: view.house_id,
            sensor_id: view.sensor_id,
            latest,
        }))
    }

    async fn history(
        &self,
        request: Request<proto::HistoryRequest>,
    ) -> Result<Response<proto::HistoryReply>, Status> {
        let who = self.who(&request).await?;
        let r = request.into_inner();
        let mut params = HashMap::new();
        if let Some(kind) = r.kind {
            params.insert("kind".to_string(), kind);
        }
        if let Some(from) = r.from {
            params.insert("from".to_string(), from.to_string());
        }
        if let Some(to) = r.to {
            params.insert("to".to_string(), to.to_string());
        }
        if r.limit > 0 {
            params.insert("limit".to_string(), r.limit.to_string());
        }
        if !r.cursor.is_empty() {
            params.insert("cursor".to_string(), r.cursor);
        }
        let page =
            super::sensors::history_of(&self.state, &who, r.house_id, r.sensor_id, &params).await?;
        Ok(Response::new(proto::HistoryReply {
            events: page
                .events
                .into_iter()
                .map(|e| proto::HistoryEvent {
                    id: e.id,
                    kind: e.kind,
                    value: e.value,
                    unit: e.unit,
                    seq: e.seq,
                    ts: e.ts,
                })
                .collect(),
            next_cursor: page.next_cursor.unwrap_or_default(),
        }))
    }

    async fn alerts(
        &self,
        request: Request<proto::AlertsRequest>,
    ) -> Result<Response<proto::AlertsReply>, Status> {
        let who = self.who(&request).await?;
        let r = request.into_inner();
        let mut params = HashMap::new();
        if !r.house_id.is_empty() {
            params.insert("house".to_string(), r.house_id);
        }
        let state = match proto::AlertState::try_from(r.state) {
            Ok(proto::AlertState::Active) => Some("active"),
            Ok(proto::AlertState::Acknowledged) => Some("acknowledged"),
            Ok(proto::AlertState::Cleared) => Some("cleared"),
            Ok(proto::AlertState::Unspecified) => None,
            Err(_) => return Err(Status::invalid_argument("unknown alert state")),
        };
        if let Some(s) = state {
            params.insert("state".to_string(), s.to_string());
        }
        if r.limit > 0 {
            params.insert("limit".to_string(), r.limit.to_string());
        }
        let alerts = super::alerts::alerts_of(&self.state, &who, &params).await?;
        Ok(Response::new(proto::AlertsReply {
            alerts: alerts.into_iter().map(alert_of).collect(),
        }))
    }

    async fn acknowledge(
        &self,
        request: Request<proto::AcknowledgeRequest>,
    ) -> Result<Response<proto::Alert>, Status> {
        let who = self.who(&request).await?;
        let id = request.into_inner().id.to_string();
        let alert = super::alerts::acknowledge(&self.state, &who, &id).await?;
        Ok(Response::new(alert_of(alert)))
    }
}

/// A receiver as a stream.
fn tokio_stream_of<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl Stream<Item = T> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
