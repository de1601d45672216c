//! Messages queued for an orchestration instance.

use serde::{Deserialize, Serialize};

use crate::event::ParentLink;
use crate::failure::Failure;
use crate::ids::{ExecutionId, OpId};
use crate::payload::Payload;

/// The result of an activity or child: its output, or why it failed.
pub type Outcome = Result<Payload, Failure>;

/// A message for an orchestration instance. A turn consumes all the visible messages of
/// one instance and turns them into history events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Start an execution (a new instance, or the next execution after continue-as-new).
    Start {
        /// The execution to start.
        execution: ExecutionId,
        /// The orchestration's registered name.
        name: String,
        /// The version to run; the newest registered when none.
        version: Option<u32>,
        /// Its input.
        input: Payload,
        /// Set when the instance is a child.
        parent: Option<ParentLink>,
    },
    /// An activity's final outcome.
    ActivityDone {
        /// The execution that scheduled it.
        execution: ExecutionId,
        /// The operation.
        op: OpId,
        /// Output or failure.
        outcome: Outcome,
    },
    /// A durable timer is due.
    TimerFired {
        /// The execution that set it.
        execution: ExecutionId,
        /// The operation.
        op: OpId,
    },
    /// A child's final outcome.
    ChildDone {
        /// The execution that started it.
        execution: ExecutionId,
        /// The operation.
        op: OpId,
        /// Output or failure.
        outcome: Outcome,
    },
    /// An external signal, for whichever execution is current.
    Signal {
        /// The signal's name.
        name: String,
        /// Its data.
        payload: Payload,
    },
    /// A request to cancel the instance, for whichever execution is current.
    Cancel {
        /// Why.
        reason: String,
    },
}

impl Message {
    /// The execution the message belongs to; `None` for signals and cancels, which go
    /// to the current one. A message for another execution is stale and dropped.
    pub fn execution(&self) -> Option<ExecutionId> {
        match self {
            Self::Start { execution, .. }
            | Self::ActivityDone { execution, .. }
            | Self::TimerFired { execution, .. }
            | Self::ChildDone { execution, .. } => Some(*execution),
            Self::Signal { .. } | Self::Cancel { .. } => None,
        }
    }

    /// The variant's name, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Start { .. } => "Start",
            Self::ActivityDone { .. } => "ActivityDone",
            Self::TimerFired { .. } => "TimerFired",
            Self::ChildDone { .. } => "ChildDone",
            Self::Signal { .. } => "Signal",
            Self::Cancel { .. } => "Cancel",
        }
    }
}
