//! Helpers the suite's tests share: building records and driving the provider through
//! common steps.

use std::time::Duration;

use keel_core::{Codec, ExecutionId, InstanceId, Message, Payload};
use keel_provider::{Ack, FetchOrchestrations, NewInstance, OrchestrationWork, Provider};

/// The lock time tests use when they do not test locks.
pub const LOCK: Duration = Duration::from_secs(60);

/// An instance id, panicking on a bad literal (tests only pass good ones).
pub fn id(s: &str) -> InstanceId {
    InstanceId::new(s).expect("test ids are valid")
}

/// A JSON payload of `value`.
pub fn payload(value: &serde_json::Value) -> Payload {
    Codec::default().encode(value).expect("JSON values encode")
}

/// A new instance of orchestration "test" with input `{"n": 1}`.
pub fn new_instance(instance: &str) -> NewInstance {
    NewInstance::new(id(instance), "test", payload(&serde_json::json!({"n": 1})))
}

/// A signal message.
pub fn signal(name: &str, n: i64) -> Message {
    Message::Signal {
        name: name.to_owned(),
        payload: payload(&serde_json::json!(n)),
    }
}

/// Fetches up to `max` instances with their history, locked for [`LOCK`].
pub async fn fetch(provider: &dyn Provider, max: usize) -> Vec<OrchestrationWork> {
    provider
        .fetch_orchestrations(FetchOrchestrations {
            max_instances: max,
            lock_for: LOCK,
            with_history: true,
        })
        .await
        .expect("fetch succeeds")
}

/// Fetches exactly one instance, panicking otherwise.
pub async fn fetch_one(provider: &dyn Provider) -> OrchestrationWork {
    let mut work = fetch(provider, 10).await;
    assert_eq!(
        work.len(),
        1,
        "expected exactly one instance with work, got {}",
        work.len()
    );
    work.remove(0)
}

/// An ack of `work` that consumes all its messages and changes nothing else.
pub fn ack_all(work: &OrchestrationWork) -> Ack {
    Ack::new(
        work.lock.clone(),
        work.messages.iter().map(|m| m.id).collect(),
    )
}

/// The first execution.
pub const FIRST: ExecutionId = ExecutionId::FIRST;

// ---------------------------------------------------------------------------------------
// Helpers of the messages, locking, acks, ack batches, visibility and executions areas.
// ---------------------------------------------------------------------------------------
// They live in a module of their own so that their imports cannot clash with the file's.

pub use turn_helpers::*;

mod turn_helpers {
    use std::time::Duration;

    use keel_core::{
        ActivityOptions, Codec, Event, EventKind, ExecutionId, InstanceId, Message, OpId, Payload,
        QueueName, SideEffect, Timestamp, WorkItem,
    };
    use keel_provider::{
        Ack, ErrorKind, FetchActivities, FetchOrchestrations, LeasedWorkItem, OnConflict,
        OrchestrationWork, Provider, ProviderError,
    };

    use super::{LOCK, ack_all, fetch, fetch_one, id, new_instance, payload, signal};

    /// A short lock or delay, for tests that wait for it to pass: providers whose
    /// database owns the clock really wait.
    pub const SHORT: Duration = Duration::from_secs(1);

    /// Comfortably longer than [`SHORT`].
    pub const PAST_SHORT: Duration = Duration::from_millis(1_500);

    /// The provider's "now", panicking if it cannot say.
    pub async fn now(provider: &dyn Provider) -> Timestamp {
        provider.now().await.expect("the provider reads its clock")
    }

    /// An event of `kind` recorded at `at`.
    pub fn event(at: Timestamp, kind: EventKind) -> Event {
        Event { at, kind }
    }

    /// The `ExecutionStarted` event matching [`new_instance`]'s start, at version 1.
    pub fn started_event(at: Timestamp) -> Event {
        event(
            at,
            EventKind::ExecutionStarted {
                name: "test".to_owned(),
                version: 1,
                input: payload(&serde_json::json!({"n": 1})),
                parent: None,
            },
        )
    }

