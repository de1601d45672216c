//! Eager dispatch: `ack_turns_leasing` commits turns and leases to the caller the items
//! they enqueue; `complete_activities_locking` completes items and locks for the caller
//! the instances they tell. A provider that does not claim `leases_on_ack` (or
//! `locks_on_completion`) must lease (lock) nothing and leave everything to fetches; one
//! that does must take exactly what the request allows, and what it took must then
//! behave as what a fetch took.

use std::time::Duration;

use keel_core::{ActivityOptions, Message, Outcome, WorkItem};
use keel_provider::{
    AckedTurns, ActivityCompletion, ActivityLimits, CompletedActivities, ErrorKind,
    FetchActivities, FetchOrchestrations, LeasedWorkItem, Provider,
};

use crate::TestStore;
use crate::fixtures::{
    LEASE, LOCK, PAST_SHORT, SHORT, ack_all, ack_one, activity, assert_nothing_fetchable, complete,
    fetch_for, fetch_instance, id, lease, lease_queues, messages_for, ops, payload, provider_now,
    queue, running, schedule, scheduling_ack, signal,
};
use crate::store::skip_unless;

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_eager {
    ($factory:expr) => {
        $crate::__stamp!(
            $factory,
            eager,
            [
                items_leased_on_ack_come_back_as_scheduled_and_the_rest_stay_queued,
                an_item_leased_on_ack_renews_and_completes_like_a_fetched_one,
                an_item_leased_on_ack_whose_lease_expires_is_delivered_again,
                only_items_of_the_named_queues_and_of_names_without_limits_are_leased,
                a_rejected_ack_leases_nothing,
                a_completion_locks_the_instance_it_tells_with_its_messages,
                a_completion_leaves_locked_and_paused_instances_to_fetches,
                a_completion_locks_at_most_max_instances_in_completion_order,
            ]
        );
    };
}

/// Runs a turn of `instance` (created and started if need be) that schedules `items`,
/// committed with `ack_turns_leasing` under `lease`.
async fn schedule_leasing(
    p: &dyn Provider,
    instance: &str,
    items: Vec<WorkItem>,
    lease: FetchActivities,
) -> AckedTurns {
    let started = running(p, instance).await;
    p.send_message(&started, signal("go", 0), None)
        .await
        .expect("send succeeds");
    let work = fetch_instance(p, &started)
        .await
        .expect("the signal makes the instance fetchable");
    let at = provider_now(p).await;
    let acked = p
        .ack_turns_leasing(vec![scheduling_ack(&work, at, items)], lease)
        .await
        .expect("the ack call itself succeeds");
    assert_eq!(acked.results.len(), 1, "one result per ack");
    acked
}

/// A lease request for the default queue.
fn default_queue(max_items: usize, lease_for: Duration) -> FetchActivities {
    FetchActivities {
        queues: vec![queue("default")],
        max_items,
        lease_for,
    }
}

/// `n` items of `instance` on the default queue, ops 1..=n.
async fn items(p: &dyn Provider, instance: &str, n: u64) -> Vec<WorkItem> {
    let at = provider_now(p).await;
    (1..=n)
        .map(|op| activity(instance, op, &format!("step-{op}"), at))
        .collect()
}

/// The one item a leasing provider leased; `None` (the test then ends) for a provider
/// that does not lease.
fn only_leased(store: &TestStore, acked: AckedTurns, test: &str) -> Option<LeasedWorkItem> {
    if skip_unless(store.capabilities().leases_on_ack, test, "leases_on_ack") {
        assert!(
            acked.leased.is_empty(),
            "a provider that does not lease on ack leases nothing"
        );
        return None;
    }
    let mut leased = acked.leased;
    assert_eq!(leased.len(), 1, "one item was allowed and leased");
    leased.pop()
}

