//! The orchestration context: every durable operation an orchestration can perform.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use keel_core::{
    ActivityOptions, EventKind, ExecutionId, Failure, InstanceId, OpId, Payload, QueueName,
    RetryPolicy, SideEffect, Timestamp,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::command::Command;
use crate::state::{Issued, OpKind, Resolution, SharedState, lock};

/// The handle an orchestration uses for everything durable: activities, timers,
/// signals, children, and values that must not change on replay.
///
/// Cheap to clone; every clone drives the same execution. Its futures may be combined
/// freely (`join_all`, [`select`](crate::select), `futures::join!`): replay delivers
/// results one at a time in history order, so the same code decides the same way.
#[derive(Clone)]
pub struct OrchestrationContext {
    state: SharedState,
}

impl std::fmt::Debug for OrchestrationContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = lock(&self.state);
        f.debug_struct("OrchestrationContext")
            .field("instance", &state.instance)
            .field("execution", &state.execution)
            .finish_non_exhaustive()
    }
}

impl OrchestrationContext {
    pub(crate) fn new(state: SharedState) -> Self {
        Self { state }
    }

    pub(crate) fn codec(&self) -> keel_core::Codec {
        lock(&self.state).codec
    }

    /// This instance's id.
    pub fn instance_id(&self) -> InstanceId {
        lock(&self.state).instance.clone()
    }

    /// This execution's number (it grows with each continue-as-new).
    pub fn execution_id(&self) -> ExecutionId {
        lock(&self.state).execution
    }

    /// Whether the code is re-running from stored history rather than making progress.
    /// Use it to skip logging on replay, never to change what the code does.
    pub fn is_replaying(&self) -> bool {
        lock(&self.state).replaying
    }

    /// Schedules the activity `name` with `input`. Set options on the returned call,
    /// then await it for the activity's output or its final failure.
    pub fn activity<O, I>(&self, name: impl Into<String>, input: &I) -> ActivityCall<O>
    where
        O: DeserializeOwned,
        I: Serialize + ?Sized,
    {
        let input = self.encode(input);
        ActivityCall {
            state: self.state.clone(),
            draft: Some((name.into(), input, ActivityOptions::default())),
            op: None,
            _output: PhantomData,
        }
    }

    /// A durable timer firing `duration` after the current point of the orchestration.
    pub fn sleep(&self, duration: Duration) -> Timer {
        Timer {
            state: self.state.clone(),
            due: Some(Due::After(duration)),
            op: None,
        }
    }

    /// A durable timer firing at `time` (at once if it is past).
    pub fn sleep_until(&self, time: impl Into<Timestamp>) -> Timer {
        Timer {
            state: self.state.clone(),
            due: Some(Due::At(time.into())),
            op: None,
        }
    }

    /// Waits for the next external signal called `name` and decodes its data.
    ///
    /// Signals that arrive before anyone waits are buffered in arrival order; each is
    /// consumed by exactly one wait, so two waits get two successive signals.
    pub fn signal<T: DeserializeOwned>(&self, name: impl Into<String>) -> SignalWait<T> {
        SignalWait {
            state: self.state.clone(),
            name: name.into(),
            waiter: None,
            _output: PhantomData,
        }
    }

    /// Starts the child orchestration `name` with `input`; await the call for its output
    /// or failure. Cancelling this instance cancels the child.
    pub fn child<O, I>(&self, name: impl Into<String>, input: &I) -> ChildCall<O>
    where
        O: DeserializeOwned,
        I: Serialize + ?Sized,
    {
        let input = self.encode(input);
        ChildCall {
            state: self.state.clone(),
            draft: Some(ChildDraft {
                name: name.into(),
                input,
                instance: None,
                version: None,
            }),
            op: None,
            _output: PhantomData,
        }
    }

    /// Ends this execution and starts a new one of the same instance with `input` and a
    /// fresh history. Await it as the orchestration's last act: `return
    /// ctx.continue_as_new(&next).await;` (it never resolves).
    pub fn continue_as_new<I: Serialize + ?Sized, R>(&self, input: &I) -> ContinueAsNew<R> {
        ContinueAsNew {
            state: self.state.clone(),
            input: Some(self.encode(input)),
            _output: PhantomData,
        }
    }

