//! Management: reading instances and their histories, and how much work is queued.

use std::collections::BTreeMap;
use std::time::Duration;

use keel_core::{
    Event, EventKind, ExecutionId, Failure, InstanceStatus, Message, OpId, SideEffect, Timestamp,
};
use keel_provider::{CustomStatusUpdate, ErrorKind, QueueDepths, TurnOutcome};

use crate::TestStore;
use crate::fixtures::{
    FIRST, ack_all, activity, create, end, expect_kind, fetch_instance, id, json, lease_queues,
    new_instance, poke, provider_now, queue, run_turn, running, schedule, signal,
};

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_management {
    ($factory:expr) => {
        $crate::__stamp!(
            $factory,
            management,
            [
                get_instance_reports_a_new_instance,
                get_instance_reports_a_turns_results,
                a_failed_instance_reports_its_failure,
                getting_an_unknown_instance_is_not_found,
                custom_status_is_set_kept_and_cleared,
                read_history_returns_the_current_executions_events_in_order,
                read_history_reads_earlier_executions_after_continue_as_new,
                reading_the_history_of_an_unknown_instance_or_execution_is_not_found,
                queue_depths_count_each_kind_of_queued_work,
            ]
        );
    };
}

fn marker(at: Timestamp, op: u64) -> Event {
    Event {
        at,
        kind: EventKind::SideEffectRecorded {
            op: OpId::from_raw(op),
            value: SideEffect::Random(op),
        },
    }
}

/// A new instance reports what it was created with: Pending, no history, no output.
pub async fn get_instance_reports_a_new_instance(store: TestStore) {
    let p = &*store.provider;
    let mut new = new_instance("a");
    new.queue = queue("orders");
    new.priority = 4;
    new.tags = BTreeMap::from([("team".to_owned(), "billing".to_owned())]);
    let before = provider_now(p).await;
    create(p, new.clone()).await;
    let after = provider_now(p).await;
    let record = p.get_instance(&new.id).await.expect("get");
    assert_eq!(record.id, new.id);
    assert_eq!(record.name, "test");
    assert_eq!(record.status, InstanceStatus::Pending);
    assert_eq!(record.execution, FIRST);
    assert_eq!(record.input, new.input);
    assert_eq!(record.queue, new.queue);
    assert_eq!(record.priority, 4);
    assert_eq!(record.tags, new.tags);
    assert_eq!(record.parent, None);
    assert_eq!(record.history_len, 0);
    assert_eq!(record.output, None);
    assert_eq!(record.failure, None);
    assert_eq!(record.completed_at, None);
    assert!(record.created_at >= before && record.created_at <= after);
}

/// After a turn, `get_instance` reports its status, version, output, custom status,
/// history length and when it changed and ended.
pub async fn get_instance_reports_a_turns_results(store: TestStore) {
    let p = &*store.provider;
    let a = create(p, new_instance("a")).await;
    let created_at = p.get_instance(&a).await.expect("get").created_at;
    store.advance(Duration::from_millis(20)).await;
    let before = provider_now(p).await;
    let custom = json(serde_json::json!({"stage": "shipping"}));
    let out = json(serde_json::json!({"total": 42}));
    run_turn(p, &a, |work| {
        let mut ack = ack_all(work);
        ack.version = Some(3);
        ack.events = vec![marker(before, 1), marker(before, 2)];
        ack.custom_status = CustomStatusUpdate::Set(custom.clone());
        ack.outcome = TurnOutcome::Completed(out.clone());
        ack
    })
    .await
    .expect("ack");
    let after = provider_now(p).await;
    let record = p.get_instance(&a).await.expect("get");
    assert_eq!(record.status, InstanceStatus::Completed);
    assert_eq!(record.version, Some(3));
    assert_eq!(record.output, Some(out));
    assert_eq!(record.failure, None);
    assert_eq!(record.custom_status, Some(custom));
    assert_eq!(record.history_len, 2);
    assert_eq!(record.created_at, created_at, "creation time is kept");
    assert!(
        record.updated_at >= before && record.updated_at <= after,
        "updated_at {:?} is the turn's time ({before:?}..{after:?})",
        record.updated_at
    );
    let completed_at = record.completed_at.expect("completed_at is set");
    assert!(completed_at >= before && completed_at <= after);
}

