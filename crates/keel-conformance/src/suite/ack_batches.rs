//! A call's acks, each committed or rejected alone: stale, expired and oversized acks
//! change nothing while the others of the batch commit; results come one per ack, in
//! order; a full batch commits in one call.

use std::collections::BTreeSet;
use std::time::Duration;

use keel_core::{EventKind, InstanceStatus, Message};
use keel_provider::{
    Ack, CustomStatusUpdate, ErrorKind, OnConflict, OrchestrationWork, OutgoingMessage, TurnOutcome,
};

use crate::TestStore;
use crate::fixtures::{
    PAST_SHORT, SHORT, ack_all, ack_one, assert_nothing_fetchable, assert_too_large, create, event,
    fetch, fetch_activities, fetch_for, fetch_one, id, marker, new_instance, next_turn, now,
    oversized_payload, payload, send, signal, signal_numbers, started, started_event, turn,
    work_item,
};

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_ack_batches {
    ($factory:expr) => {
        $crate::__stamp!(
            $factory,
            ack_batches,
            [
                a_stale_ack_changes_nothing_while_the_others_commit,
                an_ack_with_an_expired_lock_is_rejected,
                acking_twice_with_one_lock_is_stale,
                an_oversized_ack_changes_nothing_while_the_others_commit,
                a_work_item_over_the_record_limit_is_too_large,
                an_outgoing_message_over_the_record_limit_is_too_large,
                a_history_over_its_event_limit_is_too_large,
                results_come_one_per_ack_in_order,
                max_batch_acks_commit_in_one_call,
            ]
        );
    };
}

/// An ack whose lock was taken over is `Stale` and changes nothing (no events, work
/// items, messages, children or status; its messages stay), while the other acks of the
/// same call commit.
pub async fn a_stale_ack_changes_nothing_while_the_others_commit(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let b = started(p, "b").await;
    send(p, &a, signal("s", 1)).await;
    let old = fetch_for(p, 10, SHORT).await;
    assert_eq!(old.len(), 1);
    store.advance(PAST_SHORT).await;
    send(p, &b, signal("s", 2)).await;
    let current = fetch(p, 10).await;
    assert_eq!(current.len(), 2, "a (taken over) and b");
    let new_a = current.iter().find(|w| w.lock.instance() == &a).unwrap();
    let b_work = current.iter().find(|w| w.lock.instance() == &b).unwrap();

    let at = now(p).await;
    let mut stale = ack_all(&old[0]);
    stale.events = vec![marker(at, 1, 1)];
    stale.activities = vec![work_item(&a, 1, "job", at)];
    stale.messages = vec![OutgoingMessage {
        to: b.clone(),
        message: signal("from-a", 9),
        visible_at: None,
    }];
    stale.children = vec![new_instance("a-kid")];
    stale.custom_status = CustomStatusUpdate::Set(payload(&serde_json::json!("x")));
    stale.outcome = TurnOutcome::Completed(payload(&serde_json::json!("x")));
    let mut good = ack_all(b_work);
    good.events = vec![marker(at, 1, 2)];
    good.activities = vec![work_item(&b, 1, "job", at)];
    let results = p.ack_turns(vec![stale, good]).await.unwrap();
    assert_eq!(results.len(), 2);
    let err = results[0].as_ref().unwrap_err();
    assert!(err.is_stale(), "{err}");
    assert!(results[1].is_ok(), "{:?}", results[1]);

    assert_eq!(p.read_history(&a, None).await.unwrap().len(), 1);
    assert_eq!(p.read_history(&b, None).await.unwrap().len(), 2);
    let record = p.get_instance(&a).await.unwrap();
    assert_eq!(record.status, InstanceStatus::Running);
    assert_eq!(record.custom_status, None);
    assert_eq!(record.output, None);
    assert!(
        p.get_instance(&id("a-kid"))
            .await
            .unwrap_err()
            .is_not_found()
    );
    let leased = fetch_activities(p, 10).await;
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].item.instance, b);
    // b got no message from a, and a still has its signal.
    assert_nothing_fetchable(p, "a is held by its new holder, b has nothing").await;
    p.abandon_lock(&new_a.lock, Duration::ZERO).await.unwrap();
    assert_eq!(signal_numbers(&fetch_one(p).await), [1]);
}

