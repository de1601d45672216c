//! The `Provider` trait: everything Keel asks of a store.

use std::time::Duration;

use async_trait::async_trait;
use keel_core::{Event, ExecutionId, InstanceId, Message, Timestamp};

use crate::activity::{
    ActivityCompletion, ActivityLimits, ActivityRetry, CompletedActivities, DeadLetter,
    DeadLetterId, FetchActivities, LeaseToken, LeasedWorkItem, WorkKind,
};
use crate::capabilities::Capabilities;
use crate::error::Result;
use crate::instance::{
    Created, InstanceQuery, InstanceRecord, NewInstance, OnConflict, Page, PageRequest,
    PurgeFilter, QueueDepths,
};
use crate::orchestration::{Ack, AckedTurns, FetchOrchestrations, LockToken, OrchestrationWork};

/// A store of instances, histories and queues. Object-safe: Keel holds it as
/// `Arc<dyn Provider>`.
///
/// Each method's documentation states its atomicity and ordering contract; the
/// conformance kit (`keel-conformance`) tests each sentence. Times ("now") are the
/// provider's clock: the database's where it has one, else its [`Clock`](crate::Clock).
#[async_trait]
pub trait Provider: Send + Sync + std::fmt::Debug + 'static {
    /// What this provider supports, and its batch sizes.
    fn capabilities(&self) -> Capabilities;

    /// The provider's current time, the one leases and visibility are computed with.
    async fn now(&self) -> Result<Timestamp>;

    // --- instances and messages ---

    /// Creates an instance and enqueues the start of its first execution (invisible
    /// until `start_at` if set), atomically. On an existing id it changes nothing and,
    /// per `on_conflict`, returns the existing instance or fails with `AlreadyExists`.
    async fn create_instance(
        &self,
        instance: NewInstance,
        on_conflict: OnConflict,
    ) -> Result<Created>;

    /// Enqueues `message` for an existing instance, visible at once or at `visible_at`.
    /// Messages of one instance are delivered in the order they were enqueued (among
    /// those visible). An unknown instance is `NotFound` and nothing is stored; a finished
    /// instance still accepts the message, which its next turn drains.
    async fn send_message(
        &self,
        instance: &InstanceId,
        message: Message,
        visible_at: Option<Timestamp>,
    ) -> Result<()>;

    // --- the orchestrator queue ---

    /// Claims up to `max_instances` instances that have visible messages and are neither
    /// locked, paused nor suspended, highest priority first, then oldest message first.
    /// Each comes with every one of its visible messages under one lock, held until
    /// `locked_until`. At most one holder: concurrent fetches never return the same
    /// instance. An instance whose stored messages or history cannot be decoded is
    /// suspended with the reason and not returned.
    async fn fetch_orchestrations(
        &self,
        request: FetchOrchestrations,
    ) -> Result<Vec<OrchestrationWork>>;

    /// Extends a held lock to now + `extend`. A lock that expired or was taken over is
    /// `Stale`, and nothing changes.
    async fn renew_lock(&self, lock: &LockToken, extend: Duration) -> Result<()>;

    /// Releases a held lock without a turn; the instance's messages become fetchable
    /// again after `delay`. A stale lock is `Stale`, and nothing changes.
    async fn abandon_lock(&self, lock: &LockToken, delay: Duration) -> Result<()>;

    /// Commits many turns, each atomically: appends its events, enqueues its work
    /// items, messages and children, cancels its activities, sets the status, output and
    /// custom status (starting the next execution on continue-as-new), deletes its
    /// consumed messages and releases its lock. Returns one result per ack, in order: a
    /// stale or expired lock, or an ack over a size limit, is rejected and changes
    /// nothing, while the other acks still commit.
    async fn ack_turns(&self, acks: Vec<Ack>) -> Result<Vec<Result<()>>>;

    /// Commits turns as [`ack_turns`](Self::ack_turns) does and, in the same
    /// transactions, leases to the caller up to `lease.max_items` of the activity items
    /// they enqueue on `lease.queues`, in ack order, for `lease.lease_for`: as if a
    /// [`fetch_activities`](Self::fetch_activities) had claimed them the moment they were
    /// enqueued, which saves a worker that runs them itself a claim per item ("eager
    /// dispatch"). Items of names with limits are never leased this way (the limits are
    /// counted at claim time), nor those of a rejected ack. What is not leased is
    /// enqueued as usual.
    ///
    /// The default commits with `ack_turns` and leases nothing; a provider that leases
    /// says so with [`Capabilities::leases_on_ack`](crate::Capabilities::leases_on_ack).
    async fn ack_turns_leasing(
        &self,
        acks: Vec<Ack>,
        lease: FetchActivities,
    ) -> Result<AckedTurns> {
        let _ = lease;
        Ok(AckedTurns {
            results: self.ack_turns(acks).await?,
            leased: Vec::new(),
        })
    }

    /// Sets a locked instance aside as `Suspended` with `reason`, releasing the lock and
    /// keeping its messages. A stale lock is `Stale`, and nothing changes.
    async fn suspend(&self, lock: &LockToken, reason: &str) -> Result<()>;

    // --- the activity queue ---

    /// Leases up to `max_items` visible work items of the given queues, highest priority
    /// first, then oldest first, honouring each activity name's limits inside the
    /// claim's transaction. At most one holder: concurrent fetches never return the same
    /// item. A lease that expires makes the item visible again. An item whose stored
    /// bytes cannot be decoded becomes a dead letter and is not returned.
    async fn fetch_activities(&self, request: FetchActivities) -> Result<Vec<LeasedWorkItem>>;

    /// Extends a held lease to now + `extend`. Fails with `Cancelled` once the
    /// orchestration cancelled the item (the activity's cancellation signal), with
    /// `Stale` if the lease expired or was taken over.
    async fn renew_lease(&self, lease: &LeaseToken, extend: Duration) -> Result<()>;

    /// Completes many leased items, each atomically: deletes the item and enqueues its
    /// outcome for its instance; a failure also records a dead letter. Returns one result
    /// per completion, in order: a stale lease is `Stale` and an outcome over the record
    /// limit is `TooLarge`, both changing nothing (the lease is kept); an item cancelled
    /// while it ran is deleted, its outcome dropped, and the result is `Ok`.
    async fn complete_activities(
        &self,
        completions: Vec<ActivityCompletion>,
    ) -> Result<Vec<Result<()>>>;

    /// Completes items as [`complete_activities`](Self::complete_activities) does and, in
    /// the same transactions, locks for the caller the instances their outcomes went
    /// to, as a [`fetch_orchestrations`](Self::fetch_orchestrations) limited to those
    /// instances would have: each one that is neither locked, paused nor suspended comes
    /// back under a lock held until `locked_until`, with all its visible messages (and
    /// its history when `lock.with_history`), at most `lock.max_instances` of them, in
    /// completion order. This saves a worker that runs the next turn itself the fetch
    /// ("eager dispatch"); an instance not locked this way is left for fetches.
    ///
    /// The default completes with `complete_activities` and locks nothing; a provider
    /// that locks says so with
    /// [`Capabilities::locks_on_completion`](crate::Capabilities::locks_on_completion).
    async fn complete_activities_locking(
        &self,
        completions: Vec<ActivityCompletion>,
        lock: FetchOrchestrations,
    ) -> Result<CompletedActivities> {
        let _ = lock;
        Ok(CompletedActivities {
            results: self.complete_activities(completions).await?,
            locked: Vec::new(),
        })
    }

    /// Re-queues a leased item for its next attempt, invisible for `delay`, releasing
    /// the lease (a cancelled item is deleted instead). A stale lease is `Stale`, and
    /// nothing changes.
    async fn retry_activity(&self, retry: ActivityRetry) -> Result<()>;

    /// Releases a lease without counting an attempt (a worker shutting down): the item
    /// is visible again at once (a cancelled item is deleted instead). A stale lease is
    /// `Stale`, and nothing changes.
    async fn abandon_lease(&self, lease: &LeaseToken) -> Result<()>;

    /// Sets the cluster-wide limits of activity `name` (replacing earlier ones).
    async fn set_activity_limits(&self, name: &str, limits: ActivityLimits) -> Result<()>;

    // --- dead letters ---

    /// Lists dead letters, oldest first.
    async fn list_dead_letters(&self, page: PageRequest) -> Result<Page<DeadLetter>>;

    /// One dead letter, or `NotFound`.
    async fn get_dead_letter(&self, id: DeadLetterId) -> Result<DeadLetter>;

    /// Re-queues a dead letter's item as attempt 1 and removes the dead letter,
    /// atomically. `NotFound` if unknown; `InvalidInput` if its item was corrupt.
    async fn replay_dead_letter(&self, id: DeadLetterId) -> Result<()>;

    /// Removes a dead letter, or `NotFound`.
    async fn discard_dead_letter(&self, id: DeadLetterId) -> Result<()>;

    // --- control ---

    /// Pauses an instance: its messages are kept and accepted, but not fetched until it
    /// is resumed. A turn in flight may still ack; the instance stays paused.
    /// `NotFound` if unknown; `InvalidInput` if it has ended.
    async fn pause(&self, instance: &InstanceId) -> Result<()>;

    /// Resumes a paused or suspended instance: its messages are fetchable again, and its
    /// status is Running (Pending if no turn was ever acked). `NotFound` if unknown;
    /// `InvalidInput` if it is neither paused nor suspended.
    async fn resume(&self, instance: &InstanceId) -> Result<()>;

    // --- management ---

    /// One instance, or `NotFound`.
    async fn get_instance(&self, instance: &InstanceId) -> Result<InstanceRecord>;

    /// The history of `execution` (the current one when none), in order. `NotFound` if
    /// the instance or execution is unknown.
    async fn read_history(
        &self,
        instance: &InstanceId,
        execution: Option<ExecutionId>,
    ) -> Result<Vec<Event>>;

    /// Instances matching `query`, oldest first, a page at a time.
    async fn list_instances(
        &self,
        query: InstanceQuery,
        page: PageRequest,
    ) -> Result<Page<InstanceRecord>>;

    /// How much work is queued.
    async fn queue_depths(&self) -> Result<QueueDepths>;

    /// Deletes finished instances matching `filter`, with their histories, messages, work
    /// items and dead letters. Returns how many instances were deleted.
    async fn purge(&self, filter: PurgeFilter) -> Result<u64>;

    /// Deletes an instance and, recursively, its children, with everything stored for
    /// them, whatever their status. Returns how many instances were deleted; `NotFound`
    /// if unknown.
    async fn delete_instance(&self, instance: &InstanceId) -> Result<u64>;

    // --- wake-ups ---

    /// Waits until work of `kind` may have become visible, or `timeout` passes: returns
    /// early when this provider enqueues such work (or learns of it from the database),
    /// and when a delayed item comes due. Callers fetch before they wait: work enqueued
    /// since the last fetch of `kind` began ends the wait at once, even when it came
    /// before the wait did; work already visible but locked or paused does not, so idle
    /// dispatchers do not spin. A lost wake-up delays work, never loses it.
    async fn wait_for_work(&self, kind: WorkKind, timeout: Duration) -> Result<()>;

    /// When the next invisible item of `kind` becomes visible, if any is queued.
    async fn next_due(&self, kind: WorkKind) -> Result<Option<Timestamp>>;

    /// Waits until some instance may have ended (completed, failed, was cancelled,
    /// continued as new or was suspended) or `timeout` passes, and returns whether news
    /// of an end came. A provider that cannot hear of ends from other processes returns
    /// `false` at once, the default: a client waiting for a result then polls.
    async fn wait_for_ended(&self, timeout: Duration) -> Result<bool> {
        let _ = timeout;
        Ok(false)
    }
}
