//! Sending messages to instances: who may receive them, in which order they are
//! delivered, and that they arrive exactly as sent.

use std::collections::BTreeSet;
use std::time::Duration;

use keel_core::{Codec, ExecutionId, Failure, Format, InstanceStatus, Message, OpId};
use keel_provider::{OnConflict, TurnOutcome};

use crate::TestStore;
use crate::fixtures::{
    SHORT, ack_all, ack_one, assert_nothing_fetchable, assert_too_large, fetch, fetch_one, id,
    new_instance, now, oversized_payload, payload, send, signal, signal_numbers, started,
};

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_messages {
    ($factory:expr) => {
        $crate::__stamp!(
            $factory,
            messages,
            [
                sending_to_an_unknown_instance_is_not_found_and_stores_nothing,
                messages_are_delivered_in_enqueue_order,
                later_messages_follow_the_start,
                one_fetch_returns_every_visible_message,
                a_delayed_message_is_invisible_until_due,
                messages_sent_during_a_turn_stay_queued_after_its_ack,
                consumed_messages_are_not_delivered_again,
                signals_and_cancels_arrive_intact,
                results_arrive_intact,
                enqueued_at_is_the_provider_time_of_the_send,
                messages_of_two_instances_are_kept_apart,
                a_message_over_the_record_limit_is_too_large_and_stores_nothing,
                messages_to_a_paused_instance_are_kept,
                a_finished_instance_still_accepts_messages,
            ]
        );
    };
}

/// Sending to an unknown instance is `NotFound`, and nothing is stored: an instance
/// created later with that id sees only its own start.
pub async fn sending_to_an_unknown_instance_is_not_found_and_stores_nothing(store: TestStore) {
    let p = &*store.provider;
    let err = p
        .send_message(&id("ghost"), signal("early", 1), None)
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");
    let err = p
        .send_message(
            &id("ghost"),
            signal("later", 2),
            Some(now(p).await.saturating_add(SHORT)),
        )
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(
        p.get_instance(&id("ghost"))
            .await
            .unwrap_err()
            .is_not_found()
    );

    p.create_instance(new_instance("ghost"), OnConflict::Fail)
        .await
        .unwrap();
    store.advance(SHORT + Duration::from_millis(100)).await;
    let work = fetch_one(p).await;
    assert_eq!(work.messages.len(), 1, "{:?}", work.messages);
    assert!(matches!(work.messages[0].message, Message::Start { .. }));
}

/// Messages of one instance are delivered in the order they were enqueued.
pub async fn messages_are_delivered_in_enqueue_order(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let order = [3, 1, 4, 1, 5, 9, 2, 6];
    for n in order {
        send(p, &a, signal("s", n)).await;
    }
    let work = fetch_one(p).await;
    assert_eq!(signal_numbers(&work), order);
    let ids: Vec<_> = work.messages.iter().map(|m| m.id).collect();
    let distinct: BTreeSet<_> = ids.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        ids.len(),
        "message ids are distinct: {ids:?}"
    );
    let times: Vec<_> = work.messages.iter().map(|m| m.enqueued_at).collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "oldest first: {times:?}"
    );
}

/// An instance's start comes before the messages sent to it after its creation.
pub async fn later_messages_follow_the_start(store: TestStore) {
    let p = &*store.provider;
    p.create_instance(new_instance("a"), OnConflict::Fail)
        .await
        .unwrap();
    send(p, &id("a"), signal("s", 1)).await;
    send(p, &id("a"), signal("s", 2)).await;
    let work = fetch_one(p).await;
    assert_eq!(work.messages.len(), 3);
    assert!(
        matches!(work.messages[0].message, Message::Start { .. }),
        "{:?}",
        work.messages[0]
    );
    assert_eq!(signal_numbers(&work), [1, 2]);
}

/// One fetch returns every visible message of an instance, under one lock, however many
/// there are; acking them all leaves nothing to fetch.
pub async fn one_fetch_returns_every_visible_message(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    for n in 0..150 {
        send(p, &a, signal("s", n)).await;
    }
    let work = fetch_one(p).await;
    assert_eq!(signal_numbers(&work), (0..150).collect::<Vec<_>>());
    ack_one(p, ack_all(&work)).await.unwrap();
    assert_nothing_fetchable(p, "every message was consumed").await;
}

