//! Leased work items: expiry and renewal, completion, retries and abandonment; and
//! what the orchestration's cancellation does to an item, queued or leased.

use std::sync::Arc;
use std::time::Duration;

use keel_core::{Failure, Message, OpId, Outcome};
use keel_provider::{Ack, ActivityCompletion, ActivityRetry, ErrorKind, Provider};

use crate::TestStore;
use crate::fixtures::{
    FIRST, LEASE, activity, complete, expect_kind, lease, lease_queues, messages_for, ops, payload,
    provider_now, run_turn, schedule, schedule_n, signal, tick,
};

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_leases {
    ($factory:expr) => {
        $crate::__stamp!(
            $factory,
            leases,
            [
                an_expired_lease_makes_the_item_leasable_again,
                a_renewed_lease_outlives_its_first_expiry,
                renewing_an_expired_lease_is_stale_and_changes_nothing,
                a_lease_taken_over_rejects_the_old_token,
                completing_deletes_the_item_and_enqueues_its_outcome,
                a_failed_completion_enqueues_the_failure,
                a_batch_of_completions_returns_one_result_per_completion_in_order,
                a_second_completion_of_the_same_lease_is_stale,
                concurrent_completions_of_one_lease_record_one_outcome,
                retrying_hides_the_item_for_its_delay_then_delivers_the_next_attempt,
                retrying_with_a_stale_lease_is_stale_and_changes_nothing,
                abandoning_a_lease_makes_the_item_visible_at_once_with_its_attempt_unchanged,
                abandoning_a_stale_lease_is_stale,
                cancelling_a_queued_item_deletes_it,
                cancelling_a_leased_item_fails_its_renewal_with_cancelled,
                completing_a_cancelled_item_drops_its_outcome,
                cancelling_touches_only_the_acking_instances_items,
            ]
        );
    };
}

/// The `ActivityDone` messages among `messages`, as (op, outcome).
fn activity_results(messages: &[Message]) -> Vec<(u64, Outcome)> {
    messages
        .iter()
        .filter_map(|m| match m {
            Message::ActivityDone {
                execution,
                op,
                outcome,
            } => {
                assert_eq!(*execution, FIRST, "the outcome names the item's execution");
                Some((op.get(), outcome.clone()))
            }
            _ => None,
        })
        .collect()
}

fn output(n: i64) -> Outcome {
    Ok(payload(&serde_json::json!({ "out": n })))
}

/// A lease that expires makes the item visible again: a new lease, one more delivery,
/// the same attempt.
pub async fn an_expired_lease_makes_the_item_leasable_again(store: TestStore) {
    let p = &*store.provider;
    let t = tick(&store);
    schedule_n(p, 1).await;
    let first = lease_queues(p, &["default"], 10, 2 * t).await;
    assert_eq!(first.len(), 1);
    store.advance(t).await;
    assert!(
        lease(p, 10).await.is_empty(),
        "the lease has not expired yet"
    );
    store.advance(2 * t).await;
    let second = lease(p, 10).await;
    assert_eq!(second.len(), 1, "an expired lease makes the item visible");
    assert_eq!(second[0].item, first[0].item);
    assert_eq!(
        second[0].item.attempt, 1,
        "an expired lease is not an attempt"
    );
    assert_eq!(second[0].deliveries, 2);
    assert_ne!(
        second[0].lease, first[0].lease,
        "each lease has its own token"
    );
}

/// Renewing a held lease extends it to now + `extend`, past its first expiry.
pub async fn a_renewed_lease_outlives_its_first_expiry(store: TestStore) {
    let p = &*store.provider;
    let t = tick(&store);
    schedule_n(p, 1).await;
    let leased = lease_queues(p, &["default"], 10, 4 * t).await;
    store.advance(2 * t).await;
    p.renew_lease(&leased[0].lease, 4 * t)
        .await
        .expect("renewing a held lease succeeds");
    store.advance(3 * t).await;
    assert!(
        lease(p, 10).await.is_empty(),
        "a renewed lease outlives its first expiry"
    );
    complete(p, &leased[0].lease, output(1))
        .await
        .expect("the renewed lease is still held");
}

/// Renewing a lease that expired is `Stale` and changes nothing: the item stays
/// visible.
pub async fn renewing_an_expired_lease_is_stale_and_changes_nothing(store: TestStore) {
    let p = &*store.provider;
    let t = tick(&store);
    schedule_n(p, 1).await;
    let leased = lease_queues(p, &["default"], 10, 2 * t).await;
    store.advance(3 * t).await;
    expect_kind(
        p.renew_lease(&leased[0].lease, LEASE).await,
        ErrorKind::Stale,
        "renewing an expired lease",
    );
    assert_eq!(lease(p, 10).await.len(), 1, "the item is still visible");
}

