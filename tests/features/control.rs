//! Cancelling, pausing and resuming running instances through the client.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use keel::Error;
use keel::prelude::*;
use keel_tests::{Db, WAIT, eventually, test_options, wait_for_status};

/// Flags a long activity sets: that it started, and that its token fired.
#[derive(Debug, Default)]
struct Seen {
    started: AtomicBool,
    cancelled: AtomicBool,
}

/// Runs until its cancellation token fires, heartbeating as it goes, or gives up after
/// a minute (far past any test's patience).
async fn run_until_cancelled(ctx: ActivityContext, seen: Arc<Seen>) -> Result<String, Failure> {
    seen.started.store(true, Ordering::SeqCst);
    for _ in 0..600 {
        ctx.heartbeat();
        tokio::select! {
            () = ctx.cancelled() => {
                seen.cancelled.store(true, Ordering::SeqCst);
                return Err(Failure::new(Failure::CANCELLED, "the token fired"));
            }
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    Ok("never cancelled".to_owned())
}

/// Leases short enough that renewals (every third of the lease) come several times a
/// second, so the worker hears of a cancelled activity quickly.
fn short_leases() -> WorkerOptions {
    test_options().lease_duration(Duration::from_secs(1))
}

fn expect_cancelled(result: keel::Result<String>, what: &str) -> anyhow::Result<()> {
    match result {
        Err(Error::Cancelled { failure, .. }) => {
            ensure!(
                failure.is_cancelled(),
                "{what}: not a cancellation: {failure}"
            );
            Ok(())
        }
        other => bail!("{what}: expected Error::Cancelled, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_parent_cancels_its_child_and_the_childs_activity() -> anyhow::Result<()> {
    let db = Db::new()?;
    let seen = Arc::new(Seen::default());
    let in_activity = Arc::clone(&seen);
    let keel = Keel::builder()
        .sqlite(&db.path)
        .options(short_leases())
        .activity("long", move |ctx: ActivityContext, (): ()| {
            run_until_cancelled(ctx, Arc::clone(&in_activity))
        })
        .orchestration("child", |ctx: OrchestrationContext, (): ()| async move {
            ctx.activity::<String, _>("long", &()).await
        })
        .orchestration("parent", |ctx: OrchestrationContext, (): ()| async move {
            let child = InstanceId::new("cancel-child").map_err(IntoFailure::into_failure)?;
            ctx.child::<String, _>("child", &())
                .instance_id(child)
                .await
        })
        .start()
        .await?;
    let client = keel.client();
    let parent = client.start("parent", &()).id("cancel-parent").await?;
    let child = InstanceId::new("cancel-child")?;

    eventually("the child's activity runs", WAIT, || {
        seen.started.load(Ordering::SeqCst)
    })
    .await?;
    ensure!(
        !seen.cancelled.load(Ordering::SeqCst),
        "the activity's token fired before anyone cancelled"
    );
    client.cancel(&parent, "the test cancels it").await?;

    expect_cancelled(client.wait::<String>(&parent, WAIT).await, "the parent")?;
    expect_cancelled(client.wait::<String>(&child, WAIT).await, "the child")?;
    eventually("the activity sees its token fire", WAIT, || {
        seen.cancelled.load(Ordering::SeqCst)
    })
    .await?;
    let child_info = client.status(&child).await?;
    ensure!(child_info.status() == InstanceStatus::Cancelled);
    keel.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_workflow_fires_its_running_activitys_token() -> anyhow::Result<()> {
    let db = Db::new()?;
    let seen = Arc::new(Seen::default());
    let in_activity = Arc::clone(&seen);
    let keel = Keel::builder()
        .sqlite(&db.path)
        .options(short_leases())
        .activity("long", move |ctx: ActivityContext, (): ()| {
            run_until_cancelled(ctx, Arc::clone(&in_activity))
        })
        .orchestration("flow", |ctx: OrchestrationContext, (): ()| async move {
            ctx.activity::<String, _>("long", &()).await
        })
        .start()
        .await?;
    let client = keel.client();
    let id = client.start("flow", &()).id("cancel-flow").await?;

    eventually("the activity runs", WAIT, || {
        seen.started.load(Ordering::SeqCst)
    })
    .await?;
    client.cancel(&id, "no longer needed").await?;

    let result = client.wait::<String>(&id, WAIT).await;
    expect_cancelled(result, "the workflow")?;
    eventually("the activity sees its token fire", WAIT, || {
        seen.cancelled.load(Ordering::SeqCst)
    })
    .await?;
    let info = client.status(&id).await?;
    let failure = info
        .failure()
        .context("a cancelled instance keeps its failure")?;
    ensure!(
        failure.to_string().contains("no longer needed"),
        "the cancellation does not carry its reason: {failure}"
    );
    keel.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_instance_keeps_its_signal_until_resumed() -> anyhow::Result<()> {
    let db = Db::new()?;
    let keel = Keel::builder()
        .sqlite(&db.path)
        .options(test_options())
        .orchestration("gate", |ctx: OrchestrationContext, (): ()| async move {
            let word: String = ctx.signal("open").await?;
            Ok::<_, Failure>(format!("opened with {word}"))
        })
        .start()
        .await?;
    let client = keel.client();
    let id = client.start("gate", &()).id("paused-gate").await?;
    // Running once its first turn is committed: it now waits for the signal.
    wait_for_status(&client, &id, InstanceStatus::Running, WAIT).await?;

    client.pause(&id).await?;
    wait_for_status(&client, &id, InstanceStatus::Paused, WAIT).await?;
    client.signal(&id, "open", "sesame").await?;
    let history_before = client.history(&id).await?.len();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let info = client.status(&id).await?;
        ensure!(
            info.status() == InstanceStatus::Paused,
            "a paused instance went on to {}",
            info.status()
        );
    }
    let history_after = client.history(&id).await?.len();
    ensure!(
        history_before == history_after,
        "a paused instance's history grew from {history_before} to {history_after} events"
    );

    client.resume(&id).await?;
    let output: String = client.wait(&id, WAIT).await?;
    ensure!(
        output == "opened with sesame",
        "unexpected output {output:?}"
    );
    keel.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_an_activity_of_this_process_without_waiting_for_a_renewal()
-> anyhow::Result<()> {
    let db = Db::new()?;
    let seen = Arc::new(Seen::default());
    let in_activity = Arc::clone(&seen);
    // A 60 s lease is renewed every 20 s: hearing of the cancel sooner proves the
    // worker told the attempt itself.
    let keel = Keel::builder()
        .sqlite(&db.path)
        .options(test_options().lease_duration(Duration::from_secs(60)))
        .activity("quiet", move |ctx: ActivityContext, (): ()| {
            let seen = Arc::clone(&in_activity);
            async move {
                seen.started.store(ctx.deliveries() == 1, Ordering::SeqCst);
                ctx.cancelled().await;
                seen.cancelled.store(true, Ordering::SeqCst);
                Err::<String, _>(Failure::new(Failure::CANCELLED, "the token fired"))
            }
        })
        .orchestration("flow", |ctx: OrchestrationContext, (): ()| async move {
            ctx.activity::<String, _>("quiet", &()).await
        })
        .start()
        .await?;
    let client = keel.client();
    let id = client.start("flow", &()).await?;
    eventually("the activity runs, delivered once", WAIT, || {
        seen.started.load(Ordering::SeqCst)
    })
    .await?;
    client.cancel(&id, "stop").await?;
    expect_cancelled(client.wait::<String>(&id, WAIT).await, "the workflow")?;
    eventually(
        "the activity sees its token fire",
        Duration::from_secs(10),
        || seen.cancelled.load(Ordering::SeqCst),
    )
    .await?;
    let report = keel.shutdown().await;
    ensure!(
        report.drained,
        "the cancelled activity was still running: {report:?}"
    );
    Ok(())
}
