//! Keel with the Redis notifier, end to end: a worker process and a client-only
//! process, each with its own `SqliteProvider` and notifier over one database file and
//! one private `redis-server`. Wake-ups cross between them through Redis; with Redis
//! killed mid-run every workflow still completes, and when it returns the worker is
//! woken promptly again.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use keel::prelude::*;
use keel::{Provider, WorkerOptions};
use keel_redis::{RedisNotifier, RedisOptions};
use keel_sqlite::SqliteProvider;
use keel_tests::{Db, WAIT, test_options};

use tokio::task::JoinSet;

// One helper for every test that needs a Redis of its own, kept beside the notifier's.
#[path = "../../crates/keel-redis/tests/notifier/server.rs"]
#[allow(
    dead_code,
    reason = "shared with the notifier's tests, which use all of it"
)]
mod server;

mod outage;
mod prompt;

use server::RedisServer;

/// A poll interval no test waits out: whatever completes promptly was woken.
const SLEEPY: Duration = Duration::from_secs(30);
/// An ordinary poll interval, for runs that rely on polling while Redis is away.
const BRISK: Duration = Duration::from_millis(200);
/// How soon a workflow started in the other process must complete when woken.
const PROMPT: Duration = Duration::from_secs(3);

/// A step that takes a little while, so that a run of many is still going when a
/// test kills Redis.
async fn step(_ctx: ActivityContext, n: u64) -> Result<u64, Failure> {
    tokio::time::sleep(Duration::from_millis(20)).await;
    Ok(n + 1)
}

async fn nap(_ctx: ActivityContext, millis: u64) -> Result<u64, Failure> {
    tokio::time::sleep(Duration::from_millis(millis)).await;
    Ok(millis)
}

/// Three activities in a row: `n + 3`.
async fn three_steps(ctx: OrchestrationContext, n: u64) -> Result<u64, Failure> {
    let a: u64 = ctx.activity("step", &n).await?;
    let b: u64 = ctx.activity("step", &a).await?;
    ctx.activity("step", &b).await
}

/// One activity that sleeps `millis`.
async fn slow(ctx: OrchestrationContext, millis: u64) -> Result<u64, Failure> {
    ctx.activity("nap", &millis).await
}

/// One Redis and one database, shared by a worker process and a client process.
struct Site {
    server: RedisServer,
    db: Db,
    namespace: String,
}

impl Site {
    fn new(namespace: &str) -> anyhow::Result<Self> {
        Ok(Self {
            server: RedisServer::start()?,
            db: Db::new()?,
            namespace: namespace.to_owned(),
        })
    }

    /// What one process opens: its own provider on the file, wrapped in its own
    /// notifier. Default options but the namespace: reconnects back off to 2 s.
    async fn provider(&self) -> anyhow::Result<Arc<dyn Provider>> {
        let inner = Arc::new(SqliteProvider::open(&self.db.path).await?);
        let options = RedisOptions::new().namespace(&self.namespace);
        let notifier = RedisNotifier::connect(inner, &self.server.url(), options)
            .await
            .context("connecting the notifier")?;
        Ok(Arc::new(notifier))
    }

    /// The worker process, polling at most every `poll` when nothing wakes it.
    async fn worker(&self, poll: Duration) -> anyhow::Result<Keel> {
        let options: WorkerOptions = test_options().max_poll_interval(poll);
        let keel = Keel::builder()
            .provider(self.provider().await?)
            .options(options)
            .activity("step", step)
            .activity("nap", nap)
            .orchestration("three_steps", three_steps)
            .orchestration("slow", slow)
            .start()
            .await?;
        // Let the dispatchers find nothing and settle into their long waits.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(keel)
    }

    /// The client process: no worker runs in it.
    async fn client(&self) -> anyhow::Result<Client> {
        Ok(Keel::builder()
            .provider(self.provider().await?)
            .client()
            .await?)
    }
}

/// Starts `three_steps(n)` and waits for it, returning how long that took.
async fn run_one(client: &Client, n: u64) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let id = client.start("three_steps", &n).await?;
    let out: u64 = client.wait(&id, WAIT).await?;
    anyhow::ensure!(out == n + 3, "three_steps({n}) returned {out}");
    Ok(started.elapsed())
}

/// Starts `three_steps(n)` for each `n`, with a task per instance waiting for it.
async fn start_all(
    client: &Client,
    ns: std::ops::Range<u64>,
    waiters: &mut JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    for n in ns {
        let id = client.start("three_steps", &n).await?;
        let client = client.clone();
        waiters.spawn(async move {
            let out: u64 = client.wait(&id, WAIT).await?;
            anyhow::ensure!(out == n + 3, "three_steps({n}) returned {out}");
            Ok(())
        });
    }
    Ok(())
}

/// Waits for `waiters` until `count` finished (each must have succeeded).
async fn until_finished(
    waiters: &mut JoinSet<anyhow::Result<()>>,
    count: usize,
) -> anyhow::Result<usize> {
    let mut finished = 0;
    while finished < count {
        let Some(joined) = waiters.join_next().await else {
            break;
        };
        joined??;
        finished += 1;
    }
    Ok(finished)
}

/// Wall-clock milliseconds, comparable with the store's timestamps.
fn now_millis() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// The median and the largest of `durations`.
fn summary(mut durations: Vec<Duration>) -> (Duration, Duration) {
    durations.sort();
    let median = durations
        .get(durations.len() / 2)
        .copied()
        .unwrap_or_default();
    let max = durations.last().copied().unwrap_or_default();
    (median, max)
}
