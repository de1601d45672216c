//! The activity queue: what a fetch leases, to one holder at a time, highest priority
//! first, from the queues it names and within its batch limits.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use keel_core::{ActivityOptions, RetryPolicy, Timestamp, WorkItem};
use keel_provider::FetchActivities;

use crate::TestStore;
use crate::fixtures::{
    LEASE, activity, lease, lease_queues, ops, payload, provider_now, queue, schedule, schedule_n,
};

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_activities {
    ($factory:expr) => {
        $crate::__stamp!(
            $factory,
            activities,
            [
                an_enqueued_item_is_leased_with_every_field_intact,
                a_leased_item_is_not_leased_again,
                concurrent_fetchers_lease_each_item_exactly_once,
                items_are_leased_highest_priority_first_then_oldest,
                a_fetch_returns_only_items_of_its_queues,
                a_fetch_of_several_queues_returns_items_of_each,
                a_fetch_returns_at_most_max_items,
                a_fetch_returns_at_most_the_providers_max_fetch_items,
            ]
        );
    };
}

/// An enqueued item is leased with every field as scheduled, one delivery, and a lease
/// that lasts `lease_for` from the provider's now.
pub async fn an_enqueued_item_is_leased_with_every_field_intact(store: TestStore) {
    let p = &*store.provider;
    let mut item = activity("a", 3, "charge-card", provider_now(p).await);
    item.input = payload(&serde_json::json!({"amount": 12.5, "currency": "EUR", "tags": [1, 2]}));
    item.options = ActivityOptions {
        queue: queue("payments"),
        priority: 7,
        retry: RetryPolicy {
            max_attempts: 3,
            initial_interval: Duration::from_secs(2),
            multiplier: 3.0,
            max_interval: Duration::from_secs(30),
            jitter: 0.25,
            non_retryable: vec!["Declined".to_owned()],
            attempt_timeout: Some(Duration::from_secs(5)),
        },
    };
    schedule(p, "a", vec![item.clone()]).await;

    let before = provider_now(p).await;
    let leased = lease_queues(p, &["payments"], 10, LEASE).await;
    let after = provider_now(p).await;
    assert_eq!(leased.len(), 1);
    assert_eq!(
        leased[0].item, item,
        "the item comes back as it was scheduled"
    );
    assert_eq!(leased[0].deliveries, 1);
    assert!(
        leased[0].leased_until >= before.saturating_add(LEASE)
            && leased[0].leased_until <= after.saturating_add(LEASE),
        "leased until {:?}, expected now + {LEASE:?} (now was {before:?}..{after:?})",
        leased[0].leased_until
    );
}

/// At most one holder: an item under lease is not returned by another fetch.
pub async fn a_leased_item_is_not_leased_again(store: TestStore) {
    let p = &*store.provider;
    schedule_n(p, 1).await;
    assert_eq!(lease(p, 10).await.len(), 1);
    assert!(
        lease(p, 10).await.is_empty(),
        "a leased item was leased again"
    );
}

/// Many concurrent fetchers never lease the same item twice, and together lease every
/// item.
pub async fn concurrent_fetchers_lease_each_item_exactly_once(store: TestStore) {
    const ITEMS: u64 = 100;
    schedule_n(&*store.provider, ITEMS).await;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let p = Arc::clone(&store.provider);
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            let mut failures = 0;
            loop {
                let request = FetchActivities {
                    queues: vec![queue(keel_core::QueueName::DEFAULT)],
                    max_items: 4,
                    lease_for: LEASE,
                };
                match p.fetch_activities(request).await {
                    Ok(items) if items.is_empty() => return got,
                    Ok(items) => got.extend(items.into_iter().map(|i| i.item.op.get())),
                    Err(err) if err.is_retryable() && failures < 100 => {
                        failures += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(err) => panic!("a concurrent fetch failed: {err}"),
                }
            }
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("fetcher task"));
    }
    // Items a fetcher missed (it saw an empty queue early) are still there to lease.
    all.extend(ops(&lease(&*store.provider, 1_000).await));
    let distinct: BTreeSet<u64> = all.iter().copied().collect();
    assert_eq!(
        all.len(),
        distinct.len(),
        "some items were leased twice: {} leases of {} items",
        all.len(),
        distinct.len()
    );
    assert_eq!(
        distinct,
        (1..=ITEMS).collect(),
        "every item was leased once"
    );
}