/// An ack whose lock expired is rejected as `Stale` even if no one took the instance
/// over, and changes nothing.
pub async fn an_ack_with_an_expired_lock_is_rejected(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    send(p, &a, signal("s", 1)).await;
    let work = fetch_for(p, 10, SHORT).await;
    store.advance(PAST_SHORT).await;
    let mut ack = ack_all(&work[0]);
    ack.events = vec![marker(now(p).await, 1, 1)];
    ack.outcome = TurnOutcome::Completed(payload(&serde_json::json!(1)));
    let err = ack_one(p, ack).await.unwrap_err();
    assert!(err.is_stale(), "{err}");
    assert_eq!(p.read_history(&a, None).await.unwrap().len(), 1);
    assert_eq!(
        p.get_instance(&a).await.unwrap().status,
        InstanceStatus::Running
    );
    assert_eq!(signal_numbers(&fetch_one(p).await), [1]);
}

/// A lock serves one ack: acking again with it is `Stale`, and its events are recorded
/// once.
pub async fn acking_twice_with_one_lock_is_stale(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let work = next_turn(p, &a).await;
    let mut ack = ack_all(&work);
    ack.events = vec![marker(now(p).await, 1, 1)];
    ack_one(p, ack.clone()).await.unwrap();
    let err = ack_one(p, ack.clone()).await.unwrap_err();
    assert!(err.is_stale(), "{err}");
    let results = p.ack_turns(vec![ack.clone(), ack]).await.unwrap();
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().is_err_and(|e| e.is_stale()))
    );
    assert_eq!(p.read_history(&a, None).await.unwrap().len(), 2);
}

/// Atomicity: an ack with a record over `max_record_bytes` is `TooLarge` (naming the
/// limit and the size) and leaves no partial state — no events, work items, messages or
/// children, its messages not consumed, its status unchanged and its lock still held —
/// while the acks before and after it in the call commit.
pub async fn an_oversized_ack_changes_nothing_while_the_others_commit(store: TestStore) {
    let p = &*store.provider;
    let limit = store.capabilities().max_record_bytes;
    for name in ["a", "b", "c"] {
        p.create_instance(new_instance(name), OnConflict::Fail)
            .await
            .unwrap();
    }
    let mut work = fetch(p, 10).await;
    assert_eq!(work.len(), 3);
    work.sort_by(|x, y| x.lock.instance().cmp(y.lock.instance()));
    let at = now(p).await;
    let acks: Vec<Ack> = work
        .iter()
        .map(|w| {
            let me = w.lock.instance().clone();
            let mut ack = ack_all(w);
            ack.version = Some(1);
            ack.events = vec![started_event(at), marker(at, 1, 1)];
            ack.activities = vec![work_item(&me, 2, "job", at)];
            ack.messages = vec![OutgoingMessage {
                to: me.clone(),
                message: signal("self", 1),
                visible_at: None,
            }];
            ack.children = vec![new_instance(&format!("{me}-kid"))];
            ack.custom_status = CustomStatusUpdate::Set(payload(&serde_json::json!("busy")));
            if me.as_str() == "b" {
                ack.events.push(event(
                    at,
                    EventKind::SignalReceived {
                        name: "huge".to_owned(),
                        payload: oversized_payload(limit),
                    },
                ));
                ack.events.push(marker(at, 3, 3));
            }
            ack
        })
        .collect();
    let results = p.ack_turns(acks).await.unwrap();
    assert_eq!(results.len(), 3, "one result per ack");
    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert_too_large(results[1].as_ref().unwrap_err(), limit);
    assert!(results[2].is_ok(), "{:?}", results[2]);

    let b = id("b");
    assert_eq!(p.read_history(&b, None).await.unwrap(), []);
    let record = p.get_instance(&b).await.unwrap();
    assert_eq!(record.status, InstanceStatus::Pending);
    assert_eq!(record.custom_status, None);
    assert_eq!(record.history_len, 0);
    assert!(
        p.get_instance(&id("b-kid"))
            .await
            .unwrap_err()
            .is_not_found()
    );
    for other in ["a", "c"] {
        assert_eq!(p.read_history(&id(other), None).await.unwrap().len(), 2);
    }
    let leased = fetch_activities(p, 10).await;
    let owners: BTreeSet<_> = leased.iter().map(|l| l.item.instance.clone()).collect();
    assert_eq!(owners, BTreeSet::from([id("a"), id("c")]));
    let fetched: BTreeSet<_> = fetch(p, 10)
        .await
        .into_iter()
        .map(|w| w.lock.instance().clone())
        .collect();
    let expected = BTreeSet::from([id("a"), id("c"), id("a-kid"), id("c-kid")]);
    assert_eq!(fetched, expected, "b is still locked and sent nothing");

    // The lock is still b's: a smaller ack with it commits, consuming nothing.
    let mut retry = Ack::new(work[1].lock.clone(), Vec::new());
    retry.events = vec![started_event(at)];
    ack_one(p, retry).await.unwrap();
    let again = fetch_one(p).await;
    assert_eq!(again.lock.instance(), &b);
    assert_eq!(
        again.messages, work[1].messages,
        "b's start is still queued, alone"
    );
}

