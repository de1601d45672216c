//! Steady state: a fixed number of workflows in flight, each replaced by a new one as
//! it completes; workflows and activity steps completed per second in a window that
//! opens after a warm-up.

use std::time::Instant;

use anyhow::{Context as _, Result, ensure};
use keel::prelude::*;
use tokio::task::JoinSet;

use super::{Sizes, WAIT, builder, millis};
use crate::backend::Store;
use crate::limits::rate;
use crate::metric::{Outcome, Unit, key};
use crate::progress::Progress;
use crate::stats::Percentiles;

/// Adds one: the trivial activity of `linear-N`.
pub(super) async fn increment(_ctx: ActivityContext, n: u64) -> Result<u64, Failure> {
    Ok(n + 1)
}

/// Squares: the trivial activity of the fan-outs.
pub(super) async fn square(_ctx: ActivityContext, n: u64) -> Result<u64, Failure> {
    Ok(n * n)
}

/// `steps` sequential activities, each adding one: the result is `steps`.
async fn linear_flow(ctx: OrchestrationContext, steps: u64) -> Result<u64, Failure> {
    let mut total = 0;
    for _ in 0..steps {
        total = ctx.activity("increment", &total).await?;
    }
    Ok(total)
}

/// `width` parallel activities joined: the result is the sum of the squares 1..=width.
pub(super) async fn fanout_flow(ctx: OrchestrationContext, width: u64) -> Result<u64, Failure> {
    let squares = join_all((1..=width).map(|n| ctx.activity::<u64, _>("square", &n))).await;
    squares.into_iter().sum()
}

/// The sum of the squares 1..=n, which a fan-out of width n returns.
pub(super) fn sum_of_squares(n: u64) -> u64 {
    n * (n + 1) * (2 * n + 1) / 6
}

/// `linear-<steps>`.
pub(super) async fn linear(
    store: &Store,
    steps: u32,
    sizes: &Sizes,
    progress: &Progress,
) -> Result<Outcome> {
    let keel = builder(store)
        .activity("increment", increment)
        .orchestration("linear", linear_flow)
        .start()
        .await?;
    let steps = u64::from(steps);
    let measured = steady(&keel.client(), "linear", steps, steps, sizes, progress).await;
    keel.shutdown().await;
    Ok(measured?.outcome(steps))
}

/// `fanout-5`.
pub(super) async fn fanout5(store: &Store, sizes: &Sizes, progress: &Progress) -> Result<Outcome> {
    let keel = builder(store)
        .activity("square", square)
        .orchestration("fanout", fanout_flow)
        .start()
        .await?;
    let measured = steady(
        &keel.client(),
        "fanout",
        5,
        sum_of_squares(5),
        sizes,
        progress,
    )
    .await;
    keel.shutdown().await;
    Ok(measured?.outcome(5))
}

/// What a steady-state run saw in its window.
struct Steady {
    /// Workflows that completed inside the window.
    completed: u64,
    /// The window's length.
    window: std::time::Duration,
    /// Start-to-result times of those workflows, in ms.
    latencies: Vec<f64>,
}

impl Steady {
    fn outcome(&self, steps_per_workflow: u64) -> Outcome {
        let mut outcome = Outcome::default();
        let workflows = rate(self.completed, self.window);
        #[allow(clippy::cast_precision_loss, reason = "a small count")]
        let steps = workflows * steps_per_workflow as f64;
        outcome
            .set(key::WORKFLOWS_PER_S, Unit::PerSecond, workflows)
            .set(key::STEPS_PER_S, Unit::PerSecond, steps)
            .set(
                key::WORKFLOW_P50_MS,
                Unit::Millis,
                Percentiles::of(&self.latencies).p50,
            );
        outcome
    }
}

/// Keeps `sizes.in_flight` workflows of orchestration `name` running, each started
/// with `input` and checked to return `expected`, through warm-up and window.
async fn steady(
    client: &Client,
    name: &'static str,
    input: u64,
    expected: u64,
    sizes: &Sizes,
    progress: &Progress,
) -> Result<Steady> {
    let began = Instant::now();
    let opens = began + sizes.warmup;
    let closes = opens + sizes.window;
    let meter = progress.meter("workflows", 0);
    let mut lanes = JoinSet::new();
    for lane in 0..sizes.in_flight {
        let client = client.clone();
        let meter = meter.handle();
        lanes.spawn(async move {
            // (when it completed, how long it took)
            let mut done = Vec::new();
            let mut seq = 0u64;
            while Instant::now() < closes {
                let started = Instant::now();
                let id = client
                    .start(name, &input)
                    .id(format!("{name}-{lane}-{seq}"))
                    .await?;
                let output: u64 = client
                    .wait(&id, WAIT)
                    .await
                    .with_context(|| format!("workflow {id} did not complete"))?;
                ensure!(
                    output == expected,
                    "workflow {id} returned {output}, expected {expected}"
                );
                let now = Instant::now();
                done.push((now, now - started));
                meter.inc(1);
                seq += 1;
            }
            anyhow::Ok(done)
        });
    }
    let mut completed = 0;
    let mut latencies = Vec::new();
    while let Some(lane) = lanes.join_next().await {
        for (at, took) in lane?? {
            if (opens..closes).contains(&at) {
                completed += 1;
                latencies.push(millis(took));
            }
        }
    }
    Ok(Steady {
        completed,
        window: sizes.window,
        latencies,
    })
}
