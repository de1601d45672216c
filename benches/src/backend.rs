//! The stores the workloads run against.
//!
//! A backend opens a fresh, empty store for every workload run, so runs do not
//! measure each other's leftovers: a new SQLite file, or a new PostgreSQL schema.
//! Adding one means a variant here, its `open` arm, and its raw database limit in
//! [`crate::limits`].

use std::fmt;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use keel::Provider;
use keel::postgres::{PostgresOptions, PostgresProvider};
use keel::redis::{RedisNotifier, RedisOptions};
use keel::sqlite::{SqliteOptions, SqliteProvider, Synchronous};

/// Where PostgreSQL is, unless `KEEL_BENCH_POSTGRES_URL` says otherwise: the server
/// `cargo xtask services` starts.
const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Where Redis is, unless `KEEL_BENCH_REDIS_URL` says otherwise.
const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// How long the reachability check waits: the services are local.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// A store Keel can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    /// A SQLite file with `synchronous = FULL`, the default.
    SqliteFull,
    /// A SQLite file with `synchronous = NORMAL`.
    SqliteNormal,
    /// PostgreSQL.
    Postgres,
    /// PostgreSQL, with Redis carrying wake-ups.
    PostgresRedis,
}

impl Backend {
    /// Every backend, in report order.
    pub(crate) const ALL: [Self; 4] = [
        Self::SqliteFull,
        Self::SqliteNormal,
        Self::Postgres,
        Self::PostgresRedis,
    ];

