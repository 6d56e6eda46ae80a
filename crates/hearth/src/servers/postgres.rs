//! The PostgreSQL client both the store and the alerts use: sessions (a shared one for reads,
//! [`Db`]), and errors sorted by whose fault they are ([`StoreError`]).

use std::time::Duration;

use tokio_postgres::{Client, NoTls};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("postgres unavailable: {}", describe(.0))]
    Unavailable(tokio_postgres::Error),
    #[error("postgres refused the rows: {}", describe(.0))]
    Content(tokio_postgres::Error),
    #[error("lanes taken over by another worker: {0:?}")]
    Fenced(Vec<String>),
    #[error("bad database_url: {0}")]
    Url(String),
    /// PostgreSQL failed repeatedly: calls are not attempted until the breaker's next probe.
    #[error("postgres circuit open")]
    CircuitOpen,
}

/// tokio-postgres prints only "db error"; the server's message is what an operator needs.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => match std::error::Error::source(e) {
            Some(src) => format!("{e}: {src}"),
            None => e.to_string(),
        },
    }
}

pub(crate) fn classify(e: tokio_postgres::Error) -> StoreError {
    match e.code().map(|c| c.code()) {
        // data exceptions and integrity violations: the row is at fault
        Some(code) if code.starts_with("22") || code.starts_with("23") => StoreError::Content(e),
        _ => StoreError::Unavailable(e),
    }
}

/// hearth's advisory locks, every key in one place (a key used for two things makes one wait on
/// the other).
pub mod locks {
    /// Migrations are applied under it, one process at a time.
    pub const MIGRATE: i64 = 7_265_727_468;
    /// New sensors and kinds are admitted under it (the caps are exact).
    pub const ADMIT: i64 = 7_265_727_469;
    /// Partitions are made, attached and dropped under it.
    pub const PARTITIONS: i64 = 7_265_727_470;
}

/// Connections request handlers (the API) share.
pub const POOL: usize = 4;

/// The connections of request handlers (the API): [`POOL`] of them, opened on first use and
/// again when one breaks, taken in turn; queries of concurrent requests are pipelined on each,
/// so one slow query holds up only those behind it on its connection. They say `hearth-api` in
/// `pg_stat_activity`.
pub struct Db {
    url: String,
    slots: Vec<tokio::sync::Mutex<Option<std::sync::Arc<Client>>>>,
    next: std::sync::atomic::AtomicUsize,
}

impl Db {
    pub fn new(url: &str) -> Db {
        Db::sized(url, POOL)
    }

    /// A pool of `size` connections (at least one).
    pub fn sized(url: &str, size: usize) -> Db {
        Db {
            url: url.to_string(),
            slots: (0..size.max(1))
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: Default::default(),
        }
    }

    pub async fn client(&self) -> Result<std::sync::Arc<Client>, StoreError> {
        let turn = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.slots.len();
        let mut slot = self.slots[turn].lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let c = std::sync::Arc::new(connect_as(&self.url, "hearth-api").await?);
        *slot = Some(c.clone());
        Ok(c)
    }
}

/// Open a connection, its I/O driven by a task of its own (over TLS when `database_url`'s
/// `sslmode` asks for it: [`super::pg_tls`]).
pub async fn connect(url: &str) -> Result<Client, StoreError> {
    connect_as(url, "hearth").await
}

/// [`connect`], named `application` in `pg_stat_activity`.
async fn connect_as(url: &str, application: &str) -> Result<Client, StoreError> {
    let (mut config, tls) = super::pg_tls::parse(url).map_err(StoreError::Url)?;
    config.connect_timeout(Duration::from_secs(5));
    config.application_name(application);
    open(&config, tls).await
}

/// Open a connection configured by `config`.
pub(super) async fn open(
    config: &tokio_postgres::Config,
    tls: Option<super::pg_tls::Rustls>,
) -> Result<Client, StoreError> {
    async fn drive<F: std::future::Future<Output = Result<(), tokio_postgres::Error>>>(conn: F) {
        if let Err(e) = conn.await {
            tracing::debug!(error = %describe(&e), "postgres connection closed");
        }
    }
    Ok(match tls {
        None => {
            let (client, conn) = config
                .connect(NoTls)
                .await
                .map_err(StoreError::Unavailable)?;
            tokio::spawn(drive(conn));
            client
        }
        Some(tls) => {
            let (client, conn) = config.connect(tls).await.map_err(StoreError::Unavailable)?;
            tokio::spawn(drive(conn));
            client
        }
    })
}