/// An ack scheduling a work item over `max_record_bytes` is `TooLarge` and changes
/// nothing.
pub async fn a_work_item_over_the_record_limit_is_too_large(store: TestStore) {
    let p = &*store.provider;
    let limit = store.capabilities().max_record_bytes;
    let a = started(p, "a").await;
    let work = next_turn(p, &a).await;
    let at = now(p).await;
    let mut huge = work_item(&a, 2, "job", at);
    huge.input = oversized_payload(limit);
    let mut ack = ack_all(&work);
    ack.events = vec![marker(at, 1, 1)];
    ack.activities = vec![work_item(&a, 1, "job", at), huge];
    assert_too_large(&ack_one(p, ack).await.unwrap_err(), limit);
    assert_eq!(p.read_history(&a, None).await.unwrap().len(), 1);
    assert!(fetch_activities(p, 10).await.is_empty());
}

/// An ack sending a message over `max_record_bytes` is `TooLarge` and changes nothing.
pub async fn an_outgoing_message_over_the_record_limit_is_too_large(store: TestStore) {
    let p = &*store.provider;
    let limit = store.capabilities().max_record_bytes;
    let a = started(p, "a").await;
    let b = started(p, "b").await;
    let work = next_turn(p, &a).await;
    let mut ack = ack_all(&work);
    ack.events = vec![marker(now(p).await, 1, 1)];
    ack.messages = vec![
        OutgoingMessage {
            to: b.clone(),
            message: signal("small", 1),
            visible_at: None,
        },
        OutgoingMessage {
            to: b.clone(),
            message: Message::Signal {
                name: "huge".to_owned(),
                payload: oversized_payload(limit),
            },
            visible_at: None,
        },
    ];
    assert_too_large(&ack_one(p, ack).await.unwrap_err(), limit);
    assert_eq!(p.read_history(&a, None).await.unwrap().len(), 1);
    assert_nothing_fetchable(p, "b got nothing, and a is still locked").await;
}

/// An ack that would take the history past `max_history_events` is `TooLarge` (naming
/// the limit) and changes nothing. Where the limit is small enough to fill, a history
/// filled to exactly the limit commits first.
pub async fn a_history_over_its_event_limit_is_too_large(store: TestStore) {
    // Filling a history to the limit costs time in proportion to it; one ack of as many
    // events, rejected, costs only memory.
    const FILLABLE: u64 = 20_000;
    const BUILDABLE: u64 = 2_000_000;
    let p = &*store.provider;
    let limit = store.capabilities().max_history_events;
    if limit > BUILDABLE {
        eprintln!(
            "SKIPPED ack_batches::a_history_over_its_event_limit_is_too_large: max_history_events \
             is {limit}, above the {BUILDABLE} events this test can build"
        );
        return;
    }
    let a = started(p, "a").await;
    let at = now(p).await;
    // The history holds 1 event.
    let mut len = 1;
    if limit <= FILLABLE {
        let fill: Vec<_> = (1..limit).map(|op| marker(at, op, op)).collect();
        turn(p, &a, |ack| ack.events = fill).await;
        len = limit;
        assert_eq!(p.get_instance(&a).await.unwrap().history_len, limit);
    }
    // One more than the limit allows.
    let over: Vec<_> = (len..=limit).map(|op| marker(at, op, 0)).collect();
    let work = next_turn(p, &a).await;
    let mut ack = ack_all(&work);
    ack.events = over;
    ack.custom_status = CustomStatusUpdate::Set(payload(&serde_json::json!("full")));
    let err = ack_one(p, ack).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TooLarge, "{err}");
    assert!(err.message().contains(&limit.to_string()), "{err}");
    let record = p.get_instance(&a).await.unwrap();
    assert_eq!(record.history_len, len);
    assert_eq!(record.custom_status, None);
}

