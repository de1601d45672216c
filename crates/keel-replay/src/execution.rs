//! The engine: one execution of an orchestration, replayed from its history and driven
//! forward by new messages, one turn at a time.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use keel_core::{
    Codec, Event, EventKind, ExecutionId, Failure, InstanceId, Message, Payload, SplitMix64,
    Timestamp,
};

use crate::command::{Command, ExecutionState, Turn};
use crate::context::OrchestrationContext;
use crate::error::{EventSummary, ReplayError, Result};
use crate::orchestration::{Orchestration, OrchestrationFuture};
use crate::state::{OpKind, Resolution, SharedState, State, lock};

/// How many times in a row the code may wake itself before it counts as a busy loop.
const MAX_POLLS_PER_INPUT: u32 = 100_000;

/// What a turn may draw on from outside: the wall-clock time (stamped on new events and
/// returned by `ctx.now()`) and a seed for `ctx.uuid()` and `ctx.random()`. Both are
/// recorded where the code observes them, so replay needs neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TurnEnv {
    /// The time of the turn.
    pub now: Timestamp,
    /// Fresh randomness for the turn.
    pub seed: u64,
}

/// A live execution: the orchestration's suspended future and everything it waits on.
///
/// Build one with [`Execution::new`], feed it the stored history with
/// [`replay`](Self::replay), then run [`turn`](Self::turn)s with new messages. A worker
/// may keep it between turns: a turn then costs the same at any history length, since
/// only the new messages are applied. After any error it refuses further use; discard
/// it and replay afresh.
pub struct Execution {
    state: SharedState,
    orchestration: Arc<dyn Orchestration>,
    version: u32,
    future: Option<OrchestrationFuture>,
    woken: Arc<WakeFlag>,
    status: ExecutionState,
    broken: Option<ReplayError>,
}

impl std::fmt::Debug for Execution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Execution")
            .field("version", &self.version)
            .field("status", &self.status)
            .field("history_len", &self.history_len())
            .finish_non_exhaustive()
    }
}

/// Records that a future asked to be polled again.
#[derive(Debug, Default)]
struct WakeFlag(AtomicBool);

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// How the code ended an execution.
enum End {
    Completed(Payload),
    Failed(Failure),
    ContinuedAsNew(Payload),
    Cancelled(String),
}

fn is_activity(kind: &OpKind) -> bool {
    matches!(kind, OpKind::Activity)
}

fn is_timer(kind: &OpKind) -> bool {
    matches!(kind, OpKind::Timer)
}

fn is_child(kind: &OpKind) -> bool {
    matches!(kind, OpKind::Child(_))
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with a non-string payload".to_owned())
}

impl Execution {
    /// An execution of `instance` that runs `orchestration`, registered as `version`,
    /// with the default JSON codec.
    pub fn new(
        instance: InstanceId,
        execution: ExecutionId,
        version: u32,
        orchestration: Arc<dyn Orchestration>,
    ) -> Self {
        Self::with_codec(
            instance,
            execution,
            version,
            orchestration,
            Codec::default(),
        )
    }

    /// Like [`new`](Self::new), encoding values the code produces with `codec`.
    pub fn with_codec(
        instance: InstanceId,
        execution: ExecutionId,
        version: u32,
        orchestration: Arc<dyn Orchestration>,
        codec: Codec,
    ) -> Self {
        Self {
            state: Arc::new(Mutex::new(State::new(instance, execution, codec))),
            orchestration,
            version,
            future: None,
            woken: Arc::default(),
            status: ExecutionState::NotStarted,
            broken: None,
        }
    }

    /// How many history events this execution has applied: the cache key a worker
    /// compares with the stored history's length.
    pub fn history_len(&self) -> u64 {
        lock(&self.state).position
    }

    /// How the execution stands.
    pub fn state(&self) -> &ExecutionState {
        &self.status
    }

