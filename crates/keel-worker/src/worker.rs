//! Starting the dispatchers, and stopping them gracefully.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keel_core::Timestamp;
use keel_provider::{Provider, WorkKind};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::activities::{self, Activities, Committer, Running};
use crate::error::Result;
use crate::metrics;
use crate::notifier::Notifier;
use crate::options::WorkerOptions;
use crate::orchestrations::Orchestrator;
use crate::registry::Registry;

/// What every dispatcher task of one worker shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) provider: Arc<dyn Provider>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) options: WorkerOptions,
    pub(crate) notifier: Arc<Notifier>,
    /// Fired by shutdown: fetch nothing more.
    pub(crate) stop: CancellationToken,
    /// Fired when shutdown's deadline passes: abandon what still runs.
    pub(crate) halt: CancellationToken,
    /// Activities abandoned at the deadline.
    pub(crate) abandoned: AtomicUsize,
    /// Attempts running in this process.
    pub(crate) running: Running,
}

/// A running worker: orchestration lanes and an activity worker over one provider.
/// Stop it with [`shutdown`](Self::shutdown); dropping it stops it too, without
/// waiting.
#[derive(Debug)]
pub struct Worker {
    shared: Arc<Shared>,
    tasks: TaskTracker,
    committer: Option<JoinHandle<()>>,
}

/// How a shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Whether all running work finished before the deadline.
    pub drained: bool,
    /// Activities still running at the deadline, handed back to the queue.
    pub abandoned_activities: usize,
}

impl Worker {
    /// Starts the dispatchers on the current tokio runtime.
    pub fn start(
        provider: Arc<dyn Provider>,
        registry: Arc<Registry>,
        options: WorkerOptions,
        notifier: Arc<Notifier>,
    ) -> Result<Self> {
        options.validate()?;
        let shared = Arc::new(Shared {
            provider,
            registry,
            options,
            notifier,
            stop: CancellationToken::new(),
            halt: CancellationToken::new(),
            abandoned: AtomicUsize::new(0),
            running: Running::default(),
        });
        let tasks = TaskTracker::new();
        let mut committer = None;
        let mut activities = None;
        if shared.options.activities {
            let (sender, drain) = Committer::start(Arc::clone(&shared), tasks.clone());
            committer = Some((sender.clone(), drain));
            let runner = Arc::new(Activities::new(Arc::clone(&shared), tasks.clone(), sender));
            tasks.spawn(activities::run(Arc::clone(&runner)));
            activities = Some(runner);
        }
        if shared.options.orchestrations {
            let orchestrator = Arc::new(Orchestrator::new(Arc::clone(&shared), activities));
            if let Some((sender, _)) = &committer {
                sender.hand_turns_to(&orchestrator);
            }
            for _ in 0..shared.options.orchestration_lanes {
                tasks.spawn(Arc::clone(&orchestrator).run_lane());
            }
        }
        // Only the runner's tasks keep the committer's channel open from here on.
        let committer = committer.map(|(_, drain)| drain);
        if let Some(every) = shared.options.queue_depth_interval {
            tasks.spawn(sample_queue_depths(Arc::clone(&shared), every));
        }
        tracing::info!(
            orchestrations = shared.options.orchestrations,
            activities = shared.options.activities,
            "keel worker started"
        );
        Ok(Self {
            shared,
            tasks,
            committer,
        })
    }

    /// The notifier that announces finished instances.
    pub fn notifier(&self) -> &Arc<Notifier> {
        &self.shared.notifier
    }

    /// Stops fetching, lets running turns and activities finish for up to the
    /// `shutdown_timeout` option, then abandons what still runs so that another worker
    /// takes it over at once. Returns as soon as everything has drained.
    pub async fn shutdown(mut self) -> ShutdownReport {
        self.shared.stop.cancel();
        self.tasks.close();
        let timeout = self.shared.options.shutdown_timeout;
        let drained = tokio::time::timeout(timeout, self.tasks.wait())
            .await
            .is_ok();
        if !drained {
            self.shared.halt.cancel();
            self.tasks.wait().await;
        }
        // Every sender is gone with its task: the committer drains and ends.
        if let Some(committer) = self.committer.take() {
            let _ = committer.await;
        }
        let report = ShutdownReport {
            drained,
            abandoned_activities: self.shared.abandoned.load(Ordering::Relaxed),
        };
        tracing::info!(?report, "keel worker stopped");
        report
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.shared.stop.cancel();
        self.shared.halt.cancel();
    }
}

/// When a claim held until `until` for `held_for` was taken: the provider's time at the
/// fetch (its database clock where it has one), without asking it again.
pub(crate) fn claimed_at(until: Timestamp, held_for: Duration) -> Timestamp {
    let held_for = u64::try_from(held_for.as_millis()).unwrap_or(u64::MAX);
    Timestamp::from_millis(until.as_millis().saturating_sub(held_for))
}

/// Waits for work of `kind` after a fetch found none: the provider's wake-up (in-process
/// notify, LISTEN/NOTIFY, a due timer) or, at the latest, the poll interval.
pub(crate) async fn idle(shared: &Shared, kind: WorkKind) {
    let max = shared.options.max_poll_interval;
    tokio::select! {
        () = shared.stop.cancelled() => {}
        waited = shared.provider.wait_for_work(kind, max) => {
            if let Err(error) = waited {
                tracing::debug!(%error, "waiting for work failed; polling instead");
                pause(shared, max).await;
            }
        }
    }
}

/// Backs off after the `errors`-th store error in a row: 50 ms doubling, at most 5 s.
pub(crate) async fn pause_after_error(shared: &Shared, errors: u32) {
    let delay = Duration::from_millis(50).saturating_mul(1 << errors.min(7));
    pause(shared, delay.min(Duration::from_secs(5))).await;
}

async fn pause(shared: &Shared, delay: Duration) {
    tokio::select! {
        () = shared.stop.cancelled() => {}
        () = tokio::time::sleep(delay) => {}
    }
}

async fn sample_queue_depths(shared: Arc<Shared>, every: Duration) {
    while !shared.stop.is_cancelled() {
        match shared.provider.queue_depths().await {
            Ok(depths) => {
                let gauge = |queue: String, depth: u64| {
                    #[allow(
                        clippy::cast_precision_loss,
                        reason = "a gauge; depths stay far below 2^52"
                    )]
                    ::metrics::gauge!(metrics::QUEUE_DEPTH, "queue" => queue).set(depth as f64);
                };
                gauge("orchestrations".to_owned(), depths.messages_ready);
                gauge("orchestrations_delayed".to_owned(), depths.messages_delayed);
                for (queue, depth) in depths.activities_ready {
                    gauge(format!("activities:{queue}"), depth);
                }
                gauge("activities_delayed".to_owned(), depths.activities_delayed);
                gauge("activities_running".to_owned(), depths.activities_running);
                gauge("dead_letters".to_owned(), depths.dead_letters);
            }
            Err(error) => tracing::debug!(%error, "sampling queue depths failed"),
        }
        pause(&shared, every).await;
    }
}