/// Up to `max_items` of the committed turn's items are leased, in order, as a fetch
/// would have leased them (every field intact, one delivery, now + `lease_for`); the
/// rest stay queued for a fetch, and no item is both leased and fetchable.
pub async fn items_leased_on_ack_come_back_as_scheduled_and_the_rest_stay_queued(store: TestStore) {
    let p = &*store.provider;
    let scheduled = items(p, "a", 3).await;
    let before = provider_now(p).await;
    let acked = schedule_leasing(p, "a", scheduled.clone(), default_queue(2, LEASE)).await;
    let after = provider_now(p).await;
    acked.results[0].as_ref().expect("the ack commits");
    let fetched = lease(p, 10).await;
    assert_eq!(
        acked.leased.len() + fetched.len(),
        3,
        "every item is leased on ack or fetchable, once"
    );
    let mut all = acked.leased.clone();
    all.extend(fetched.iter().cloned());
    assert_eq!(ops(&all), vec![1, 2, 3]);
    if !store.capabilities().leases_on_ack {
        assert!(
            acked.leased.is_empty(),
            "a provider that does not lease on ack leases nothing"
        );
        return;
    }
    assert_eq!(acked.leased.len(), 2, "as many as max_items allows");
    for (leased, item) in acked.leased.iter().zip(&scheduled) {
        assert_eq!(&leased.item, item, "leased in ack order, as scheduled");
        assert_eq!(leased.deliveries, 1);
        assert!(
            leased.leased_until >= before.saturating_add(LEASE)
                && leased.leased_until <= after.saturating_add(LEASE),
            "leased until {:?}, expected now + {LEASE:?} (now was {before:?}..{after:?})",
            leased.leased_until
        );
    }
}

/// A lease taken on ack is renewed, and completing it deletes the item and enqueues the
/// outcome for the instance, as with a fetched lease.
pub async fn an_item_leased_on_ack_renews_and_completes_like_a_fetched_one(store: TestStore) {
    let p = &*store.provider;
    let scheduled = items(p, "a", 1).await;
    let acked = schedule_leasing(p, "a", scheduled, default_queue(1, LEASE)).await;
    let test = "eager::an_item_leased_on_ack_renews_and_completes_like_a_fetched_one";
    let Some(leased) = only_leased(&store, acked, test) else {
        return;
    };
    p.renew_lease(&leased.lease, LEASE)
        .await
        .expect("the lease is held");
    let output = payload(&serde_json::json!("done"));
    complete(p, &leased.lease, Ok(output.clone()))
        .await
        .expect("the completion commits");
    assert!(lease(p, 10).await.is_empty(), "the item is gone");
    let delivered = messages_for(p, &leased.item.instance).await;
    assert!(
        delivered.iter().any(|m| matches!(
            m,
            keel_core::Message::ActivityDone { op, outcome: Outcome::Ok(out), .. }
                if op.get() == 1 && *out == output
        )),
        "the outcome reaches the instance: {delivered:?}"
    );
}

/// A lease taken on ack that expires makes the item fetchable again, as its second
/// delivery, and the old lease is stale.
pub async fn an_item_leased_on_ack_whose_lease_expires_is_delivered_again(store: TestStore) {
    let p = &*store.provider;
    let scheduled = items(p, "a", 1).await;
    let acked = schedule_leasing(p, "a", scheduled, default_queue(1, SHORT)).await;
    let test = "eager::an_item_leased_on_ack_whose_lease_expires_is_delivered_again";
    let Some(leased) = only_leased(&store, acked, test) else {
        return;
    };
    assert!(lease(p, 10).await.is_empty(), "not fetchable while leased");
    store.advance(PAST_SHORT).await;
    let again = lease(p, 10).await;
    assert_eq!(again.len(), 1, "fetchable once the lease expired");
    assert_eq!(again[0].item, leased.item);
    assert_eq!(
        again[0].deliveries, 2,
        "the lease on ack was the first delivery"
    );
    let stale = p
        .renew_lease(&leased.lease, LEASE)
        .await
        .expect_err("the old lease was taken over");
    assert_eq!(stale.kind(), ErrorKind::Stale);
}

