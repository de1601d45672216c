//! Acking turns: everything one turn commits, atomically, and the rejection of stale,
//! expired and oversized acks without harm to the others of the batch.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use keel_core::{
    ActivityOptions, EventKind, ExecutionId, Failure, InstanceId, InstanceStatus, Message, OpId,
    ParentLink, QueueName, RetryPolicy,
};
use keel_provider::{
    Ack, CustomStatusUpdate, ErrorKind, NewInstance, OnConflict, OrchestrationWork,
    OutgoingMessage, Provider, TurnOutcome,
};

use crate::TestStore;
use crate::fixtures::{
    LOCK, PAST_SHORT, SHORT, ack_all, ack_one, assert_nothing_fetchable, assert_too_large, event,
    fetch, fetch_activities, fetch_for, fetch_one, id, marker, new_instance, now,
    oversized_payload, payload, send, signal, signal_numbers, started, started_event, work_item,
};

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_acks {
    ($factory:expr) => {
        $crate::__stamp!(
            $factory,
            acks,
            [
                an_ack_appends_its_events_in_order,
                the_next_fetch_reports_the_new_history,
                the_first_turn_records_the_version_and_running,
                an_ack_enqueues_its_activities,
                a_timer_to_itself_is_invisible_until_due,
                a_message_to_another_instance_is_delivered,
                an_ack_creates_its_children_with_their_start,
                a_child_whose_id_exists_is_left_unchanged,
                cancelled_activities_leave_the_queue,
                cancelling_only_touches_the_instances_own_activities,
                cancelling_a_leased_activity_fails_its_renewal,
                the_custom_status_is_set_kept_and_cleared,
                completing_records_the_output_and_the_time,
                failing_records_the_failure,
                cancelling_records_the_cancellation,
                a_turn_of_a_paused_instance_keeps_it_paused,
                only_consumed_messages_are_deleted,
                a_stale_ack_changes_nothing_while_the_others_commit,
                an_ack_with_an_expired_lock_is_rejected,
                acking_twice_with_one_lock_is_stale,
                an_oversized_ack_changes_nothing_while_the_others_commit,
                a_work_item_over_the_record_limit_is_too_large,
                an_outgoing_message_over_the_record_limit_is_too_large,
                a_history_over_its_event_limit_is_too_large,
                results_come_one_per_ack_in_order,
                max_batch_acks_commit_in_one_call,
            ]
        );
    };
}

/// Sends `instance` a signal and fetches it, for a turn of a started instance.
async fn next_turn(p: &dyn Provider, instance: &InstanceId) -> OrchestrationWork {
    send(p, instance, signal("turn", 0)).await;
    let work = fetch_one(p).await;
    assert_eq!(work.lock.instance(), instance);
    work
}

/// Runs a turn of `instance` whose ack consumes its messages and is shaped by `shape`.
async fn turn(p: &dyn Provider, instance: &InstanceId, shape: impl FnOnce(&mut Ack)) {
    let work = next_turn(p, instance).await;
    let mut ack = ack_all(&work);
    shape(&mut ack);
    ack_one(p, ack).await.expect("the turn acks");
}

/// The ops of `instance`'s items among `items`, sorted.
fn ops_of(items: &[keel_provider::LeasedWorkItem], instance: &InstanceId) -> Vec<u64> {
    let mut ops: Vec<u64> = items
        .iter()
        .filter(|i| &i.item.instance == instance)
        .map(|i| i.item.op.get())
        .collect();
    ops.sort_unstable();
    ops
}

/// An ack appends its events to the current history, in order, after the earlier
/// turns' events.
pub async fn an_ack_appends_its_events_in_order(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let mut expected = p.read_history(&a, None).await.unwrap();
    let at = now(p).await;
    let first = vec![marker(at, 1, 10), marker(at, 2, 20), marker(at, 3, 5)];
    turn(p, &a, |ack| ack.events = first.clone()).await;
    let second = vec![
        marker(at, 4, 1),
        event(
            at,
            EventKind::SignalReceived {
                name: "turn".to_owned(),
                payload: payload(&serde_json::json!(0)),
            },
        ),
    ];
    turn(p, &a, |ack| ack.events = second.clone()).await;
    expected.extend(first);
    expected.extend(second);
    assert_eq!(p.read_history(&a, None).await.unwrap(), expected);
    assert_eq!(p.get_instance(&a).await.unwrap().history_len, 6);
}