    /// The name used on the command line and in reports.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::SqliteFull => "sqlite-full",
            Self::SqliteNormal => "sqlite-normal",
            Self::Postgres => "postgres",
            Self::PostgresRedis => "postgres-redis",
        }
    }

    /// The backend called `name`.
    pub(crate) fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|backend| backend.name() == name)
    }

    /// Why Keel cannot run on this backend here, if it cannot: a service it needs
    /// does not answer.
    pub(crate) fn unavailable(self) -> Option<String> {
        let needs: &[(&str, String)] = match self {
            Self::SqliteFull | Self::SqliteNormal => &[],
            Self::Postgres => &[("PostgreSQL", postgres_url())],
            Self::PostgresRedis => &[("PostgreSQL", postgres_url()), ("Redis", redis_url())],
        };
        needs.iter().find_map(|(service, url)| {
            let addr = address(url);
            let reachable = addr
                .as_ref()
                .is_some_and(|addr| TcpStream::connect_timeout(addr, PROBE_TIMEOUT).is_ok());
            (!reachable).then(|| {
                let shown = addr.map_or_else(|| url.clone(), |addr| addr.to_string());
                format!(
                    "not available: {service} does not answer at {shown} \
                     (`cargo xtask services` starts it)"
                )
            })
        })
    }

    /// The SQLite durability this backend uses, if it is SQLite.
    pub(crate) fn synchronous(self) -> Option<Synchronous> {
        match self {
            Self::SqliteFull => Some(Synchronous::Full),
            Self::SqliteNormal => Some(Synchronous::Normal),
            Self::Postgres | Self::PostgresRedis => None,
        }
    }

    /// Opens a fresh, empty store called `label` (unique within this invocation);
    /// SQLite files go in `scratch`.
    pub(crate) async fn open(self, scratch: &Path, label: &str) -> Result<Store> {
        match self {
            Self::SqliteFull | Self::SqliteNormal => {
                let path = scratch.join(format!("{}-{label}.db", self.name()));
                remove_database(&path)?;
                let mut options = SqliteOptions::new();
                if let Some(synchronous) = self.synchronous() {
                    options = options.synchronous(synchronous);
                }
                let provider = SqliteProvider::open_with(&path, options)
                    .await
                    .with_context(|| format!("could not open {}", path.display()))?;
                Ok(Store {
                    provider: Arc::new(provider.clone()),
                    cleanup: Cleanup::Sqlite(provider, path),
                })
            }
            Self::Postgres | Self::PostgresRedis => {
                let url = postgres_url();
                let schema = schema_name(self, label);
                drop_schema(&url, &schema).await?;
                let options = PostgresOptions::new().schema(schema.clone());
                let provider = PostgresProvider::connect(&url, options)
                    .await
                    .with_context(|| format!("could not connect to PostgreSQL at `{url}`"))?;
                let mut store: Arc<dyn Provider> = Arc::new(provider.clone());
                let mut notifier = None;
                if self == Self::PostgresRedis {
                    let redis = redis_url();
                    // Its own namespace, as the schema is its own.
                    let options = RedisOptions::new().namespace(schema.clone());
                    let wrapped = RedisNotifier::connect(store, &redis, options)
                        .await
                        .with_context(|| format!("could not connect to Redis at `{redis}`"))?;
                    let wrapped = Arc::new(wrapped);
                    store = Arc::clone(&wrapped) as Arc<dyn Provider>;
                    notifier = Some(wrapped);
                }
                Ok(Store {
                    provider: store,
                    cleanup: Cleanup::Postgres {
                        provider,
                        notifier,
                        url,
                        schema,
                    },
                })
            }
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The PostgreSQL connection string: `KEEL_BENCH_POSTGRES_URL` or the local default.
pub(crate) fn postgres_url() -> String {
    std::env::var("KEEL_BENCH_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_owned())
}

/// The Redis URL: `KEEL_BENCH_REDIS_URL` or the local default.
fn redis_url() -> String {
    std::env::var("KEEL_BENCH_REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS_URL.to_owned())
}

/// The host and port of a `scheme://[user@]host[:port][/…]` URL.
fn address(url: &str) -> Option<SocketAddr> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    let default_port = if scheme == "redis" { 6379 } else { 5432 };
    let host_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:{default_port}")
    };
    host_port.to_socket_addrs().ok()?.next()
}

/// A schema name of PostgreSQL's plain-identifier kind for this backend and run.
fn schema_name(backend: Backend, label: &str) -> String {
    let name = format!("keel_bench_{}_{label}", backend.name());
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// Drops `schema` and everything in it, if it exists.
async fn drop_schema(url: &str, schema: &str) -> Result<()> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("could not connect to PostgreSQL at `{url}`"))?;
    let driver = tokio::spawn(connection);
    let dropped = client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await
        .with_context(|| format!("could not drop schema {schema}"));
    drop(client);
    // The connection ends with the client; its result adds nothing to `dropped`'s.
    let _ = driver.await;
    dropped
}

/// An open store for one workload run.
#[derive(Debug)]
pub(crate) struct Store {
    /// What Keel is built on.
    pub(crate) provider: Arc<dyn Provider>,
    /// What to close and delete afterwards.
    cleanup: Cleanup,
}

/// What a store leaves behind.
#[derive(Debug)]
enum Cleanup {
    /// The provider and its file.
    Sqlite(SqliteProvider, PathBuf),
    /// The provider, the Redis notifier if any, and the schema.
    Postgres {
        provider: PostgresProvider,
        notifier: Option<Arc<RedisNotifier>>,
        url: String,
        schema: String,
    },
}

impl Store {
    /// Closes the store and deletes what it wrote.
    pub(crate) async fn close(self) -> Result<()> {
        drop(self.provider);
        match self.cleanup {
            Cleanup::Sqlite(provider, path) => {
                provider.close().await;
                drop(provider);
                remove_database(&path)
            }
            Cleanup::Postgres {
                provider,
                notifier,
                url,
                schema,
            } => {
                if let Some(notifier) = notifier {
                    notifier.close();
                }
                provider.close().await;
                drop(provider);
                drop_schema(&url, &schema).await
            }
        }
    }
}

/// Deletes a SQLite database with its WAL and shared-memory files, if present.
pub(crate) fn remove_database(path: &Path) -> Result<()> {
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        match std::fs::remove_file(&file) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                return Err(error).with_context(|| format!("could not delete {file:?}"));
            }
            _ => {}
        }
    }
    Ok(())
}
