//! The client process of the scale-out tests (`tests/scale`, `tests/pg_restart`): it
//! starts the workload's workflows, signals half of them at once (long before they
//! wait) and the other half only once they wait, waits for every result, checks it and
//! prints a one-line summary on standard output. It exits with an error if a workflow
//! ends wrongly or the run takes too long.
//!
//! Usage: `scale_client <backend args...>`. Calls the store refuses as unavailable (a
//! database restarting) are retried for up to a minute. It exits at once when its
//! standard input closes, so a test that dies leaves no client behind.

use std::collections::BTreeSet;
use std::future::Future;

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use keel::prelude::*;
use keel::{InstanceQuery, PageRequest};
use tokio::task::JoinSet;

#[path = "../../scale/workload.rs"]
mod workload;

use workload::{
    Backend, LATE_TAG, ORCHESTRATION, SIGNAL, WAITING, WORKFLOWS, expected_output, instance_id,
    late_signal, signal_value, workflow_number,
};

/// How long the whole run may take before the client gives up.
const RUN: Duration = Duration::from_secs(150);

/// How long calls are retried while the store is unavailable.
const OUTAGE: Duration = Duration::from_secs(60);

/// Starts (with their early signals) in flight at once.
const STARTERS: u64 = 8;

/// How often the client looks for workflows waiting for a late signal.
const LOOK: Duration = Duration::from_millis(200);

/// Runs `call` until it succeeds, retrying for up to [`OUTAGE`] while the store is
/// unavailable; counts the retries.
async fn retrying<T, F, Fut>(what: &str, retries: &mut u32, mut call: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = keel::Result<T>>,
{
    let deadline = Instant::now() + OUTAGE;
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(keel::Error::Provider(error))
                if error.is_retryable() && Instant::now() < deadline =>
            {
                if *retries == 0 {
                    eprintln!("scale_client: {what}: {error}; retrying");
                }
                *retries += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => return Err(error).context(what.to_owned()),
        }
    }
}

/// Starts workflows `first, first + STARTERS, ...`, signalling the early ones at once.
async fn start_some(client: Client, first: u64) -> anyhow::Result<u32> {
    let mut retries = 0;
    for n in (first..WORKFLOWS).step_by(usize::try_from(STARTERS)?) {
        let client = &client;
        let id = retrying("starting a workflow", &mut retries, || async move {
            let start = client.start(ORCHESTRATION, &n).id(instance_id(n));
            let start = if late_signal(n) {
                start.tag(LATE_TAG.0, LATE_TAG.1)
            } else {
                start
            };
            start.await
        })
        .await?;
        if !late_signal(n) {
            let id = &id;
            retrying("signalling a workflow", &mut retries, || async move {
                client.signal(id, SIGNAL, &signal_value(n)).await
            })
            .await?;
        }
    }
    Ok(retries)
}

/// Signals each late workflow once it shows that it waits; returns when all are.
async fn signal_late(client: &Client, deadline: Instant, retries: &mut u32) -> anyhow::Result<()> {
    let mut left: BTreeSet<u64> = (0..WORKFLOWS).filter(|n| late_signal(*n)).collect();
    let query = InstanceQuery {
        statuses: vec![InstanceStatus::Running],
        tag: Some((LATE_TAG.0.to_owned(), LATE_TAG.1.to_owned())),
        ..InstanceQuery::default()
    };
    while !left.is_empty() {
        ensure!(
            Instant::now() < deadline,
            "{} workflows never showed that they wait for their signal: {left:?}",
            left.len()
        );
        let mut request = PageRequest::first(1000);
        loop {
            let page = retrying("listing waiting workflows", retries, || {
                client.list(query.clone(), request.clone())
            })
            .await?;
            for info in &page.items {
                let Some(n) = workflow_number(info.id().as_str()) else {
                    bail!("an unknown instance {}", info.id());
                };
                let waits = info.custom_status::<String>()?.as_deref() == Some(WAITING);
                if waits && left.remove(&n) {
                    let id = info.id();
                    retrying("signalling a workflow", retries, || async move {
                        client.signal(id, SIGNAL, &signal_value(n)).await
                    })
                    .await?;
                }
            }
            match page.next {
                Some(cursor) => {
                    request = PageRequest {
                        limit: 1000,
                        cursor: Some(cursor),
                    }
                }
                None => break,
            }
        }
        tokio::time::sleep(LOOK).await;
    }
    Ok(())
}

async fn run(client: Client) -> anyhow::Result<String> {
    let began = Instant::now();
    let deadline = began + RUN;
    let mut starters = JoinSet::new();
    for first in 0..STARTERS {
        starters.spawn(start_some(client.clone(), first));
    }
    let mut retries = 0;
    while let Some(started) = starters.join_next().await {
        retries += started??;
    }
    let started_in = began.elapsed();

    signal_late(&client, deadline, &mut retries).await?;
    let signalled_in = began.elapsed();

    let mut wrong = Vec::new();
    for n in 0..WORKFLOWS {
        let id = InstanceId::new(instance_id(n))?;
        let id = &id;
        let left = deadline.saturating_duration_since(Instant::now());
        let output: u64 = retrying("waiting for a workflow", &mut retries, || {
            client.wait(id, left)
        })
        .await?;
        if output != expected_output(n) {
            wrong.push(format!("{id}: {output}, expected {}", expected_output(n)));
        }
    }
    ensure!(
        wrong.is_empty(),
        "{} workflows completed with the wrong output: {wrong:?}",
        wrong.len()
    );
    let late = (0..WORKFLOWS).filter(|n| late_signal(*n)).count();
    Ok(format!(
        "scale_client: started {WORKFLOWS} workflows in {started_in:.1?} ({} signalled at \
         once); signalled the other {late} once they waited, by {signalled_in:.1?}; all \
         completed with the expected output after {:.1?}; {retries} calls retried while \
         the store was unavailable",
        WORKFLOWS - late as u64,
        began.elapsed()
    ))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let backend = Backend::from_args(&mut args)?;
    let stdin_closed = keel_tests::stdin_closed()?;
    let client = Keel::builder()
        .provider(backend.provider().await?)
        .client()
        .await
        .context("opening the client")?;
    tokio::select! {
        summary = run(client) => println!("{}", summary?),
        _ = stdin_closed => bail!("standard input closed: the test is gone"),
    }
    Ok(())
}
