//! The loop: for each backend, each run measures the database's limits and then every
//! workload on a fresh store, so every figure has a same-run reference. A workload
//! that measures memory runs in a fresh process as well (see [`crate::isolate`]), so
//! its figures hold nothing that earlier workloads left in this one.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, Result};

use crate::backend::Backend;
use crate::cli::Args;
use crate::isolate::{self, Job};
use crate::limits;
use crate::metric::{Outcome, Unit, key};
use crate::progress::Progress;
use crate::report;
use crate::results::{BackendReport, Report, Series};
use crate::sys::Machine;
use crate::workloads::{Sizes, Workload};

/// Runs what `args` asks for and gathers the report; `out` holds scratch databases.
pub(crate) async fn run(args: &Args, out: &Path) -> Result<Report> {
    let began = Instant::now();
    let timestamp = report::timestamp(std::time::SystemTime::now());
    let scratch = out.join("scratch");
    std::fs::create_dir_all(&scratch)
        .with_context(|| format!("could not create {}", scratch.display()))?;
    let sizes = if args.quick {
        Sizes::quick()
    } else {
        Sizes::full()
    };
    // Probed once, so the bar's length and the report agree.
    let backends: Vec<(Backend, Option<String>)> = args
        .backends
        .iter()
        .map(|&b| (b, b.unavailable()))
        .collect();
    let available = backends.iter().filter(|(_, why)| why.is_none()).count();
    let total = available * args.runs * (args.workloads.len() + 1);
    let progress = Progress::new(total as u64);

    let mut reports = Vec::new();
    for (backend, why) in backends {
        let report = match why {
            Some(reason) => unavailable(backend, &reason, &progress),
            None => measure(backend, args, &sizes, &scratch, &progress).await,
        };
        reports.push(report);
    }
    progress.finish();
    let _ = std::fs::remove_dir(&scratch);

    let mut report = Report {
        timestamp,
        command: args.command(),
        quick: args.quick,
        runs: args.runs,
        machine: Machine::detect(),
        commit: report::git_commit(),
        backends: reports,
        targets: Vec::new(),
        elapsed_s: 0.0,
    };
    report.targets = report::checks(&report);
    report.elapsed_s = began.elapsed().as_secs_f64();
    Ok(report)
}

/// A backend asked for whose services do not answer: says so, with no figures.
fn unavailable(backend: Backend, reason: &str, progress: &Progress) -> BackendReport {
    progress.println(&format!("{backend}: {reason}"));
    BackendReport {
        name: backend.name().to_owned(),
        available: false,
        note: Some(reason.to_owned()),
        limits: None,
        workloads: Vec::new(),
    }
}

/// Every run of every workload on `backend`.
async fn measure(
    backend: Backend,
    args: &Args,
    sizes: &Sizes,
    scratch: &Path,
    progress: &Progress,
) -> BackendReport {
    let mut limits = Series::new("limits");
    let mut series: Vec<Series> = args
        .workloads
        .iter()
        .map(|w| Series::new(w.to_string()))
        .collect();
    for run in 1..=args.runs {
        progress.set_stage(format!(
            "{backend} run {run}/{}: database limits",
            args.runs
        ));
        let commit_rate = match limits::measure(backend, scratch, sizes.limit_duration).await {
            Ok(outcome) => {
                let rate = outcome.get(key::SINGLE_ROW_COMMITS_PER_S);
                progress.done(&format!(
                    "{backend} run {run}: database limit {} single-row commits, {} rows in 100-row transactions",
                    Unit::PerSecond.format(rate.unwrap_or(f64::NAN)),
                    Unit::PerSecond.format(outcome.get(key::BATCHED_ROWS_PER_S).unwrap_or(f64::NAN)),
                ));
                limits.push(outcome);
                rate
            }
            Err(error) => {
                progress.done(&format!(
                    "{backend} run {run}: database limits FAILED: {error:#}"
                ));
                limits.errors.push(format!("run {run}: {error:#}"));
                None
            }
        };
        for (&workload, series) in args.workloads.iter().zip(&mut series) {
            let measured = if workload.reads_memory() {
                progress.set_stage(format!(
                    "{backend} run {run}/{}: {workload} (in its own process)",
                    args.runs
                ));
                let job = Job {
                    workload,
                    backend,
                    run,
                    quick: args.quick,
                    scratch: scratch.to_owned(),
                };
                isolate::run(job).await
            } else {
                progress.set_stage(format!("{backend} run {run}/{}: {workload}", args.runs));
                run_once(workload, backend, sizes, scratch, run, progress).await
            };
            match measured {
                Ok(mut outcome) => {
                    if let (Some(steps), Some(commits)) =
                        (outcome.get(key::STEPS_PER_S), commit_rate)
                    {
                        outcome.set(key::STEPS_PER_COMMIT, Unit::Ratio, steps / commits);
                    }
                    progress.done(&format!(
                        "{backend} run {run}: {workload}: {}",
                        report::figures(&outcome)
                    ));
                    series.push(outcome);
                }
                Err(error) => {
                    progress.done(&format!(
                        "{backend} run {run}: {workload} FAILED: {error:#}"
                    ));
                    series.errors.push(format!("run {run}: {error:#}"));
                }
            }
        }
    }
    BackendReport {
        name: backend.name().to_owned(),
        available: true,
        note: None,
        limits: Some(limits),
        workloads: series,
    }
}

/// Run `run` of `workload` on a fresh store of `backend`, closed afterwards; here or,
/// for [`isolate::run`], in a child process.
pub(crate) async fn run_once(
    workload: Workload,
    backend: Backend,
    sizes: &Sizes,
    scratch: &Path,
    run: usize,
    progress: &Progress,
) -> Result<Outcome> {
    let store = backend.open(scratch, &format!("{workload}-{run}")).await?;
    let measured = workload.run(&store, sizes, progress).await;
    let closed = store.close().await;
    measured.and_then(|outcome| closed.map(|()| outcome))
}
