//! `fanout-K`: one workflow schedules K activities in one turn and joins them; the time
//! to complete and the process's peak resident memory. Each run has a process of its
//! own (see [`crate::isolate`]), so the peak is this workload's alone.

use std::time::Instant;

use anyhow::{Result, ensure};

use super::throughput::{fanout_flow, square, sum_of_squares};
use super::{WAIT, builder};
use crate::backend::Store;
use crate::metric::{Outcome, Unit, key};
use crate::sys;

/// One fan-out of `width` activities.
pub(super) async fn run(store: &Store, width: u32) -> Result<Outcome> {
    let keel = builder(store)
        .activity("square", square)
        .orchestration("fanout", fanout_flow)
        .start()
        .await?;
    let client = keel.client();
    let width = u64::from(width);
    let baseline = sys::memory();
    let peak_reset = sys::reset_peak();
    let began = Instant::now();
    let id = client.start("fanout", &width).id("fanout").await?;
    let waited = client.wait::<u64>(&id, WAIT * 4).await;
    let elapsed = began.elapsed();
    let memory = sys::memory();
    keel.shutdown().await;
    let output = waited?;
    ensure!(
        output == sum_of_squares(width),
        "fanout-{width} returned {output}, expected {}",
        sum_of_squares(width)
    );

    let mut outcome = Outcome::default();
    #[allow(clippy::cast_precision_loss, reason = "a count for display")]
    outcome
        .set(key::SIZE, crate::metric::Unit::Count, width as f64)
        .set(key::COMPLETE_S, Unit::Seconds, elapsed.as_secs_f64())
        .set(
            key::STEPS_PER_S,
            Unit::PerSecond,
            crate::limits::rate(width, elapsed),
        );
    if let Some(memory) = memory {
        outcome.set(
            key::PEAK_RSS_MB,
            Unit::Megabytes,
            sys::megabytes(memory.peak),
        );
    }
    if let Some(baseline) = baseline {
        outcome.set(
            key::BASELINE_RSS_MB,
            Unit::Megabytes,
            sys::megabytes(baseline.rss),
        );
    }
    if !peak_reset {
        outcome.notes.push(
            "peak RSS is since process start: /proc/self/clear_refs was not writable".to_owned(),
        );
    }
    Ok(outcome)
}
