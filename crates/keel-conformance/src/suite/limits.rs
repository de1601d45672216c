//! Activity limits: `max_concurrent` and `max_per_second` per activity name, enforced
//! cluster-wide when items are claimed. Skipped unless the provider claims
//! `activity_limits`.

use std::sync::Arc;
use std::time::Duration;

use keel_core::{Failure, QueueName};
use keel_provider::{ActivityLimits, ActivityRetry, FetchActivities, LeasedWorkItem, Provider};

use crate::fixtures::{
    LEASE, activity, complete, lease, lease_queues, payload, provider_now, queue, schedule, tick,
};
use crate::{TestStore, skip_unless};

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_limits {
    ($factory:expr) => {
        $crate::__stamp!(
            $factory,
            limits,
            [
                max_concurrent_caps_the_leased_items_of_a_name,
                max_concurrent_holds_across_concurrent_fetchers,
                limits_of_one_name_do_not_hold_back_other_names,
                limits_hold_across_queues,
                max_per_second_caps_claims_within_a_second,
                expired_leases_do_not_count_against_max_concurrent,
                released_leases_free_their_slots,
                replacing_limits_with_none_lifts_them,
                replacing_limits_applies_the_new_values,
            ]
        );
    };
}

fn skip(store: &TestStore, test: &str) -> bool {
    skip_unless(
        store.capabilities().activity_limits,
        &format!("limits::{test}"),
        "activity_limits",
    )
}

fn concurrent(max: u32) -> ActivityLimits {
    ActivityLimits {
        max_concurrent: Some(max),
        max_per_second: None,
    }
}

async fn set_limits(p: &dyn Provider, name: &str, limits: ActivityLimits) {
    p.set_activity_limits(name, limits)
        .await
        .expect("setting limits succeeds");
}

/// Schedules, for instance "a", one item per entry of `names` (ops from 1), each in
/// queue "default" unless the entry names one as "name@queue".
async fn schedule_named(p: &dyn Provider, names: &[&str]) {
    let at = provider_now(p).await;
    let items = names
        .iter()
        .zip(1..)
        .map(|(entry, op)| {
            let (name, q) = entry.split_once('@').unwrap_or((entry, QueueName::DEFAULT));
            let mut item = activity("a", op, name, at);
            item.options.queue = queue(q);
            item
        })
        .collect();
    schedule(p, "a", items).await;
}

fn done() -> keel_core::Outcome {
    Ok(payload(&serde_json::json!(null)))
}

fn count_named(items: &[LeasedWorkItem], name: &str) -> usize {
    items.iter().filter(|i| i.item.name == name).count()
}

/// With `max_concurrent = 2`, at most two items of the name are leased; completing one
/// lets one more be leased.
pub async fn max_concurrent_caps_the_leased_items_of_a_name(store: TestStore) {
    if skip(&store, "max_concurrent_caps_the_leased_items_of_a_name") {
        return;
    }
    let p = &*store.provider;
    set_limits(p, "limited", concurrent(2)).await;
    schedule_named(p, &["limited"; 5]).await;
    let first = lease(p, 10).await;
    assert_eq!(first.len(), 2, "max_concurrent = 2");
    assert!(lease(p, 10).await.is_empty(), "both slots are taken");
    complete(p, &first[0].lease, done())
        .await
        .expect("complete");
    assert_eq!(lease(p, 10).await.len(), 1, "one slot was freed");
    assert!(lease(p, 10).await.is_empty());
}

/// The limit holds across fetchers racing each other: never more than `max_concurrent`
/// leased in all.
pub async fn max_concurrent_holds_across_concurrent_fetchers(store: TestStore) {
    if skip(&store, "max_concurrent_holds_across_concurrent_fetchers") {
        return;
    }
    set_limits(&*store.provider, "limited", concurrent(3)).await;
    schedule_named(&*store.provider, &["limited"; 20]).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let p = Arc::clone(&store.provider);
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..3 {
                let request = FetchActivities {
                    queues: vec![QueueName::default()],
                    max_items: 5,
                    lease_for: LEASE,
                };
                match p.fetch_activities(request).await {
                    Ok(items) => got.extend(items),
                    Err(err) if err.is_retryable() => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(err) => panic!("a concurrent fetch failed: {err}"),
                }
            }
            got
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("fetcher task"));
    }
    assert_eq!(all.len(), 3, "max_concurrent = 3 across all fetchers");
    for leased in &all {
        complete(&*store.provider, &leased.lease, done())
            .await
            .expect("complete");
    }
    assert_eq!(lease(&*store.provider, 10).await.len(), 3);
}

/// The limits of one activity name do not hold back items of other names.
pub async fn limits_of_one_name_do_not_hold_back_other_names(store: TestStore) {
    if skip(&store, "limits_of_one_name_do_not_hold_back_other_names") {
        return;
    }
    let p = &*store.provider;
    set_limits(p, "slow", concurrent(1)).await;
    schedule_named(p, &["slow", "fast", "slow", "fast", "slow", "fast"]).await;
    let leased = lease(p, 10).await;
    assert_eq!(count_named(&leased, "slow"), 1);
    assert_eq!(count_named(&leased, "fast"), 3);
}