/// Items are leased highest priority first, then oldest first.
pub async fn items_are_leased_highest_priority_first_then_oldest(store: TestStore) {
    let p = &*store.provider;
    for (op, priority) in [(1, 0), (2, 5), (3, 0), (4, 5), (5, -1)] {
        let mut item = activity("a", op, "work", provider_now(p).await);
        item.options.priority = priority;
        schedule(p, "a", vec![item]).await;
        store.advance(Duration::from_millis(10)).await;
    }
    let mut order = Vec::new();
    for _ in 0..5 {
        let leased = lease(p, 1).await;
        assert_eq!(leased.len(), 1);
        order.push(leased[0].item.op.get());
    }
    assert_eq!(order, [2, 4, 1, 3, 5]);
}

/// Work items of instance "a", one per (op, queue).
fn routed(at: Timestamp, routes: &[(u64, &str)]) -> Vec<WorkItem> {
    routes
        .iter()
        .map(|&(op, q)| {
            let mut item = activity("a", op, "work", at);
            item.options.queue = queue(q);
            item
        })
        .collect()
}

/// A fetch returns only items routed to the queues it names.
pub async fn a_fetch_returns_only_items_of_its_queues(store: TestStore) {
    let p = &*store.provider;
    let at = provider_now(p).await;
    schedule(
        p,
        "a",
        routed(at, &[(1, "alpha"), (2, "alpha"), (3, "beta")]),
    )
    .await;
    assert!(lease_queues(p, &["gamma"], 10, LEASE).await.is_empty());
    assert!(lease(p, 10).await.is_empty(), "the default queue is empty");
    assert_eq!(ops(&lease_queues(p, &["alpha"], 10, LEASE).await), [1, 2]);
    assert!(lease_queues(p, &["alpha"], 10, LEASE).await.is_empty());
    assert_eq!(ops(&lease_queues(p, &["beta"], 10, LEASE).await), [3]);
}

/// A fetch naming several queues returns the items of each.
pub async fn a_fetch_of_several_queues_returns_items_of_each(store: TestStore) {
    let p = &*store.provider;
    let at = provider_now(p).await;
    schedule(
        p,
        "a",
        routed(at, &[(1, "alpha"), (2, "beta"), (3, "gamma")]),
    )
    .await;
    assert_eq!(
        ops(&lease_queues(p, &["alpha", "beta"], 10, LEASE).await),
        [1, 2]
    );
    assert_eq!(ops(&lease_queues(p, &["gamma"], 10, LEASE).await), [3]);
}

/// A fetch leases at most `max_items` items.
pub async fn a_fetch_returns_at_most_max_items(store: TestStore) {
    let p = &*store.provider;
    schedule_n(p, 5).await;
    let sizes = [
        lease(p, 2).await.len(),
        lease(p, 2).await.len(),
        lease(p, 2).await.len(),
        lease(p, 2).await.len(),
    ];
    assert_eq!(sizes, [2, 2, 1, 0]);
}

/// However many items a fetch asks for, it leases at most the provider's
/// `max_fetch_items`, and the rest stay queued.
pub async fn a_fetch_returns_at_most_the_providers_max_fetch_items(store: TestStore) {
    // Filling the queue past the cap costs time in proportion to it.
    const AFFORDABLE: usize = 2_000;
    let cap = store.capabilities().max_fetch_items;
    if cap >= AFFORDABLE {
        eprintln!(
            "SKIPPED activities::a_fetch_returns_at_most_the_providers_max_fetch_items: \
             max_fetch_items is {cap}, above the {AFFORDABLE} this test can afford to fill"
        );
        return;
    }
    let p = &*store.provider;
    let total = cap + 3;
    schedule_n(p, u64::try_from(total).expect("small")).await;
    let first = lease(p, cap * 10).await.len();
    assert!(
        (1..=cap).contains(&first),
        "leased {first}, expected 1 to max_fetch_items = {cap}"
    );
    let rest = lease(p, cap * 10).await.len() + lease(p, cap * 10).await.len();
    assert_eq!(first + rest, total, "the rest stayed queued");
}
