//! Delayed visibility: timers, delayed messages and starts become visible at their
//! `visible_at` by the provider's clock, and `next_due` says when.

use std::time::Duration;

use keel_core::{ExecutionId, Message, OpId, Timestamp};
use keel_provider::{OnConflict, OutgoingMessage, WorkKind};

use crate::TestStore;
use crate::fixtures::{
    SHORT, ack_all, ack_one, assert_nothing_fetchable, fetch, fetch_one, new_instance, now, send,
    signal, signal_numbers, started,
};

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_visibility {
    ($factory:expr) => {
        $crate::__stamp!(
            $factory,
            visibility,
            [
                delayed_messages_become_visible_in_due_order,
                a_message_is_visible_exactly_at_its_time,
                next_due_reports_the_earliest_invisible_message,
                next_due_is_none_when_nothing_is_delayed,
                next_due_reports_a_delayed_start,
                next_due_of_activities_ignores_orchestrator_messages,
                a_due_timer_and_a_fresh_signal_arrive_in_one_batch,
                a_delayed_message_does_not_hold_back_visible_ones,
                a_delayed_message_keeps_its_enqueue_position,
                a_time_in_the_past_is_visible_at_once,
                only_instances_with_visible_messages_are_fetched,
                queue_depths_tell_ready_from_delayed,
            ]
        );
    };
}

/// The fire of a timer `op` of the first execution.
fn timer(op: u64) -> Message {
    Message::TimerFired {
        execution: ExecutionId::FIRST,
        op: OpId::from_raw(op),
    }
}

/// The timer ops among `messages`, in delivery order.
fn timer_ops(work: &keel_provider::OrchestrationWork) -> Vec<u64> {
    work.messages
        .iter()
        .filter_map(|m| match m.message {
            Message::TimerFired { op, .. } => Some(op.get()),
            _ => None,
        })
        .collect()
}

/// Several delayed messages to one instance become visible one by one, in the order
/// of their due times, whatever the order they were sent in.
pub async fn delayed_messages_become_visible_in_due_order(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let t0 = now(p).await;
    for (op, secs) in [(3, 3), (1, 1), (2, 2)] {
        p.send_message(&a, timer(op), Some(t0.saturating_add(SHORT * secs)))
            .await
            .unwrap();
    }
    assert_nothing_fetchable(p, "no timer is due").await;
    for op in 1..=3 {
        store.advance(SHORT).await;
        let work = fetch_one(p).await;
        assert_eq!(timer_ops(&work), [op], "only timer {op} is due");
        ack_one(p, ack_all(&work)).await.unwrap();
        assert_nothing_fetchable(p, "the next timer is not due").await;
    }
}

/// Visibility follows the provider's clock: a message is visible once the clock reaches
/// its `visible_at`, not a moment later.
pub async fn a_message_is_visible_exactly_at_its_time(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let due = now(p).await.saturating_add(SHORT);
    p.send_message(&a, timer(1), Some(due)).await.unwrap();
    if store.has_manual_clock() {
        store.advance(SHORT - Duration::from_millis(1)).await;
        assert_nothing_fetchable(p, "one millisecond early").await;
        store.advance(Duration::from_millis(1)).await;
    } else {
        store.advance(SHORT).await;
    }
    assert!(now(p).await >= due);
    assert_eq!(timer_ops(&fetch_one(p).await), [1]);
}

/// `next_due` reports when the earliest invisible orchestrator message becomes visible.
pub async fn next_due_reports_the_earliest_invisible_message(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let b = started(p, "b").await;
    let t0 = now(p).await;
    let (early, late) = (
        t0.saturating_add(Duration::from_secs(50)),
        t0.saturating_add(Duration::from_secs(90)),
    );
    p.send_message(&a, timer(1), Some(late)).await.unwrap();
    p.send_message(&b, timer(1), Some(early)).await.unwrap();
    send(p, &a, signal("now", 1)).await;
    assert_eq!(
        p.next_due(WorkKind::Orchestrations).await.unwrap(),
        Some(early)
    );
}

/// `next_due` is `None` when no orchestrator message is delayed, even with visible ones
/// queued.
pub async fn next_due_is_none_when_nothing_is_delayed(store: TestStore) {
    let p = &*store.provider;
    assert_eq!(p.next_due(WorkKind::Orchestrations).await.unwrap(), None);
    let a = started(p, "a").await;
    assert_eq!(p.next_due(WorkKind::Orchestrations).await.unwrap(), None);
    send(p, &a, signal("now", 1)).await;
    assert_eq!(p.next_due(WorkKind::Orchestrations).await.unwrap(), None);
}

/// A delayed start counts as an invisible message: `next_due` reports its `start_at`.
pub async fn next_due_reports_a_delayed_start(store: TestStore) {
    let p = &*store.provider;
    let start_at = now(p).await.saturating_add(Duration::from_secs(3_600));
    let mut instance = new_instance("a");
    instance.start_at = Some(start_at);
    p.create_instance(instance, OnConflict::Fail).await.unwrap();
    assert_eq!(
        p.next_due(WorkKind::Orchestrations).await.unwrap(),
        Some(start_at)
    );
}