/// Once another fetch took an expired item over, the old token is `Stale` for renew,
/// complete, retry and abandon, and none of them disturbs the new holder.
pub async fn a_lease_taken_over_rejects_the_old_token(store: TestStore) {
    let p = &*store.provider;
    let t = tick(&store);
    let a = schedule_n(p, 1).await;
    let old = lease_queues(p, &["default"], 10, 2 * t).await.remove(0);
    store.advance(3 * t).await;
    let new = lease(p, 10).await.remove(0);

    let what = "a taken-over lease";
    expect_kind(
        p.renew_lease(&old.lease, LEASE).await,
        ErrorKind::Stale,
        what,
    );
    expect_kind(
        complete(p, &old.lease, output(1)).await,
        ErrorKind::Stale,
        what,
    );
    let retry = ActivityRetry {
        lease: old.lease.clone(),
        next_attempt: 2,
        delay: Duration::ZERO,
        failure: Failure::new("Boom", "failed"),
    };
    expect_kind(p.retry_activity(retry).await, ErrorKind::Stale, what);
    expect_kind(p.abandon_lease(&old.lease).await, ErrorKind::Stale, what);
    assert!(
        activity_results(&messages_for(p, &a).await).is_empty(),
        "a stale completion enqueued an outcome"
    );
    assert!(lease(p, 10).await.is_empty(), "the new lease is still held");

    p.renew_lease(&new.lease, LEASE)
        .await
        .expect("new lease renews");
    complete(p, &new.lease, output(2))
        .await
        .expect("new lease completes");
    assert_eq!(
        activity_results(&messages_for(p, &a).await),
        [(1, output(2))]
    );
}

/// Completing deletes the item and enqueues `ActivityDone` with its outcome for its
/// instance.
pub async fn completing_deletes_the_item_and_enqueues_its_outcome(store: TestStore) {
    let p = &*store.provider;
    let t = tick(&store);
    let a = schedule_n(p, 1).await;
    let leased = lease_queues(p, &["default"], 10, 2 * t).await.remove(0);
    complete(p, &leased.lease, output(7))
        .await
        .expect("completing a held lease succeeds");
    let messages = messages_for(p, &a).await;
    assert_eq!(
        messages,
        [Message::ActivityDone {
            execution: FIRST,
            op: OpId::from_raw(1),
            outcome: output(7),
        }]
    );
    store.advance(3 * t).await;
    assert!(lease(p, 10).await.is_empty(), "a completed item is deleted");
    let depths = p.queue_depths().await.expect("queue depths");
    assert_eq!(depths.activities_ready.values().sum::<u64>(), 0);
    assert_eq!(depths.activities_running, 0);
    assert_eq!(depths.activities_delayed, 0);
}

/// A failed completion enqueues the failure, causes and all, as the outcome.
pub async fn a_failed_completion_enqueues_the_failure(store: TestStore) {
    let p = &*store.provider;
    let a = schedule_n(p, 1).await;
    let leased = lease(p, 10).await.remove(0);
    let failure = Failure::new("Boom", "it broke")
        .with_cause("disk full")
        .retryable(false)
        .with_data(payload(&serde_json::json!({"code": 28})));
    complete(p, &leased.lease, Err(failure.clone()))
        .await
        .expect("completing a held lease succeeds");
    assert_eq!(
        activity_results(&messages_for(p, &a).await),
        [(1, Err(failure))]
    );
}

/// A batch of completions returns one result per completion, in order: a stale one is
/// rejected and enqueues nothing, the others commit.
pub async fn a_batch_of_completions_returns_one_result_per_completion_in_order(store: TestStore) {
    let p = &*store.provider;
    let a = schedule_n(p, 4).await;
    let mut leased = lease(p, 10).await;
    leased.sort_by_key(|l| l.item.op);
    p.abandon_lease(&leased[1].lease).await.expect("abandon");
    let retaken = lease(p, 10).await.remove(0);
    assert_eq!(retaken.item.op.get(), 2);

    // Op 2's token is stale now; the others are held.
    let completions = leased
        .iter()
        .zip(1..)
        .map(|(l, n)| ActivityCompletion {
            lease: l.lease.clone(),
            outcome: output(n),
        })
        .collect();
    let results = p
        .complete_activities(completions)
        .await
        .expect("the completion call succeeds");
    let verdicts: Vec<&str> = results
        .iter()
        .map(|r| match r {
            Ok(()) => "ok",
            Err(e) if e.is_stale() => "stale",
            Err(_) => "other error",
        })
        .collect();
    assert_eq!(verdicts, ["ok", "stale", "ok", "ok"], "{results:?}");

    let mut done = activity_results(&messages_for(p, &a).await);
    done.sort_by_key(|(op, _)| *op);
    assert_eq!(done, [(1, output(1)), (3, output(3)), (4, output(4))]);
    p.renew_lease(&retaken.lease, LEASE)
        .await
        .expect("the stale completion left the new lease alone");
}

