//! The activity worker: claim what it can run, run each attempt under a renewed lease
//! with its timeout and cancellation, apply the retry policy, commit outcomes in groups.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use keel_core::{ExecutionId, Failure, InstanceId, OpId, Payload, RetryDecision};
use keel_provider::{
    ActivityCompletion, ActivityRetry, CompletedActivities, ErrorKind, FetchActivities,
    FetchOrchestrations, LeaseToken, LeasedWorkItem, OrchestrationWork, WorkKind,
};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::activity::{ActivityContext, Attempt};
use crate::metrics;
use crate::orchestrations::Orchestrator;
use crate::worker::{Shared, claimed_at, idle, pause_after_error};

/// Runs leased items, each in its own task, at most `max_concurrent_activities` at
/// once: the fetch loop and the orchestrator (which leases the items its turns schedule
/// as it acks them) both start attempts here.
#[derive(Debug)]
pub(crate) struct Activities {
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    tasks: TaskTracker,
    committer: Committer,
}

impl Activities {
    pub(crate) fn new(shared: Arc<Shared>, tasks: TaskTracker, committer: Committer) -> Self {
        let slots = Arc::new(Semaphore::new(shared.options.max_concurrent_activities));
        Self {
            shared,
            slots,
            tasks,
            committer,
        }
    }

    /// Up to `max` slots that are free now.
    pub(crate) fn free_slots(&self, max: usize) -> Vec<OwnedSemaphorePermit> {
        let mut permits = Vec::new();
        while permits.len() < max {
            match Arc::clone(&self.slots).try_acquire_owned() {
                Ok(permit) => permits.push(permit),
                Err(_) => break,
            }
        }
        permits
    }

    /// Starts the attempts of `items`, one slot each; slots left over are released.
    pub(crate) fn start(&self, items: Vec<LeasedWorkItem>, slots: Vec<OwnedSemaphorePermit>) {
        for (leased, slot) in items.into_iter().zip(slots) {
            self.tasks.spawn(run_attempt(
                Arc::clone(&self.shared),
                self.committer.clone(),
                leased,
                slot,
            ));
        }
    }
}

/// Claims work items while there are free slots and starts them.
pub(crate) async fn run(activities: Arc<Activities>) {
    let shared = &activities.shared;
    let max_items = shared
        .options
        .activity_batch
        .min(shared.provider.capabilities().max_fetch_items)
        .max(1);
    let mut errors = 0;
    loop {
        // Backpressure: claim only as many items as there are free slots.
        let first = tokio::select! {
            biased;
            () = shared.stop.cancelled() => break,
            permit = Arc::clone(&activities.slots).acquire_owned() => permit,
        };
        let Ok(first) = first else { break };
        let mut permits = vec![first];
        permits.extend(activities.free_slots(max_items - 1));
        let request = FetchActivities {
            queues: shared.options.queues.clone(),
            max_items: permits.len(),
            lease_for: shared.options.lease_duration,
        };
        let fetched = tokio::select! {
            biased;
            () = shared.stop.cancelled() => break,
            fetched = shared.provider.fetch_activities(request) => fetched,
        };
        match fetched {
            Ok(items) if items.is_empty() => {
                errors = 0;
                drop(permits);
                idle(shared, WorkKind::Activities).await;
            }
            Ok(items) => {
                errors = 0;
                activities.start(items, permits);
            }
            Err(error) => {
                errors += 1;
                tracing::warn!(%error, "fetching activities failed");
                drop(permits);
                pause_after_error(shared, errors).await;
            }
        }
    }
}

