//! The stores the workloads run against.
//!
//! A backend opens a fresh, empty store for every workload run, so runs do not
//! measure each other's leftovers. Adding one means a variant here, its `open` arm,
//! and its raw database limit in [`crate::limits`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use keel::Provider;
use keel::sqlite::{SqliteOptions, SqliteProvider, Synchronous};

/// Where PostgreSQL is, unless `KEEL_BENCH_POSTGRES_URL` says otherwise: the server
/// `cargo xtask services` starts.
pub(crate) const DEFAULT_POSTGRES_URL: &str = "host=127.0.0.1 port=5432 user=postgres";

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

    /// Why Keel cannot run on this backend in this build, if it cannot.
    pub(crate) fn unavailable(self) -> Option<&'static str> {
        match self {
            Self::SqliteFull | Self::SqliteNormal => None,
            // These slot in when `keel_postgres::PostgresProvider::connect(url, options)`
            // and the Redis notifier exist: fill in their `open` arms below.
            Self::Postgres => Some("not available yet: keel-postgres is still a stub"),
            Self::PostgresRedis => {
                Some("not available yet: keel-postgres and keel-redis are still stubs")
            }
        }
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
        if let Some(reason) = self.unavailable() {
            bail!("{}: {reason}", self.name());
        }
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
                    sqlite: Some((provider, path)),
                })
            }
            // Unreachable while `unavailable` says so; the PostgreSQL arms go here:
            // a fresh schema per label, `PostgresProvider::connect(url, options)`, and
            // for `PostgresRedis` the Redis notifier attached to it.
            Self::Postgres | Self::PostgresRedis => bail!("{}: not available yet", self.name()),
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

/// An open store for one workload run.
#[derive(Debug)]
pub(crate) struct Store {
    /// What Keel is built on.
    pub(crate) provider: Arc<dyn Provider>,
    /// The SQLite provider and its file, to close and delete afterwards.
    sqlite: Option<(SqliteProvider, PathBuf)>,
}

impl Store {
    /// Closes the store and deletes what it wrote.
    pub(crate) async fn close(self) -> Result<()> {
        if let Some((provider, path)) = self.sqlite {
            provider.close().await;
            drop(provider);
            remove_database(&path)?;
        }
        Ok(())
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
