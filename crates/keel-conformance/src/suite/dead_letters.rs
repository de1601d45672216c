//! Dead letters: work that failed for good, kept with its failure and item, listed,
//! replayed and discarded.

use std::time::Duration;

use keel_core::{Failure, InstanceId, Outcome, WorkItem};
use keel_provider::{
    ActivityRetry, DeadLetter, DeadLetterId, ErrorKind, PageRequest, Provider, PurgeFilter,
    TurnOutcome,
};

use crate::TestStore;
use crate::fixtures::{
    FIRST, activity, complete, end, expect_kind, lease, payload, provider_now, schedule,
};

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_dead_letters {
    ($factory:expr) => {
        $crate::__stamp!(
            $factory,
            dead_letters,
            [
                a_failed_completion_records_a_dead_letter,
                successes_and_retries_record_no_dead_letter,
                dead_letters_are_listed_oldest_first_a_page_at_a_time,
                getting_a_dead_letter_returns_it_or_not_found,
                replaying_a_dead_letter_requeues_its_item_as_attempt_one,
                discarding_a_dead_letter_removes_it_without_requeueing,
                replaying_or_discarding_an_unknown_dead_letter_is_not_found,
                queue_depths_count_dead_letters,
                deleting_an_instance_removes_its_dead_letters,
                purging_an_instance_removes_its_dead_letters,
            ]
        );
    };
}

/// An unknown dead letter id: no test records anywhere near this many.
const UNKNOWN: DeadLetterId = DeadLetterId(987_654_321);

fn failure(n: u64) -> Failure {
    Failure::new("Broken", format!("failure {n}"))
        .with_cause("the cause")
        .retryable(false)
}

/// Schedules activity "work" op `op` for instance `instance`.
async fn schedule_one(p: &dyn Provider, instance: &str, op: u64) -> WorkItem {
    let item = activity(instance, op, "work", provider_now(p).await);
    schedule(p, instance, vec![item.clone()]).await;
    item
}

/// Leases the one visible item and completes it with `outcome`.
async fn lease_and_complete(p: &dyn Provider, outcome: Outcome) {
    let leased = lease(p, 10).await;
    assert_eq!(leased.len(), 1, "one item to complete");
    complete(p, &leased[0].lease, outcome)
        .await
        .expect("completing a held lease succeeds");
}

async fn all_dead_letters(p: &dyn Provider) -> Vec<DeadLetter> {
    p.list_dead_letters(PageRequest::first(1_000))
        .await
        .expect("listing dead letters succeeds")
        .items
}

/// A failed completion records a dead letter naming the instance, execution, op and
/// activity, with the attempts made, the failure and its chain, and the item.
pub async fn a_failed_completion_records_a_dead_letter(store: TestStore) {
    let p = &*store.provider;
    let mut item = activity("a", 4, "charge", provider_now(p).await);
    item.input = payload(&serde_json::json!({"amount": 3}));
    item.options.priority = 2;
    schedule(p, "a", vec![item.clone()]).await;
    for next_attempt in [2, 3] {
        let leased = lease(p, 10).await.remove(0);
        let retry = ActivityRetry {
            lease: leased.lease,
            next_attempt,
            delay: Duration::ZERO,
            failure: Failure::new("Flaky", "again"),
        };
        p.retry_activity(retry).await.expect("retry");
    }
    let before = provider_now(p).await;
    lease_and_complete(p, Err(failure(1))).await;
    let after = provider_now(p).await;

    let letters = all_dead_letters(p).await;
    assert_eq!(letters.len(), 1, "one dead letter");
    let letter = &letters[0];
    assert_eq!(letter.instance.as_str(), "a");
    assert_eq!(letter.execution, FIRST);
    assert_eq!(letter.op, item.op);
    assert_eq!(letter.name, "charge");
    assert_eq!(letter.attempts, 3);
    assert_eq!(letter.failure, failure(1), "the failure, chain and all");
    assert!(
        letter.recorded_at >= before && letter.recorded_at <= after,
        "recorded at {:?}, not within {before:?}..{after:?}",
        letter.recorded_at
    );
    let mut kept = letter.item.clone().expect("the item is kept for replay");
    kept.attempt = item.attempt;
    assert_eq!(kept, item, "the item is kept as it was");
}

