//! The history of an execution: an append-only list of events.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::failure::Failure;
use crate::ids::{ExecutionId, InstanceId, OpId, QueueName};
use crate::payload::Payload;
use crate::retry::RetryPolicy;
use crate::time::Timestamp;

/// One entry of an execution's history: what happened, and when it was recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// When the turn that recorded the event ran.
    pub at: Timestamp,
    /// What happened.
    pub kind: EventKind,
}

/// Where a child execution reports its outcome.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ParentLink {
    /// The parent instance.
    pub instance: InstanceId,
    /// The parent's execution that started the child.
    pub execution: ExecutionId,
    /// The parent's operation waiting for the child.
    pub op: OpId,
}

/// How an activity is run: where it is routed, how urgently, and how it is retried.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ActivityOptions {
    /// The queue whose workers run it.
    pub queue: QueueName,
    /// Higher runs first among the items of one queue.
    pub priority: i32,
    /// Retries, back-off and the per-attempt timeout.
    pub retry: RetryPolicy,
}

/// A value recorded once so that replay reads it instead of producing it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SideEffect {
    /// `ctx.now()`.
    Time(Timestamp),
    /// `ctx.uuid()`, as its 128 bits.
    Uuid(u128),
    /// `ctx.random()`.
    Random(u64),
}

/// What happened. Variants that record something the orchestration code did are
/// *command records*: replay checks each against the command the code issues again.
/// The others are *inputs*: they are delivered to the code.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EventKind {
    /// Input: the execution began.
    ExecutionStarted {
        /// The orchestration's registered name.
        name: String,
        /// The registered version that runs it.
        version: u32,
        /// The orchestration's input.
        input: Payload,
        /// Set when this is a child execution.
        parent: Option<ParentLink>,
    },
    /// Command record: an activity was scheduled.
    ActivityScheduled {
        /// The operation.
        op: OpId,
        /// The activity's registered name.
        name: String,
        /// Its input.
        input: Payload,
        /// Routing, priority and retries.
        options: ActivityOptions,
    },
    /// Input: an activity returned.
    ActivityCompleted {
        /// The operation.
        op: OpId,
        /// Its output.
        output: Payload,
    },
    /// Input: an activity failed for good (its retries, if any, are spent).
    ActivityFailed {
        /// The operation.
        op: OpId,
        /// Why.
        failure: Failure,
    },
    /// Command record: a durable timer was set.
    TimerCreated {
        /// The operation.
        op: OpId,
        /// When it fires.
        fire_at: Timestamp,
    },
    /// Input: a timer fired.
    TimerFired {
        /// The operation.
        op: OpId,
    },
    /// Command record: a child orchestration was started.
    ChildScheduled {
        /// The operation.
        op: OpId,
        /// The child orchestration's registered name.
        name: String,
        /// The version to run; the newest registered when none.
        version: Option<u32>,
        /// The child's instance id.
        instance: InstanceId,
        /// The child's input.
        input: Payload,
    },
    /// Input: a child completed.
    ChildCompleted {
        /// The operation.
        op: OpId,
        /// Its output.
        output: Payload,
    },
    /// Input: a child failed or was cancelled.
    ChildFailed {
        /// The operation.
        op: OpId,
        /// Why.
        failure: Failure,
    },
    /// Input: an external signal arrived.
    SignalReceived {
        /// The signal's name.
        name: String,
        /// Its data.
        payload: Payload,
    },
    /// Command record: a side effect's value.
    SideEffectRecorded {
        /// The operation.
        op: OpId,
        /// The value.
        value: SideEffect,
    },
    /// Command record: the code set its custom status.
    CustomStatusSet {
        /// The operation.
        op: OpId,
        /// The new status; none clears it.
        status: Option<Payload>,
    },
    /// Command record: `patched(change_id)` took the new code path.
    Patched {
        /// The operation.
        op: OpId,
        /// The change's id.
        change_id: String,
    },
    /// Command record: an unfinished activity, timer or child was dropped, so it was
    /// cancelled.
    OpCancelled {
        /// The operation cancelled (its own op id).
        op: OpId,
        /// The op id of this record.
        cancel_op: OpId,
    },
    /// Input: someone asked to cancel the instance.
    CancelRequested {
        /// Why.
        reason: String,
    },
    /// Command record, terminal: the execution ended, and a new one starts with `input`.
    ContinuedAsNew {
        /// The next execution's input.
        input: Payload,
    },
    /// Command record, terminal: the orchestration returned successfully.
    ExecutionCompleted {
        /// Its output.
        output: Payload,
    },
    /// Command record, terminal: the orchestration returned an error.
    ExecutionFailed {
        /// Why.
        failure: Failure,
    },
    /// Command record, terminal: the execution was cancelled.
    ExecutionCancelled {
        /// Why.
        reason: String,
    },
}

impl EventKind {
    /// The variant's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::ExecutionStarted { .. } => "ExecutionStarted",
            Self::ActivityScheduled { .. } => "ActivityScheduled",
            Self::ActivityCompleted { .. } => "ActivityCompleted",
            Self::ActivityFailed { .. } => "ActivityFailed",
            Self::TimerCreated { .. } => "TimerCreated",
            Self::TimerFired { .. } => "TimerFired",
            Self::ChildScheduled { .. } => "ChildScheduled",
            Self::ChildCompleted { .. } => "ChildCompleted",
            Self::ChildFailed { .. } => "ChildFailed",
            Self::SignalReceived { .. } => "SignalReceived",
            Self::SideEffectRecorded { .. } => "SideEffectRecorded",
            Self::CustomStatusSet { .. } => "CustomStatusSet",
            Self::Patched { .. } => "Patched",
            Self::OpCancelled { .. } => "OpCancelled",
            Self::CancelRequested { .. } => "CancelRequested",
            Self::ContinuedAsNew { .. } => "ContinuedAsNew",
            Self::ExecutionCompleted { .. } => "ExecutionCompleted",
            Self::ExecutionFailed { .. } => "ExecutionFailed",
            Self::ExecutionCancelled { .. } => "ExecutionCancelled",
        }
    }

    /// Whether this records something the orchestration code did (see the type's doc).
    pub fn is_command_record(&self) -> bool {
        !matches!(
            self,
            Self::ExecutionStarted { .. }
                | Self::ActivityCompleted { .. }
                | Self::ActivityFailed { .. }
                | Self::TimerFired { .. }
                | Self::ChildCompleted { .. }
                | Self::ChildFailed { .. }
                | Self::SignalReceived { .. }
                | Self::CancelRequested { .. }
        )
    }

    /// Whether this ends the execution.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::ContinuedAsNew { .. }
                | Self::ExecutionCompleted { .. }
                | Self::ExecutionFailed { .. }
                | Self::ExecutionCancelled { .. }
        )
    }

    /// The user-given name the event carries (activity, child, signal, change id), if any.
    pub fn label(&self) -> Option<&str> {
        match self {
            Self::ExecutionStarted { name, .. }
            | Self::ActivityScheduled { name, .. }
            | Self::ChildScheduled { name, .. }
            | Self::SignalReceived { name, .. } => Some(name),
            Self::Patched { change_id, .. } => Some(change_id),
            _ => None,
        }
    }
}

/// Per-attempt timeouts are part of the retry policy; this reads it from the options.
impl ActivityOptions {
    /// The per-attempt timeout, if any.
    pub fn attempt_timeout(&self) -> Option<Duration> {
        self.retry.attempt_timeout
    }
}
