//! The provider's own throughput on a file with `synchronous = FULL`, one caller at a
//! time: single-instance creates (one commit each), turns fetched and acked, and
//! activities leased and completed, one per call and a hundred per call.
//!
//! ```sh
//! cargo run --release -p keel-sqlite --example throughput        # 2,000 of each
//! cargo run --release -p keel-sqlite --example throughput -- 500
//! ```

use std::time::{Duration, Instant};

use keel_conformance::fixtures::{ack_all, activity, new_instance};
use keel_core::{Codec, QueueName};
use keel_provider::{
    Ack, ActivityCompletion, FetchActivities, FetchOrchestrations, OnConflict, Provider,
};
use keel_sqlite::SqliteProvider;

const LOCK: Duration = Duration::from_secs(60);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let n: usize = match std::env::args().nth(1) {
        Some(arg) => arg.parse()?,
        None => 2_000,
    };
    let dir = tempfile::tempdir()?;
    let p = SqliteProvider::open(dir.path().join("keel.db")).await?;

    // Creates, one commit each; half of the instances then run a turn one at a time,
    // the other half a hundred at a time.
    let began = Instant::now();
    for i in 0..2 * n {
        p.create_instance(new_instance(&format!("i{i}")), OnConflict::Fail)
            .await?;
    }
    report("create_instance, 1 per commit", 2 * n, began);
    for per_call in [1, 100] {
        let began = Instant::now();
        let mut done = 0;
        while done < n {
            let work = p
                .fetch_orchestrations(FetchOrchestrations {
                    max_instances: per_call.min(n - done),
                    lock_for: LOCK,
                    with_history: true,
                })
                .await?;
            anyhow::ensure!(!work.is_empty(), "ran out of turns");
            done += work.len();
            for result in p.ack_turns(work.iter().map(ack_all).collect()).await? {
                result?;
            }
        }
        report(&format!("turn fetch+ack, {per_call} per call"), n, began);
    }

    // One turn schedules every activity, then they are leased and completed.
    p.create_instance(new_instance("a"), OnConflict::Fail)
        .await?;
    let work = p
        .fetch_orchestrations(FetchOrchestrations {
            max_instances: 1,
            lock_for: LOCK,
            with_history: false,
        })
        .await?;
    let at = p.now().await?;
    let mut ack: Ack = ack_all(&work[0]);
    ack.activities = (1..=2 * n as u64)
        .map(|op| activity("a", op, "w", at))
        .collect();
    for result in p.ack_turns(vec![ack]).await? {
        result?;
    }
    let output = Codec::default().encode(&1_u64)?;
    for per_call in [1, 100] {
        let began = Instant::now();
        let mut done = 0;
        while done < n {
            let leased = p
                .fetch_activities(FetchActivities {
                    queues: vec![QueueName::default()],
                    max_items: per_call.min(n - done),
                    lease_for: LOCK,
                })
                .await?;
            anyhow::ensure!(!leased.is_empty(), "ran out of activities");
            done += leased.len();
            let completions = leased
                .into_iter()
                .map(|l| ActivityCompletion {
                    lease: l.lease,
                    outcome: Ok(output.clone()),
                })
                .collect();
            for result in p.complete_activities(completions).await? {
                result?;
            }
        }
        report(
            &format!("activity claim+complete, {per_call} per call"),
            n,
            began,
        );
    }
    println!("transactions committed: {}", p.transactions_committed());
    p.close().await;
    Ok(())
}

fn report(what: &str, n: usize, began: Instant) {
    let secs = began.elapsed().as_secs_f64();
    println!(
        "{what:<40} {n:>6} in {secs:>6.2} s = {:>8.0}/s",
        n as f64 / secs
    );
}
