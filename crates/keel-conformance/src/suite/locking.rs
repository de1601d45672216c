//! The instance lock: one holder at a time, expiry, renewal, abandonment, suspension,
//! and the order in which instances are claimed.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use keel_core::{InstanceId, InstanceStatus, Message};
use keel_provider::{Ack, FetchOrchestrations, OnConflict, Provider};

use crate::TestStore;
use crate::fixtures::{
    LOCK, PAST_SHORT, SHORT, ack_all, ack_one, assert_nothing_fetchable, create, fetch, fetch_for,
    fetch_one, id, marker, new_instance, now, send, signal, signal_numbers, started, started_event,
};

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_locking {
    ($factory:expr) => {
        $crate::__stamp!(
            $factory,
            locking,
            [
                a_locked_instance_is_not_fetched_again,
                concurrent_fetches_never_share_an_instance,
                concurrent_workers_run_each_turn_once,
                locked_until_is_now_plus_lock_for,
                an_expired_lock_makes_the_work_fetchable_again,
                renewing_extends_the_lock,
                renewing_an_expired_lock_is_stale_and_extends_nothing,
                renewing_a_taken_over_lock_is_stale_and_leaves_the_new_holder,
                abandoning_delays_the_messages,
                abandoning_without_delay_frees_the_work_at_once_under_a_new_token,
                abandoning_a_stale_lock_is_stale_and_changes_nothing,
                an_ack_releases_the_lock,
                higher_priority_is_fetched_first,
                oldest_message_first_among_equal_priority,
                a_batch_takes_the_most_urgent_instances_in_order,
                max_instances_is_respected,
                a_paused_instance_is_not_fetched,
                suspending_sets_the_status_and_reason_and_keeps_the_messages,
                suspending_releases_the_lock,
                suspending_with_a_stale_lock_is_stale_and_changes_nothing,
                the_history_comes_only_when_asked_for,
            ]
        );
    };
}

/// At most one holder: while an instance is locked, another fetch does not return it,
/// even when new messages arrive for it.
pub async fn a_locked_instance_is_not_fetched_again(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    send(p, &a, signal("s", 1)).await;
    let _held = fetch_one(p).await;
    assert_nothing_fetchable(p, "the instance is locked").await;
    send(p, &a, signal("s", 2)).await;
    assert_nothing_fetchable(p, "the instance is still locked").await;
}

/// Many fetches at once over many instances: every instance is claimed exactly once,
/// each claim with its own token.
pub async fn concurrent_fetches_never_share_an_instance(store: TestStore) {
    const INSTANCES: usize = 50;
    const TASKS: usize = 16;
    let p = &*store.provider;
    for i in 0..INSTANCES {
        create(p, new_instance(&format!("i{i:02}"))).await;
    }
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let provider: Arc<dyn Provider> = Arc::clone(&store.provider);
        tasks.push(tokio::spawn(async move {
            let mut claimed = Vec::new();
            // Each fetch that returns something claims a new instance, so a correct
            // provider runs dry within this many; a faulty one must not hang the test.
            for _ in 0..=INSTANCES {
                let work = fetch(&*provider, 3).await;
                if work.is_empty() {
                    break;
                }
                claimed.extend(work.into_iter().map(|w| w.lock));
            }
            claimed
        }));
    }
    let mut claims = Vec::new();
    for task in tasks {
        claims.extend(task.await.expect("a fetching task panicked"));
    }
    // Whatever the tasks left (none, for a correct provider) is still unclaimed.
    claims.extend(fetch(p, INSTANCES).await.into_iter().map(|w| w.lock));
    let mut per_instance: BTreeMap<InstanceId, usize> = BTreeMap::new();
    for lock in &claims {
        *per_instance.entry(lock.instance().clone()).or_default() += 1;
    }
    let twice: Vec<_> = per_instance.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "claimed more than once: {twice:?}");
    assert_eq!(per_instance.len(), INSTANCES, "every instance was claimed");
    let tokens: HashSet<_> = claims.iter().collect();
    assert_eq!(tokens.len(), claims.len(), "tokens are unique per claim");
}