    /// The current time, recorded once: replay returns the same value.
    pub fn now(&self) -> SystemTime {
        let mut state = lock(&self.state);
        let live = SideEffect::Time(state.turn_time);
        match record_side_effect(&mut state, live) {
            SideEffect::Time(time) => time.to_system_time(),
            _ => SystemTime::UNIX_EPOCH,
        }
    }

    /// A random (version 4) UUID, recorded once: replay returns the same value.
    pub fn uuid(&self) -> uuid::Uuid {
        let mut state = lock(&self.state);
        let bits = (u128::from(state.rng.next_u64()) << 64) | u128::from(state.rng.next_u64());
        let live = SideEffect::Uuid(
            uuid::Builder::from_random_bytes(bits.to_be_bytes())
                .into_uuid()
                .as_u128(),
        );
        match record_side_effect(&mut state, live) {
            SideEffect::Uuid(bits) => uuid::Uuid::from_u128(bits),
            _ => uuid::Uuid::nil(),
        }
    }

    /// 64 random bits, recorded once: replay returns the same value.
    pub fn random(&self) -> u64 {
        let mut state = lock(&self.state);
        let live = SideEffect::Random(state.rng.next_u64());
        match record_side_effect(&mut state, live) {
            SideEffect::Random(value) => value,
            _ => 0,
        }
    }

    /// Sets the custom status that clients see beside the instance's status.
    pub fn set_custom_status<T: Serialize + ?Sized>(&self, status: &T) -> Result<(), Failure> {
        let payload = lock(&self.state).codec.encode(status)?;
        self.record_custom_status(Some(payload));
        Ok(())
    }

    /// Clears the custom status.
    pub fn clear_custom_status(&self) {
        self.record_custom_status(None);
    }

    fn record_custom_status(&self, status: Option<Payload>) {
        let mut state = lock(&self.state);
        let op = state.next_op();
        state.issue(EventKind::CustomStatusSet { op, status }, |_| None);
    }

    /// Whether to take the new code path of change `change_id`: false while replaying a
    /// history recorded before the change, true otherwise (and then recorded). Lets
    /// running workflows survive a code change:
    /// `if ctx.patched("v2-fraud-check") { new } else { old }`.
    pub fn patched(&self, change_id: &str) -> bool {
        lock(&self.state).patched(change_id)
    }

    fn encode<I: Serialize + ?Sized>(&self, input: &I) -> Result<Payload, Failure> {
        lock(&self.state).codec.encode(input).map_err(Failure::from)
    }
}

fn record_side_effect(state: &mut crate::state::State, live: SideEffect) -> SideEffect {
    let op = state.next_op();
    match state.issue(EventKind::SideEffectRecorded { op, value: live }, |_| None) {
        Issued::Replayed(EventKind::SideEffectRecorded { value, .. }) => value,
        _ => live,
    }
}

/// An issued operation: waits for its resolution, cancels it when dropped unfinished.
struct OpHandle {
    state: SharedState,
    op: OpId,
    done: bool,
}

impl OpHandle {
    fn poll(&mut self, cx: &Context<'_>) -> Poll<Resolution> {
        match lock(&self.state).poll_slot(self.op, cx.waker()) {
            Some(resolution) => {
                self.done = true;
                Poll::Ready(resolution)
            }
            None => Poll::Pending,
        }
    }
}

impl Drop for OpHandle {
    fn drop(&mut self) {
        if !self.done {
            lock(&self.state).drop_slot(self.op);
        }
    }
}

/// Issues `draft` and opens its slot; `None` when the turn has diverged (stay pending).
fn open(
    state: &SharedState,
    cx: &Context<'_>,
    issue: impl FnOnce(&mut crate::state::State, OpId) -> Option<OpKind>,
) -> Option<OpHandle> {
    let mut guard = lock(state);
    let op = guard.next_op();
    let kind = issue(&mut guard, op)?;
    guard.open_slot(op, kind, cx.waker());
    Some(OpHandle {
        state: state.clone(),
        op,
        done: false,
    })
}

fn decode<O: DeserializeOwned>(
    state: &SharedState,
    outcome: Result<Payload, Failure>,
) -> Result<O, Failure> {
    let payload = outcome?;
    let codec = lock(state).codec;
    codec.decode(&payload).map_err(Failure::from)
}

