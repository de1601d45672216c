//! The worker the crash test (`tests/crash`) kills: it runs the test's workload on a
//! SQLite file until it is killed, and appends one line per activity attempt to a log,
//! `<instance> <op> <attempt> <generation>`, so the test can count how many times each
//! activity ran.
//!
//! Usage: `crash_worker <database> <attempts log> <generation>`. It exits by itself
//! when its standard input closes, so a test that dies leaves no worker behind.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use keel::prelude::*;

#[path = "../../crash/workload.rs"]
mod workload;

use workload::{ORCHESTRATION, STEP, StepInput, chain, options, step_duration, step_value};

/// The activity: logs the attempt before working, so attempts cut short by a kill are
/// counted too, then works for a while and computes its step.
async fn step(
    ctx: ActivityContext,
    input: StepInput,
    log: Arc<File>,
    generation: u32,
) -> Result<u64, std::io::Error> {
    let line = format!(
        "{} {} {} {generation}\n",
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
    let mut args = std::env::args_os().skip(1);
    let (Some(database), Some(log), Some(generation)) = (args.next(), args.next(), args.next())
    else {
        bail!("usage: crash_worker <database> <attempts log> <generation>");
    };
    let generation: u32 = generation
        .to_str()
        .and_then(|g| g.parse().ok())
        .context("the generation is a number")?;
    let log = PathBuf::from(log);
    let stdin_closed = keel_tests::stdin_closed()?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("opening the attempts log {}", log.display()))?;
    let log = Arc::new(log);
    let _keel = Keel::builder()
        .sqlite(PathBuf::from(database))
        .options(options())
        .activity(STEP, move |ctx, input| {
            step(ctx, input, Arc::clone(&log), generation)
        })
        .orchestration(ORCHESTRATION, chain)
        .start()
        .await
        .context("starting the worker")?;
    // Runs until killed, or until standard input closes (then the process ends
    // without waiting for its work: the test that wanted it is gone).
    let _ = stdin_closed.await;
    Ok(())
}