/// A name's limit is cluster-wide: it counts its items leased from every queue.
pub async fn limits_hold_across_queues(store: TestStore) {
    if skip(&store, "limits_hold_across_queues") {
        return;
    }
    let p = &*store.provider;
    set_limits(p, "limited", concurrent(1)).await;
    schedule_named(p, &["limited@east", "limited@west"]).await;
    assert_eq!(lease_queues(p, &["east"], 10, LEASE).await.len(), 1);
    assert!(
        lease_queues(p, &["west"], 10, LEASE).await.is_empty(),
        "the one slot is taken by the item of the other queue"
    );
}

/// With `max_per_second = 3`, at most three items of the name are leased within one
/// second of provider time, and more once the second has passed.
pub async fn max_per_second_caps_claims_within_a_second(store: TestStore) {
    if skip(&store, "max_per_second_caps_claims_within_a_second") {
        return;
    }
    let p = &*store.provider;
    let limits = ActivityLimits {
        max_concurrent: None,
        max_per_second: Some(3),
    };
    set_limits(p, "metered", limits).await;
    schedule_named(p, &["metered"; 10]).await;
    let start = provider_now(p).await;
    let mut leased = 0;
    for _ in 0..4 {
        leased += lease(p, 10).await.len();
    }
    let elapsed = provider_now(p).await.saturating_duration_since(start);
    assert!(leased >= 1, "the first claim of a second is allowed");
    if elapsed < Duration::from_secs(1) {
        assert!(leased <= 3, "{leased} claims within {elapsed:?}");
    }
    store.advance(Duration::from_millis(1_100)).await;
    let more = lease(p, 10).await.len();
    assert!(
        (1..=3).contains(&more),
        "after a second, up to 3 more: got {more}"
    );
}

/// An expired lease does not count against `max_concurrent`.
pub async fn expired_leases_do_not_count_against_max_concurrent(store: TestStore) {
    if skip(&store, "expired_leases_do_not_count_against_max_concurrent") {
        return;
    }
    let p = &*store.provider;
    let t = tick(&store);
    set_limits(p, "limited", concurrent(1)).await;
    schedule_named(p, &["limited", "limited"]).await;
    let first = lease_queues(p, &["default"], 10, 2 * t).await;
    assert_eq!(first.len(), 1);
    assert!(lease(p, 10).await.is_empty(), "the slot is taken");
    store.advance(3 * t).await;
    assert_eq!(
        lease(p, 10).await.len(),
        1,
        "the expired lease no longer takes the slot"
    );
}

/// Abandoning a lease or retrying its item frees its slot at once.
pub async fn released_leases_free_their_slots(store: TestStore) {
    if skip(&store, "released_leases_free_their_slots") {
        return;
    }
    let p = &*store.provider;
    set_limits(p, "limited", concurrent(1)).await;
    schedule_named(p, &["limited"; 3]).await;
    let first = lease(p, 10).await.remove(0);
    p.abandon_lease(&first.lease).await.expect("abandon");
    let second = lease(p, 10).await;
    assert_eq!(second.len(), 1, "abandoning freed the slot");
    let retry = ActivityRetry {
        lease: second[0].lease.clone(),
        next_attempt: 2,
        delay: Duration::from_secs(3_600),
        failure: Failure::new("Flaky", "again"),
    };
    p.retry_activity(retry).await.expect("retry");
    assert_eq!(lease(p, 10).await.len(), 1, "retrying freed the slot");
}

/// Replacing a name's limits with none lifts them.
pub async fn replacing_limits_with_none_lifts_them(store: TestStore) {
    if skip(&store, "replacing_limits_with_none_lifts_them") {
        return;
    }
    let p = &*store.provider;
    set_limits(p, "limited", concurrent(1)).await;
    schedule_named(p, &["limited"; 3]).await;
    assert_eq!(lease(p, 10).await.len(), 1);
    set_limits(p, "limited", ActivityLimits::default()).await;
    assert_eq!(lease(p, 10).await.len(), 2, "no limit any more");
}

/// Setting limits again replaces the earlier ones, raised or lowered.
pub async fn replacing_limits_applies_the_new_values(store: TestStore) {
    if skip(&store, "replacing_limits_applies_the_new_values") {
        return;
    }
    let p = &*store.provider;
    set_limits(p, "limited", concurrent(1)).await;
    schedule_named(p, &["limited"; 6]).await;
    let mut held = lease(p, 10).await;
    assert_eq!(held.len(), 1);
    set_limits(p, "limited", concurrent(3)).await;
    held.extend(lease(p, 10).await);
    assert_eq!(held.len(), 3, "raised to 3");
    set_limits(p, "limited", concurrent(1)).await;
    for leased in held.drain(..2) {
        complete(p, &leased.lease, done()).await.expect("complete");
    }
    assert!(lease(p, 10).await.is_empty(), "lowered to 1, and 1 is held");
    complete(p, &held[0].lease, done()).await.expect("complete");
    assert_eq!(lease(p, 10).await.len(), 1);
}
