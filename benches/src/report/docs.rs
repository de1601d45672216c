//! `docs/benchmarks.md`: the machine, the command and the latest full run's figures.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context as _, Result};

use super::median_figures;
use crate::results::Report;

/// Rewrites `path` from `report`.
pub(crate) fn write(report: &Report, path: &Path) -> Result<()> {
    std::fs::write(path, render(report))
        .with_context(|| format!("could not write {}", path.display()))
}

fn render(report: &Report) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "\
# Benchmarks

Keel's throughput and latency harness (package `keel-benches`), run with
`cargo xtask bench`. This page is rewritten by every full run (not `--quick`); the
raw figures of each run are in `target/keel-bench/<timestamp>.json` and a chart in
`target/keel-bench/latest.svg`.

Every figure is the median of {runs} runs in one invocation. Before each run the
harness measures the database's own limit on the machine with the same driver
(single-row commits per second, rows per second in 100-row transactions), and prints
Keel's activity step rate as a ratio of the single-row commit rate: the machine is
shared and noisy, and the ratio holds where absolute figures drift.

## Machine

- CPUs: {cpus} (`nproc`), {model}
- Memory: {memory:.1} GiB
- Kernel: Linux {kernel}
- Measured: {timestamp}, commit `{commit}`, in {elapsed:.0} s

## Command

```sh
{command}
```

",
        runs = report.runs,
        cpus = report.machine.cpus,
        model = report.machine.cpu_model,
        memory = report.machine.memory_gib,
        kernel = report.machine.kernel,
        timestamp = report.timestamp,
        commit = report.commit.as_deref().unwrap_or("unknown"),
        elapsed = report.elapsed_s,
        command = report.command,
    );

    out.push_str("## Targets\n\n");
    out.push_str("| | backend | workload | target | measured | required | margin |\n");
    out.push_str("|---|---|---|---|---:|---:|---:|\n");
    for check in &report.targets {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {:.2}x |",
            check.verdict(),
            check.backend,
            check.workload,
            check.target,
            check.unit.format(check.measured),
            check.requirement(),
            check.margin
        );
    }
    out.push_str(
        "\nThe margin is above 1 when the target is met (measured / required for a floor, \
         required / measured for a ceiling).\n\n## Figures\n",
    );
    for backend in &report.backends {
        let _ = writeln!(out, "\n### {}\n", backend.name);
        if let Some(note) = &backend.note {
            let _ = writeln!(out, "{note}\n");
        }
        if let Some(limits) = &backend.limits {
            let _ = writeln!(out, "Database limit: {}\n", median_figures(limits));
        }
        if backend.workloads.is_empty() {
            continue;
        }
        out.push_str("| workload | figures |\n|---|---|\n");
        for series in &backend.workloads {
            let mut cell = if series.runs.is_empty() {
                "FAILED".to_owned()
            } else {
                median_figures(series)
            };
            for remark in series.notes.iter().chain(&series.errors) {
                let _ = write!(cell, "<br>*{remark}*");
            }
            let _ = writeln!(out, "| {} | {} |", series.name, cell.replace('|', "\\|"));
        }
    }
    out.push_str(WORKLOADS);
    out
}

/// What each workload does, for readers of the figures.
const WORKLOADS: &str = "
## Workloads

- `linear-N` (N = 1, 3, 9): workflows of N sequential trivial activities; 100 in flight
  at all times, each replaced as it completes; workflows/s and activity steps/s counted
  in an 8 s window after a 2 s warm-up. `workflow p50` is start-to-result under that load.
- `fanout-5`: 5 parallel activities joined, measured like `linear-N`.
- `latency`: one workflow at a time with one activity, `client.start` to the typed
  result of `client.wait`, 500 samples after 20 unmeasured. Schedule-to-start runs from
  the workflow code asking for the activity (its turn not yet committed) to the
  activity's body starting.
- `fanout-K` (K = 100, 1,000, 10,000): one workflow schedules K activities in one turn
  and joins them; time to complete, and the process's peak RSS (`VmHWM`, reset once
  the worker has started).
- `long-history`: one workflow of 10,000 sequential activities; mean time between
  activity starts over the first 100 steps and over the last 100.
- `sleepers`: 100,000 workflows started 256 at a time, each parked in a durable timer
  due at the same instant; setup runs until every timer is committed; resident memory
  while parked (`VmRSS`); then the time from the due instant until the last workflow
  has completed. The due instant is set from a calibration run of 5% of the sleepers
  (timers due at once), with 1.5x headroom; a setup that still overruns it is noted.
- `signals`: one workflow waits for a signal, runs an activity, and waits again; the
  round trip from `client.signal` to that activity starting, 500 samples.

Every workflow's result is checked; a wrong or missing result fails the run. The
worker runs in the bench process with `WorkerOptions::default()` (queue-depth sampling
off). The workloads that measure memory (`fanout-K`, `sleepers`) do each run in a
fresh child process of the harness, so their RSS figures are the worker's plus the
harness's small share and hold nothing that earlier workloads left with the allocator;
`RSS before` is that process's resident memory with its runtime and store open.
";