/// After an ack, the instance reports the new history length, and the next fetch
/// carries it and the whole history.
pub async fn the_next_fetch_reports_the_new_history(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let at = now(p).await;
    turn(p, &a, |ack| {
        ack.events = vec![marker(at, 1, 1), marker(at, 2, 2)]
    })
    .await;
    let history = p.read_history(&a, None).await.unwrap();
    assert_eq!(history.len(), 3);
    let work = next_turn(p, &a).await;
    assert_eq!(work.history_len, 3);
    assert_eq!(work.history.as_ref(), Some(&history));
    assert_eq!(work.execution, ExecutionId::FIRST);
    assert_eq!(p.get_instance(&a).await.unwrap().history_len, 3);
}

/// The first turn moves a Pending instance to Running, records the version it runs and
/// moves `updated_at`.
pub async fn the_first_turn_records_the_version_and_running(store: TestStore) {
    let p = &*store.provider;
    p.create_instance(new_instance("a"), OnConflict::Fail)
        .await
        .unwrap();
    let created = p.get_instance(&id("a")).await.unwrap();
    assert_eq!(created.status, InstanceStatus::Pending);
    store.advance(Duration::from_millis(1_100)).await;
    let work = fetch_one(p).await;
    assert_eq!(work.status, InstanceStatus::Pending);
    assert_eq!(work.name, "test");
    let mut ack = ack_all(&work);
    ack.version = Some(3);
    ack.events = vec![started_event(now(p).await)];
    ack_one(p, ack).await.unwrap();
    let record = p.get_instance(&id("a")).await.unwrap();
    assert_eq!(record.status, InstanceStatus::Running);
    assert_eq!(record.version, Some(3));
    assert!(
        record.updated_at > created.updated_at,
        "updated_at moved: {} then {}",
        created.updated_at,
        record.updated_at
    );
    let work = next_turn(p, &id("a")).await;
    assert_eq!(work.version, Some(3));
    assert_eq!(work.status, InstanceStatus::Running);
}

/// An ack enqueues its activity work items, fetchable at once exactly as given.
pub async fn an_ack_enqueues_its_activities(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let at = now(p).await;
    let plain = work_item(&a, 1, "charge", at);
    let mut tuned = work_item(&a, 2, "ship ✓", at);
    tuned.options = ActivityOptions {
        queue: QueueName::default(),
        priority: 9,
        retry: RetryPolicy {
            max_attempts: 7,
            initial_interval: Duration::from_millis(250),
            attempt_timeout: Some(Duration::from_secs(30)),
            non_retryable: vec!["Fatal".to_owned()],
            ..RetryPolicy::default()
        },
    };
    let items = vec![plain, tuned];
    turn(p, &a, |ack| ack.activities = items.clone()).await;
    let mut leased = fetch_activities(p, 10).await;
    assert_eq!(leased.len(), 2);
    leased.sort_by_key(|l| l.item.op);
    let got: Vec<_> = leased.iter().map(|l| l.item.clone()).collect();
    assert_eq!(got, items);
    assert!(
        leased
            .iter()
            .all(|l| l.deliveries == 1 && l.item.attempt == 1)
    );
}

/// A message an ack sends to its own instance with `visible_at` (a timer) stays
/// invisible until then, and then arrives as sent.
pub async fn a_timer_to_itself_is_invisible_until_due(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let fire_at = now(p).await.saturating_add(SHORT * 2);
    let timer = Message::TimerFired {
        execution: ExecutionId::FIRST,
        op: OpId::from_raw(1),
    };
    turn(p, &a, |ack| {
        ack.events = vec![event(
            fire_at,
            EventKind::TimerCreated {
                op: OpId::from_raw(1),
                fire_at,
            },
        )];
        ack.messages = vec![OutgoingMessage {
            to: a.clone(),
            message: timer.clone(),
            visible_at: Some(fire_at),
        }];
    })
    .await;
    assert_nothing_fetchable(p, "the timer is not due").await;
    store.advance(SHORT).await;
    assert_nothing_fetchable(p, "the timer is still not due").await;
    store.advance(SHORT + Duration::from_millis(100)).await;
    let work = fetch_one(p).await;
    assert_eq!(work.messages.len(), 1);
    assert_eq!(work.messages[0].message, timer);
}

