//! Purging finished instances and deleting instances with their descendants, with
//! everything stored for them.

use std::time::Duration;

use keel_core::{Failure, InstanceId, InstanceStatus, Message, OpId, ParentLink, Timestamp};
use keel_provider::{ErrorKind, OutgoingMessage, Provider, PurgeFilter, QueueDepths, TurnOutcome};

use crate::TestStore;
use crate::fixtures::{
    FIRST, ack_all, activity, create, end, ended, expect_kind, fetch_instance, id, lease,
    new_instance, poke, provider_now, run_turn, running, schedule, signal,
};

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_purging {
    ($factory:expr) => {
        $crate::__stamp!(
            $factory,
            purging,
            [
                purge_removes_only_instances_that_ended_before_the_cutoff,
                purge_deletes_history_messages_and_work_items,
                purge_with_statuses_removes_only_those,
                delete_instance_removes_it_and_its_descendants,
                deleting_a_child_leaves_its_parent,
                delete_instance_removes_its_messages_and_work_items,
                deleting_an_unknown_instance_is_not_found,
            ]
        );
    };
}

async fn exists(p: &dyn Provider, instance: &str) -> bool {
    match p.get_instance(&id(instance)).await {
        Ok(_) => true,
        Err(err) if err.is_not_found() => false,
        Err(err) => panic!("get_instance {instance}: {err}"),
    }
}

/// Sets up, in order: "c1" completed and "f1" failed (before the cutoff), "r1" running,
/// "p1" pending, then after the cutoff "c2" completed. Returns the cutoff.
async fn mixed_ages(store: &TestStore) -> Timestamp {
    let p = &*store.provider;
    let c1 = create(p, new_instance("c1")).await;
    end(p, &c1, ended("c1")).await;
    let f1 = create(p, new_instance("f1")).await;
    end(p, &f1, TurnOutcome::Failed(Failure::new("Boom", "failed"))).await;
    running(p, "r1").await;
    create(p, new_instance("p1")).await;
    store.advance(Duration::from_millis(50)).await;
    let cutoff = provider_now(p).await;
    store.advance(Duration::from_millis(50)).await;
    let c2 = create(p, new_instance("c2")).await;
    end(p, &c2, ended("c2")).await;
    cutoff
}

/// Purge deletes only instances that ended before the cutoff, and returns how many.
pub async fn purge_removes_only_instances_that_ended_before_the_cutoff(store: TestStore) {
    let cutoff = mixed_ages(&store).await;
    let p = &*store.provider;
    let filter = PurgeFilter {
        completed_before: cutoff,
        statuses: Vec::new(),
    };
    assert_eq!(p.purge(filter.clone()).await.expect("purge"), 2);
    for (instance, kept) in [
        ("c1", false),
        ("f1", false),
        ("r1", true),
        ("p1", true),
        ("c2", true),
    ] {
        assert_eq!(exists(p, instance).await, kept, "{instance}");
    }
    assert_eq!(p.purge(filter).await.expect("purge"), 0, "nothing left");
}

/// Purge with statuses deletes only ended instances of those statuses.
pub async fn purge_with_statuses_removes_only_those(store: TestStore) {
    let cutoff = mixed_ages(&store).await;
    let p = &*store.provider;
    let filter = PurgeFilter {
        completed_before: cutoff,
        statuses: vec![InstanceStatus::Failed],
    };
    assert_eq!(p.purge(filter).await.expect("purge"), 1);
    assert!(!exists(p, "f1").await);
    assert!(exists(p, "c1").await);
}

/// Zero everywhere, dead letters included.
fn assert_nothing_queued(depths: &QueueDepths) {
    let mut depths = depths.clone();
    depths.activities_ready.retain(|_, n| *n > 0);
    assert_eq!(depths, QueueDepths::default(), "nothing is left queued");
}

/// Schedules an item and a delayed timer message for `instance`, then ends it.
async fn ended_with_leftovers(p: &dyn Provider, instance: &str) -> InstanceId {
    let at = provider_now(p).await;
    let a = schedule(p, instance, vec![activity(instance, 1, "work", at)]).await;
    poke(p, &a).await;
    run_turn(p, &a, |work| {
        let mut ack = ack_all(work);
        ack.messages = vec![OutgoingMessage {
            to: a.clone(),
            message: Message::TimerFired {
                execution: FIRST,
                op: OpId::from_raw(2),
            },
            visible_at: Some(at.saturating_add(Duration::from_secs(3_600))),
        }];
        ack.outcome = ended(instance);
        ack
    })
    .await
    .expect("ack");
    a
}

