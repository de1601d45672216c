//! Child workflows (their outputs, their failures, unregistered names) and
//! continue-as-new.

use std::sync::atomic::{AtomicUsize, Ordering};

use keel::prelude::*;
use keel::{Codec, Event, EventKind, ExecutionId, KeelBuilder};
use keel_tests::{Db, WAIT, test_options};

/// A builder on the test's own SQLite file with the fast test options.
fn builder(db: &Db) -> KeelBuilder {
    Keel::builder().sqlite(&db.path).options(test_options())
}

fn kinds(history: &[Event]) -> Vec<&'static str> {
    history.iter().map(|event| event.kind.name()).collect()
}

/// The instance ids of the children scheduled in `history`.
fn children(history: &[Event]) -> Vec<InstanceId> {
    let scheduled = history.iter().filter_map(|event| match &event.kind {
        EventKind::ChildScheduled { instance, .. } => Some(instance.clone()),
        _ => None,
    });
    scheduled.collect()
}

async fn double(_ctx: ActivityContext, n: u64) -> Result<u64, Failure> {
    Ok(n * 2)
}

async fn doubler(ctx: OrchestrationContext, n: u64) -> Result<u64, Failure> {
    ctx.activity("double", &n).await
}

async fn parent(ctx: OrchestrationContext, n: u64) -> Result<u64, Failure> {
    let doubled: u64 = ctx.child("doubler", &n).await?;
    Ok(doubled + 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_output_returns_to_the_parent() -> anyhow::Result<()> {
    let db = Db::new()?;
    let keel = builder(&db)
        .activity("double", double)
        .orchestration("doubler", doubler)
        .orchestration("parent", parent)
        .start()
        .await?;
    let client = keel.client();
    let id = client.start("parent", &20u64).id("family-1").await?;
    let out: u64 = client.wait(&id, WAIT).await?;
    assert_eq!(out, 41);

    let history = client.history(&id).await?;
    let names = kinds(&history);
    assert_eq!(
        names,
        [
            "ExecutionStarted",
            "ChildScheduled",
            "ChildCompleted",
            "ExecutionCompleted"
        ]
    );
    // The child is an instance of its own, linked to its parent.
    let [child] = &children(&history)[..] else {
        anyhow::bail!("expected one child: {names:?}");
    };
    // Derived as `<parent>:<execution>:<op>`.
    assert!(child.as_str().starts_with("family-1:1:"), "{child}");
    let info = client.status(child).await?;
    assert_eq!(info.status(), InstanceStatus::Completed);
    assert_eq!(info.output::<u64>()?, 40);
    let link = info.record().parent.as_ref().map(|p| &p.instance);
    assert_eq!(link, Some(&id));
    keel.shutdown().await;
    Ok(())
}

async fn out_of_stock(_ctx: OrchestrationContext, item: String) -> Result<String, Failure> {
    Err(Failure::new("OutOfStock", format!("no {item} left")).with_cause("the shelf is bare"))
}

/// Tries `tea` from a child that fails, then falls back to a child that works.
async fn shopper(ctx: OrchestrationContext, (): ()) -> Result<String, Failure> {
    let failure = match ctx.child::<String, _>("out_of_stock", "tea").await {
        Ok(out) => return Err(Failure::new("Unexpected", out)),
        Err(failure) => failure,
    };
    let fallback: u64 = ctx.child("doubler", &21u64).await?;
    Ok(format!(
        "{}: {} ({}); then {fallback}",
        failure.kind,
        failure.message,
        failure.causes.join(", ")
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_child_reaches_the_parent_which_carries_on() -> anyhow::Result<()> {
    let db = Db::new()?;
    let keel = builder(&db)
        .activity("double", double)
        .orchestration("doubler", doubler)
        .orchestration("out_of_stock", out_of_stock)
        .orchestration("shopper", shopper)
        .start()
        .await?;
    let client = keel.client();
    let id = client.start("shopper", &()).await?;
    let out: String = client.wait(&id, WAIT).await?;
    assert_eq!(out, "OutOfStock: no tea left (the shelf is bare); then 42");

    let history = client.history(&id).await?;
    let names = kinds(&history);
    let child_events: Vec<_> = names.iter().filter(|n| n.starts_with("Child")).collect();
    assert_eq!(
        child_events,
        [
            &"ChildScheduled",
            &"ChildFailed",
            &"ChildScheduled",
            &"ChildCompleted"
        ]
    );
    let first = children(&history)[0].clone();
    let info = client.status(&first).await?;
    assert_eq!(info.status(), InstanceStatus::Failed);
    assert_eq!(info.failure().map(|f| &*f.kind), Some("OutOfStock"));
    keel.shutdown().await;
    Ok(())
}

/// Starts a child nobody registered and reports the failure as `"<kind>|<message>"`.
async fn summoner(ctx: OrchestrationContext, (): ()) -> Result<String, Failure> {
    match ctx.child::<String, _>("ghost", &()).await {
        Ok(out) => Ok(format!("the ghost answered {out}")),
        Err(failure) => Ok(format!("{}|{}", failure.kind, failure.message)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unregistered_child_fails_naming_what_is_registered() -> anyhow::Result<()> {
    let db = Db::new()?;
    let keel = builder(&db)
        .orchestration("doubler", doubler)
        .orchestration("summoner", summoner)
        .activity("double", double)
        .start()
        .await?;
    let client = keel.client();
    let id = client.start("summoner", &()).await?;
    let out: String = client.wait(&id, WAIT).await?;
    let (kind, message) = out.split_once('|').unwrap_or((&out, ""));
    assert_eq!(kind, Failure::UNREGISTERED, "{out}");
    assert!(message.contains("ghost"), "{message}");
    assert!(
        message.contains("doubler"),
        "registered names missing: {message}"
    );
    assert!(
        message.contains("summoner"),
        "registered names missing: {message}"
    );
    keel.shutdown().await;
    Ok(())
}

static TICKS: AtomicUsize = AtomicUsize::new(0);

async fn tick(_ctx: ActivityContext, count: u32) -> Result<u32, Failure> {
    TICKS.fetch_add(1, Ordering::SeqCst);
    Ok(count + 1)
}

/// Counts to `LIMIT`, one execution per step.
async fn counter(ctx: OrchestrationContext, count: u32) -> Result<u32, Failure> {
    const LIMIT: u32 = 4;
    let next: u32 = ctx.activity("tick", &count).await?;
    if next < LIMIT {
        return ctx.continue_as_new(&next).await;
    }
    Ok(next * 100 + ctx.execution_id().get())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continue_as_new_starts_afresh_until_done() -> anyhow::Result<()> {
    let db = Db::new()?;
    let keel = builder(&db)
        .activity("tick", tick)
        .orchestration("counter", counter)
        .start()
        .await?;
    let client = keel.client();
    let id = client.start("counter", &0u32).await?;
    let out: u32 = client.wait(&id, WAIT).await?;
    assert_eq!(out, 404, "count 4 reached in execution 4");
    assert_eq!(TICKS.load(Ordering::SeqCst), 4);

    let info = client.status(&id).await?;
    assert_eq!(info.status(), InstanceStatus::Completed);
    assert_eq!(info.record().execution, ExecutionId::from_raw(4));

    // Only the last execution's history: started with 3, one tick, done.
    let history = client.history(&id).await?;
    let names = kinds(&history);
    assert_eq!(
        names,
        [
            "ExecutionStarted",
            "ActivityScheduled",
            "ActivityCompleted",
            "ExecutionCompleted"
        ]
    );
    let EventKind::ExecutionStarted { input, .. } = &history[0].kind else {
        anyhow::bail!("not a start: {:?}", history[0]);
    };
    assert_eq!(Codec::default().decode::<u32>(input)?, 3);
    keel.shutdown().await;
    Ok(())
}