/// A message an ack sends to another instance (a child reporting to its parent) is
/// delivered to that instance only.
pub async fn a_message_to_another_instance_is_delivered(store: TestStore) {
    let p = &*store.provider;
    let parent = started(p, "parent").await;
    let child = started(p, "child").await;
    let report = Message::ChildDone {
        execution: ExecutionId::FIRST,
        op: OpId::from_raw(4),
        outcome: Ok(payload(&serde_json::json!({"done": true}))),
    };
    turn(p, &child, |ack| {
        ack.messages = vec![OutgoingMessage {
            to: parent.clone(),
            message: report.clone(),
            visible_at: None,
        }];
        ack.outcome = TurnOutcome::Completed(payload(&serde_json::json!({"done": true})));
    })
    .await;
    let work = fetch_one(p).await;
    assert_eq!(work.lock.instance(), &parent);
    assert_eq!(work.messages.len(), 1);
    assert_eq!(work.messages[0].message, report);
}

/// An ack creates its children, each with the start of its first execution, carrying
/// the parent link.
pub async fn an_ack_creates_its_children_with_their_start(store: TestStore) {
    let p = &*store.provider;
    let parent = started(p, "parent").await;
    let link = ParentLink {
        instance: parent.clone(),
        execution: ExecutionId::FIRST,
        op: OpId::from_raw(1),
    };
    let mut kid = NewInstance::new(
        parent.child(ExecutionId::FIRST, OpId::from_raw(1)),
        "kid",
        payload(&serde_json::json!({"k": 1})),
    );
    kid.version = Some(2);
    kid.priority = 4;
    kid.tags = BTreeMap::from([("order".to_owned(), "42".to_owned())]);
    kid.parent = Some(link.clone());
    let at = now(p).await;
    turn(p, &parent, |ack| {
        ack.events = vec![event(
            at,
            EventKind::ChildScheduled {
                op: OpId::from_raw(1),
                name: "kid".to_owned(),
                version: Some(2),
                instance: kid.id.clone(),
                input: kid.input.clone(),
            },
        )];
        ack.children = vec![kid.clone()];
    })
    .await;
    let record = p.get_instance(&kid.id).await.unwrap();
    assert_eq!(record.name, "kid");
    assert_eq!(record.status, InstanceStatus::Pending);
    assert_eq!(record.parent.as_ref(), Some(&link));
    assert_eq!(record.priority, 4);
    assert_eq!(record.tags, kid.tags);
    assert_eq!(record.input, kid.input);
    let work = fetch_one(p).await;
    assert_eq!(work.lock.instance(), &kid.id);
    assert_eq!(work.messages.len(), 1);
    assert_eq!(
        work.messages[0].message,
        Message::Start {
            execution: ExecutionId::FIRST,
            name: "kid".to_owned(),
            version: Some(2),
            input: kid.input.clone(),
            parent: Some(link),
        }
    );
}

/// Creating a child whose id exists leaves that instance unchanged (no second start),
/// and the rest of the ack commits.
pub async fn a_child_whose_id_exists_is_left_unchanged(store: TestStore) {
    let p = &*store.provider;
    let kid = started(p, "kid").await;
    let before = p.get_instance(&kid).await.unwrap();
    let parent = started(p, "parent").await;
    let mut again = NewInstance::new(kid.clone(), "other", payload(&serde_json::json!(2)));
    again.parent = Some(ParentLink {
        instance: parent.clone(),
        execution: ExecutionId::FIRST,
        op: OpId::from_raw(1),
    });
    let at = now(p).await;
    turn(p, &parent, |ack| {
        ack.events = vec![marker(at, 1, 1)];
        ack.children = vec![again];
    })
    .await;
    let after = p.get_instance(&kid).await.unwrap();
    assert_eq!(after.name, "test");
    assert_eq!(after.parent, None);
    assert_eq!(after.input, before.input);
    assert_eq!(after.status, InstanceStatus::Running);
    assert_eq!(after.history_len, 1);
    assert_nothing_fetchable(p, "no second start was queued").await;
    assert_eq!(p.read_history(&parent, None).await.unwrap().len(), 2);
}

/// Cancelled activities that are still queued are deleted; the others stay. Cancelling
/// an op with no queued item (it already completed) is no error.
pub async fn cancelled_activities_leave_the_queue(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let at = now(p).await;
    let items: Vec<_> = (1..=4).map(|op| work_item(&a, op, "job", at)).collect();
    turn(p, &a, |ack| ack.activities = items).await;
    turn(p, &a, |ack| {
        ack.cancel_activities = vec![OpId::from_raw(1), OpId::from_raw(3), OpId::from_raw(99)];
    })
    .await;
    let leased = fetch_activities(p, 10).await;
    assert_eq!(ops_of(&leased, &a), [2, 4]);
}

