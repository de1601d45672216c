//! A random environment: it answers a program's commands the way workers, timers and
//! clients would, in random batches and orders, with duplicates and stale messages.

use std::collections::BTreeSet;
use std::sync::Arc;

use keel_core::{
    Event, EventKind, ExecutionId, Failure, InstanceId, Message, OpId, Payload, SplitMix64,
    Timestamp,
};
use keel_replay::{Command, Execution, Orchestration, ReplayError, Turn, TurnEnv};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use super::program::{Program, Trace};
use crate::support::encode;

/// More turns than any generated program needs when every batch is small.
const MAX_TURNS: usize = 120;

/// An operation the environment still owes an answer.
#[derive(Debug, Clone)]
enum Pending {
    Activity(OpId, String),
    Timer(OpId),
    Child(OpId, String),
}

impl Pending {
    fn op(&self) -> OpId {
        match self {
            Self::Activity(op, _) | Self::Timer(op) | Self::Child(op, _) => *op,
        }
    }
}

pub(super) fn fail(what: &str, error: &ReplayError) -> TestCaseError {
    TestCaseError::fail(format!("{what}: {error}"))
}

pub(super) fn len(history: &[Event]) -> u64 {
    u64::try_from(history.len()).unwrap_or(u64::MAX)
}

pub(super) fn execution(orchestration: Arc<dyn Orchestration>) -> Execution {
    let instance = InstanceId::new("prop-instance").expect("a valid instance id");
    Execution::new(instance, ExecutionId::FIRST, 1, orchestration)
}

fn start() -> Message {
    Message::Start {
        execution: ExecutionId::FIRST,
        name: "program".into(),
        version: None,
        input: encode(&()),
        parent: None,
    }
}

/// A finished (or given-up) run: the live execution and the history it wrote.
#[derive(Debug)]
pub(super) struct Run {
    pub(super) live: Execution,
    pub(super) history: Vec<Event>,
    /// After each turn: the history's length and how many leaves had finished.
    pub(super) boundaries: Vec<(usize, usize)>,
}

struct Driver {
    rng: SplitMix64,
    now: u64,
    outstanding: Vec<Pending>,
    /// Ops answered or cancelled: anything about them now is stale.
    closed: Vec<Pending>,
    /// Messages already sent, to send again as duplicates.
    sent: Vec<Message>,
    signal_names: Vec<String>,
    signals_sent: u64,
}

impl Driver {
    fn new(seed: u64, program: &Program) -> Self {
        let mut names = BTreeSet::new();
        program.body.signal_names(&mut names);
        Self {
            rng: SplitMix64::new(seed),
            now: 1_000_000,
            outstanding: Vec::new(),
            closed: Vec::new(),
            sent: Vec::new(),
            signal_names: names.into_iter().collect(),
            signals_sent: 0,
        }
    }

