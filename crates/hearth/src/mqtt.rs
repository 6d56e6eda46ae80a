//! MQTT 3.1.1 connections on rumqttc's codec, with batched writes.
//!
//! rumqttc's event loop writes and flushes each PUBACK on its own: one system call per message,
//! which profiling showed to be most of the ingest's CPU. Here packets are encoded into a buffer
//! and written together: a batch of PUBACKs (a whole XADD pipeline's worth) is one write. The
//! ingest's session ([`crate::ingest`]) and the bench's load client ([`crate::sim::wire`])
//! are built on it.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Login, Packet};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::tls::{self, ClientFiles, Verify};

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("mqtt_url: {0}")]
    Url(String),
    #[error("connection to the broker failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the broker closed the connection")]
    Closed,
    #[error("the broker refused the connection: {0}")]
    Refused(String),
    #[error("bad packet: {0}")]
    Protocol(String),
    #[error("mqtt_url: {0}")]
    Tls(#[from] tls::TlsError),
}

/// A connection's socket: plain TCP, or TLS over it.
pub enum Socket {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

impl Socket {
    fn halves(self) -> (ReadHalf, WriteHalf) {
        match self {
            Socket::Tcp(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Socket::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (Box::new(r), Box::new(w))
            }
        }
    }
}

/// Where and who to connect as.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub credentials: Option<(String, String)>,
    pub clean_session: bool,
    /// 0 disables the keep-alive.
    pub keep_alive: Duration,
    /// Largest packet accepted from the broker.
    pub max_packet: usize,
    /// TLS (`mqtts://`): what the connection checks and presents.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Endpoint {
    /// Parse `mqtt://[user[:password]@]host[:port]`, or `mqtts://…[?ca=FILE&cert=FILE&key=FILE]`
    /// for TLS (port 8883 by default; the system's roots when no `ca` is given).
    pub fn parse(url: &str, client_id: &str) -> Result<Endpoint, MqttError> {
        let (mut endpoint, files) = Endpoint::unsecured(url, client_id)?;
        if let Some(files) = files {
            endpoint.tls = Some(tls::client_config(&files, Verify::Full)?);
        }
        Ok(endpoint)
    }

    /// Host and port of `url`, without reading its certificate files (a readiness probe's
    /// question, asked on every request).
    pub fn address(url: &str) -> Result<(String, u16), MqttError> {
        let (endpoint, _) = Endpoint::unsecured(url, "")?;
        Ok((endpoint.host, endpoint.port))
    }

    /// The endpoint without its TLS configuration, and the files to make it from for
    /// `mqtts://`.
    fn unsecured(url: &str, client_id: &str) -> Result<(Endpoint, Option<ClientFiles>), MqttError> {
        let (url, files) = ClientFiles::from_url(url)?;
        let url = url.as_str();
        let (secure, rest) = if let Some(rest) = url
            .strip_prefix("mqtts://")
            .or_else(|| url.strip_prefix("ssl://"))
        {
            (true, rest)
        } else if let Some(rest) = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("tcp://"))
        {
            (false, rest)
        } else {
            return Err(MqttError::Url(format!(
                "must start with mqtt:// or mqtts://, got {url:?}"
            )));
        };
        if !secure && !files.is_empty() {
            return Err(MqttError::Url(format!(
                "ca=, cert= and key= are for mqtts:// only, got {url:?}"
            )));
        }
        let rest = rest.trim_end_matches('/');
        let (credentials, hostport) = match rest.rsplit_once('@') {
            Some((c, h)) => {
                let (user, pass) = c.split_once(':').unwrap_or((c, ""));
                (Some((user.to_string(), pass.to_string())), h)
            }
            None => (None, rest),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| MqttError::Url(format!("bad port in {url:?}")))?,
            ),
            _ => (hostport, if secure { 8883 } else { 1883 }),
        };
        if host.is_empty() {
            return Err(MqttError::Url(format!("no host in {url:?}")));
        }
        let endpoint = Endpoint {
            host: host.trim_matches(['[', ']']).to_string(),
            port,
            client_id: client_id.to_string(),
            credentials,
            clean_session: true,
            keep_alive: Duration::from_secs(30),
            max_packet: 256 * 1024 * 1024,
            tls: None,
        };
        Ok((endpoint, secure.then_some(files)))
    }
}

/// The reading half: decodes whatever arrived, keeps partial packets for the next read.
pub struct Reader {
    half: ReadHalf,
    buf: BytesMut,
    max_packet: usize,
    /// Since when the buffer holds the beginning of a packet not yet whole.
    partial_since: Option<tokio::time::Instant>,
}

