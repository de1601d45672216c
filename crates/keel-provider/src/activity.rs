//! The activity queue: leased work items, their completion, retries, limits and dead
//! letters.

use std::time::Duration;

use keel_core::{ExecutionId, Failure, InstanceId, OpId, Outcome, QueueName, Timestamp, WorkItem};

use crate::error::Result;
use crate::orchestration::OrchestrationWork;

/// Names one lease on a work item: proof when renewing or completing it. A token from
/// an earlier lease of the same item is stale.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseToken {
    item: u64,
    token: u64,
}

impl LeaseToken {
    /// A token for the provider's item `item`; `token` is unique per lease.
    pub fn new(item: u64, token: u64) -> Self {
        Self { item, token }
    }

    /// The provider's id of the item.
    pub fn item(&self) -> u64 {
        self.item
    }

    /// The provider's token number.
    pub fn token(&self) -> u64 {
        self.token
    }
}

/// What to fetch from the activity queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchActivities {
    /// Only items routed to these queues.
    pub queues: Vec<QueueName>,
    /// At most this many items: what the worker can run now (backpressure).
    pub max_items: usize,
    /// How long the leases last unless renewed.
    pub lease_for: Duration,
}

/// A work item under lease.
#[derive(Debug, Clone, PartialEq)]
pub struct LeasedWorkItem {
    /// The lease.
    pub lease: LeaseToken,
    /// When the lease expires unless renewed.
    pub leased_until: Timestamp,
    /// The item.
    pub item: WorkItem,
    /// How many times it has been leased, this lease included: above `attempt` when
    /// workers died holding it.
    pub deliveries: u32,
}

/// The final outcome of a leased item.
#[derive(Debug, Clone, PartialEq)]
pub struct ActivityCompletion {
    /// The lease.
    pub lease: LeaseToken,
    /// Output, or the failure that ends its retries.
    pub outcome: Outcome,
}

/// What [`Provider::complete_activities_locking`](crate::Provider::complete_activities_locking)
/// committed.
#[derive(Debug)]
pub struct CompletedActivities {
    /// One result per completion, in order, as
    /// [`Provider::complete_activities`](crate::Provider::complete_activities) returns them.
    pub results: Vec<Result<()>>,
    /// The instances the outcomes went to that are locked for the caller.
    pub locked: Vec<OrchestrationWork>,
}

/// A failed attempt to run again later.
#[derive(Debug, Clone, PartialEq)]
pub struct ActivityRetry {
    /// The lease.
    pub lease: LeaseToken,
    /// The attempt number the item runs next.
    pub next_attempt: u32,
    /// How long it stays invisible (the policy's back-off).
    pub delay: Duration,
    /// Why the attempt failed.
    pub failure: Failure,
}

/// Cluster-wide limits on one activity name, enforced when items are claimed.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ActivityLimits {
    /// At most this many of its items leased at once across all workers.
    pub max_concurrent: Option<u32>,
    /// At most this many of its items leased per second across all workers.
    pub max_per_second: Option<u32>,
}

/// The provider's id of a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeadLetterId(pub u64);

/// Work that failed for good, kept for inspection and replay.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Its id.
    pub id: DeadLetterId,
    /// The instance whose orchestration scheduled it.
    pub instance: InstanceId,
    /// Its execution.
    pub execution: ExecutionId,
    /// Its operation.
    pub op: OpId,
    /// The activity's registered name.
    pub name: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last failure, with its chain.
    pub failure: Failure,
    /// The item as it was, to replay it; none when its stored bytes were corrupt.
    pub item: Option<WorkItem>,
    /// When it was set aside.
    pub recorded_at: Timestamp,
}

/// Which kind of queue a dispatcher waits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkKind {
    /// Orchestrator messages.
    Orchestrations,
    /// Activity work items.
    Activities,
}
