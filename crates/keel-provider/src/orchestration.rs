//! The orchestrator queue: fetching an instance's messages under a lock, and the ack
//! that commits a turn.

use std::time::Duration;

use keel_core::{
    Event, ExecutionId, Failure, InstanceId, InstanceStatus, Message, OpId, Payload, Timestamp,
    WorkItem,
};

use crate::activity::LeasedWorkItem;
use crate::error::Result;
use crate::instance::NewInstance;

/// Names one claim on an instance's messages: proof of the lock when acking. A token
/// from an earlier claim of the same instance is stale.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LockToken {
    instance: InstanceId,
    token: u64,
}

impl LockToken {
    /// A token for `instance`; `token` is the provider's, unique per claim.
    pub fn new(instance: InstanceId, token: u64) -> Self {
        Self { instance, token }
    }

    /// The locked instance.
    pub fn instance(&self) -> &InstanceId {
        &self.instance
    }

    /// The provider's token number.
    pub fn token(&self) -> u64 {
        self.token
    }
}

/// The provider's id of a queued message, for deleting it in the ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(pub u64);

/// A message as queued.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedMessage {
    /// Its id.
    pub id: MessageId,
    /// The message.
    pub message: Message,
    /// When it was enqueued.
    pub enqueued_at: Timestamp,
}

/// What to fetch from the orchestrator queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchOrchestrations {
    /// At most this many instances.
    pub max_instances: usize,
    /// How long the locks last unless renewed.
    pub lock_for: Duration,
    /// Whether to read each instance's current history too. A worker with the instance
    /// cached passes false and reads the history only on a cache miss.
    pub with_history: bool,
}

/// One instance's work: all its visible messages, under one lock.
#[derive(Debug, Clone, PartialEq)]
pub struct OrchestrationWork {
    /// The lock; pass it to the ack.
    pub lock: LockToken,
    /// When the lock expires unless renewed.
    pub locked_until: Timestamp,
    /// The orchestration's registered name.
    pub name: String,
    /// The version its execution runs, once chosen.
    pub version: Option<u32>,
    /// Its status.
    pub status: InstanceStatus,
    /// Its current execution.
    pub execution: ExecutionId,
    /// Events in the current execution's history: the cache key.
    pub history_len: u64,
    /// The history, when asked for.
    pub history: Option<Vec<Event>>,
    /// Every visible message, oldest first.
    pub messages: Vec<QueuedMessage>,
}

/// A message to enqueue for an instance.
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingMessage {
    /// The instance it is for (this one for timers, another for a parent or child).
    pub to: InstanceId,
    /// The message.
    pub message: Message,
    /// Invisible until then (timers); visible at once when none.
    pub visible_at: Option<Timestamp>,
}

/// How an execution stands after a turn.
#[derive(Debug, Clone, PartialEq)]
pub enum TurnOutcome {
    /// Still running. A paused or suspended instance stays so.
    Running,
    /// Completed with an output.
    Completed(Payload),
    /// Failed.
    Failed(Failure),
    /// Cancelled.
    Cancelled(Failure),
    /// Ended with continue-as-new: the provider starts the next execution with a fresh
    /// history and enqueues its start message, then `carried` (e.g. unconsumed signals).
    ContinuedAsNew {
        /// The next execution's input.
        input: Payload,
        /// The version the next execution runs; the newest registered when none.
        version: Option<u32>,
        /// Messages for the next execution, after its start.
        carried: Vec<Message>,
    },
}

/// The custom status after a turn.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CustomStatusUpdate {
    /// Left as it was.
    #[default]
    Unchanged,
    /// Set to this.
    Set(Payload),
    /// Cleared.
    Cleared,
}

/// Everything one turn commits, atomically.
#[derive(Debug, Clone, PartialEq)]
pub struct Ack {
    /// The lock from the fetch.
    pub lock: LockToken,
    /// The version the execution runs (recorded on its first turn).
    pub version: Option<u32>,
    /// The messages the turn consumed, to delete. Messages that arrived during the turn
    /// are not among them and stay queued.
    pub consumed: Vec<MessageId>,
    /// New history events, appended to the current execution's history in order.
    pub events: Vec<Event>,
    /// Activity work items to enqueue (visible at once, attempt 1).
    pub activities: Vec<WorkItem>,
    /// Activity work items of this execution to cancel: queued ones are deleted; leased
    /// ones are marked so that their lease renewal fails.
    pub cancel_activities: Vec<OpId>,
    /// Messages to enqueue: timers to itself, reports to a parent, cancels to children.
    pub messages: Vec<OutgoingMessage>,
    /// Child instances to create (as with [`OnConflict::ReturnExisting`](crate::OnConflict)).
    pub children: Vec<NewInstance>,
    /// The custom status.
    pub custom_status: CustomStatusUpdate,
    /// How the execution stands.
    pub outcome: TurnOutcome,
}

/// What [`Provider::ack_turns_leasing`](crate::Provider::ack_turns_leasing) committed.
#[derive(Debug)]
pub struct AckedTurns {
    /// One result per ack, in order, as [`Provider::ack_turns`](crate::Provider::ack_turns)
    /// returns them.
    pub results: Vec<Result<()>>,
    /// The activity items the committed acks enqueued that are leased to the caller.
    pub leased: Vec<LeasedWorkItem>,
}

impl Ack {
    /// An ack that consumes `consumed` and changes nothing else.
    pub fn new(lock: LockToken, consumed: Vec<MessageId>) -> Self {
        Self {
            lock,
            version: None,
            consumed,
            events: Vec::new(),
            activities: Vec::new(),
            cancel_activities: Vec::new(),
            messages: Vec::new(),
            children: Vec::new(),
            custom_status: CustomStatusUpdate::Unchanged,
            outcome: TurnOutcome::Running,
        }
    }
}