/// Items of queues the request does not name, and of names with limits, are enqueued
/// for fetches, which count the limits; the others are leased.
pub async fn only_items_of_the_named_queues_and_of_names_without_limits_are_leased(
    store: TestStore,
) {
    let p = &*store.provider;
    let limits = store.capabilities().activity_limits;
    if limits {
        let one_at_a_time = ActivityLimits {
            max_concurrent: Some(1),
            max_per_second: None,
        };
        p.set_activity_limits("limited", one_at_a_time)
            .await
            .expect("setting limits succeeds");
    }
    let at = provider_now(p).await;
    let mut elsewhere = activity("a", 1, "free", at);
    elsewhere.options = ActivityOptions {
        queue: queue("elsewhere"),
        ..ActivityOptions::default()
    };
    let limited = activity("a", 2, "limited", at);
    let free = activity("a", 3, "free", at);
    let acked = schedule_leasing(
        p,
        "a",
        vec![elsewhere, limited, free],
        default_queue(10, LEASE),
    )
    .await;
    acked.results[0].as_ref().expect("the ack commits");
    let test = "eager::only_items_of_the_named_queues_and_of_names_without_limits_are_leased";
    if skip_unless(store.capabilities().leases_on_ack, test, "leases_on_ack") {
        return;
    }
    let expected: Vec<u64> = if limits { vec![3] } else { vec![2, 3] };
    assert_eq!(ops(&acked.leased), expected, "what was leased on ack");
    let rest = lease_queues(p, &["default", "elsewhere"], 10, LEASE).await;
    let queued: Vec<u64> = if limits { vec![1, 2] } else { vec![1] };
    assert_eq!(ops(&rest), queued, "what stayed queued");
}

/// An ack whose lock was taken over is rejected: it enqueues nothing and leases nothing.
pub async fn a_rejected_ack_leases_nothing(store: TestStore) {
    let p = &*store.provider;
    let started = running(p, "a").await;
    p.send_message(&started, signal("go", 0), None)
        .await
        .expect("send succeeds");
    let old = fetch_for(p, 10, SHORT).await;
    assert_eq!(old.len(), 1);
    store.advance(PAST_SHORT).await;
    let new = fetch_for(p, 10, LEASE).await;
    assert_eq!(new.len(), 1, "the expired lock is taken over");
    let at = provider_now(p).await;
    let scheduled = items(p, "a", 2).await;
    let acked = p
        .ack_turns_leasing(
            vec![scheduling_ack(&old[0], at, scheduled)],
            default_queue(10, LEASE),
        )
        .await
        .expect("the ack call itself succeeds");
    let rejected = acked.results[0].as_ref().expect_err("the lock is stale");
    assert_eq!(rejected.kind(), ErrorKind::Stale);
    assert!(acked.leased.is_empty(), "a rejected ack leases nothing");
    assert!(lease(p, 10).await.is_empty(), "and enqueues nothing");
}

/// Schedules one item (op 1) for each of `instances`, leases them all and completes
/// them in that order with `complete_activities_locking`, locking at most
/// `max_instances`.
async fn complete_locking(
    p: &dyn Provider,
    instances: &[&str],
    max_instances: usize,
) -> CompletedActivities {
    for instance in instances {
        let at = provider_now(p).await;
        schedule(p, instance, vec![activity(instance, 1, "step", at)]).await;
    }
    let mut leased = lease(p, 10).await;
    assert_eq!(leased.len(), instances.len());
    // Completion order is the order of `instances`.
    leased.sort_by_key(|l| {
        instances
            .iter()
            .position(|i| *i == l.item.instance.as_str())
    });
    let completions = leased
        .iter()
        .map(|l| ActivityCompletion {
            lease: l.lease.clone(),
            outcome: Ok(payload(&serde_json::json!(l.item.instance.as_str()))),
        })
        .collect();
    let lock = FetchOrchestrations {
        max_instances,
        lock_for: LOCK,
        with_history: true,
    };
    let completed = p
        .complete_activities_locking(completions, lock)
        .await
        .expect("the completion call itself succeeds");
    assert_eq!(
        completed.results.len(),
        instances.len(),
        "one result per completion"
    );
    for result in &completed.results {
        result.as_ref().expect("the completion commits");
    }
    completed
}