/// Cancelling op N cancels this instance's item only, not another instance's op N.
pub async fn cancelling_only_touches_the_instances_own_activities(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let b = started(p, "b").await;
    let at = now(p).await;
    turn(p, &a, |ack| {
        ack.activities = vec![work_item(&a, 1, "job", at)]
    })
    .await;
    turn(p, &b, |ack| {
        ack.activities = vec![work_item(&b, 1, "job", at)]
    })
    .await;
    turn(p, &a, |ack| ack.cancel_activities = vec![OpId::from_raw(1)]).await;
    let leased = fetch_activities(p, 10).await;
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].item.instance, b);
}

/// Cancelling an activity that is leased marks it: renewing its lease fails with
/// `Cancelled`.
pub async fn cancelling_a_leased_activity_fails_its_renewal(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let at = now(p).await;
    turn(p, &a, |ack| {
        ack.activities = vec![work_item(&a, 1, "job", at)]
    })
    .await;
    let leased = fetch_activities(p, 10).await;
    assert_eq!(leased.len(), 1);
    p.renew_lease(&leased[0].lease, LOCK).await.unwrap();
    turn(p, &a, |ack| ack.cancel_activities = vec![OpId::from_raw(1)]).await;
    let err = p.renew_lease(&leased[0].lease, LOCK).await.unwrap_err();
    assert!(err.is_cancelled(), "{err}");
}

/// The custom status is set by `Set`, kept by `Unchanged`, replaced by another `Set`
/// and removed by `Cleared`.
pub async fn the_custom_status_is_set_kept_and_cleared(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    assert_eq!(p.get_instance(&a).await.unwrap().custom_status, None);
    let first = payload(&serde_json::json!({"stage": "charging"}));
    let second = payload(&serde_json::json!({"stage": "shipping", "pct": 50}));
    let steps = [
        (CustomStatusUpdate::Set(first.clone()), Some(first.clone())),
        (CustomStatusUpdate::Unchanged, Some(first)),
        (
            CustomStatusUpdate::Set(second.clone()),
            Some(second.clone()),
        ),
        (CustomStatusUpdate::Unchanged, Some(second)),
        (CustomStatusUpdate::Cleared, None),
        (CustomStatusUpdate::Unchanged, None),
    ];
    for (update, expected) in steps {
        let what = format!("{update:?}");
        turn(p, &a, |ack| ack.custom_status = update).await;
        assert_eq!(
            p.get_instance(&a).await.unwrap().custom_status,
            expected,
            "after {what}"
        );
    }
}

/// A `Completed` outcome sets the status, the output and `completed_at` (the
/// provider's time of the ack).
pub async fn completing_records_the_output_and_the_time(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    assert_eq!(p.get_instance(&a).await.unwrap().completed_at, None);
    if store.has_manual_clock() {
        // Far from the host's time, so that a provider reading the wrong clock shows.
        store.advance(Duration::from_secs(30 * 24 * 3_600)).await;
    }
    let output = payload(&serde_json::json!({"total": 99.5}));
    let before = now(p).await;
    turn(p, &a, |ack| {
        ack.events = vec![event(
            before,
            EventKind::ExecutionCompleted {
                output: output.clone(),
            },
        )];
        ack.outcome = TurnOutcome::Completed(output.clone());
    })
    .await;
    let after = now(p).await;
    let record = p.get_instance(&a).await.unwrap();
    assert_eq!(record.status, InstanceStatus::Completed);
    assert_eq!(record.output, Some(output));
    assert_eq!(record.failure, None);
    let done = record.completed_at.expect("completed_at is set");
    assert!(
        before <= done && done <= after,
        "completed at {done}, acked between {before} and {after}"
    );
}

/// A `Failed` outcome sets the status, the failure with its chain and data, and
/// `completed_at`.
pub async fn failing_records_the_failure(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let failure = Failure::new("PaymentDeclined", "card refused")
        .with_cause("bank said no")
        .retryable(false)
        .with_data(payload(&serde_json::json!({"code": 51})));
    turn(p, &a, |ack| {
        ack.outcome = TurnOutcome::Failed(failure.clone())
    })
    .await;
    let record = p.get_instance(&a).await.unwrap();
    assert_eq!(record.status, InstanceStatus::Failed);
    assert_eq!(record.failure, Some(failure));
    assert_eq!(record.output, None);
    assert!(record.completed_at.is_some());
}

