//! Poison handling: code that panics on every turn is set aside after a few tries; code
//! that panics once recovers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, ensure};
use keel::prelude::*;
use keel_tests::{Db, WAIT, test_options, wait_for_status};

async fn double(_ctx: ActivityContext, n: u64) -> Result<u64, Failure> {
    Ok(n * 2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_that_always_panics_is_suspended_after_the_attempt_limit() -> anyhow::Result<()> {
    let db = Db::new()?;
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&runs);
    let keel = Keel::builder()
        .sqlite(&db.path)
        .options(test_options().max_turn_attempts(3))
        .orchestration("doomed", move |_ctx: OrchestrationContext, (): ()| {
            let runs = Arc::clone(&counted);
            async move {
                // Always true; written as a test so the block still has a Result type.
                if runs.fetch_add(1, Ordering::SeqCst) < usize::MAX {
                    panic!("the doomed workflow always panics");
                }
                Ok::<(), Failure>(())
            }
        })
        .start()
        .await?;
    let client = keel.client();
    let id = client.start("doomed", &()).id("doomed-1").await?;

    let info = wait_for_status(&client, &id, InstanceStatus::Suspended, WAIT).await?;
    let reason = info.reason().context("a suspended instance has a reason")?;
    for expected in ["the doomed workflow always panics", "3 times"] {
        ensure!(
            reason.contains(expected),
            "the reason does not mention {expected:?}: {reason}"
        );
    }
    let ran = runs.load(Ordering::SeqCst);
    ensure!(
        ran >= 3,
        "the code ran {ran} times, fewer than the 3 attempts"
    );
    // Suspended means set aside: no further turn runs.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later = runs.load(Ordering::SeqCst);
    ensure!(
        later == ran,
        "a suspended instance ran again ({ran} -> {later} runs)"
    );
    ensure!(client.status(&id).await?.status() == InstanceStatus::Suspended);
    keel.shutdown().await;
    Ok(())
}

/// Counts the first turns of `flaky`: only the first of all panics.
static FLAKY_RUNS: AtomicUsize = AtomicUsize::new(0);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_that_panics_once_recovers_and_completes() -> anyhow::Result<()> {
    let db = Db::new()?;
    let keel = Keel::builder()
        .sqlite(&db.path)
        .options(test_options().max_turn_attempts(3))
        .activity("double", double)
        .orchestration("flaky", |ctx: OrchestrationContext, n: u64| async move {
            if FLAKY_RUNS.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("a one-off panic");
            }
            let doubled: u64 = ctx.activity("double", &n).await?;
            Ok::<_, Failure>(doubled + 1)
        })
        .start()
        .await?;
    let client = keel.client();
    let id = client.start("flaky", &20_u64).id("flaky-1").await?;

    let output: u64 = client.wait(&id, WAIT).await?;
    ensure!(output == 41, "unexpected output {output}");
    let info = client.status(&id).await?;
    ensure!(info.status() == InstanceStatus::Completed);
    ensure!(
        info.reason().is_none(),
        "a recovered instance keeps a suspension reason: {:?}",
        info.reason()
    );
    let ran = FLAKY_RUNS.load(Ordering::SeqCst);
    ensure!(
        ran >= 2,
        "the code ran {ran} times: the panic was not retried"
    );
    keel.shutdown().await;
    Ok(())
}
