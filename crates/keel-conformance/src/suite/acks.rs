//! Acking a turn: everything it commits, atomically (its events, work items, messages,
//! children, cancellations, custom status and outcome), and only the messages it
//! consumed.

use std::collections::BTreeMap;
use std::time::Duration;

use keel_core::{
    ActivityOptions, EventKind, ExecutionId, Failure, InstanceId, InstanceStatus, Message, OpId,
    ParentLink, QueueName, RetryPolicy,
};
use keel_provider::{
    Ack, CustomStatusUpdate, NewInstance, OnConflict, OutgoingMessage, TurnOutcome,
};

use crate::TestStore;
use crate::fixtures::{
    LOCK, SHORT, ack_all, ack_one, assert_nothing_fetchable, event, fetch_activities, fetch_one,
    id, marker, new_instance, next_turn, now, payload, send, signal, signal_numbers, started,
    started_event, turn, work_item,
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
            ]
        );
    };
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
