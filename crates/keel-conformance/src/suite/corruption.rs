//! Size limits and opaque bytes: records over `max_record_bytes` are refused with a
//! `TooLarge` error naming the limit and the size, and nothing of them is stored;
//! payloads are stored as the bytes they are, whatever those bytes hold.
//!
//! Damaged stored bytes can only be planted by a provider's own tests (the kit cannot
//! reach inside the store); here is what can be observed from outside.

use keel_core::{Codec, Format, Message, Payload};
use keel_provider::{
    ActivityCompletion, ErrorKind, NewInstance, OnConflict, QueueDepths, TurnOutcome,
};

use crate::TestStore;
use crate::fixtures::{
    ack_all, activity, assert_too_large, complete, expect_kind, fetch_instance, id, lease,
    messages_for, new_instance, oversized_payload, payload, provider_now, run_turn, running,
    schedule, signal,
};

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_corruption {
    ($factory:expr) => {
        $crate::__stamp!(
            $factory,
            corruption,
            [
                creating_an_instance_over_the_record_limit_is_too_large_and_stores_nothing,
                a_record_just_under_the_limit_is_stored_intact,
                a_child_over_the_record_limit_rejects_its_ack,
                a_continue_as_new_input_over_the_record_limit_rejects_its_ack,
                a_carried_message_over_the_record_limit_rejects_its_ack,
                a_completion_over_the_record_limit_is_too_large_and_keeps_its_lease,
                payload_bytes_are_stored_as_they_are,
            ]
        );
    };
}

/// Room a provider may take around a payload for the record's other fields.
const ENVELOPE: usize = 4096;
/// The largest payload a test allocates; providers with larger limits are tested at it.
const AFFORDABLE: usize = 64 * 1024 * 1024;

/// The record limit, or `None` (saying why) when a payload over it is too big to build.
fn limit(store: &TestStore, test: &str) -> Option<usize> {
    let limit = store.capabilities().max_record_bytes;
    if limit > AFFORDABLE {
        eprintln!(
            "SKIPPED corruption::{test}: max_record_bytes is {limit}, above the \
             {AFFORDABLE} bytes this test can afford to allocate"
        );
        return None;
    }
    Some(limit)
}

fn assert_nothing_queued(depths: &QueueDepths) {
    let mut depths = depths.clone();
    depths.activities_ready.retain(|_, n| *n > 0);
    assert_eq!(depths, QueueDepths::default(), "nothing is queued");
}

/// Creating an instance whose input is over the record limit is `TooLarge`, naming the
/// limit and the size, and stores neither the instance nor its start.
pub async fn creating_an_instance_over_the_record_limit_is_too_large_and_stores_nothing(
    store: TestStore,
) {
    let Some(limit) = limit(&store, "creating_an_instance_over_the_record_limit") else {
        return;
    };
    let p = &*store.provider;
    let mut new = new_instance("a");
    new.input = oversized_payload(limit);
    let err = p
        .create_instance(new, OnConflict::Fail)
        .await
        .expect_err("an oversized instance is refused");
    assert_too_large(&err, limit);
    expect_kind(
        p.get_instance(&id("a")).await,
        ErrorKind::NotFound,
        "a refused instance",
    );
    assert!(fetch_instance(p, &id("a")).await.is_none());
    assert_nothing_queued(&p.queue_depths().await.expect("depths"));
    // The id is still free.
    p.create_instance(new_instance("a"), OnConflict::Fail)
        .await
        .expect("the id was not taken");
}

/// A payload just under the limit (leaving room for the record around it) is stored and
/// read back intact.
pub async fn a_record_just_under_the_limit_is_stored_intact(store: TestStore) {
    let Some(limit) = limit(&store, "a_record_just_under_the_limit_is_stored_intact") else {
        return;
    };
    let p = &*store.provider;
    let size = if limit > 2 * ENVELOPE {
        limit - ENVELOPE
    } else {
        limit / 2
    };
    let mut bytes = vec![b'1'; size];
    bytes[0] = payload(&serde_json::json!(1)).as_bytes()[0];
    let big = Payload::from_bytes(bytes).expect("a JSON header");
    let mut new = new_instance("a");
    new.input = big.clone();
    p.create_instance(new, OnConflict::Fail)
        .await
        .expect("a record under the limit is stored");
    assert_eq!(p.get_instance(&id("a")).await.expect("get").input, big);
    let work = fetch_instance(p, &id("a"))
        .await
        .expect("its start is queued");
    assert!(
        matches!(&work.messages[0].message, Message::Start { input, .. } if *input == big),
        "the start carries the input intact"
    );
}

/// Runs a turn of a started instance "a" whose ack is changed by `change`, asserting it
/// is `TooLarge` and that the instance is as it was.
async fn assert_ack_refused(
    store: &TestStore,
    limit: usize,
    change: impl FnOnce(&mut keel_provider::Ack),
) {
    let p = &*store.provider;
    let a = running(p, "a").await;
    p.send_message(&a, signal("go", 1), None)
        .await
        .expect("send");
    let before = p.get_instance(&a).await.expect("get");
    let result = run_turn(p, &a, |work| {
        let mut ack = ack_all(work);
        change(&mut ack);
        ack
    })
    .await;
    let err = result.expect_err("the ack is refused");
    assert_too_large(&err, limit);
    let after = p.get_instance(&a).await.expect("get");
    assert_eq!(after.execution, before.execution, "no new execution");
    assert_eq!(after.status, before.status);
    assert_eq!(after.history_len, before.history_len);
    assert_eq!(after.input, before.input);
    expect_kind(
        p.get_instance(&id("kid")).await,
        ErrorKind::NotFound,
        "no child was created",
    );
}