    /// The registered version of the code it runs.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Re-runs the code against stored `history`, checking every command it issues
    /// against the recorded one. Produces no new events or commands.
    pub fn replay(&mut self, history: Vec<Event>) -> Result<()> {
        self.usable()?;
        lock(&self.state).expected.extend(history);
        let replayed = self.replay_inputs();
        self.check(replayed)
    }

    /// Applies new `messages` and runs the code as far as they allow.
    ///
    /// Each message becomes a history event (start, outcome, signal, cancel), delivered
    /// to the code one at a time in order, with the code run after each. Messages for
    /// another execution, for operations no longer waited on, or after the end are
    /// dropped. A start is applied first wherever it is in the batch.
    pub fn turn(
        &mut self,
        messages: impl IntoIterator<Item = Message>,
        env: TurnEnv,
    ) -> Result<Turn> {
        self.usable()?;
        {
            let mut state = lock(&self.state);
            state.turn_time = env.now;
            state.rng = SplitMix64::new(env.seed);
        }
        let mut messages: Vec<Message> = messages.into_iter().collect();
        messages.sort_by_key(|message| !matches!(message, Message::Start { .. }));
        let applied = self.apply_messages(messages, env.now);
        self.check(applied)?;
        let mut state = lock(&self.state);
        Ok(Turn {
            events: std::mem::take(&mut state.new_events),
            commands: std::mem::take(&mut state.commands),
            state: self.status.clone(),
        })
    }

    fn usable(&self) -> Result<()> {
        self.broken.clone().map_or(Ok(()), Err)
    }

    /// Remembers an error: this execution's state no longer matches any history.
    fn check(&mut self, result: Result<()>) -> Result<()> {
        if let Err(error) = &result {
            self.broken = Some(error.clone());
            lock(&self.state).detached = true;
        }
        result
    }

    fn replay_inputs(&mut self) -> Result<()> {
        loop {
            let (event, position) = {
                let mut state = lock(&self.state);
                let position = state.position;
                let Some(front) = state.expected.front() else {
                    return Ok(());
                };
                if self.status.is_finished() {
                    let reason = format!("{} after the execution ended", front.kind.name());
                    return Err(ReplayError::CorruptHistory { position, reason });
                }
                if front.kind.is_command_record() {
                    if self.status == ExecutionState::NotStarted {
                        let reason = "the history does not begin with ExecutionStarted".to_owned();
                        return Err(ReplayError::CorruptHistory { position, reason });
                    }
                    let recorded = EventSummary::of(&front.kind);
                    return Err(ReplayError::Nondeterminism {
                        position,
                        recorded,
                        issued: None,
                    });
                }
                state.position += 1;
                match state.expected.pop_front() {
                    Some(event) => (event, position),
                    None => return Ok(()),
                }
            };
            self.apply(event, position, true)?;
        }
    }

    fn apply_messages(&mut self, messages: Vec<Message>, now: Timestamp) -> Result<()> {
        for message in messages {
            let Some(kind) = self.admit(message)? else {
                continue;
            };
            let position = {
                let mut state = lock(&self.state);
                let position = state.position;
                state.position += 1;
                state.new_events.push(Event {
                    at: now,
                    kind: kind.clone(),
                });
                position
            };
            self.apply(Event { at: now, kind }, position, false)?;
        }
        Ok(())
    }