impl Reader {
    /// Like [`Reader::packets`], but the peer must send something within `idle`, and finish a
    /// packet it began within `packet`: a client holding a half-sent packet (or nothing) open
    /// is let go, whatever keep-alive it asked for. Cancel-safe as `packets` is.
    pub async fn packets_within(
        &mut self,
        idle: Duration,
        packet: Duration,
    ) -> Result<Vec<Packet>, MqttError> {
        let started = tokio::time::Instant::now();
        loop {
            let out = self.decode()?;
            if !out.is_empty() {
                return Ok(out);
            }
            let deadline = match self.partial_since {
                Some(since) => since + packet,
                None => started + idle,
            };
            self.buf.reserve(64 * 1024);
            match tokio::time::timeout_at(deadline, self.half.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) => return Err(MqttError::Closed),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.into()),
                Err(_) if self.partial_since.is_some() => {
                    return Err(MqttError::Protocol(format!(
                        "a packet was not whole within {} ms",
                        packet.as_millis()
                    )));
                }
                Err(_) => {
                    return Err(MqttError::Protocol(format!(
                        "nothing received within {} s (keep-alive)",
                        idle.as_secs()
                    )));
                }
            }
        }
    }

    /// The caller paused reading: a partial packet's time starts again (the pause was not the
    /// peer's).
    pub fn resumed(&mut self) {
        if self.partial_since.is_some() {
            self.partial_since = Some(tokio::time::Instant::now());
        }
    }

    /// The whole packets in the buffer; notes when a partial one began.
    fn decode(&mut self) -> Result<Vec<Packet>, MqttError> {
        let mut out = Vec::new();
        loop {
            match Packet::read(&mut self.buf, self.max_packet) {
                Ok(p) => {
                    out.push(p);
                    self.partial_since = None;
                }
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(e) => return Err(MqttError::Protocol(format!("{e:?}"))),
            }
        }
        if self.buf.is_empty() {
            self.partial_since = None;
        } else if self.partial_since.is_none() {
            self.partial_since = Some(tokio::time::Instant::now());
        }
        Ok(out)
    }

    /// The packets available now, waiting for at least one. Cancel-safe: bytes read are kept in
    /// the buffer until decoded.
    pub async fn packets(&mut self) -> Result<Vec<Packet>, MqttError> {
        loop {
            let mut out = Vec::new();
            loop {
                match Packet::read(&mut self.buf, self.max_packet) {
                    Ok(p) => out.push(p),
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                    Err(e) => return Err(MqttError::Protocol(format!("{e:?}"))),
                }
            }
            if !out.is_empty() {
                return Ok(out);
            }
            self.buf.reserve(64 * 1024);
            if self.half.read_buf(&mut self.buf).await? == 0 {
                return Err(MqttError::Closed);
            }
        }
    }
}

/// The writing half: packets are queued into a buffer and sent by [`Writer::flush`].
pub struct Writer {
    half: WriteHalf,
    buf: BytesMut,
}

/// A packet that can be queued on a [`Writer`].
pub trait Encode {
    fn encode(&self, buf: &mut BytesMut) -> Result<usize, rumqttc::mqttbytes::Error>;
}

macro_rules! encode_via_write {
    ($($t:ty),*) => {$(
        impl Encode for $t {
            fn encode(&self, buf: &mut BytesMut) -> Result<usize, rumqttc::mqttbytes::Error> {
                self.write(buf)
            }
        }
    )*};
}
encode_via_write!(
    rumqttc::mqttbytes::v4::Publish,
    rumqttc::mqttbytes::v4::Connect,
    rumqttc::mqttbytes::v4::PubAck,
    rumqttc::mqttbytes::v4::Subscribe,
    rumqttc::mqttbytes::v4::PingReq,
    rumqttc::mqttbytes::v4::Disconnect,
    rumqttc::mqttbytes::v4::ConnAck,
    rumqttc::mqttbytes::v4::SubAck,
    rumqttc::mqttbytes::v4::UnsubAck,
    rumqttc::mqttbytes::v4::PubRec,
    rumqttc::mqttbytes::v4::PubComp,
    rumqttc::mqttbytes::v4::PingResp,
    rumqttc::mqttbytes::v4::PubRel
);

