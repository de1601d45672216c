//! What an invocation measured: per backend, the database's limits and each
//! workload's runs with their medians. This is what the JSON holds.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::metric::{Outcome, Unit};
use crate::stats::median;
use crate::sys::Machine;

/// Everything one invocation measured.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    /// When the run began, UTC, ISO 8601.
    pub(crate) timestamp: String,
    /// The command that produced it.
    pub(crate) command: String,
    /// Whether the sizes were `--quick`'s.
    pub(crate) quick: bool,
    /// Runs of each workload.
    pub(crate) runs: usize,
    /// Where it ran.
    pub(crate) machine: Machine,
    /// The commit measured, if git knows it.
    pub(crate) commit: Option<String>,
    /// Per backend, in the order asked for.
    pub(crate) backends: Vec<BackendReport>,
    /// The targets against these figures.
    pub(crate) targets: Vec<crate::report::Check>,
    /// Seconds the whole invocation took.
    pub(crate) elapsed_s: f64,
}

impl Report {
    /// Whether any workload failed (a wrong result, an error).
    pub(crate) fn failures(&self) -> Vec<String> {
        self.backends
            .iter()
            .flat_map(|backend| {
                let series = backend.limits.iter().chain(&backend.workloads);
                series.flat_map(move |series| {
                    series
                        .errors
                        .iter()
                        .map(move |error| format!("{} {}: {error}", backend.name, series.name))
                })
            })
            .collect()
    }

    /// The series of `workload` on `backend`, if it ran.
    pub(crate) fn series(&self, backend: &str, workload: &str) -> Option<&Series> {
        let backend = self.backends.iter().find(|b| b.name == backend)?;
        backend
            .workloads
            .iter()
            .find(|series| series.name == workload)
    }
}

/// One backend's figures.
#[derive(Debug, Serialize)]
pub(crate) struct BackendReport {
    /// The backend's name.
    pub(crate) name: String,
    /// Whether Keel could run on it.
    pub(crate) available: bool,
    /// Why not, or other remarks.
    pub(crate) note: Option<String>,
    /// The database's own limits.
    pub(crate) limits: Option<Series>,
    /// Each workload's figures.
    pub(crate) workloads: Vec<Series>,
}

/// The runs of one measurement and their medians.
#[derive(Debug, Serialize)]
pub(crate) struct Series {
    /// The workload's name (or `limits`).
    pub(crate) name: String,
    /// Each run's values.
    pub(crate) runs: Vec<BTreeMap<&'static str, f64>>,
    /// The median over the runs of each value.
    pub(crate) median: BTreeMap<&'static str, f64>,
    /// Each value's unit.
    pub(crate) units: BTreeMap<&'static str, Unit>,
    /// Remarks from the runs.
    pub(crate) notes: Vec<String>,
    /// Runs that failed, with why.
    pub(crate) errors: Vec<String>,
}

impl Series {
    /// No runs yet.
    pub(crate) fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            runs: Vec::new(),
            median: BTreeMap::new(),
            units: BTreeMap::new(),
            notes: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// Adds a run and updates the medians.
    pub(crate) fn push(&mut self, outcome: Outcome) {
        let mut run = BTreeMap::new();
        for (key, (unit, value)) in outcome.values {
            self.units.insert(key, unit);
            run.insert(key, value);
        }
        self.runs.push(run);
        for note in outcome.notes {
            if !self.notes.contains(&note) {
                self.notes.push(note);
            }
        }
        for &key in self.units.keys() {
            let values: Vec<f64> = self
                .runs
                .iter()
                .filter_map(|run| run.get(key).copied())
                .collect();
            self.median.insert(key, median(&values));
        }
    }

    /// The median of `key`, if measured.
    pub(crate) fn get(&self, key: &str) -> Option<f64> {
        self.median
            .get(key)
            .copied()
            .filter(|value| !value.is_nan())
    }
}