/// A call returns one result per ack, in the order given; an empty call returns none.
pub async fn results_come_one_per_ack_in_order(store: TestStore) {
    let p = &*store.provider;
    assert!(p.ack_turns(Vec::new()).await.unwrap().is_empty());
    for name in ["a", "b", "c", "d"] {
        p.create_instance(new_instance(name), OnConflict::Fail)
            .await
            .unwrap();
    }
    let old = fetch_for(p, 10, SHORT).await;
    store.advance(PAST_SHORT).await;
    let new = fetch(p, 10).await;
    assert_eq!((old.len(), new.len()), (4, 4));
    let by_name = |works: &[OrchestrationWork], name: &str| {
        works
            .iter()
            .find(|w| w.lock.instance().as_str() == name)
            .map(ack_all)
            .unwrap()
    };
    let at = now(p).await;
    let mut acks = vec![
        by_name(&new, "c"),
        by_name(&old, "a"),
        by_name(&new, "b"),
        by_name(&old, "d"),
        by_name(&new, "a"),
    ];
    for ack in &mut acks {
        ack.events = vec![started_event(at)];
    }
    let results = p.ack_turns(acks).await.unwrap();
    let shape: Vec<&str> = results
        .iter()
        .map(|r| match r {
            Ok(()) => "ok",
            Err(e) if e.is_stale() => "stale",
            Err(_) => "other",
        })
        .collect();
    assert_eq!(shape, ["ok", "stale", "ok", "stale", "ok"], "{results:?}");
    for (name, len) in [("a", 1), ("b", 1), ("c", 1), ("d", 0)] {
        assert_eq!(
            p.read_history(&id(name), None).await.unwrap().len(),
            len,
            "{name}"
        );
    }
}

/// Group commit: `max_batch` acks in one call all commit, each atomically.
pub async fn max_batch_acks_commit_in_one_call(store: TestStore) {
    let p = &*store.provider;
    let caps = store.capabilities();
    let n = caps.max_batch;
    for i in 0..n {
        create(p, new_instance(&format!("i{i:05}"))).await;
    }
    let mut work = Vec::new();
    while work.len() < n {
        let batch = fetch(p, caps.max_fetch_instances.min(n - work.len())).await;
        assert!(!batch.is_empty(), "only {} of {n} fetched", work.len());
        work.extend(batch);
    }
    let at = now(p).await;
    let acks: Vec<Ack> = work
        .iter()
        .map(|w| {
            let mut ack = ack_all(w);
            ack.events = vec![started_event(at), marker(at, 1, 1)];
            ack.activities = vec![work_item(w.lock.instance(), 2, "job", at)];
            ack
        })
        .collect();
    let results = p.ack_turns(acks).await.unwrap();
    assert_eq!(results.len(), n);
    for (w, result) in work.iter().zip(&results) {
        assert!(result.is_ok(), "{}: {result:?}", w.lock.instance());
    }
    for w in &work {
        let record = p.get_instance(w.lock.instance()).await.unwrap();
        assert_eq!(record.history_len, 2, "{}", w.lock.instance());
    }
    let mut leased = 0;
    // Bounded: a provider handing out items twice must fail the test, not hang it.
    for _ in 0..=n {
        let items = fetch_activities(p, caps.max_fetch_items).await;
        if items.is_empty() {
            break;
        }
        leased += items.len();
    }
    assert_eq!(leased, n, "one work item per ack");
    assert_nothing_fetchable(p, "every start was consumed").await;
}
