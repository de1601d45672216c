//! With Redis up, a worker that polls only every 30 s serves a client in another
//! process promptly, and the client hears of each end as it happens.

use std::sync::Arc;
use std::time::Duration;

use keel::prelude::*;
use keel_sqlite::SqliteProvider;

use crate::{PROMPT, SLEEPY, Site, now_millis, run_one, summary, test_options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflows_started_in_another_process_complete_promptly() -> anyhow::Result<()> {
    let site = Site::new("prompt")?;
    let keel = site.worker(SLEEPY).await?;
    let client = site.client().await?;

    let mut took = Vec::new();
    for n in 0..10 {
        let elapsed = run_one(&client, n).await?;
        anyhow::ensure!(
            elapsed < PROMPT,
            "workflow {n} took {elapsed:?}: the worker was not woken"
        );
        took.push(elapsed);
    }
    let (median, max) = summary(took);
    eprintln!("three activities, started in the client process: median {median:?}, max {max:?}");

    keel.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_in_another_process_hears_of_each_end_at_once() -> anyhow::Result<()> {
    let site = Site::new("ended")?;
    let keel = site.worker(SLEEPY).await?;
    let client = site.client().await?;

    // Long enough that a client polling with back-off would be checking only every
    // second or so by the time each one ends.
    let mut waits = tokio::task::JoinSet::new();
    for millis in [2_500u64, 2_800, 3_100] {
        let id = client.start("slow", &millis).await?;
        let client = client.clone();
        waits.spawn(async move {
            let out: u64 = client.wait(&id, crate::WAIT).await?;
            let returned = now_millis();
            anyhow::ensure!(out == millis, "slow({millis}) returned {out}");
            let record = client.status(&id).await?;
            let record = record.record();
            let ended = record
                .completed_at
                .ok_or_else(|| anyhow::anyhow!("a completed instance has a completion time"))?;
            Ok(Duration::from_millis(
                returned.saturating_sub(ended.as_millis()),
            ))
        });
    }
    let mut lags = Vec::new();
    while let Some(lag) = waits.join_next().await {
        lags.push(lag??);
    }
    let (median, max) = summary(lags);
    eprintln!(
        "from an end in the worker to the client's wait returning: median {median:?}, max {max:?}"
    );
    anyhow::ensure!(
        max < Duration::from_millis(400),
        "the client heard late (max {max:?}): it polled instead of hearing the news"
    );

    keel.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_the_same_worker_does_not_hear_the_client() -> anyhow::Result<()> {
    // The control: the same two processes without notifiers. The worker finds the
    // client's start only at its next poll, 30 s away.
    let site = Site::new("control")?;
    let worker = Arc::new(SqliteProvider::open(&site.db.path).await?);
    let keel = Keel::builder()
        .provider(worker)
        .options(test_options().max_poll_interval(SLEEPY))
        .activity("step", crate::step)
        .orchestration("three_steps", crate::three_steps)
        .start()
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = Keel::builder()
        .provider(Arc::new(SqliteProvider::open(&site.db.path).await?))
        .client()
        .await?;
    let id = client.start("three_steps", &1u64).await?;
    let waited = client.wait::<u64>(&id, Duration::from_secs(2)).await;
    anyhow::ensure!(
        matches!(waited, Err(keel::Error::Timeout { .. })),
        "the control completed without a wake-up ({waited:?}): the other tests would prove nothing"
    );
    keel.shutdown().await;
    Ok(())
}
