//! Runs of the workloads that measure memory, each in a fresh child process.
//!
//! The allocator keeps what a process has freed, so in one long bench process a
//! workload's resident memory includes what earlier workloads left: in a full run,
//! `sleepers` found 118–129 MB resident before it began, against 76 MB for all its
//! 100,000 parked workflows when run alone. So for each run of a workload that reads
//! the process's memory ([`Workload::reads_memory`]) the harness starts its own binary
//! again with a hidden first argument, [`FLAG`], naming the workload, backend and run.
//! The child opens a fresh store exactly as the harness would (the same SQLite file or
//! PostgreSQL schema name, dropped again afterwards), does that one run, and writes its
//! [`Outcome`] (or its error) to stdout as one line of JSON; the parent records it like
//! any other run. The child draws no progress bars (the parent's overall bar ticks on
//! while it waits) and writes to the parent's stderr.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context as _, Result, bail};

use crate::backend::Backend;
use crate::harness;
use crate::metric::Outcome;
use crate::progress::Progress;
use crate::workloads::{Sizes, Workload};

/// The hidden first argument that makes `keel-bench` a child doing one run:
/// `--isolated-run WORKLOAD BACKEND RUN SCRATCH [--quick]`.
pub(crate) const FLAG: &str = "--isolated-run";

/// One run to do in a child process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Job {
    /// The workload, one of them.
    pub(crate) workload: Workload,
    /// The backend its fresh store is on.
    pub(crate) backend: Backend,
    /// Which run this is, from 1: part of the store's name.
    pub(crate) run: usize,
    /// Whether the sizes are `--quick`'s.
    pub(crate) quick: bool,
    /// Where SQLite files go.
    pub(crate) scratch: PathBuf,
}

impl Job {
    /// The arguments that make a child do this run.
    fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            FLAG.into(),
            self.workload.to_string().into(),
            self.backend.name().into(),
            self.run.to_string().into(),
            self.scratch.clone().into(),
        ];
        if self.quick {
            args.push("--quick".into());
        }
        args
    }

    /// The run that the arguments after [`FLAG`] name.
    fn parse(args: &[String]) -> Result<Self> {
        let [workload, backend, run, scratch, rest @ ..] = args else {
            bail!("{FLAG} needs WORKLOAD BACKEND RUN SCRATCH [--quick], got {args:?}");
        };
        let Some(&[workload]) = Workload::parse(workload).as_deref() else {
            bail!("{FLAG}: `{workload}` is not one workload");
        };
        let backend = Backend::parse(backend)
            .with_context(|| format!("{FLAG}: unknown backend `{backend}`"))?;
        let run = run
            .parse()
            .with_context(|| format!("{FLAG}: run `{run}` is not a number"))?;
        let quick = match rest {
            [] => false,
            [flag] if flag == "--quick" => true,
            _ => bail!("{FLAG}: unexpected {rest:?} after the scratch directory"),
        };
        Ok(Self {
            workload,
            backend,
            run,
            quick,
            scratch: PathBuf::from(scratch),
        })
    }
}

/// Does `job` in a child process and returns what it measured; fails, naming the
/// workload, backend and the child's exit status, when the child does.
pub(crate) async fn run(job: Job) -> Result<Outcome> {
    let what = format!(
        "{} on {} (run {}) in a child process",
        job.workload, job.backend, job.run
    );
    let exe = std::env::current_exe().context("could not find the bench binary to start again")?;
    let mut command = Command::new(&exe);
    command
        .args(job.args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // Blocking, on a thread of its own, so the progress bar keeps ticking.
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .context("the thread waiting for the child process failed")?
        .with_context(|| format!("could not start {} for {what}", exe.display()))?;
    let status = output.status;
    let reported: Option<Result<Outcome, String>> = serde_json::from_slice(&output.stdout).ok();
    match reported {
        Some(Ok(outcome)) if status.success() => Ok(outcome),
        Some(Err(error)) => bail!("{what} failed ({status}): {error}"),
        Some(Ok(_)) => bail!("{what} reported its figures but then exited with {status}"),
        None => {
            bail!("{what} exited with {status} without reporting an outcome (its stderr is above)")
        }
    }
}

/// The child's side: does the run that `args` (after [`FLAG`]) names and writes its
/// outcome, or its error, to stdout. Fails with the run.
pub(crate) fn child(args: &[String]) -> Result<ExitCode> {
    let job = Job::parse(args)?;
    let sizes = if job.quick {
        Sizes::quick()
    } else {
        Sizes::full()
    };
    let progress = Progress::hidden();
    let measured = crate::runtime()?.block_on(harness::run_once(
        job.workload,
        job.backend,
        &sizes,
        &job.scratch,
        job.run,
        &progress,
    ));
    let code = if measured.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    };
    let reported: Result<Outcome, String> = measured.map_err(|error| format!("{error:#}"));
    println!("{}", serde_json::to_string(&reported)?);
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_through_arguments() {
        let job = Job {
            workload: Workload::Fanout(10_000),
            backend: Backend::PostgresRedis,
            run: 2,
            quick: true,
            scratch: PathBuf::from("/tmp/keel bench/scratch"),
        };
        let args: Vec<String> = job
            .args()
            .into_iter()
            .map(|arg| arg.into_string().expect("UTF-8"))
            .collect();
        assert_eq!(args[0], FLAG);
        assert_eq!(Job::parse(&args[1..]).expect("parses"), job);

        let full = Job {
            quick: false,
            workload: Workload::Sleepers,
            ..job
        };
        let args: Vec<String> = full
            .args()
            .into_iter()
            .map(|arg| arg.into_string().expect("UTF-8"))
            .collect();
        assert_eq!(Job::parse(&args[1..]).expect("parses"), full);
    }

    #[test]
    fn rejects_what_is_not_one_run() {
        let words = |words: &[&str]| words.iter().map(|w| (*w).to_owned()).collect::<Vec<_>>();
        assert!(Job::parse(&words(&["sleepers", "sqlite-normal", "1"])).is_err());
        assert!(Job::parse(&words(&["fanout", "sqlite-normal", "1", "/tmp"])).is_err());
        assert!(Job::parse(&words(&["sleepers", "mysql", "1", "/tmp"])).is_err());
        assert!(Job::parse(&words(&["sleepers", "postgres", "one", "/tmp"])).is_err());
        assert!(Job::parse(&words(&["sleepers", "postgres", "1", "/tmp", "-q"])).is_err());
    }
}
