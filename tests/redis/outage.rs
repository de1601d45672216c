//! Redis killed mid-run: every workflow completes anyway, by the store's own wake-ups
//! and polling; Redis restarted: the worker is woken promptly again.

use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::{BRISK, PROMPT, SLEEPY, Site, run_one, start_all, until_finished};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_killed_mid_run_every_workflow_completes() -> anyhow::Result<()> {
    let mut site = Site::new("outage")?;
    let keel = site.worker(BRISK).await?;
    let client = site.client().await?;

    let mut waiters = JoinSet::new();
    start_all(&client, 0..50, &mut waiters).await?;
    let before = until_finished(&mut waiters, 10).await?;
    site.server.stop();
    let killed = Instant::now();

    // What the worker already knew of, it finishes by its own wake-ups.
    let rest = until_finished(&mut waiters, usize::MAX).await?;
    anyhow::ensure!(
        before + rest == 50,
        "{} of 50 workflows completed",
        before + rest
    );
    eprintln!(
        "killed Redis once {before} of 50 workflows had completed; the last of the rest \
         completed {:?} later",
        killed.elapsed()
    );

    // With the worker idle, starting work succeeds and the worker finds it by polling.
    let started = Instant::now();
    start_all(&client, 50..100, &mut waiters).await?;
    let late = until_finished(&mut waiters, usize::MAX).await?;
    anyhow::ensure!(
        late == 50,
        "{late} of the 50 started during the outage completed"
    );
    eprintln!(
        "50 more started with Redis down completed in {:?} (polling every {BRISK:?})",
        started.elapsed()
    );

    site.server.restart()?;
    let report = keel.shutdown().await;
    anyhow::ensure!(report.drained, "the worker drained");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_redis_returns_the_worker_is_woken_promptly_again() -> anyhow::Result<()> {
    let mut site = Site::new("recovery")?;
    let keel = site.worker(SLEEPY).await?;
    let client = site.client().await?;

    // Killed mid-run: what the worker started, it finishes by its own wake-ups.
    let mut waiters = JoinSet::new();
    start_all(&client, 0..100, &mut waiters).await?;
    let before = until_finished(&mut waiters, 20).await?;
    site.server.stop();
    let after = until_finished(&mut waiters, usize::MAX).await?;
    anyhow::ensure!(
        before + after == 100,
        "{} of 100 workflows completed",
        before + after
    );

    // Back again: within the reconnect back-off (2 s at most by default) the worker
    // hears of the client's starts, well before its 30 s poll.
    let restarted = Instant::now();
    site.server.restart()?;
    let mut took = Vec::new();
    let mut first_done = Duration::ZERO;
    for n in 0..5 {
        let elapsed = run_one(&client, n).await?;
        if n == 0 {
            first_done = restarted.elapsed();
        }
        let limit = if n == 0 {
            PROMPT + Duration::from_secs(2)
        } else {
            PROMPT
        };
        anyhow::ensure!(
            elapsed < limit,
            "workflow {n} after the restart took {elapsed:?}: the worker was not woken"
        );
        took.push(elapsed);
    }
    eprintln!(
        "after Redis returned: first workflow in {:?} ({:?} after the restart began), then {:?}",
        took[0],
        first_done,
        &took[1..]
    );

    keel.shutdown().await;
    Ok(())
}
