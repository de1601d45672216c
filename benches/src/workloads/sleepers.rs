//! `sleepers`: many workflows parked in durable timers that all come due at the same
//! instant. Measures the setup (starting them all, concurrently, until every timer is
//! committed), the worker's resident memory while they are parked, and how fast the
//! wake storm drains. Each run has a process of its own (see [`crate::isolate`]), so
//! the resident memory holds nothing of earlier workloads.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, ensure};
use keel::prelude::*;
use keel::{InstanceQuery, PageRequest, Timestamp};
use tokio::task::JoinSet;

use super::{Sizes, WAIT, builder};
use crate::backend::Store;
use crate::limits::rate;
use crate::metric::{Outcome, Unit, key};
use crate::progress::Progress;
use crate::sys;

/// Starts in flight at once during setup, so that the client is not the bottleneck.
const STARTERS: u32 = 256;

/// The share of the sleepers first run as a calibration: started with a timer due at
/// once, their rate (starts, first turns, wake-ups) sets how long setup is given.
const CALIBRATION_SHARE: u32 = 20;

/// Setup is given this many times the calibrated time, as the calibration ran with an
/// emptier store; a slower setup overruns the timer, which the report then says.
const HEADROOM: f64 = 1.5;

/// Never less than this between the first start and the storm.
const MIN_PARK: Duration = Duration::from_secs(1);

/// How often setup and drain look at the store.
const LOOK: Duration = Duration::from_millis(50);

/// Counts the wake-ups and remembers the last instance to wake.
#[derive(Debug, Default)]
struct Woken {
    count: AtomicU32,
    last: Mutex<Option<InstanceId>>,
}

/// Parks `sizes.sleepers` workflows, then lets their timers come due together.
pub(super) async fn run(store: &Store, sizes: &Sizes, progress: &Progress) -> Result<Outcome> {
    let total = sizes.sleepers;
    let woken = Arc::new(Woken::default());
    let in_flow = Arc::clone(&woken);
    let keel = builder(store)
        // Sleeps until the absolute time `due` (ms since the epoch), then returns `index`.
        .orchestration(
            "sleeper",
            move |ctx: OrchestrationContext, (index, due): (u32, u64)| {
                let woken = Arc::clone(&in_flow);
                async move {
                    ctx.sleep_until(Timestamp::from_millis(due)).await;
                    if !ctx.is_replaying() {
                        woken.count.fetch_add(1, Ordering::Relaxed);
                        *woken.last.lock().unwrap_or_else(PoisonError::into_inner) =
                            Some(ctx.instance_id());
                    }
                    Ok::<_, Failure>(index)
                }
            },
        )
        .start()
        .await?;
    let measured = measure(&keel.client(), &woken, total, progress).await;
    keel.shutdown().await;
    measured
}

