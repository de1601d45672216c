//! The state an execution shares with its orchestration context and operation futures:
//! operation slots, buffered signals, the history being replayed, and the turn's output.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Waker;

use keel_core::{
    Codec, Event, EventKind, ExecutionId, Failure, InstanceId, OpId, Outcome, ParentLink, Payload,
    SplitMix64, Timestamp,
};

use crate::command::Command;
use crate::error::{EventSummary, ReplayError};

/// The state behind an `Arc`: futures must be `Send` so that a worker can keep a live
/// execution in a cache and run its next turn on any thread. The lock is never held
/// while user code runs, so it is uncontended.
pub(crate) type SharedState = Arc<Mutex<State>>;

pub(crate) fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // Our own code never panics while holding the lock; if it did, the engine discards
    // the execution anyway, so the data inside is still fine to read.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What kind of operation a slot waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OpKind {
    Activity,
    Timer,
    Child(InstanceId),
}

/// How an operation ended.
#[derive(Debug)]
pub(crate) enum Resolution {
    Outcome(Outcome),
    Fired,
}

#[derive(Debug)]
enum SlotState {
    Waiting(Option<Waker>),
    Resolved(Resolution),
}

#[derive(Debug)]
struct Slot {
    kind: OpKind,
    state: SlotState,
}

/// The result of issuing a command.
#[derive(Debug)]
pub(crate) enum Issued {
    /// New: recorded as a new event (and command) of this turn.
    Live,
    /// Matched the recorded event, returned here so the caller can read recorded values.
    Replayed(EventKind),
    /// The code diverged from its history; the turn will fail. The caller must not
    /// complete: it stays pending, and the engine reports the error.
    Diverged,
}

#[derive(Debug)]
struct Waiter {
    name: String,
    waker: Option<Waker>,
    /// A signal handed to this waiter but not yet returned by its future, with its
    /// arrival number.
    value: Option<(u64, Payload)>,
}

/// Signals by name: those that arrived before anyone waited, and the waits that arrived
/// before any signal.
#[derive(Debug, Default)]
struct Signals {
    next_arrival: u64,
    next_waiter: u64,
    buffered: HashMap<String, VecDeque<(u64, Payload)>>,
    waiting: HashMap<String, VecDeque<u64>>,
    waiters: HashMap<u64, Waiter>,
}

/// Everything the engine and the context share.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) instance: InstanceId,
    pub(crate) execution: ExecutionId,
    pub(crate) codec: Codec,
    pub(crate) parent: Option<ParentLink>,
    next_op: u64,
    ops: HashMap<OpId, Slot>,
    /// Hash maps here are only looked up, never iterated where order could decide
    /// anything, so their random seeds cannot make replay diverge.
    signals: Signals,
    patches: HashMap<String, bool>,
    /// The rest of the stored history being replayed.
    pub(crate) expected: VecDeque<Event>,
    /// The history position of the next event consumed or appended.
    pub(crate) position: u64,
    /// Whether the input being applied came from stored history.
    pub(crate) replaying: bool,
    /// When the input being applied was recorded: the orchestration's notion of now.
    pub(crate) event_time: Timestamp,
    /// The wall-clock time of the current turn, stamped on its new events.
    pub(crate) turn_time: Timestamp,
    pub(crate) rng: SplitMix64,
    pub(crate) new_events: Vec<Event>,
    pub(crate) commands: Vec<Command>,
    /// The first divergence found while the code ran; the turn fails with it.
    pub(crate) error: Option<ReplayError>,
    /// Set while the engine drops a live execution it no longer wants: dropped futures
    /// then emit no cancel commands.
    pub(crate) detached: bool,
    /// Set by `continue_as_new`: the next execution's input.
    pub(crate) continue_as_new: Option<Result<Payload, Failure>>,
}

impl State {
    pub(crate) fn new(instance: InstanceId, execution: ExecutionId, codec: Codec) -> Self {
        Self {
            instance,
            execution,
            codec,
            parent: None,
            next_op: 0,
            ops: HashMap::new(),
            signals: Signals::default(),
            patches: HashMap::new(),
            expected: VecDeque::new(),
            position: 0,
            replaying: false,
            event_time: Timestamp::EPOCH,
            turn_time: Timestamp::EPOCH,
            rng: SplitMix64::new(0),
            new_events: Vec::new(),
            commands: Vec::new(),
            error: None,
            detached: false,
            continue_as_new: None,
        }
    }

    pub(crate) fn next_op(&mut self) -> OpId {
        let op = OpId::from_raw(self.next_op);
        self.next_op += 1;
        op
    }

    /// Records the first error of the turn; later ones are consequences of it.
    pub(crate) fn fail(&mut self, error: ReplayError) {
        self.error.get_or_insert(error);
    }

