//! Executions: continue-as-new ends one execution and starts the next with a fresh
//! history, its start message first and the carried messages after it.

use keel_core::{
    Event, EventKind, ExecutionId, InstanceId, InstanceStatus, Message, OpId, ParentLink, Payload,
};
use keel_provider::{NewInstance, OnConflict, OutgoingMessage, Provider, TurnOutcome};

use crate::TestStore;
use crate::fixtures::{
    PAST_SHORT, SHORT, ack_all, ack_one, event, fetch, fetch_for, fetch_one, id, marker,
    new_instance, now, payload, send, signal, started, started_event,
};

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_executions {
    ($factory:expr) => {
        $crate::__stamp!(
            $factory,
            executions,
            [
                continue_as_new_starts_the_next_execution,
                the_next_execution_has_a_fresh_history,
                the_old_execution_keeps_its_history_and_the_acks_events,
                the_start_comes_first_then_the_carried_messages_in_order,
                the_start_carries_the_next_version,
                the_next_execution_records_its_own_turns,
                executions_chain_and_each_history_stays_readable,
                a_continued_child_keeps_its_parent,
                the_continuing_turns_messages_are_delivered,
                a_rejected_continue_as_new_starts_nothing,
                reading_an_unknown_execution_or_instance_is_not_found,
            ]
        );
    };
}

/// Input `{"round": round}`.
fn round(round: u32) -> Payload {
    payload(&serde_json::json!({ "round": round }))
}

/// Runs a turn of `instance` (after sending it a signal) that appends `events` and
/// ends the execution with continue-as-new to `input`, carrying `carried`. Returns the
/// events the old execution was given, the `ContinuedAsNew` event last.
async fn continue_as_new(
    p: &dyn Provider,
    instance: &InstanceId,
    input: Payload,
    version: Option<u32>,
    carried: Vec<Message>,
) -> Vec<Event> {
    send(p, instance, signal("turn", 0)).await;
    let work = fetch_one(p).await;
    assert_eq!(work.lock.instance(), instance);
    let at = now(p).await;
    let events = vec![
        marker(at, 1, 7),
        event(
            at,
            EventKind::ContinuedAsNew {
                input: input.clone(),
            },
        ),
    ];
    let mut ack = ack_all(&work);
    ack.events = events.clone();
    ack.outcome = TurnOutcome::ContinuedAsNew {
        input,
        version,
        carried,
    };
    ack_one(p, ack)
        .await
        .expect("the continue-as-new turn acks");
    events
}

/// Continue-as-new moves the instance to the next execution with the new input: it is
/// Running again, not finished, with an empty current history.
pub async fn continue_as_new_starts_the_next_execution(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    continue_as_new(p, &a, round(2), None, Vec::new()).await;
    let record = p.get_instance(&a).await.unwrap();
    assert_eq!(record.execution, ExecutionId::FIRST.next());
    assert_eq!(record.input, round(2));
    assert_eq!(record.status, InstanceStatus::Running);
    assert_eq!(record.history_len, 0);
    assert_eq!(record.output, None);
    assert_eq!(record.completed_at, None);
}

/// The next execution's history starts empty: `read_history` of the current execution
/// and the next fetch show none of the old events.
pub async fn the_next_execution_has_a_fresh_history(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    continue_as_new(p, &a, round(2), None, Vec::new()).await;
    assert_eq!(p.read_history(&a, None).await.unwrap(), []);
    let work = fetch_one(p).await;
    assert_eq!(work.execution, ExecutionId::FIRST.next());
    assert_eq!(work.history_len, 0);
    assert_eq!(work.history, Some(Vec::new()));
}

/// The continuing ack's events, `ContinuedAsNew` included, are appended to the old
/// execution's history, which stays readable by its id.
pub async fn the_old_execution_keeps_its_history_and_the_acks_events(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let mut expected = p.read_history(&a, None).await.unwrap();
    expected.extend(continue_as_new(p, &a, round(2), None, Vec::new()).await);
    assert_eq!(
        p.read_history(&a, Some(ExecutionId::FIRST)).await.unwrap(),
        expected
    );
}