/// A `Cancelled` outcome sets the status Cancelled, its failure and `completed_at`.
pub async fn cancelling_records_the_cancellation(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let failure = Failure::new(Failure::CANCELLED, "cancelled by the operator").retryable(false);
    turn(p, &a, |ack| {
        ack.outcome = TurnOutcome::Cancelled(failure.clone());
    })
    .await;
    let record = p.get_instance(&a).await.unwrap();
    assert_eq!(record.status, InstanceStatus::Cancelled);
    assert_eq!(record.failure, Some(failure));
    assert_eq!(record.output, None);
    assert!(record.completed_at.is_some());
}

/// A turn in flight when its instance is paused still acks, and the instance stays
/// paused: the ack's events are recorded, and new messages wait for the resume.
pub async fn a_turn_of_a_paused_instance_keeps_it_paused(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let work = next_turn(p, &a).await;
    p.pause(&a).await.unwrap();
    let mut ack = ack_all(&work);
    ack.events = vec![marker(now(p).await, 1, 1)];
    ack_one(p, ack).await.unwrap();
    let record = p.get_instance(&a).await.unwrap();
    assert_eq!(record.status, InstanceStatus::Paused);
    assert_eq!(record.history_len, 2);
    send(p, &a, signal("s", 2)).await;
    assert_nothing_fetchable(p, "the instance is paused").await;
    p.resume(&a).await.unwrap();
    assert_eq!(signal_numbers(&fetch_one(p).await), [2]);
}

/// Only the messages an ack lists as consumed are deleted; the others stay queued.
pub async fn only_consumed_messages_are_deleted(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    for n in 1..=4 {
        send(p, &a, signal("s", n)).await;
    }
    let work = fetch_one(p).await;
    let consumed = vec![work.messages[0].id, work.messages[2].id];
    ack_one(p, Ack::new(work.lock.clone(), consumed))
        .await
        .unwrap();
    let next = fetch_one(p).await;
    assert_eq!(signal_numbers(&next), [2, 4]);
    assert_eq!(next.messages[0].id, work.messages[1].id);
}

/// An ack whose lock was taken over is `Stale` and changes nothing (no events, work
/// items, messages, children or status; its messages stay), while the other acks of the
/// same call commit.
pub async fn a_stale_ack_changes_nothing_while_the_others_commit(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let b = started(p, "b").await;
    send(p, &a, signal("s", 1)).await;
    let old = fetch_for(p, 10, SHORT).await;
    assert_eq!(old.len(), 1);
    store.advance(PAST_SHORT).await;
    send(p, &b, signal("s", 2)).await;
    let current = fetch(p, 10).await;
    assert_eq!(current.len(), 2, "a (taken over) and b");
    let new_a = current.iter().find(|w| w.lock.instance() == &a).unwrap();
    let b_work = current.iter().find(|w| w.lock.instance() == &b).unwrap();

    let at = now(p).await;
    let mut stale = ack_all(&old[0]);
    stale.events = vec![marker(at, 1, 1)];
    stale.activities = vec![work_item(&a, 1, "job", at)];
    stale.messages = vec![OutgoingMessage {
        to: b.clone(),
        message: signal("from-a", 9),
        visible_at: None,
    }];
    stale.children = vec![new_instance("a-kid")];
    stale.custom_status = CustomStatusUpdate::Set(payload(&serde_json::json!("x")));
    stale.outcome = TurnOutcome::Completed(payload(&serde_json::json!("x")));
    let mut good = ack_all(b_work);
    good.events = vec![marker(at, 1, 2)];
    good.activities = vec![work_item(&b, 1, "job", at)];
    let results = p.ack_turns(vec![stale, good]).await.unwrap();
    assert_eq!(results.len(), 2);
    let err = results[0].as_ref().unwrap_err();
    assert!(err.is_stale(), "{err}");
    assert!(results[1].is_ok(), "{:?}", results[1]);

    assert_eq!(p.read_history(&a, None).await.unwrap().len(), 1);
    assert_eq!(p.read_history(&b, None).await.unwrap().len(), 2);
    let record = p.get_instance(&a).await.unwrap();
    assert_eq!(record.status, InstanceStatus::Running);
    assert_eq!(record.custom_status, None);
    assert_eq!(record.output, None);
    assert!(
        p.get_instance(&id("a-kid"))
            .await
            .unwrap_err()
            .is_not_found()
    );
    let leased = fetch_activities(p, 10).await;
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].item.instance, b);
    // b got no message from a, and a still has its signal.
    assert_nothing_fetchable(p, "a is held by its new holder, b has nothing").await;
    p.abandon_lock(&new_a.lock, Duration::ZERO).await.unwrap();
    assert_eq!(signal_numbers(&fetch_one(p).await), [1]);
}