async fn measure(
    client: &Client,
    woken: &Woken,
    total: u32,
    progress: &Progress,
) -> Result<Outcome> {
    let mut outcome = Outcome::default();
    let baseline = sys::memory().context("no /proc/self/status")?;
    let park = calibrate(client, woken, total).await?;
    let due_at = SystemTime::now() + park;
    let due_instant = Instant::now() + park;
    let due = Timestamp::from_system_time(due_at).as_millis();
    sys::reset_peak();

    // Setup: every start, then every first turn (its timer committed).
    let began = Instant::now();
    let meter = progress.meter("starting", u64::from(total));
    start_all(client, "sleeper", total, due, Some(meter.handle())).await?;
    drop(meter);
    let started = began.elapsed();
    let meter = progress.meter("parking", u64::from(total));
    loop {
        let depths = client.provider().queue_depths().await?;
        meter.handle().set_position(depths.messages_delayed);
        if depths.messages_delayed >= u64::from(total) && depths.messages_ready == 0 {
            break;
        }
        // Timers that came due during setup leave the delayed count: stop waiting.
        if Instant::now() >= due_instant {
            outcome.notes.push(format!(
                "setup overran the timer: {} of {total} parked when it came due",
                depths.messages_delayed
            ));
            break;
        }
        tokio::time::sleep(LOOK).await;
    }
    drop(meter);
    let setup = began.elapsed();
    tokio::time::sleep(LOOK).await;
    let parked = sys::memory().context("no /proc/self/status")?;

    // The storm: from the due time (or the end of setup, if later) to the last
    // workflow's completion.
    tokio::time::sleep_until(due_instant.into()).await;
    let storm_began = Instant::now();
    let meter = progress.meter("waking", u64::from(total));
    let deadline = storm_began + WAIT;
    while woken.count.load(Ordering::Relaxed) < total {
        ensure!(
            Instant::now() < deadline,
            "the wake storm did not drain in {WAIT:?}"
        );
        meter
            .handle()
            .set_position(u64::from(woken.count.load(Ordering::Relaxed)));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let last = woken
        .last
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    if let Some(last) = last {
        client.wait::<u32>(&last, WAIT).await?;
    }
    let storm = storm_began.elapsed();
    drop(meter);
    check_results(client, total).await?;

    #[allow(clippy::cast_precision_loss, reason = "a count for display")]
    outcome
        .set(key::SIZE, Unit::Count, f64::from(total))
        .set(key::SETUP_S, Unit::Seconds, setup.as_secs_f64())
        .set(key::STARTS_S, Unit::Seconds, started.as_secs_f64())
        .set(
            key::PARKED_RSS_MB,
            Unit::Megabytes,
            sys::megabytes(parked.rss),
        )
        .set(
            key::PEAK_RSS_MB,
            Unit::Megabytes,
            sys::megabytes(parked.peak),
        )
        .set(
            key::BASELINE_RSS_MB,
            Unit::Megabytes,
            sys::megabytes(baseline.rss),
        )
        .set(key::STORM_S, Unit::Seconds, storm.as_secs_f64())
        .set(
            key::TIMERS_PER_S,
            Unit::PerSecond,
            rate(u64::from(total), storm),
        );
    Ok(outcome)
}

/// Starts `count` sleepers `prefix-<index>` due at `due`, `STARTERS` at a time.
async fn start_all(
    client: &Client,
    prefix: &'static str,
    count: u32,
    due: u64,
    meter: Option<indicatif::ProgressBar>,
) -> Result<()> {
    let next = Arc::new(AtomicU32::new(0));
    let mut starters = JoinSet::new();
    for _ in 0..STARTERS.min(count) {
        let client = client.clone();
        let next = Arc::clone(&next);
        let meter = meter.clone();
        starters.spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= count {
                    return anyhow::Ok(());
                }
                client
                    .start("sleeper", &(index, due))
                    .id(format!("{prefix}-{index}"))
                    .await?;
                if let Some(meter) = &meter {
                    meter.inc(1);
                }
            }
        });
    }
    while let Some(started) = starters.join_next().await {
        started??;
    }
    Ok(())
}

/// Runs a share of the sleepers with timers due at once, and returns how long the
/// real setup should be given. Leaves the wake-up count at zero.
async fn calibrate(client: &Client, woken: &Woken, total: u32) -> Result<Duration> {
    let count = (total / CALIBRATION_SHARE).max(1);
    let began = Instant::now();
    start_all(client, "calibration", count, 0, None).await?;
    let deadline = began + WAIT;
    while woken.count.load(Ordering::Relaxed) < count {
        ensure!(
            Instant::now() < deadline,
            "the calibration sleepers did not complete"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let per_sleeper = began.elapsed().as_secs_f64() / f64::from(count);
    woken.count.store(0, Ordering::Relaxed);
    Ok(MIN_PARK.max(Duration::from_secs_f64(
        per_sleeper * f64::from(total) * HEADROOM,
    )))
}

/// Every sleeper completed with its own index.
async fn check_results(client: &Client, total: u32) -> Result<()> {
    let query = InstanceQuery {
        name: Some("sleeper".to_owned()),
        ..InstanceQuery::default()
    };
    let mut page = PageRequest::first(1_000);
    let mut seen = vec![false; usize::try_from(total)?];
    loop {
        let listed = client.list(query.clone(), page.clone()).await?;
        for info in &listed.items {
            if info.id().as_ref().starts_with("calibration-") {
                continue;
            }
            ensure!(
                info.status() == InstanceStatus::Completed,
                "{} is {:?}",
                info.id(),
                info.status()
            );
            let index: u32 = info.output()?;
            ensure!(
                info.id().as_ref() == format!("sleeper-{index}"),
                "{} returned {index}",
                info.id()
            );
            seen[usize::try_from(index)?] = true;
        }
        match listed.next {
            Some(cursor) => page.cursor = Some(cursor),
            None => break,
        }
    }
    let missing = seen.iter().filter(|seen| !**seen).count();
    ensure!(missing == 0, "{missing} sleepers are missing");
    Ok(())
}
