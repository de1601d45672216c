//! `cargo xtask bench`: builds the harness in release mode, then runs it.
//!
//! The build is a separate step so its time is printed apart from the run's: on
//! this 2-core machine a cold release build takes minutes, and `--quick`'s promise
//! (under two minutes) is about the run alone.

use std::ffi::OsString;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, Result};

use crate::command::{cargo, run};
use crate::services;

/// The package and binary of the harness.
const PACKAGE: &str = "keel-benches";
const BINARY: &str = "keel-bench";

/// Builds the harness in release mode and runs it with `args` (`--quick`,
/// `--backend LIST`, `--workload LIST`, `--runs N`, which the harness parses).
pub(crate) fn bench(root: &Path, args: &[OsString]) -> Result<()> {
    let began = Instant::now();
    run(cargo(root).args(["build", "--release", "--package", PACKAGE, "--bin", BINARY]))
        .context("could not build the bench harness")?;
    eprintln!(
        "bench: release build took {:.1} s",
        began.elapsed().as_secs_f64()
    );

    // The PostgreSQL backends need their services; without them the harness skips
    // those backends and says so, so a machine without PostgreSQL can still bench SQLite.
    if let Err(error) = services::ensure() {
        eprintln!("bench: {error:#}; the backends needing it will be skipped");
    }

    let began = Instant::now();
    // `cargo run` again: the build is fresh, so this only starts the binary, and cargo
    // sets `CARGO_MANIFEST_DIR`, which the harness uses to find the workspace.
    run(cargo(root)
        .args([
            "run",
            "--quiet",
            "--release",
            "--package",
            PACKAGE,
            "--bin",
            BINARY,
            "--",
        ])
        .args(args))
    .context("the bench harness failed")?;
    eprintln!("bench: run took {:.1} s", began.elapsed().as_secs_f64());
    Ok(())
}