/// An ack creating a child whose input is over the record limit is `TooLarge` and
/// changes nothing.
pub async fn a_child_over_the_record_limit_rejects_its_ack(store: TestStore) {
    let Some(limit) = limit(&store, "a_child_over_the_record_limit_rejects_its_ack") else {
        return;
    };
    assert_ack_refused(&store, limit, |ack| {
        ack.children = vec![NewInstance::new(
            id("kid"),
            "test",
            oversized_payload(limit),
        )];
    })
    .await;
}

/// An ack continuing as new with an input over the record limit is `TooLarge` and
/// changes nothing: the execution does not end.
pub async fn a_continue_as_new_input_over_the_record_limit_rejects_its_ack(store: TestStore) {
    let Some(limit) = limit(&store, "a_continue_as_new_input_over_the_record_limit") else {
        return;
    };
    assert_ack_refused(&store, limit, |ack| {
        ack.outcome = TurnOutcome::ContinuedAsNew {
            input: oversized_payload(limit),
            version: None,
            carried: Vec::new(),
        };
    })
    .await;
}

/// An ack continuing as new and carrying a message over the record limit is `TooLarge`
/// and changes nothing.
pub async fn a_carried_message_over_the_record_limit_rejects_its_ack(store: TestStore) {
    let Some(limit) = limit(&store, "a_carried_message_over_the_record_limit") else {
        return;
    };
    assert_ack_refused(&store, limit, |ack| {
        ack.outcome = TurnOutcome::ContinuedAsNew {
            input: payload(&serde_json::json!(2)),
            version: None,
            carried: vec![Message::Signal {
                name: "huge".to_owned(),
                payload: oversized_payload(limit),
            }],
        };
    })
    .await;
}

/// A completion whose outcome is over the record limit cannot be stored: it is
/// `TooLarge`, enqueues nothing and leaves the lease held, while the other completions
/// of the call commit.
pub async fn a_completion_over_the_record_limit_is_too_large_and_keeps_its_lease(store: TestStore) {
    let Some(limit) = limit(&store, "a_completion_over_the_record_limit") else {
        return;
    };
    let p = &*store.provider;
    let at = provider_now(p).await;
    let a = schedule(
        p,
        "a",
        vec![activity("a", 1, "w", at), activity("a", 2, "w", at)],
    )
    .await;
    let mut leased = lease(p, 10).await;
    leased.sort_by_key(|l| l.item.op);
    let small = payload(&serde_json::json!("small"));
    let results = p
        .complete_activities(vec![
            ActivityCompletion {
                lease: leased[0].lease.clone(),
                outcome: Ok(oversized_payload(limit)),
            },
            ActivityCompletion {
                lease: leased[1].lease.clone(),
                outcome: Ok(small.clone()),
            },
        ])
        .await
        .expect("the completion call succeeds");
    assert_eq!(results.len(), 2, "one result per completion");
    assert_too_large(results[0].as_ref().expect_err("refused"), limit);
    assert!(results[1].is_ok(), "{:?}", results[1]);
    let messages = messages_for(p, &a).await;
    assert_eq!(messages.len(), 1, "only the small outcome: {messages:?}");
    p.renew_lease(&leased[0].lease, crate::fixtures::LEASE)
        .await
        .expect("the refused completion left its lease held");
    complete(p, &leased[0].lease, Ok(small))
        .await
        .expect("a smaller outcome completes it");
}

/// Providers store payloads as opaque bytes: binary, compressed or even malformed
/// bodies come back exactly as given, in inputs, signals, work items and outcomes.
pub async fn payload_bytes_are_stored_as_they_are(store: TestStore) {
    let p = &*store.provider;
    let binary: Vec<u8> = (0..=255u8).chain([0, 0, 255]).collect();
    let postcard = Payload::from_bytes([&[0x02u8][..], &binary].concat()).expect("header");
    let malformed_json = Payload::from_bytes(b"\x01{\"unterminated".to_vec()).expect("header");
    let compressed = Codec::new(Format::Json)
        .encode(&"x".repeat(10_000))
        .expect("encodes");
    assert!(compressed.is_compressed(), "large JSON is compressed");

    let mut new = new_instance("a");
    new.input = postcard.clone();
    p.create_instance(new, OnConflict::Fail)
        .await
        .expect("create");
    assert_eq!(p.get_instance(&id("a")).await.expect("get").input, postcard);
    let a = id("a");
    p.send_message(
        &a,
        Message::Signal {
            name: "s".to_owned(),
            payload: malformed_json.clone(),
        },
        None,
    )
    .await
    .expect("send");
    let work = fetch_instance(p, &a).await.expect("work");
    assert!(
        matches!(&work.messages[0].message, Message::Start { input, .. } if *input == postcard)
    );
    let Message::Signal { payload: got, .. } = &work.messages[1].message else {
        panic!("expected the signal, got {:?}", work.messages[1].message);
    };
    assert_eq!(got, &malformed_json);
    p.abandon_lock(&work.lock, std::time::Duration::ZERO)
        .await
        .expect("abandon");

    let mut item = activity("a", 1, "w", provider_now(p).await);
    item.input = compressed.clone();
    schedule(p, "a", vec![item]).await;
    let leased = lease(p, 10).await.remove(0);
    assert_eq!(leased.item.input, compressed);
    complete(p, &leased.lease, Ok(postcard.clone()))
        .await
        .expect("complete");
    let outcomes: Vec<Message> = messages_for(p, &a).await;
    assert!(
        matches!(&outcomes[..], [Message::ActivityDone { outcome: Ok(o), .. }] if *o == postcard),
        "{outcomes:?}"
    );
}