/// The halves of an accepted connection (the embedded broker's side).
pub fn split(socket: Socket, max_packet: usize) -> (Reader, Writer) {
    let (read, write) = socket.halves();
    (
        Reader {
            half: read,
            buf: BytesMut::with_capacity(16 * 1024),
            max_packet,
            partial_since: None,
        },
        Writer {
            half: write,
            buf: BytesMut::with_capacity(16 * 1024),
        },
    )
}

impl Writer {
    pub fn queue(&mut self, packet: &impl Encode) -> Result<(), MqttError> {
        packet
            .encode(&mut self.buf)
            .map(|_| ())
            .map_err(|e| MqttError::Protocol(format!("encode: {e:?}")))
    }

    /// Bytes queued and not yet written.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    pub async fn flush(&mut self) -> Result<(), MqttError> {
        if !self.buf.is_empty() {
            self.half.write_all(&self.buf).await?;
            self.buf.clear();
        }
        Ok(())
    }
}

/// Open a connection: TCP, CONNECT, CONNACK. Returns the halves and whether the broker resumed
/// a stored session. Anything the broker sends right after CONNACK (a resumed session's
/// messages) stays in the reader.
pub async fn connect(ep: &Endpoint) -> Result<(Reader, Writer, bool), MqttError> {
    let stream = tokio::time::timeout(
        Duration::from_secs(5),
        TcpStream::connect((ep.host.as_str(), ep.port)),
    )
    .await
    .map_err(|_| MqttError::Io(std::io::ErrorKind::TimedOut.into()))??;
    stream.set_nodelay(true)?;
    let socket = match &ep.tls {
        None => Socket::Tcp(stream),
        Some(config) => {
            let name = tls::server_name(&ep.host)?;
            let connector = tls::TlsConnector::from(config.clone());
            let stream =
                tokio::time::timeout(Duration::from_secs(10), connector.connect(name, stream))
                    .await
                    .map_err(|_| MqttError::Refused("no TLS handshake within 10 s".into()))??;
            Socket::Tls(Box::new(stream.into()))
        }
    };
    let (read, write) = socket.halves();
    let mut reader = Reader {
        half: read,
        buf: BytesMut::with_capacity(64 * 1024),
        max_packet: ep.max_packet,
        partial_since: None,
    };
    let mut writer = Writer {
        half: write,
        buf: BytesMut::with_capacity(64 * 1024),
    };
    let mut connect = Connect::new(ep.client_id.clone());
    connect.keep_alive = ep.keep_alive.as_secs().min(u16::MAX as u64) as u16;
    connect.clean_session = ep.clean_session;
    connect.login = ep
        .credentials
        .as_ref()
        .map(|(u, p)| Login::new(u.clone(), p.clone()));
    connect
        .write(&mut writer.buf)
        .map_err(|e| MqttError::Protocol(format!("encode connect: {e:?}")))?;
    writer.flush().await?;
    // The CONNACK is the first packet; read exactly it, so that what follows stays buffered.
    let ack = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match Packet::read(&mut reader.buf, reader.max_packet) {
                Ok(p) => return Ok(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                    if reader.half.read_buf(&mut reader.buf).await? == 0 {
                        return Err(MqttError::Closed);
                    }
                }
                Err(e) => return Err(MqttError::Protocol(format!("{e:?}"))),
            }
        }
    })
    .await
    .map_err(|_| MqttError::Refused("no CONNACK within 10 s".into()))??;
    match ack {
        Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => {
            Ok((reader, writer, ack.session_present))
        }
        Packet::ConnAck(ack) => Err(MqttError::Refused(format!("{:?}", ack.code))),
        other => Err(MqttError::Protocol(format!(
            "expected CONNACK, got {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let e = Endpoint::parse("mqtt://127.0.0.1:1884", "id").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("127.0.0.1", 1884));
        let e = Endpoint::parse("mqtt://u:p@broker", "id").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("broker", 1883));
        assert_eq!(e.credentials, Some(("u".into(), "p".into())));
        let e = Endpoint::parse("tcp://[::1]:1885/", "id").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 1885));
        assert!(Endpoint::parse("http://x", "id").is_err());
        assert!(Endpoint::parse("mqtt://x:notaport", "id").is_err());
        assert!(Endpoint::parse("mqtt://", "id").is_err());
        let e = Endpoint::parse("mqtts://broker", "id").unwrap();
        assert_eq!((e.port, e.tls.is_some()), (8883, true));
        assert!(Endpoint::parse("mqtt://broker?ca=/etc/ca.pem", "id").is_err());
        assert!(Endpoint::parse("mqtts://broker?ca=/nonexistent.pem", "id").is_err());
    }
}
