//! `latency`: one workflow at a time with one activity, from `client.start` to the
//! typed result through `client.wait`; and the activity's schedule-to-start.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use anyhow::{Context as _, Result, ensure};
use keel::prelude::*;

use super::{Sizes, WAIT, builder, millis};
use crate::backend::Store;
use crate::metric::{Outcome, Unit, key};
use crate::progress::Progress;
use crate::stats::Percentiles;

/// Samples taken before measuring, to warm caches and connections.
const WARMUP: usize = 20;

/// When each instance's workflow code asked for its activity, and the schedule-to-start
/// times measured from it. A side channel of the bench: the workflow's behaviour does
/// not depend on it, so it stays deterministic.
#[derive(Debug, Default)]
struct Clocks {
    scheduled: HashMap<InstanceId, Instant>,
    schedule_to_start: Vec<f64>,
}

type Shared = Arc<Mutex<Clocks>>;

fn lock(clocks: &Shared) -> std::sync::MutexGuard<'_, Clocks> {
    clocks.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs the samples one after another.
pub(super) async fn run(store: &Store, sizes: &Sizes, progress: &Progress) -> Result<Outcome> {
    let clocks = Shared::default();
    let in_flow = Arc::clone(&clocks);
    let in_activity = Arc::clone(&clocks);
    let keel = builder(store)
        .activity("echo", move |ctx: ActivityContext, n: u64| {
            let started = Instant::now();
            let clocks = Arc::clone(&in_activity);
            async move {
                let mut clocks = lock(&clocks);
                if let Some(scheduled) = clocks.scheduled.remove(ctx.instance_id()) {
                    clocks.schedule_to_start.push(millis(started - scheduled));
                }
                Ok::<_, Failure>(n + 1)
            }
        })
        .orchestration("latency", move |ctx: OrchestrationContext, n: u64| {
            let clocks = Arc::clone(&in_flow);
            async move {
                if !ctx.is_replaying() {
                    lock(&clocks)
                        .scheduled
                        .insert(ctx.instance_id(), Instant::now());
                }
                ctx.activity::<u64, _>("echo", &n).await
            }
        })
        .start()
        .await?;
    let measured = samples(&keel.client(), &clocks, sizes, progress).await;
    keel.shutdown().await;
    measured
}

async fn samples(
    client: &Client,
    clocks: &Shared,
    sizes: &Sizes,
    progress: &Progress,
) -> Result<Outcome> {
    let meter = progress.meter("samples", (WARMUP + sizes.latency_samples) as u64);
    let mut latencies = Vec::with_capacity(sizes.latency_samples);
    for i in 0..WARMUP + sizes.latency_samples {
        if i == WARMUP {
            lock(clocks).schedule_to_start.clear();
        }
        let n = i as u64;
        let began = Instant::now();
        let id = client
            .start("latency", &n)
            .id(format!("latency-{i}"))
            .await?;
        let output: u64 = client
            .wait(&id, WAIT)
            .await
            .with_context(|| format!("workflow {id} did not complete"))?;
        let took = began.elapsed();
        ensure!(
            output == n + 1,
            "workflow {id} returned {output}, expected {}",
            n + 1
        );
        if i >= WARMUP {
            latencies.push(millis(took));
        }
        meter.inc(1);
    }
    let total = Percentiles::of(&latencies);
    let to_start = Percentiles::of(&lock(clocks).schedule_to_start);
    let mut outcome = Outcome::default();
    #[allow(clippy::cast_precision_loss, reason = "a count for display")]
    outcome
        .set(key::SAMPLES, Unit::Count, total.count as f64)
        .set(key::P50_MS, Unit::Millis, total.p50)
        .set(key::P95_MS, Unit::Millis, total.p95)
        .set(key::P99_MS, Unit::Millis, total.p99)
        .set(key::SCHEDULE_TO_START_P50_MS, Unit::Millis, to_start.p50)
        .set(key::SCHEDULE_TO_START_P99_MS, Unit::Millis, to_start.p99);
    if to_start.count < total.count {
        outcome.notes.push(format!(
            "schedule-to-start from {} of {} samples (the rest replayed their first turn)",
            to_start.count, total.count
        ));
    }
    Ok(outcome)
}