    /// Issues a command the code made: while replaying, checks it against the next
    /// recorded event; otherwise records it as a new event with the command `command`
    /// builds (called only then, so replay clones nothing).
    pub(crate) fn issue(
        &mut self,
        draft: EventKind,
        command: impl FnOnce(&EventKind) -> Option<Command>,
    ) -> Issued {
        if self.error.is_some() {
            return Issued::Diverged;
        }
        if let Some(recorded) = self.expected.front() {
            let error = if !recorded.kind.is_command_record() {
                ReplayError::UnexpectedCommand {
                    position: self.position,
                    issued: EventSummary::of(&draft),
                }
            } else if !same_command(&recorded.kind, &draft) {
                ReplayError::Nondeterminism {
                    position: self.position,
                    recorded: EventSummary::of(&recorded.kind),
                    issued: Some(EventSummary::of(&draft)),
                }
            } else {
                self.position += 1;
                return self
                    .expected
                    .pop_front()
                    .map_or(Issued::Diverged, |e| Issued::Replayed(e.kind));
            };
            self.fail(error);
            return Issued::Diverged;
        }
        if self.replaying {
            // Stored histories end at a turn boundary, holding everything the code did in
            // answer to its inputs: a command past the end is one it never issued.
            let issued = EventSummary::of(&draft);
            self.fail(ReplayError::UnexpectedCommand {
                position: self.position,
                issued,
            });
            return Issued::Diverged;
        }
        if let Some(command) = command(&draft) {
            self.commands.push(command);
        }
        self.new_events.push(Event {
            at: self.turn_time,
            kind: draft,
        });
        self.position += 1;
        Issued::Live
    }

    /// Starts waiting on an operation the code just issued.
    pub(crate) fn open_slot(&mut self, op: OpId, kind: OpKind, waker: &Waker) {
        self.ops.insert(
            op,
            Slot {
                kind,
                state: SlotState::Waiting(Some(waker.clone())),
            },
        );
    }

    /// Whether `op` is an operation of `kind` still waiting for its outcome: only then is
    /// a message about it admitted to the history.
    pub(crate) fn is_waiting(&self, op: OpId, kind: fn(&OpKind) -> bool) -> bool {
        self.ops
            .get(&op)
            .is_some_and(|slot| kind(&slot.kind) && matches!(slot.state, SlotState::Waiting(_)))
    }

    /// Delivers an operation's outcome and wakes its future.
    pub(crate) fn resolve(
        &mut self,
        op: OpId,
        kind: fn(&OpKind) -> bool,
        resolution: Resolution,
    ) -> Result<(), String> {
        let slot = self
            .ops
            .get_mut(&op)
            .ok_or_else(|| format!("operation {op} is not outstanding"))?;
        if !kind(&slot.kind) {
            return Err(format!(
                "operation {op} is a {:?}, not the kind this event completes",
                slot.kind
            ));
        }
        match std::mem::replace(&mut slot.state, SlotState::Resolved(resolution)) {
            SlotState::Waiting(waker) => {
                if let Some(waker) = waker {
                    waker.wake();
                }
                Ok(())
            }
            SlotState::Resolved(_) => Err(format!("operation {op} completed twice")),
        }
    }

    /// Polls an operation: its resolution once delivered (the slot is then freed).
    pub(crate) fn poll_slot(&mut self, op: OpId, waker: &Waker) -> Option<Resolution> {
        let slot = self.ops.get_mut(&op)?;
        match &mut slot.state {
            SlotState::Waiting(current) => {
                if !current.as_ref().is_some_and(|w| w.will_wake(waker)) {
                    *current = Some(waker.clone());
                }
                None
            }
            SlotState::Resolved(_) => match self.ops.remove(&op).map(|s| s.state) {
                Some(SlotState::Resolved(resolution)) => Some(resolution),
                _ => None,
            },
        }
    }

    /// An operation's future was dropped. If it was still waiting, the operation is
    /// cancelled: recorded, and a cancel command issued.
    pub(crate) fn drop_slot(&mut self, op: OpId) {
        let Some(slot) = self.ops.remove(&op) else {
            return;
        };
        if self.detached || !matches!(slot.state, SlotState::Waiting(_)) {
            return;
        }
        let cancel_op = self.next_op();
        self.issue(EventKind::OpCancelled { op, cancel_op }, |_| {
            Some(match slot.kind {
                OpKind::Activity => Command::CancelActivity { op },
                OpKind::Timer => Command::CancelTimer { op },
                OpKind::Child(instance) => Command::CancelChild { op, instance },
            })
        });
    }

    /// Operations and signal waits the orchestration is waiting on.
    pub(crate) fn outstanding(&self) -> usize {
        let ops = self
            .ops
            .values()
            .filter(|s| matches!(s.state, SlotState::Waiting(_)))
            .count();
        let waits = self
            .signals
            .waiters
            .values()
            .filter(|w| w.value.is_none())
            .count();
        ops + waits
    }

