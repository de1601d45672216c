//! Scale-out: three worker processes and a client process share one store and run 500
//! workflows of five activities, with durable timers and signals. One worker is
//! SIGKILLed mid-run and another stopped gracefully with SIGTERM. Every workflow must
//! complete with the right output, every activity result be recorded exactly once, and
//! the work be spread over all the workers that were alive.
//!
//! The store is PostgreSQL (`KEEL_POSTGRES_URL`, a fresh schema per run) unless
//! `KEEL_SCALE_BACKEND=sqlite` asks for a shared SQLite file instead.

mod check;
mod run;
mod workload;

use std::time::Duration;

use anyhow::ensure;

use check::verify;
use run::{Fate, Run};
use workload::{ACTIVITIES, SHUTDOWN, WORKFLOWS};

/// The worker SIGKILLed, once a fifth of the activities have started.
const KILLED: u32 = 1;
const KILL_AT: u64 = ACTIVITIES / 5;

/// The worker stopped with SIGTERM, once nine twentieths have started.
const STOPPED: u32 = 2;
const STOP_AT: u64 = ACTIVITIES * 9 / 20;

/// The worker left running to the end.
const SURVIVOR: u32 = 3;

/// How long each stage may take before the test gives up. Generous: the machine is
/// shared and slow, and running out means work was lost or stuck.
const STAGE: Duration = Duration::from_secs(90);

/// How long a worker may take to exit after SIGTERM: its shutdown timeout, plus the
/// time to start and end a process on a loaded machine.
const STOP_BOUND: Duration = Duration::from_secs(SHUTDOWN.as_secs() + 5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_and_a_client_finish_every_workflow_through_a_kill_and_a_graceful_stop()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let backend = run::test_backend(dir.path(), "keel_scale").await?;
    eprintln!("scale: {WORKFLOWS} workflows on {backend:?}");
    let mut run = Run::start(&backend, dir.path(), 3).await?;

    run.progress_to(KILL_AT, STAGE).await?;
    run.kill(KILLED)?;
    eprintln!(
        "scale: worker {KILLED} SIGKILLed at {:.1?}, {} activity attempts in",
        run.elapsed(),
        run.activity_starts()?
    );

    run.progress_to(STOP_AT, STAGE).await?;
    let at = run.elapsed();
    let starts = run.activity_starts()?;
    let took = run.stop(STOPPED, STOP_BOUND).await?;
    eprintln!(
        "scale: worker {STOPPED} sent SIGTERM at {at:.1?}, {starts} activity attempts in; \
         it exited cleanly {took:.1?} later"
    );

    let summary = run.finish(STAGE).await?;
    let finished = run.elapsed();
    eprintln!("scale: {summary}");
    eprintln!("scale: the client finished at {finished:.1?}");

    let logs = run.logs();
    let fates = run.fates();
    let took_in_all = run.elapsed();
    // The survivor has nothing left to do: end it before the checks read the store.
    drop(run);

    let report = verify(&backend, &logs).await?;
    eprintln!("scale: {}", report.summary());
    // Attempts the stopped worker started after SIGTERM: work it had claimed already.
    if let Some(Fate::Stopped(sent, _)) = fates.get(&STOPPED) {
        let attempts = check::read_attempts(&logs)?;
        let late = attempts
            .iter()
            .filter(|a| a.worker == STOPPED && a.at > *sent)
            .count();
        eprintln!("scale: worker {STOPPED} started {late} activity attempts after SIGTERM");
    }
    report.ensure_clean()?;
    ensure!(
        report
            .per_worker
            .keys()
            .copied()
            .eq([KILLED, STOPPED, SURVIVOR]),
        "activity logs of workers {:?}",
        report.per_worker.keys()
    );
    for (worker, count) in &report.per_worker {
        ensure!(
            *count > 0,
            "worker {worker} ran no activity: the work was not spread ({})",
            report.summary()
        );
    }
    // A graceful stop lets running activities finish and record their results: none
    // that the stopped worker began may have had to run again elsewhere.
    ensure!(
        !report.repeated_after.contains_key(&STOPPED),
        "activities begun by worker {STOPPED} ran again after its graceful stop ({})",
        report.summary()
    );
    ensure!(
        report.signals_before_wait > 0 && report.signals_while_waiting > 0,
        "signals were not sent both before and during the wait ({})",
        report.summary()
    );
    run::drop_backend(&backend).await?;
    eprintln!("scale: passed; the run took {took_in_all:.1?} from the client's start");
    Ok(())
}
