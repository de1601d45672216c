//! The provider: opening the database, and the `Provider` implementation that
//! dispatches each method to its module.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keel_core::{Event, ExecutionId, InstanceId, Message, Timestamp};
use keel_provider::{
    Ack, AckedTurns, ActivityCompletion, ActivityLimits, ActivityRetry, Capabilities, Clock,
    CompletedActivities, Created, DeadLetter, DeadLetterId, FetchActivities, FetchOrchestrations,
    InstanceQuery, InstanceRecord, LeaseToken, LeasedWorkItem, LockToken, NewInstance, OnConflict,
    OrchestrationWork, Page, PageRequest, Provider, PurgeFilter, QueueDepths, Result, WorkKind,
};
use rusqlite::{Connection, OpenFlags};

use crate::error::db;
use crate::migrations;
use crate::options::{SqliteOptions, Synchronous};
use crate::query::STATEMENT_CACHE;
use crate::reader::Readers;
use crate::wake::Wake;
use crate::writer::{WriteCtx, Writer};
use crate::{ack, activity, dead_letter, instance, lease, orchestration};

/// Distinguishes the in-memory databases of one process.
static MEMORY_DATABASES: AtomicU64 = AtomicU64::new(0);

/// Keel's SQLite provider: one file (or one in-memory database) holding instances,
/// histories and queues.
///
/// Writes go through one connection, owned by a thread of its own, that commits
/// concurrent requests together (group commit), each in its own savepoint; reads use a
/// pool of read-only connections on blocking threads. The file is in WAL mode, so
/// reads never wait for the writer. Cloning is cheap and shares the connections.
#[derive(Clone)]
pub struct SqliteProvider {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) writer: Writer,
    pub(crate) readers: Arc<Readers>,
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

/// Where the database is.
#[derive(Debug, Clone)]
enum Target {
    /// A file, created if missing.
    File(PathBuf),
    /// A named shared-cache in-memory database (a `file:` URI), alive while any of
    /// its connections is open.
    Memory(String),
}

/// How to open the provider's connections.
#[derive(Debug, Clone)]
struct Connect {
    target: Target,
    busy_timeout: Duration,
    synchronous: Synchronous,
    checkpoint_pages: u32,
}

impl Connect {
    /// The write connection: creates the database, switches a file to WAL (with its
    /// checkpoint interval), and sets the durability of commits.
    fn writer(&self) -> rusqlite::Result<Connection> {
        let conn = self.open(OpenFlags::SQLITE_OPEN_CREATE)?;
        if let Target::File(_) = self.target {
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "wal_autocheckpoint", self.checkpoint_pages)?;
        }
        conn.pragma_update(None, "synchronous", self.synchronous.pragma())?;
        Ok(conn)
    }

    /// A read-only connection: `query_only` makes a bug that tries to write fail
    /// loudly.
    fn reader(&self) -> rusqlite::Result<Connection> {
        let conn = self.open(OpenFlags::empty())?;
        conn.pragma_update(None, "query_only", "ON")?;
        Ok(conn)
    }

    fn open(&self, extra: OpenFlags) -> rusqlite::Result<Connection> {
        // Each connection is used by one thread at a time: SQLite's own mutex is
        // not needed.
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | extra;
        let conn = match &self.target {
            Target::File(path) => Connection::open_with_flags(path, flags)?,
            Target::Memory(uri) => {
                Connection::open_with_flags(uri, flags | OpenFlags::SQLITE_OPEN_URI)?
            }
        };
        conn.busy_timeout(self.busy_timeout)?;
        conn.pragma_update(None, "foreign_keys", "OFF")?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(conn)
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
        let location = path.display().to_string();
        Self::start(Target::File(path.to_path_buf()), location, options).await
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
        let uri = format!("{name}?mode=memory&cache=shared");
        Self::start(Target::Memory(uri), name, options).await
    }

    async fn start(target: Target, location: String, options: SqliteOptions) -> Result<Self> {
        let connect = Connect {
            target,
            busy_timeout: options.busy_timeout,
            synchronous: options.synchronous,
            checkpoint_pages: options.checkpoint_pages,
        };
        let now = crate::convert::millis(options.clock.now());
        let wake = Arc::new(Wake::default());
        let opener = connect.clone();
        let writer = Writer::start(
            move || {
                let conn = opener.writer().map_err(db)?;
                migrations::apply(&conn, now)?;
                Ok(conn)
            },
            Arc::clone(&options.clock),
            Arc::clone(&wake),
        )
        .await?;
        let readers = Arc::new(Readers::new(options.readers, move || connect.reader()));
        let mut capabilities = Capabilities::default();
        capabilities.max_record_bytes = options.max_record_bytes;
        capabilities.max_history_events = options.max_history_events;
        capabilities.leases_on_ack = true;
        capabilities.locks_on_completion = true;
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
        self.inner.readers.close();
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
        F: FnOnce(&mut WriteCtx) -> Result<R> + Send + 'static,
    {
        self.inner.writer.run(Box::new(work)).await
    }

    /// Runs `read` on a read-only connection, off the async runtime.
    pub(crate) async fn read<R, F>(&self, read: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R> + Send + 'static,
    {
        self.inner.readers.read(read).await
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
            ctx.conn
                .query_row(sql, [], |row| {
                    Ok(match row.get_ref(0)? {
                        rusqlite::types::ValueRef::Text(text) => {
                            String::from_utf8_lossy(text).into_owned()
                        }
                        other => other.as_i64()?.to_string(),
                    })
                })
                .map_err(db)
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
            ctx.conn
                .execute("INSERT INTO keel_schema_version VALUES (999, 0)", [])
                .map_err(db)?;
            Ok(())
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
        assert_eq!(pragma(&p, "PRAGMA wal_autocheckpoint").await, "4096");
        p.close().await;
        let p = SqliteProvider::open_with(
            dir.path().join("default.db"),
            options().checkpoint_pages(500),
        )
        .await
        .unwrap();
        assert_eq!(pragma(&p, "PRAGMA wal_autocheckpoint").await, "500");
        p.close().await;
    }

    /// Holds the writer for a while, so that requests sent meanwhile queue up.
    async fn occupy_writer(p: &SqliteProvider) -> tokio::task::JoinHandle<()> {
        let slow = p.clone();
        let handle = tokio::spawn(async move {
            slow.write(|_ctx| {
                std::thread::sleep(Duration::from_millis(300));
                Ok(())
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
                    ctx.conn
                        .execute("INSERT INTO keel_meta (key, value) VALUES (?1, 1)", [key])
                        .map_err(db)?;
                    if fail {
                        return Err(keel_provider::ProviderError::new(
                            ErrorKind::InvalidInput,
                            "refused after writing",
                        ));
                    }
                    Ok(())
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
