//! What a turn asks the outside world to do, and how the execution stands after it.

use keel_core::{
    ActivityOptions, Event, Failure, InstanceId, OpId, Outcome, ParentLink, Payload, Timestamp,
};

/// A side effect of a turn for the provider to carry out, atomically with appending the
/// turn's events.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Enqueue an activity work item.
    ScheduleActivity {
        /// The operation its result completes.
        op: OpId,
        /// The activity's registered name.
        name: String,
        /// Its input.
        input: Payload,
        /// Routing, priority and retries.
        options: ActivityOptions,
    },
    /// Enqueue a `TimerFired` message to this instance, invisible until `fire_at`.
    StartTimer {
        /// The operation.
        op: OpId,
        /// When it fires.
        fire_at: Timestamp,
    },
    /// Create the child instance and enqueue its start.
    StartChild {
        /// The operation its outcome completes.
        op: OpId,
        /// The child orchestration's registered name.
        name: String,
        /// The version to run; the newest registered when none.
        version: Option<u32>,
        /// The child's instance id.
        instance: InstanceId,
        /// Its input.
        input: Payload,
    },
    /// Cancel a scheduled activity: delete its work item, or make its lease renewal fail
    /// if it is running (the activity's cancellation signal).
    CancelActivity {
        /// The activity's operation.
        op: OpId,
    },
    /// Drop a timer that has not fired (its message may also be left to arrive stale).
    CancelTimer {
        /// The timer's operation.
        op: OpId,
    },
    /// Cancel a child instance (and, through its own turn, its children and activities).
    CancelChild {
        /// The child's operation.
        op: OpId,
        /// The child's instance id.
        instance: InstanceId,
    },
    /// Send this child execution's outcome to its parent.
    ReportToParent {
        /// Where to send it.
        parent: ParentLink,
        /// The outcome.
        outcome: Outcome,
    },
}

/// How the execution stands at the end of a turn.
#[derive(Debug, Clone, PartialEq)]
pub enum ExecutionState {
    /// Not started yet: no Start message has been seen.
    NotStarted,
    /// Waiting on durable operations.
    Running,
    /// Returned successfully.
    Completed {
        /// The output.
        output: Payload,
    },
    /// Returned an error.
    Failed {
        /// Why.
        failure: Failure,
    },
    /// Cancelled on request.
    Cancelled {
        /// Why.
        reason: String,
    },
    /// Ended with continue-as-new: start the next execution with `input`, delivering
    /// `signals` (received but never consumed, in arrival order) to it.
    ContinuedAsNew {
        /// The next execution's input.
        input: Payload,
        /// Unconsumed signals, as (name, payload), in arrival order.
        signals: Vec<(String, Payload)>,
    },
}

impl ExecutionState {
    /// Whether the execution has ended.
    pub fn is_finished(&self) -> bool {
        !matches!(self, Self::NotStarted | Self::Running)
    }
}

/// The result of one turn: append `events` to the history, carry out `commands`, and
/// record `state`, all in one transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    /// New history events, in order.
    pub events: Vec<Event>,
    /// Side effects for the provider.
    pub commands: Vec<Command>,
    /// The execution's state afterwards.
    pub state: ExecutionState,
}
