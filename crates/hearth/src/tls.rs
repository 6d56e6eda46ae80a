//! TLS for every link, on rustls with the `ring` provider (no system OpenSSL).
//!
//! The client links name their TLS settings in their URL, the way each ecosystem already does:
//! `mqtts://host:8883?ca=…&cert=…&key=…`, `rediss://host:6380?ca=…&cert=…&key=…`, and
//! PostgreSQL's own `sslmode`, `sslrootcert`, `sslcert` and `sslkey` ([`crate::servers`]). A
//! link without a CA trusts the system's roots. The servers hearth runs (the API, the embedded
//! broker's TLS listener) take a certificate chain and a key, PEM files both.
//!
//! What is checked is said by [`Verify`]: the chain and the host name (every link, and
//! PostgreSQL's `verify-full`), the chain only (`verify-ca`), or nothing but the handshake's
//! signatures (PostgreSQL's `require` without a root certificate, as libpq does: encrypted,
//! not authenticated).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};

pub use tokio_rustls::{TlsAcceptor, TlsConnector};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Config(String),
}

/// What a client checks of the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Chained to a trusted root, and issued for the host name connected to.
    Full,
    /// Chained to a trusted root, for whatever name.
    Chain,
    /// Not checked (only the handshake's signatures are).
    Nothing,
}

/// A client's files: the roots it trusts (the system's when none), and its own certificate and
/// key when the server asks for one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl ClientFiles {
    /// Take `ca`, `cert` and `key` out of a URL's query (the other parameters stay): the URL
    /// without them, and the files.
    pub fn from_url(url: &str) -> Result<(String, ClientFiles), TlsError> {
        let (rest, params) = take_params(url, &["ca", "cert", "key"]);
        let mut files = ClientFiles::default();
        for (name, value) in params {
            let path = Some(PathBuf::from(value));
            match name.as_str() {
                "ca" => files.ca = path,
                "cert" => files.cert = path,
                _ => files.key = path,
            }
        }
        if files.cert.is_some() != files.key.is_some() {
            return Err(TlsError::Config(
                "a client certificate needs its key: give both cert= and key=, or neither".into(),
            ));
        }
        Ok((rest, files))
    }

    pub fn is_empty(&self) -> bool {
        *self == ClientFiles::default()
    }
}

/// Split the parameters named `names` off `url`'s query: the URL without them, and their
/// values in order.
pub fn take_params(url: &str, names: &[&str]) -> (String, Vec<(String, String)>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), Vec::new());
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let mut kept = Vec::new();
    let mut taken = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if names.contains(&name) {
            taken.push((name.to_string(), value.to_string()));
        } else {
            kept.push(pair);
        }
    }
    let mut out = base.to_string();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    (out, taken)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |message: String| TlsError::File {
        path: path.to_path_buf(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(format!("cannot read certificates: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no certificate in it".into()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        path: path.to_path_buf(),
        message: format!("cannot read a private key: {e}"),
    })
}

fn roots(ca: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            for cert in certs(path)? {
                roots.add(cert).map_err(|e| TlsError::File {
                    path: path.to_path_buf(),
                    message: format!("not a usable CA certificate: {e}"),
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(TlsError::Config(
                    "no CA given and no system root certificate found: give ca=".into(),
                ));
            }
        }
    }
    Ok(roots)
}

/// A client configuration: `files`' roots (the system's when none), its certificate if any,
/// and what it checks of the server.
pub fn client_config(files: &ClientFiles, verify: Verify) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let verifier: Arc<dyn ServerCertVerifier> = match verify {
        Verify::Nothing => Arc::new(Unverified(provider)),
        Verify::Full | Verify::Chain => {
            let webpki = WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots(files.ca.as_deref())?),
                provider,
            )
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
            if verify == Verify::Full {
                webpki
            } else {
                Arc::new(AnyName(webpki))
            }
        }
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match (&files.cert, &files.key) {
        (Some(cert), Some(key_file)) => builder
            .with_client_auth_cert(certs(cert)?, key(key_file)?)
            .map_err(|e| TlsError::File {
                path: cert.clone(),
                message: format!("certificate and key do not go together: {e}"),
            })?,
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// A server configuration from a PEM certificate chain and its key, offering `alpn`. The files
/// are read again when they change ([`Reloading`]): a renewed certificate is served without a
/// restart.
pub fn server_config(
    cert: &Path,
    key_file: &Path,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Reloading::new(cert, key_file)?));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// How often a server's certificate files are looked at (their modification times), at most.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// A server's certificate and key, read again when either file changes (its modification time
