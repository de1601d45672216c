//! A worker of the scale-out tests (`tests/scale`, `tests/pg_restart`): it runs the
//! tests' workload on the store it is given, alongside other worker processes, and
//! appends one line per activity attempt to its own log,
//! `<worker> <instance> <op> <attempt> <unix ms>`, so the test can tell which worker
//! ran what, and when.
//!
//! Usage: `scale_worker <worker id> <log file> <backend args...>`. It creates
//! `<log file>` with the extension `ready` once it runs. SIGTERM stops it
//! gracefully (running work finishes, up to the shutdown timeout) and it exits 0; it
//! exits at once when its standard input closes, so a test that dies leaves no worker
//! behind.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use anyhow::{Context as _, bail};
use keel::prelude::*;
use tokio::signal::unix::{SignalKind, signal};

#[path = "../../scale/workload.rs"]
mod workload;

use workload::{
    Backend, ORCHESTRATION, STEP, StepInput, ready_file, scale, step_duration, step_value,
};

/// The activity: logs the attempt before working, so attempts cut short by a kill are
/// counted too, then works for a while and computes its step.
async fn step(
    ctx: ActivityContext,
    input: StepInput,
    log: Arc<File>,
    worker: u32,
) -> Result<u64, std::io::Error> {
    let millis = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let line = format!(
        "{worker} {} {} {} {millis}\n",
        ctx.instance_id(),
        ctx.op_id().get(),
        ctx.attempt()
    );
    // One write of a short line to a file opened for appending: lines of concurrent
    // attempts never interleave, and a kill never leaves half of one.
    (&*log).write_all(line.as_bytes())?;
    let (n, index, _) = input;
    tokio::time::sleep(step_duration(n, index)).await;
    Ok(step_value(input))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(worker), Some(log)) = (args.next(), args.next()) else {
        bail!("usage: scale_worker <worker id> <log file> <backend args...>");
    };
    let worker: u32 = worker.parse().context("the worker id is a number")?;
    let backend = Backend::from_args(&mut args)?;
    // Installed before the worker starts, so a SIGTERM that comes early is not fatal.
    let mut terminate = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let stdin_closed = keel_tests::stdin_closed()?;
    let log = PathBuf::from(log);
    let ready = ready_file(&log);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("opening the activity log {}", log.display()))?;
    let log = Arc::new(log);
    let keel = Keel::builder()
        .provider(backend.provider().await?)
        .options(backend.worker_options())
        .activity(STEP, move |ctx, input| {
            step(ctx, input, Arc::clone(&log), worker)
        })
        .orchestration(ORCHESTRATION, scale)
        .start()
        .await
        .context("starting the worker")?;
    File::create(&ready).with_context(|| format!("creating {}", ready.display()))?;
    tokio::select! {
        _ = terminate.recv() => {
            let began = Instant::now();
            let report = keel.shutdown().await;
            eprintln!(
                "scale_worker {worker}: stopped gracefully in {:.1?} (drained: {}, \
                 activities abandoned: {})",
                began.elapsed(),
                report.drained,
                report.abandoned_activities
            );
        }
        // The test that wanted this worker is gone: end without waiting for the work.
        _ = stdin_closed => {}
    }
    Ok(())
}