/// Runs one attempt and records what came of it. `slot` is held until then.
async fn run_attempt(
    shared: Arc<Shared>,
    committer: Committer,
    leased: LeasedWorkItem,
    slot: OwnedSemaphorePermit,
) {
    let item = leased.item;
    let span = tracing::info_span!(
        "activity",
        instance = %item.instance,
        execution = item.execution.get(),
        name = %item.name,
        attempt = item.attempt,
    );
    async move {
        let lease_for = shared.options.lease_duration;
        metrics::count(metrics::ACTIVITIES_STARTED, "activity", &*item.name);
        if item.attempt == 1 {
            let claimed_at = claimed_at(leased.leased_until, lease_for);
            let waited = claimed_at.saturating_duration_since(item.scheduled_at);
            metrics::labelled_seconds(
                metrics::ACTIVITY_SCHEDULE_TO_START,
                "activity",
                &*item.name,
                waited,
            );
        }
        let cancel = CancellationToken::new();
        let heartbeat = Arc::new(Notify::new());
        let lost = Arc::new(AtomicBool::new(false));
        let renewal = tokio::spawn(keep_leased(
            Arc::clone(&shared),
            leased.lease.clone(),
            cancel.clone(),
            Arc::clone(&heartbeat),
            Arc::clone(&lost),
        ));
        let ctx = ActivityContext::new(
            Arc::new(Attempt {
                instance: item.instance.clone(),
                execution: item.execution,
                op: item.op,
                name: item.name.clone(),
                number: item.attempt,
                deliveries: leased.deliveries,
                scheduled_at: item.scheduled_at,
            }),
            cancel.clone(),
            heartbeat,
            shared.options.codec,
        );
        let key = (item.instance.clone(), item.execution, item.op);
        shared.running.insert(key.clone(), cancel.clone());
        let started = Instant::now();
        let outcome = tokio::select! {
            outcome = attempt(&shared, ctx, item.input.clone(), item.options.attempt_timeout()) => Some(outcome),
            () = shared.halt.cancelled() => None,
        };
        renewal.abort();
        shared.running.remove(&key);
        metrics::labelled_seconds(metrics::ACTIVITY_DURATION, "activity", &*item.name, started.elapsed());
        let Some(outcome) = outcome else {
            // Shutdown's deadline passed: hand the item to another worker at once.
            cancel.cancel();
            shared.abandoned.fetch_add(1, Ordering::Relaxed);
            if let Err(error) = shared.provider.abandon_lease(&leased.lease).await {
                tracing::debug!(%error, "abandoning a lease failed; it will expire");
            }
            return;
        };
        if lost.load(Ordering::Relaxed) {
            tracing::warn!("the lease was lost while the activity ran; its outcome is dropped");
            return;
        }
        let lease = leased.lease;
        match outcome {
            Ok(output) => {
                metrics::count(metrics::ACTIVITIES_COMPLETED, "activity", &*item.name);
                committer.complete(lease, Ok(output)).await;
            }
            Err(failure) => {
                let policy = &item.options.retry;
                match policy.decide(item.attempt, &failure, item.retry_seed()) {
                    RetryDecision::RetryAfter(delay) => {
                        tracing::info!(%failure, ?delay, "the attempt failed; retrying");
                        metrics::count(metrics::ACTIVITIES_RETRIED, "activity", &*item.name);
                        let retry = ActivityRetry {
                            lease,
                            next_attempt: item.attempt + 1,
                            delay,
                            failure,
                        };
                        if let Err(error) = shared.provider.retry_activity(retry).await {
                            tracing::warn!(%error, "re-queueing the activity failed; its lease will expire");
                        }
                    }
                    RetryDecision::GiveUp => {
                        tracing::info!(%failure, "the activity failed");
                        metrics::count(metrics::ACTIVITIES_FAILED, "activity", &*item.name);
                        committer.complete(lease, Err(failure)).await;
                    }
                }
            }
        }
        drop(slot);
    }
    .instrument(span)
    .await;
}

