//! Wake-ups: `wait_for_work` returns at its timeout, early when work is enqueued or
//! comes due; `next_due` reports when delayed work becomes visible.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_core::{Failure, Timestamp};
use keel_provider::{ActivityRetry, OnConflict, Provider, WorkKind};

use crate::TestStore;
use crate::fixtures::{
    activity, complete, fetch, lease, new_instance, payload, provider_now, running, schedule,
    signal,
};

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_wakeups {
    ($factory:expr) => {
        $crate::__stamp!(
            $factory,
            wakeups,
            [
                wait_for_work_returns_at_its_timeout_when_nothing_happens,
                wait_for_work_wakes_when_an_instance_is_created,
                work_enqueued_between_a_fetch_and_the_wait_ends_the_wait,
                wait_for_work_wakes_when_a_message_is_sent,
                wait_for_work_wakes_when_an_activity_is_enqueued,
                wait_for_work_wakes_when_an_activity_outcome_is_enqueued,
                wait_for_work_wakes_when_a_delayed_message_comes_due,
                wait_for_work_wakes_when_a_retried_activity_comes_due,
                next_due_is_none_when_nothing_is_delayed,
                next_due_reports_when_a_retried_activity_comes_due,
                next_due_reports_the_earliest_delayed_message,
            ]
        );
    };
}

/// The timeout of waits that must end early: far longer than any wake-up should take.
const LONG: Duration = Duration::from_secs(10);
/// How soon "early" must be: well before [`LONG`], with room for a slow machine.
const EARLY: Duration = Duration::from_secs(5);