/// or size, looked at by a handshake at most every [`RELOAD_CHECK`]). A pair that does not load
/// (half written, a new certificate beside the old key) is logged once and the loaded one
/// served; it is tried again at every check until it loads.
#[derive(Debug)]
struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    state: Mutex<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    served: Arc<CertifiedKey>,
    /// The files as they were when the served pair was read.
    seen: Stamps,
    /// The files as they were when they last failed to load (logged once).
    failed: Option<Stamps>,
    checked: Instant,
}

/// Each file's modification time and size.
type Stamps = [Option<(SystemTime, u64)>; 2];

impl Reloading {
    fn new(cert: &Path, key: &Path) -> Result<Reloading, TlsError> {
        let seen = Self::stamps(cert, key);
        let served = Arc::new(Self::load(cert, key)?);
        Ok(Reloading {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            state: Mutex::new(Loaded {
                served,
                seen,
                failed: None,
                checked: Instant::now(),
            }),
        })
    }

    fn stamps(cert: &Path, key: &Path) -> Stamps {
        let stamp = |p: &Path| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        };
        [stamp(cert), stamp(key)]
    }

    fn load(cert: &Path, key_file: &Path) -> Result<CertifiedKey, TlsError> {
        CertifiedKey::from_der(certs(cert)?, key(key_file)?, &provider()).map_err(|e| {
            TlsError::File {
                path: cert.to_path_buf(),
                message: format!("certificate and key do not go together: {e}"),
            }
        })
    }

    /// The pair to serve now, read again first if the files changed.
    fn current(&self) -> Arc<CertifiedKey> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.checked.elapsed() >= RELOAD_CHECK {
            state.checked = Instant::now();
            let now = Self::stamps(&self.cert, &self.key);
            if now != state.seen {
                match Self::load(&self.cert, &self.key) {
                    Ok(pair) => {
                        tracing::info!(cert = %self.cert.display(), "TLS certificate read again");
                        state.served = Arc::new(pair);
                        state.seen = now;
                        state.failed = None;
                    }
                    Err(e) => {
                        if state.failed != Some(now) {
                            tracing::warn!(
                                error = %e,
                                "TLS certificate changed but does not load: the previous one is served"
                            );
                        }
                        state.failed = Some(now);
                    }
                }
            }
        }
        state.served.clone()
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The acceptor of a server configured by `cert` and `key` (both given, or neither: `None`).
pub fn acceptor(
    cert: &str,
    key_file: &str,
    alpn: &[&[u8]],
) -> Result<Option<TlsAcceptor>, TlsError> {
    match (cert.is_empty(), key_file.is_empty()) {
        (true, true) => Ok(None),
        (false, false) => Ok(Some(TlsAcceptor::from(server_config(
            Path::new(cert),
            Path::new(key_file),
            alpn,
        )?))),
        _ => Err(TlsError::Config(
            "a TLS certificate needs its key: give both, or neither".into(),
        )),
    }
}

/// The name a client checks the server's certificate against.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.trim_matches(['[', ']']).to_string())
        .map_err(|e| TlsError::Config(format!("{host:?} is not a host name TLS can check: {e}")))
}

/// Checks the chain, accepts any name (PostgreSQL's `verify-ca`).
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Checks no certificate, only that the handshake is signed by the key of the one presented.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_params_come_off_the_url() {
        let (url, files) =
            ClientFiles::from_url("mqtts://u:p@broker:8883?ca=/etc/ca.pem&x=1&cert=/c&key=/k")
                .unwrap();
        assert_eq!(url, "mqtts://u:p@broker:8883?x=1");
        assert_eq!(files.ca.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert_eq!(files.key.as_deref(), Some(Path::new("/k")));
        let (url, files) = ClientFiles::from_url("rediss://h:6380/0#insecure").unwrap();
        assert_eq!(url, "rediss://h:6380/0#insecure");
        assert!(files.is_empty());
        let (url, _) = ClientFiles::from_url("rediss://h:6380/?ca=/a#frag").unwrap();
        assert_eq!(url, "rediss://h:6380/#frag");
        assert!(ClientFiles::from_url("mqtts://h?cert=/c").is_err());
        assert!(ClientFiles::from_url("mqtts://h?ca=/a").is_ok());
    }
}
