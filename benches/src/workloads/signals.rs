//! `signals`: the round trip from `client.signal` to the workflow's next activity
//! starting, one signal at a time.

use std::time::Instant;

use anyhow::{Context as _, Result, ensure};
use keel::prelude::*;
use tokio::sync::mpsc;

use super::{Sizes, WAIT, builder, millis};
use crate::backend::Store;
use crate::metric::{Outcome, Unit, key};
use crate::progress::Progress;
use crate::stats::Percentiles;

/// Round trips before measuring.
const WARMUP: u32 = 10;

/// Waits for `rounds` signals, running one activity after each; returns `rounds`.
async fn listener(ctx: OrchestrationContext, rounds: u32) -> Result<u32, Failure> {
    for round in 0..rounds {
        let got: u32 = ctx.signal("go").await?;
        if got != round {
            return Err(Failure::new(
                "bench.order",
                format!("round {round} got signal {got}"),
            ));
        }
        let _: u32 = ctx.activity("mark", &round).await?;
    }
    Ok(rounds)
}

/// Sends the signals one after another, each after the previous round's activity ran.
pub(super) async fn run(store: &Store, sizes: &Sizes, progress: &Progress) -> Result<Outcome> {
    let (marks, mut marked) = mpsc::unbounded_channel::<(u32, Instant)>();
    let keel = builder(store)
        .activity("mark", move |_ctx: ActivityContext, round: u32| {
            let now = Instant::now();
            // The receiver outlives the worker's work; a closed channel only loses a sample.
            let _ = marks.send((round, now));
            async move { Ok::<_, Failure>(round) }
        })
        .orchestration("listener", listener)
        .start()
        .await?;
    let client = keel.client();
    let rounds = WARMUP + u32::try_from(sizes.signal_samples)?;
    let meter = progress.meter("signals", u64::from(rounds));
    let measured = async {
        let id = client.start("listener", &rounds).id("listener").await?;
        let mut trips = Vec::with_capacity(sizes.signal_samples);
        for round in 0..rounds {
            let sent = Instant::now();
            client.signal(&id, "go", &round).await?;
            let arrived = loop {
                let (marked_round, at) = tokio::time::timeout(WAIT, marked.recv())
                    .await
                    .with_context(|| format!("round {round}'s activity did not run"))?
                    .context("the activity's channel closed")?;
                // A redelivered earlier activity is not this round's.
                if marked_round == round {
                    break at;
                }
            };
            if round >= WARMUP {
                trips.push(millis(arrived - sent));
            }
            meter.inc(1);
        }
        let output: u32 = client.wait(&id, WAIT).await?;
        ensure!(
            output == rounds,
            "listener returned {output}, expected {rounds}"
        );
        anyhow::Ok(trips)
    }
    .await;
    drop(meter);
    keel.shutdown().await;
    let trips = Percentiles::of(&measured?);
    let mut outcome = Outcome::default();
    #[allow(clippy::cast_precision_loss, reason = "a count for display")]
    outcome
        .set(key::SAMPLES, Unit::Count, trips.count as f64)
        .set(key::P50_MS, Unit::Millis, trips.p50)
        .set(key::P99_MS, Unit::Millis, trips.p99);
    Ok(outcome)
}
