//! Redis is an accelerator: with it stopped, every call still succeeds and waits fall
//! back to the wrapped provider; when it returns, wake-ups flow again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_conformance::fixtures::{activity, new_instance, provider_now, running, schedule};
use keel_provider::{OnConflict, Provider, WorkKind};
use keel_redis::RedisNotifier;

use crate::{LONG, PROMPT, Pair, RedisServer, wake_latency};

/// How long the notifiers get to notice that Redis went away or came back.
const NOTICE: Duration = Duration::from_secs(10);

/// Waits until `notifier.is_subscribed()` is `subscribed`, returning how long it took.
async fn until_subscribed(notifier: &RedisNotifier, subscribed: bool) -> anyhow::Result<Duration> {
    let started = Instant::now();
    while notifier.is_subscribed() != subscribed {
        anyhow::ensure!(
            started.elapsed() < NOTICE,
            "is_subscribed() stayed {} for {NOTICE:?}",
            !subscribed
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_stopped_calls_succeed_and_waits_fall_back() -> anyhow::Result<()> {
    let mut server = RedisServer::start()?;
    let pair = Pair::open(&server).await?;
    server.stop();
    until_subscribed(&pair.a, false).await?;
    until_subscribed(&pair.b, false).await?;

    // Enqueueing neither fails nor waits for Redis.
    let started = Instant::now();
    pair.a
        .create_instance(new_instance("i"), OnConflict::Fail)
        .await?;
    let id = running(&*pair.a, "j").await;
    let at = provider_now(&*pair.a).await;
    schedule(&*pair.a, id.as_str(), vec![activity("j", 1, "work", at)]).await;
    let took = started.elapsed();
    anyhow::ensure!(took < PROMPT, "enqueueing took {took:?} with Redis down");

    // Waits end at their timeouts, without errors, and hear no news.
    let b: Arc<dyn Provider> = pair.b.clone();
    for kind in [WorkKind::Orchestrations, WorkKind::Activities] {
        let started = Instant::now();
        b.wait_for_work(kind, Duration::from_millis(300)).await?;
        anyhow::ensure!(
            started.elapsed() < LONG,
            "the {kind:?} wait honoured its timeout"
        );
    }
    let heard = b.wait_for_ended(Duration::from_millis(300)).await?;
    anyhow::ensure!(!heard, "no news can come with Redis down");

    // The work is all there for whoever polls.
    let work = keel_conformance::fixtures::fetch(&*b, 10).await;
    anyhow::ensure!(work.len() == 1, "B polls and finds the instance");
    let leased = keel_conformance::fixtures::lease(&*b, 10).await;
    anyhow::ensure!(leased.len() == 1, "B polls and finds the activity");

    // Within the process, wake-ups still flow: A, having looked, hears its own enqueue.
    let nothing = keel_conformance::fixtures::fetch(&*pair.a, 10).await;
    anyhow::ensure!(nothing.is_empty(), "B holds the only instance with work");
    let a = Arc::clone(&pair.a);
    let own = wake_latency(
        pair.a.clone(),
        WorkKind::Orchestrations,
        PROMPT,
        async move {
            a.create_instance(new_instance("k"), OnConflict::Fail)
                .await?;
            Ok(())
        },
    )
    .await?;
    anyhow::ensure!(own.is_some(), "A's own wait ends on A's enqueue");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_restarts_wake_ups_flow_again() -> anyhow::Result<()> {
    let mut server = RedisServer::start()?;
    let pair = Pair::open(&server).await?;
    server.stop();
    until_subscribed(&pair.b, false).await?;
    // An enqueue while Redis is down: its publication waits for Redis to return.
    pair.a
        .create_instance(new_instance("during"), OnConflict::Fail)
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let restarted = Instant::now();
    server.restart()?;
    let up = restarted.elapsed();
    until_subscribed(&pair.a, true).await?;
    until_subscribed(&pair.b, true).await?;
    let back = restarted.elapsed();
    eprintln!("Redis answered {up:?} after its restart began; both resubscribed by {back:?}");

    // Take what is queued, then prove a fresh wake-up crosses over promptly.
    let work = keel_conformance::fixtures::fetch(&*pair.b, 10).await;
    anyhow::ensure!(
        work.len() == 1,
        "B finds the instance made during the outage"
    );
    let a = Arc::clone(&pair.a);
    let latency = wake_latency(
        pair.b.clone(),
        WorkKind::Orchestrations,
        PROMPT,
        async move {
            a.create_instance(new_instance("after"), OnConflict::Fail)
                .await?;
            Ok(())
        },
    )
    .await?;
    let latency = latency.ok_or_else(|| anyhow::anyhow!("no wake-up after Redis returned"))?;
    eprintln!("orchestration wake-up across processes after the restart: {latency:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_made_while_redis_was_down_is_announced_when_it_returns() -> anyhow::Result<()> {
    let mut server = RedisServer::start()?;
    let pair = Pair::open(&server).await?;
    // B has looked and waits, long.
    let nothing = keel_conformance::fixtures::fetch(&*pair.b, 10).await;
    anyhow::ensure!(nothing.is_empty(), "nothing queued yet");
    let b: Arc<dyn Provider> = pair.b.clone();
    let wait = tokio::spawn(async move { b.wait_for_work(WorkKind::Orchestrations, LONG).await });

    server.stop();
    until_subscribed(&pair.b, false).await?;
    pair.a
        .create_instance(new_instance("during"), OnConflict::Fail)
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    anyhow::ensure!(
        !wait.is_finished(),
        "nothing could tell B while Redis was down"
    );

    let restarted = Instant::now();
    server.restart()?;
    tokio::time::timeout(NOTICE, wait).await???;
    let took = restarted.elapsed();
    eprintln!("a wait spanning the outage ended {took:?} after Redis returned");
    anyhow::ensure!(took < Duration::from_secs(5), "took {took:?}");
    Ok(())
}
