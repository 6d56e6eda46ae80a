//! One Redis connection type for a single server and for a Redis Cluster ([`Conn`]).
//!
//! `redis_url` names a cluster with the scheme `redis+cluster://` and a list of seed nodes
//! (`redis+cluster://[user:password@]host:port[,host:port…]`); any other URL is one server.
//! Against a cluster, a command goes to the master of its key's slot (the `redis` crate's cluster
//! client follows MOVED and refreshes the slot map after a failover); a pipeline that is not a
//! transaction is sent command by command, all at once, each to its own slot's master; a
//! transaction (MULTI/EXEC, and every script) must keep to one slot, which hearth's key names
//! ensure ([`super::keys`], [`super::txn`]).

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
use redis::{
    AsyncConnectionConfig, Cmd, FromRedisValue, Pipeline, RedisFuture, RedisResult, Value,
};
use tokio::sync::OnceCell;

/// The scheme of a `redis_url` that names a cluster by its seed nodes.
pub const CLUSTER_SCHEME: &str = "redis+cluster://";

/// Whether `url` names a Redis Cluster.
pub fn is_cluster(url: &str) -> bool {
    url.starts_with(CLUSTER_SCHEME)
}

/// The plain `redis://` URL of each node `url` names (itself for one server).
pub fn nodes(url: &str) -> Vec<String> {
    let Some(rest) = url.strip_prefix(CLUSTER_SCHEME) else {
        return vec![url.to_string()];
    };
    let rest = rest.trim_end_matches('/');
    let (auth, hosts) = match rest.rsplit_once('@') {
        Some((auth, hosts)) => (format!("{auth}@"), hosts),
        None => (String::new(), rest),
    };
    hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| format!("redis://{auth}{h}"))
        .collect()
}

/// A connection to one server or to a cluster.
#[derive(Clone)]
pub enum Conn {
    /// One server, reconnecting by itself after it went away.
    Managed(ConnectionManager),
    /// One server, a connection of its own (blocking reads tie it up).
    Plain(MultiplexedConnection),
    /// A cluster, connected on first use (again after a failed first try).
    Cluster(Arc<Cluster>),
}

pub struct Cluster {
    client: ClusterClient,
    conn: OnceCell<ClusterConnection>,
}

impl Cluster {
    async fn get(&self) -> RedisResult<ClusterConnection> {
        self.conn
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }
}

/// Send at once: redis-rs leaves Nagle's algorithm on, and a pipelined request then waits for
/// the server's delayed ACK (40 ms on Linux), which measured as most of the receive → stored
/// latency.
fn tcp() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

/// A client of one server: `rediss://` is TLS, checked against `?ca=FILE` (the system's roots
/// otherwise), with `&cert=FILE&key=FILE` when the server asks for a client certificate.
pub(super) fn client(url: &str) -> RedisResult<redis::Client> {
    use redis::IntoConnectionInfo;
    let bad = |e: crate::tls::TlsError| {
        redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "redis_url",
            e.to_string(),
        ))
    };
    let (url, files) = crate::tls::ClientFiles::from_url(url).map_err(bad)?;
    let info = url.as_str().into_connection_info()?.set_tcp_settings(tcp());
    if !url.starts_with("rediss://") {
        if !files.is_empty() {
            return Err(bad(crate::tls::TlsError::Config(
                "ca=, cert= and key= are for rediss:// only".into(),
            )));
        }
        return redis::Client::open(info);
    }
    let read = |path: &Option<std::path::PathBuf>| {
        path.as_ref()
            .map(|p| {
                std::fs::read(p).map_err(|e| {
                    bad(crate::tls::TlsError::File {
                        path: p.clone(),
                        message: e.to_string(),
                    })
                })
            })
            .transpose()
    };
    let client_tls = match (read(&files.cert)?, read(&files.key)?) {
        (Some(client_cert), Some(client_key)) => Some(redis::ClientTlsConfig {
            client_cert,
            client_key,
        }),
        _ => None,
    };
    let certificates = redis::TlsCertificates {
        client_tls,
        root_cert: read(&files.ca)?,
    };
    redis::Client::build_with_tls(info, certificates)
}

fn cluster(url: &str, response: Duration) -> RedisResult<Conn> {
    let client = ClusterClient::builder(nodes(url))
        .connection_timeout(Duration::from_secs(3))
        .response_timeout(response)
        .tcp_settings(tcp())
        .build()?;
    Ok(Conn::Cluster(Arc::new(Cluster {
        client,
        conn: OnceCell::new(),
    })))
}

