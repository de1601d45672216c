//! A wake-up made in one process ends a wait in another; without the notifier, it
//! does not.

use std::sync::Arc;
use std::time::Duration;

use keel_conformance::fixtures::{
    activity, end, lease, new_instance, poke, provider_now, running, schedule,
};
use keel_core::{Codec, Failure};
use keel_provider::{OnConflict, Provider, TurnOutcome, WorkKind};

use crate::{PROMPT, Pair, RedisServer, ended_latency, plain_pair, wake_latency};

/// How long the controls wait to see that nothing wakes them.
const CONTROL: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_an_instance_wakes_an_orchestration_wait_in_another_process() -> anyhow::Result<()>
{
    let server = RedisServer::start()?;
    let pair = Pair::open(&server).await?;
    let a = Arc::clone(&pair.a);
    let mut latencies = Vec::new();
    for round in 0..10 {
        let a = Arc::clone(&a);
        // B looks at the queue first, as a dispatcher does before it waits.
        let nothing = keel_conformance::fixtures::fetch(&*pair.b, 10).await;
        anyhow::ensure!(
            nothing.is_empty(),
            "round {round}: B found work before A made any"
        );
        let latency = wake_latency(
            pair.b.clone(),
            WorkKind::Orchestrations,
            PROMPT,
            async move {
                let id = format!("i{round}");
                a.create_instance(new_instance(&id), OnConflict::Fail)
                    .await?;
                Ok(())
            },
        )
        .await?;
        let latency = latency.ok_or_else(|| {
            anyhow::anyhow!("round {round}: B's wait did not end within {PROMPT:?}")
        })?;
        latencies.push(latency);
        // Takes the instance, so that the next round starts with nothing visible.
        let work = keel_conformance::fixtures::fetch(&*pair.b, 10).await;
        anyhow::ensure!(work.len() == 1, "B sees A's instance");
    }
    latencies.sort();
    eprintln!(
        "orchestration wake-up across processes with Redis: median {:?}, max {:?}",
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_notifier_a_wait_in_another_process_sleeps_on() -> anyhow::Result<()> {
    let (a, b, _dir) = plain_pair().await?;
    let latency = wake_latency(b, WorkKind::Orchestrations, CONTROL, async move {
        a.create_instance(new_instance("i"), OnConflict::Fail)
            .await?;
        Ok(())
    })
    .await?;
    anyhow::ensure!(
        latency.is_none(),
        "the control woke after {latency:?}: the test would prove nothing"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduling_an_activity_wakes_an_activity_wait_in_another_process() -> anyhow::Result<()> {
    let server = RedisServer::start()?;
    let pair = Pair::open(&server).await?;
    let a = Arc::clone(&pair.a);
    running(&*a, "i").await;
    let nothing = keel_conformance::fixtures::lease(&*pair.b, 10).await;
    anyhow::ensure!(nothing.is_empty(), "nothing scheduled yet");
    let latency = wake_latency(pair.b.clone(), WorkKind::Activities, PROMPT, async move {
        let at = provider_now(&*a).await;
        schedule(&*a, "i", vec![activity("i", 1, "work", at)]).await;
        Ok(())
    })
    .await?;
    let latency = latency.ok_or_else(|| anyhow::anyhow!("B's wait did not end in time"))?;
    eprintln!("activity wake-up across processes with Redis: {latency:?}");

    // And back: B completes the activity, A's orchestration wait ends.
    let leased = lease(&*pair.b, 10).await;
    anyhow::ensure!(leased.len() == 1, "B leases A's activity");
    let nothing = keel_conformance::fixtures::fetch(&*pair.a, 10).await;
    anyhow::ensure!(nothing.is_empty(), "nothing for A yet");
    let b = Arc::clone(&pair.b);
    let lease = leased[0].lease.clone();
    let latency = wake_latency(
        pair.a.clone(),
        WorkKind::Orchestrations,
        PROMPT,
        async move {
            let output = Codec::default().encode(&1)?;
            let done = keel_conformance::fixtures::complete(&*b, &lease, Ok(output)).await;
            done.map_err(anyhow::Error::from)
        },
    )
    .await?;
    anyhow::ensure!(
        latency.is_some(),
        "A's wait did not end when B completed the activity"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_ending_in_one_process_is_news_in_another() -> anyhow::Result<()> {
    let server = RedisServer::start()?;
    let pair = Pair::open(&server).await?;
    let a = Arc::clone(&pair.a);
    let id = running(&*a, "i").await;
    poke(&*a, &id).await;
    let latency = ended_latency(pair.b.clone(), PROMPT, async move {
        end(
            &*a,
            &id,
            TurnOutcome::Failed(Failure::new("Boom", "it broke")),
        )
        .await;
        Ok(())
    })
    .await?;
    let latency = latency.ok_or_else(|| anyhow::anyhow!("B heard no news of the end"))?;
    eprintln!("ended news across processes with Redis: {latency:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_notifier_no_news_of_ends_comes() -> anyhow::Result<()> {
    let (a, b, _dir) = plain_pair().await?;
    let id = running(&*a, "i").await;
    poke(&*a, &id).await;
    let heard = ended_latency(b, CONTROL, async move {
        end(
            &*a,
            &id,
            TurnOutcome::Failed(Failure::new("Boom", "it broke")),
        )
        .await;
        Ok(())
    })
    .await?;
    anyhow::ensure!(heard.is_none(), "the control heard of the end: {heard:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_keep_deployments_apart() -> anyhow::Result<()> {
    let server = RedisServer::start()?;
    // Two pairs on one Redis, each its own database and namespace.
    let one = Pair::open(&server).await?;
    let two = Pair::open(&server).await?;
    let a = Arc::clone(&one.a);
    let latency = wake_latency(
        two.b.clone(),
        WorkKind::Orchestrations,
        CONTROL,
        async move {
            a.create_instance(new_instance("i"), OnConflict::Fail)
                .await?;
            Ok(())
        },
    )
    .await?;
    anyhow::ensure!(latency.is_none(), "another namespace's wake-up woke us");
    let woken: Arc<dyn Provider> = one.b.clone();
    anyhow::ensure!(
        tokio::time::timeout(
            PROMPT,
            woken.wait_for_work(WorkKind::Orchestrations, crate::LONG)
        )
        .await
        .is_ok(),
        "the same namespace's waiter has news pending"
    );
    Ok(())
}
