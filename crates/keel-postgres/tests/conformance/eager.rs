//! Eager dispatch where the kit cannot see: what a worker takes in its own commit wakes
//! no other process, while what it leaves does; a completion's locks and concurrent
//! fetches never hold one instance twice, nor does a completion that a turn overtakes
//! hand out what the turn consumed; a completion sets aside an instance whose
//! messages do not decode, as a fetch does; leases on ack follow ack order across a
//! batch.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use keel_conformance::fixtures::{
    LEASE, LOCK, ack_all, activity, fetch_instance, id, payload, provider_now, running, schedule,
    scheduling_ack, signal,
};
use keel_core::{InstanceStatus, QueueName};
use keel_postgres::PostgresProvider;
use keel_provider::{
    ActivityCompletion, FetchActivities, FetchOrchestrations, LeasedWorkItem, OrchestrationWork,
    Provider, WorkKind,
};

use crate::{DropSchema, fresh_schema, options, url};

/// A provider that polls rarely, so that a quick wake-up can only be a notification.
async fn quiet(schema: &str) -> Arc<PostgresProvider> {
    Arc::new(
        PostgresProvider::connect(
            &url(),
            options(schema).poll_interval(Duration::from_secs(60)),
        )
        .await
        .unwrap(),
    )
}

/// How long `waiter` waits for work of `kind` (at most `timeout`) while `act` happens
/// 100 ms into the wait.
async fn wait_while<A: Future<Output = ()>>(
    waiter: &Arc<PostgresProvider>,
    kind: WorkKind,
    timeout: Duration,
    act: A,
) -> Duration {
    let w = Arc::clone(waiter);
    let started = tokio::time::Instant::now();
    let wait = tokio::spawn(async move { w.wait_for_work(kind, timeout).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    act.await;
    wait.await.unwrap().unwrap();
    started.elapsed()
}

fn default_queue(max_items: usize) -> FetchActivities {
    FetchActivities {
        queues: vec![QueueName::default()],
        max_items,
        lease_for: LEASE,
    }
}

fn outcome(leased: &LeasedWorkItem) -> ActivityCompletion {
    ActivityCompletion {
        lease: leased.lease.clone(),
        outcome: Ok(payload(&serde_json::json!("done"))),
    }
}

fn locking(max_instances: usize) -> FetchOrchestrations {
    FetchOrchestrations {
        max_instances,
        lock_for: LOCK,
        with_history: false,
    }
}

/// Runs a turn of `instance` (signalled, so that it has one) that schedules ops
/// `ops`, committed with `ack_turns_leasing` under `lease`.
async fn ack_leasing(
    p: &PostgresProvider,
    instance: &str,
    ops: std::ops::RangeInclusive<u64>,
    lease: FetchActivities,
) -> Vec<LeasedWorkItem> {
    let instance_id = id(instance);
    p.send_message(&instance_id, signal("go", 0), None)
        .await
        .unwrap();
    let work = fetch_instance(p, &instance_id).await.unwrap();
    let at = provider_now(p).await;
    let items = ops.map(|op| activity(instance, op, "step", at)).collect();
    let acked = p
        .ack_turns_leasing(vec![scheduling_ack(&work, at, items)], lease)
        .await
        .unwrap();
    acked.results[0].as_ref().unwrap();
    acked.leased
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_worker_takes_in_its_commit_wakes_no_one_and_what_it_leaves_does() {
    let schema = fresh_schema();
    let _drop = DropSchema(schema.clone());
    let waiter = quiet(&schema).await;
    let worker = quiet(&schema).await;
    let quick = Duration::from_secs(3);
    let unwoken = Duration::from_millis(950);
    running(&*worker, "a").await;
    running(&*worker, "b").await;

    // An ack whose items are all leased to the acking worker.
    assert!(
        waiter
            .fetch_activities(default_queue(10))
            .await
            .unwrap()
            .is_empty()
    );
    let mut leased = Vec::new();
    let took = wait_while(
        &waiter,
        WorkKind::Activities,
        Duration::from_secs(1),
        async {
            leased = ack_leasing(&worker, "a", 1..=2, default_queue(10)).await;
        },
    )
    .await;
    assert_eq!(leased.len(), 2);
    assert!(
        took >= unwoken,
        "items leased on ack woke a waiter after {took:?}"
    );

    // One whose items are not all leased.
    let took = wait_while(&waiter, WorkKind::Activities, quick, async {
        let more = ack_leasing(&worker, "b", 1..=2, default_queue(1)).await;
        assert_eq!(more.len(), 1);
        leased.extend(more);
    })
    .await;
    assert!(took < quick, "a queued item wakes a waiter, took {took:?}");
    assert_eq!(
        waiter
            .fetch_activities(default_queue(10))
            .await
            .unwrap()
            .len(),
        1
    );

    // A completion that locks the instance it tells.
    assert!(
        waiter
            .fetch_orchestrations(locking(10))
            .await
            .unwrap()
            .is_empty(),
        "nothing to run yet"
    );
    let took = wait_while(
        &waiter,
        WorkKind::Orchestrations,
        Duration::from_secs(1),
        async {
            let done = worker
                .complete_activities_locking(vec![outcome(&leased[0])], locking(10))
                .await
                .unwrap();
            assert_eq!(done.locked.len(), 1, "a is locked for the worker");
        },
    )
    .await;
    assert!(
        took >= unwoken,
        "a turn locked on completion woke a waiter after {took:?}"
    );

    // One that cannot lock the instance it tells: b is held by another fetch.
    worker
        .send_message(&id("b"), signal("s", 1), None)
        .await
        .unwrap();
    let held = fetch_instance(&*worker, &id("b")).await.unwrap();
    assert!(
        waiter
            .fetch_orchestrations(locking(10))
            .await
            .unwrap()
            .is_empty()
    );
    let took = wait_while(&waiter, WorkKind::Orchestrations, quick, async {
        let done = worker
            .complete_activities_locking(vec![outcome(&leased[2])], locking(10))
            .await
            .unwrap();
        assert!(done.locked.is_empty(), "b is held elsewhere");
    })
    .await;
    assert!(
        took < quick,
        "an outcome left to fetches wakes a waiter, took {took:?}"
    );
    worker
        .abandon_lock(&held.lock, Duration::ZERO)
        .await
        .unwrap();
    waiter.close().await;
    worker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_that_lock_and_concurrent_fetches_never_hold_one_instance_twice() {
    let schema = fresh_schema();
    let _drop = DropSchema(schema.clone());
    let mut all = Vec::new();
    for _ in 0..3 {
        all.push(Arc::new(
            PostgresProvider::connect(&url(), options(&schema))
                .await
                .unwrap(),
        ));
    }
    let p = &*all[0];
    let instances: Vec<String> = (0..60).map(|i| format!("i{i:02}")).collect();
    for instance in &instances {
        let at = provider_now(p).await;
        schedule(p, instance, vec![activity(instance, 1, "step", at)]).await;
    }
    let mut leased = Vec::new();
    while leased.len() < instances.len() {
        let got = p.fetch_activities(default_queue(100)).await.unwrap();
        assert!(!got.is_empty(), "every scheduled item is leased");
        leased.extend(got);
    }

    // Two providers complete in batches of four, locking what they tell; the third and
    // the first fetch meanwhile.
    let mut completers = Vec::new();
    for (n, batches) in leased.chunks(30).enumerate() {
        let p = Arc::clone(&all[n + 1]);
        let batches: Vec<Vec<ActivityCompletion>> = batches
            .chunks(4)
            .map(|batch| batch.iter().map(outcome).collect())
            .collect();
        completers.push(tokio::spawn(async move {
            let mut locked = Vec::new();
            for batch in batches {
                let done = p
                    .complete_activities_locking(batch, locking(10))
                    .await
                    .unwrap();
                assert!(done.results.iter().all(Result::is_ok));
                locked.extend(done.locked);
            }
            locked
        }));
    }
    let mut fetchers = Vec::new();
    for p in [&all[0], &all[2]] {
        let p = Arc::clone(p);
        fetchers.push(tokio::spawn(async move {
            let mut fetched = Vec::new();
            for _ in 0..40 {
                fetched.extend(p.fetch_orchestrations(locking(3)).await.unwrap());
                tokio::task::yield_now().await;
            }
            fetched
        }));
    }
    let mut held: Vec<OrchestrationWork> = Vec::new();
    for task in completers.into_iter().chain(fetchers) {
        held.extend(task.await.unwrap());
    }
    // What nobody took yet is left to a last fetch.
    loop {
        let rest = p.fetch_orchestrations(locking(100)).await.unwrap();
        if rest.is_empty() {
            break;
        }
        held.extend(rest);
    }
    let mut seen = HashSet::new();
    for work in &held {
        let instance = work.lock.instance().as_str().to_owned();
        assert_eq!(work.messages.len(), 1, "{instance}: its outcome, once");
        assert!(seen.insert(instance.clone()), "{instance} was held twice");
    }
    assert_eq!(seen.len(), instances.len(), "every instance was held once");
    for p in &all {
        p.close().await;
    }
}

/// A connection of its own, outside any provider, in `schema`.
async fn admin(schema: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(&format!("SET search_path TO \"{schema}\""))
        .await
        .unwrap();
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_that_a_turn_overtakes_does_not_hand_out_what_the_turn_consumed() {
    let schema = fresh_schema();
    let _drop = DropSchema(schema.clone());
    let p = Arc::new(
        PostgresProvider::connect(&url(), options(&schema))
            .await
            .unwrap(),
    );
    let at = provider_now(&*p).await;
    schedule(&*p, "a", vec![activity("a", 1, "step", at)]).await;
    let leased = p.fetch_activities(default_queue(10)).await.unwrap();
    p.send_message(&id("a"), signal("s", 1), None)
        .await
        .unwrap();
    // Another transaction holds the item's row: the completion's statement takes its
    // snapshot (a is free, with its signal), then waits for it.
    let mut admin = admin(&schema).await;
    let holder = admin.transaction().await.unwrap();
    holder
        .execute(
            "SELECT 1 FROM work_items WHERE id = $1 FOR UPDATE",
            &[&i64::try_from(leased[0].lease.item()).unwrap()],
        )
        .await
        .unwrap();
    let completer = Arc::clone(&p);
    let completion = outcome(&leased[0]);
    let completing = tokio::spawn(async move {
        completer
            .complete_activities_locking(vec![completion], locking(10))
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Meanwhile a turn of a runs: fetched, it consumes the signal and releases a.
    let turn = fetch_instance(&*p, &id("a")).await.unwrap();
    assert_eq!(turn.messages.len(), 1, "the signal");
    p.ack_turns(vec![ack_all(&turn)]).await.unwrap()[0]
        .as_ref()
        .unwrap();
    holder.commit().await.unwrap();
    let done = completing.await.unwrap();
    done.results[0].as_ref().unwrap();
    let mut held = done.locked;
    held.extend(p.fetch_orchestrations(locking(10)).await.unwrap());
    assert_eq!(
        held.len(),
        1,
        "a is held once, by the completion or a fetch"
    );
    let told: Vec<&keel_core::Message> = held[0].messages.iter().map(|m| &m.message).collect();
    assert!(
        matches!(told.as_slice(), [keel_core::Message::ActivityDone { .. }]),
        "only the outcome, not the signal the turn consumed: {told:?}"
    );
    p.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_on_ack_follow_ack_order_across_a_batch_and_skip_rejected_acks() {
    let schema = fresh_schema();
    let _drop = DropSchema(schema.clone());
    let p = PostgresProvider::connect(&url(), options(&schema))
        .await
        .unwrap();
    let mut acks = Vec::new();
    for instance in ["a", "b", "c"] {
        running(&p, instance).await;
        p.send_message(&id(instance), signal("go", 0), None)
            .await
            .unwrap();
    }
    let at = provider_now(&p).await;
    for instance in ["c", "b", "a"] {
        let work = fetch_instance(&p, &id(instance)).await.unwrap();
        let items = (1..=2)
            .map(|op| activity(instance, op, "step", at))
            .collect();
        acks.push(scheduling_ack(&work, at, items));
    }
    // b's lock is taken over: its ack is rejected, and leases nothing.
    acks[1].lock = keel_provider::LockToken::new(id("b"), acks[1].lock.token() + 1_000_000);
    let acked = p.ack_turns_leasing(acks, default_queue(3)).await.unwrap();
    assert!(acked.results[0].is_ok() && acked.results[2].is_ok());
    assert!(acked.results[1].is_err());
    let leased: Vec<(String, u64)> = acked
        .leased
        .iter()
        .map(|l| (l.item.instance.as_str().to_owned(), l.item.op.get()))
        .collect();
    assert_eq!(
        leased,
        [
            ("c".to_owned(), 1),
            ("c".to_owned(), 2),
            ("a".to_owned(), 1)
        ],
        "in ack order, up to max_items, none of the rejected ack"
    );
    let rest = p.fetch_activities(default_queue(10)).await.unwrap();
    let rest: Vec<(String, u64)> = rest
        .iter()
        .map(|l| (l.item.instance.as_str().to_owned(), l.item.op.get()))
        .collect();
    assert_eq!(rest, [("a".to_owned(), 2)], "the rest is queued");
    p.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_sets_aside_an_instance_whose_messages_do_not_decode() {
    let schema = fresh_schema();
    let _drop = DropSchema(schema.clone());
    let p = PostgresProvider::connect(&url(), options(&schema))
        .await
        .unwrap();
    let at = provider_now(&p).await;
    schedule(&p, "a", vec![activity("a", 1, "step", at)]).await;
    schedule(&p, "b", vec![activity("b", 1, "step", at)]).await;
    let leased = p.fetch_activities(default_queue(10)).await.unwrap();
    assert_eq!(leased.len(), 2);
    // Bytes no record decodes, queued for a.
    admin(&schema)
        .await
        .batch_execute(
            "INSERT INTO messages (instance, priority, visible_at, enqueued_at, body) \
             VALUES ('a', 0, 0, 0, '\\xffffffff'::bytea)",
        )
        .await
        .unwrap();
    let done = p
        .complete_activities_locking(leased.iter().map(outcome).collect(), locking(10))
        .await
        .unwrap();
    assert!(
        done.results.iter().all(Result::is_ok),
        "both outcomes commit"
    );
    let locked: Vec<&str> = done
        .locked
        .iter()
        .map(|w| w.lock.instance().as_str())
        .collect();
    assert_eq!(locked, ["b"], "a is set aside, b is handed out");
    let a = p.get_instance(&id("a")).await.unwrap();
    assert_eq!(a.status, InstanceStatus::Suspended);
    let reason = a.status_reason.unwrap_or_default();
    assert!(
        reason.contains("message"),
        "the reason names the record: {reason}"
    );
    assert!(
        p.fetch_orchestrations(locking(10))
            .await
            .unwrap()
            .is_empty(),
        "a stays aside, its messages kept"
    );
    p.close().await;
}