    /// The history event a message becomes, or `None` if it is stale or redundant.
    fn admit(&self, message: Message) -> Result<Option<EventKind>> {
        if self.status.is_finished() {
            return Ok(None);
        }
        let state = lock(&self.state);
        if message
            .execution()
            .is_some_and(|execution| execution != state.execution)
        {
            return Ok(None);
        }
        let started = self.status != ExecutionState::NotStarted;
        if !started && !matches!(message, Message::Start { .. }) {
            return Err(ReplayError::NotStarted {
                message: message.name(),
                execution: state.execution.get(),
            });
        }
        Ok(match message {
            Message::Start {
                name,
                input,
                parent,
                ..
            } => (!started).then_some(EventKind::ExecutionStarted {
                name,
                version: self.version,
                input,
                parent,
            }),
            Message::ActivityDone { op, outcome, .. } => {
                state.is_waiting(op, is_activity).then_some(match outcome {
                    Ok(output) => EventKind::ActivityCompleted { op, output },
                    Err(failure) => EventKind::ActivityFailed { op, failure },
                })
            }
            Message::TimerFired { op, .. } => state
                .is_waiting(op, is_timer)
                .then_some(EventKind::TimerFired { op }),
            Message::ChildDone { op, outcome, .. } => {
                state.is_waiting(op, is_child).then_some(match outcome {
                    Ok(output) => EventKind::ChildCompleted { op, output },
                    Err(failure) => EventKind::ChildFailed { op, failure },
                })
            }
            Message::Signal { name, payload } => Some(EventKind::SignalReceived { name, payload }),
            Message::Cancel { reason } => Some(EventKind::CancelRequested { reason }),
        })
    }

    /// Delivers one input event to the code and runs it.
    fn apply(&mut self, event: Event, position: u64, replaying: bool) -> Result<()> {
        {
            let mut state = lock(&self.state);
            state.event_time = event.at;
            state.replaying = replaying;
        }
        let corrupt = |reason: String| ReplayError::CorruptHistory { position, reason };
        match event.kind {
            EventKind::ExecutionStarted {
                version,
                input,
                parent,
                ..
            } => {
                if self.status != ExecutionState::NotStarted {
                    return Err(corrupt("a second ExecutionStarted".to_owned()));
                }
                if version != self.version {
                    return Err(corrupt(format!(
                        "the execution started with version {version} of the code, but this is version {}",
                        self.version
                    )));
                }
                lock(&self.state).parent = parent;
                self.status = ExecutionState::Running;
                let ctx = OrchestrationContext::new(self.state.clone());
                let orchestration = &self.orchestration;
                let future = catch_unwind(AssertUnwindSafe(|| orchestration.run(ctx, input)))
                    .map_err(|panic| ReplayError::Panic {
                        message: panic_message(&*panic),
                    })?;
                self.future = Some(future);
            }
            EventKind::CancelRequested { reason } => {
                if self.status == ExecutionState::NotStarted {
                    return Err(corrupt(
                        "CancelRequested before ExecutionStarted".to_owned(),
                    ));
                }
                return self.finish(End::Cancelled(reason));
            }
            kind => {
                if self.status == ExecutionState::NotStarted {
                    return Err(corrupt(format!("{} before ExecutionStarted", kind.name())));
                }
                let mut state = lock(&self.state);
                let delivered = match kind {
                    EventKind::ActivityCompleted { op, output } => {
                        state.resolve(op, is_activity, Resolution::Outcome(Ok(output)))
                    }
                    EventKind::ActivityFailed { op, failure } => {
                        state.resolve(op, is_activity, Resolution::Outcome(Err(failure)))
                    }
                    EventKind::TimerFired { op } => state.resolve(op, is_timer, Resolution::Fired),
                    EventKind::ChildCompleted { op, output } => {
                        state.resolve(op, is_child, Resolution::Outcome(Ok(output)))
                    }
                    EventKind::ChildFailed { op, failure } => {
                        state.resolve(op, is_child, Resolution::Outcome(Err(failure)))
                    }
                    EventKind::SignalReceived { name, payload } => {
                        state.deliver_signal(name, payload);
                        Ok(())
                    }
                    other => Err(format!("{} is not an input event", other.name())),
                };
                delivered.map_err(corrupt)?;
            }
        }
        self.poll()
    }