    /// A history event recording side effect `op` as the random value `value`: small,
    /// distinct, and easy to tell apart in a history.
    pub fn marker(at: Timestamp, op: u64, value: u64) -> Event {
        event(
            at,
            EventKind::SideEffectRecorded {
                op: OpId::from_raw(op),
                value: SideEffect::Random(value),
            },
        )
    }

    /// Attempt 1 of activity `name` for operation `op` of `instance`'s first execution,
    /// routed to the default queue.
    pub fn work_item(instance: &InstanceId, op: u64, name: &str, at: Timestamp) -> WorkItem {
        WorkItem {
            instance: instance.clone(),
            execution: ExecutionId::FIRST,
            op: OpId::from_raw(op),
            name: name.to_owned(),
            input: payload(&serde_json::json!({"op": op})),
            options: ActivityOptions::default(),
            attempt: 1,
            scheduled_at: at,
        }
    }

    /// Leases up to `max` items of the default queue for [`LOCK`].
    pub async fn fetch_activities(provider: &dyn Provider, max: usize) -> Vec<LeasedWorkItem> {
        provider
            .fetch_activities(FetchActivities {
                queues: vec![QueueName::default()],
                max_items: max,
                lease_for: LOCK,
            })
            .await
            .expect("activity fetch succeeds")
    }

    /// Fetches up to `max` instances with their history, locked for `lock_for`.
    pub async fn fetch_for(
        provider: &dyn Provider,
        max: usize,
        lock_for: Duration,
    ) -> Vec<OrchestrationWork> {
        provider
            .fetch_orchestrations(FetchOrchestrations {
                max_instances: max,
                lock_for,
                with_history: true,
            })
            .await
            .expect("fetch succeeds")
    }

    /// Asserts that no instance has fetchable work. Locks nothing when it holds.
    pub async fn assert_nothing_fetchable(provider: &dyn Provider, why: &str) {
        let work = fetch(provider, 100).await;
        let ids: Vec<&str> = work.iter().map(|w| w.lock.instance().as_str()).collect();
        assert!(work.is_empty(), "{why}: fetched {ids:?}");
    }

    /// Commits one ack, returning its own result.
    pub async fn ack_one(provider: &dyn Provider, ack: Ack) -> keel_provider::Result<()> {
        let mut results = provider
            .ack_turns(vec![ack])
            .await
            .expect("the ack call itself succeeds");
        assert_eq!(results.len(), 1, "one result per ack");
        results.remove(0)
    }

    /// Creates `instance` (see [`new_instance`]) and runs its first turn: consumes the start
    /// message and records [`started_event`]. It is then Running, with a history of one
    /// event and nothing queued.
    pub async fn started(provider: &dyn Provider, instance: &str) -> InstanceId {
        let id = id(instance);
        provider
            .create_instance(new_instance(instance), OnConflict::Fail)
            .await
            .expect("create succeeds");
        let work = fetch_one(provider).await;
        assert_eq!(work.lock.instance(), &id);
        let mut ack = ack_all(&work);
        ack.version = Some(1);
        ack.events = vec![started_event(now(provider).await)];
        ack_one(provider, ack).await.expect("the first turn acks");
        id
    }

    /// Sends `instance` a signal and fetches it, for a turn of a started instance.
    pub async fn next_turn(p: &dyn Provider, instance: &InstanceId) -> OrchestrationWork {
        send(p, instance, signal("turn", 0)).await;
        let work = fetch_one(p).await;
        assert_eq!(work.lock.instance(), instance);
        work
    }

    /// Runs a turn of `instance` whose ack consumes its messages and is shaped by `shape`.
    pub async fn turn(p: &dyn Provider, instance: &InstanceId, shape: impl FnOnce(&mut Ack)) {
        let work = next_turn(p, instance).await;
        let mut ack = ack_all(&work);
        shape(&mut ack);
        ack_one(p, ack).await.expect("the turn acks");
    }

