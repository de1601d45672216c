//! Activity limits stay exact when many claimers in several processes (providers with
//! pools of their own) race for one name.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_conformance::fixtures::{activity, complete, payload, provider_now, schedule};
use keel_core::QueueName;
use keel_postgres::PostgresProvider;
use keel_provider::{ActivityLimits, FetchActivities, LeasedWorkItem, Provider};

use crate::{DropSchema, fresh_schema, options, url};

async fn providers(schema: &str, n: usize) -> Vec<Arc<PostgresProvider>> {
    let mut all = Vec::new();
    for _ in 0..n {
        all.push(Arc::new(
            PostgresProvider::connect(&url(), options(schema))
                .await
                .unwrap(),
        ));
    }
    all
}

/// Every provider runs `claimers` tasks, each fetching `rounds` times; returns all
/// that was leased.
async fn race(
    all: &[Arc<PostgresProvider>],
    claimers: usize,
    rounds: usize,
) -> Vec<LeasedWorkItem> {
    let mut tasks = Vec::new();
    for p in all {
        for _ in 0..claimers {
            let p = Arc::clone(p);
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..rounds {
                    let request = FetchActivities {
                        queues: vec![QueueName::default()],
                        max_items: 3,
                        lease_for: Duration::from_secs(60),
                    };
                    got.extend(p.fetch_activities(request).await.expect("fetch succeeds"));
                }
                got
            }));
        }
    }
    let mut leased = Vec::new();
    for task in tasks {
        leased.extend(task.await.unwrap());
    }
    leased
}

/// Fetches from `p` until nothing more is leasable. A racing claimer may skip a row that
/// another holds locked for a moment (SKIP LOCKED), so a race alone need not lease every
/// leasable item; this is how a test asks what was left.
async fn drain(p: &PostgresProvider) -> Vec<LeasedWorkItem> {
    let mut leased = Vec::new();
    loop {
        let request = FetchActivities {
            queues: vec![QueueName::default()],
            max_items: 10,
            lease_for: Duration::from_secs(60),
        };
        let got = p.fetch_activities(request).await.expect("fetch succeeds");
        if got.is_empty() {
            return leased;
        }
        leased.extend(got);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_is_exact_under_concurrent_claimers_in_several_processes() {
    let schema = fresh_schema();
    let _drop = DropSchema(schema.clone());
    let all = providers(&schema, 3).await;
    let p = &*all[0];
    let limits = ActivityLimits {
        max_concurrent: Some(4),
        max_per_second: None,
    };
    p.set_activity_limits("limited", limits).await.unwrap();
    let at = provider_now(p).await;
    let mut items: Vec<_> = (1..=40)
        .map(|op| activity("a", op, "limited", at))
        .collect();
    items.extend((41..=50).map(|op| activity("a", op, "free", at)));
    schedule(p, "a", items).await;

    let mut leased = race(&all, 4, 5).await;
    leased.extend(drain(p).await);
    let limited: Vec<_> = leased.iter().filter(|l| l.item.name == "limited").collect();
    assert_eq!(
        limited.len(),
        4,
        "exactly max_concurrent leased across 12 claimers"
    );
    assert_eq!(
        leased.len() - limited.len(),
        10,
        "the free name is not held back"
    );

    for l in &limited {
        complete(p, &l.lease, Ok(payload(&serde_json::json!(null))))
            .await
            .unwrap();
    }
    let mut again = race(&all, 4, 3).await;
    again.extend(drain(p).await);
    assert_eq!(again.len(), 4, "four slots freed, four more leased");
    for p in &all {
        p.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_per_second_is_exact_under_concurrent_claimers() {
    let schema = fresh_schema();
    let _drop = DropSchema(schema.clone());
    let all = providers(&schema, 2).await;
    let p = &*all[0];
    let limits = ActivityLimits {
        max_concurrent: None,
        max_per_second: Some(5),
    };
    p.set_activity_limits("metered", limits).await.unwrap();
    let at = provider_now(p).await;
    schedule(
        p,
        "a",
        (1..=40)
            .map(|op| activity("a", op, "metered", at))
            .collect(),
    )
    .await;
    let started = Instant::now();
    let leased = race(&all, 4, 1).await;
    let took = started.elapsed();
    if took < Duration::from_millis(900) {
        assert_eq!(leased.len(), 5, "{} leased within {took:?}", leased.len());
    } else {
        assert!(
            leased.len() <= 10,
            "{} leased within {took:?}",
            leased.len()
        );
    }
    for p in &all {
        p.close().await;
    }
}