/// Workers fetching and acking concurrently run each instance's turn exactly once: every
/// history holds one turn's events, and every ack commits.
pub async fn concurrent_workers_run_each_turn_once(store: TestStore) {
    const INSTANCES: usize = 40;
    const WORKERS: u64 = 8;
    let p = &*store.provider;
    for i in 0..INSTANCES {
        create(p, new_instance(&format!("i{i:02}"))).await;
    }
    let mut tasks = Vec::new();
    for worker in 0..WORKERS {
        let provider: Arc<dyn Provider> = Arc::clone(&store.provider);
        tasks.push(tokio::spawn(async move {
            let mut committed = 0_usize;
            // Bounded, as above: a faulty provider must fail the test, not hang it.
            for _ in 0..=INSTANCES {
                let work = fetch(&*provider, 4).await;
                if work.is_empty() {
                    break;
                }
                let at = now(&*provider).await;
                let acks: Vec<Ack> = work
                    .iter()
                    .map(|w| {
                        let mut ack = ack_all(w);
                        ack.events = vec![started_event(at), marker(at, 1, worker)];
                        ack
                    })
                    .collect();
                for result in provider.ack_turns(acks).await.unwrap() {
                    result.expect("a held lock acks");
                    committed += 1;
                }
            }
            committed
        }));
    }
    let mut committed = 0;
    for task in tasks {
        committed += task.await.expect("a worker task panicked");
    }
    assert_eq!(committed, INSTANCES, "one committed turn per instance");
    for i in 0..INSTANCES {
        let history = p
            .read_history(&id(&format!("i{i:02}")), None)
            .await
            .unwrap();
        assert_eq!(history.len(), 2, "i{i:02} ran one turn: {history:?}");
    }
    assert_nothing_fetchable(p, "every start was consumed").await;
}

/// A fetched lock lasts `lock_for` from the provider's now.
pub async fn locked_until_is_now_plus_lock_for(store: TestStore) {
    let p = &*store.provider;
    p.create_instance(new_instance("a"), OnConflict::Fail)
        .await
        .unwrap();
    let lock_for = Duration::from_secs(30);
    let before = now(p).await;
    let work = fetch_for(p, 1, lock_for).await;
    let after = now(p).await;
    assert_eq!(work.len(), 1);
    let until = work[0].locked_until;
    assert!(
        before.saturating_add(lock_for) <= until && until <= after.saturating_add(lock_for),
        "locked until {until}, fetched between {before} and {after} for {lock_for:?}"
    );
}

/// A lock that expires makes the instance fetchable again, with the same messages and a
/// new token; the old token's ack is then `Stale`.
pub async fn an_expired_lock_makes_the_work_fetchable_again(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    send(p, &a, signal("s", 1)).await;
    let first = fetch_for(p, 10, SHORT).await;
    assert_eq!(first.len(), 1);
    assert_nothing_fetchable(p, "the lock is held").await;
    store.advance(PAST_SHORT).await;
    let second = fetch_one(p).await;
    assert_eq!(second.lock.instance(), &a);
    assert_ne!(second.lock, first[0].lock, "a new claim gets a new token");
    assert_eq!(
        second.messages, first[0].messages,
        "the same messages come back"
    );
    let err = ack_one(p, ack_all(&first[0])).await.unwrap_err();
    assert!(err.is_stale(), "{err}");
    ack_one(p, ack_all(&second)).await.unwrap();
}

/// Renewing a held lock extends it to now + `extend`: the instance stays held past the
/// original expiry, and comes free once the extension passes.
pub async fn renewing_extends_the_lock(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    send(p, &a, signal("s", 1)).await;
    let work = fetch_for(p, 10, SHORT).await;
    p.renew_lock(&work[0].lock, SHORT * 3).await.unwrap();
    store.advance(PAST_SHORT).await;
    assert_nothing_fetchable(p, "the renewed lock is still held").await;
    store.advance(SHORT * 2).await;
    let again = fetch_one(p).await;
    assert_eq!(again.lock.instance(), &a);
    assert_eq!(signal_numbers(&again), [1]);
}