/// An ack whose lock expired is rejected as `Stale` even if no one took the instance
/// over, and changes nothing.
pub async fn an_ack_with_an_expired_lock_is_rejected(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    send(p, &a, signal("s", 1)).await;
    let work = fetch_for(p, 10, SHORT).await;
    store.advance(PAST_SHORT).await;
    let mut ack = ack_all(&work[0]);
    ack.events = vec![marker(now(p).await, 1, 1)];
    ack.outcome = TurnOutcome::Completed(payload(&serde_json::json!(1)));
    let err = ack_one(p, ack).await.unwrap_err();
    assert!(err.is_stale(), "{err}");
    assert_eq!(p.read_history(&a, None).await.unwrap().len(), 1);
    assert_eq!(
        p.get_instance(&a).await.unwrap().status,
        InstanceStatus::Running
    );
    assert_eq!(signal_numbers(&fetch_one(p).await), [1]);
}

/// A lock serves one ack: acking again with it is `Stale`, and its events are recorded
/// once.
pub async fn acking_twice_with_one_lock_is_stale(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let work = next_turn(p, &a).await;
    let mut ack = ack_all(&work);
    ack.events = vec![marker(now(p).await, 1, 1)];
    ack_one(p, ack.clone()).await.unwrap();
    let err = ack_one(p, ack.clone()).await.unwrap_err();
    assert!(err.is_stale(), "{err}");
    let results = p.ack_turns(vec![ack.clone(), ack]).await.unwrap();
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().is_err_and(|e| e.is_stale()))
    );
    assert_eq!(p.read_history(&a, None).await.unwrap().len(), 2);
}

/// Atomicity: an ack with a record over `max_record_bytes` is `TooLarge` (naming the
/// limit and the size) and leaves no partial state — no events, work items, messages or
/// children, its messages not consumed, its status unchanged and its lock still held —
/// while the acks before and after it in the call commit.
pub async fn an_oversized_ack_changes_nothing_while_the_others_commit(store: TestStore) {
    let p = &*store.provider;
    let limit = store.capabilities().max_record_bytes;
    for name in ["a", "b", "c"] {
        p.create_instance(new_instance(name), OnConflict::Fail)
            .await
            .unwrap();
    }
    let mut work = fetch(p, 10).await;
    assert_eq!(work.len(), 3);
    work.sort_by(|x, y| x.lock.instance().cmp(y.lock.instance()));
    let at = now(p).await;
    let acks: Vec<Ack> = work
        .iter()
        .map(|w| {
            let me = w.lock.instance().clone();
            let mut ack = ack_all(w);
            ack.version = Some(1);
            ack.events = vec![started_event(at), marker(at, 1, 1)];
            ack.activities = vec![work_item(&me, 2, "job", at)];
            ack.messages = vec![OutgoingMessage {
                to: me.clone(),
                message: signal("self", 1),
                visible_at: None,
            }];
            ack.children = vec![new_instance(&format!("{me}-kid"))];
            ack.custom_status = CustomStatusUpdate::Set(payload(&serde_json::json!("busy")));
            if me.as_str() == "b" {
                ack.events.push(event(
                    at,
                    EventKind::SignalReceived {
                        name: "huge".to_owned(),
                        payload: oversized_payload(limit),
                    },
                ));
                ack.events.push(marker(at, 3, 3));
            }
            ack
        })
        .collect();
    let results = p.ack_turns(acks).await.unwrap();
    assert_eq!(results.len(), 3, "one result per ack");
    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert_too_large(results[1].as_ref().unwrap_err(), limit);
    assert!(results[2].is_ok(), "{:?}", results[2]);

    let b = id("b");
    assert_eq!(p.read_history(&b, None).await.unwrap(), []);
    let record = p.get_instance(&b).await.unwrap();
    assert_eq!(record.status, InstanceStatus::Pending);
    assert_eq!(record.custom_status, None);
    assert_eq!(record.history_len, 0);
    assert!(
        p.get_instance(&id("b-kid"))
            .await
            .unwrap_err()
            .is_not_found()
    );
    for other in ["a", "c"] {
        assert_eq!(p.read_history(&id(other), None).await.unwrap().len(), 2);
    }
    let leased = fetch_activities(p, 10).await;
    let owners: BTreeSet<_> = leased.iter().map(|l| l.item.instance.clone()).collect();
    assert_eq!(owners, BTreeSet::from([id("a"), id("c")]));
    let fetched: BTreeSet<_> = fetch(p, 10)
        .await
        .into_iter()
        .map(|w| w.lock.instance().clone())
        .collect();
    let expected = BTreeSet::from([id("a"), id("c"), id("a-kid"), id("c-kid")]);
    assert_eq!(fetched, expected, "b is still locked and sent nothing");

    // The lock is still b's: a smaller ack with it commits, consuming nothing.
    let mut retry = Ack::new(work[1].lock.clone(), Vec::new());
    retry.events = vec![started_event(at)];
    ack_one(p, retry).await.unwrap();
    let again = fetch_one(p).await;
    assert_eq!(again.lock.instance(), &b);
    assert_eq!(
        again.messages, work[1].messages,
        "b's start is still queued, alone"
    );
}