/// `next_due` of activities is not about orchestrator messages.
pub async fn next_due_of_activities_ignores_orchestrator_messages(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let due = now(p).await.saturating_add(Duration::from_secs(60));
    p.send_message(&a, timer(1), Some(due)).await.unwrap();
    assert_eq!(p.next_due(WorkKind::Activities).await.unwrap(), None);
    assert_eq!(
        p.next_due(WorkKind::Orchestrations).await.unwrap(),
        Some(due)
    );
}

/// A timer that has come due and a signal sent meanwhile arrive in one batch, in the
/// order they were enqueued.
pub async fn a_due_timer_and_a_fresh_signal_arrive_in_one_batch(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let due = now(p).await.saturating_add(SHORT);
    send(p, &a, signal("go", 0)).await;
    let work = fetch_one(p).await;
    let mut ack = ack_all(&work);
    ack.messages = vec![OutgoingMessage {
        to: a.clone(),
        message: timer(1),
        visible_at: Some(due),
    }];
    ack_one(p, ack).await.unwrap();
    store.advance(SHORT).await;
    send(p, &a, signal("fresh", 5)).await;
    let work = fetch_one(p).await;
    assert_eq!(work.messages.len(), 2, "{:?}", work.messages);
    assert_eq!(work.messages[0].message, timer(1));
    assert_eq!(signal_numbers(&work), [5]);
}

/// An instance's delayed message does not hold back its visible ones: they are
/// delivered now, without it, and it follows when due.
pub async fn a_delayed_message_does_not_hold_back_visible_ones(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let due = now(p).await.saturating_add(SHORT);
    p.send_message(&a, timer(1), Some(due)).await.unwrap();
    send(p, &a, signal("now", 2)).await;
    let work = fetch_one(p).await;
    assert_eq!(work.messages.len(), 1, "{:?}", work.messages);
    assert_eq!(signal_numbers(&work), [2]);
    ack_one(p, ack_all(&work)).await.unwrap();
    assert_nothing_fetchable(p, "the timer is not due").await;
    store.advance(SHORT).await;
    let work = fetch_one(p).await;
    assert_eq!(timer_ops(&work), [1]);
}

/// Once visible, a delayed message is delivered in its enqueue order among the visible
/// ones: before messages enqueued after it.
pub async fn a_delayed_message_keeps_its_enqueue_position(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    // Paused, so that nothing is fetched while the timer waits.
    p.pause(&a).await.unwrap();
    let due = now(p).await.saturating_add(SHORT);
    p.send_message(&a, timer(1), Some(due)).await.unwrap();
    send(p, &a, signal("after", 2)).await;
    store.advance(SHORT).await;
    p.resume(&a).await.unwrap();
    let work = fetch_one(p).await;
    assert_eq!(work.messages.len(), 2, "{:?}", work.messages);
    assert_eq!(work.messages[0].message, timer(1));
    assert_eq!(signal_numbers(&work), [2]);
}

/// A message whose `visible_at` has passed already is visible at once.
pub async fn a_time_in_the_past_is_visible_at_once(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let past = Timestamp::from_millis(now(p).await.as_millis().saturating_sub(60_000));
    p.send_message(&a, timer(1), Some(past)).await.unwrap();
    assert_eq!(timer_ops(&fetch_one(p).await), [1]);
}

/// An instance whose messages are all invisible is not fetched; others with visible
/// messages are.
pub async fn only_instances_with_visible_messages_are_fetched(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let b = started(p, "b").await;
    let due = now(p).await.saturating_add(SHORT);
    p.send_message(&a, timer(1), Some(due)).await.unwrap();
    send(p, &b, signal("now", 1)).await;
    let work = fetch(p, 10).await;
    assert_eq!(work.len(), 1);
    assert_eq!(work[0].lock.instance(), &b);
    store.advance(SHORT).await;
    let work = fetch(p, 10).await;
    assert_eq!(work.len(), 1);
    assert_eq!(work[0].lock.instance(), &a);
}

/// Queue depths count delayed messages as delayed and visible ones as ready, and move
/// them from one to the other as they come due.
pub async fn queue_depths_tell_ready_from_delayed(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let due = now(p).await.saturating_add(SHORT);
    p.send_message(&a, timer(1), Some(due)).await.unwrap();
    p.send_message(&a, timer(2), Some(due)).await.unwrap();
    send(p, &a, signal("now", 1)).await;
    let depths = p.queue_depths().await.unwrap();
    assert_eq!((depths.messages_ready, depths.messages_delayed), (1, 2));
    store.advance(SHORT).await;
    let depths = p.queue_depths().await.unwrap();
    assert_eq!((depths.messages_ready, depths.messages_delayed), (3, 0));
}
