//! External signals: buffered before the wait, delivered to a waiting workflow, in
//! order per name, kept apart by name, and refused for unknown instances.

use std::time::{Duration, Instant};

use anyhow::ensure;
use keel::prelude::*;
use keel::{Error, Event, KeelBuilder};
use keel_tests::{Db, WAIT, test_options};

/// A builder on the test's own SQLite file with the fast test options.
fn builder(db: &Db) -> KeelBuilder {
    Keel::builder().sqlite(&db.path).options(test_options())
}

fn kinds(history: &[Event]) -> Vec<&'static str> {
    history.iter().map(|event| event.kind.name()).collect()
}

fn position(names: &[&str], name: &str) -> anyhow::Result<usize> {
    let found = names.iter().position(|n| *n == name);
    found.ok_or_else(|| anyhow::anyhow!("no {name} in {names:?}"))
}

/// Polls the instance's custom status until it is `expected`.
async fn await_custom_status(
    client: &Client,
    id: &InstanceId,
    expected: u32,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let seen = client.status(id).await?.custom_status::<u32>()?;
        if seen == Some(expected) {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "custom status stuck at {seen:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sleeps `ms` before it waits for signal `go`.
async fn late_listener(ctx: OrchestrationContext, ms: u64) -> Result<String, Failure> {
    ctx.sleep(Duration::from_millis(ms)).await;
    ctx.signal("go").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_sent_before_the_wait_is_kept() -> anyhow::Result<()> {
    let db = Db::new()?;
    let keel = builder(&db)
        .orchestration("late_listener", late_listener)
        .start()
        .await?;
    let client = keel.client();
    let id = client.start("late_listener", &1_000u64).await?;
    client.signal(&id, "go", "early bird").await?;

    let out: String = client.wait(&id, WAIT).await?;
    assert_eq!(out, "early bird");
    // It arrived while the workflow slept, before anything waited for it.
    let names = kinds(&client.history(&id).await?);
    let received = position(&names, "SignalReceived")?;
    assert!(received < position(&names, "TimerFired")?, "{names:?}");
    keel.shutdown().await;
    Ok(())
}

/// Marks itself waiting (custom status 1) in the turn that starts waiting for `go`.
async fn listener(ctx: OrchestrationContext, (): ()) -> Result<String, Failure> {
    ctx.set_custom_status(&1u32)?;
    let got: String = ctx.signal("go").await?;
    ctx.set_custom_status(&2u32)?;
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_sent_while_the_workflow_waits_wakes_it() -> anyhow::Result<()> {
    let db = Db::new()?;
    let keel = builder(&db)
        .orchestration("listener", listener)
        .start()
        .await?;
    let client = keel.client();
    let id = client.start("listener", &()).await?;
    await_custom_status(&client, &id, 1).await?;

    // Still waiting a while later: nothing but the signal ends it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let info = client.status(&id).await?;
    assert_eq!(info.status(), InstanceStatus::Running);

    client.signal(&id, "go", "on time").await?;
    let out: String = client.wait(&id, WAIT).await?;
    assert_eq!(out, "on time");
    let names = kinds(&client.history(&id).await?);
    assert_eq!(
        names,
        [
            "ExecutionStarted",
            "CustomStatusSet",
            "SignalReceived",
            "CustomStatusSet",
            "ExecutionCompleted"
        ]
    );
    keel.shutdown().await;
    Ok(())
}

/// Collects `n` signals called `item`, reporting the count received as custom status.
async fn collector(ctx: OrchestrationContext, n: u32) -> Result<Vec<u32>, Failure> {
    let mut items = Vec::new();
    for received in 1..=n {
        items.push(ctx.signal::<u32>("item").await?);
        ctx.set_custom_status(&received)?;
    }
    Ok(items)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_signals_reach_successive_waits_in_order() -> anyhow::Result<()> {
    let db = Db::new()?;
    let keel = builder(&db)
        .orchestration("collector", collector)
        .start()
        .await?;
    let client = keel.client();
    let id = client.start("collector", &5u32).await?;
    // Some arrive together, perhaps before the first wait ...
    for item in [10u32, 20, 30] {
        client.signal(&id, "item", &item).await?;
    }
    await_custom_status(&client, &id, 3).await?;
    // ... the rest one at a time, to a workflow already waiting.
    client.signal(&id, "item", &40u32).await?;
    await_custom_status(&client, &id, 4).await?;
    client.signal(&id, "item", &50u32).await?;

    let out: Vec<u32> = client.wait(&id, WAIT).await?;
    assert_eq!(out, [10, 20, 30, 40, 50]);
    let history = client.history(&id).await?;
    let signals = history.iter().filter(|e| e.kind.label() == Some("item"));
    assert_eq!(signals.count(), 5);
    keel.shutdown().await;
    Ok(())
}

/// Waits for `currency` (a string), then `amount` (a number), then `currency` again,
/// whatever the order they are sent in.
async fn two_names(ctx: OrchestrationContext, (): ()) -> Result<String, Failure> {
    let currency: String = ctx.signal("currency").await?;
    let amount: u32 = ctx.signal("amount").await?;
    let again: String = ctx.signal("currency").await?;
    Ok(format!("{amount} {currency}, then {again}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_of_different_names_do_not_mix() -> anyhow::Result<()> {
    let db = Db::new()?;
    let keel = builder(&db)
        .orchestration("two_names", two_names)
        .start()
        .await?;
    let client = keel.client();
    let id = client.start("two_names", &()).await?;
    // `amount` comes first but is not the one the workflow waits for first.
    client.signal(&id, "amount", &12u32).await?;
    client.signal(&id, "currency", "EUR").await?;
    client.signal(&id, "currency", "USD").await?;

    let out: String = client.wait(&id, WAIT).await?;
    assert_eq!(out, "12 EUR, then USD");
    keel.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_to_an_unknown_instance_is_not_found() -> anyhow::Result<()> {
    let db = Db::new()?;
    let keel = builder(&db)
        .orchestration("listener", listener)
        .start()
        .await?;
    let client = keel.client();
    let nobody = InstanceId::new("nobody-home")?;
    match client.signal(&nobody, "go", "hello?").await {
        Err(Error::NotFound(id)) => assert_eq!(id, nobody),
        other => anyhow::bail!("expected NotFound, got {other:?}"),
    }
    // The refused signal was not kept for an instance of that id started later.
    let id = client.start("listener", &()).id("nobody-home").await?;
    await_custom_status(&client, &id, 1).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(client.status(&id).await?.status(), InstanceStatus::Running);
    client.signal(&id, "go", "now").await?;
    let out: String = client.wait(&id, WAIT).await?;
    assert_eq!(out, "now");
    keel.shutdown().await;
    Ok(())
}
