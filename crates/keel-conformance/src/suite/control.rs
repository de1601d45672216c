//! Control: pausing and resuming instances, and resuming suspended ones.

use keel_core::{Event, EventKind, Failure, InstanceId, InstanceStatus, Message, OpId, SideEffect};
use keel_provider::{Ack, ErrorKind, OnConflict, Provider, TurnOutcome};

use crate::TestStore;
use crate::fixtures::{
    ack_all, activity, complete, end, expect_kind, fetch_instance, id, lease, new_instance,
    payload, provider_now, running, schedule, signal,
};

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_control {
    ($factory:expr) => {
        $crate::__stamp!(
            $factory,
            control,
            [
                a_paused_instance_keeps_accepting_messages_but_is_not_fetched,
                resuming_a_paused_instance_makes_its_messages_fetchable,
                pausing_a_pending_instance_holds_back_its_start,
                pausing_leaves_other_instances_fetchable,
                a_paused_instance_still_receives_activity_outcomes,
                a_turn_in_flight_may_still_ack_and_the_instance_stays_paused,
                pausing_an_ended_instance_is_invalid_input,
                resuming_an_instance_neither_paused_nor_suspended_is_invalid_input,
                pausing_or_resuming_an_unknown_instance_is_not_found,
                resuming_a_suspended_instance_clears_the_suspension_and_its_reason,
            ]
        );
    };
}

async fn status(p: &dyn Provider, instance: &InstanceId) -> InstanceStatus {
    p.get_instance(instance).await.expect("get_instance").status
}

async fn send(p: &dyn Provider, instance: &InstanceId, n: i64) {
    p.send_message(instance, signal("s", n), None)
        .await
        .expect("send succeeds");
}

/// A paused instance keeps its messages and accepts new ones, but is not fetched.
pub async fn a_paused_instance_keeps_accepting_messages_but_is_not_fetched(store: TestStore) {
    let p = &*store.provider;
    let a = running(p, "a").await;
    send(p, &a, 1).await;
    p.pause(&a)
        .await
        .expect("pausing a running instance succeeds");
    assert_eq!(status(p, &a).await, InstanceStatus::Paused);
    send(p, &a, 2).await;
    assert!(
        fetch_instance(p, &a).await.is_none(),
        "a paused instance is not fetched"
    );
}

/// Resuming a paused instance makes its kept messages fetchable again, in order.
pub async fn resuming_a_paused_instance_makes_its_messages_fetchable(store: TestStore) {
    let p = &*store.provider;
    let a = running(p, "a").await;
    send(p, &a, 1).await;
    p.pause(&a).await.expect("pause");
    send(p, &a, 2).await;
    p.resume(&a)
        .await
        .expect("resuming a paused instance succeeds");
    assert_eq!(status(p, &a).await, InstanceStatus::Running);
    let work = fetch_instance(p, &a).await.expect("fetchable after resume");
    let messages: Vec<Message> = work.messages.into_iter().map(|m| m.message).collect();
    assert_eq!(messages, [signal("s", 1), signal("s", 2)]);
}

/// Pausing an instance before its first turn holds back its start until it resumes.
pub async fn pausing_a_pending_instance_holds_back_its_start(store: TestStore) {
    let p = &*store.provider;
    let a = id("a");
    p.create_instance(new_instance("a"), OnConflict::Fail)
        .await
        .expect("create");
    p.pause(&a)
        .await
        .expect("pausing a pending instance succeeds");
    assert!(
        fetch_instance(p, &a).await.is_none(),
        "the start is held back"
    );
    p.resume(&a).await.expect("resume");
    let work = fetch_instance(p, &a).await.expect("fetchable after resume");
    assert!(matches!(work.messages[0].message, Message::Start { .. }));
}

/// Pausing one instance leaves the others fetchable.
pub async fn pausing_leaves_other_instances_fetchable(store: TestStore) {
    let p = &*store.provider;
    let a = running(p, "a").await;
    let b = running(p, "b").await;
    send(p, &a, 1).await;
    send(p, &b, 1).await;
    p.pause(&a).await.expect("pause");
    let work = crate::fixtures::fetch(p, 10).await;
    let ids: Vec<&InstanceId> = work.iter().map(|w| w.lock.instance()).collect();
    assert_eq!(ids, [&b]);
}

/// A paused instance's running activities still complete, and their outcomes wait for
/// it to resume.
pub async fn a_paused_instance_still_receives_activity_outcomes(store: TestStore) {
    let p = &*store.provider;
    let at = provider_now(p).await;
    let a = schedule(p, "a", vec![activity("a", 1, "work", at)]).await;
    let leased = lease(p, 10).await.remove(0);
    p.pause(&a).await.expect("pause");
    let out = payload(&serde_json::json!("done"));
    complete(p, &leased.lease, Ok(out.clone()))
        .await
        .expect("completing an activity of a paused instance succeeds");
    assert!(fetch_instance(p, &a).await.is_none(), "still paused");
    p.resume(&a).await.expect("resume");
    let work = fetch_instance(p, &a).await.expect("the outcome waited");
    assert!(matches!(
        &work.messages[0].message,
        Message::ActivityDone { outcome: Ok(o), .. } if *o == out
    ));
}

