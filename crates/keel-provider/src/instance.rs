//! Instances: creating them, and what a provider reports about them.

use std::collections::BTreeMap;

use keel_core::{
    ExecutionId, Failure, InstanceId, InstanceStatus, ParentLink, Payload, QueueName, Timestamp,
};

/// An instance to create, with the start of its first execution.
#[derive(Debug, Clone, PartialEq)]
pub struct NewInstance {
    /// Its id.
    pub id: InstanceId,
    /// The orchestration's registered name.
    pub name: String,
    /// The version to run; the newest registered when none.
    pub version: Option<u32>,
    /// The first execution's input.
    pub input: Payload,
    /// A delayed start: the start message is invisible until then.
    pub start_at: Option<Timestamp>,
    /// The queue whose workers run its turns.
    pub queue: QueueName,
    /// Higher is fetched first among visible instances.
    pub priority: i32,
    /// Free-form labels, for listing and the dashboard.
    pub tags: BTreeMap<String, String>,
    /// Set when it is a child: where it reports its outcome.
    pub parent: Option<ParentLink>,
}

impl NewInstance {
    /// An instance of `name` with `input` and every option at its default.
    pub fn new(id: InstanceId, name: impl Into<String>, input: Payload) -> Self {
        Self {
            id,
            name: name.into(),
            version: None,
            input,
            start_at: None,
            queue: QueueName::default(),
            priority: 0,
            tags: BTreeMap::new(),
            parent: None,
        }
    }
}

/// What to do when the id is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnConflict {
    /// Leave the existing instance alone and report it.
    ReturnExisting,
    /// Fail with [`ErrorKind::AlreadyExists`](crate::ErrorKind::AlreadyExists).
    Fail,
}

/// The result of creating an instance.
#[derive(Debug, Clone, PartialEq)]
pub enum Created {
    /// It was created.
    New,
    /// It existed already and was left alone.
    Existing(Box<InstanceRecord>),
}

/// An instance as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRecord {
    /// Its id.
    pub id: InstanceId,
    /// The orchestration's registered name.
    pub name: String,
    /// The version it runs, once its first turn has chosen one.
    pub version: Option<u32>,
    /// Where it is in its life.
    pub status: InstanceStatus,
    /// Why it is suspended, when it is.
    pub status_reason: Option<String>,
    /// The current execution.
    pub execution: ExecutionId,
    /// The current execution's input.
    pub input: Payload,
    /// The output, once completed.
    pub output: Option<Payload>,
    /// The failure, once failed (or cancelled).
    pub failure: Option<Failure>,
    /// What the code last set as its custom status.
    pub custom_status: Option<Payload>,
    /// Its queue.
    pub queue: QueueName,
    /// Its priority.
    pub priority: i32,
    /// Its labels.
    pub tags: BTreeMap<String, String>,
    /// Its parent, if it is a child.
    pub parent: Option<ParentLink>,
    /// Events in the current execution's history.
    pub history_len: u64,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
    /// When it reached a terminal status.
    pub completed_at: Option<Timestamp>,
}

/// Which instances to list. Unset fields match everything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InstanceQuery {
    /// Any of these statuses.
    pub statuses: Vec<InstanceStatus>,
    /// This orchestration name.
    pub name: Option<String>,
    /// Created at or after.
    pub created_from: Option<Timestamp>,
    /// Created before.
    pub created_until: Option<Timestamp>,
    /// Carrying this tag with this value.
    pub tag: Option<(String, String)>,
}

/// Where a page of a listing starts and how long it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    /// At most this many items (providers may cap it; see `Capabilities::max_page`).
    pub limit: usize,
    /// The `next` of the previous page; none for the first.
    pub cursor: Option<Cursor>,
}

impl PageRequest {
    /// The first page of `limit` items.
    pub fn first(limit: usize) -> Self {
        Self {
            limit,
            cursor: None,
        }
    }
}

/// An opaque position in a listing, stable under concurrent inserts: items created
/// after the listing began appear at its end or not at all, never twice.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Cursor(pub String);

/// One page of a listing, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// Where the next page starts; none at the end.
    pub next: Option<Cursor>,
}

/// Which finished instances to purge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeFilter {
    /// Only instances that reached a terminal status before this time.
    pub completed_before: Timestamp,
    /// Only these terminal statuses; all of Completed, Failed and Cancelled when empty.
    pub statuses: Vec<InstanceStatus>,
}

/// How much work is queued.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QueueDepths {
    /// Orchestrator messages visible now.
    pub messages_ready: u64,
    /// Orchestrator messages invisible until later (timers, delayed starts).
    pub messages_delayed: u64,
    /// Activity work items visible now, by queue.
    pub activities_ready: BTreeMap<String, u64>,
    /// Activity work items waiting for their retry time.
    pub activities_delayed: u64,
    /// Activity work items under a lease.
    pub activities_running: u64,
    /// Dead letters.
    pub dead_letters: u64,
}