/// A failed instance reports its failure and no output.
pub async fn a_failed_instance_reports_its_failure(store: TestStore) {
    let p = &*store.provider;
    let a = create(p, new_instance("a")).await;
    let failure = Failure::new("Boom", "it broke").with_cause("underneath");
    end(p, &a, TurnOutcome::Failed(failure.clone())).await;
    let record = p.get_instance(&a).await.expect("get");
    assert_eq!(record.status, InstanceStatus::Failed);
    assert_eq!(record.failure, Some(failure));
    assert_eq!(record.output, None);
    assert!(record.completed_at.is_some());
}

/// `get_instance` of an unknown id is `NotFound`.
pub async fn getting_an_unknown_instance_is_not_found(store: TestStore) {
    expect_kind(
        store.provider.get_instance(&id("ghost")).await,
        ErrorKind::NotFound,
        "an unknown instance",
    );
}

/// A turn sets, keeps or clears the custom status.
pub async fn custom_status_is_set_kept_and_cleared(store: TestStore) {
    let p = &*store.provider;
    let a = running(p, "a").await;
    let custom = json(serde_json::json!("step 1"));
    let updates = [
        (
            CustomStatusUpdate::Set(custom.clone()),
            Some(custom.clone()),
        ),
        (CustomStatusUpdate::Unchanged, Some(custom)),
        (CustomStatusUpdate::Cleared, None),
    ];
    for (update, expected) in updates {
        poke(p, &a).await;
        run_turn(p, &a, |work| {
            let mut ack = ack_all(work);
            ack.custom_status = update;
            ack
        })
        .await
        .expect("ack");
        let record = p.get_instance(&a).await.expect("get");
        assert_eq!(record.custom_status, expected);
    }
}

/// `read_history` returns the current execution's events, in order, across turns.
pub async fn read_history_returns_the_current_executions_events_in_order(store: TestStore) {
    let p = &*store.provider;
    let a = running(p, "a").await;
    let mut expected = p.read_history(&a, None).await.expect("history");
    for ops in [[1, 2], [3, 4]] {
        let at = provider_now(p).await;
        let events: Vec<Event> = ops.iter().map(|&op| marker(at, op)).collect();
        expected.extend(events.iter().cloned());
        poke(p, &a).await;
        run_turn(p, &a, |work| {
            let mut ack = ack_all(work);
            ack.events = events;
            ack
        })
        .await
        .expect("ack");
    }
    assert_eq!(p.read_history(&a, None).await.expect("history"), expected);
    assert_eq!(
        p.read_history(&a, Some(FIRST)).await.expect("history"),
        expected
    );
    let record = p.get_instance(&a).await.expect("get");
    assert_eq!(record.history_len, expected.len() as u64);
}

