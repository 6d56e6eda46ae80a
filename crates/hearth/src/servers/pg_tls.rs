//! PostgreSQL over TLS: `database_url`'s libpq parameters read, and rustls under tokio-postgres.
//!
//! tokio-postgres knows `sslmode=disable|prefer|require` only and no certificate files; libpq's
//! spelling is what hosted PostgreSQL hands out, so hearth reads it: `sslmode` `disable`,
//! `prefer`, `require`, `verify-ca`, `verify-full`; `sslrootcert` (a PEM file, or `system`);
//! `sslcert` and `sslkey`. As in libpq, `require` checks no certificate unless `sslrootcert` is
//! given (then it is `verify-ca`), and `verify-full` checks the host name too. Without
//! `sslmode`, hearth does not use TLS (libpq would try it first: `prefer`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

use crate::tls::{self, ClientFiles, Verify};

/// A `database_url` read: tokio-postgres's settings and, when TLS is asked for, rustls's.
/// A bad URL is a one-line reason.
pub fn parse(url: &str) -> Result<(tokio_postgres::Config, Option<Rustls>), String> {
    let (rest, params) = tls::take_params(url, &["sslmode", "sslrootcert", "sslcert", "sslkey"]);
    let mut mode = "disable".to_string();
    let mut files = ClientFiles::default();
    for (name, value) in params {
        let path = Some(std::path::PathBuf::from(&value));
        match name.as_str() {
            "sslmode" => mode = value,
            "sslrootcert" if value == "system" => files.ca = None,
            "sslrootcert" => files.ca = path,
            "sslcert" => files.cert = path,
            _ => files.key = path,
        }
    }
    let mut config: tokio_postgres::Config = rest
        .parse()
        .map_err(|e: tokio_postgres::Error| e.to_string())?;
    let (ssl, verify) = match mode.as_str() {
        "disable" => (SslMode::Disable, None),
        "prefer" => (SslMode::Prefer, Some(Verify::Nothing)),
        "require" if files.ca.is_some() => (SslMode::Require, Some(Verify::Chain)),
        "require" => (SslMode::Require, Some(Verify::Nothing)),
        "verify-ca" => (SslMode::Require, Some(Verify::Chain)),
        "verify-full" => (SslMode::Require, Some(Verify::Full)),
        other => {
            return Err(format!(
                "sslmode must be disable, prefer, require, verify-ca or verify-full, got {other:?}"
            ));
        }
    };
    if verify.is_none() && !files.is_empty() {
        return Err("sslrootcert, sslcert and sslkey need an sslmode other than disable".into());
    }
    if files.cert.is_some() != files.key.is_some() {
        return Err("sslcert and sslkey go together".into());
    }
    config.ssl_mode(ssl);
    let tls = match verify {
        None => None,
        Some(verify) => Some(Rustls(
            tls::client_config(&files, verify).map_err(|e| e.to_string())?,
        )),
    };
    Ok((config, tls))
}

/// rustls as tokio-postgres's TLS connector.
#[derive(Clone)]
pub struct Rustls(Arc<rustls::ClientConfig>);

impl<S> MakeTlsConnect<S> for Rustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type TlsConnect = Connect;
    type Error = tls::TlsError;

    fn make_tls_connect(&mut self, host: &str) -> Result<Connect, tls::TlsError> {
        Ok(Connect {
            config: self.0.clone(),
            name: tls::server_name(host)?,
        })
    }
}

pub struct Connect {
    config: Arc<rustls::ClientConfig>,
    name: rustls::pki_types::ServerName<'static>,
}

impl<S> TlsConnect<S> for Connect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Stream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let stream = tls::TlsConnector::from(self.config)
                .connect(self.name, stream)
                .await?;
            Ok(Stream(stream))
        })
    }
}

/// A TLS session to PostgreSQL. No channel binding is offered (SCRAM without `-PLUS`).
pub struct Stream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for Stream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_parameters() {
        let (config, tls) = parse("postgres://u@h:5433/db").unwrap();
        assert_eq!(
            (config.get_ssl_mode(), tls.is_none()),
            (SslMode::Disable, true)
        );
        let (config, tls) = parse("postgres://u@h/db?sslmode=require&application_name=x").unwrap();
        assert_eq!(
            (config.get_ssl_mode(), tls.is_some()),
            (SslMode::Require, true)
        );
        assert_eq!(config.get_application_name(), Some("x"));
        assert!(parse("postgres://h/db?sslmode=verify-full&sslrootcert=/nonexistent").is_err());
        assert!(parse("postgres://h/db?sslmode=allow").is_err());
        assert!(parse("postgres://h/db?sslrootcert=/etc/ca.pem").is_err());
        assert!(parse("postgres://h/db?sslmode=require&sslcert=/c").is_err());
    }
}