/// Polls an issued activity or child for its outcome, decoded; pending until issued.
fn poll_outcome<O: DeserializeOwned>(
    state: &SharedState,
    op: Option<&mut OpHandle>,
    cx: &Context<'_>,
) -> Poll<Result<O, Failure>> {
    match op.map(|handle| handle.poll(cx)) {
        Some(Poll::Ready(Resolution::Outcome(outcome))) => Poll::Ready(decode(state, outcome)),
        _ => Poll::Pending,
    }
}

/// An activity call: set its options, then await its output.
///
/// The activity is scheduled when the call is first polled. Dropped before it
/// finishes (a `select` loser), it is cancelled.
#[must_use = "an activity is scheduled only when its call is awaited"]
pub struct ActivityCall<O> {
    state: SharedState,
    draft: Option<(String, Result<Payload, Failure>, ActivityOptions)>,
    op: Option<OpHandle>,
    _output: PhantomData<fn() -> O>,
}

impl<O> std::fmt::Debug for ActivityCall<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivityCall")
            .field("name", &self.draft.as_ref().map(|d| &d.0))
            .finish_non_exhaustive()
    }
}

impl<O> ActivityCall<O> {
    fn options_mut(&mut self) -> Option<&mut ActivityOptions> {
        self.draft.as_mut().map(|d| &mut d.2)
    }

    /// Retries failed attempts by `policy` (the default: 5 attempts, 1 s doubling). A
    /// timeout set with [`timeout`](Self::timeout) is kept unless `policy` has its own.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        if let Some(options) = self.options_mut() {
            let timeout = options.retry.attempt_timeout;
            options.retry = policy;
            options.retry.attempt_timeout = options.retry.attempt_timeout.or(timeout);
        }
        self
    }

    /// Fails an attempt that runs longer than `timeout` (then retried by the policy).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        if let Some(options) = self.options_mut() {
            options.retry.attempt_timeout = Some(timeout);
        }
        self
    }

    /// Routes the activity to the workers serving `queue`.
    pub fn queue(mut self, queue: QueueName) -> Self {
        if let Some(options) = self.options_mut() {
            options.queue = queue;
        }
        self
    }

    /// Runs it before lower-priority items of its queue.
    pub fn priority(mut self, priority: i32) -> Self {
        if let Some(options) = self.options_mut() {
            options.priority = priority;
        }
        self
    }
}

impl<O: DeserializeOwned> Future for ActivityCall<O> {
    type Output = Result<O, Failure>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Some((name, input, options)) = this.draft.take() {
            let input = match input {
                Ok(input) => input,
                Err(failure) => return Poll::Ready(Err(failure)),
            };
            if let Err(invalid) = options.retry.validate() {
                return Poll::Ready(Err(
                    Failure::new(Failure::ENCODE, invalid.to_string()).retryable(false)
                ));
            }
            this.op = open(&this.state, cx, |state, op| {
                let draft = EventKind::ActivityScheduled {
                    op,
                    name,
                    input,
                    options,
                };
                let issued = state.issue(draft, |kind| match kind {
                    EventKind::ActivityScheduled {
                        op,
                        name,
                        input,
                        options,
                    } => Some(Command::ScheduleActivity {
                        op: *op,
                        name: name.clone(),
                        input: input.clone(),
                        options: options.clone(),
                    }),
                    _ => None,
                });
                (!matches!(issued, Issued::Diverged)).then_some(OpKind::Activity)
            });
        }
        poll_outcome(&this.state, this.op.as_mut(), cx)
    }
}

enum Due {
    After(Duration),
    At(Timestamp),
}

/// A durable timer. The timer is set when first polled; dropped before it fires, it is
/// cancelled.
#[must_use = "a timer is set only when awaited"]
pub struct Timer {
    state: SharedState,
    due: Option<Due>,
    op: Option<OpHandle>,
}

impl std::fmt::Debug for Timer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timer")
            .field("op", &self.op.as_ref().map(|h| h.op))
            .finish_non_exhaustive()
    }
}

impl Future for Timer {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if let Some(due) = this.due.take() {
            this.op = open(&this.state, cx, |state, op| {
                let fire_at = match due {
                    Due::After(duration) => state.event_time.saturating_add(duration),
                    Due::At(time) => time,
                };
                let issued = state.issue(EventKind::TimerCreated { op, fire_at }, |_| {
                    Some(Command::StartTimer { op, fire_at })
                });
                (!matches!(issued, Issued::Diverged)).then_some(OpKind::Timer)
            });
        }
        match this.op.as_mut().map(|handle| handle.poll(cx)) {
            Some(Poll::Ready(_)) => Poll::Ready(()),
            _ => Poll::Pending,
        }
    }
}