/// A turn in flight when the instance is paused may still ack; the instance stays
/// paused.
pub async fn a_turn_in_flight_may_still_ack_and_the_instance_stays_paused(store: TestStore) {
    let p = &*store.provider;
    let a = running(p, "a").await;
    send(p, &a, 1).await;
    let work = fetch_instance(p, &a).await.expect("fetch");
    p.pause(&a)
        .await
        .expect("pausing a locked instance succeeds");
    let mut ack: Ack = ack_all(&work);
    ack.events = vec![Event {
        at: provider_now(p).await,
        kind: EventKind::SideEffectRecorded {
            op: OpId::from_raw(1),
            value: SideEffect::Random(7),
        },
    }];
    let results = p.ack_turns(vec![ack]).await.expect("ack call");
    results[0].as_ref().expect("the turn in flight acks");
    let record = p.get_instance(&a).await.expect("get");
    assert_eq!(record.status, InstanceStatus::Paused, "it stays paused");
    assert_eq!(
        record.history_len,
        work.history_len + 1,
        "the turn committed"
    );
    send(p, &a, 2).await;
    assert!(fetch_instance(p, &a).await.is_none(), "still paused");
}

/// Pausing an instance that has ended is `InvalidInput`, and changes nothing.
pub async fn pausing_an_ended_instance_is_invalid_input(store: TestStore) {
    let p = &*store.provider;
    let ended = [
        (
            "done",
            TurnOutcome::Completed(payload(&serde_json::json!(1))),
        ),
        (
            "failed",
            TurnOutcome::Failed(Failure::new("Boom", "failed")),
        ),
        (
            "cancelled",
            TurnOutcome::Cancelled(Failure::new(Failure::CANCELLED, "cancelled")),
        ),
    ];
    for (name, outcome) in ended {
        let instance = id(name);
        p.create_instance(new_instance(name), OnConflict::Fail)
            .await
            .expect("create");
        end(p, &instance, outcome).await;
        let before = status(p, &instance).await;
        assert!(before.is_terminal(), "{name} ended: {before:?}");
        expect_kind(
            p.pause(&instance).await,
            ErrorKind::InvalidInput,
            &format!("pausing {name}"),
        );
        assert_eq!(status(p, &instance).await, before, "{name} unchanged");
    }
}

/// Resuming an instance that is neither paused nor suspended is `InvalidInput`.
pub async fn resuming_an_instance_neither_paused_nor_suspended_is_invalid_input(store: TestStore) {
    let p = &*store.provider;
    let a = running(p, "a").await;
    expect_kind(
        p.resume(&a).await,
        ErrorKind::InvalidInput,
        "resuming a running instance",
    );
    assert_eq!(status(p, &a).await, InstanceStatus::Running);
    p.pause(&a).await.expect("pause");
    p.resume(&a).await.expect("resume");
    expect_kind(
        p.resume(&a).await,
        ErrorKind::InvalidInput,
        "resuming twice",
    );
}

/// Pausing or resuming an unknown instance is `NotFound`.
pub async fn pausing_or_resuming_an_unknown_instance_is_not_found(store: TestStore) {
    let p = &*store.provider;
    let ghost = id("ghost");
    expect_kind(p.pause(&ghost).await, ErrorKind::NotFound, "pause");
    expect_kind(p.resume(&ghost).await, ErrorKind::NotFound, "resume");
}

/// Resuming a suspended instance clears the suspension and its reason; the messages it
/// kept, and those sent meanwhile, are fetchable again.
pub async fn resuming_a_suspended_instance_clears_the_suspension_and_its_reason(store: TestStore) {
    let p = &*store.provider;
    let a = running(p, "a").await;
    send(p, &a, 1).await;
    let work = fetch_instance(p, &a).await.expect("fetch");
    let reason = "nondeterminism: expected activity \"x\", found timer";
    p.suspend(&work.lock, reason).await.expect("suspend");
    let record = p.get_instance(&a).await.expect("get");
    assert_eq!(record.status, InstanceStatus::Suspended);
    assert_eq!(record.status_reason.as_deref(), Some(reason));
    send(p, &a, 2).await;
    assert!(fetch_instance(p, &a).await.is_none(), "suspended");

    p.resume(&a)
        .await
        .expect("resuming a suspended instance succeeds");
    let record = p.get_instance(&a).await.expect("get");
    assert!(
        !matches!(
            record.status,
            InstanceStatus::Suspended | InstanceStatus::Paused
        ),
        "resumed, yet {:?}",
        record.status
    );
    assert_eq!(record.status_reason, None, "the reason is cleared");
    let work = fetch_instance(p, &a).await.expect("fetchable after resume");
    let messages: Vec<Message> = work.messages.into_iter().map(|m| m.message).collect();
    assert_eq!(messages, [signal("s", 1), signal("s", 2)]);
}
