//! The orchestration dispatcher: fetch instances in batches, run their turns, commit the
//! acks together, keep the executions warm in the sticky cache.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use keel_core::{
    Event, EventKind, ExecutionId, Failure, InstanceId, Message, OpId, Payload, Timestamp,
};
use keel_provider::{
    Ack, ErrorKind, FetchActivities, FetchOrchestrations, LeasedWorkItem, LockToken,
    OrchestrationWork, WorkKind,
};
use keel_replay::{
    Execution, ExecutionState, Orchestration, OrchestrationContext, OrchestrationFuture,
    ReplayError, TurnEnv,
};
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tracing::Instrument;

use crate::ack::{TurnOf, ack_for};
use crate::activities::Activities;
use crate::cache::{Cached, StickyCache};
use crate::metrics;
use crate::worker::{Shared, claimed_at, idle, pause_after_error};

/// Runs orchestration turns for one worker: any number of lanes share one cache.
#[derive(Debug)]
pub(crate) struct Orchestrator {
    shared: Arc<Shared>,
    /// This worker's activity runner, when it runs activities: the items a turn
    /// schedules are leased to it as the turn is acked, while it has free slots.
    activities: Option<Arc<Activities>>,
    cache: Mutex<StickyCache>,
    /// Rung after a batch locked on completion is acked: messages that arrived for its
    /// instances meanwhile are fetchable now, and a store need not announce that.
    handed_back: Notify,
    /// Failed turns per instance since its last good one (poison handling).
    failures: Mutex<HashMap<InstanceId, u32>>,
}

/// What to do with one fetched instance.
#[allow(
    clippy::large_enum_variant,
    reason = "one per fetched instance, gone when its batch is acked"
)]
enum Step {
    /// Commit this ack; keep `cached` if the ack commits.
    Ack {
        ack: Box<Ack>,
        execution: ExecutionId,
        cached: Option<Cached>,
        finished: Option<Finished>,
    },
    /// Set the instance aside until someone resumes it.
    Suspend { lock: LockToken, reason: String },
    /// Release the lock and try the turn again after `delay`.
    Retry { lock: LockToken, delay: Duration },
}

/// What `ack_turns` returns: one result per ack, unless the whole call failed.
type AckResults = keel_provider::Result<Vec<keel_provider::Result<()>>>;

/// Activity items leased to this worker as their turns were acked, and the slots
/// reserved for them (one per item, and any left over).
#[derive(Default)]
struct Leased {
    items: Vec<LeasedWorkItem>,
    slots: Vec<OwnedSemaphorePermit>,
}

/// What is left to do once an ack has committed.
struct Acked {
    lock: LockToken,
    execution: ExecutionId,
    /// Activities the turn cancelled: their tokens fire at once if they run here.
    cancelled: Vec<OpId>,
    cached: Option<Cached>,
    finished: Option<Finished>,
}

/// An execution that ended in this turn, for metrics and waiting clients.
struct Finished {
    name: String,
    status: &'static str,
    started_at: Timestamp,
    ended_at: Timestamp,
}

/// Why a turn could not be computed.
enum Problem {
    /// Running it again cannot help (nondeterminism, an unregistered version).
    Permanent(String),
    /// It may pass on another try (a panic, a store error), up to the attempt limit.
    Transient(String),
    /// The store is unreachable; try again without counting it against the instance.
    Unavailable(String),
}