    /// Polls the code until it waits on something durable or ends.
    fn poll(&mut self) -> Result<()> {
        let waker = Waker::from(self.woken.clone());
        let mut cx = Context::from_waker(&waker);
        for _ in 0..MAX_POLLS_PER_INPUT {
            let Some(future) = self.future.as_mut() else {
                return Ok(());
            };
            self.woken.0.store(false, Ordering::Relaxed);
            let polled = catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(&mut cx)));
            let (diverged, continued) = {
                let mut state = lock(&self.state);
                (state.error.take(), state.continue_as_new.take())
            };
            if let Some(error) = diverged {
                return Err(error);
            }
            match polled {
                Err(panic) => {
                    return Err(ReplayError::Panic {
                        message: panic_message(&*panic),
                    });
                }
                Ok(Poll::Ready(Ok(output))) => return self.finish(End::Completed(output)),
                Ok(Poll::Ready(Err(failure))) => return self.finish(End::Failed(failure)),
                Ok(Poll::Pending) => {}
            }
            match continued {
                Some(Ok(input)) => return self.finish(End::ContinuedAsNew(input)),
                Some(Err(failure)) => return self.finish(End::Failed(failure)),
                None => {}
            }
            if !self.woken.0.load(Ordering::Relaxed) {
                return if lock(&self.state).outstanding() == 0 {
                    Err(ReplayError::NonDurableAwait)
                } else {
                    Ok(())
                };
            }
        }
        Err(ReplayError::BusyLoop {
            polls: MAX_POLLS_PER_INPUT,
        })
    }

    /// Ends the execution: drops the code (cancelling what it left running, recorded
    /// before the end) and records the terminal event.
    fn finish(&mut self, end: End) -> Result<()> {
        if let Some(future) = self.future.take() {
            catch_unwind(AssertUnwindSafe(move || drop(future))).map_err(|panic| {
                ReplayError::Panic {
                    message: panic_message(&*panic),
                }
            })?;
        }
        let mut state = lock(&self.state);
        let parent = state.parent.clone();
        let (kind, status, report) = match end {
            End::Completed(output) => (
                EventKind::ExecutionCompleted {
                    output: output.clone(),
                },
                ExecutionState::Completed {
                    output: output.clone(),
                },
                Some(Ok(output)),
            ),
            End::Failed(failure) => (
                EventKind::ExecutionFailed {
                    failure: failure.clone(),
                },
                ExecutionState::Failed {
                    failure: failure.clone(),
                },
                Some(Err(failure)),
            ),
            End::Cancelled(reason) => {
                let failure = Failure::new(Failure::CANCELLED, format!("cancelled: {reason}"))
                    .retryable(false);
                (
                    EventKind::ExecutionCancelled {
                        reason: reason.clone(),
                    },
                    ExecutionState::Cancelled { reason },
                    Some(Err(failure)),
                )
            }
            End::ContinuedAsNew(input) => {
                let signals = state.unconsumed_signals();
                (
                    EventKind::ContinuedAsNew {
                        input: input.clone(),
                    },
                    ExecutionState::ContinuedAsNew { input, signals },
                    None,
                )
            }
        };
        let command = parent
            .zip(report)
            .map(|(parent, outcome)| Command::ReportToParent { parent, outcome });
        state.issue(kind, |_| command);
        if let Some(error) = state.error.take() {
            return Err(error);
        }
        drop(state);
        self.status = status;
        Ok(())
    }
}

impl Drop for Execution {
    fn drop(&mut self) {
        // Evicting a live execution is not cancelling its operations.
        lock(&self.state).detached = true;
        if let Some(future) = self.future.take() {
            // A panicking destructor in user code must not take the worker down.
            let _ = catch_unwind(AssertUnwindSafe(move || drop(future)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::{ActivityCall, ChildCall, SignalWait, Timer};

    fn is_send<T: Send>() {}
    fn is_send_sync<T: Send + Sync>() {}

    #[test]
    fn executions_and_futures_can_move_between_threads() {
        // A worker caches live executions and runs their turns on any thread.
        is_send::<Execution>();
        is_send_sync::<OrchestrationContext>();
        is_send::<ActivityCall<u32>>();
        is_send::<ChildCall<u32>>();
        is_send::<SignalWait<u32>>();
        is_send::<Timer>();
    }
}