/// A self-healing connection for everything but blocking reads: after Redis went away, the call
/// that noticed fails (the caller retries) and the connection is made again.
pub fn manager(url: &str, response: Duration) -> RedisResult<Conn> {
    if is_cluster(url) {
        return cluster(url, response);
    }
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(3)))
        .set_response_timeout(Some(response))
        .set_max_delay(Duration::from_secs(2));
    Ok(Conn::Managed(ConnectionManager::new_lazy_with_config(
        client(url)?,
        config,
    )?))
}

/// A connection of its own, whose replies may take up to `response` (blocking reads ask for
/// more than the default half second).
pub async fn connect(url: &str, response: Duration) -> RedisResult<Conn> {
    if is_cluster(url) {
        return cluster(url, response);
    }
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(3)))
        .set_response_timeout(Some(response));
    Ok(Conn::Plain(
        client(url)?
            .get_multiplexed_async_connection_with_config(&config)
            .await?,
    ))
}

impl Conn {
    pub fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }

    /// Run `commands` as one transaction on the master of `key`'s slot, then `WAIT` there for
    /// `replicas` replicas, for at most `timeout`, in one pipeline on one connection (a `WAIT`
    /// counts only the writes of the connection it is sent on: sent apart, it could reach
    /// another node than the write did while a failover moves the slot, and vouch for writes
    /// it never saw). Returns how many replicas hold the transaction; an error if it did not
    /// run (a queued command refused, `MOVED` included: the caller retries).
    pub async fn exec_waiting(
        &mut self,
        key: &str,
        commands: &Pipeline,
        replicas: u32,
        timeout: Duration,
    ) -> RedisResult<u32> {
        let mut pipe = redis::pipe();
        pipe.cmd("MULTI");
        for cmd in commands.cmd_iter() {
            pipe.add_command(cmd.clone());
        }
        pipe.cmd("EXEC");
        pipe.cmd("WAIT")
            .arg(replicas)
            .arg(timeout.as_millis() as u64);
        let replies: Vec<Value> = match self {
            Conn::Cluster(c) => {
                let route = Route::new(slot(key.as_bytes()), SlotAddr::Master);
                let n = pipe.len();
                c.get()
                    .await?
                    .route_pipeline(pipe, 0, n, SingleNodeRoutingInfo::SpecificNode(route))
                    .await?
            }
            _ => pipe.query_async(self).await?,
        };
        let mut tail = replies.into_iter().rev();
        let (waited, executed, queued) = (tail.next(), tail.next(), tail);
        // A command refused when queued (MOVED, CROSSSLOT…) aborts the transaction; one that
        // failed when run leaves its error in EXEC's reply.
        let refused = queued.chain(match &executed {
            Some(Value::Array(results)) => results.clone(),
            _ => Vec::new(),
        });
        if let Some(Value::ServerError(e)) = refused
            .into_iter()
            .find(|v| matches!(v, Value::ServerError(_)))
        {
            return Err(e.into());
        }
        match executed {
            Some(Value::Array(_)) => Ok(u32::from_redis_value(waited.unwrap_or(Value::Nil))?),
            Some(Value::ServerError(e)) => Err(e.into()),
            _ => Err(redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "transaction not executed",
            ))),
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Managed(c) => c.req_packed_command(cmd),
            Conn::Plain(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => Box::pin(async move {
                let mut conn = c.get().await?;
                conn.req_packed_command(cmd).await
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Managed(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Plain(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => Box::pin(async move {
                let conn = c.get().await?;
                if pipeline.is_transaction() {
                    return conn
                        .clone()
                        .req_packed_commands(pipeline, offset, count)
                        .await;
                }
                // The cluster client sends a pipeline to one slot only: split it, in order (each
                // command is queued on its node's connection as it is first polled).
                let replies = futures_util::future::join_all(pipeline.cmd_iter().map(|cmd| {
                    let mut conn = conn.clone();
                    async move { conn.req_packed_command(cmd).await }
                }))
                .await;
                replies
                    .into_iter()
                    .skip(offset)
                    .take(count)
                    .map(|r| r.or_else(|e| redis::ServerError::try_from(e).map(Value::ServerError)))
                    .collect()
            }),
        }
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// The cluster slot of a key: CRC16 (XMODEM) of its hash tag (the text between its first `{`
/// and the next `}`, when not empty) or of the whole key, modulo 16384.
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % 16384
}

fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_the_clusters() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"));
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
    }

    #[test]
    fn a_cluster_url_names_its_nodes() {
        assert!(is_cluster("redis+cluster://a:7000,b:7001"));
        assert!(!is_cluster("redis://a:6379"));
        assert_eq!(
            nodes("redis+cluster://u:p@a:7000,b:7001/"),
            ["redis://u:p@a:7000", "redis://u:p@b:7001"]
        );
        assert_eq!(nodes("redis://a:6379/0"), ["redis://a:6379/0"]);
    }
}