    /// A uniform index below `n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        let n = u64::try_from(n).unwrap_or(u64::MAX).max(1);
        usize::try_from(self.rng.next_u64() % n).unwrap_or(0)
    }

    /// True with probability 1/`n`.
    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    fn env(&mut self) -> TurnEnv {
        self.now += 1 + u64::try_from(self.below(5_000)).unwrap_or(0);
        TurnEnv {
            now: Timestamp::from_millis(self.now),
            seed: self.rng.next_u64(),
        }
    }

    fn signal(&mut self) -> Message {
        self.signals_sent += 1;
        // Mostly the program's names; sometimes one nobody waits for.
        let name = match self.below(self.signal_names.len() + 1) {
            index if index < self.signal_names.len() => self.signal_names[index].clone(),
            _ => "stray".to_owned(),
        };
        // Now and then a payload the program cannot decode as a string.
        let payload = if self.one_in(6) {
            encode(&self.signals_sent)
        } else {
            encode(&format!("v{}", self.signals_sent))
        };
        Message::Signal { name, payload }
    }

    fn outcome(&mut self, what: &str, op: OpId) -> Result<Payload, Failure> {
        match self.below(8) {
            0 => Err(Failure::new("boom", format!("{what} {op} failed"))),
            1 => Ok(encode(&op.get())),
            _ => Ok(encode(&format!("{what}@{}", op.get()))),
        }
    }

    fn answer(&mut self, pending: &Pending, execution: ExecutionId) -> Message {
        match pending {
            Pending::Activity(op, name) => {
                let outcome = self.outcome(name, *op);
                Message::ActivityDone {
                    execution,
                    op: *op,
                    outcome,
                }
            }
            Pending::Timer(op) => Message::TimerFired { execution, op: *op },
            Pending::Child(op, name) => {
                let outcome = self.outcome(name, *op);
                Message::ChildDone {
                    execution,
                    op: *op,
                    outcome,
                }
            }
        }
    }

    /// A message the engine must drop: a second start, or one about an op of another
    /// kind, of another execution, closed already, or never issued.
    fn stale(&mut self) -> Option<Message> {
        let other = ExecutionId::FIRST.next();
        match self.below(5) {
            4 => Some(start()),
            0 if !self.sent.is_empty() => {
                let index = self.below(self.sent.len());
                Some(self.sent[index].clone())
            }
            1 if !self.closed.is_empty() => {
                let index = self.below(self.closed.len());
                let pending = self.closed[index].clone();
                Some(self.answer(&pending, ExecutionId::FIRST))
            }
            2 if !self.outstanding.is_empty() => {
                let index = self.below(self.outstanding.len());
                let pending = self.outstanding[index].clone();
                if self.one_in(2) {
                    return Some(self.answer(&pending, other));
                }
                // The right op with the wrong kind of answer.
                let op = pending.op();
                Some(match pending {
                    Pending::Activity(..) => Message::TimerFired {
                        execution: ExecutionId::FIRST,
                        op,
                    },
                    Pending::Timer(_) | Pending::Child(..) => Message::ActivityDone {
                        execution: ExecutionId::FIRST,
                        op,
                        outcome: Ok(encode("wrong kind")),
                    },
                })
            }
            _ => {
                let op = OpId::from_raw(10_000 + u64::try_from(self.below(10)).unwrap_or(0));
                let pending = match self.below(3) {
                    0 => Pending::Activity(op, "ghost".to_owned()),
                    1 => Pending::Timer(op),
                    _ => Pending::Child(op, "ghost".to_owned()),
                };
                Some(self.answer(&pending, ExecutionId::FIRST))
            }
        }
    }

    fn first_messages(&mut self) -> Vec<Message> {
        let mut messages = vec![start()];
        // Signals may arrive before anyone waits for them, even with the start.
        for _ in 0..self.below(3) {
            messages.push(self.signal());
        }
        if self.one_in(64) {
            messages.push(Message::Cancel {
                reason: "cancelled at once".to_owned(),
            });
        }
        self.shuffle(&mut messages);
        messages
    }

    fn next_messages(&mut self) -> Vec<Message> {
        let mut messages = Vec::new();
        // A random non-empty subset of the answers owed.
        if !self.outstanding.is_empty() {
            let must = self.below(self.outstanding.len());
            let mut keep = Vec::new();
            for (index, pending) in std::mem::take(&mut self.outstanding)
                .into_iter()
                .enumerate()
            {
                if index == must || self.one_in(2) {
                    messages.push(self.answer(&pending, ExecutionId::FIRST));
                    self.closed.push(pending);
                } else {
                    keep.push(pending);
                }
            }
            self.outstanding = keep;
        }
        // Signals: sometimes, and always when nothing else can wake the program.
        if messages.is_empty() || self.one_in(3) {
            for _ in 0..=self.below(2) {
                messages.push(self.signal());
            }
        }
        if self.one_in(3) {
            messages.extend(self.stale());
        }
        // The same message twice in one batch (a redelivery).
        if !messages.is_empty() && self.one_in(6) {
            let index = self.below(messages.len());
            messages.push(messages[index].clone());
        }
        if self.one_in(64) {
            messages.push(Message::Cancel {
                reason: "the environment gave up".to_owned(),
            });
        }
        self.sent.extend(messages.iter().cloned());
        self.shuffle(&mut messages);
        messages
    }

    fn shuffle(&mut self, messages: &mut [Message]) {
        for i in (1..messages.len()).rev() {
            let j = self.below(i + 1);
            messages.swap(i, j);
        }
    }

    /// Takes note of what a turn asked for.
    fn observe(&mut self, turn: &Turn) {
        for command in &turn.commands {
            match command {
                Command::ScheduleActivity { op, name, .. } => {
                    self.outstanding.push(Pending::Activity(*op, name.clone()));
                }
                Command::StartTimer { op, .. } => self.outstanding.push(Pending::Timer(*op)),
                Command::StartChild { op, name, .. } => {
                    self.outstanding.push(Pending::Child(*op, name.clone()));
                }
                Command::CancelActivity { op }
                | Command::CancelTimer { op }
                | Command::CancelChild { op, .. } => {
                    if let Some(index) = self.outstanding.iter().position(|p| p.op() == *op) {
                        let cancelled = self.outstanding.remove(index);
                        self.closed.push(cancelled);
                    }
                }
                Command::ReportToParent { .. } => {}
            }
        }
    }
}