fn guard<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded maps stay consistent at every await-free step, so a panic elsewhere
    // cannot leave them half-changed.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Orchestrator {
    pub(crate) fn new(shared: Arc<Shared>, activities: Option<Arc<Activities>>) -> Self {
        let capacity = shared.options.cache_capacity;
        Self {
            shared,
            activities,
            cache: Mutex::new(StickyCache::new(capacity)),
            handed_back: Notify::new(),
            failures: Mutex::default(),
        }
    }

    /// One lane: fetch, run, ack, until the worker stops.
    pub(crate) async fn run_lane(self: Arc<Self>) {
        let shared = &self.shared;
        let request = FetchOrchestrations {
            max_instances: shared
                .options
                .orchestration_batch
                .min(shared.provider.capabilities().max_fetch_instances),
            lock_for: shared.options.lock_duration,
            with_history: false,
        };
        let mut errors = 0;
        while !shared.stop.is_cancelled() {
            let fetched = tokio::select! {
                biased;
                () = shared.stop.cancelled() => break,
                fetched = shared.provider.fetch_orchestrations(request.clone()) => fetched,
            };
            match fetched {
                Ok(work) if work.is_empty() => {
                    errors = 0;
                    tokio::select! {
                        () = idle(shared, WorkKind::Orchestrations) => {}
                        () = self.handed_back.notified() => {}
                    }
                }
                Ok(work) => {
                    errors = 0;
                    self.run_batch(work).await;
                }
                Err(error) => {
                    errors += 1;
                    tracing::warn!(%error, "fetching orchestration work failed");
                    pause_after_error(shared, errors).await;
                }
            }
        }
    }

    /// Runs the turns of a batch of locked instances, fetched by a lane or locked for
    /// this worker as its activities completed, and commits them together.
    pub(crate) async fn run_batch(&self, work: Vec<OrchestrationWork>) {
        let started = Instant::now();
        let steps = join_all(work.into_iter().map(|work| {
            let span = tracing::info_span!(
                "turn",
                instance = %work.lock.instance(),
                execution = work.execution.get(),
                name = %work.name,
            );
            self.step(work).instrument(span)
        }))
        .await;
        let mut pending = Vec::new();
        for step in steps {
            match step {
                Step::Ack {
                    ack,
                    execution,
                    cached,
                    finished,
                } => {
                    let acked = Acked {
                        lock: ack.lock.clone(),
                        execution,
                        cancelled: ack.cancel_activities.clone(),
                        cached,
                        finished,
                    };
                    pending.push((*ack, acked));
                }
                other => self.settle(other).await,
            }
        }
        let max_batch = self.shared.provider.capabilities().max_batch.max(1);
        while !pending.is_empty() {
            let rest = pending.split_off(pending.len().min(max_batch));
            let (acks, acked): (Vec<Ack>, Vec<Acked>) = pending.into_iter().unzip();
            let (results, leased) = self.commit(acks).await;
            self.after_acks(results, acked).await;
            if let Some(runner) = &self.activities {
                runner.start(leased.items, leased.slots);
            }
            pending = rest;
        }
        metrics::seconds(metrics::TURN_DURATION, started.elapsed());
    }

    /// Runs a batch locked for this worker as its activities completed, then has a lane
    /// look at the queue again: the lanes did not run these turns, so none would
    /// otherwise fetch the messages that came for these instances while they were held.
    pub(crate) async fn run_handed_batch(&self, work: Vec<OrchestrationWork>) {
        self.run_batch(work).await;
        self.handed_back.notify_one();
    }

    /// Commits `acks`, leasing the items they schedule to this worker's activity runner
    /// while it has free slots; returns the acks' results and the leased items, which
    /// the caller starts once the results are settled (so a quick activity's next turn
    /// finds its execution back in the cache).
    async fn commit(&self, acks: Vec<Ack>) -> (AckResults, Leased) {
        let provider = &self.shared.provider;
        let options = &self.shared.options;
        let runner = self
            .activities
            .as_ref()
            .filter(|_| options.eager_dispatch && provider.capabilities().leases_on_ack)
            .filter(|_| !self.shared.stop.is_cancelled());
        let ours = acks
            .iter()
            .flat_map(|ack| &ack.activities)
            .filter(|item| options.queues.contains(&item.options.queue))
            .count();
        let slots = runner
            .map(|runner| runner.free_slots(ours))
            .unwrap_or_default();
        if slots.is_empty() {
            return (provider.ack_turns(acks).await, Leased::default());
        }
        let lease = FetchActivities {
            queues: options.queues.clone(),
            max_items: slots.len(),
            lease_for: options.lease_duration,
        };
        match provider.ack_turns_leasing(acks, lease).await {
            Ok(acked) => (
                Ok(acked.results),
                Leased {
                    items: acked.leased,
                    slots,
                },
            ),
            Err(error) => (Err(error), Leased::default()),
        }
    }

    async fn after_acks(&self, results: AckResults, acked: Vec<Acked>) {
        let results = match results {
            Ok(results) => results,
            Err(error) => {
                // Nothing committed; release the locks so the turns run again at once.
                tracing::warn!(%error, turns = acked.len(), "committing turns failed");
                for Acked { lock, .. } in acked {
                    let _ = self
                        .shared
                        .provider
                        .abandon_lock(&lock, Duration::ZERO)
                        .await;
                }
                return;
            }
        };
        for (
            result,
            Acked {
                lock,
                execution,
                cancelled,
                cached,
                finished,
            },
        ) in results.into_iter().zip(acked)
        {
            let instance = lock.instance();
            match result {
                Ok(()) => {
                    metrics::count(metrics::TURNS, "outcome", "acked");
                    if !cancelled.is_empty() {
                        self.shared.running.cancel(instance, execution, &cancelled);
                    }
                    guard(&self.failures).remove(instance);
                    if let Some(cached) = cached {
                        guard(&self.cache).put(instance.clone(), cached);
                    }
                    if let Some(finished) = finished {
                        finished.record();
                        self.shared.notifier.finished(instance);
                    }
                }
                Err(error) if error.kind() == ErrorKind::Stale => {
                    // Another worker took the instance over; it will redo the turn.
                    metrics::count(metrics::TURNS, "outcome", "rejected");
                    tracing::debug!(%instance, %error, "a turn's lock expired before its ack");
                }
                Err(error) => {
                    metrics::count(metrics::TURNS, "outcome", "rejected");
                    tracing::warn!(%instance, %error, "a turn's ack was rejected");
                    let step = self.on_problem(&lock, Problem::Transient(error.to_string()));
                    self.settle(step).await;
                }
            }
        }
    }

    /// Carries out a turn that did not end in an ack: a suspend or a retry.
    async fn settle(&self, step: Step) {
        match step {
            Step::Suspend { lock, reason } => self.suspend(&lock, &reason).await,
            Step::Retry { lock, delay } => {
                if let Err(error) = self.shared.provider.abandon_lock(&lock, delay).await {
                    tracing::debug!(%error, instance = %lock.instance(), "abandoning a lock failed; it will expire");
                }
            }
            Step::Ack { .. } => {}
        }
    }

    async fn suspend(&self, lock: &LockToken, reason: &str) {
        let instance = lock.instance();
        tracing::error!(%instance, reason, "suspending the instance");
        metrics::count(metrics::TURNS, "outcome", "suspended");
        guard(&self.failures).remove(instance);
        match self.shared.provider.suspend(lock, reason).await {
            Ok(()) => self.shared.notifier.finished(instance),
            Err(error) => {
                tracing::warn!(%instance, %error, "suspending failed; the turn will run again")
            }
        }
    }

    /// Computes one instance's turn.
    async fn step(&self, mut work: OrchestrationWork) -> Step {
        let instance = work.lock.instance().clone();
        let now = claimed_at(work.locked_until, self.shared.options.lock_duration);
        let cached = guard(&self.cache).take(&instance, work.execution, work.history_len);
        metrics::count(
            metrics::TURN_CACHE,
            "result",
            if cached.is_some() { "hit" } else { "miss" },
        );
        let mut cached = match cached {
            Some(cached) => cached,
            None => match self.load(&mut work, now).await {
                Ok(cached) => cached,
                Err(problem) => return self.on_problem(&work.lock, problem),
            },
        };
        if *cached.execution.state() == ExecutionState::NotStarted && !has_start(&work) {
            // A signal or cancel for an instance whose delayed start is not due yet:
            // leave it queued until the start arrives.
            let delay = self.shared.options.max_poll_interval;
            return Step::Retry {
                lock: work.lock,
                delay,
            };
        }
        let consumed = work.messages.iter().map(|queued| queued.id).collect();
        let messages = work.messages.into_iter().map(|queued| queued.message);
        let env = TurnEnv {
            now,
            seed: RandomState::new().hash_one(&instance),
        };
        let turn = match cached.execution.turn(messages, env) {
            Ok(turn) => turn,
            Err(error) => return self.on_problem(&work.lock, replay_problem(&error)),
        };
        let of = TurnOf {
            lock: work.lock,
            execution: work.execution,
            version: cached.execution.version(),
            now,
        };
        let finished = finished_status(&turn.state).map(|status| Finished {
            name: cached.name.clone(),
            status,
            started_at: cached.started_at,
            ended_at: now,
        });
        let ack = ack_for(&of, consumed, turn);
        Step::Ack {
            ack: Box::new(ack),
            execution: work.execution,
            cached: finished.is_none().then_some(cached),
            finished,
        }
    }

    /// Builds the execution from the stored history (a cache miss).
    async fn load(&self, work: &mut OrchestrationWork, now: Timestamp) -> Result<Cached, Problem> {
        let instance = work.lock.instance();
        let history = match work.history.take() {
            Some(history) => history,
            None => self
                .shared
                .provider
                .read_history(instance, Some(work.execution))
                .await
                .map_err(|error| {
                    let message = format!("reading the history failed: {error}");
                    if error.is_retryable() {
                        Problem::Unavailable(message)
                    } else {
                        Problem::Transient(message)
                    }
                })?,
        };
        let (version, started_at) = match history.first() {
            Some(Event {
                at,
                kind: EventKind::ExecutionStarted { version, .. },
            }) => (Some(*version), *at),
            _ => (start_version(work), now),
        };
        let registry = &self.shared.registry;
        let (version, code) = match registry.orchestration(&work.name, version) {
            Ok(found) => found,
            // A first turn of unknown code fails the execution, so that a parent
            // waiting on it as a child hears why.
            Err(unregistered) if history.is_empty() => {
                let failure =
                    Failure::new(Failure::UNREGISTERED, unregistered.to_string()).retryable(false);
                (
                    version.unwrap_or(0),
                    Arc::new(FailAtOnce(failure)) as Arc<dyn Orchestration>,
                )
            }
            // A running instance whose version is gone waits for the code to return.
            Err(unregistered) => return Err(Problem::Permanent(unregistered.to_string())),
        };
        let mut execution = Execution::with_codec(
            instance.clone(),
            work.execution,
            version,
            code,
            self.shared.options.codec,
        );
        execution
            .replay(history)
            .map_err(|error| replay_problem(&error))?;
        Ok(Cached {
            execution,
            execution_id: work.execution,
            name: work.name.clone(),
            started_at,
        })
    }

    /// Decides what a failed turn leads to: poison handling.
    fn on_problem(&self, lock: &LockToken, problem: Problem) -> Step {
        let instance = lock.instance();
        let lock = lock.clone();
        match problem {
            Problem::Permanent(reason) => Step::Suspend { lock, reason },
            Problem::Unavailable(reason) => {
                metrics::count(metrics::TURNS, "outcome", "failed");
                tracing::warn!(%instance, reason, "a turn could not run; trying again");
                let delay = self.shared.options.turn_retry_delay;
                Step::Retry { lock, delay }
            }
            Problem::Transient(reason) => {
                metrics::count(metrics::TURNS, "outcome", "failed");
                let attempts = {
                    let mut failures = guard(&self.failures);
                    let attempts = failures.entry(instance.clone()).or_insert(0);
                    *attempts += 1;
                    *attempts
                };
                let max = self.shared.options.max_turn_attempts;
                if attempts >= max {
                    let reason = format!(
                        "its turn failed {attempts} times in a row; the last time: {reason}"
                    );
                    Step::Suspend { lock, reason }
                } else {
                    tracing::warn!(%instance, attempts, reason, "a turn failed; trying again");
                    let base = self.shared.options.turn_retry_delay;
                    let delay = base.saturating_mul(1 << (attempts - 1).min(10));
                    Step::Retry { lock, delay }
                }
            }
        }
    }
}