/// Purging an instance deletes its history, messages and work items too.
pub async fn purge_deletes_history_messages_and_work_items(store: TestStore) {
    let p = &*store.provider;
    let a = ended_with_leftovers(p, "a").await;
    store.advance(Duration::from_millis(10)).await;
    let filter = PurgeFilter {
        completed_before: provider_now(p)
            .await
            .saturating_add(Duration::from_millis(1)),
        statuses: Vec::new(),
    };
    assert_eq!(p.purge(filter).await.expect("purge"), 1);
    expect_kind(
        p.read_history(&a, None).await,
        ErrorKind::NotFound,
        "a purged history",
    );
    assert!(lease(p, 10).await.is_empty(), "its work item is gone");
    assert_nothing_queued(&p.queue_depths().await.expect("depths"));
}

/// Creates "p" with children "c1" and "c2", and "c1" with child "g"; all running.
async fn family(p: &dyn Provider) {
    let parent = running(p, "p").await;
    let child = |name: &str, of: &InstanceId, op: u64| {
        let mut new = new_instance(name);
        new.parent = Some(ParentLink {
            instance: of.clone(),
            execution: FIRST,
            op: OpId::from_raw(op),
        });
        new
    };
    poke(p, &parent).await;
    let children = vec![child("c1", &parent, 1), child("c2", &parent, 2)];
    run_turn(p, &parent, |work| {
        let mut ack = ack_all(work);
        ack.children = children;
        ack
    })
    .await
    .expect("the parent's turn acks");
    let c1 = id("c1");
    let grandchild = vec![child("g", &c1, 1)];
    run_turn(p, &c1, |work| {
        let mut ack = ack_all(work);
        ack.children = grandchild;
        ack
    })
    .await
    .expect("the child's turn acks");
}

/// Deleting an instance deletes its children and their children, whatever their
/// status, and returns how many it deleted.
pub async fn delete_instance_removes_it_and_its_descendants(store: TestStore) {
    let p = &*store.provider;
    family(p).await;
    running(p, "u").await;
    assert_eq!(p.delete_instance(&id("p")).await.expect("delete"), 4);
    for gone in ["p", "c1", "c2", "g"] {
        assert!(!exists(p, gone).await, "{gone} was deleted");
        expect_kind(
            p.read_history(&id(gone), None).await,
            ErrorKind::NotFound,
            gone,
        );
    }
    assert!(exists(p, "u").await, "an unrelated instance stays");
    assert_nothing_queued(&p.queue_depths().await.expect("depths"));
}

/// Deleting a child deletes it and its own children, not its parent or siblings.
pub async fn deleting_a_child_leaves_its_parent(store: TestStore) {
    let p = &*store.provider;
    family(p).await;
    assert_eq!(p.delete_instance(&id("c1")).await.expect("delete"), 2);
    for (instance, kept) in [("p", true), ("c1", false), ("c2", true), ("g", false)] {
        assert_eq!(exists(p, instance).await, kept, "{instance}");
    }
}

/// Deleting an instance deletes its messages and work items.
pub async fn delete_instance_removes_its_messages_and_work_items(store: TestStore) {
    let p = &*store.provider;
    let at = provider_now(p).await;
    let a = schedule(
        p,
        "a",
        vec![activity("a", 1, "w", at), activity("a", 2, "w", at)],
    )
    .await;
    lease(p, 1).await;
    poke(p, &a).await;
    p.send_message(
        &a,
        signal("later", 1),
        Some(at.saturating_add(Duration::from_secs(60))),
    )
    .await
    .expect("send");
    assert_eq!(p.delete_instance(&a).await.expect("delete"), 1);
    assert!(lease(p, 10).await.is_empty(), "its work items are gone");
    assert!(
        fetch_instance(p, &a).await.is_none(),
        "its messages are gone"
    );
    assert_nothing_queued(&p.queue_depths().await.expect("depths"));
}

/// Deleting an unknown instance is `NotFound`.
pub async fn deleting_an_unknown_instance_is_not_found(store: TestStore) {
    expect_kind(
        store.provider.delete_instance(&id("ghost")).await,
        ErrorKind::NotFound,
        "an unknown instance",
    );
}