/// A wait for an external signal.
#[must_use = "a signal is consumed only when its wait is awaited"]
pub struct SignalWait<T> {
    state: SharedState,
    name: String,
    waiter: Option<u64>,
    _output: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for SignalWait<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalWait")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<T: DeserializeOwned> Future for SignalWait<T> {
    type Output = Result<T, Failure>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let payload = lock(&this.state).poll_signal(&this.name, &mut this.waiter, cx.waker());
        match payload {
            Some(payload) => Poll::Ready(decode(&this.state, Ok(payload))),
            None => Poll::Pending,
        }
    }
}

impl<T> Drop for SignalWait<T> {
    fn drop(&mut self) {
        if let Some(id) = self.waiter {
            lock(&self.state).drop_signal_wait(id);
        }
    }
}

struct ChildDraft {
    name: String,
    input: Result<Payload, Failure>,
    instance: Option<InstanceId>,
    version: Option<u32>,
}

/// A child orchestration call: optionally name its instance or version, then await its
/// output. The child starts when the call is first polled; dropped before it finishes,
/// the child is cancelled.
#[must_use = "a child starts only when its call is awaited"]
pub struct ChildCall<O> {
    state: SharedState,
    draft: Option<ChildDraft>,
    op: Option<OpHandle>,
    _output: PhantomData<fn() -> O>,
}

impl<O> std::fmt::Debug for ChildCall<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildCall")
            .field("name", &self.draft.as_ref().map(|d| &d.name))
            .finish_non_exhaustive()
    }
}

impl<O> ChildCall<O> {
    /// Gives the child this instance id instead of the derived `<parent>:<execution>:<op>`.
    pub fn instance_id(mut self, instance: InstanceId) -> Self {
        if let Some(draft) = self.draft.as_mut() {
            draft.instance = Some(instance);
        }
        self
    }

    /// Runs this registered version of the child instead of the newest.
    pub fn version(mut self, version: u32) -> Self {
        if let Some(draft) = self.draft.as_mut() {
            draft.version = Some(version);
        }
        self
    }
}

impl<O: DeserializeOwned> Future for ChildCall<O> {
    type Output = Result<O, Failure>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Some(ChildDraft {
            name,
            input,
            instance,
            version,
        }) = this.draft.take()
        {
            let input = match input {
                Ok(input) => input,
                Err(failure) => return Poll::Ready(Err(failure)),
            };
            this.op = open(&this.state, cx, |state, op| {
                let instance =
                    instance.unwrap_or_else(|| state.instance.child(state.execution, op));
                let live_kind = OpKind::Child(instance.clone());
                let draft = EventKind::ChildScheduled {
                    op,
                    name,
                    version,
                    instance,
                    input,
                };
                let issued = state.issue(draft, |kind| match kind {
                    EventKind::ChildScheduled {
                        op,
                        name,
                        version,
                        instance,
                        input,
                    } => Some(Command::StartChild {
                        op: *op,
                        name: name.clone(),
                        version: *version,
                        instance: instance.clone(),
                        input: input.clone(),
                    }),
                    _ => None,
                });
                match issued {
                    Issued::Live => Some(live_kind),
                    // The recorded id wins: the cancel must reach the child that exists.
                    Issued::Replayed(EventKind::ChildScheduled { instance, .. }) => {
                        Some(OpKind::Child(instance))
                    }
                    Issued::Replayed(_) | Issued::Diverged => None,
                }
            });
        }
        poll_outcome(&this.state, this.op.as_mut(), cx)
    }
}

/// The end of an execution that continues as a new one; it never resolves.
#[must_use = "continue-as-new happens only when awaited"]
pub struct ContinueAsNew<R> {
    state: SharedState,
    input: Option<Result<Payload, Failure>>,
    _output: PhantomData<fn() -> R>,
}

impl<R> std::fmt::Debug for ContinueAsNew<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContinueAsNew").finish_non_exhaustive()
    }
}

impl<R> Future for ContinueAsNew<R> {
    type Output = R;

    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<R> {
        let this = self.get_mut();
        if let Some(input) = this.input.take() {
            lock(&this.state).continue_as_new.get_or_insert(input);
        }
        Poll::Pending
    }
}