/// Renewing a lock that expired is `Stale` and extends nothing.
pub async fn renewing_an_expired_lock_is_stale_and_extends_nothing(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    send(p, &a, signal("s", 1)).await;
    let work = fetch_for(p, 10, SHORT).await;
    store.advance(PAST_SHORT).await;
    let err = p.renew_lock(&work[0].lock, LOCK).await.unwrap_err();
    assert!(err.is_stale(), "{err}");
    let again = fetch_one(p).await;
    assert_eq!(again.lock.instance(), &a);
}

/// Renewing a lock another worker took over is `Stale`, and the new holder keeps its
/// lock: the instance stays unfetchable and the new holder's ack commits.
pub async fn renewing_a_taken_over_lock_is_stale_and_leaves_the_new_holder(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    send(p, &a, signal("s", 1)).await;
    let old = fetch_for(p, 10, SHORT).await;
    store.advance(PAST_SHORT).await;
    let new = fetch_one(p).await;
    let err = p.renew_lock(&old[0].lock, LOCK).await.unwrap_err();
    assert!(err.is_stale(), "{err}");
    assert_nothing_fetchable(p, "the new holder still holds the lock").await;
    ack_one(p, ack_all(&new)).await.unwrap();
}

/// Abandoning a lock with a delay makes the messages fetchable only after the delay; the
/// abandoned token is stale.
pub async fn abandoning_delays_the_messages(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    send(p, &a, signal("s", 1)).await;
    let work = fetch_one(p).await;
    p.abandon_lock(&work.lock, SHORT * 2).await.unwrap();
    assert_nothing_fetchable(p, "the abandoned work is delayed").await;
    store.advance(SHORT).await;
    assert_nothing_fetchable(p, "the abandoned work is still delayed").await;
    let err = ack_one(p, ack_all(&work)).await.unwrap_err();
    assert!(err.is_stale(), "{err}");
    store.advance(SHORT + Duration::from_millis(100)).await;
    let again = fetch_one(p).await;
    assert_eq!(signal_numbers(&again), [1]);
}