/// An ack scheduling a work item over `max_record_bytes` is `TooLarge` and changes
/// nothing.
pub async fn a_work_item_over_the_record_limit_is_too_large(store: TestStore) {
    let p = &*store.provider;
    let limit = store.capabilities().max_record_bytes;
    let a = started(p, "a").await;
    let work = next_turn(p, &a).await;
    let at = now(p).await;
    let mut huge = work_item(&a, 2, "job", at);
    huge.input = oversized_payload(limit);
    let mut ack = ack_all(&work);
    ack.events = vec![marker(at, 1, 1)];
    ack.activities = vec![work_item(&a, 1, "job", at), huge];
    assert_too_large(&ack_one(p, ack).await.unwrap_err(), limit);
    assert_eq!(p.read_history(&a, None).await.unwrap().len(), 1);
    assert!(fetch_activities(p, 10).await.is_empty());
}

/// An ack sending a message over `max_record_bytes` is `TooLarge` and changes nothing.
pub async fn an_outgoing_message_over_the_record_limit_is_too_large(store: TestStore) {
    let p = &*store.provider;
    let limit = store.capabilities().max_record_bytes;
    let a = started(p, "a").await;
    let b = started(p, "b").await;
    let work = next_turn(p, &a).await;
    let mut ack = ack_all(&work);
    ack.events = vec![marker(now(p).await, 1, 1)];
    ack.messages = vec![
        OutgoingMessage {
            to: b.clone(),
            message: signal("small", 1),
            visible_at: None,
        },
        OutgoingMessage {
            to: b.clone(),
            message: Message::Signal {
                name: "huge".to_owned(),
                payload: oversized_payload(limit),
            },
            visible_at: None,
        },
    ];
    assert_too_large(&ack_one(p, ack).await.unwrap_err(), limit);
    assert_eq!(p.read_history(&a, None).await.unwrap().len(), 1);
    assert_nothing_fetchable(p, "b got nothing, and a is still locked").await;
}

/// An ack that would take the history past `max_history_events` is `TooLarge` (naming
/// the limit) and changes nothing. Where the limit is small enough to fill, a history
/// filled to exactly the limit commits first.
pub async fn a_history_over_its_event_limit_is_too_large(store: TestStore) {
    // Filling a history to the limit costs time in proportion to it; one ack of as many
    // events, rejected, costs only memory.
    const FILLABLE: u64 = 20_000;
    const BUILDABLE: u64 = 2_000_000;
    let p = &*store.provider;
    let limit = store.capabilities().max_history_events;
    if limit > BUILDABLE {
        eprintln!(
            "SKIPPED acks::a_history_over_its_event_limit_is_too_large: max_history_events \
             is {limit}, above the {BUILDABLE} events this test can build"
        );
        return;
    }
    let a = started(p, "a").await;
    let at = now(p).await;
    // The history holds 1 event.
    let mut len = 1;
    if limit <= FILLABLE {
        let fill: Vec<_> = (1..limit).map(|op| marker(at, op, op)).collect();
        turn(p, &a, |ack| ack.events = fill).await;
        len = limit;
        assert_eq!(p.get_instance(&a).await.unwrap().history_len, limit);
    }
    // One more than the limit allows.
    let over: Vec<_> = (len..=limit).map(|op| marker(at, op, 0)).collect();
    let work = next_turn(p, &a).await;
    let mut ack = ack_all(&work);
    ack.events = over;
    ack.custom_status = CustomStatusUpdate::Set(payload(&serde_json::json!("full")));
    let err = ack_one(p, ack).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TooLarge, "{err}");
    assert!(err.message().contains(&limit.to_string()), "{err}");
    let record = p.get_instance(&a).await.unwrap();
    assert_eq!(record.history_len, len);
    assert_eq!(record.custom_status, None);
}

