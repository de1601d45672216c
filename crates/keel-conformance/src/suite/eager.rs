//! Eager dispatch: `ack_turns_leasing` commits turns and leases to the caller the items
//! they enqueue. A provider that does not claim `leases_on_ack` must lease nothing and
//! enqueue everything; one that does must lease exactly what the request allows, and a
//! leased item must then behave as one a fetch leased.

use std::time::Duration;

use keel_core::{ActivityOptions, Outcome, WorkItem};
use keel_provider::{
    AckedTurns, ActivityLimits, ErrorKind, FetchActivities, LeasedWorkItem, Provider,
};

use crate::TestStore;
use crate::fixtures::{
    LEASE, PAST_SHORT, SHORT, activity, complete, fetch_for, fetch_instance, lease, lease_queues,
    messages_for, ops, payload, provider_now, queue, running, scheduling_ack,
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
    let id = running(p, instance).await;
    p.send_message(&id, crate::fixtures::signal("go", 0), None)
        .await
        .expect("send succeeds");
    let work = fetch_instance(p, &id)
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
    let id = running(p, "a").await;
    p.send_message(&id, crate::fixtures::signal("go", 0), None)
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