/// Abandoning with no delay frees the work at once: the next fetch returns the same
/// messages under a new token, and the old token is stale.
pub async fn abandoning_without_delay_frees_the_work_at_once_under_a_new_token(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    send(p, &a, signal("s", 1)).await;
    send(p, &a, signal("s", 2)).await;
    let work = fetch_one(p).await;
    p.abandon_lock(&work.lock, Duration::ZERO).await.unwrap();
    let again = fetch_one(p).await;
    assert_ne!(again.lock, work.lock, "a new claim gets a new token");
    assert_eq!(again.messages, work.messages);
    let err = p.renew_lock(&work.lock, LOCK).await.unwrap_err();
    assert!(err.is_stale(), "{err}");
    let err = p
        .abandon_lock(&work.lock, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(err.is_stale(), "{err}");
    ack_one(p, ack_all(&again)).await.unwrap();
}

/// Abandoning a lock that was taken over is `Stale`, and the new holder keeps it.
pub async fn abandoning_a_stale_lock_is_stale_and_changes_nothing(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    send(p, &a, signal("s", 1)).await;
    let old = fetch_for(p, 10, SHORT).await;
    store.advance(PAST_SHORT).await;
    let new = fetch_one(p).await;
    let err = p
        .abandon_lock(&old[0].lock, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(err.is_stale(), "{err}");
    assert_nothing_fetchable(p, "the new holder still holds the lock").await;
    ack_one(p, ack_all(&new)).await.unwrap();
    assert_nothing_fetchable(p, "the new holder consumed the signal").await;
}

/// An ack releases the lock: a message arriving right after it is fetchable at once,
/// and the acked token is stale.
pub async fn an_ack_releases_the_lock(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    send(p, &a, signal("s", 1)).await;
    let work = fetch_one(p).await;
    ack_one(p, ack_all(&work)).await.unwrap();
    send(p, &a, signal("s", 2)).await;
    let next = fetch_one(p).await;
    assert_eq!(signal_numbers(&next), [2]);
    let err = p.renew_lock(&work.lock, LOCK).await.unwrap_err();
    assert!(err.is_stale(), "{err}");
}

/// Among visible instances, higher priority is fetched first, whatever their age.
pub async fn higher_priority_is_fetched_first(store: TestStore) {
    let p = &*store.provider;
    for (name, priority) in [("low", -1), ("mid", 3), ("high", 7), ("zero", 0)] {
        let mut instance = new_instance(name);
        instance.priority = priority;
        p.create_instance(instance, OnConflict::Fail).await.unwrap();
        store.advance(Duration::from_millis(5)).await;
    }
    let mut order = Vec::new();
    for _ in 0..4 {
        let work = fetch(p, 1).await;
        assert_eq!(work.len(), 1, "max_instances is 1");
        order.push(work[0].lock.instance().as_str().to_owned());
    }
    assert_eq!(order, ["high", "mid", "zero", "low"]);
}

/// Among instances of equal priority, the one with the oldest visible message is
/// fetched first, whatever the order the instances were created in.
pub async fn oldest_message_first_among_equal_priority(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let b = started(p, "b").await;
    let c = started(p, "c").await;
    for instance in [&c, &a, &b] {
        send(p, instance, signal("s", 1)).await;
        store.advance(Duration::from_millis(5)).await;
    }
    let mut order = Vec::new();
    for _ in 0..3 {
        let work = fetch(p, 1).await;
        assert_eq!(work.len(), 1, "max_instances is 1");
        order.push(work[0].lock.instance().clone());
    }
    assert_eq!(order, [c, a, b]);
}

/// A batch of several instances holds the most urgent ones (by priority, then oldest
/// message), in that order.
pub async fn a_batch_takes_the_most_urgent_instances_in_order(store: TestStore) {
    let p = &*store.provider;
    let plan = [
        ("p0-old", 0),
        ("p5-old", 5),
        ("p1", 1),
        ("p5-new", 5),
        ("p3", 3),
        ("p0-new", 0),
    ];
    for (name, priority) in plan {
        let mut instance = new_instance(name);
        instance.priority = priority;
        p.create_instance(instance, OnConflict::Fail).await.unwrap();
        store.advance(Duration::from_millis(5)).await;
    }
    let names = |work: Vec<keel_provider::OrchestrationWork>| -> Vec<String> {
        work.iter()
            .map(|w| w.lock.instance().as_str().to_owned())
            .collect()
    };
    let first = names(fetch(p, 3).await);
    let chosen: BTreeSet<&str> = first.iter().map(String::as_str).collect();
    assert_eq!(
        chosen,
        BTreeSet::from(["p5-old", "p5-new", "p3"]),
        "the three most urgent are claimed"
    );
    assert_eq!(first, ["p5-old", "p5-new", "p3"], "most urgent first");
    assert_eq!(names(fetch(p, 3).await), ["p1", "p0-old", "p0-new"]);
}

/// A fetch returns at most `max_instances` instances.
pub async fn max_instances_is_respected(store: TestStore) {
    let p = &*store.provider;
    for i in 0..5 {
        create(p, new_instance(&format!("i{i}"))).await;
    }
    let sizes = [
        fetch(p, 2).await.len(),
        fetch(p, 2).await.len(),
        fetch(p, 2).await.len(),
        fetch(p, 2).await.len(),
    ];
    assert_eq!(sizes, [2, 2, 1, 0]);
}

/// A paused instance is not fetched, though it has messages; resumed, it is.
pub async fn a_paused_instance_is_not_fetched(store: TestStore) {
    let p = &*store.provider;
    let b = started(p, "b").await;
    p.create_instance(new_instance("a"), OnConflict::Fail)
        .await
        .unwrap();
    p.pause(&id("a")).await.unwrap();
    assert_eq!(
        p.get_instance(&id("a")).await.unwrap().status,
        InstanceStatus::Paused
    );
    send(p, &b, signal("s", 1)).await;
    let work = fetch(p, 10).await;
    assert_eq!(work.len(), 1, "only the unpaused instance");
    assert_eq!(work[0].lock.instance(), &b);
    p.resume(&id("a")).await.unwrap();
    assert_eq!(
        p.get_instance(&id("a")).await.unwrap().status,
        InstanceStatus::Pending,
        "no turn was ever acked"
    );
    let work = fetch_one(p).await;
    assert_eq!(work.lock.instance(), &id("a"));
    assert!(matches!(work.messages[0].message, Message::Start { .. }));
}

/// Suspending sets the instance aside as `Suspended` with the reason, keeping its
/// messages: it is not fetched, still accepts messages, and resumed it delivers them all.
pub async fn suspending_sets_the_status_and_reason_and_keeps_the_messages(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    send(p, &a, signal("s", 1)).await;
    let work = fetch_one(p).await;
    let reason = "nondeterminism: expected ActivityScheduled \"charge\", got TimerCreated";
    p.suspend(&work.lock, reason).await.unwrap();
    let record = p.get_instance(&a).await.unwrap();
    assert_eq!(record.status, InstanceStatus::Suspended);
    assert_eq!(record.status_reason.as_deref(), Some(reason));
    assert_eq!(record.history_len, 1, "the history is untouched");
    send(p, &a, signal("s", 2)).await;
    assert_nothing_fetchable(p, "the instance is suspended").await;
    p.resume(&a).await.unwrap();
    assert_eq!(
        p.get_instance(&a).await.unwrap().status,
        InstanceStatus::Running
    );
    let again = fetch_one(p).await;
    assert_eq!(signal_numbers(&again), [1, 2]);
    assert_eq!(again.messages[0].id, work.messages[0].id);
}

/// Suspending releases the lock: the token is stale afterwards, and a resumed instance
/// is fetchable at once rather than when the old lock would have expired.
pub async fn suspending_releases_the_lock(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    send(p, &a, signal("s", 1)).await;
    let work = fetch_one(p).await;
    p.suspend(&work.lock, "broken").await.unwrap();
    let err = ack_one(p, ack_all(&work)).await.unwrap_err();
    assert!(err.is_stale(), "{err}");
    p.resume(&a).await.unwrap();
    let again = fetch_one(p).await;
    assert_eq!(signal_numbers(&again), [1]);
}

/// Suspending with a lock that was taken over is `Stale`, and nothing changes: the
/// status stays, and the new holder's ack commits.
pub async fn suspending_with_a_stale_lock_is_stale_and_changes_nothing(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    send(p, &a, signal("s", 1)).await;
    let old = fetch_for(p, 10, SHORT).await;
    store.advance(PAST_SHORT).await;
    let new = fetch_one(p).await;
    let err = p.suspend(&old[0].lock, "late").await.unwrap_err();
    assert!(err.is_stale(), "{err}");
    let record = p.get_instance(&a).await.unwrap();
    assert_eq!(record.status, InstanceStatus::Running);
    assert_eq!(record.status_reason, None);
    ack_one(p, ack_all(&new)).await.unwrap();
}

/// A fetch returns the current history only when asked for, and reports its length
/// either way.
pub async fn the_history_comes_only_when_asked_for(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let history = p.read_history(&a, None).await.unwrap();
    send(p, &a, signal("s", 1)).await;
    let bare = p
        .fetch_orchestrations(FetchOrchestrations {
            max_instances: 10,
            lock_for: LOCK,
            with_history: false,
        })
        .await
        .unwrap();
    assert_eq!(bare.len(), 1);
    assert_eq!(bare[0].history, None);
    assert_eq!(bare[0].history_len, 1);
    p.abandon_lock(&bare[0].lock, Duration::ZERO).await.unwrap();
    let full = fetch_one(p).await;
    assert_eq!(full.history.as_ref(), Some(&history));
    assert_eq!(full.history_len, 1);
    assert_eq!(history.len(), 1);
}
