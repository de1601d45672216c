//! Putting a Keel together: the store, the registered code, the worker's options.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use keel_core::IntoFailure;
use keel_provider::Provider;
use keel_replay::{OrchestrationContext, from_fn};
use keel_worker::{
    ActivityContext, Notifier, Registry, ShutdownReport, Worker, WorkerOptions, activity_fn,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::client::Client;
use crate::error::Result;

/// The database file used when the builder is given no store.
pub const DEFAULT_DATABASE: &str = "keel.db";

/// Where Keel keeps its state.
#[derive(Debug, Clone)]
enum Store {
    #[cfg(feature = "sqlite")]
    SqliteFile(PathBuf),
    #[cfg(feature = "sqlite")]
    SqliteMemory,
    #[cfg(feature = "postgres")]
    Postgres(String),
    Provider(Arc<dyn Provider>),
}

/// Builds a [`Keel`]: choose the store, register orchestrations and activities, set the
/// worker's options, then [`start`](Self::start) a worker or open a [`client`](Self::client).
#[derive(Debug)]
pub struct KeelBuilder {
    store: Option<Store>,
    /// The Redis URL of the wake-up notifier, if any.
    #[cfg(feature = "redis")]
    redis: Option<String>,
    registry: Registry,
    /// Registration errors, reported by `start` so that the chain stays fluent.
    errors: Vec<keel_worker::Error>,
    options: WorkerOptions,
}

impl KeelBuilder {
    pub(crate) fn new() -> Self {
        Self {
            store: None,
            #[cfg(feature = "redis")]
            redis: None,
            registry: Registry::new(),
            errors: Vec::new(),
            options: WorkerOptions::default(),
        }
    }

    /// Keeps state in the SQLite database file at `path`, created if missing (the
    /// default store is `keel.db` in the working directory).
    #[cfg(feature = "sqlite")]
    pub fn sqlite(mut self, path: impl Into<PathBuf>) -> Self {
        self.store = Some(Store::SqliteFile(path.into()));
        self
    }

    /// Keeps state in a private in-memory SQLite database: gone when the process ends.
    /// For tests and demos.
    #[cfg(feature = "sqlite")]
    pub fn in_memory(mut self) -> Self {
        self.store = Some(Store::SqliteMemory);
        self
    }

    /// Keeps state in the PostgreSQL database at `url`
    /// (`postgres://user@host:port/database`), in the `keel` schema with the default
    /// pool: any number of worker processes on any number of hosts may share it. For
    /// other options, open a `keel::postgres::PostgresProvider` and pass it to
    /// [`provider`](Self::provider).
    #[cfg(feature = "postgres")]
    pub fn postgres(mut self, url: impl Into<String>) -> Self {
        self.store = Some(Store::Postgres(url.into()));
        self
    }

    /// Publishes and hears wake-ups through the Redis at `url` (`redis://host:port`), so
    /// that work enqueued by one process wakes the workers and waiting clients of the
    /// others at once. An accelerator only: with Redis down, work still flows by the
    /// store's own wake-ups and polling.
    #[cfg(feature = "redis")]
    pub fn redis(mut self, url: impl Into<String>) -> Self {
        self.redis = Some(url.into());
        self
    }

    /// Keeps state in `provider` (PostgreSQL, a SQLite provider with your own options,
    /// or your own).
    pub fn provider(mut self, provider: Arc<dyn Provider>) -> Self {
        self.store = Some(Store::Provider(provider));
        self
    }

    /// Sets the worker's options.
    pub fn options(mut self, options: WorkerOptions) -> Self {
        self.options = options;
        self
    }

    /// Registers activity `name`: an `async fn(ActivityContext, In) -> Result<Out, E>`.
    /// `In` and `Out` are serde types; `E` is any error (or a [`Failure`](crate::Failure)
    /// to choose its kind and whether it is retried).
    pub fn activity<In, Out, E, F, Fut>(mut self, name: &str, f: F) -> Self
    where
        F: Fn(ActivityContext, In) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Out, E>> + Send + 'static,
        In: DeserializeOwned + Send + 'static,
        Out: Serialize + Send + 'static,
        E: IntoFailure + Send + 'static,
    {
        let added = self.registry.add_activity(name, Arc::new(activity_fn(f)));
        self.errors.extend(added.err());
        self
    }

    /// Registers orchestration `name` as version 1: an
    /// `async fn(OrchestrationContext, In) -> Result<Out, E>`.
    pub fn orchestration<In, Out, E, F, Fut>(self, name: &str, f: F) -> Self
    where
        F: Fn(OrchestrationContext, In) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Out, E>> + Send + 'static,
        In: DeserializeOwned + Send + 'static,
        Out: Serialize + Send + 'static,
        E: IntoFailure + Send + 'static,
    {
        self.orchestration_version(name, 1, f)
    }

    /// Registers `f` as version `version` of orchestration `name`. New instances run
    /// the newest version unless they ask for one; running instances keep the version
    /// they started with, so old versions stay registered until their instances end.
    pub fn orchestration_version<In, Out, E, F, Fut>(
        mut self,
        name: &str,
        version: u32,
        f: F,
    ) -> Self
    where
        F: Fn(OrchestrationContext, In) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Out, E>> + Send + 'static,
        In: DeserializeOwned + Send + 'static,
        Out: Serialize + Send + 'static,
        E: IntoFailure + Send + 'static,
    {
        let code = from_fn(move |ctx, input: In| {
            let run = f(ctx, input);
            async move { run.await.map_err(IntoFailure::into_failure) }
        });
        let added = self
            .registry
            .add_orchestration(name, version, Arc::new(code));
        self.errors.extend(added.err());
        self
    }

    /// Opens the store and starts a worker that runs the registered code.
    pub async fn start(self) -> Result<Keel> {
        let (provider, registry, options) = self.open().await?;
        let notifier = Arc::new(Notifier::new());
        let worker = Worker::start(
            Arc::clone(&provider),
            Arc::clone(&registry),
            options.clone(),
            Arc::clone(&notifier),
        )?;
        let client = Client::new(provider, Some(registry), notifier, options.payload_codec());
        Ok(Keel { client, worker })
    }

    /// Opens the store for a client only: no worker runs in this process. With
    /// registrations, starts of unregistered names fail at once.
    pub async fn client(self) -> Result<Client> {
        let (provider, registry, options) = self.open().await?;
        let registry = registry_if_any(registry);
        let notifier = Arc::new(Notifier::new());
        Ok(Client::new(
            provider,
            registry,
            notifier,
            options.payload_codec(),
        ))
    }

    async fn open(self) -> Result<(Arc<dyn Provider>, Arc<Registry>, WorkerOptions)> {
        if let Some(error) = self.errors.into_iter().next() {
            return Err(error.into());
        }
        self.options.validate()?;
        let store = match self.store {
            Some(store) => store,
            None => default_store()?,
        };
        let provider: Arc<dyn Provider> = match store {
            #[cfg(feature = "sqlite")]
            Store::SqliteFile(path) => Arc::new(keel_sqlite::SqliteProvider::open(path).await?),
            #[cfg(feature = "sqlite")]
            Store::SqliteMemory => Arc::new(keel_sqlite::SqliteProvider::in_memory().await?),
            #[cfg(feature = "postgres")]
            Store::Postgres(url) => Arc::new(
                keel_postgres::PostgresProvider::connect(
                    &url,
                    keel_postgres::PostgresOptions::default(),
                )
                .await?,
            ),
            Store::Provider(provider) => provider,
        };
        #[cfg(feature = "redis")]
        let provider: Arc<dyn Provider> = match &self.redis {
            Some(url) => Arc::new(
                keel_redis::RedisNotifier::connect(
                    provider,
                    url,
                    keel_redis::RedisOptions::default(),
                )
                .await?,
            ),
            None => provider,
        };
        Ok((provider, Arc::new(self.registry), self.options))
    }
}

#[cfg(feature = "sqlite")]
fn default_store() -> Result<Store> {
    Ok(Store::SqliteFile(PathBuf::from(DEFAULT_DATABASE)))
}

#[cfg(not(feature = "sqlite"))]
fn default_store() -> Result<Store> {
    let reason = "keel was built without the `sqlite` feature: give the builder a provider";
    Err(crate::Error::InvalidInput(keel_core::InvalidInput::new(
        "store", reason,
    )))
}

fn registry_if_any(registry: Arc<Registry>) -> Option<Arc<Registry>> {
    let empty = registry.orchestration_names().is_empty();
    (!empty).then_some(registry)
}

/// A running Keel: a worker executing the registered code, and a [`Client`].
#[derive(Debug)]
pub struct Keel {
    client: Client,
    worker: Worker,
}

impl Keel {
    /// Starts building one.
    pub fn builder() -> KeelBuilder {
        KeelBuilder::new()
    }

    /// A client for this Keel's store (cheap to clone).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Stops the worker gracefully: no new work is fetched, running work finishes up to
    /// the `shutdown_timeout` option, the rest goes back to the queue for other workers.
    pub async fn shutdown(self) -> ShutdownReport {
        self.worker.shutdown().await
    }
}
