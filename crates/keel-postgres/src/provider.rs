//! The provider: connecting (validating, migrating, listening), closing, and the
//! `Provider` implementation that dispatches each method to its module.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{
    ClientWrapper, Hook, HookError, Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime,
};
use keel_core::{Event, ExecutionId, InstanceId, Message, Timestamp};
use keel_provider::{
    Ack, AckedTurns, ActivityCompletion, ActivityLimits, ActivityRetry, Capabilities,
    CompletedActivities, Created, DeadLetter, DeadLetterId, ErrorKind, FetchActivities,
    FetchOrchestrations, InstanceQuery, InstanceRecord, LeaseToken, LeasedWorkItem, LockToken,
    NewInstance, OnConflict, OrchestrationWork, Page, PageRequest, Provider, ProviderError,
    PurgeFilter, QueueDepths, Result, WorkKind,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_postgres::NoTls;

use crate::convert::{col, timestamp};
use crate::error::{db, describe, invalid, pool};
use crate::lease::Identities;
use crate::options::PostgresOptions;
use crate::schema::{self, Channels, SchemaName};
use crate::wake::{self, Wake};
use crate::{ack, activity, dead_letter, instance, lease, orchestration};

/// Keel's PostgreSQL provider: instances, histories and queues in one schema of a
/// database that many worker processes share.
///
/// Calls take connections from a pool; one more connection, outside the pool,
/// listens for wake-ups. Cloning is cheap and shares both.
#[derive(Clone)]
pub struct PostgresProvider {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) pool: Pool,
    pub(crate) schema: SchemaName,
    pub(crate) wake: Arc<Wake>,
    pub(crate) channels: Channels,
    pub(crate) capabilities: Capabilities,
    pub(crate) options: PostgresOptions,
    pub(crate) identities: Identities,
    listener: Mutex<Option<JoinHandle<()>>>,
    target: String,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(mut listener) = self.listener.lock()
            && let Some(handle) = listener.take()
        {
            handle.abort();
        }
    }
}

impl fmt::Debug for PostgresProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresProvider")
            .field("target", &self.inner.target)
            .field("schema", &self.inner.schema.as_str())
            .finish_non_exhaustive()
    }
}

