//! The provider: opening the database, and the `Provider` implementation that
//! dispatches each method to its module.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use keel_core::{Event, ExecutionId, InstanceId, Message, Timestamp};
use keel_provider::{
    Ack, ActivityCompletion, ActivityLimits, ActivityRetry, Capabilities, Clock, Created,
    DeadLetter, DeadLetterId, FetchActivities, FetchOrchestrations, InstanceQuery, InstanceRecord,
    LeaseToken, LeasedWorkItem, LockToken, NewInstance, OnConflict, OrchestrationWork, Page,
    PageRequest, Provider, PurgeFilter, QueueDepths, Result, WorkKind,
};
use sqlx::ConnectOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

use crate::error::db;
use crate::migrations;
use crate::options::SqliteOptions;
use crate::wake::Wake;
use crate::writer::{WriteCtx, Writer};
use crate::{ack, activity, dead_letter, instance, lease, orchestration};

/// Distinguishes the in-memory databases of one process.
static MEMORY_DATABASES: AtomicU64 = AtomicU64::new(0);

/// Keel's SQLite provider: one file (or one in-memory database) holding instances,
/// histories and queues.
///
/// Writes go through one connection that commits concurrent requests together (group
/// commit), each in its own savepoint; reads use a pool of read-only connections. The
/// file is in WAL mode, so reads never wait for the writer. Cloning is cheap and shares
/// the connections.
#[derive(Clone)]
pub struct SqliteProvider {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) writer: Writer,
    pub(crate) readers: SqlitePool,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) wake: Arc<Wake>,
    pub(crate) capabilities: Capabilities,
    location: String,
}

impl fmt::Debug for SqliteProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteProvider")
            .field("location", &self.inner.location)
            .field("clock", &self.inner.clock)
            .finish_non_exhaustive()
    }
}

impl SqliteProvider {
    /// Opens (creating it if missing) the database file at `path` with the default
    /// options, applying any migrations it lacks.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, SqliteOptions::default()).await
    }

    /// Opens (creating it if missing) the database file at `path` with `options`,
    /// applying any migrations it lacks.
    pub async fn open_with(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self> {
        let path = path.as_ref();
        let base = SqliteConnectOptions::new()
            .filename(path)
            .busy_timeout(options.busy_timeout)
            .foreign_keys(false);
        let writer = base
            .clone()
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(options.synchronous.to_sqlx());
        Self::start(writer, base, path.display().to_string(), options).await
    }

    /// Opens a fresh in-memory database with the default options: gone when the
    /// provider (and its last clone) is dropped.
    pub async fn in_memory() -> Result<Self> {
        Self::in_memory_with(SqliteOptions::default()).await
    }

    /// Opens a fresh in-memory database with `options`. Each call gets its own
    /// database, shared by this provider's writer and readers only.
    pub async fn in_memory_with(options: SqliteOptions) -> Result<Self> {
        let n = MEMORY_DATABASES.fetch_add(1, Ordering::Relaxed);
        let name = format!("file:keel-{}-{n}", std::process::id());
        let base = SqliteConnectOptions::new()
            .filename(&name)
            .in_memory(true)
            .shared_cache(true)
            .busy_timeout(options.busy_timeout)
            .foreign_keys(false);
        let writer = base
            .clone()
            .create_if_missing(true)
            .synchronous(options.synchronous.to_sqlx());
        Self::start(writer, base, name, options).await
    }

    async fn start(
        writer: SqliteConnectOptions,
        readers: SqliteConnectOptions,
        location: String,
        options: SqliteOptions,
    ) -> Result<Self> {
        let mut conn = writer.connect().await.map_err(db)?;
        let now = crate::convert::millis(options.clock.now());
        migrations::apply(&mut conn, now).await?;
        // Readers never write: `query_only` makes a bug that tries fail loudly.
        let readers = SqlitePoolOptions::new()
            .max_connections(options.readers)
            .min_connections(0)
            // A local file does not drop connections: skip the ping on every acquire.
            .test_before_acquire(false)
            .connect_lazy_with(readers.pragma("query_only", "ON"));
        let wake = Arc::new(Wake::default());
        let writer = Writer::spawn(conn, Arc::clone(&options.clock), Arc::clone(&wake));
        let mut capabilities = Capabilities::default();
        capabilities.max_record_bytes = options.max_record_bytes;
        capabilities.max_history_events = options.max_history_events;
        Ok(Self {
            inner: Arc::new(Inner {
                writer,
                readers,
                clock: options.clock,
                wake,
                capabilities,
                location,
            }),
        })
    }

    /// Finishes the writes already queued, then closes every connection. Calls made
    /// afterwards fail with `Unavailable`.
    pub async fn close(&self) {
        self.inner.writer.close().await;
        self.inner.readers.close().await;
    }

    /// How many transactions the writer has committed since open. Compared with the
    /// number of writes made, it shows how well group commit batches them.
    pub fn transactions_committed(&self) -> u64 {
        self.inner.writer.commits()
    }

    /// Runs `work` on the write connection in the next group transaction.
    pub(crate) async fn write<R, F>(&self, work: F) -> Result<R>
    where
        R: Send + 'static,
        F: for<'c> FnOnce(&'c mut WriteCtx) -> BoxFuture<'c, Result<R>> + Send + 'static,
    {
        self.inner.writer.run(Box::new(work)).await
    }

    /// The read-only pool.
    pub(crate) fn readers(&self) -> &SqlitePool {
        &self.inner.readers
    }

    /// The provider's current time.
    pub(crate) fn clock_now(&self) -> Timestamp {
        self.inner.clock.now()
    }
}