/// Whether the batch holds the start of the current execution.
fn has_start(work: &OrchestrationWork) -> bool {
    work.messages.iter().any(|queued| {
        matches!(&queued.message, Message::Start { execution, .. } if *execution == work.execution)
    })
}

/// The version the start message of this execution asks for, on a first turn.
fn start_version(work: &OrchestrationWork) -> Option<u32> {
    work.messages
        .iter()
        .find_map(|queued| match &queued.message {
            Message::Start {
                execution, version, ..
            } if *execution == work.execution => *version,
            _ => None,
        })
}

fn replay_problem(error: &ReplayError) -> Problem {
    let reason = error.to_string();
    match error {
        ReplayError::Panic { .. }
        | ReplayError::CorruptHistory { .. }
        | ReplayError::NotStarted { .. } => Problem::Transient(reason),
        // Nondeterminism, a non-durable await and a busy loop happen again on every try.
        _ => Problem::Permanent(reason),
    }
}

fn finished_status(state: &ExecutionState) -> Option<&'static str> {
    match state {
        ExecutionState::NotStarted | ExecutionState::Running => None,
        ExecutionState::Completed { .. } => Some("completed"),
        ExecutionState::Failed { .. } => Some("failed"),
        ExecutionState::Cancelled { .. } => Some("cancelled"),
        ExecutionState::ContinuedAsNew { .. } => Some("continued_as_new"),
    }
}

impl Finished {
    fn record(self) {
        let took = self.ended_at.saturating_duration_since(self.started_at);
        metrics::workflow_finished(self.name, self.status, took);
    }
}

/// Stands in for an orchestration nobody registered: its first turn fails.
struct FailAtOnce(Failure);

impl Orchestration for FailAtOnce {
    fn run(&self, _ctx: OrchestrationContext, _input: Payload) -> OrchestrationFuture {
        Box::pin(std::future::ready(Err(self.0.clone())))
    }
}