/// Runs the code: an unregistered name, a panic and a timeout each become a failure.
async fn attempt(
    shared: &Shared,
    ctx: ActivityContext,
    input: Payload,
    timeout: Option<Duration>,
) -> Result<Payload, Failure> {
    let activity = shared
        .registry
        .activity(ctx.name())
        .map_err(|unregistered| {
            Failure::new(Failure::UNREGISTERED, unregistered.to_string()).retryable(false)
        })?;
    let cancel = ctx.cancellation_token().clone();
    let (name, number) = (ctx.name().to_owned(), ctx.attempt());
    let started = std::panic::catch_unwind(AssertUnwindSafe(|| activity.run(ctx, input)));
    let run = match started {
        Ok(future) => AssertUnwindSafe(future).catch_unwind(),
        Err(panic) => return Err(panicked(&*panic)),
    };
    let finished = match timeout {
        None => run.await,
        Some(limit) => match tokio::time::timeout(limit, run).await {
            Ok(finished) => finished,
            Err(_) => {
                cancel.cancel();
                return Err(Failure::new(
                    Failure::TIMEOUT,
                    format!(
                        "attempt {number} of activity {name:?} ran longer than its timeout of {limit:?}"
                    ),
                ));
            }
        },
    };
    finished.unwrap_or_else(|panic| Err(panicked(&*panic)))
}

fn panicked(panic: &(dyn std::any::Any + Send)) -> Failure {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with a non-string payload".to_owned());
    Failure::new(Failure::PANIC, format!("the activity panicked: {message}"))
}

/// Renews the lease every third of its length, or at once on a heartbeat, until the
/// attempt ends (this task is aborted then). A cancelled item fires the attempt's token;
/// a lost lease fires it too and marks the outcome as not ours to report.
async fn keep_leased(
    shared: Arc<Shared>,
    lease: LeaseToken,
    cancel: CancellationToken,
    heartbeat: Arc<Notify>,
    lost: Arc<AtomicBool>,
) {
    let lease_for = shared.options.lease_duration;
    loop {
        tokio::select! {
            () = tokio::time::sleep(lease_for / 3) => {}
            () = heartbeat.notified() => {}
        }
        match shared.provider.renew_lease(&lease, lease_for).await {
            Ok(()) => {}
            Err(error) if error.kind() == ErrorKind::Cancelled => {
                tracing::info!("the workflow cancelled the activity");
                cancel.cancel();
                return;
            }
            Err(error) if error.kind() == ErrorKind::Stale => {
                lost.store(true, Ordering::Relaxed);
                cancel.cancel();
                return;
            }
            Err(error) => tracing::warn!(%error, "renewing a lease failed; trying again"),
        }
    }
}

/// Identifies a running attempt: the instance, execution and op it completes.
type AttemptKey = (InstanceId, ExecutionId, OpId);

/// The attempts running in this process, so that a turn that cancels one of them fires
/// its token at once instead of at the attempt's next lease renewal.
#[derive(Debug, Default)]
pub(crate) struct Running(Mutex<HashMap<AttemptKey, CancellationToken>>);

impl Running {
    fn insert(&self, key: AttemptKey, cancel: CancellationToken) {
        self.attempts().insert(key, cancel);
    }

    fn remove(&self, key: &AttemptKey) {
        self.attempts().remove(key);
    }

    /// Fires the tokens of `ops` of `instance`'s `execution` that run here.
    pub(crate) fn cancel(&self, instance: &InstanceId, execution: ExecutionId, ops: &[OpId]) {
        let attempts = self.attempts();
        for op in ops {
            if let Some(cancel) = attempts.get(&(instance.clone(), execution, *op)) {
                cancel.cancel();
            }
        }
    }

    fn attempts(&self) -> std::sync::MutexGuard<'_, HashMap<AttemptKey, CancellationToken>> {
        // Every change is a single insert or remove: a panic cannot leave it half-done.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Sends final outcomes to one task that commits them in groups.
#[derive(Debug, Clone)]
pub(crate) struct Committer {
    sender: mpsc::Sender<(ActivityCompletion, oneshot::Sender<()>)>,
    turns: Arc<OnceLock<Weak<Orchestrator>>>,
}

impl Committer {
    /// The committer and the task that drains it; the task ends when every clone of
    /// the committer is dropped.
    pub(crate) fn start(
        shared: Arc<Shared>,
        tasks: TaskTracker,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (sender, receiver) = mpsc::channel(shared.options.max_concurrent_activities.max(1));
        let turns = Arc::new(OnceLock::new());
        let drain = tokio::spawn(commit_loop(shared, tasks, Arc::clone(&turns), receiver));
        (Self { sender, turns }, drain)
    }