/// A call returns one result per ack, in the order given; an empty call returns none.
pub async fn results_come_one_per_ack_in_order(store: TestStore) {
    let p = &*store.provider;
    assert!(p.ack_turns(Vec::new()).await.unwrap().is_empty());
    for name in ["a", "b", "c", "d"] {
        p.create_instance(new_instance(name), OnConflict::Fail)
            .await
            .unwrap();
    }
    let old = fetch_for(p, 10, SHORT).await;
    store.advance(PAST_SHORT).await;
    let new = fetch(p, 10).await;
    assert_eq!((old.len(), new.len()), (4, 4));
    let by_name = |works: &[OrchestrationWork], name: &str| {
        works
            .iter()
            .find(|w| w.lock.instance().as_str() == name)
            .map(ack_all)
            .unwrap()
    };
    let at = now(p).await;
    let mut acks = vec![
        by_name(&new, "c"),
        by_name(&old, "a"),
        by_name(&new, "b"),
        by_name(&old, "d"),
        by_name(&new, "a"),
    ];
    for ack in &mut acks {
        ack.events = vec![started_event(at)];
    }
    let results = p.ack_turns(acks).await.unwrap();
    let shape: Vec<&str> = results
        .iter()
        .map(|r| match r {
            Ok(()) => "ok",
            Err(e) if e.is_stale() => "stale",
            Err(_) => "other",
        })
        .collect();
    assert_eq!(shape, ["ok", "stale", "ok", "stale", "ok"], "{results:?}");
    for (name, len) in [("a", 1), ("b", 1), ("c", 1), ("d", 0)] {
        assert_eq!(
            p.read_history(&id(name), None).await.unwrap().len(),
            len,
            "{name}"
        );
    }
}

/// Group commit: `max_batch` acks in one call all commit, each atomically.
pub async fn max_batch_acks_commit_in_one_call(store: TestStore) {
    let p = &*store.provider;
    let caps = store.capabilities();
    let n = caps.max_batch;
    for i in 0..n {
        p.create_instance(new_instance(&format!("i{i:05}")), OnConflict::Fail)
            .await
            .unwrap();
    }
    let mut work = Vec::new();
    while work.len() < n {
        let batch = fetch(p, caps.max_fetch_instances.min(n - work.len())).await;
        assert!(!batch.is_empty(), "only {} of {n} fetched", work.len());
        work.extend(batch);
    }
    let at = now(p).await;
    let acks: Vec<Ack> = work
        .iter()
        .map(|w| {
            let mut ack = ack_all(w);
            ack.events = vec![started_event(at), marker(at, 1, 1)];
            ack.activities = vec![work_item(w.lock.instance(), 2, "job", at)];
            ack
        })
        .collect();
    let results = p.ack_turns(acks).await.unwrap();
    assert_eq!(results.len(), n);
    for (w, result) in work.iter().zip(&results) {
        assert!(result.is_ok(), "{}: {result:?}", w.lock.instance());
    }
    for w in &work {
        let record = p.get_instance(w.lock.instance()).await.unwrap();
        assert_eq!(record.history_len, 2, "{}", w.lock.instance());
    }
    let mut leased = 0;
    // Bounded: a provider handing out items twice must fail the test, not hang it.
    for _ in 0..=n {
        let items = fetch_activities(p, caps.max_fetch_items).await;
        if items.is_empty() {
            break;
        }
        leased += items.len();
    }
    assert_eq!(leased, n, "one work item per ack");
    assert_nothing_fetchable(p, "every start was consumed").await;
}
