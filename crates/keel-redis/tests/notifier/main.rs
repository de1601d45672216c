//! The notifier against a real Redis: a private `redis-server` per test, and two
//! `SqliteProvider`s opened on one file standing for two processes.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keel_provider::{Provider, WorkKind};
use keel_redis::{RedisNotifier, RedisOptions};
use keel_sqlite::SqliteProvider;
use tempfile::TempDir;

mod conformance;
mod cross_process;
mod lifecycle;
mod outage;
mod server;

use server::RedisServer;

/// Far longer than any wake-up should take: a wait that runs this long was not woken.
const LONG: Duration = Duration::from_secs(30);
/// How soon a wake-up must arrive across processes; generous for a shared machine.
const PROMPT: Duration = Duration::from_secs(1);

/// A namespace no other test uses.
fn namespace() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Options for tests: the namespace, and reconnects at most 200 ms apart.
fn options(namespace: &str) -> RedisOptions {
    RedisOptions::new()
        .namespace(namespace)
        .max_reconnect_delay(Duration::from_millis(200))
        .connect_timeout(Duration::from_secs(2))
}

/// Two "processes": two providers opened on one database file, each wrapped in its own
/// notifier on the same Redis and namespace.
struct Pair {
    a: Arc<RedisNotifier>,
    b: Arc<RedisNotifier>,
    _dir: TempDir,
}

impl Pair {
    async fn open(server: &RedisServer) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("keel.db");
        let namespace = namespace();
        let a = wrap(&path, server, &namespace).await?;
        let b = wrap(&path, server, &namespace).await?;
        Ok(Self { a, b, _dir: dir })
    }
}

async fn wrap(
    path: &Path,
    server: &RedisServer,
    namespace: &str,
) -> anyhow::Result<Arc<RedisNotifier>> {
    let inner = Arc::new(SqliteProvider::open(path).await?);
    let notifier = RedisNotifier::connect(inner, &server.url(), options(namespace)).await?;
    Ok(Arc::new(notifier))
}

/// Two plain providers on one file: the control, without Redis.
async fn plain_pair() -> anyhow::Result<(Arc<SqliteProvider>, Arc<SqliteProvider>, TempDir)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("keel.db");
    let a = Arc::new(SqliteProvider::open(&path).await?);
    let b = Arc::new(SqliteProvider::open(&path).await?);
    Ok((a, b, dir))
}

/// Starts `waiter.wait_for_work(kind, LONG)`, lets it settle, runs `act`, and returns
/// how long after `act` began the wait ended, or `None` if it had not ended `within`
/// after that.
async fn wake_latency<F>(
    waiter: Arc<dyn Provider>,
    kind: WorkKind,
    within: Duration,
    act: F,
) -> anyhow::Result<Option<Duration>>
where
    F: Future<Output = anyhow::Result<()>>,
{
    let wait = tokio::spawn(async move { waiter.wait_for_work(kind, LONG).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    anyhow::ensure!(
        !wait.is_finished(),
        "the wait ended before anything happened"
    );
    let started = Instant::now();
    act.await?;
    match tokio::time::timeout(within, wait).await {
        Ok(waited) => {
            waited??;
            Ok(Some(started.elapsed()))
        }
        Err(_) => Ok(None),
    }
}

/// Like [`wake_latency`], for `wait_for_ended`: how long after `act` began the wait
/// returned `true`, or `None` if it returned `false` or had not returned `within`.
async fn ended_latency<F>(
    waiter: Arc<dyn Provider>,
    within: Duration,
    act: F,
) -> anyhow::Result<Option<Duration>>
where
    F: Future<Output = anyhow::Result<()>>,
{
    let wait = tokio::spawn(async move { waiter.wait_for_ended(LONG).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    act.await?;
    match tokio::time::timeout(within, wait).await {
        Ok(waited) => Ok(waited??.then(|| started.elapsed())),
        Err(_) => Ok(None),
    }
}