/// The next execution's start message comes first, then the carried messages in the
/// order given; the consumed messages of the old execution are gone.
pub async fn the_start_comes_first_then_the_carried_messages_in_order(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let carried = vec![
        signal("kept", 1),
        Message::Cancel {
            reason: "stop".to_owned(),
        },
        signal("kept", 2),
    ];
    continue_as_new(p, &a, round(2), None, carried.clone()).await;
    let work = fetch_one(p).await;
    let got: Vec<Message> = work.messages.into_iter().map(|m| m.message).collect();
    let mut expected = vec![Message::Start {
        execution: ExecutionId::FIRST.next(),
        name: "test".to_owned(),
        version: None,
        input: round(2),
        parent: None,
    }];
    expected.extend(carried);
    assert_eq!(got, expected);
}

/// The next execution's start carries the version the continuing turn chose.
pub async fn the_start_carries_the_next_version(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    continue_as_new(p, &a, round(2), Some(4), Vec::new()).await;
    let work = fetch_one(p).await;
    match &work.messages[0].message {
        Message::Start {
            execution, version, ..
        } => {
            assert_eq!(*execution, ExecutionId::FIRST.next());
            assert_eq!(*version, Some(4));
        }
        other => panic!("expected the start, got {other:?}"),
    }
}

/// Turns of the next execution append to its own history, leaving the old one as it
/// was.
pub async fn the_next_execution_records_its_own_turns(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    continue_as_new(p, &a, round(2), None, Vec::new()).await;
    let old = p.read_history(&a, Some(ExecutionId::FIRST)).await.unwrap();
    let work = fetch_one(p).await;
    let at = now(p).await;
    let mine = vec![started_event(at), marker(at, 1, 2)];
    let mut ack = ack_all(&work);
    ack.events = mine.clone();
    ack_one(p, ack).await.unwrap();
    assert_eq!(p.read_history(&a, None).await.unwrap(), mine);
    assert_eq!(
        p.read_history(&a, Some(ExecutionId::FIRST.next()))
            .await
            .unwrap(),
        mine
    );
    assert_eq!(
        p.read_history(&a, Some(ExecutionId::FIRST)).await.unwrap(),
        old
    );
    let record = p.get_instance(&a).await.unwrap();
    assert_eq!(record.history_len, 2);
    assert_eq!(record.execution, ExecutionId::FIRST.next());
}

/// Executions chain: each continue-as-new starts one more, and every execution's
/// history stays readable by its id.
pub async fn executions_chain_and_each_history_stays_readable(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let mut histories = vec![p.read_history(&a, None).await.unwrap()];
    for n in 2..=4 {
        let last = histories.last_mut().unwrap();
        last.extend(continue_as_new(p, &a, round(n), None, Vec::new()).await);
        let work = fetch_one(p).await;
        assert_eq!(work.execution, ExecutionId::from_raw(n));
        let mine = vec![started_event(now(p).await)];
        let mut ack = ack_all(&work);
        ack.events = mine.clone();
        ack_one(p, ack).await.unwrap();
        histories.push(mine);
    }
    for (n, expected) in (1..).zip(&histories) {
        assert_eq!(
            &p.read_history(&a, Some(ExecutionId::from_raw(n)))
                .await
                .unwrap(),
            expected,
            "execution {n}"
        );
    }
    let record = p.get_instance(&a).await.unwrap();
    assert_eq!(record.execution, ExecutionId::from_raw(4));
    assert_eq!(record.input, round(4));
}

