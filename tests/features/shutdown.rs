//! Graceful shutdown, abandoning work past the deadline, prompt wake-ups of an idle
//! worker, and long workflows with and without the sticky cache and eager dispatch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use keel::prelude::*;
use keel_tests::{Db, WAIT, eventually, test_options};

/// What the slow activity of the drain test went through.
#[derive(Debug, Default)]
struct Slow {
    runs: AtomicUsize,
    started: AtomicBool,
    finished: AtomicBool,
}

/// A workflow of one activity `slow` that sleeps 300 ms, counting its runs in `slow`.
async fn with_slow_activity(db: &Db, slow: &Arc<Slow>) -> anyhow::Result<Keel> {
    let slow = Arc::clone(slow);
    let keel = Keel::builder()
        .sqlite(&db.path)
        .options(test_options())
        .activity("slow", move |_ctx: ActivityContext, (): ()| {
            let slow = Arc::clone(&slow);
            async move {
                let run = slow.runs.fetch_add(1, Ordering::SeqCst) + 1;
                slow.started.store(true, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                slow.finished.store(true, Ordering::SeqCst);
                Ok::<_, Failure>(format!("run {run}"))
            }
        })
        .orchestration("one-step", |ctx: OrchestrationContext, (): ()| async move {
            ctx.activity::<String, _>("slow", &()).await
        })
        .start()
        .await?;
    Ok(keel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_a_running_activity_finish_and_records_it() -> anyhow::Result<()> {
    let db = Db::new()?;
    let slow = Arc::new(Slow::default());
    let keel = with_slow_activity(&db, &slow).await?;
    let id = keel.client().start("one-step", &()).id("drained").await?;
    eventually("the activity runs", WAIT, || {
        slow.started.load(Ordering::SeqCst)
    })
    .await?;

    let report = keel.shutdown().await;
    ensure!(
        slow.finished.load(Ordering::SeqCst),
        "shutdown returned before the running activity finished"
    );
    ensure!(
        report.drained,
        "a 300 ms activity did not drain: {report:?}"
    );
    ensure!(report.abandoned_activities == 0, "{report:?}");

    // The result was recorded: the next worker completes the workflow without running
    // the activity again.
    let keel = with_slow_activity(&db, &slow).await?;
    let output: String = keel.client().wait(&id, WAIT).await?;
    ensure!(output == "run 1", "unexpected output {output:?}");
    let runs = slow.runs.load(Ordering::SeqCst);
    ensure!(runs == 1, "the activity ran {runs} times");
    keel.shutdown().await;
    Ok(())
}

/// Starts a Keel whose `stuck` activity is `stuck`, with a long lease (so only a released
/// lease lets another worker take an abandoned item soon) and a short shutdown deadline.
async fn with_stuck<F, Fut>(db: &Db, stuck: F) -> anyhow::Result<Keel>
where
    F: Fn(ActivityContext, ()) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<String, Failure>> + Send + 'static,
{
    let options = test_options()
        .shutdown_timeout(Duration::from_millis(200))
        .lease_duration(Duration::from_secs(60));
    let keel = Keel::builder()
        .sqlite(&db.path)
        .options(options)
        .activity("stuck", stuck)
        .orchestration("waits", |ctx: OrchestrationContext, (): ()| async move {
            ctx.activity::<String, _>("stuck", &()).await
        })
        .start()
        .await?;
    Ok(keel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_past_its_deadline_abandons_the_activity_to_the_next_worker() -> anyhow::Result<()>
{
    let db = Db::new()?;
    let started = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&started);
    let keel = with_stuck(&db, move |ctx: ActivityContext, ()| {
        let flag = Arc::clone(&flag);
        async move {
            flag.store(true, Ordering::SeqCst);
            tokio::select! {
                () = ctx.cancelled() => Err(Failure::new(Failure::CANCELLED, "told to stop")),
                () = tokio::time::sleep(Duration::from_secs(30)) => Ok("slow".to_owned()),
            }
        }
    })
    .await?;
    let id = keel.client().start("waits", &()).id("abandoned").await?;
    eventually("the activity runs", WAIT, || started.load(Ordering::SeqCst)).await?;

    let shutting_down = Instant::now();
    let report = keel.shutdown().await;
    let took = shutting_down.elapsed();
    ensure!(
        !report.drained,
        "a 30 s activity drained in 200 ms: {report:?}"
    );
    ensure!(
        report.abandoned_activities == 1,
        "expected one abandoned activity: {report:?}"
    );
    ensure!(
        took < Duration::from_secs(5),
        "shutdown took {took:?} with a 200 ms deadline"
    );

    // With a 60 s lease, only a released lease lets this worker take the item soon.
    let keel = with_stuck(&db, |_ctx: ActivityContext, ()| async {
        Ok::<_, Failure>("quick".to_owned())
    })
    .await?;
    let resumed = Instant::now();
    let output = keel.client().wait::<String>(&id, WAIT).await;
    let took = resumed.elapsed();
    let output = output.context("the abandoned activity did not run again")?;
    ensure!(output == "quick", "unexpected output {output:?}");
    ensure!(
        took < Duration::from_secs(10),
        "the abandoned activity waited {took:?}: its lease was left to expire"
    );
    keel.shutdown().await;
    Ok(())
}

async fn double(_ctx: ActivityContext, n: u64) -> Result<u64, Failure> {
    Ok(n * 2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_picks_up_new_work_without_waiting_for_a_poll() -> anyhow::Result<()> {
    let db = Db::new()?;
    let keel = Keel::builder()
        .sqlite(&db.path)
        .options(test_options().max_poll_interval(Duration::from_secs(60)))
        .activity("double", double)
        .orchestration("doubling", |ctx: OrchestrationContext, n: u64| async move {
            ctx.activity::<u64, _>("double", &n).await
        })
        .start()
        .await?;
    // Long enough for both dispatchers to find nothing and settle into their wait.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let client = keel.client();
    let started = Instant::now();
    let id = client.start("doubling", &21_u64).await?;
    let output = client.wait::<u64>(&id, Duration::from_secs(5)).await;
    let took = started.elapsed();
    let output = output.context("an idle worker (60 s poll interval) did not wake up")?;
    ensure!(output == 42, "unexpected output {output}");
    ensure!(took < Duration::from_secs(5), "it took {took:?}");
    keel.shutdown().await;
    Ok(())
}

/// One link of a chain: an order-sensitive mix of the accumulator and the step number.
async fn link(_ctx: ActivityContext, (acc, step): (u64, u64)) -> Result<u64, Failure> {
    Ok(acc.wrapping_mul(31).wrapping_add(step))
}

const LINKS: u64 = 50;

/// What a run of the chain gave.
#[derive(Debug, PartialEq)]
struct Chain {
    output: u64,
    history: usize,
    /// Transactions the store committed for it, start to end.
    commits: u64,
}

/// Runs a chain of 50 sequential activities with `options`.
async fn run_chain(options: WorkerOptions) -> anyhow::Result<Chain> {
    let db = Db::new()?;
    let store = Arc::new(keel_sqlite::SqliteProvider::open(&db.path).await?);
    let keel = Keel::builder()
        .provider(Arc::clone(&store) as Arc<dyn keel::Provider>)
        .options(options)
        .activity("link", link)
        .orchestration("chain", |ctx: OrchestrationContext, seed: u64| async move {
            let mut acc = seed;
            for step in 0..LINKS {
                acc = ctx.activity("link", &(acc, step)).await?;
            }
            Ok::<_, Failure>(acc)
        })
        .start()
        .await?;
    let client = keel.client();
    let before = store.transactions_committed();
    let id = client.start("chain", &7_u64).id("chain").await?;
    let output: u64 = client.wait(&id, WAIT).await?;
    let commits = store.transactions_committed() - before;
    let history = client.history(&id).await?.len();
    keel.shutdown().await;
    Ok(Chain {
        output,
        history,
        commits,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_chain_gives_the_same_result_with_and_without_the_sticky_cache_and_eager_dispatch()
-> anyhow::Result<()> {
    let expected = (0..LINKS).fold(7_u64, |acc, step| acc.wrapping_mul(31).wrapping_add(step));
    let eager = run_chain(test_options()).await?;
    let uncached = run_chain(test_options().cache_capacity(0)).await?;
    let queued = run_chain(test_options().eager_dispatch(false)).await?;
    for (run, how) in [
        (&eager, "by default"),
        (&uncached, "without the cache"),
        (&queued, "without eager dispatch"),
    ] {
        ensure!(
            run.output == expected,
            "{how}: {run:?}, expected output {expected}"
        );
        // Started, 50 scheduled, 50 completed, completed: at least.
        let least = usize::try_from(2 * LINKS + 2)?;
        ensure!(run.history >= least, "{how}: a short history: {run:?}");
        ensure!(
            run.history == eager.history,
            "{how}: the history differs from the default run's: {run:?} vs {eager:?}"
        );
    }
    // Each link costs an ack and a completion (and at most a lane's look at the queue
    // after the handed-back turn) when the worker takes the next step in the same
    // commit, and two claims more when every step goes through the queues: measured
    // 2.4-2.9 commits a link against 4.7-5.3.
    let links = LINKS;
    let line = links * 19 / 5;
    ensure!(
        eager.commits < line && queued.commits > line,
        "eager dispatch did not save the claims: {} commits with it, {} without, for {links} links",
        eager.commits,
        queued.commits
    );
    Ok(())
}