/// Where a configuration points, for error messages: hosts, ports and database, never
/// the password.
fn target(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|host| match host {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
    format!(
        "{}:{}/{}",
        if hosts.is_empty() {
            "localhost".to_owned()
        } else {
            hosts.join(",")
        },
        if ports.is_empty() {
            "5432".to_owned()
        } else {
            ports.join(",")
        },
        config
            .get_dbname()
            .or(config.get_user())
            .unwrap_or("postgres")
    )
}

impl PostgresProvider {
    /// Connects to the database at `url` (a `postgres://` URL or a `key=value`
    /// connection string), creates the options' schema if missing and applies the
    /// migrations it lacks, and starts listening for wake-ups.
    ///
    /// Nothing is left for first use: a bad URL or schema name is `InvalidInput`, an
    /// unreachable server `Unavailable`, and bad credentials or a missing database
    /// `InvalidInput`, each naming what was wrong. Safe when several processes connect
    /// to a new schema at once: its migration runs exactly once.
    pub async fn connect(url: &str, options: PostgresOptions) -> Result<Self> {
        let schema = SchemaName::new(&options.schema)?;
        let mut config = tokio_postgres::Config::from_str(url).map_err(|error| {
            invalid(format!(
                "the PostgreSQL connection string is invalid: {}",
                describe(&error)
            ))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.connect_timeout);
        }
        // Unqualified names resolve to the schema on every connection (pg_catalog is
        // searched first anyway, so built-in functions are unaffected).
        config.options(format!("-c search_path={}", schema.quoted()));
        config.application_name(format!("keel:{}", schema.as_str()));
        let target = target(&config);
        let unreachable = |error: ProviderError| {
            ProviderError::new(
                error.kind(),
                format!(
                    "cannot connect to PostgreSQL at {target}: {}",
                    error.message()
                ),
            )
            .retryable(error.is_retryable())
            .with_source(error)
        };

        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.wait_timeout))
            .create_timeout(Some(options.connect_timeout))
            .pre_recycle(Hook::async_fn(|client, metrics| {
                Box::pin(replan(client, metrics.recycle_count))
            }))
            .build()
            .map_err(|error| invalid(format!("cannot build the connection pool: {error}")))?;
        let mut client = pool.get().await.map_err(|e| unreachable(pool_error(e)))?;
        schema::migrate(&mut client, &schema)
            .await
            .map_err(unreachable)?;
        drop(client);

        let channels = Channels::new(&schema);
        let wake = Arc::new(Wake::new(channels.clone()));
        let mut listener_config = config.clone();
        listener_config.application_name(format!("keel-listener:{}", schema.as_str()));
        let (first, listening) = oneshot::channel();
        let listener = tokio::spawn(wake::listen(listener_config, Arc::clone(&wake), first));
        match listening.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(unreachable(error)),
            Err(_) => {
                return Err(ProviderError::new(
                    ErrorKind::Internal,
                    "the listener task ended before it connected",
                ));
            }
        }

        let mut capabilities = Capabilities::default();
        capabilities.max_record_bytes = options.max_record_bytes;
        capabilities.max_history_events = options.max_history_events;
        capabilities.database_clock = true;
        capabilities.activity_limits = true;
        capabilities.leases_on_ack = true;
        capabilities.locks_on_completion = true;
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                schema,
                wake,
                channels,
                capabilities,
                options,
                identities: Identities::default(),
                listener: Mutex::new(Some(listener)),
                target,
            }),
        })
    }

    /// Stops the listener and closes the pool: connections in use close when
    /// returned, and calls made afterwards fail with `Unavailable`.
    pub async fn close(&self) {
        let listener = self
            .inner
            .listener
            .lock()
            .ok()
            .and_then(|mut listener| listener.take());
        if let Some(handle) = listener {
            handle.abort();
            let _ = handle.await;
        }
        self.inner.pool.close();
    }

    /// The schema holding this provider's tables.
    pub fn schema(&self) -> &str {
        self.inner.schema.as_str()
    }

    /// The schema version this build writes.
    pub fn schema_version() -> i32 {
        schema::newest_version()
    }

    /// A pooled connection.
    pub(crate) async fn client(&self) -> Result<Object> {
        self.inner.pool.get().await.map_err(pool_error)
    }

    pub(crate) fn capabilities_ref(&self) -> &Capabilities {
        &self.inner.capabilities
    }
}

/// Drops a pooled connection's cached query plans after its 16th, 32nd, 64th, ... use.
///
/// PostgreSQL plans a prepared statement afresh for its first five runs, then settles
/// on a generic plan, kept until the statistics of its tables change. In a new schema
/// the first runs see tables of a few rows, for which scanning a whole table beats an
/// index; the plan made then would go on scanning as the table grows, until autovacuum
/// analyzes it, minutes later. Planning again each time a connection's uses double
/// follows the tables' growth for a negligible cost.
async fn replan(client: &mut ClientWrapper, uses: usize) -> Result<(), HookError> {
    if uses >= 16 && uses.is_power_of_two() {
        client
            .batch_execute("DISCARD PLANS")
            .await
            .map_err(HookError::Backend)?;
    }
    Ok(())
}

fn pool_error(error: deadpool_postgres::PoolError) -> ProviderError {
    pool(error)
}