/// Successful completions and retries record no dead letter.
pub async fn successes_and_retries_record_no_dead_letter(store: TestStore) {
    let p = &*store.provider;
    schedule_one(p, "a", 1).await;
    let leased = lease(p, 10).await.remove(0);
    let retry = ActivityRetry {
        lease: leased.lease,
        next_attempt: 2,
        delay: Duration::ZERO,
        failure: Failure::new("Flaky", "again"),
    };
    p.retry_activity(retry).await.expect("retry");
    assert!(
        all_dead_letters(p).await.is_empty(),
        "a retry is no dead letter"
    );
    lease_and_complete(p, Ok(payload(&serde_json::json!(1)))).await;
    assert!(
        all_dead_letters(p).await.is_empty(),
        "a success is no dead letter"
    );
}

/// Dead letters are listed oldest first, a page at a time: following the cursor visits
/// each once, and one recorded during the listing appears at its end or not at all.
pub async fn dead_letters_are_listed_oldest_first_a_page_at_a_time(store: TestStore) {
    let p = &*store.provider;
    for op in 1..=5 {
        schedule_one(p, "a", op).await;
        lease_and_complete(p, Err(failure(op))).await;
        store.advance(Duration::from_millis(10)).await;
    }
    let mut seen = Vec::new();
    let mut page = PageRequest::first(2);
    let mut pages = 0;
    loop {
        let listed = p.list_dead_letters(page.clone()).await.expect("list");
        assert!(listed.items.len() <= 2, "a page holds at most its limit");
        seen.extend(listed.items.iter().map(|l| l.op.get()));
        pages += 1;
        if pages == 1 {
            schedule_one(p, "b", 6).await;
            lease_and_complete(p, Err(failure(6))).await;
        }
        match listed.next {
            Some(cursor) => page.cursor = Some(cursor),
            None => break,
        }
        assert!(pages < 20, "the listing does not end");
    }
    assert!(pages >= 3, "five letters in pages of two take three pages");
    let expected: Vec<u64> = (1..=5).collect();
    assert!(
        seen == expected || seen == [1, 2, 3, 4, 5, 6],
        "listed {seen:?}, expected 1..=5 oldest first (and 6 at the end or not at all)"
    );
}

/// `get_dead_letter` returns a listed dead letter, and `NotFound` for an unknown id.
pub async fn getting_a_dead_letter_returns_it_or_not_found(store: TestStore) {
    let p = &*store.provider;
    schedule_one(p, "a", 1).await;
    lease_and_complete(p, Err(failure(1))).await;
    let listed = all_dead_letters(p).await.remove(0);
    assert_eq!(p.get_dead_letter(listed.id).await.expect("get"), listed);
    expect_kind(
        p.get_dead_letter(UNKNOWN).await,
        ErrorKind::NotFound,
        "an unknown dead letter",
    );
}

/// Replaying a dead letter re-queues its item as attempt 1 and removes the dead letter.
pub async fn replaying_a_dead_letter_requeues_its_item_as_attempt_one(store: TestStore) {
    let p = &*store.provider;
    let item = schedule_one(p, "a", 1).await;
    let leased = lease(p, 10).await.remove(0);
    p.retry_activity(ActivityRetry {
        lease: leased.lease,
        next_attempt: 2,
        delay: Duration::ZERO,
        failure: Failure::new("Flaky", "again"),
    })
    .await
    .expect("retry");
    lease_and_complete(p, Err(failure(1))).await;
    let letter = all_dead_letters(p).await.remove(0);
    p.replay_dead_letter(letter.id).await.expect("replay");
    expect_kind(
        p.get_dead_letter(letter.id).await,
        ErrorKind::NotFound,
        "a replayed dead letter",
    );
    assert!(all_dead_letters(p).await.is_empty());
    let again = lease(p, 10).await;
    assert_eq!(again.len(), 1, "the item is queued again");
    assert_eq!(again[0].item.attempt, 1, "as attempt 1");
    assert_eq!(again[0].item.instance, item.instance);
    assert_eq!(again[0].item.op, item.op);
    assert_eq!(again[0].item.name, item.name);
    assert_eq!(again[0].item.input, item.input);
    assert_eq!(again[0].item.options, item.options);
}