/// A second completion of the same lease is `Stale`; the outcome is recorded once.
pub async fn a_second_completion_of_the_same_lease_is_stale(store: TestStore) {
    let p = &*store.provider;
    let a = schedule_n(p, 1).await;
    let leased = lease(p, 10).await.remove(0);
    complete(p, &leased.lease, output(1)).await.expect("first");
    expect_kind(
        complete(p, &leased.lease, output(2)).await,
        ErrorKind::Stale,
        "a second completion",
    );
    assert_eq!(
        activity_results(&messages_for(p, &a).await),
        [(1, output(1))]
    );
}

/// Two completions of one lease racing each other: exactly one wins, and only its
/// outcome is enqueued.
pub async fn concurrent_completions_of_one_lease_record_one_outcome(store: TestStore) {
    let a = schedule_n(&*store.provider, 1).await;
    let leased = lease(&*store.provider, 10).await.remove(0);
    let mut tasks = Vec::new();
    for n in [1, 2] {
        let p = Arc::clone(&store.provider);
        let token = leased.lease.clone();
        tasks.push(tokio::spawn(async move {
            (n, complete(&*p, &token, output(n)).await)
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        let (n, result) = task.await.expect("completion task");
        match result {
            Ok(()) => winners.push(n),
            Err(err) => assert!(err.is_stale(), "the loser is Stale: {err}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one completion wins: {winners:?}");
    assert_eq!(
        activity_results(&messages_for(&*store.provider, &a).await),
        [(1, output(winners[0]))]
    );
}

/// A retry releases the lease and hides the item for its delay; then it is delivered
/// again as `next_attempt`, and nothing was enqueued for the instance.
pub async fn retrying_hides_the_item_for_its_delay_then_delivers_the_next_attempt(
    store: TestStore,
) {
    let p = &*store.provider;
    let t = tick(&store);
    let a = schedule_n(p, 1).await;
    let leased = lease(p, 10).await.remove(0);
    p.retry_activity(ActivityRetry {
        lease: leased.lease.clone(),
        next_attempt: 2,
        delay: 4 * t,
        failure: Failure::new("Flaky", "try again"),
    })
    .await
    .expect("retrying a held lease succeeds");
    assert!(lease(p, 10).await.is_empty(), "invisible during its delay");
    let depths = p.queue_depths().await.expect("queue depths");
    assert_eq!(depths.activities_delayed, 1);
    assert_eq!(depths.activities_running, 0);
    store.advance(2 * t).await;
    assert!(lease(p, 10).await.is_empty(), "invisible during its delay");
    store.advance(3 * t).await;
    let again = lease(p, 10).await;
    assert_eq!(again.len(), 1, "visible once its delay passed");
    let mut expected = leased.item.clone();
    expected.attempt = 2;
    assert_eq!(again[0].item, expected);
    assert_eq!(again[0].deliveries, 2);
    assert!(
        messages_for(p, &a).await.is_empty(),
        "a retry enqueues nothing"
    );
}

/// A retry with a stale lease is `Stale` and changes nothing.
pub async fn retrying_with_a_stale_lease_is_stale_and_changes_nothing(store: TestStore) {
    let p = &*store.provider;
    schedule_n(p, 1).await;
    let leased = lease(p, 10).await.remove(0);
    p.abandon_lease(&leased.lease).await.expect("abandon");
    let retry = ActivityRetry {
        lease: leased.lease,
        next_attempt: 2,
        delay: Duration::from_secs(3_600),
        failure: Failure::new("Flaky", "try again"),
    };
    expect_kind(
        p.retry_activity(retry).await,
        ErrorKind::Stale,
        "stale retry",
    );
    let again = lease(p, 10).await;
    assert_eq!(again.len(), 1, "the item is still visible at once");
    assert_eq!(again[0].item.attempt, 1);
}

/// Abandoning a lease makes the item visible again at once, its attempt unchanged.
pub async fn abandoning_a_lease_makes_the_item_visible_at_once_with_its_attempt_unchanged(
    store: TestStore,
) {
    let p = &*store.provider;
    schedule_n(p, 1).await;
    let leased = lease(p, 10).await.remove(0);
    p.abandon_lease(&leased.lease)
        .await
        .expect("abandoning a held lease succeeds");
    let again = lease(p, 10).await;
    assert_eq!(again.len(), 1, "visible again at once");
    assert_eq!(again[0].item, leased.item, "same item, same attempt");
    assert_ne!(again[0].lease, leased.lease);
}

/// Abandoning an expired or completed lease is `Stale`.
pub async fn abandoning_a_stale_lease_is_stale(store: TestStore) {
    let p = &*store.provider;
    let t = tick(&store);
    schedule_n(p, 2).await;
    let mut leased = lease_queues(p, &["default"], 10, 2 * t).await;
    leased.sort_by_key(|l| l.item.op);
    complete(p, &leased[0].lease, output(1))
        .await
        .expect("complete");
    expect_kind(
        p.abandon_lease(&leased[0].lease).await,
        ErrorKind::Stale,
        "abandoning a completed lease",
    );
    store.advance(3 * t).await;
    expect_kind(
        p.abandon_lease(&leased[1].lease).await,
        ErrorKind::Stale,
        "abandoning an expired lease",
    );
}

/// Signals `instance` and runs a turn that consumes its messages and cancels `ops`.
async fn cancel(p: &dyn Provider, instance: &keel_core::InstanceId, ops: &[u64]) {
    p.send_message(instance, signal("cancel", 0), None)
        .await
        .expect("send");
    run_turn(p, instance, |work| {
        let mut ack = Ack::new(
            work.lock.clone(),
            work.messages.iter().map(|m| m.id).collect(),
        );
        ack.cancel_activities = ops.iter().copied().map(OpId::from_raw).collect();
        ack
    })
    .await
    .expect("the cancelling turn acks");
}

/// Cancelling a queued item deletes it: it is never leased.
pub async fn cancelling_a_queued_item_deletes_it(store: TestStore) {
    let p = &*store.provider;
    let a = schedule_n(p, 2).await;
    cancel(p, &a, &[1]).await;
    assert_eq!(ops(&lease(p, 10).await), [2]);
    let depths = p.queue_depths().await.expect("queue depths");
    assert_eq!(depths.activities_ready.values().sum::<u64>(), 0);
    assert_eq!(depths.activities_running, 1);
}

/// Cancelling a leased item makes its lease renewal fail with `Cancelled`.
pub async fn cancelling_a_leased_item_fails_its_renewal_with_cancelled(store: TestStore) {
    let p = &*store.provider;
    let a = schedule_n(p, 1).await;
    let leased = lease(p, 10).await.remove(0);
    cancel(p, &a, &[1]).await;
    let err = expect_kind(
        p.renew_lease(&leased.lease, LEASE).await,
        ErrorKind::Cancelled,
        "renewing a cancelled item",
    );
    assert!(err.is_cancelled());
}

/// Completing an item cancelled while it ran deletes it and enqueues nothing.
pub async fn completing_a_cancelled_item_drops_its_outcome(store: TestStore) {
    let p = &*store.provider;
    let t = tick(&store);
    let a = schedule_n(p, 1).await;
    let leased = lease_queues(p, &["default"], 10, 2 * t).await.remove(0);
    cancel(p, &a, &[1]).await;
    match complete(p, &leased.lease, output(1)).await {
        Ok(()) => {}
        Err(err) => assert!(err.is_cancelled(), "{err}"),
    }
    assert!(
        activity_results(&messages_for(p, &a).await).is_empty(),
        "a cancelled item's outcome is dropped"
    );
    store.advance(3 * t).await;
    assert!(
        lease(p, 10).await.is_empty(),
        "the cancelled item is deleted"
    );
}

/// An ack cancels only its own instance's items, even where op numbers coincide.
pub async fn cancelling_touches_only_the_acking_instances_items(store: TestStore) {
    let p = &*store.provider;
    let at = provider_now(p).await;
    let a = schedule(p, "a", vec![activity("a", 1, "work", at)]).await;
    schedule(p, "b", vec![activity("b", 1, "work", at)]).await;
    cancel(p, &a, &[1]).await;
    let leased = lease(p, 10).await;
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].item.instance.as_str(), "b");
}