/// A child that continues as new stays a child: the instance keeps its parent and the
/// next start carries it.
pub async fn a_continued_child_keeps_its_parent(store: TestStore) {
    let p = &*store.provider;
    let link = ParentLink {
        instance: id("parent"),
        execution: ExecutionId::FIRST,
        op: OpId::from_raw(3),
    };
    let mut kid: NewInstance = new_instance("kid");
    kid.parent = Some(link.clone());
    p.create_instance(kid, OnConflict::Fail).await.unwrap();
    let work = fetch_one(p).await;
    let mut ack = ack_all(&work);
    ack.events = vec![started_event(now(p).await)];
    ack_one(p, ack).await.unwrap();
    continue_as_new(p, &id("kid"), round(2), None, Vec::new()).await;
    assert_eq!(
        p.get_instance(&id("kid")).await.unwrap().parent,
        Some(link.clone())
    );
    let work = fetch_one(p).await;
    match &work.messages[0].message {
        Message::Start { parent, .. } => assert_eq!(parent.as_ref(), Some(&link)),
        other => panic!("expected the start, got {other:?}"),
    }
}

/// The rest of a continuing ack commits with it: its messages to other instances are
/// delivered.
pub async fn the_continuing_turns_messages_are_delivered(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    let b = started(p, "b").await;
    send(p, &a, signal("turn", 0)).await;
    let work = fetch_one(p).await;
    let mut ack = ack_all(&work);
    ack.messages = vec![OutgoingMessage {
        to: b.clone(),
        message: signal("from-a", 3),
        visible_at: None,
    }];
    ack.outcome = TurnOutcome::ContinuedAsNew {
        input: round(2),
        version: None,
        carried: Vec::new(),
    };
    ack_one(p, ack).await.unwrap();
    let work = fetch(p, 10).await;
    assert_eq!(work.len(), 2, "a's next start and b's signal");
    let to_b = work.iter().find(|w| w.lock.instance() == &b).unwrap();
    assert_eq!(to_b.messages.len(), 1);
    assert_eq!(to_b.messages[0].message, signal("from-a", 3));
}

/// A continue-as-new ack that is rejected (its lock expired) starts nothing: the
/// execution, its history and its messages stay as they were.
pub async fn a_rejected_continue_as_new_starts_nothing(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    send(p, &a, signal("turn", 0)).await;
    let work = fetch_for(p, 10, SHORT).await;
    store.advance(PAST_SHORT).await;
    let mut ack = ack_all(&work[0]);
    ack.outcome = TurnOutcome::ContinuedAsNew {
        input: round(2),
        version: None,
        carried: vec![signal("kept", 1)],
    };
    let err = ack_one(p, ack).await.unwrap_err();
    assert!(err.is_stale(), "{err}");
    let record = p.get_instance(&a).await.unwrap();
    assert_eq!(record.execution, ExecutionId::FIRST);
    assert_eq!(record.history_len, 1);
    assert!(
        p.read_history(&a, Some(ExecutionId::FIRST.next()))
            .await
            .unwrap_err()
            .is_not_found()
    );
    let again = fetch_one(p).await;
    assert_eq!(
        again.messages, work[0].messages,
        "the signal is still queued, and no start or carried message was added"
    );
}

/// Reading the history of an execution that never ran, or of an unknown instance, is
/// `NotFound`.
pub async fn reading_an_unknown_execution_or_instance_is_not_found(store: TestStore) {
    let p = &*store.provider;
    let a = started(p, "a").await;
    for execution in [ExecutionId::FIRST.next(), ExecutionId::from_raw(99)] {
        let err = p.read_history(&a, Some(execution)).await.unwrap_err();
        assert!(err.is_not_found(), "execution {execution}: {err}");
    }
    for execution in [None, Some(ExecutionId::FIRST)] {
        let err = p.read_history(&id("ghost"), execution).await.unwrap_err();
        assert!(err.is_not_found(), "{execution:?}: {err}");
    }
    continue_as_new(p, &a, round(2), None, Vec::new()).await;
    assert!(
        p.read_history(&a, Some(ExecutionId::from_raw(3)))
            .await
            .unwrap_err()
            .is_not_found()
    );
    assert!(p.read_history(&a, Some(ExecutionId::FIRST)).await.is_ok());
}