/// The instance a completion told comes back locked, as a fetch of it would return it
/// (the outcome among its messages, its history), is not fetchable meanwhile, and its
/// lock commits an ack.
pub async fn a_completion_locks_the_instance_it_tells_with_its_messages(store: TestStore) {
    let p = &*store.provider;
    let completed = complete_locking(p, &["a"], 10).await;
    let test = "eager::a_completion_locks_the_instance_it_tells_with_its_messages";
    if skip_unless(
        store.capabilities().locks_on_completion,
        test,
        "locks_on_completion",
    ) {
        assert!(
            completed.locked.is_empty(),
            "a provider that does not lock on completion locks nothing"
        );
        assert_eq!(messages_for(p, &id("a")).await.len(), 1);
        return;
    }
    assert_eq!(completed.locked.len(), 1);
    let work = &completed.locked[0];
    assert_eq!(work.lock.instance().as_str(), "a");
    let told: Vec<&Message> = work.messages.iter().map(|m| &m.message).collect();
    assert!(
        matches!(told.as_slice(), [Message::ActivityDone { op, outcome: Outcome::Ok(_), .. }] if op.get() == 1),
        "the outcome is the one visible message: {told:?}"
    );
    let history = work.history.as_ref().expect("the history was asked for");
    assert_eq!(history.len() as u64, work.history_len);
    assert!(
        work.history_len > 0,
        "the scheduling turn's events are there"
    );
    assert_nothing_fetchable(p, "the instance is locked for the completing worker").await;
    ack_one(p, ack_all(work))
        .await
        .expect("the lock taken on completion commits an ack");
    assert_nothing_fetchable(p, "the ack consumed the outcome").await;
}

/// An instance locked by someone else, or paused, is not locked by a completion: its
/// outcome waits for a fetch like any message.
pub async fn a_completion_leaves_locked_and_paused_instances_to_fetches(store: TestStore) {
    let p = &*store.provider;
    let at = provider_now(p).await;
    schedule(p, "a", vec![activity("a", 1, "step", at)]).await;
    schedule(p, "b", vec![activity("b", 1, "step", at)]).await;
    let leased = lease(p, 10).await;
    assert_eq!(leased.len(), 2);
    let a = id("a");
    let b = id("b");
    p.send_message(&a, signal("s", 1), None)
        .await
        .expect("send succeeds");
    let held = fetch_instance(p, &a).await.expect("a has a signal");
    p.pause(&b).await.expect("pausing succeeds");
    let completions = leased
        .iter()
        .map(|l| ActivityCompletion {
            lease: l.lease.clone(),
            outcome: Ok(payload(&serde_json::json!(1))),
        })
        .collect();
    let lock = FetchOrchestrations {
        max_instances: 10,
        lock_for: LOCK,
        with_history: false,
    };
    let completed = p
        .complete_activities_locking(completions, lock)
        .await
        .expect("the completion call itself succeeds");
    assert!(completed.results.iter().all(Result::is_ok), "both commit");
    assert!(
        completed.locked.is_empty(),
        "neither instance is locked: {:?}",
        completed.locked
    );
    p.abandon_lock(&held.lock, Duration::ZERO)
        .await
        .expect("the fetch's lock is still held");
    let fetched = fetch_for(p, 10, LOCK).await;
    assert_eq!(
        fetched.len(),
        1,
        "a is fetchable once released; b stays paused"
    );
    assert_eq!(fetched[0].messages.len(), 2, "the signal and the outcome");
}

/// At most `max_instances` instances are locked, the first ones told; the rest are left
/// to fetches.
pub async fn a_completion_locks_at_most_max_instances_in_completion_order(store: TestStore) {
    let p = &*store.provider;
    let completed = complete_locking(p, &["c", "a", "b"], 2).await;
    let test = "eager::a_completion_locks_at_most_max_instances_in_completion_order";
    if skip_unless(
        store.capabilities().locks_on_completion,
        test,
        "locks_on_completion",
    ) {
        return;
    }
    let locked: Vec<&str> = completed
        .locked
        .iter()
        .map(|w| w.lock.instance().as_str())
        .collect();
    assert_eq!(locked, ["c", "a"]);
    let fetched = fetch_for(p, 10, LOCK).await;
    let fetched: Vec<&str> = fetched.iter().map(|w| w.lock.instance().as_str()).collect();
    assert_eq!(fetched, ["b"], "the one left is fetchable");
}