    /// The memoised answer of `patched(change_id)`.
    pub(crate) fn patched(&mut self, change_id: &str) -> bool {
        if let Some(&answer) = self.patches.get(change_id) {
            return answer;
        }
        let recorded_here = matches!(
            self.expected.front().map(|e| &e.kind),
            Some(EventKind::Patched { change_id: id, .. }) if id == change_id
        );
        // Replaying history made before the patch existed: take the old path.
        let answer = if recorded_here || !self.replaying {
            let op = self.next_op();
            let change_id = change_id.to_owned();
            !matches!(
                self.issue(EventKind::Patched { op, change_id }, |_| None),
                Issued::Diverged
            )
        } else {
            false
        };
        self.patches.insert(change_id.to_owned(), answer);
        answer
    }

    /// A signal arrived: the oldest wait for its name gets it, or it is buffered.
    pub(crate) fn deliver_signal(&mut self, name: String, payload: Payload) {
        let arrival = self.signals.next_arrival;
        self.signals.next_arrival += 1;
        self.hand_signal(name, arrival, payload);
    }

    fn hand_signal(&mut self, name: String, arrival: u64, payload: Payload) {
        let signals = &mut self.signals;
        let next = signals.waiting.get_mut(&name).and_then(VecDeque::pop_front);
        if let Some(waiter) = next.and_then(|id| signals.waiters.get_mut(&id)) {
            waiter.value = Some((arrival, payload));
            if let Some(waker) = waiter.waker.take() {
                waker.wake();
            }
            return;
        }
        let queue = signals.buffered.entry(name).or_default();
        // Keep arrival order even when a dropped wait hands its signal back.
        let at = queue.partition_point(|(a, _)| *a < arrival);
        queue.insert(at, (arrival, payload));
    }

    /// Polls a signal wait. `waiter` is `None` until the wait first has to wait.
    pub(crate) fn poll_signal(
        &mut self,
        name: &str,
        waiter: &mut Option<u64>,
        waker: &Waker,
    ) -> Option<Payload> {
        let signals = &mut self.signals;
        if let Some(id) = *waiter {
            let slot = signals.waiters.get_mut(&id)?;
            if let Some((_, payload)) = slot.value.take() {
                signals.waiters.remove(&id);
                *waiter = None;
                return Some(payload);
            }
            slot.waker = Some(waker.clone());
            return None;
        }
        if let Some((_, payload)) = signals.buffered.get_mut(name).and_then(VecDeque::pop_front) {
            return Some(payload);
        }
        let id = signals.next_waiter;
        signals.next_waiter += 1;
        signals.waiters.insert(
            id,
            Waiter {
                name: name.to_owned(),
                waker: Some(waker.clone()),
                value: None,
            },
        );
        signals
            .waiting
            .entry(name.to_owned())
            .or_default()
            .push_back(id);
        *waiter = Some(id);
        None
    }

    /// A signal wait was dropped: a signal it held but never returned goes to the next
    /// wait, or back to the buffer, so that every signal is consumed exactly once.
    pub(crate) fn drop_signal_wait(&mut self, id: u64) {
        let Some(waiter) = self.signals.waiters.remove(&id) else {
            return;
        };
        if let Some(queue) = self.signals.waiting.get_mut(&waiter.name) {
            queue.retain(|w| *w != id);
        }
        if let Some((arrival, payload)) = waiter.value {
            self.hand_signal(waiter.name, arrival, payload);
        }
    }

    /// Signals received and never consumed, in arrival order (for continue-as-new).
    pub(crate) fn unconsumed_signals(&mut self) -> Vec<(String, Payload)> {
        let mut all: Vec<(u64, String, Payload)> = self
            .signals
            .buffered
            .drain()
            .flat_map(|(name, queue)| queue.into_iter().map(move |(a, p)| (a, name.clone(), p)))
            .collect();
        all.sort_unstable_by_key(|(arrival, _, _)| *arrival);
        all.into_iter()
            .map(|(_, name, payload)| (name, payload))
            .collect()
    }
}

fn recorded_op(kind: &EventKind) -> Option<OpId> {
    match kind {
        EventKind::ActivityScheduled { op, .. }
        | EventKind::TimerCreated { op, .. }
        | EventKind::ChildScheduled { op, .. }
        | EventKind::SideEffectRecorded { op, .. }
        | EventKind::CustomStatusSet { op, .. }
        | EventKind::Patched { op, .. }
        | EventKind::OpCancelled { cancel_op: op, .. } => Some(*op),
        _ => None,
    }
}

/// Whether the command the code issued is the one recorded: same kind, same name, same
/// operation number (and, for cancels and side effects, the same target and variant).
/// Values the code computes from time (a timer's due time) are taken from the record.
fn same_command(recorded: &EventKind, issued: &EventKind) -> bool {
    let details_match = match (recorded, issued) {
        (EventKind::OpCancelled { op: a, .. }, EventKind::OpCancelled { op: b, .. }) => a == b,
        (
            EventKind::SideEffectRecorded { value: a, .. },
            EventKind::SideEffectRecorded { value: b, .. },
        ) => std::mem::discriminant(a) == std::mem::discriminant(b),
        _ => true,
    };
    recorded.name() == issued.name()
        && recorded.label() == issued.label()
        && recorded_op(recorded) == recorded_op(issued)
        && details_match
}
