//! Progress bars on stderr while the workloads run (hidden when stderr is not a
//! terminal, as in CI, where the one-line summaries still show). A run in a child
//! process (see [`crate::isolate`]) draws none: the parent's overall bar ticks on.

use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The overall bar and the bars of the workload running now.
#[derive(Debug)]
pub(crate) struct Progress {
    multi: MultiProgress,
    overall: ProgressBar,
}

impl Progress {
    /// An overall bar of `total` measurements.
    pub(crate) fn new(total: u64) -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let overall = multi.add(ProgressBar::new(total));
        overall.set_style(style("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}"));
        overall.enable_steady_tick(Duration::from_millis(200));
        Self { multi, overall }
    }

    /// Bars that draw nowhere, for a child process whose parent draws its own.
    pub(crate) fn hidden() -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::hidden());
        let overall = multi.add(ProgressBar::hidden());
        Self { multi, overall }
    }

    /// Says what runs now on the overall bar.
    pub(crate) fn set_stage(&self, stage: String) {
        self.overall.set_message(stage);
    }

    /// A meter of `len` items for one phase of a workload, removed when dropped.
    pub(crate) fn meter(&self, label: &str, len: u64) -> Meter {
        let meter = self.multi.add(ProgressBar::new(len));
        meter.set_style(style(
            "  {prefix:>12} [{bar:30}] {pos}/{len} {per_sec} {msg}",
        ));
        meter.set_prefix(label.to_owned());
        Meter {
            meter,
            multi: self.multi.clone(),
        }
    }

    /// Prints `line` above the bars (on stderr, so stdout keeps only the table) and
    /// counts one measurement done.
    pub(crate) fn done(&self, line: &str) {
        self.println(line);
        self.overall.inc(1);
    }

    /// Prints `line` above the bars.
    pub(crate) fn println(&self, line: &str) {
        self.multi.suspend(|| eprintln!("{line}"));
    }

    /// Removes the bars.
    pub(crate) fn finish(&self) {
        self.overall.finish_and_clear();
    }
}

/// One phase's meter.
#[derive(Debug)]
pub(crate) struct Meter {
    meter: ProgressBar,
    multi: MultiProgress,
}

impl Meter {
    /// A handle that tasks can advance.
    pub(crate) fn handle(&self) -> ProgressBar {
        self.meter.clone()
    }

    /// Advances by `n`.
    pub(crate) fn inc(&self, n: u64) {
        self.meter.inc(n);
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.meter.finish_and_clear();
        self.multi.remove(&self.meter);
    }
}

/// A template that is known to parse.
fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}