#[async_trait::async_trait]
impl Provider for SqliteProvider {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities.clone()
    }

    async fn now(&self) -> Result<Timestamp> {
        Ok(self.clock_now())
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
        ack::ack_turns(self, acks).await
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
        lease::complete(self, completions).await
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
        crate::wake::wait_for_work(self, kind, timeout).await
    }

    async fn next_due(&self, kind: WorkKind) -> Result<Option<Timestamp>> {
        crate::wake::next_due(self, kind).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use keel_core::{Codec, Event, EventKind, InstanceId, Timestamp};
    use keel_provider::{
        Ack, ErrorKind, FetchOrchestrations, ManualClock, NewInstance, OnConflict, Provider,
    };
    use sqlx::{Executor, Row};

    use super::*;
    use crate::options::Synchronous;

    const START: Timestamp = Timestamp::from_millis(1_700_000_000_000);

    fn id(s: &str) -> InstanceId {
        InstanceId::new(s).unwrap()
    }

    fn new_instance(s: &str) -> NewInstance {
        let input = Codec::default().encode(&1).unwrap();
        NewInstance::new(id(s), "test", input)
    }

    fn options() -> SqliteOptions {
        SqliteOptions::new().clock(Arc::new(ManualClock::new(START)))
    }

    async fn fetch(p: &SqliteProvider) -> Vec<OrchestrationWork> {
        p.fetch_orchestrations(FetchOrchestrations {
            max_instances: 10,
            lock_for: Duration::from_secs(60),
            with_history: true,
        })
        .await
        .unwrap()
    }

    /// Runs one statement on the write connection and returns its first column.
    async fn pragma(p: &SqliteProvider, sql: &'static str) -> String {
        p.write(move |ctx| {
            Box::pin(async move {
                let row = sqlx::query(sql)
                    .fetch_one(&mut ctx.conn)
                    .await
                    .map_err(db)?;
                let value: sqlx::Result<String> = row.try_get(0);
                Ok(match value {
                    Ok(text) => text,
                    Err(_) => row.try_get::<i64, _>(0).map_err(db)?.to_string(),
                })
            })
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn migrations_are_applied_once_and_reopening_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keel.db");
        for _ in 0..3 {
            let p = SqliteProvider::open_with(&path, options()).await.unwrap();
            let rows = pragma(&p, "SELECT COUNT(*) FROM keel_schema_version").await;
            assert_eq!(rows, migrations::MIGRATIONS.len().to_string());
            let version = pragma(&p, "SELECT MAX(version) FROM keel_schema_version").await;
            assert_eq!(version, migrations::MIGRATIONS.len().to_string());
            p.close().await;
        }
    }

    #[tokio::test]
    async fn a_database_from_a_newer_build_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keel.db");
        let p = SqliteProvider::open_with(&path, options()).await.unwrap();
        p.write(|ctx| {
            Box::pin(async move {
                ctx.conn
                    .execute("INSERT INTO keel_schema_version VALUES (999, 0)")
                    .await
                    .map_err(db)?;
                Ok(())
            })
        })
        .await
        .unwrap();
        p.close().await;
        let err = SqliteProvider::open_with(&path, options())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert!(err.message().contains("999"), "{err}");
    }

    #[tokio::test]
    async fn data_and_tokens_survive_close_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keel.db");
        let p = SqliteProvider::open_with(&path, options()).await.unwrap();
        p.create_instance(new_instance("a"), OnConflict::Fail)
            .await
            .unwrap();
        let work = fetch(&p).await.remove(0);
        let mut ack = Ack::new(work.lock.clone(), vec![work.messages[0].id]);
        ack.events = vec![Event {
            at: START,
            kind: EventKind::CancelRequested { reason: "r".into() },
        }];
        let sent = ack.events.clone();
        p.ack_turns(vec![ack]).await.unwrap().remove(0).unwrap();
        p.send_message(
            &id("a"),
            keel_core::Message::Cancel { reason: "x".into() },
            None,
        )
        .await
        .unwrap();
        let before = p.get_instance(&id("a")).await.unwrap();
        p.close().await;
        assert_eq!(
            p.get_instance(&id("a")).await.unwrap_err().kind(),
            ErrorKind::Unavailable,
            "a closed provider refuses calls"
        );

        let p = SqliteProvider::open_with(&path, options()).await.unwrap();
        assert_eq!(p.get_instance(&id("a")).await.unwrap(), before);
        assert_eq!(p.read_history(&id("a"), None).await.unwrap(), sent);
        let again = fetch(&p).await.remove(0);
        assert_ne!(again.lock, work.lock, "tokens never repeat across opens");
        assert_eq!(again.history_len, 1);
        p.close().await;
    }

    #[tokio::test]
    async fn the_synchronous_setting_and_wal_are_applied() {
        let dir = tempfile::tempdir().unwrap();
        for (setting, expected) in [(Synchronous::Full, "2"), (Synchronous::Normal, "1")] {
            let path = dir.path().join(format!("{expected}.db"));
            let p = SqliteProvider::open_with(&path, options().synchronous(setting))
                .await
                .unwrap();
            assert_eq!(pragma(&p, "PRAGMA synchronous").await, expected);
            assert_eq!(pragma(&p, "PRAGMA journal_mode").await, "wal");
            p.close().await;
        }
        let p = SqliteProvider::open_with(dir.path().join("default.db"), options())
            .await
            .unwrap();
        assert_eq!(
            pragma(&p, "PRAGMA synchronous").await,
            "2",
            "FULL by default"
        );
        p.close().await;
    }

    /// Holds the writer for a while, so that requests sent meanwhile queue up.
    async fn occupy_writer(p: &SqliteProvider) -> tokio::task::JoinHandle<()> {
        let slow = p.clone();
        let handle = tokio::spawn(async move {
            slow.write(|_ctx| {
                Box::pin(async move {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok(())
                })
            })
            .await
            .unwrap();
        });
        // Let the slow request reach the writer first.
        tokio::time::sleep(Duration::from_millis(50)).await;
        handle
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_acks_share_one_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let p = SqliteProvider::open_with(dir.path().join("keel.db"), options())
            .await
            .unwrap();
        for i in 0..20 {
            p.create_instance(new_instance(&format!("i{i}")), OnConflict::Fail)
                .await
                .unwrap();
        }
        let mut work = fetch(&p).await;
        work.extend(fetch(&p).await);
        assert_eq!(work.len(), 20);
        let before = p.transactions_committed();
        let slow = occupy_writer(&p).await;
        let acks: Vec<_> = work
            .iter()
            .map(|w| {
                let p = p.clone();
                let ack = Ack::new(w.lock.clone(), w.messages.iter().map(|m| m.id).collect());
                tokio::spawn(async move { p.ack_turns(vec![ack]).await })
            })
            .collect();
        slow.await.unwrap();
        for ack in acks {
            ack.await.unwrap().unwrap().remove(0).unwrap();
        }
        let committed = p.transactions_committed() - before;
        assert_eq!(
            committed, 2,
            "the slow request's, then one for all twenty acks"
        );
        for w in &work {
            let record = p.get_instance(w.lock.instance()).await.unwrap();
            assert_eq!(record.status, keel_core::InstanceStatus::Running);
        }
        assert!(fetch(&p).await.is_empty(), "every start was consumed");
        p.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_request_rolls_back_alone_in_its_group() {
        let p = SqliteProvider::in_memory_with(options()).await.unwrap();
        let slow = occupy_writer(&p).await;
        let insert = |key: &'static str, fail: bool| {
            let p = p.clone();
            tokio::spawn(async move {
                p.write(move |ctx| {
                    Box::pin(async move {
                        sqlx::query("INSERT INTO keel_meta (key, value) VALUES (?1, 1)")
                            .bind(key)
                            .execute(&mut ctx.conn)
                            .await
                            .map_err(db)?;
                        if fail {
                            return Err(keel_provider::ProviderError::new(
                                ErrorKind::InvalidInput,
                                "refused after writing",
                            ));
                        }
                        Ok(())
                    })
                })
                .await
            })
        };
        let kept = insert("kept", false);
        let failed = insert("failed", true);
        let also_kept = insert("also", false);
        let before = p.transactions_committed();
        slow.await.unwrap();
        kept.await.unwrap().unwrap();
        assert_eq!(
            failed.await.unwrap().unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        also_kept.await.unwrap().unwrap();
        assert_eq!(p.transactions_committed() - before, 2);
        let keys = pragma(
            &p,
            "SELECT group_concat(key, ',') FROM (SELECT key FROM keel_meta \
             WHERE key != 'token' ORDER BY key)",
        )
        .await;
        assert_eq!(keys, "also,kept");
        p.close().await;
    }

    #[tokio::test]
    async fn in_memory_databases_are_separate() {
        let a = SqliteProvider::in_memory_with(options()).await.unwrap();
        let b = SqliteProvider::in_memory_with(options()).await.unwrap();
        a.create_instance(new_instance("x"), OnConflict::Fail)
            .await
            .unwrap();
        assert!(a.get_instance(&id("x")).await.is_ok());
        assert_eq!(
            b.get_instance(&id("x")).await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
    }
}