/// A message sent with `visible_at` is invisible until then, and delivered after.
pub async fn a_delayed_message_is_invisible_until_due(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let due = now(p).await.saturating_add(SHORT * 2);
    p.send_message(&a, signal("late", 7), Some(due))
        .await
        .unwrap();
    assert_nothing_fetchable(p, "the message is not due").await;
    store.advance(SHORT).await;
    assert_nothing_fetchable(p, "the message is still not due").await;
    store.advance(SHORT + Duration::from_millis(100)).await;
    let work = fetch_one(p).await;
    assert_eq!(signal_numbers(&work), [7]);
}

/// Messages sent while an instance is locked are not part of the turn in flight: its ack
/// leaves them queued, and the next fetch delivers them.
pub async fn messages_sent_during_a_turn_stay_queued_after_its_ack(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    send(p, &a, signal("s", 1)).await;
    let work = fetch_one(p).await;
    assert_eq!(signal_numbers(&work), [1]);
    send(p, &a, signal("s", 2)).await;
    send(p, &a, signal("s", 3)).await;
    assert!(
        fetch(p, 10).await.is_empty(),
        "the instance is still locked"
    );
    ack_one(p, ack_all(&work)).await.unwrap();
    let next = fetch_one(p).await;
    assert_eq!(signal_numbers(&next), [2, 3]);
}

/// A consumed message is deleted: it is not delivered again, while new messages are.
pub async fn consumed_messages_are_not_delivered_again(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    send(p, &a, signal("s", 1)).await;
    let work = fetch_one(p).await;
    ack_one(p, ack_all(&work)).await.unwrap();
    assert_nothing_fetchable(p, "the signal was consumed").await;
    send(p, &a, signal("s", 2)).await;
    let next = fetch_one(p).await;
    assert_eq!(signal_numbers(&next), [2]);
    assert!(
        next.messages
            .iter()
            .all(|m| !work.messages.iter().any(|w| w.id == m.id)),
        "a consumed message id came back"
    );
}

/// Signals and cancels arrive exactly as sent: names, reasons and payload bytes,
/// whatever the payload's format or compression.
pub async fn signals_and_cancels_arrive_intact(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let big: Vec<String> = (0..400).map(|i| format!("line {i} ✓")).collect();
    let compressed = Codec::default().encode(&big).unwrap();
    assert!(
        compressed.is_compressed(),
        "the test means a compressed payload"
    );
    let postcard = Codec::new(Format::Postcard)
        .encode(&(42_u64, "ünïcødé", vec![0_u8, 255, 0]))
        .unwrap();
    let sent = vec![
        Message::Signal {
            name: "approve ✓ \u{1F600}".to_owned(),
            payload: payload(&serde_json::json!({"by": "ann", "n": [1, 2.5, null, "\"q\""]})),
        },
        Message::Signal {
            name: "packed".to_owned(),
            payload: postcard.clone(),
        },
        Message::Signal {
            name: "big".to_owned(),
            payload: compressed.clone(),
        },
        Message::Cancel {
            reason: "operator: stop \"now\" ⛔".to_owned(),
        },
    ];
    for message in &sent {
        send(p, &a, message.clone()).await;
    }
    let work = fetch_one(p).await;
    let got: Vec<Message> = work.messages.iter().map(|m| m.message.clone()).collect();
    assert_eq!(got, sent);
    let Message::Signal { payload, .. } = &got[1] else {
        panic!("not a signal: {:?}", got[1]);
    };
    assert_eq!(payload.as_bytes(), postcard.as_bytes());
    let Message::Signal { payload, .. } = &got[2] else {
        panic!("not a signal: {:?}", got[2]);
    };
    assert_eq!(payload.as_bytes(), compressed.as_bytes());
    assert_eq!(
        Codec::default().decode::<Vec<String>>(payload).unwrap(),
        big
    );
}

