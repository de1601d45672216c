//! What a workload run measures: named values with units.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

/// The unit of a measured value, for formatting and for the JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Unit {
    /// Events per second.
    PerSecond,
    /// Milliseconds.
    Millis,
    /// Seconds.
    Seconds,
    /// Mebibytes.
    Megabytes,
    /// A dimensionless ratio.
    Ratio,
    /// A plain count.
    Count,
}

impl Unit {
    /// `value` in this unit, as the table shows it.
    pub(crate) fn format(self, value: f64) -> String {
        if value.is_nan() {
            return "-".to_owned();
        }
        match self {
            Self::PerSecond => format!("{}/s", thousands(value)),
            Self::Millis => format!("{value:.2} ms"),
            Self::Seconds => format!("{value:.2} s"),
            Self::Megabytes => format!("{value:.0} MB"),
            Self::Ratio => format!("{value:.2}x"),
            Self::Count => thousands(value),
        }
    }
}

/// `value` rounded, with thousands separated by commas.
pub(crate) fn thousands(value: f64) -> String {
    let rounded = format!("{:.0}", value.abs());
    let mut out = String::new();
    for (i, digit) in rounded.chars().enumerate() {
        if i > 0 && (rounded.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    if value < 0.0 { format!("-{out}") } else { out }
}

/// The names of the values workloads measure, shared by the workloads, the targets and
/// the report.
pub(crate) mod key {
    /// Workflows completed per second in the measurement window.
    pub(crate) const WORKFLOWS_PER_S: &str = "workflows_per_s";
    /// Activity steps completed per second in the measurement window.
    pub(crate) const STEPS_PER_S: &str = "activity_steps_per_s";
    /// Steps per second over the same run's single-row commit rate.
    pub(crate) const STEPS_PER_COMMIT: &str = "steps_per_single_row_commit";
    /// Median workflow start-to-result time under load.
    pub(crate) const WORKFLOW_P50_MS: &str = "workflow_p50_ms";
    /// Start-to-result latency percentiles.
    pub(crate) const P50_MS: &str = "p50_ms";
    /// The 95th percentile.
    pub(crate) const P95_MS: &str = "p95_ms";
    /// The 99th percentile.
    pub(crate) const P99_MS: &str = "p99_ms";
    /// Schedule-to-start percentiles of the activity.
    pub(crate) const SCHEDULE_TO_START_P50_MS: &str = "schedule_to_start_p50_ms";
    /// The 99th percentile of schedule-to-start.
    pub(crate) const SCHEDULE_TO_START_P99_MS: &str = "schedule_to_start_p99_ms";
    /// How many samples a latency figure has.
    pub(crate) const SAMPLES: &str = "samples";
    /// Wall time to complete one workflow.
    pub(crate) const COMPLETE_S: &str = "complete_s";
    /// The process's peak resident memory during the workload.
    pub(crate) const PEAK_RSS_MB: &str = "peak_rss_mb";
    /// Mean time per step over the first 100 steps.
    pub(crate) const FIRST_100_MS: &str = "first_100_step_ms";
    /// Mean time per step over the last 100 steps.
    pub(crate) const LAST_100_MS: &str = "last_100_step_ms";
    /// Last-100 step cost over first-100 step cost.
    pub(crate) const LAST_OVER_FIRST: &str = "last_over_first";
    /// How many workflows (or activities) the workload had.
    pub(crate) const SIZE: &str = "size";
    /// Resident memory before the workload began: the runtime and the open store of
    /// the process the workload runs in (a fresh one, so nothing of earlier workloads).
    pub(crate) const BASELINE_RSS_MB: &str = "baseline_rss_mb";
    /// Time to start every sleeper and see it parked.
    pub(crate) const SETUP_S: &str = "setup_s";
    /// The part of the setup spent starting the sleepers (the rest is first turns).
    pub(crate) const STARTS_S: &str = "starts_s";
    /// Resident memory while every sleeper is parked.
    pub(crate) const PARKED_RSS_MB: &str = "parked_rss_mb";
    /// Time for all due timers to complete their workflows.
    pub(crate) const STORM_S: &str = "storm_s";
    /// Timers drained per second in the wake storm.
    pub(crate) const TIMERS_PER_S: &str = "timers_per_s";
    /// Single-row autocommit transactions per second.
    pub(crate) const SINGLE_ROW_COMMITS_PER_S: &str = "single_row_commits_per_s";
    /// Rows per second inserted in 100-row transactions.
    pub(crate) const BATCHED_ROWS_PER_S: &str = "rows_per_s_in_100_row_tx";

    /// Every key, in the order reports show them: the headline first.
    pub(crate) const ALL: [&str; 24] = [
        SIZE,
        STEPS_PER_S,
        STEPS_PER_COMMIT,
        WORKFLOWS_PER_S,
        WORKFLOW_P50_MS,
        SAMPLES,
        P50_MS,
        P95_MS,
        P99_MS,
        SCHEDULE_TO_START_P50_MS,
        SCHEDULE_TO_START_P99_MS,
        COMPLETE_S,
        PEAK_RSS_MB,
        BASELINE_RSS_MB,
        FIRST_100_MS,
        LAST_100_MS,
        LAST_OVER_FIRST,
        SETUP_S,
        STARTS_S,
        PARKED_RSS_MB,
        STORM_S,
        TIMERS_PER_S,
        SINGLE_ROW_COMMITS_PER_S,
        BATCHED_ROWS_PER_S,
    ];
}

/// The values one run of a workload measured; a child process hands it to the
/// harness as JSON (see [`crate::isolate`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Outcome {
    /// Each value by its key, with its unit.
    #[serde(deserialize_with = "known_keys")]
    pub(crate) values: BTreeMap<&'static str, (Unit, f64)>,
    /// Remarks for the reader (a setup that overran, a skipped measurement).
    pub(crate) notes: Vec<String>,
}

impl Outcome {
    /// Records `value` under `key`.
    pub(crate) fn set(&mut self, key: &'static str, unit: Unit, value: f64) -> &mut Self {
        self.values.insert(key, (unit, value));
        self
    }

    /// The value under `key`, if measured.
    pub(crate) fn get(&self, key: &str) -> Option<f64> {
        self.values.get(key).map(|&(_, value)| value)
    }
}

/// Reads [`Outcome::values`] back: each name must be one of [`key::ALL`], and a
/// value JSON could not hold (NaN, which it writes as `null`) is NaN again.
fn known_keys<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<&'static str, (Unit, f64)>, D::Error> {
    let named = BTreeMap::<String, (Unit, Option<f64>)>::deserialize(deserializer)?;
    named
        .into_iter()
        .map(|(name, (unit, value))| {
            let key = key::ALL
                .into_iter()
                .find(|key| *key == name)
                .ok_or_else(|| serde::de::Error::custom(format!("unknown value `{name}`")))?;
            Ok((key, (unit, value.unwrap_or(f64::NAN))))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_through_json() {
        let mut outcome = Outcome::default();
        outcome.set(key::PARKED_RSS_MB, Unit::Megabytes, 76.5);
        outcome.set(key::P99_MS, Unit::Millis, f64::NAN);
        outcome.notes.push("a remark".to_owned());
        let json = serde_json::to_string(&outcome).expect("serializes");
        let back: Outcome = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(back.values[key::PARKED_RSS_MB], (Unit::Megabytes, 76.5));
        assert!(back.get(key::P99_MS).is_some_and(f64::is_nan));
        assert_eq!(back.notes, outcome.notes);

        let unknown = json.replace(key::PARKED_RSS_MB, "no_such_value");
        assert!(serde_json::from_str::<Outcome>(&unknown).is_err());
    }

    #[test]
    fn every_key_once() {
        let mut keys = key::ALL.to_vec();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), key::ALL.len());
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0.4), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(12_345.6), "12,346");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
    }
}
