//! Creating instances: idempotency on the id, delayed starts, options.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use keel_core::{ExecutionId, InstanceId, InstanceStatus, Message, OpId, ParentLink, QueueName};
use keel_provider::{Created, OnConflict, Provider};

use crate::TestStore;
use crate::fixtures::{
    SHORT, ack_all, ack_one, assert_nothing_fetchable, assert_too_large, fetch, fetch_one, id,
    new_instance, now, oversized_payload, payload, send, signal, signal_numbers, started_event,
};

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_creation {
    ($factory:expr) => {
        $crate::__stamp!(
            $factory,
            creation,
            [
                a_new_instance_is_pending_with_its_start_queued,
                creating_an_existing_id_returns_it_unchanged,
                a_delayed_start_is_not_fetchable_until_due,
                the_options_are_stored,
                the_start_message_carries_the_instance,
                a_new_record_starts_empty,
                created_at_comes_from_the_provider_clock,
                getting_an_unknown_instance_is_not_found,
                return_existing_reports_the_stored_record,
                ids_of_the_maximum_length_work_end_to_end,
                an_input_over_the_record_limit_is_too_large_and_creates_nothing,
                creating_the_same_id_concurrently_creates_it_once,
            ]
        );
    };
}

/// A created instance is Pending and its start message is fetchable.
pub async fn a_new_instance_is_pending_with_its_start_queued(store: TestStore) {
    let p = &*store.provider;
    assert_eq!(
        p.create_instance(new_instance("a"), OnConflict::Fail)
            .await
            .unwrap(),
        Created::New
    );
    let record = p.get_instance(&new_instance("a").id).await.unwrap();
    assert_eq!(record.status, InstanceStatus::Pending);
    let work = fetch_one(p).await;
    assert_eq!(work.messages.len(), 1);
    assert!(matches!(work.messages[0].message, Message::Start { .. }));
}

/// Creating an existing id changes nothing: `ReturnExisting` reports the instance,
/// `Fail` is `AlreadyExists`.
pub async fn creating_an_existing_id_returns_it_unchanged(store: TestStore) {
    let p = &*store.provider;
    p.create_instance(new_instance("a"), OnConflict::Fail)
        .await
        .unwrap();
    let mut again = new_instance("a");
    again.name = "other".into();
    match p
        .create_instance(again.clone(), OnConflict::ReturnExisting)
        .await
        .unwrap()
    {
        Created::Existing(record) => assert_eq!(record.name, "test"),
        Created::New => panic!("an existing id was created again"),
    }
    let err = p
        .create_instance(again, OnConflict::Fail)
        .await
        .unwrap_err();
    assert!(err.is_conflict(), "{err}");
    // Still exactly one start message.
    assert_eq!(fetch(p, 10).await[0].messages.len(), 1);
}

/// A delayed start is invisible until `start_at`: the instance is Pending and nothing is
/// fetchable before; at `start_at` its start is.
pub async fn a_delayed_start_is_not_fetchable_until_due(store: TestStore) {
    let p = &*store.provider;
    let start_at = now(p).await.saturating_add(SHORT * 2);
    let mut instance = new_instance("a");
    instance.start_at = Some(start_at);
    p.create_instance(instance, OnConflict::Fail).await.unwrap();
    assert_nothing_fetchable(p, "the start is delayed").await;
    store.advance(SHORT).await;
    assert_nothing_fetchable(p, "the start is still delayed").await;
    assert_eq!(
        p.get_instance(&id("a")).await.unwrap().status,
        InstanceStatus::Pending
    );
    store.advance(SHORT).await;
    let work = fetch_one(p).await;
    assert!(matches!(work.messages[0].message, Message::Start { .. }));
}

/// The options given at creation are stored: queue, priority, tags, parent, name and
/// input read back as given.
pub async fn the_options_are_stored(store: TestStore) {
    let p = &*store.provider;
    let mut instance = new_instance("a");
    instance.name = "orders.checkout".to_owned();
    instance.input = payload(&serde_json::json!({"items": [1, 2, 3], "note": "ünï"}));
    instance.version = Some(2);
    instance.queue = QueueName::new("orchestrators-eu").unwrap();
    instance.priority = -7;
    instance.tags = BTreeMap::from([
        ("tenant".to_owned(), "acme".to_owned()),
        ("region ✓".to_owned(), "eu-west".to_owned()),
        ("empty".to_owned(), String::new()),
    ]);
    instance.parent = Some(ParentLink {
        instance: id("parent"),
        execution: ExecutionId::from_raw(3),
        op: OpId::from_raw(17),
    });
    p.create_instance(instance.clone(), OnConflict::Fail)
        .await
        .unwrap();
    let record = p.get_instance(&instance.id).await.unwrap();
    assert_eq!(record.id, instance.id);
    assert_eq!(record.name, instance.name);
    assert_eq!(record.input, instance.input);
    assert_eq!(record.queue, instance.queue);
    assert_eq!(record.priority, instance.priority);
    assert_eq!(record.tags, instance.tags);
    assert_eq!(record.parent, instance.parent);
    // The record reports the version once a turn has chosen it; the start carries the
    // requested one (see the next behaviour).
    assert!(
        record.version.is_none() || record.version == Some(2),
        "{:?}",
        record.version
    );
}