/// Activity, timer and child results arrive exactly as sent, failures with their whole
/// chain and data.
pub async fn results_arrive_intact(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let failure = Failure::new("PaymentDeclined", "card refused")
        .with_cause("bank said no")
        .with_cause("insufficient funds")
        .retryable(false)
        .with_data(payload(&serde_json::json!({"code": 51})));
    let sent = vec![
        Message::ActivityDone {
            execution: ExecutionId::FIRST,
            op: OpId::from_raw(1),
            outcome: Ok(payload(&serde_json::json!("charged"))),
        },
        Message::ActivityDone {
            execution: ExecutionId::FIRST,
            op: OpId::from_raw(2),
            outcome: Err(failure.clone()),
        },
        Message::TimerFired {
            execution: ExecutionId::FIRST,
            op: OpId::from_raw(u64::MAX),
        },
        Message::ChildDone {
            execution: ExecutionId::from_raw(7),
            op: OpId::from_raw(4),
            outcome: Err(failure),
        },
        Message::ChildDone {
            execution: ExecutionId::FIRST,
            op: OpId::from_raw(5),
            outcome: Ok(payload(&serde_json::json!({"child": true}))),
        },
    ];
    for message in &sent {
        send(p, &a, message.clone()).await;
    }
    let work = fetch_one(p).await;
    let got: Vec<Message> = work.messages.into_iter().map(|m| m.message).collect();
    assert_eq!(got, sent);
}

/// A message's `enqueued_at` is the provider's time when it was sent.
pub async fn enqueued_at_is_the_provider_time_of_the_send(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    if store.has_manual_clock() {
        // Far from the host's time, so that a provider reading the wrong clock shows.
        store.advance(Duration::from_secs(40 * 24 * 3600)).await;
    }
    let before = now(p).await;
    send(p, &a, signal("s", 1)).await;
    let after = now(p).await;
    let work = fetch_one(p).await;
    let at = work.messages[0].enqueued_at;
    assert!(
        before <= at && at <= after,
        "enqueued at {at}, sent between {before} and {after}"
    );
}

/// Each instance receives only its own messages.
pub async fn messages_of_two_instances_are_kept_apart(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let b = started(p, "b").await;
    send(p, &a, signal("s", 1)).await;
    send(p, &b, signal("s", 10)).await;
    send(p, &a, signal("s", 2)).await;
    send(p, &b, signal("s", 20)).await;
    let work = fetch(p, 10).await;
    assert_eq!(work.len(), 2);
    for w in &work {
        let expected: &[i64] = if w.lock.instance() == &a {
            &[1, 2]
        } else {
            assert_eq!(w.lock.instance(), &b);
            &[10, 20]
        };
        assert_eq!(signal_numbers(w), expected, "{}", w.lock.instance());
    }
}

/// A message over `max_record_bytes` is `TooLarge`, naming the limit and the size, and
/// nothing is stored.
pub async fn a_message_over_the_record_limit_is_too_large_and_stores_nothing(store: TestStore) {
    let p = &*store.provider;
    let limit = store.capabilities().max_record_bytes;
    let a = started(p, "a").await;
    let err = p
        .send_message(
            &a,
            Message::Signal {
                name: "huge".to_owned(),
                payload: oversized_payload(limit),
            },
            None,
        )
        .await
        .unwrap_err();
    assert_too_large(&err, limit);
    assert_nothing_fetchable(p, "the oversized message was not stored").await;
}

/// A paused instance still accepts messages, and keeps them for when it is resumed.
pub async fn messages_to_a_paused_instance_are_kept(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    p.pause(&a).await.unwrap();
    send(p, &a, signal("s", 1)).await;
    send(p, &a, signal("s", 2)).await;
    assert_nothing_fetchable(p, "the instance is paused").await;
    p.resume(&a).await.unwrap();
    let work = fetch_one(p).await;
    assert_eq!(signal_numbers(&work), [1, 2]);
}

/// A finished instance still accepts messages, and its next turn drains them.
pub async fn a_finished_instance_still_accepts_messages(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    send(p, &a, signal("s", 1)).await;
    let work = fetch_one(p).await;
    let mut ack = ack_all(&work);
    ack.outcome = TurnOutcome::Completed(payload(&serde_json::json!("done")));
    ack_one(p, ack).await.unwrap();
    assert_eq!(
        p.get_instance(&a).await.unwrap().status,
        InstanceStatus::Completed
    );
    send(p, &a, signal("late", 2)).await;
    let drain = fetch_one(p).await;
    assert_eq!(drain.lock.instance(), &a);
    assert_eq!(signal_numbers(&drain), [2]);
    ack_one(p, ack_all(&drain)).await.unwrap();
    assert_nothing_fetchable(p, "the late signal was drained").await;
    assert_eq!(
        p.get_instance(&a).await.unwrap().status,
        InstanceStatus::Completed,
        "draining does not revive it"
    );
}
