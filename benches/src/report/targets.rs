//! The targets for this 2-core machine, checked against the medians. A miss
//! is reported, never turned into a failing exit: the machine is shared and noisy.

use serde::Serialize;

use crate::metric::{Unit, key};
use crate::results::Report;

/// Which side of the threshold passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Bound {
    /// The value must reach the threshold.
    AtLeast,
    /// The value must stay within the threshold.
    AtMost,
}

/// One target of the issue.
#[derive(Debug)]
struct Target {
    /// The backends it applies to.
    backends: &'static [&'static str],
    /// The workload it reads.
    workload: &'static str,
    /// The value it reads.
    key: &'static str,
    /// The value's unit.
    unit: Unit,
    /// Which side passes.
    bound: Bound,
    /// The threshold.
    threshold: f64,
    /// What it says, for the table.
    text: &'static str,
}

/// Both SQLite durabilities, for targets "on SQLite".
const SQLITE: &[&str] = &["sqlite-full", "sqlite-normal"];
/// Every backend, for targets that do not name one.
const ANY: &[&str] = &["sqlite-full", "sqlite-normal", "postgres", "postgres-redis"];

/// The targets, in the order.
const TARGETS: &[Target] = &[
    Target {
        backends: &["sqlite-full"],
        workload: "linear-3",
        key: key::STEPS_PER_S,
        unit: Unit::PerSecond,
        bound: Bound::AtLeast,
        threshold: 10_000.0,
        text: "activity steps/s",
    },
    Target {
        backends: &["sqlite-full"],
        workload: "linear-3",
        key: key::STEPS_PER_COMMIT,
        unit: Unit::Ratio,
        bound: Bound::AtLeast,
        threshold: 1.5,
        text: "steps/s over single-row commits/s",
    },
    Target {
        backends: &["sqlite-full"],
        workload: "fanout-5",
        key: key::STEPS_PER_S,
        unit: Unit::PerSecond,
        bound: Bound::AtLeast,
        threshold: 10_000.0,
        text: "activity steps/s",
    },
    Target {
        backends: &["sqlite-full"],
        workload: "fanout-5",
        key: key::STEPS_PER_COMMIT,
        unit: Unit::Ratio,
        bound: Bound::AtLeast,
        threshold: 1.5,
        text: "steps/s over single-row commits/s",
    },
    Target {
        backends: &["sqlite-full"],
        workload: "latency",
        key: key::P50_MS,
        unit: Unit::Millis,
        bound: Bound::AtMost,
        threshold: 2.0,
        text: "1-activity latency p50",
    },
    Target {
        backends: &["sqlite-full"],
        workload: "latency",
        key: key::P99_MS,
        unit: Unit::Millis,
        bound: Bound::AtMost,
        threshold: 10.0,
        text: "1-activity latency p99",
    },
    Target {
        backends: &["postgres"],
        workload: "linear-3",
        key: key::STEPS_PER_S,
        unit: Unit::PerSecond,
        bound: Bound::AtLeast,
        threshold: 5_000.0,
        text: "activity steps/s",
    },
    Target {
        backends: &["postgres-redis"],
        workload: "latency",
        key: key::P50_MS,
        unit: Unit::Millis,
        bound: Bound::AtMost,
        threshold: 5.0,
        text: "1-activity latency p50",
    },
    Target {
        backends: &["postgres-redis"],
        workload: "latency",
        key: key::P99_MS,
        unit: Unit::Millis,
        bound: Bound::AtMost,
        threshold: 25.0,
        text: "1-activity latency p99",
    },
    Target {
        backends: ANY,
        workload: "long-history",
        key: key::LAST_OVER_FIRST,
        unit: Unit::Ratio,
        bound: Bound::AtMost,
        threshold: 1.5,
        text: "last-100 / first-100 step cost",
    },
    Target {
        backends: SQLITE,
        workload: "fanout-10000",
        key: key::COMPLETE_S,
        unit: Unit::Seconds,
        bound: Bound::AtMost,
        threshold: 5.0,
        text: "time to complete",
    },
    Target {
        backends: SQLITE,
        workload: "fanout-10000",
        key: key::PEAK_RSS_MB,
        unit: Unit::Megabytes,
        bound: Bound::AtMost,
        threshold: 300.0,
        text: "peak RSS",
    },
    Target {
        backends: ANY,
        workload: "sleepers",
        key: key::PARKED_RSS_MB,
        unit: Unit::Megabytes,
        bound: Bound::AtMost,
        threshold: 100.0,
        text: "worker RSS while parked",
    },
    Target {
        backends: ANY,
        workload: "sleepers",
        key: key::TIMERS_PER_S,
        unit: Unit::PerSecond,
        bound: Bound::AtLeast,
        threshold: 5_000.0,
        text: "wake storm timers/s",
    },
];

/// A target checked against a measured median.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Check {
    /// The backend.
    pub(crate) backend: String,
    /// The workload.
    pub(crate) workload: String,
    /// What the target is about.
    pub(crate) target: String,
    /// The value read.
    pub(crate) key: String,
    /// Its unit.
    pub(crate) unit: Unit,
    /// Which side passes.
    pub(crate) bound: Bound,
    /// The threshold.
    pub(crate) threshold: f64,
    /// The median measured.
    pub(crate) measured: f64,
    /// How the measurement compares: above 1 is better than the target, whichever
    /// the bound (threshold / measured for an upper bound).
    pub(crate) margin: f64,
    /// Whether it was met.
    pub(crate) pass: bool,
}

impl Check {
    /// `>= 10,000/s` or `<= 2.00 ms`.
    pub(crate) fn requirement(&self) -> String {
        let sign = match self.bound {
            Bound::AtLeast => ">=",
            Bound::AtMost => "<=",
        };
        format!("{sign} {}", self.unit.format(self.threshold))
    }

    /// `PASS` or `MISS`.
    pub(crate) fn verdict(&self) -> &'static str {
        if self.pass { "PASS" } else { "MISS" }
    }
}

/// Every target whose backend and workload ran, checked.
pub(crate) fn checks(report: &Report) -> Vec<Check> {
    let mut checks = Vec::new();
    for target in TARGETS {
        for backend in target.backends {
            let Some(series) = report.series(backend, target.workload) else {
                continue;
            };
            let Some(measured) = series.get(target.key) else {
                continue;
            };
            let (pass, margin) = match target.bound {
                Bound::AtLeast => (measured >= target.threshold, measured / target.threshold),
                Bound::AtMost => (measured <= target.threshold, target.threshold / measured),
            };
            checks.push(Check {
                backend: (*backend).to_owned(),
                workload: target.workload.to_owned(),
                target: target.text.to_owned(),
                key: target.key.to_owned(),
                unit: target.unit,
                bound: target.bound,
                threshold: target.threshold,
                measured,
                margin,
                pass,
            });
        }
    }
    checks
}