/// Discarding a dead letter removes it and queues nothing.
pub async fn discarding_a_dead_letter_removes_it_without_requeueing(store: TestStore) {
    let p = &*store.provider;
    schedule_one(p, "a", 1).await;
    lease_and_complete(p, Err(failure(1))).await;
    let letter = all_dead_letters(p).await.remove(0);
    p.discard_dead_letter(letter.id).await.expect("discard");
    expect_kind(
        p.get_dead_letter(letter.id).await,
        ErrorKind::NotFound,
        "a discarded dead letter",
    );
    assert!(all_dead_letters(p).await.is_empty());
    assert!(lease(p, 10).await.is_empty(), "discarding queues nothing");
}

/// Replaying or discarding an unknown (or already removed) dead letter is `NotFound`.
pub async fn replaying_or_discarding_an_unknown_dead_letter_is_not_found(store: TestStore) {
    let p = &*store.provider;
    let what = "an unknown dead letter";
    expect_kind(
        p.replay_dead_letter(UNKNOWN).await,
        ErrorKind::NotFound,
        what,
    );
    expect_kind(
        p.discard_dead_letter(UNKNOWN).await,
        ErrorKind::NotFound,
        what,
    );
    for op in [1, 2] {
        schedule_one(p, "a", op).await;
        lease_and_complete(p, Err(failure(op))).await;
    }
    let letters = all_dead_letters(p).await;
    p.replay_dead_letter(letters[0].id).await.expect("replay");
    p.discard_dead_letter(letters[1].id).await.expect("discard");
    let what = "a removed dead letter";
    for id in [letters[0].id, letters[1].id] {
        expect_kind(p.replay_dead_letter(id).await, ErrorKind::NotFound, what);
        expect_kind(p.discard_dead_letter(id).await, ErrorKind::NotFound, what);
    }
}

/// `queue_depths` counts dead letters.
pub async fn queue_depths_count_dead_letters(store: TestStore) {
    let p = &*store.provider;
    for op in 1..=3 {
        schedule_one(p, "a", op).await;
        lease_and_complete(p, Err(failure(op))).await;
    }
    let depths = p.queue_depths().await.expect("queue depths");
    assert_eq!(depths.dead_letters, 3);
    let letter = all_dead_letters(p).await.remove(0);
    p.discard_dead_letter(letter.id).await.expect("discard");
    assert_eq!(p.queue_depths().await.expect("depths").dead_letters, 2);
}

/// Records one dead letter for "a" and one for "b".
async fn two_instances_with_dead_letters(p: &dyn Provider) -> (InstanceId, InstanceId) {
    let a = InstanceId::new("a").expect("id");
    let b = InstanceId::new("b").expect("id");
    schedule_one(p, "a", 1).await;
    lease_and_complete(p, Err(failure(1))).await;
    schedule_one(p, "b", 1).await;
    lease_and_complete(p, Err(failure(2))).await;
    (a, b)
}

/// Deleting an instance deletes its dead letters, and only its.
pub async fn deleting_an_instance_removes_its_dead_letters(store: TestStore) {
    let p = &*store.provider;
    let (a, _) = two_instances_with_dead_letters(p).await;
    assert_eq!(p.delete_instance(&a).await.expect("delete"), 1);
    let left: Vec<String> = all_dead_letters(p)
        .await
        .iter()
        .map(|l| l.instance.to_string())
        .collect();
    assert_eq!(left, ["b"]);
}

/// Purging a finished instance deletes its dead letters, and only its.
pub async fn purging_an_instance_removes_its_dead_letters(store: TestStore) {
    let p = &*store.provider;
    let (a, _) = two_instances_with_dead_letters(p).await;
    // The dead letter's outcome is queued for "a"; its last turn consumes it and ends.
    end(p, &a, TurnOutcome::Failed(failure(1))).await;
    store.advance(Duration::from_millis(10)).await;
    let filter = PurgeFilter {
        completed_before: provider_now(p)
            .await
            .saturating_add(Duration::from_millis(1)),
        statuses: Vec::new(),
    };
    assert_eq!(p.purge(filter).await.expect("purge"), 1);
    let left: Vec<String> = all_dead_letters(p)
        .await
        .iter()
        .map(|l| l.instance.to_string())
        .collect();
    assert_eq!(left, ["b"]);
}
