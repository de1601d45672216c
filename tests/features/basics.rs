//! The basic building blocks: activity sequences, fan-out, select, durable timers,
//! custom status, idempotent starts, and a store reopened by a second worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use keel::prelude::*;
use keel::{Error, Event, EventKind, KeelBuilder};
use keel_tests::{Db, WAIT, test_options};
use serde::{Deserialize, Serialize};

/// A builder on the test's own SQLite file with the fast test options.
fn builder(db: &Db) -> KeelBuilder {
    Keel::builder().sqlite(&db.path).options(test_options())
}

/// The names of the events, in history order.
fn kinds(history: &[Event]) -> Vec<&'static str> {
    history.iter().map(|event| event.kind.name()).collect()
}

/// Polls the instance's custom status until it equals `expected`.
async fn await_custom_status<T>(
    client: &Client,
    id: &InstanceId,
    expected: &T,
) -> anyhow::Result<()>
where
    T: for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug,
{
    let deadline = Instant::now() + WAIT;
    loop {
        let seen = client.status(id).await?.custom_status::<T>()?;
        if seen.as_ref() == Some(expected) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "custom status is {seen:?}, never became {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn double(_ctx: ActivityContext, n: u64) -> Result<u64, Failure> {
    Ok(n * 2)
}

async fn add_one(_ctx: ActivityContext, n: u64) -> Result<u64, Failure> {
    Ok(n + 1)
}

async fn chain(ctx: OrchestrationContext, n: u64) -> Result<u64, Failure> {
    let a: u64 = ctx.activity("double", &n).await?;
    let b: u64 = ctx.activity("add_one", &a).await?;
    ctx.activity("double", &b).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_of_activities_runs_in_order() -> anyhow::Result<()> {
    let db = Db::new()?;
    let keel = builder(&db)
        .activity("double", double)
        .activity("add_one", add_one)
        .orchestration("chain", chain)
        .start()
        .await?;
    let client = keel.client();
    let id = client.start("chain", &5u64).await?;
    let out: u64 = client.wait(&id, WAIT).await?;
    assert_eq!(out, 22, "((5 * 2) + 1) * 2");

    let history = client.history(&id).await?;
    let activities: Vec<(&str, Option<&str>)> = history
        .iter()
        .filter(|e| e.kind.name().starts_with("Activity"))
        .map(|e| (e.kind.name(), e.kind.label()))
        .collect();
    assert_eq!(
        activities,
        [
            ("ActivityScheduled", Some("double")),
            ("ActivityCompleted", None),
            ("ActivityScheduled", Some("add_one")),
            ("ActivityCompleted", None),
            ("ActivityScheduled", Some("double")),
            ("ActivityCompleted", None),
        ]
    );
    let names = kinds(&history);
    assert_eq!(names.first(), Some(&"ExecutionStarted"), "{names:?}");
    assert_eq!(names.last(), Some(&"ExecutionCompleted"), "{names:?}");
    keel.shutdown().await;
    Ok(())
}

/// Squares `n` after a pause that makes the larger inputs finish first.
async fn slow_square(_ctx: ActivityContext, n: u64) -> Result<u64, Failure> {
    tokio::time::sleep(Duration::from_millis(20 * (6 - n.min(5)))).await;
    Ok(n * n)
}

async fn fan_out(ctx: OrchestrationContext, n: u64) -> Result<Vec<u64>, Failure> {
    let calls = (1..=n).map(|i| ctx.activity::<u64, _>("square", &i));
    join_all(calls).await.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parallel_join_keeps_the_call_order() -> anyhow::Result<()> {
    let db = Db::new()?;
    let keel = builder(&db)
        .activity("square", slow_square)
        .orchestration("fan_out", fan_out)
        .start()
        .await?;
    let client = keel.client();
    let id = client.start("fan_out", &5u64).await?;
    let out: Vec<u64> = client.wait(&id, WAIT).await?;
    assert_eq!(out, [1, 4, 9, 16, 25]);

    // All five were scheduled in the first turn, before any of them completed.
    let names = kinds(&client.history(&id).await?);
    let scheduled: Vec<usize> = positions(&names, "ActivityScheduled");
    let completed: Vec<usize> = positions(&names, "ActivityCompleted");
    assert_eq!((scheduled.len(), completed.len()), (5, 5), "{names:?}");
    assert!(scheduled.iter().max() < completed.iter().min(), "{names:?}");
    keel.shutdown().await;
    Ok(())
}

fn positions(names: &[&str], name: &str) -> Vec<usize> {
    let found = names.iter().enumerate().filter(|(_, n)| **n == name);
    found.map(|(i, _)| i).collect()
}

static NAPS_CANCELLED: AtomicUsize = AtomicUsize::new(0);

/// Sleeps `ms` milliseconds unless cancelled first. It heartbeats, since the worker
/// learns of a cancellation when it renews the lease.
async fn nap(ctx: ActivityContext, ms: u64) -> Result<String, Failure> {
    let wake = tokio::time::sleep(Duration::from_millis(ms));
    tokio::pin!(wake);
    loop {
        tokio::select! {
            () = &mut wake => return Ok(format!("slept {ms}")),
            () = ctx.cancelled() => {
                NAPS_CANCELLED.fetch_add(1, Ordering::SeqCst);
                return Err(Failure::new("Interrupted", "cancelled"));
            }
            () = tokio::time::sleep(Duration::from_millis(20)) => ctx.heartbeat(),
        }
    }
}

/// Races a `nap` of `[activity_ms, timer_ms][0]` against a timer of `[1]`.
async fn race(ctx: OrchestrationContext, ms: [u64; 2]) -> Result<String, Failure> {
    let activity = ctx.activity::<String, _>("nap", &ms[0]);
    let timer = ctx.sleep(Duration::from_millis(ms[1]));
    match select2(activity, timer).await {
        Either::Left(out) => out,
        Either::Right(()) => Ok("timer".to_owned()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_timer_wins_over_a_slow_activity() -> anyhow::Result<()> {
    let db = Db::new()?;
    let keel = builder(&db)
        .activity("nap", nap)
        .orchestration("race", race)
        .start()
        .await?;
    let client = keel.client();
    let started = Instant::now();
    let id = client.start("race", &[20_000u64, 100]).await?;
    let out: String = client.wait(&id, WAIT).await?;
    assert_eq!(out, "timer");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the timer won late"
    );

    let names = kinds(&client.history(&id).await?);
    assert!(names.contains(&"TimerFired"), "{names:?}");
    assert!(
        names.contains(&"OpCancelled"),
        "the activity was not cancelled: {names:?}"
    );
    assert!(!names.contains(&"ActivityCompleted"), "{names:?}");
    // The loser's cancellation token fires.
    let deadline = Instant::now() + WAIT;
    while NAPS_CANCELLED.load(Ordering::SeqCst) == 0 {
        ensure!(
            Instant::now() < deadline,
            "the activity never saw its cancellation"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    keel.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_activity_wins_over_a_long_timer() -> anyhow::Result<()> {
    let db = Db::new()?;
    let keel = builder(&db)
        .activity("nap", nap)
        .orchestration("race", race)
        .start()
        .await?;
    let client = keel.client();
    let started = Instant::now();
    let id = client.start("race", &[10u64, 60_000]).await?;
    let out: String = client.wait(&id, WAIT).await?;
    assert_eq!(out, "slept 10");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "waited on the timer"
    );

    let names = kinds(&client.history(&id).await?);
    assert!(names.contains(&"ActivityCompleted"), "{names:?}");
    assert!(names.contains(&"TimerCreated"), "{names:?}");
    assert!(!names.contains(&"TimerFired"), "{names:?}");
    assert!(
        names.contains(&"OpCancelled"),
        "the timer was not cancelled: {names:?}"
    );
    keel.shutdown().await;
    Ok(())
}

async fn sleeper(ctx: OrchestrationContext, ms: u64) -> Result<String, Failure> {
    ctx.sleep(Duration::from_millis(ms)).await;
    Ok("awake".to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_sleep_lasts_its_duration() -> anyhow::Result<()> {
    let db = Db::new()?;
    let keel = builder(&db)
        .orchestration("sleeper", sleeper)
        .start()
        .await?;
    let client = keel.client();
    let started = Instant::now();
    let id = client.start("sleeper", &300u64).await?;
    let out: String = client.wait(&id, WAIT).await?;
    let elapsed = started.elapsed();
    assert_eq!(out, "awake");
    assert!(
        elapsed >= Duration::from_millis(300),
        "woke after {elapsed:?}"
    );

    let history = client.history(&id).await?;
    let names = kinds(&history);
    assert_eq!(
        names,
        [
            "ExecutionStarted",
            "TimerCreated",
            "TimerFired",
            "ExecutionCompleted"
        ]
    );
    let started_at = history[0].at;
    let EventKind::TimerCreated { fire_at, .. } = history[1].kind else {
        anyhow::bail!("not a timer: {:?}", history[1]);
    };
    let delay = fire_at.saturating_duration_since(started_at);
    assert_eq!(delay, Duration::from_millis(300), "due after {delay:?}");
    assert!(history[2].at >= fire_at, "fired before it was due");
    keel.shutdown().await;
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Progress {
    stage: String,
    approvals: u32,
}

fn progress(stage: &str, approvals: u32) -> Progress {
    Progress {
        stage: stage.to_owned(),
        approvals,
    }
}

async fn approval(ctx: OrchestrationContext, (): ()) -> Result<String, Failure> {
    ctx.set_custom_status(&progress("waiting", 0))?;
    let by: String = ctx.signal("approve").await?;
    ctx.set_custom_status(&progress(&format!("approved by {by}"), 1))?;
    let () = ctx.signal("finish").await?;
    ctx.clear_custom_status();
    Ok(by)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_status_is_visible_while_the_workflow_waits() -> anyhow::Result<()> {
    let db = Db::new()?;
    let keel = builder(&db)
        .orchestration("approval", approval)
        .start()
        .await?;
    let client = keel.client();
    let id = client.start("approval", &()).await?;

    await_custom_status(&client, &id, &progress("waiting", 0)).await?;
    assert_eq!(client.status(&id).await?.status(), InstanceStatus::Running);
    client.signal(&id, "approve", "ada").await?;
    await_custom_status(&client, &id, &progress("approved by ada", 1)).await?;
    client.signal(&id, "finish", &()).await?;

    let out: String = client.wait(&id, WAIT).await?;
    assert_eq!(out, "ada");
    let info = client.status(&id).await?;
    assert_eq!(info.status(), InstanceStatus::Completed);
    assert_eq!(info.custom_status::<Progress>()?, None, "not cleared");
    keel.shutdown().await;
    Ok(())
}

static IDEMPOTENT_RUNS: AtomicUsize = AtomicUsize::new(0);

async fn count_run(_ctx: ActivityContext, tag: String) -> Result<String, Failure> {
    IDEMPOTENT_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(tag)
}

async fn once(ctx: OrchestrationContext, tag: String) -> Result<String, Failure> {
    ctx.activity("count_run", &tag).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_twice_with_one_id_runs_once() -> anyhow::Result<()> {
    let db = Db::new()?;
    let keel = builder(&db)
        .activity("count_run", count_run)
        .orchestration("once", once)
        .start()
        .await?;
    let client = keel.client();
    let first = client.start("once", "first").id("order-1").await?;
    let second = client.start("once", "second").id("order-1").await?;
    assert_eq!(first, second);
    assert_eq!(first.to_string(), "order-1");

    let out: String = client.wait(&first, WAIT).await?;
    assert_eq!(out, "first", "the second start replaced the first");
    // A start after the end still finds the finished instance.
    let third = client.start("once", "third").id("order-1").await?;
    assert_eq!(third, first);
    match client
        .start("once", "fourth")
        .id("order-1")
        .fail_if_exists()
        .await
    {
        Err(Error::AlreadyExists(id)) => assert_eq!(id, first),
        other => anyhow::bail!("expected AlreadyExists, got {other:?}"),
    }

    // Give a wrongly started duplicate the time to run its activity.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(IDEMPOTENT_RUNS.load(Ordering::SeqCst), 1);
    let listed = client
        .list(keel::InstanceQuery::default(), keel::PageRequest::first(10))
        .await?;
    assert_eq!(listed.items.len(), 1, "{:?}", listed.items);
    let out: String = client.status(&first).await?.output()?;
    assert_eq!(out, "first");
    keel.shutdown().await;
    Ok(())
}

async fn greet(ctx: OrchestrationContext, name: String) -> Result<String, Failure> {
    ctx.activity("hello", &name).await
}

/// A Keel on `db` whose `hello` activity counts its runs in `runs`.
async fn greeter(db: &Db, runs: &Arc<AtomicUsize>) -> anyhow::Result<Keel> {
    let runs = Arc::clone(runs);
    let keel = builder(db)
        .activity("hello", move |_ctx: ActivityContext, name: String| {
            let runs = Arc::clone(&runs);
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Failure>(format!("hello {name}"))
            }
        })
        .orchestration("greet", greet)
        .start()
        .await?;
    Ok(keel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_over_the_same_file_sees_the_first() -> anyhow::Result<()> {
    let db = Db::new()?;
    let runs = Arc::new(AtomicUsize::new(0));

    let keel = greeter(&db, &runs).await?;
    let old = keel.client().start("greet", "old").id("greet-old").await?;
    let out: String = keel.client().wait(&old, WAIT).await?;
    assert_eq!(out, "hello old");
    keel.shutdown().await;

    let keel = greeter(&db, &runs).await.context("reopening the file")?;
    let client = keel.client();
    let info = client.status(&old).await?;
    assert_eq!(info.status(), InstanceStatus::Completed);
    assert_eq!(info.output::<String>()?, "hello old");
    let names = kinds(&client.history(&old).await?);
    assert_eq!(names.last(), Some(&"ExecutionCompleted"), "{names:?}");

    let new = client.start("greet", "new").await?;
    let out: String = client.wait(&new, WAIT).await?;
    assert_eq!(out, "hello new");
    assert_eq!(runs.load(Ordering::SeqCst), 2, "the old activity ran again");
    keel.shutdown().await;
    Ok(())
}
