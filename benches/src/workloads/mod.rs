//! The standard workload shapes, so that our figures compare with other engines'.
//!
//! Every workload checks every workflow's result: a bench that counts failures as
//! throughput is worthless.

mod fanout;
mod history;
mod latency;
mod signals;
mod sleepers;
mod throughput;

use std::fmt;
use std::time::Duration;

use anyhow::Result;
use keel::{Keel, KeelBuilder, WorkerOptions};

use crate::backend::Store;
use crate::metric::Outcome;
use crate::progress::Progress;

/// How long a client waits for any single workflow before the run fails.
const WAIT: Duration = Duration::from_secs(120);

/// A workload shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Workload {
    /// N sequential trivial activities per workflow, many workflows in flight.
    Linear(u32),
    /// 5 parallel activities then a join, many workflows in flight.
    Fanout5,
    /// One workflow at a time with one activity: start to typed result.
    Latency,
    /// One workflow fanning out to K activities: time to complete and peak memory.
    Fanout(u32),
    /// One workflow of many sequential activities: does a step cost more late on?
    LongHistory,
    /// Many workflows parked in durable timers that come due at once.
    Sleepers,
    /// Round trip from a signal to the workflow's next activity.
    Signals,
}

impl Workload {
    /// Every workload, in report order.
    pub(crate) const ALL: [Self; 11] = [
        Self::Linear(1),
        Self::Linear(3),
        Self::Linear(9),
        Self::Fanout5,
        Self::Latency,
        Self::Fanout(100),
        Self::Fanout(1_000),
        Self::Fanout(10_000),
        Self::LongHistory,
        Self::Sleepers,
        Self::Signals,
    ];

    /// The workloads a run does unless told: all, except fanout-10000 when quick.
    pub(crate) fn defaults(quick: bool) -> Vec<Self> {
        Self::ALL
            .into_iter()
            .filter(|workload| !(quick && *workload == Self::Fanout(10_000)))
            .collect()
    }

    /// The workloads called `name`: one name, or a group (`linear`, `fanout`, `throughput`).
    pub(crate) fn parse(name: &str) -> Option<Vec<Self>> {
        let group: Vec<Self> = match name {
            "linear" => vec![Self::Linear(1), Self::Linear(3), Self::Linear(9)],
            "throughput" => Self::ALL[..4].to_vec(),
            "fanout" => vec![Self::Fanout(100), Self::Fanout(1_000), Self::Fanout(10_000)],
            _ => Self::ALL
                .into_iter()
                .filter(|workload| workload.to_string() == name)
                .collect(),
        };
        (!group.is_empty()).then_some(group)
    }

    /// Whether the workload reads the process's resident memory ([`crate::sys::memory`]):
    /// each of its runs then needs a process of its own (see [`crate::isolate`]).
    pub(crate) fn reads_memory(self) -> bool {
        matches!(self, Self::Fanout(_) | Self::Sleepers)
    }

    /// Runs the workload once on a fresh `store`.
    pub(crate) async fn run(
        self,
        store: &Store,
        sizes: &Sizes,
        progress: &Progress,
    ) -> Result<Outcome> {
        match self {
            Self::Linear(steps) => throughput::linear(store, steps, sizes, progress).await,
            Self::Fanout5 => throughput::fanout5(store, sizes, progress).await,
            Self::Latency => latency::run(store, sizes, progress).await,
            Self::Fanout(width) => fanout::run(store, width).await,
            Self::LongHistory => history::run(store, sizes, progress).await,
            Self::Sleepers => sleepers::run(store, sizes, progress).await,
            Self::Signals => signals::run(store, sizes, progress).await,
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Linear(steps) => write!(f, "linear-{steps}"),
            Self::Fanout5 => f.write_str("fanout-5"),
            Self::Latency => f.write_str("latency"),
            Self::Fanout(width) => write!(f, "fanout-{width}"),
            Self::LongHistory => f.write_str("long-history"),
            Self::Sleepers => f.write_str("sleepers"),
            Self::Signals => f.write_str("signals"),
        }
    }
}

/// How big each workload is: the sizes, or small ones for `--quick`.
#[derive(Debug, Clone)]
pub(crate) struct Sizes {
    /// Workflows kept in flight by the throughput workloads: enough for the worker to
    /// fill its batches, as a busy deployment does.
    pub(crate) in_flight: usize,
    /// Throughput runs before the measurement window opens.
    pub(crate) warmup: Duration,
    /// The throughput measurement window.
    pub(crate) window: Duration,
    /// Start-to-result samples in `latency`.
    pub(crate) latency_samples: usize,
    /// Round trips in `signals`.
    pub(crate) signal_samples: usize,
    /// Sequential activities in `long-history`.
    pub(crate) long_history: u32,
    /// Workflows in `sleepers`.
    pub(crate) sleepers: u32,
    /// How long each raw database figure is measured.
    pub(crate) limit_duration: Duration,
}

impl Sizes {
    /// The sizes.
    pub(crate) fn full() -> Self {
        Self {
            in_flight: 500,
            warmup: Duration::from_secs(2),
            window: Duration::from_secs(8),
            latency_samples: 500,
            signal_samples: 500,
            long_history: 10_000,
            sleepers: 100_000,
            limit_duration: Duration::from_secs(2),
        }
    }

    /// Sizes that make a whole run finish in well under two minutes.
    pub(crate) fn quick() -> Self {
        Self {
            in_flight: 500,
            warmup: Duration::from_millis(300),
            window: Duration::from_secs(1),
            latency_samples: 100,
            signal_samples: 100,
            long_history: 500,
            sleepers: 2_000,
            limit_duration: Duration::from_millis(500),
        }
    }
}

/// The worker settings every workload uses: the defaults, so the figures are what a
/// user gets, except that queue-depth sampling (a background query) is off.
fn worker_options() -> WorkerOptions {
    WorkerOptions::default().queue_depth_interval(None)
}

/// A builder on `store` with the bench's worker options; the workload registers its
/// code and starts it.
fn builder(store: &Store) -> KeelBuilder {
    Keel::builder()
        .provider(std::sync::Arc::clone(&store.provider))
        .options(worker_options())
}

/// Milliseconds in `duration`, for latency figures.
fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1_000.0
}
