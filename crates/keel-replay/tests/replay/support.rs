//! A hand-cranked environment for orchestrations: it runs turns, keeps the history the
//! way a provider would, and answers commands with messages the test chooses.

#![allow(dead_code, reason = "each test module uses a different part")]

use std::sync::Arc;

use keel_core::{
    Codec, Event, ExecutionId, Failure, InstanceId, Message, OpId, Payload, Timestamp,
};
use keel_replay::{Command, Execution, ExecutionState, Orchestration, ReplayError, Turn, TurnEnv};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub(crate) const CODEC: Codec = Codec::new(keel_core::Format::Json);

pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> Payload {
    CODEC.encode(value).expect("test values encode")
}

pub(crate) fn decode<T: DeserializeOwned>(payload: &Payload) -> T {
    CODEC.decode(payload).expect("test payloads decode")
}

/// One instance's execution under test, with its full history.
pub(crate) struct Harness {
    pub(crate) orchestration: Arc<dyn Orchestration>,
    pub(crate) instance: InstanceId,
    pub(crate) execution: ExecutionId,
    pub(crate) version: u32,
    pub(crate) live: Execution,
    pub(crate) history: Vec<Event>,
    pub(crate) now: Timestamp,
    seed: u64,
}

impl Harness {
    pub(crate) fn new(orchestration: impl Orchestration) -> Self {
        Self::with_arc(Arc::new(orchestration))
    }

    pub(crate) fn with_arc(orchestration: Arc<dyn Orchestration>) -> Self {
        let instance = InstanceId::new("test-instance").expect("valid id");
        let live = Execution::new(
            instance.clone(),
            ExecutionId::FIRST,
            1,
            orchestration.clone(),
        );
        Self {
            orchestration,
            instance,
            execution: ExecutionId::FIRST,
            version: 1,
            live,
            history: Vec::new(),
            now: Timestamp::from_millis(1_000_000),
            seed: 1,
        }
    }

    pub(crate) fn env(&mut self) -> TurnEnv {
        self.seed += 1;
        TurnEnv {
            now: self.now,
            seed: self.seed,
        }
    }

    /// Runs one live turn and appends its events to the history.
    pub(crate) fn turn(&mut self, messages: Vec<Message>) -> Result<Turn, ReplayError> {
        let env = self.env();
        let turn = self.live.turn(messages, env)?;
        self.history.extend(turn.events.iter().cloned());
        Ok(turn)
    }

    pub(crate) fn start<T: Serialize + ?Sized>(&mut self, input: &T) -> Turn {
        self.turn(vec![self.start_message(input)])
            .expect("the start turn succeeds")
    }

    pub(crate) fn start_message<T: Serialize + ?Sized>(&self, input: &T) -> Message {
        Message::Start {
            execution: self.execution,
            name: "test".into(),
            version: None,
            input: encode(input),
            parent: None,
        }
    }

    pub(crate) fn send(&mut self, messages: Vec<Message>) -> Turn {
        self.turn(messages).expect("the turn succeeds")
    }

    /// A fresh execution of the same code that replays the whole history.
    pub(crate) fn replay_fresh(&self) -> Result<Execution, ReplayError> {
        self.replay_with(self.orchestration.clone())
    }

    /// Replays the history with other code (to test nondeterminism).
    pub(crate) fn replay_with(
        &self,
        orchestration: Arc<dyn Orchestration>,
    ) -> Result<Execution, ReplayError> {
        let mut fresh = Execution::new(
            self.instance.clone(),
            self.execution,
            self.version,
            orchestration,
        );
        fresh.replay(self.history.clone())?;
        Ok(fresh)
    }

    pub(crate) fn done(&self, op: OpId, value: &impl Serialize) -> Message {
        Message::ActivityDone {
            execution: self.execution,
            op,
            outcome: Ok(encode(value)),
        }
    }

    pub(crate) fn failed(&self, op: OpId, failure: Failure) -> Message {
        Message::ActivityDone {
            execution: self.execution,
            op,
            outcome: Err(failure),
        }
    }

    pub(crate) fn fired(&self, op: OpId) -> Message {
        Message::TimerFired {
            execution: self.execution,
            op,
        }
    }

    pub(crate) fn child_done(&self, op: OpId, outcome: Result<Payload, Failure>) -> Message {
        Message::ChildDone {
            execution: self.execution,
            op,
            outcome,
        }
    }

    #[allow(clippy::unused_self, reason = "reads like the other message builders")]
    pub(crate) fn signal(&self, name: &str, value: &impl Serialize) -> Message {
        Message::Signal {
            name: name.into(),
            payload: encode(value),
        }
    }
}

/// The activities a turn scheduled, as (op, name, decoded input as JSON).
pub(crate) fn scheduled(turn: &Turn) -> Vec<(OpId, String)> {
    turn.commands
        .iter()
        .filter_map(|c| match c {
            Command::ScheduleActivity { op, name, .. } => Some((*op, name.clone())),
            _ => None,
        })
        .collect()
}

/// The timers a turn started, as (op, fire_at).
pub(crate) fn timers(turn: &Turn) -> Vec<(OpId, Timestamp)> {
    turn.commands
        .iter()
        .filter_map(|c| match c {
            Command::StartTimer { op, fire_at } => Some((*op, *fire_at)),
            _ => None,
        })
        .collect()
}

/// The output of a completed execution, decoded.
pub(crate) fn output<T: DeserializeOwned>(state: &ExecutionState) -> T {
    match state {
        ExecutionState::Completed { output } => decode(output),
        other => panic!("expected a completed execution, got {other:?}"),
    }
}
