//! `long-history`: one workflow of many sequential activities. A step late in the
//! history should cost what an early one does: the sticky cache keeps the instance's
//! state between turns, so no turn replays the whole history.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use anyhow::{Context as _, Result, ensure};
use keel::prelude::*;

use super::{Sizes, WAIT, builder, millis};
use crate::backend::Store;
use crate::metric::{Outcome, Unit, key};
use crate::progress::Progress;

/// How many steps at each end are compared.
const WINDOW: usize = 100;

/// `steps` sequential activities; the result is `steps`.
async fn long_flow(ctx: OrchestrationContext, steps: u64) -> Result<u64, Failure> {
    let mut done = 0;
    for step in 0..steps {
        let next: u64 = ctx.activity("step", &step).await?;
        ensure_order(next, step)?;
        done += 1;
    }
    Ok(done)
}

/// Fails the workflow if an activity's result belongs to another step.
fn ensure_order(next: u64, step: u64) -> Result<(), Failure> {
    if next == step + 1 {
        Ok(())
    } else {
        Err(Failure::new(
            "bench.order",
            format!("step {step} got {next}"),
        ))
    }
}

/// Runs the workflow, timing when each step's activity starts.
pub(super) async fn run(store: &Store, sizes: &Sizes, progress: &Progress) -> Result<Outcome> {
    let steps = usize::try_from(sizes.long_history)?;
    ensure!(
        steps > 2 * WINDOW,
        "long-history needs more than {} steps",
        2 * WINDOW
    );
    let starts: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; steps]));
    let meter = progress.meter("steps", steps as u64);
    let in_activity = Arc::clone(&starts);
    let meter_in_activity = meter.handle();
    let keel = builder(store)
        .activity("step", move |_ctx: ActivityContext, step: u64| {
            let now = Instant::now();
            let starts = Arc::clone(&in_activity);
            let meter = meter_in_activity.clone();
            async move {
                let index = usize::try_from(step)
                    .map_err(|error| Failure::new("bench.step", error.to_string()))?;
                let mut starts = starts.lock().unwrap_or_else(PoisonError::into_inner);
                // A redelivered step keeps its first start.
                if let Some(slot @ None) = starts.get_mut(index) {
                    *slot = Some(now);
                    meter.inc(1);
                }
                Ok::<_, Failure>(step + 1)
            }
        })
        .orchestration("long", long_flow)
        .start()
        .await?;
    let client = keel.client();
    let began = Instant::now();
    let waited = match client.start("long", &sizes.long_history).id("long").await {
        Ok(id) => client
            .wait::<u64>(&id, WAIT * 10)
            .await
            .context("long-history did not complete"),
        Err(error) => Err(error.into()),
    };
    let elapsed = began.elapsed();
    keel.shutdown().await;
    drop(meter);
    let output = waited?;
    ensure!(
        output == u64::from(sizes.long_history),
        "long-history returned {output}"
    );

    let starts = starts.lock().unwrap_or_else(PoisonError::into_inner);
    let at = |index: usize| starts[index].with_context(|| format!("step {index} never started"));
    let first = millis(at(WINDOW)? - at(0)?) / WINDOW as f64;
    let last = millis(at(steps - 1)? - at(steps - 1 - WINDOW)?) / WINDOW as f64;
    let mut outcome = Outcome::default();
    #[allow(clippy::cast_precision_loss, reason = "a count for display")]
    outcome
        .set(key::SIZE, Unit::Count, steps as f64)
        .set(key::COMPLETE_S, Unit::Seconds, elapsed.as_secs_f64())
        .set(key::FIRST_100_MS, Unit::Millis, first)
        .set(key::LAST_100_MS, Unit::Millis, last)
        .set(key::LAST_OVER_FIRST, Unit::Ratio, last / first);
    Ok(outcome)
}