#[async_trait::async_trait]
impl Provider for PostgresProvider {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities.clone()
    }

    async fn now(&self) -> Result<Timestamp> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached("SELECT keel_now()")
            .await
            .map_err(db)?;
        let row = client.query_one(&statement, &[]).await.map_err(db)?;
        Ok(timestamp(col(&row, 0)?))
    }

    async fn create_instance(
        &self,
        instance: NewInstance,
        on_conflict: OnConflict,
    ) -> Result<Created> {
        instance::create(self, instance, on_conflict).await
    }

    async fn send_message(
        &self,
        instance: &InstanceId,
        message: Message,
        visible_at: Option<Timestamp>,
    ) -> Result<()> {
        instance::send_message(self, instance, message, visible_at).await
    }

    async fn fetch_orchestrations(
        &self,
        request: FetchOrchestrations,
    ) -> Result<Vec<OrchestrationWork>> {
        orchestration::fetch(self, request).await
    }

    async fn renew_lock(&self, lock: &LockToken, extend: Duration) -> Result<()> {
        orchestration::renew(self, lock, extend).await
    }

    async fn abandon_lock(&self, lock: &LockToken, delay: Duration) -> Result<()> {
        orchestration::abandon(self, lock, delay).await
    }

    async fn ack_turns(&self, acks: Vec<Ack>) -> Result<Vec<Result<()>>> {
        Ok(ack::ack_turns(self, acks, None).await?.results)
    }

    async fn ack_turns_leasing(
        &self,
        acks: Vec<Ack>,
        lease: FetchActivities,
    ) -> Result<AckedTurns> {
        ack::ack_turns(self, acks, Some(lease)).await
    }

    async fn suspend(&self, lock: &LockToken, reason: &str) -> Result<()> {
        orchestration::suspend(self, lock, reason).await
    }

    async fn fetch_activities(&self, request: FetchActivities) -> Result<Vec<LeasedWorkItem>> {
        activity::fetch(self, request).await
    }

    async fn renew_lease(&self, lease: &LeaseToken, extend: Duration) -> Result<()> {
        lease::renew(self, lease, extend).await
    }

    async fn complete_activities(
        &self,
        completions: Vec<ActivityCompletion>,
    ) -> Result<Vec<Result<()>>> {
        Ok(lease::complete(self, completions, None).await?.results)
    }

    async fn complete_activities_locking(
        &self,
        completions: Vec<ActivityCompletion>,
        lock: FetchOrchestrations,
    ) -> Result<CompletedActivities> {
        lease::complete(self, completions, Some(lock)).await
    }

    async fn retry_activity(&self, retry: ActivityRetry) -> Result<()> {
        lease::retry(self, retry).await
    }

    async fn abandon_lease(&self, lease: &LeaseToken) -> Result<()> {
        lease::abandon(self, lease).await
    }

    async fn set_activity_limits(&self, name: &str, limits: ActivityLimits) -> Result<()> {
        activity::set_limits(self, name, limits).await
    }

    async fn list_dead_letters(&self, page: PageRequest) -> Result<Page<DeadLetter>> {
        dead_letter::list(self, page).await
    }

    async fn get_dead_letter(&self, id: DeadLetterId) -> Result<DeadLetter> {
        dead_letter::get(self, id).await
    }

    async fn replay_dead_letter(&self, id: DeadLetterId) -> Result<()> {
        dead_letter::replay(self, id).await
    }

    async fn discard_dead_letter(&self, id: DeadLetterId) -> Result<()> {
        dead_letter::discard(self, id).await
    }

    async fn pause(&self, instance: &InstanceId) -> Result<()> {
        instance::pause(self, instance).await
    }

    async fn resume(&self, instance: &InstanceId) -> Result<()> {
        instance::resume(self, instance).await
    }

    async fn get_instance(&self, instance: &InstanceId) -> Result<InstanceRecord> {
        instance::get(self, instance).await
    }

    async fn read_history(
        &self,
        instance: &InstanceId,
        execution: Option<ExecutionId>,
    ) -> Result<Vec<Event>> {
        instance::read_history(self, instance, execution).await
    }

    async fn list_instances(
        &self,
        query: InstanceQuery,
        page: PageRequest,
    ) -> Result<Page<InstanceRecord>> {
        instance::list(self, query, page).await
    }

    async fn queue_depths(&self) -> Result<QueueDepths> {
        instance::queue_depths(self).await
    }

    async fn purge(&self, filter: PurgeFilter) -> Result<u64> {
        instance::purge(self, filter).await
    }

    async fn delete_instance(&self, instance: &InstanceId) -> Result<u64> {
        instance::delete(self, instance).await
    }

    async fn wait_for_work(&self, kind: WorkKind, timeout: Duration) -> Result<()> {
        wake::wait_for_work(self, kind, timeout).await
    }

    async fn next_due(&self, kind: WorkKind) -> Result<Option<Timestamp>> {
        wake::next_due(self, kind).await
    }

    async fn wait_for_ended(&self, timeout: Duration) -> Result<bool> {
        wake::wait_for_ended(self, timeout).await
    }
}
