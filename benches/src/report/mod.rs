//! Turning the results into a table on stdout, JSON and an SVG chart under
//! `target/keel-bench/`, and `docs/benchmarks.md`.

mod chart;
mod docs;
mod table;
mod targets;

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};

pub(crate) use chart::write as write_chart;
pub(crate) use docs::write as write_docs;
pub(crate) use table::print as print_table;
pub(crate) use targets::{Check, checks};

use crate::metric::{Outcome, Unit, key};
use crate::results::{Report, Series};

/// Writes `<timestamp>.json` and `latest.json` into `dir`; returns the first's path.
pub(crate) fn write_json(report: &Report, dir: &Path) -> Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("could not create {}", dir.display()))?;
    let json = serde_json::to_string_pretty(report)?;
    let stamped = dir.join(format!("{}.json", report.timestamp.replace(':', "-")));
    for path in [&stamped, &dir.join("latest.json")] {
        std::fs::write(path, &json)
            .with_context(|| format!("could not write {}", path.display()))?;
    }
    Ok(stamped)
}

/// `time` as `YYYY-MM-DDTHH:MM:SSZ`.
pub(crate) fn timestamp(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3_600,
        rest % 3_600 / 60,
        rest % 60
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's algorithm,
/// for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// The commit being measured, with `-dirty` if the tree has changes.
pub(crate) fn git_commit() -> Option<String> {
    let run = |args: &[&str]| {
        let output = std::process::Command::new("git").args(args).output().ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    };
    let commit = run(&["rev-parse", "--short=12", "HEAD"])?;
    let dirty =
        run(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    })
}

/// How the table names a value.
fn label(key: &str) -> &str {
    match key {
        key::STEPS_PER_S => "steps",
        key::WORKFLOWS_PER_S => "workflows",
        key::STEPS_PER_COMMIT => "single-row commit rate",
        key::WORKFLOW_P50_MS => "workflow p50",
        key::P50_MS => "p50",
        key::P95_MS => "p95",
        // Schedule-to-start's p99 follows its p50, which names it.
        key::P99_MS | key::SCHEDULE_TO_START_P99_MS => "p99",
        key::SCHEDULE_TO_START_P50_MS => "schedule-to-start p50",
        key::SAMPLES => "samples",
        key::COMPLETE_S => "completed in",
        key::PEAK_RSS_MB => "peak RSS",
        key::FIRST_100_MS => "first-100 step",
        key::LAST_100_MS => "last-100 step",
        key::LAST_OVER_FIRST => "last/first",
        key::SIZE => "size",
        key::SETUP_S => "setup",
        key::PARKED_RSS_MB => "parked RSS",
        key::STARTS_S => "of which starts",
        key::BASELINE_RSS_MB => "RSS before",
        key::STORM_S => "storm",
        key::TIMERS_PER_S => "timers",
        key::SINGLE_ROW_COMMITS_PER_S => "single-row commits",
        key::BATCHED_ROWS_PER_S => "rows in 100-row tx",
        other => other,
    }
}

/// Values as one line: `steps 12,345/s · 1.52x single-row commit rate · …`.
fn line<'a>(values: impl Iterator<Item = (&'a str, Unit, f64)>) -> String {
    let mut values: Vec<_> = values.collect();
    values.sort_by_key(|(name, ..)| {
        key::ALL
            .iter()
            .position(|k| k == name)
            .unwrap_or(key::ALL.len())
    });
    let shown: Vec<String> = values
        .into_iter()
        .map(|(key, unit, value)| match key {
            // The ratio reads best right after the rate it divides.
            key::STEPS_PER_COMMIT => format!("{} {}", unit.format(value), label(key)),
            _ => format!("{} {}", label(key), unit.format(value)),
        })
        .collect();
    shown.join(" · ")
}

/// One run's values as one line.
pub(crate) fn figures(outcome: &Outcome) -> String {
    line(
        outcome
            .values
            .iter()
            .map(|(key, (unit, value))| (*key, *unit, *value)),
    )
}

/// A series' medians as one line.
pub(crate) fn median_figures(series: &Series) -> String {
    line(series.median.iter().map(|(key, value)| {
        let unit = series.units.get(key).copied().unwrap_or(Unit::Count);
        (*key, unit, *value)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let leap_day = UNIX_EPOCH + std::time::Duration::from_secs(1_709_210_096);
        assert_eq!(timestamp(leap_day), "2024-02-29T12:34:56Z");
    }
}