/// After continue-as-new the current execution has a fresh history and its start (then
/// the carried messages) is queued; the earlier execution's history stays readable.
pub async fn read_history_reads_earlier_executions_after_continue_as_new(store: TestStore) {
    let p = &*store.provider;
    let a = create(p, new_instance("a")).await;
    let at = provider_now(p).await;
    let input2 = json(serde_json::json!({"n": 2}));
    let first_events = vec![
        marker(at, 1),
        Event {
            at,
            kind: EventKind::ContinuedAsNew {
                input: input2.clone(),
            },
        },
    ];
    run_turn(p, &a, |work| {
        let mut ack = ack_all(work);
        ack.version = Some(1);
        ack.events = first_events.clone();
        ack.outcome = TurnOutcome::ContinuedAsNew {
            input: input2.clone(),
            version: Some(1),
            carried: vec![signal("carried", 9)],
        };
        ack
    })
    .await
    .expect("ack");
    let second = ExecutionId::FIRST.next();
    let record = p.get_instance(&a).await.expect("get");
    assert_eq!(record.execution, second);
    assert_eq!(record.history_len, 0);
    assert_eq!(record.input, input2);
    assert!(!record.status.is_terminal(), "{:?}", record.status);
    assert_eq!(p.read_history(&a, None).await.expect("history"), []);
    assert_eq!(
        p.read_history(&a, Some(FIRST)).await.expect("history"),
        first_events
    );

    let work = fetch_instance(p, &a)
        .await
        .expect("the next execution starts");
    let messages: Vec<&Message> = work.messages.iter().map(|m| &m.message).collect();
    assert_eq!(messages.len(), 2, "{messages:?}");
    let Message::Start {
        execution, input, ..
    } = messages[0]
    else {
        panic!("expected the next execution's start, got {:?}", messages[0]);
    };
    assert_eq!((*execution, input), (second, &input2));
    assert_eq!(messages[1], &signal("carried", 9));
    let second_events = vec![marker(at, 1)];
    let mut ack = ack_all(&work);
    ack.events = second_events.clone();
    p.ack_turns(vec![ack]).await.expect("ack")[0]
        .as_ref()
        .expect("ack");
    assert_eq!(p.read_history(&a, None).await.expect("h"), second_events);
    assert_eq!(
        p.read_history(&a, Some(second)).await.expect("h"),
        second_events
    );
    assert_eq!(
        p.read_history(&a, Some(FIRST)).await.expect("h"),
        first_events
    );
}

/// `read_history` of an unknown instance or execution is `NotFound`.
pub async fn reading_the_history_of_an_unknown_instance_or_execution_is_not_found(
    store: TestStore,
) {
    let p = &*store.provider;
    let a = running(p, "a").await;
    expect_kind(
        p.read_history(&id("ghost"), None).await,
        ErrorKind::NotFound,
        "an unknown instance",
    );
    expect_kind(
        p.read_history(&a, Some(ExecutionId::from_raw(7))).await,
        ErrorKind::NotFound,
        "an unknown execution",
    );
}

/// `queue_depths` counts ready and delayed messages, ready activities per queue,
/// delayed (retrying) and running (leased) activities.
pub async fn queue_depths_count_each_kind_of_queued_work(store: TestStore) {
    let p = &*store.provider;
    let at = provider_now(p).await;
    let items = [(1, "q1"), (2, "q1"), (3, "q2"), (4, "q2"), (5, "q2")]
        .into_iter()
        .map(|(op, q)| {
            let mut item = activity("x", op, "work", at);
            item.options.queue = queue(q);
            item
        })
        .collect();
    let x = schedule(p, "x", items).await;
    let hour = Duration::from_secs(3_600);
    let running_item = lease_queues(p, &["q2"], 1, hour).await;
    assert_eq!(running_item.len(), 1);
    let retried = lease_queues(p, &["q2"], 1, hour).await.remove(0);
    p.retry_activity(keel_provider::ActivityRetry {
        lease: retried.lease,
        next_attempt: 2,
        delay: hour,
        failure: Failure::new("Flaky", "again"),
    })
    .await
    .expect("retry");
    create(p, new_instance("y")).await;
    let mut z = new_instance("z");
    let later = provider_now(p).await.saturating_add(hour);
    z.start_at = Some(later);
    create(p, z).await;
    p.send_message(&x, signal("later", 1), Some(later))
        .await
        .expect("send");

    let mut depths = p.queue_depths().await.expect("queue depths");
    depths.activities_ready.retain(|_, n| *n > 0);
    let expected = QueueDepths {
        messages_ready: 1,
        messages_delayed: 2,
        activities_ready: BTreeMap::from([("q1".to_owned(), 2), ("q2".to_owned(), 1)]),
        activities_delayed: 1,
        activities_running: 1,
        dead_letters: 0,
    };
    assert_eq!(depths, expected);
}