/// Starts waiting for `kind` with a [`LONG`] timeout, runs `act` 50 ms later, and
/// asserts that the wait ended well before its timeout.
async fn assert_wakes<F>(store: &TestStore, kind: WorkKind, what: &str, act: F)
where
    F: Future<Output = ()>,
{
    let p = Arc::clone(&store.provider);
    let started = Instant::now();
    let waiter = tokio::spawn(async move { p.wait_for_work(kind, LONG).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    act.await;
    let waited = tokio::time::timeout(LONG + EARLY, waiter)
        .await
        .expect("wait_for_work honours its timeout")
        .expect("waiter task");
    waited.expect("wait_for_work succeeds");
    let elapsed = started.elapsed();
    assert!(
        elapsed < EARLY,
        "wait_for_work({kind:?}) should return early when {what}, took {elapsed:?}"
    );
}

/// With nothing happening, `wait_for_work` returns `Ok` once its timeout passes.
pub async fn wait_for_work_returns_at_its_timeout_when_nothing_happens(store: TestStore) {
    let p = &*store.provider;
    for kind in [WorkKind::Orchestrations, WorkKind::Activities] {
        for millis in [50, 150] {
            tokio::time::timeout(LONG, p.wait_for_work(kind, Duration::from_millis(millis)))
                .await
                .expect("wait_for_work honours its timeout")
                .expect("wait_for_work succeeds");
        }
    }
}

/// A wait for orchestration work returns early when an instance is created.
pub async fn wait_for_work_wakes_when_an_instance_is_created(store: TestStore) {
    let p = Arc::clone(&store.provider);
    assert_wakes(
        &store,
        WorkKind::Orchestrations,
        "an instance is created",
        async move {
            p.create_instance(new_instance("a"), OnConflict::Fail)
                .await
                .expect("create");
        },
    )
    .await;
}

/// Work enqueued after a fetch found nothing but before the caller began to wait (its
/// wake-up found no waiter) still ends the wait at once: the wake-up is not lost.
pub async fn work_enqueued_between_a_fetch_and_the_wait_ends_the_wait(store: TestStore) {
    let p = &*store.provider;
    assert!(fetch(p, 10).await.is_empty(), "the store starts empty");
    p.create_instance(new_instance("a"), OnConflict::Fail)
        .await
        .expect("create");
    // Long enough for any notification to have arrived before the wait begins.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    tokio::time::timeout(
        LONG + EARLY,
        p.wait_for_work(WorkKind::Orchestrations, LONG),
    )
    .await
    .expect("wait_for_work honours its timeout")
    .expect("wait_for_work succeeds");
    let elapsed = started.elapsed();
    assert!(
        elapsed < EARLY,
        "an instance created after the last fetch should end the wait at once, took {elapsed:?}"
    );
}

/// A wait for orchestration work returns early when a message is sent.
pub async fn wait_for_work_wakes_when_a_message_is_sent(store: TestStore) {
    let a = running(&*store.provider, "a").await;
    let p = Arc::clone(&store.provider);
    assert_wakes(
        &store,
        WorkKind::Orchestrations,
        "a message is sent",
        async move {
            p.send_message(&a, signal("s", 1), None)
                .await
                .expect("send");
        },
    )
    .await;
}

/// A wait for activity work returns early when a turn enqueues an activity.
pub async fn wait_for_work_wakes_when_an_activity_is_enqueued(store: TestStore) {
    let a = running(&*store.provider, "a").await;
    let p = Arc::clone(&store.provider);
    assert_wakes(
        &store,
        WorkKind::Activities,
        "an activity is enqueued",
        async move {
            let at = provider_now(&*p).await;
            schedule(&*p, a.as_str(), vec![activity("a", 1, "work", at)]).await;
        },
    )
    .await;
}

/// A wait for orchestration work returns early when an activity's completion enqueues
/// its outcome.
pub async fn wait_for_work_wakes_when_an_activity_outcome_is_enqueued(store: TestStore) {
    let p = &*store.provider;
    let at = provider_now(p).await;
    schedule(p, "a", vec![activity("a", 1, "work", at)]).await;
    let leased = lease(p, 10).await.remove(0);
    let p = Arc::clone(&store.provider);
    assert_wakes(
        &store,
        WorkKind::Orchestrations,
        "an outcome is enqueued",
        async move {
            complete(&*p, &leased.lease, Ok(payload(&serde_json::json!(1))))
                .await
                .expect("complete");
        },
    )
    .await;
}

/// A wait for orchestration work returns when a delayed message comes due, without
/// anything else happening (on a manual clock: when the clock moves past it).
pub async fn wait_for_work_wakes_when_a_delayed_message_comes_due(store: TestStore) {
    let p = &*store.provider;
    let a = running(p, "a").await;
    let due = provider_now(p)
        .await
        .saturating_add(Duration::from_millis(300));
    p.send_message(&a, signal("s", 1), Some(due))
        .await
        .expect("send");
    let what = "a delayed message comes due";
    assert_wakes(&store, WorkKind::Orchestrations, what, pass_due(&store)).await;
}

/// A wait for activity work returns when a retried item's delay ends.
pub async fn wait_for_work_wakes_when_a_retried_activity_comes_due(store: TestStore) {
    let p = &*store.provider;
    let at = provider_now(p).await;
    schedule(p, "a", vec![activity("a", 1, "work", at)]).await;
    let leased = lease(p, 10).await.remove(0);
    p.retry_activity(ActivityRetry {
        lease: leased.lease,
        next_attempt: 2,
        delay: Duration::from_millis(300),
        failure: Failure::new("Flaky", "again"),
    })
    .await
    .expect("retry");
    let what = "a retried activity comes due";
    assert_wakes(&store, WorkKind::Activities, what, pass_due(&store)).await;
}

/// Lets 400 ms pass while a waiter waits: on a manual clock nothing comes due by
/// itself, so it moves the clock; real time passes without help.
async fn pass_due(store: &TestStore) {
    if store.has_manual_clock() {
        store.advance(Duration::from_millis(400)).await;
    }
}

async fn next_due(p: &dyn Provider, kind: WorkKind) -> Option<Timestamp> {
    p.next_due(kind).await.expect("next_due succeeds")
}

/// `next_due` is `None` when nothing is delayed, even with visible work queued.
pub async fn next_due_is_none_when_nothing_is_delayed(store: TestStore) {
    let p = &*store.provider;
    assert_eq!(next_due(p, WorkKind::Orchestrations).await, None);
    assert_eq!(next_due(p, WorkKind::Activities).await, None);
    let at = provider_now(p).await;
    schedule(p, "a", vec![activity("a", 1, "work", at)]).await;
    p.create_instance(new_instance("b"), OnConflict::Fail)
        .await
        .expect("create");
    assert_eq!(next_due(p, WorkKind::Orchestrations).await, None);
    assert_eq!(next_due(p, WorkKind::Activities).await, None);
}

/// After a retry, `next_due` for activities is when the item becomes visible again.
pub async fn next_due_reports_when_a_retried_activity_comes_due(store: TestStore) {
    let p = &*store.provider;
    let at = provider_now(p).await;
    schedule(p, "a", vec![activity("a", 1, "work", at)]).await;
    let leased = lease(p, 10).await.remove(0);
    let delay = Duration::from_secs(30);
    let before = provider_now(p).await;
    p.retry_activity(ActivityRetry {
        lease: leased.lease,
        next_attempt: 2,
        delay,
        failure: Failure::new("Flaky", "again"),
    })
    .await
    .expect("retry");
    let after = provider_now(p).await;
    let due = next_due(p, WorkKind::Activities)
        .await
        .expect("a retried item is due later");
    assert!(
        due >= before.saturating_add(delay) && due <= after.saturating_add(delay),
        "due at {due:?}, expected now + {delay:?} ({before:?}..{after:?})"
    );
    assert_eq!(next_due(p, WorkKind::Orchestrations).await, None);
}

/// `next_due` for orchestrations is the earliest invisible message or delayed start,
/// and moves on once it is visible.
pub async fn next_due_reports_the_earliest_delayed_message(store: TestStore) {
    let p = &*store.provider;
    let a = running(p, "a").await;
    let now = provider_now(p).await;
    let hour = Duration::from_secs(3_600);
    let at = |hours: u32| now.saturating_add(hour * hours);
    p.send_message(&a, signal("s", 2), Some(at(2)))
        .await
        .expect("send");
    p.send_message(&a, signal("s", 1), Some(at(1)))
        .await
        .expect("send");
    let mut z = new_instance("z");
    z.start_at = Some(at(3));
    p.create_instance(z, OnConflict::Fail)
        .await
        .expect("create");
    assert_eq!(next_due(p, WorkKind::Orchestrations).await, Some(at(1)));
    assert_eq!(next_due(p, WorkKind::Activities).await, None);
    if store.has_manual_clock() {
        store.advance(hour + Duration::from_secs(1)).await;
        assert_eq!(next_due(p, WorkKind::Orchestrations).await, Some(at(2)));
        store.advance(hour * 2).await;
        assert_eq!(next_due(p, WorkKind::Orchestrations).await, None);
    }
}
