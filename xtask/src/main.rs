//! Keel's task runner, invoked as `cargo xtask <task>` through the alias in
//! `.cargo/config.toml`.
//!
//! It uses plain `std::process::Command` and parses its arguments by hand: CI
//! builds it before anything else on a 2-core machine, so every dependency would
//! be paid for on every run.

mod bench;
mod command;
mod deny;
mod services;

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, Result};

use crate::command::{cargo, run};

/// What `cargo xtask` with no or unknown arguments prints.
const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  test [-- <cargo args>]  start PostgreSQL and Redis if needed, then run every test and doctest
  bench [--quick] [--backend LIST] [--workload LIST] [--runs N]
                          build the harness in release mode and run it: table on stdout,
                          JSON and SVG in target/keel-bench/, docs/benchmarks.md after a
                          full run (`cargo xtask bench --help` for the lists)
  ci                      fmt, clippy, doc, deny, test, then `bench --quick` as a smoke test
  services                start PostgreSQL and Redis if needed and show their state
";

/// A task named on the command line.
#[derive(Debug)]
enum Task {
    /// Run the tests, passing the extra arguments on to each `cargo test`.
    Test(Vec<OsString>),
    /// Run the benchmarks, passing the arguments on to the harness.
    Bench(Vec<OsString>),
    /// Run every CI step.
    Ci,
    /// Ensure the services and report them.
    Services,
    /// Print the usage text.
    Help,
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let Some(task) = parse(&args) else {
        if !args.is_empty() {
            eprintln!("error: unknown task or arguments: {args:?}\n");
        }
        eprint!("{USAGE}");
        return ExitCode::from(2);
    };
    match execute(task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Reads the task from the arguments after `xtask`; `None` means they make no sense.
fn parse(args: &[OsString]) -> Option<Task> {
    let (task, rest) = args.split_first()?;
    match (task.to_str()?, rest) {
        ("test", []) => Some(Task::Test(Vec::new())),
        // The `--` keeps cargo's own flags apart from ours, as `cargo run --` does.
        ("test", [dashes, extra @ ..]) if dashes == "--" => Some(Task::Test(extra.to_vec())),
        // The harness checks its own arguments; a stray `--` is dropped for
        // those used to `cargo run -- <args>`.
        ("bench", [dashes, extra @ ..]) if dashes == "--" => Some(Task::Bench(extra.to_vec())),
        ("bench", extra) => Some(Task::Bench(extra.to_vec())),
        ("ci", []) => Some(Task::Ci),
        ("services", []) => Some(Task::Services),
        ("help" | "-h" | "--help", []) => Some(Task::Help),
        _ => None,
    }
}

/// Runs a task from the workspace root, whatever directory cargo was called from.
fn execute(task: Task) -> Result<()> {
    let root = workspace_root()?;
    match task {
        Task::Test(extra) => test(&root, &extra),
        Task::Bench(args) => bench::bench(&root, &args),
        Task::Ci => ci(&root),
        Task::Services => services::ensure(),
        Task::Help => {
            print!("{USAGE}");
            Ok(())
        }
    }
}

/// The workspace root: the parent of this package's directory.
///
/// `cargo run` tells us that directory at run time; the compile-time value is
/// the fallback for running the binary directly. Preferring the former keeps a
/// checkout copied together with its `target/` from acting on the original.
fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .context("xtask's manifest directory has no parent")
}

/// Ensures the services, then runs the tests and the doctests.
///
/// `--all-targets` leaves out doctests, hence the second run. Nothing is printed
/// after cargo's last summary line on success, because CI reads those lines.
fn test(root: &Path, extra: &[OsString]) -> Result<()> {
    services::ensure()?;
    run(cargo(root)
        .args(["test", "--workspace", "--all-targets"])
        .args(extra))
    .context("tests failed")?;
    run(cargo(root)
        .args(["test", "--workspace", "--doc"])
        .args(extra))
    .context("doctests failed")
}

/// Runs the CI steps in order and stops at the first that fails.
fn ci(root: &Path) -> Result<()> {
    step("fmt", || {
        run(cargo(root).args(["fmt", "--all", "--", "--check"]))
    })?;
    step("clippy", || {
        run(cargo(root).args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    step("doc", || {
        run(cargo(root)
            .args(["doc", "--workspace", "--no-deps"])
            .env("RUSTDOCFLAGS", "-D warnings"))
    })?;
    step("deny", || deny::check(root))?;
    step("test", || test(root, &[]))?;
    // A smoke test: every workload runs and checks its results, at small sizes. No
    // thresholds: the machine is shared and noisy, so figures here fail nothing.
    step("bench --quick", || {
        bench::bench(root, &[OsString::from("--quick")])
    })
}

/// Prints a header for one CI step, runs it, and names the step if it fails.
fn step(name: &str, body: impl FnOnce() -> Result<()>) -> Result<()> {
    eprintln!("\n==> ci: {name}");
    body().with_context(|| format!("ci step `{name}` failed"))
}
