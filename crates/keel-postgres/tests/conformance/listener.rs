//! The listener: notifications cross processes (here, providers with pools of their
//! own), stay within their schema, and survive the listener's connection being
//! terminated.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_conformance::fixtures::{ack_all, fetch, new_instance};
use keel_postgres::PostgresProvider;
use keel_provider::{OnConflict, Provider, TurnOutcome, WorkKind};

use crate::{DropSchema, fresh_schema, options, url};

/// A provider that polls rarely, so that a quick wake-up can only be a notification.
async fn quiet(schema: &str) -> PostgresProvider {
    PostgresProvider::connect(
        &url(),
        options(schema).poll_interval(Duration::from_secs(60)),
    )
    .await
    .unwrap()
}

/// Runs `wait` while `act` happens 100 ms later; returns how long the wait took.
async fn timed<W, A>(wait: W, act: A) -> (Duration, W::Output)
where
    W: Future + Send + 'static,
    W::Output: Send + 'static,
    A: Future<Output = ()>,
{
    let started = Instant::now();
    let waiter = tokio::spawn(wait);
    tokio::time::sleep(Duration::from_millis(100)).await;
    act.await;
    let out = waiter.await.unwrap();
    (started.elapsed(), out)
}

async fn admin() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

async fn listener_pids(client: &tokio_postgres::Client, schema: &str) -> Vec<i32> {
    client
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 ORDER BY pid",
            &[&format!("keel-listener:{schema}")],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_from_another_process_wakes_a_waiter_and_other_schemas_sleep_on() {
    let (schema, other) = (fresh_schema(), fresh_schema());
    let _drop = (DropSchema(schema.clone()), DropSchema(other.clone()));
    let waiter = Arc::new(quiet(&schema).await);
    let elsewhere = Arc::new(quiet(&other).await);
    let sender = quiet(&schema).await;

    let w = Arc::clone(&waiter);
    let (took, woke) = timed(
        async move {
            w.wait_for_work(WorkKind::Orchestrations, Duration::from_secs(20))
                .await
        },
        async {
            sender
                .create_instance(new_instance("a"), OnConflict::Fail)
                .await
                .unwrap();
        },
    )
    .await;
    woke.unwrap();
    assert!(
        took < Duration::from_secs(3),
        "woken by NOTIFY, took {took:?}"
    );

    let e = Arc::clone(&elsewhere);
    let (took, woke) = timed(
        async move {
            e.wait_for_work(WorkKind::Orchestrations, Duration::from_secs(1))
                .await
        },
        async {
            sender
                .create_instance(new_instance("b"), OnConflict::Fail)
                .await
                .unwrap();
        },
    )
    .await;
    woke.unwrap();
    assert!(
        took >= Duration::from_millis(950),
        "another schema's work does not wake it: {took:?}"
    );

    // News of an end travels on its own channel.
    // Two instances wait ("a" and "b"); one turn is enough.
    let work = fetch(&sender, 1).await.remove(0);
    let mut ack = ack_all(&work);
    ack.outcome =
        TurnOutcome::Completed(keel_conformance::fixtures::payload(&serde_json::json!(1)));
    let w = Arc::clone(&waiter);
    let (took, ended) = timed(
        async move { w.wait_for_ended(Duration::from_secs(20)).await },
        async {
            sender
                .ack_turns(vec![ack])
                .await
                .unwrap()
                .remove(0)
                .unwrap();
        },
    )
    .await;
    assert!(ended.unwrap(), "an end was heard of");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    let w = Arc::clone(&waiter);
    assert!(
        !w.wait_for_ended(Duration::from_millis(200)).await.unwrap(),
        "no news, no end"
    );
    for p in [&*waiter, &*elsewhere, &sender] {
        p.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_reconnects_after_its_connection_is_terminated() {
    let schema = fresh_schema();
    let _drop = DropSchema(schema.clone());
    let waiter = Arc::new(quiet(&schema).await);
    let sender = quiet(&schema).await;
    let admin = admin().await;
    let before = listener_pids(&admin, &schema).await;
    assert_eq!(before.len(), 2, "one listener per provider");
    for pid in &before {
        let terminated: bool = admin
            .query_one("SELECT pg_terminate_backend($1)", &[pid])
            .await
            .unwrap()
            .get(0);
        assert!(terminated);
    }
    // Both listeners come back, on new backends.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = listener_pids(&admin, &schema).await;
        if now.len() == 2 && now.iter().all(|pid| !before.contains(pid)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "listeners did not reconnect: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Give the new connections a moment to run their LISTEN.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let w = Arc::clone(&waiter);
    let (took, woke) = timed(
        async move {
            w.wait_for_work(WorkKind::Activities, Duration::from_secs(20))
                .await
        },
        async {
            let at = sender.now().await.unwrap();
            keel_conformance::fixtures::schedule(
                &sender,
                "a",
                vec![keel_conformance::fixtures::activity("a", 1, "work", at)],
            )
            .await;
        },
    )
    .await;
    woke.unwrap();
    assert!(
        took < Duration::from_secs(3),
        "a NOTIFY-driven wake arrives after the reconnect, took {took:?}"
    );
    waiter.close().await;
    sender.close().await;
}