/// Every command of a turn is backed by the event that records it, with the same op.
fn check_commands(turn: &Turn) -> Result<(), TestCaseError> {
    for command in &turn.commands {
        let recorded = turn
            .events
            .iter()
            .any(|event| match (command, &event.kind) {
                (
                    Command::ScheduleActivity { op, name, .. },
                    EventKind::ActivityScheduled { op: o, name: n, .. },
                )
                | (
                    Command::StartChild { op, name, .. },
                    EventKind::ChildScheduled { op: o, name: n, .. },
                ) => op == o && name == n,
                (Command::StartTimer { op, .. }, EventKind::TimerCreated { op: o, .. })
                | (
                    Command::CancelActivity { op }
                    | Command::CancelTimer { op }
                    | Command::CancelChild { op, .. },
                    EventKind::OpCancelled { op: o, .. },
                ) => op == o,
                _ => false,
            });
        prop_assert!(recorded, "{command:?} has no event in {:?}", turn.events);
    }
    Ok(())
}

/// Runs `program` (as `orchestration`, logging to `trace`) against a random environment
/// seeded by `seed` until it ends or [`MAX_TURNS`] pass.
///
/// With `check_prefixes`, before every turn a fresh execution replays the history so far
/// and must agree with the live one: same length and state, then the same turn from the
/// same messages.
pub(super) fn drive(
    orchestration: &Arc<dyn Orchestration>,
    program: &Program,
    trace: &Trace,
    seed: u64,
    check_prefixes: bool,
) -> Result<Run, TestCaseError> {
    let mut driver = Driver::new(seed, program);
    let mut live = execution(orchestration.clone());
    let mut history: Vec<Event> = Vec::new();
    let mut boundaries = Vec::new();
    for number in 0..MAX_TURNS {
        let messages = if number == 0 {
            driver.first_messages()
        } else {
            driver.next_messages()
        };
        let env = driver.env();
        let turn = if check_prefixes {
            let mut fresh = execution(orchestration.clone());
            fresh
                .replay(history.clone())
                .map_err(|e| fail("replaying a prefix", &e))?;
            prop_assert_eq!(
                fresh.history_len(),
                live.history_len(),
                "before turn {}",
                number
            );
            prop_assert_eq!(fresh.state(), live.state(), "before turn {}", number);
            let live_turn = live
                .turn(messages.clone(), env)
                .map_err(|e| fail("a live turn", &e))?;
            let fresh_turn = fresh
                .turn(messages.clone(), env)
                .map_err(|e| fail("a replayed turn", &e))?;
            prop_assert_eq!(
                &live_turn,
                &fresh_turn,
                "turn {} from {:?} differs between the cached and the replayed execution",
                number,
                messages
            );
            live_turn
        } else {
            live.turn(messages, env)
                .map_err(|e| fail("a live turn", &e))?
        };
        check_commands(&turn)?;
        history.extend(turn.events.iter().cloned());
        prop_assert_eq!(live.history_len(), len(&history));
        boundaries.push((history.len(), trace.finished().len()));
        driver.observe(&turn);
        if turn.state.is_finished() {
            break;
        }
    }
    Ok(Run {
        live,
        history,
        boundaries,
    })
}