    /// Sends `message` to `instance`, visible at once, panicking on failure.
    pub async fn send(provider: &dyn Provider, instance: &InstanceId, message: Message) {
        provider
            .send_message(instance, message, None)
            .await
            .expect("send succeeds");
    }

    /// The numbers of the signals among `work`'s messages, in delivery order.
    pub fn signal_numbers(work: &OrchestrationWork) -> Vec<i64> {
        work.messages
            .iter()
            .filter_map(|m| match &m.message {
                Message::Signal { payload, .. } => Codec::default().decode::<i64>(payload).ok(),
                _ => None,
            })
            .collect()
    }

    /// A payload whose stored size exceeds `limit` bytes. Its body is not valid JSON; that
    /// does not matter, since providers store payloads as opaque bytes.
    pub fn oversized_payload(limit: usize) -> Payload {
        let mut bytes = vec![b'7'; limit.saturating_add(2)];
        bytes[0] = Codec::default()
            .encode(&1)
            .expect("JSON values encode")
            .as_bytes()[0];
        Payload::from_bytes(bytes).expect("a JSON header is valid")
    }

    /// Asserts that `err` is `TooLarge` and that its message names `limit` and a size above it.
    pub fn assert_too_large(err: &ProviderError, limit: usize) {
        assert_eq!(err.kind(), ErrorKind::TooLarge, "{err}");
        let numbers: Vec<u128> = err
            .message()
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect();
        let limit = limit as u128;
        assert!(
            numbers.contains(&limit),
            "the message names the limit {limit}: {err}"
        );
        assert!(
            numbers.iter().any(|&n| n > limit),
            "the message names the size, above the limit {limit}: {err}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Helpers of the activities, leases, limits, dead letters, control, management, listing,
// purging, wake-ups, corruption and model areas. Kept in their own module, with their own imports, so that
// the blocks of other areas can grow without touching them.
// ---------------------------------------------------------------------------------------

pub use work::{
    LEASE, activity, complete, create, end, ended, expect_kind, fetch_instance, json, lease,
    lease_queues, messages_for, ops, poke, provider_now, queue, run_turn, running, schedule,
    schedule_n, scheduling_ack, tick,
};

mod work {
    use std::time::Duration;

    use keel_core::{
        ActivityOptions, Event, EventKind, ExecutionId, InstanceId, Message, OpId, Outcome,
        Payload, QueueName, Timestamp, WorkItem,
    };
    use keel_provider::{
        Ack, ActivityCompletion, Created, ErrorKind, FetchActivities, FetchOrchestrations,
        LeaseToken, LeasedWorkItem, NewInstance, OnConflict, OrchestrationWork, Provider,
        ProviderError, Result, TurnOutcome,
    };

    use super::{ack_all, id, new_instance, payload, signal};
    use crate::TestStore;

    /// The lease time tests use when they do not test leases.
    pub const LEASE: Duration = Duration::from_secs(60);

    /// The unit of time of tests of expiry and delays: a second on a manual clock; a
    /// quarter of a second of real time otherwise, so that those tests stay short.
    pub fn tick(store: &TestStore) -> Duration {
        if store.has_manual_clock() {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(250)
        }
    }

    /// The provider's "now", panicking if it cannot say.
    pub async fn provider_now(provider: &dyn Provider) -> Timestamp {
        provider.now().await.expect("the provider reads its clock")
    }

    /// A queue name, panicking on a bad literal.
    pub fn queue(name: &str) -> QueueName {
        QueueName::new(name).expect("test queue names are valid")
    }

    /// Attempt 1 of activity `name` for operation `op` of `instance`'s first execution,
    /// with input `{"op": op}`, default options, scheduled at `at`.
    pub fn activity(instance: &str, op: u64, name: &str, at: Timestamp) -> WorkItem {
        WorkItem {
            instance: id(instance),
            execution: ExecutionId::FIRST,
            op: OpId::from_raw(op),
            name: name.to_owned(),
            input: payload(&serde_json::json!({ "op": op })),
            options: ActivityOptions::default(),
            attempt: 1,
            scheduled_at: at,
        }
    }

    /// Fetches `instance`'s work under a lock, leaving every other instance as it was
    /// (their locks are abandoned with no delay). `None` when it has nothing visible.
    pub async fn fetch_instance(
        provider: &dyn Provider,
        instance: &InstanceId,
    ) -> Option<OrchestrationWork> {
        let max = provider.capabilities().max_fetch_instances.max(1);
        let mut mine = None;
        let mut others = Vec::new();
        loop {
            let batch = provider
                .fetch_orchestrations(FetchOrchestrations {
                    max_instances: max,
                    lock_for: LEASE,
                    with_history: true,
                })
                .await
                .expect("fetch succeeds");
            if batch.is_empty() {
                break;
            }
            for work in batch {
                if work.lock.instance() == instance {
                    mine = Some(work);
                } else {
                    others.push(work.lock);
                }
            }
            if mine.is_some() {
                break;
            }
        }
        for lock in others {
            provider
                .abandon_lock(&lock, Duration::ZERO)
                .await
                .expect("abandoning a held lock succeeds");
        }
        mine
    }

    /// The messages visible for `instance` now, oldest first; its lock is abandoned
    /// again at once.
    pub async fn messages_for(provider: &dyn Provider, instance: &InstanceId) -> Vec<Message> {
        let Some(work) = fetch_instance(provider, instance).await else {
            return Vec::new();
        };
        provider
            .abandon_lock(&work.lock, Duration::ZERO)
            .await
            .expect("abandoning a held lock succeeds");
        work.messages.into_iter().map(|m| m.message).collect()
    }

    /// Runs one turn of `instance`, which must have visible messages: `build` makes the
    /// ack from the fetched work; returns that ack's own result.
    pub async fn run_turn(
        provider: &dyn Provider,
        instance: &InstanceId,
        build: impl FnOnce(&OrchestrationWork) -> Ack,
    ) -> Result<()> {
        let work = fetch_instance(provider, instance)
            .await
            .unwrap_or_else(|| panic!("instance {instance} has no visible messages"));
        crate::fixtures::ack_one(provider, build(&work)).await
    }

    /// Creates `instance` unless it exists (signalling it if it does, so that it has a
    /// turn to run), then runs a turn that consumes its messages, records its start on
    /// the first turn and schedules `items`, each recorded as `ActivityScheduled`.
    pub async fn schedule(
        provider: &dyn Provider,
        instance: &str,
        items: Vec<WorkItem>,
    ) -> InstanceId {
        let instance_id = id(instance);
        let created = provider
            .create_instance(new_instance(instance), OnConflict::ReturnExisting)
            .await
            .expect("create succeeds");
        if let Created::Existing(_) = created {
            provider
                .send_message(&instance_id, signal("schedule", 0), None)
                .await
                .expect("send succeeds");
        }
        let at = provider_now(provider).await;
        run_turn(provider, &instance_id, |work| {
            scheduling_ack(work, at, items)
        })
        .await
        .expect("the scheduling turn acks");
        instance_id
    }

    /// The ack of a turn of `work` that consumes its messages, records its start if it is
    /// the first turn, and schedules `items` at `at`, each recorded as `ActivityScheduled`.
    pub fn scheduling_ack(work: &OrchestrationWork, at: Timestamp, items: Vec<WorkItem>) -> Ack {
        let mut ack = ack_all(work);
        if work.history_len == 0 {
            ack.version = Some(1);
            ack.events.push(Event {
                at,
                kind: EventKind::ExecutionStarted {
                    name: "test".to_owned(),
                    version: 1,
                    input: payload(&serde_json::json!({"n": 1})),
                    parent: None,
                },
            });
        }
        ack.events.extend(items.iter().map(|item| Event {
            at,
            kind: EventKind::ActivityScheduled {
                op: item.op,
                name: item.name.clone(),
                input: item.input.clone(),
                options: item.options.clone(),
            },
        }));
        ack.activities = items;
        ack
    }

    /// Creates `instance` and runs its first turn: it is then Running, with nothing
    /// queued.
    pub async fn running(provider: &dyn Provider, instance: &str) -> InstanceId {
        schedule(provider, instance, Vec::new()).await
    }

    /// Leases up to `max` items of `queues` for `lease_for`.
    pub async fn lease_queues(
        provider: &dyn Provider,
        queues: &[&str],
        max: usize,
        lease_for: Duration,
    ) -> Vec<LeasedWorkItem> {
        provider
            .fetch_activities(FetchActivities {
                queues: queues.iter().map(|q| queue(q)).collect(),
                max_items: max,
                lease_for,
            })
            .await
            .expect("activity fetch succeeds")
    }

    /// Leases up to `max` items of the default queue for [`LEASE`].
    pub async fn lease(provider: &dyn Provider, max: usize) -> Vec<LeasedWorkItem> {
        lease_queues(provider, &[QueueName::DEFAULT], max, LEASE).await
    }

    /// Completes one leased item, returning that completion's own result.
    pub async fn complete(
        provider: &dyn Provider,
        lease: &LeaseToken,
        outcome: Outcome,
    ) -> Result<()> {
        let mut results = provider
            .complete_activities(vec![ActivityCompletion {
                lease: lease.clone(),
                outcome,
            }])
            .await
            .expect("the completion call itself succeeds");
        assert_eq!(results.len(), 1, "one result per completion");
        results.remove(0)
    }

    /// The operation numbers of `items`, sorted.
    pub fn ops(items: &[LeasedWorkItem]) -> Vec<u64> {
        let mut ops: Vec<u64> = items.iter().map(|i| i.item.op.get()).collect();
        ops.sort_unstable();
        ops
    }

    /// Schedules `count` items of activity "work" for instance "a", ops 1 to `count`.
    pub async fn schedule_n(p: &dyn Provider, count: u64) -> keel_core::InstanceId {
        let at = provider_now(p).await;
        let items = (1..=count)
            .map(|op| activity("a", op, "work", at))
            .collect();
        schedule(p, "a", items).await
    }

    /// A JSON payload of `value`.
    pub fn json(value: serde_json::Value) -> Payload {
        payload(&value)
    }

    /// Sends `instance` a signal, so that it has a turn to run.
    pub async fn poke(p: &dyn Provider, instance: &InstanceId) {
        p.send_message(instance, signal("poke", 0), None)
            .await
            .expect("send");
    }

    /// Runs a turn of `instance` (which must have visible messages) ending it with `outcome`.
    pub async fn end(p: &dyn Provider, instance: &InstanceId, outcome: TurnOutcome) {
        run_turn(p, instance, |work| {
            let mut ack = ack_all(work);
            ack.outcome = outcome;
            ack
        })
        .await
        .expect("the final turn acks");
    }

    /// Creates `instance`, panicking if it exists; returns its id.
    pub async fn create(p: &dyn Provider, instance: NewInstance) -> InstanceId {
        let id = instance.id.clone();
        p.create_instance(instance, OnConflict::Fail)
            .await
            .expect("create");
        id
    }

    /// A `Completed` outcome with output `{"done": instance}`.
    pub fn ended(instance: &str) -> TurnOutcome {
        TurnOutcome::Completed(json(serde_json::json!({ "done": instance })))
    }

    /// Asserts that `result` failed with `kind`, and returns the error.
    #[track_caller]
    pub fn expect_kind<T: std::fmt::Debug>(
        result: Result<T>,
        kind: ErrorKind,
        what: &str,
    ) -> ProviderError {
        match result {
            Ok(value) => panic!("{what}: expected {kind:?}, got Ok({value:?})"),
            Err(err) => {
                assert_eq!(err.kind(), kind, "{what}: {err}");
                err
            }
        }
    }
}