/// The start message carries the first execution, the name, the requested version, the
/// input and the parent link.
pub async fn the_start_message_carries_the_instance(store: TestStore) {
    let p = &*store.provider;
    let link = ParentLink {
        instance: id("parent"),
        execution: ExecutionId::FIRST,
        op: OpId::from_raw(2),
    };
    let mut instance = new_instance("a");
    instance.version = Some(5);
    instance.parent = Some(link.clone());
    p.create_instance(instance.clone(), OnConflict::Fail)
        .await
        .unwrap();
    let work = fetch_one(p).await;
    assert_eq!(work.lock.instance(), &instance.id);
    assert_eq!(work.name, "test");
    assert_eq!(work.execution, ExecutionId::FIRST);
    assert_eq!(work.history_len, 0);
    assert_eq!(work.history, Some(Vec::new()));
    assert_eq!(
        work.messages.iter().map(|m| &m.message).collect::<Vec<_>>(),
        [&Message::Start {
            execution: ExecutionId::FIRST,
            name: "test".to_owned(),
            version: Some(5),
            input: instance.input,
            parent: Some(link),
        }]
    );
}

/// A new instance's record is at its beginning: first execution, empty history, no
/// output, failure, custom status, reason or completion time.
pub async fn a_new_record_starts_empty(store: TestStore) {
    let p = &*store.provider;
    p.create_instance(new_instance("a"), OnConflict::Fail)
        .await
        .unwrap();
    let record = p.get_instance(&id("a")).await.unwrap();
    assert_eq!(record.status, InstanceStatus::Pending);
    assert_eq!(record.execution, ExecutionId::FIRST);
    assert_eq!(record.version, None);
    assert_eq!(record.history_len, 0);
    assert_eq!(record.output, None);
    assert_eq!(record.failure, None);
    assert_eq!(record.custom_status, None);
    assert_eq!(record.status_reason, None);
    assert_eq!(record.completed_at, None);
    assert_eq!(record.queue, QueueName::default());
    assert_eq!(record.priority, 0);
    assert!(record.tags.is_empty());
    assert_eq!(record.parent, None);
    assert!(record.updated_at >= record.created_at);
    assert_eq!(p.read_history(&id("a"), None).await.unwrap(), []);
}

/// `created_at` is the provider's time of the creation.
pub async fn created_at_comes_from_the_provider_clock(store: TestStore) {
    let p = &*store.provider;
    if store.has_manual_clock() {
        // Far from the host's time, so that a provider reading the wrong clock shows.
        store.advance(Duration::from_secs(90 * 24 * 3_600)).await;
    }
    let before = now(p).await;
    p.create_instance(new_instance("a"), OnConflict::Fail)
        .await
        .unwrap();
    let after = now(p).await;
    let record = p.get_instance(&id("a")).await.unwrap();
    assert!(
        before <= record.created_at && record.created_at <= after,
        "created at {}, between {before} and {after}",
        record.created_at
    );
    let work = fetch_one(p).await;
    let enqueued = work.messages[0].enqueued_at;
    assert!(
        before <= enqueued && enqueued <= after,
        "start enqueued at {enqueued}"
    );
}

/// Getting an unknown instance is `NotFound`.
pub async fn getting_an_unknown_instance_is_not_found(store: TestStore) {
    let p = &*store.provider;
    let err = p.get_instance(&id("ghost")).await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(!err.is_retryable(), "{err}");
    p.create_instance(new_instance("ghost-2"), OnConflict::Fail)
        .await
        .unwrap();
    assert!(
        p.get_instance(&id("ghost"))
            .await
            .unwrap_err()
            .is_not_found()
    );
}

