//! The workload of the crash test, shared by the test (`tests/crash/main.rs`) and the
//! worker binary it kills (`tests/src/bin/crash_worker.rs`, which includes this file by
//! path): the orchestration, its activity's arithmetic, and the worker's timings. One
//! source, so the expected outputs and the bounds the test asserts cannot drift from
//! what the worker runs.

#![allow(
    dead_code,
    reason = "compiled into both the test and the worker binary; each uses a part"
)]

use std::time::Duration;

use keel::join_all;
use keel::prelude::*;

/// The orchestration's registered name.
pub(crate) const ORCHESTRATION: &str = "chain";

/// The activity's registered name.
pub(crate) const STEP: &str = "step";

/// Activities per workflow.
pub(crate) const STEPS: u64 = 5;

/// How long an instance lock and an activity lease last: a killed worker's claims
/// block their work this long, so recovery is bounded by it.
pub(crate) const LOCK: Duration = Duration::from_secs(2);

/// The longest an idle dispatcher waits before looking for work again.
pub(crate) const POLL: Duration = Duration::from_millis(250);

/// The durable sleep of the workflows that have one. Longer than the recovery bound
/// the test asserts, so a timer restarted by a crash (rather than kept at its
/// original time) would be caught.
pub(crate) const TIMER: Duration = Duration::from_secs(8);

/// At most this many activities run at once: with the activities' own duration it
/// paces the workload so that it spans the whole kill phase.
pub(crate) const CONCURRENCY: usize = 6;

/// The input of one activity: the workflow's number, the step's index, the value so far.
pub(crate) type StepInput = (u64, u64, u64);

/// Whether workflow `n` sleeps durably after its first step (one in five).
pub(crate) fn has_timer(n: u64) -> bool {
    n.is_multiple_of(5)
}

/// Whether workflow `n` runs its last two steps concurrently (one in two).
pub(crate) fn has_fan_out(n: u64) -> bool {
    n.is_multiple_of(2)
}

/// What one step computes: deterministic, and different for every (n, index, value).
pub(crate) fn step_value((n, index, value): StepInput) -> u64 {
    (value * 31 + n * 10 + index + 1) % 1_000_000_007
}

/// How long step `index` of workflow `n` works: 40 to 119 ms, spread evenly.
pub(crate) fn step_duration(n: u64, index: u64) -> Duration {
    let spread = (n * 7919 + index * 104_729) % 80;
    Duration::from_millis(40 + spread)
}

/// The output workflow `n` must complete with, computed the way [`chain`] computes it.
pub(crate) fn expected_output(n: u64) -> u64 {
    let mut value = n;
    for index in 0..3 {
        value = step_value((n, index, value));
    }
    if has_fan_out(n) {
        step_value((n, 3, value)) + step_value((n, 4, value))
    } else {
        value = step_value((n, 3, value));
        step_value((n, 4, value))
    }
}

/// The orchestration: five steps, each feeding the next; a durable sleep after the
/// first in some workflows; the last two steps concurrent in others.
pub(crate) async fn chain(ctx: OrchestrationContext, n: u64) -> Result<u64, Failure> {
    let mut value = n;
    for index in 0..3 {
        value = ctx.activity(STEP, &(n, index, value)).await?;
        if index == 0 && has_timer(n) {
            ctx.sleep(TIMER).await;
        }
    }
    if has_fan_out(n) {
        let last = [3, 4].map(|index| ctx.activity::<u64, _>(STEP, &(n, index, value)));
        let mut sum = 0;
        for output in join_all(last).await {
            sum += output?;
        }
        Ok(sum)
    } else {
        value = ctx.activity(STEP, &(n, 3, value)).await?;
        ctx.activity(STEP, &(n, 4, value)).await
    }
}

/// The worker's options: short locks and leases so a killed worker's claims expire
/// quickly, frequent polls, a bounded number of activities at once.
pub(crate) fn options() -> WorkerOptions {
    WorkerOptions::default()
        .lock_duration(LOCK)
        .lease_duration(LOCK)
        .max_poll_interval(POLL)
        .max_concurrent_activities(CONCURRENCY)
        .turn_retry_delay(Duration::from_millis(10))
        .queue_depth_interval(None)
}