    /// From now on, commits lock the instances they send outcomes to and run their
    /// next turns on `orchestrator` (eager dispatch). Held weakly: the orchestrator
    /// holds the committer.
    pub(crate) fn hand_turns_to(&self, orchestrator: &Arc<Orchestrator>) {
        let _ = self.turns.set(Arc::downgrade(orchestrator));
    }

    /// Commits one outcome (with whatever else is waiting), and returns once it is.
    async fn complete(&self, lease: LeaseToken, outcome: Result<Payload, Failure>) {
        let (done, committed) = oneshot::channel();
        let completion = ActivityCompletion { lease, outcome };
        if self.sender.send((completion, done)).await.is_ok() {
            let _ = committed.await;
        }
    }
}

/// How many times a batch of completions is tried when the store is unavailable.
const COMMIT_TRIES: u32 = 6;

async fn commit_loop(
    shared: Arc<Shared>,
    tasks: TaskTracker,
    turns: Arc<OnceLock<Weak<Orchestrator>>>,
    mut receiver: mpsc::Receiver<(ActivityCompletion, oneshot::Sender<()>)>,
) {
    let capabilities = shared.provider.capabilities();
    let max_batch = capabilities.max_batch.max(1);
    let lock_turns = shared.options.eager_dispatch && capabilities.locks_on_completion;
    while let Some(first) = receiver.recv().await {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match receiver.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (completions, waiting): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let orchestrator = turns
            .get()
            .and_then(Weak::upgrade)
            .filter(|_| lock_turns && !shared.stop.is_cancelled());
        let locked = commit(&shared, completions, orchestrator.is_some()).await;
        // Before the attempts hear their outcome is in: while they run, shutdown waits,
        // so the turns are tracked before it can stop waiting.
        if let Some(orchestrator) = orchestrator.filter(|_| !locked.is_empty()) {
            tasks.spawn(async move { orchestrator.run_handed_batch(locked).await });
        }
        for done in waiting {
            let _ = done.send(());
        }
    }
}

/// Commits `completions`, retrying while the store is unavailable; with `lock_turns`,
/// also locks the instances told, and returns their work.
async fn commit(
    shared: &Shared,
    completions: Vec<ActivityCompletion>,
    lock_turns: bool,
) -> Vec<OrchestrationWork> {
    let options = &shared.options;
    let lock = FetchOrchestrations {
        max_instances: options.orchestration_batch,
        lock_for: options.lock_duration,
        with_history: false,
    };
    for tried in 1..=COMMIT_TRIES {
        let committed = if lock_turns {
            shared
                .provider
                .complete_activities_locking(completions.clone(), lock.clone())
                .await
        } else {
            shared
                .provider
                .complete_activities(completions.clone())
                .await
                .map(|results| CompletedActivities {
                    results,
                    locked: Vec::new(),
                })
        };
        match committed {
            Ok(CompletedActivities { results, locked }) => {
                for (result, completion) in results.into_iter().zip(&completions) {
                    if let Err(error) = result {
                        tracing::warn!(%error, item = completion.lease.item(), "an activity's outcome was not recorded");
                    }
                }
                return locked;
            }
            Err(error) if error.is_retryable() && tried < COMMIT_TRIES => {
                tracing::warn!(%error, "committing activity outcomes failed; trying again");
                tokio::time::sleep(Duration::from_millis(50) * 2u32.pow(tried)).await;
            }
            // The leases expire and the items run again: at least once, never lost.
            Err(error) => {
                tracing::error!(%error, count = completions.len(), "committing activity outcomes failed");
                return Vec::new();
            }
        }
    }
    Vec::new()
}
