//! The `deny` step: cargo-deny against the offline RustSec snapshot.
//!
//! The machines reach crates.io but not GitHub, so cargo-deny cannot fetch the
//! advisory database. `../shared/advisory-db` holds a snapshot of it (see its
//! SNAPSHOT.md); cargo-deny reads a database only as a git repository, so we
//! turn a copy of the snapshot into one under `target/`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::command::{cargo, run};

/// The directory cargo-deny opens inside `db-path` for the default RustSec URL
/// (the suffix is a hash of that URL).
const DB_DIR: &str = "advisory-db-3157b0e258782691";

/// The variable `deny.toml`'s `db-path` expands, so that cargo-deny finds the
/// database whichever directory it resolves relative paths against (its cwd).
const DB_PATH_VAR: &str = "KEEL_ADVISORY_DBS";

/// Installs cargo-deny if needed, prepares the advisory database, and runs
/// every cargo-deny check without network access.
pub(crate) fn check(root: &Path) -> Result<()> {
    ensure_installed(root)?;
    let db_path = root.join("target").join("advisory-dbs");
    prepare_db(root, &db_path)?;
    // `--offline` below also keeps cargo from downloading crates, so fetch them now.
    run(cargo(root).arg("fetch"))?;
    run(cargo(root)
        .args(["deny", "--offline", "check"])
        .env(DB_PATH_VAR, &db_path))
}

/// Installs cargo-deny unless `cargo deny --version` works.
fn ensure_installed(root: &Path) -> Result<()> {
    let installed = cargo(root)
        .args(["deny", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !installed {
        eprintln!("cargo-deny is missing; installing it with `cargo install cargo-deny --locked`");
        run(cargo(root).args(["install", "cargo-deny", "--locked"]))?;
    }
    Ok(())
}

/// Makes `<db_path>/<DB_DIR>` a git repository holding the snapshot, committed
/// at the snapshot's date because cargo-deny reports that as the database's age.
fn prepare_db(root: &Path, db_path: &Path) -> Result<()> {
    let snapshot = snapshot_dir(root)?;
    let notes_path = snapshot.join("SNAPSHOT.md");
    let notes = fs::read_to_string(&notes_path)
        .with_context(|| format!("could not read {}", notes_path.display()))?;
    let repo = db_path.join(DB_DIR);
    if is_prepared(&repo, &notes) {
        return Ok(());
    }

    let date = snapshot_date(&notes)
        .with_context(|| format!("no YYYY-MM-DD date in {}", notes_path.display()))?;
    eprintln!(
        "preparing the advisory database ({date} snapshot) in {}",
        repo.display()
    );
    if repo.exists() {
        // A half-made copy, or one of an older snapshot.
        fs::remove_dir_all(&repo)
            .with_context(|| format!("could not remove {}", repo.display()))?;
    }
    copy_dir(&snapshot, &repo)?;
    let timestamp = format!("{date}T00:00:00Z");
    run(git(&repo).args(["-c", "init.defaultBranch=main", "init", "--quiet"]))?;
    run(git(&repo).args(["add", "--all"]))?;
    run(git(&repo)
        .args(["-c", "user.name=keel", "-c", "user.email=keel@localhost"])
        .args(["-c", "commit.gpgsign=false", "commit", "--quiet"])
        .args([
            "-m",
            &format!("RustSec advisory database snapshot of {date}"),
        ])
        .env("GIT_AUTHOR_DATE", &timestamp)
        .env("GIT_COMMITTER_DATE", &timestamp))
}

/// The shared snapshot, `../shared/advisory-db` beside the workspace.
fn snapshot_dir(root: &Path) -> Result<PathBuf> {
    let dir = root
        .parent()
        .context("the workspace root has no parent")?
        .join("shared")
        .join("advisory-db");
    if !dir.join("SNAPSHOT.md").is_file() {
        bail!(
            "the advisory database snapshot is missing: expected {} with a SNAPSHOT.md; \
             the deny step checks advisories offline against it",
            dir.display()
        );
    }
    Ok(dir)
}

/// Whether `repo` already holds a commit of the snapshot described by `notes`.
fn is_prepared(repo: &Path, notes: &str) -> bool {
    let same_snapshot = fs::read_to_string(repo.join("SNAPSHOT.md")).is_ok_and(|n| n == notes);
    same_snapshot
        && git(repo)
            .args(["rev-parse", "--quiet", "--verify", "HEAD"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
}

/// The first `YYYY-MM-DD` in SNAPSHOT.md: the date the snapshot was taken.
fn snapshot_date(notes: &str) -> Option<&str> {
    let shape = |window: &[u8]| {
        window.iter().enumerate().all(|(i, byte)| match i {
            4 | 7 => *byte == b'-',
            _ => byte.is_ascii_digit(),
        })
    };
    let start = notes.as_bytes().windows(10).position(shape)?;
    notes.get(start..start + 10)
}

/// A git command working in `repo`.
fn git(repo: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.arg("-C").arg(repo);
    cmd
}

/// Copies the directory tree `from` to `to`, which must not exist yet.
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to).with_context(|| format!("could not create {}", to.display()))?;
    for entry in fs::read_dir(from).with_context(|| format!("could not read {}", from.display()))? {
        let entry = entry.with_context(|| format!("could not read {}", from.display()))?;
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        if source.is_dir() {
            copy_dir(&source, &target)?;
        } else {
            fs::copy(&source, &target).with_context(|| {
                format!(
                    "could not copy {} to {}",
                    source.display(),
                    target.display()
                )
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::snapshot_date;

    #[test]
    fn snapshot_date_is_the_first_date_in_the_notes() {
        let notes = "snapshot (commit bf5c0d24, 2026-08-21; data under CC0), 2027-01-01";
        assert_eq!(snapshot_date(notes), Some("2026-08-21"));
        assert_eq!(snapshot_date("no date, 2026-8-21"), None);
    }
}
