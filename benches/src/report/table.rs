//! The table on stdout.

use std::fmt::Write as _;

use super::median_figures;
use crate::results::Report;

/// Prints the figures and the target checks.
pub(crate) fn print(report: &Report) {
    print!("{}", render(report));
}

/// The text `print` prints.
pub(crate) fn render(report: &Report) -> String {
    let mut out = String::new();
    let sizes = if report.quick {
        "quick sizes"
    } else {
        "full sizes"
    };
    let _ = writeln!(
        out,
        "\nKeel benchmarks: {} ({sizes}, median of {} run{})",
        report.command,
        report.runs,
        if report.runs == 1 { "" } else { "s" }
    );
    let _ = writeln!(out, "machine: {}", report.machine.summary());
    for backend in &report.backends {
        let _ = writeln!(out, "\n{}", backend.name);
        if let Some(note) = &backend.note {
            let _ = writeln!(out, "  {note}");
        }
        if let Some(limits) = &backend.limits {
            let _ = writeln!(out, "  {:<14} {}", "database limit", median_figures(limits));
        }
        let width = backend
            .workloads
            .iter()
            .map(|s| s.name.len())
            .max()
            .unwrap_or(0)
            .max(14);
        for series in &backend.workloads {
            let figures = if series.runs.is_empty() {
                "FAILED".to_owned()
            } else {
                median_figures(series)
            };
            let _ = writeln!(out, "  {:<width$} {figures}", series.name);
            for note in &series.notes {
                let _ = writeln!(out, "  {:<width$}   note: {note}", "");
            }
            for error in &series.errors {
                let _ = writeln!(out, "  {:<width$}   ERROR: {error}", "");
            }
        }
    }
    if !report.targets.is_empty() {
        let _ = writeln!(
            out,
            "\ntargets{}:",
            if report.quick {
                " (quick sizes: indicative only)"
            } else {
                ""
            }
        );
        for check in &report.targets {
            let _ = writeln!(
                out,
                "  {} {:<14} {:<13} {:<34} {:>12} (target {}, {:.2}x)",
                check.verdict(),
                check.backend,
                check.workload,
                check.target,
                check.unit.format(check.measured),
                check.requirement(),
                check.margin
            );
        }
    }
    out
}
