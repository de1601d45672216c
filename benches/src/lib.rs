//! Keel's throughput and latency harness: the standard workload shapes on each
//! backend, each figure set against the database's own limit measured in the same run.
//!
//! Run it with `cargo xtask bench [--quick] [--backend LIST] [--workload LIST]`; the
//! `keel-bench` binary is this crate's [`main`]. See `docs/benchmarks.md` for the
//! workloads and the latest figures.

mod backend;
mod cli;
mod harness;
mod isolate;
mod limits;
mod metric;
mod progress;
mod report;
mod results;
mod stats;
mod sys;
mod workloads;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};

use crate::cli::{Args, USAGE};

/// Runs the harness with the process's arguments: prints the table, writes the JSON,
/// the chart and (after a full run) `docs/benchmarks.md`. Fails only when a workload
/// fails (a wrong result, an error), never on a missed target.
pub fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<ExitCode> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    if let Some((first, job)) = raw.split_first()
        && first == isolate::FLAG
    {
        return isolate::child(job);
    }
    let Some(args) = Args::parse(raw)? else {
        print!("{USAGE}");
        return Ok(ExitCode::SUCCESS);
    };
    let root = workspace_root()?;
    let out = root.join("target").join("keel-bench");
    if args.default_backends {
        for backend in backend::Backend::ALL {
            if let Some(reason) = backend.unavailable() {
                eprintln!("{backend}: {reason}; skipped");
            }
        }
    }
    let report = runtime()?.block_on(harness::run(&args, &out))?;

    report::print_table(&report);
    let json = report::write_json(&report, &out)?;
    let chart = out.join("latest.svg");
    report::write_chart(&report, &chart)?;
    println!(
        "\nwrote {}, {} and {}",
        json.display(),
        out.join("latest.json").display(),
        chart.display()
    );
    if args.writes_docs() {
        let docs = root.join("docs").join("benchmarks.md");
        report::write_docs(&report, &docs)?;
        println!("wrote {}", docs.display());
    }
    let failures = report.failures();
    if failures.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("\n{} workload run(s) failed:", failures.len());
    for failure in &failures {
        eprintln!("  {failure}");
    }
    Ok(ExitCode::FAILURE)
}

/// The runtime the harness and its child processes run in.
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start the tokio runtime")
}

/// The workspace root: the parent of this package's directory (as xtask finds it).
fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest_dir
        .parent()
        .map(std::path::Path::to_path_buf)
        .context("the bench package's directory has no parent")
}