/// `ReturnExisting` on a taken id reports the instance as stored, whatever it has become,
/// and queues nothing.
pub async fn return_existing_reports_the_stored_record(store: TestStore) {
    let p = &*store.provider;
    p.create_instance(new_instance("a"), OnConflict::Fail)
        .await
        .unwrap();
    let work = fetch_one(p).await;
    let mut ack = ack_all(&work);
    ack.version = Some(1);
    ack.events = vec![started_event(now(p).await)];
    ack_one(p, ack).await.unwrap();
    let stored = p.get_instance(&id("a")).await.unwrap();
    let mut again = new_instance("a");
    again.priority = 99;
    match p
        .create_instance(again, OnConflict::ReturnExisting)
        .await
        .unwrap()
    {
        Created::Existing(record) => assert_eq!(*record, stored),
        Created::New => panic!("an existing id was created again"),
    }
    assert_eq!(p.get_instance(&id("a")).await.unwrap(), stored);
    assert_nothing_fetchable(p, "no start was queued for the existing instance").await;
}

/// Ids of the maximum length, multi-byte characters included, work end to end: create,
/// get, fetch, ack, send and read the history.
pub async fn ids_of_the_maximum_length_work_end_to_end(store: TestStore) {
    let p = &*store.provider;
    // 'é' is 2 bytes: 127 of them and two ASCII characters make exactly 256 bytes.
    let long = format!("a{}z", "é".repeat(127));
    assert_eq!(long.len(), InstanceId::MAX_LEN);
    let id = InstanceId::new(long.clone()).unwrap();
    let sibling = InstanceId::new(format!("b{}z", "é".repeat(127))).unwrap();
    for instance in [&id, &sibling] {
        p.create_instance(
            keel_provider::NewInstance::new(
                instance.clone(),
                "test",
                payload(&serde_json::json!(1)),
            ),
            OnConflict::Fail,
        )
        .await
        .unwrap();
    }
    assert_eq!(p.get_instance(&id).await.unwrap().id, id);
    let mut work = fetch(p, 10).await;
    assert_eq!(work.len(), 2);
    work.sort_by(|a, b| a.lock.instance().cmp(b.lock.instance()));
    assert_eq!(work[0].lock.instance(), &id);
    let mut ack = ack_all(&work[0]);
    ack.events = vec![started_event(now(p).await)];
    ack_one(p, ack).await.unwrap();
    send(p, &id, signal("s", 1)).await;
    let next = fetch_one(p).await;
    assert_eq!(next.lock.instance(), &id);
    assert_eq!(signal_numbers(&next), [1]);
    assert_eq!(p.read_history(&id, None).await.unwrap().len(), 1);
    assert_eq!(p.read_history(&sibling, None).await.unwrap().len(), 0);
}

/// An input over `max_record_bytes` is `TooLarge`, naming the limit and the size, and
/// nothing is created.
pub async fn an_input_over_the_record_limit_is_too_large_and_creates_nothing(store: TestStore) {
    let p = &*store.provider;
    let limit = store.capabilities().max_record_bytes;
    let mut instance = new_instance("a");
    instance.input = oversized_payload(limit);
    let err = p
        .create_instance(instance, OnConflict::Fail)
        .await
        .unwrap_err();
    assert_too_large(&err, limit);
    assert!(p.get_instance(&id("a")).await.unwrap_err().is_not_found());
    assert_nothing_fetchable(p, "no start was queued").await;
    p.create_instance(new_instance("a"), OnConflict::Fail)
        .await
        .unwrap();
}

/// Creating one id from many tasks at once creates it once: one `New`, every other call
/// `AlreadyExists`, and a single start queued.
pub async fn creating_the_same_id_concurrently_creates_it_once(store: TestStore) {
    let mut tasks = Vec::new();
    for n in 0..8 {
        let provider: Arc<dyn Provider> = Arc::clone(&store.provider);
        tasks.push(tokio::spawn(async move {
            let mut instance = new_instance("a");
            instance.input = payload(&serde_json::json!(n));
            provider.create_instance(instance, OnConflict::Fail).await
        }));
    }
    let mut created = 0;
    for task in tasks {
        match task.await.expect("a creating task panicked") {
            Ok(Created::New) => created += 1,
            Ok(Created::Existing(_)) => panic!("Fail never returns the existing instance"),
            Err(err) => assert!(err.is_conflict(), "{err}"),
        }
    }
    assert_eq!(created, 1);
    let work = fetch_one(&*store.provider).await;
    assert_eq!(work.messages.len(), 1, "{:?}", work.messages);
}
