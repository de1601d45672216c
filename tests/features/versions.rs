//! Versioned code, unregistered names, and code that no longer matches its history.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use keel::KeelBuilder;
use keel::prelude::*;
use keel_tests::{Db, WAIT, test_options, wait_for_status};

/// Both versions of "flow": each says which it is; each waits for "go" first when the
/// input asks it to.
fn two_versions(db: &Db) -> KeelBuilder {
    Keel::builder()
        .sqlite(&db.path)
        .options(test_options())
        .orchestration_version(
            "flow",
            1,
            |ctx: OrchestrationContext, wait: bool| async move {
                if wait {
                    ctx.signal::<()>("go").await?;
                }
                Ok::<_, Failure>("v1".to_owned())
            },
        )
        .orchestration_version(
            "flow",
            2,
            |ctx: OrchestrationContext, wait: bool| async move {
                if wait {
                    ctx.signal::<()>("go").await?;
                }
                Ok::<_, Failure>("v2".to_owned())
            },
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_runs_the_version_it_asks_for_or_the_newest() -> anyhow::Result<()> {
    let db = Db::new()?;
    let keel = two_versions(&db).start().await?;
    let client = keel.client();

    let old = client.start("flow", &false).version(1).await?;
    let new = client.start("flow", &false).await?;
    let old_output: String = client.wait(&old, WAIT).await?;
    let new_output: String = client.wait(&new, WAIT).await?;
    ensure!(old_output == "v1", "a start of version 1 ran {old_output}");
    ensure!(new_output == "v2", "a default start ran {new_output}");
    ensure!(client.status(&old).await?.record().version == Some(1));
    ensure!(client.status(&new).await?.record().version == Some(2));
    keel.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_instance_keeps_its_version_over_a_restart() -> anyhow::Result<()> {
    let db = Db::new()?;
    let keel = two_versions(&db).start().await?;
    let client = keel.client();
    let id = client.start("flow", &true).version(1).id("old-one").await?;
    wait_for_status(&client, &id, InstanceStatus::Running, WAIT).await?;
    let report = keel.shutdown().await;
    ensure!(report.drained, "an idle worker did not drain: {report:?}");

    let keel = two_versions(&db).start().await?;
    let client = keel.client();
    client.signal(&id, "go", &()).await?;
    let output: String = client.wait(&id, WAIT).await?;
    ensure!(
        output == "v1",
        "the restarted instance switched to {output}"
    );
    keel.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_an_unregistered_name_fails_at_once_and_lists_the_registered() -> anyhow::Result<()>
{
    let db = Db::new()?;
    let keel = two_versions(&db)
        .orchestration("other", |_ctx: OrchestrationContext, (): ()| async {
            Ok::<_, Failure>(())
        })
        .start()
        .await?;
    let client = keel.client();

    let started = tokio::time::timeout(
        Duration::from_secs(5),
        client.start("nope", &()).id("nope-1"),
    )
    .await
    .context("an unregistered start did not fail at once")?;
    let Err(error) = started else {
        bail!("starting an unregistered orchestration succeeded");
    };
    ensure!(
        error.is_unregistered(),
        "not an unregistered error: {error}"
    );
    let message = error.to_string();
    for expected in ["nope", "flow v1, v2", "other v1"] {
        ensure!(
            message.contains(expected),
            "the error does not mention {expected:?}: {message}"
        );
    }
    let unknown_version = client.start("flow", &false).version(3).await;
    ensure!(
        unknown_version
            .as_ref()
            .is_err_and(keel::Error::is_unregistered),
        "a start of an unregistered version gave {unknown_version:?}"
    );
    let looked_up = client.status(&InstanceId::new("nope-1")?).await;
    ensure!(
        matches!(looked_up, Err(keel::Error::NotFound(_))),
        "a failed start created an instance: {looked_up:?}"
    );
    keel.shutdown().await;
    Ok(())
}

/// Says what ran: an activity's output is its own name.
async fn echo_name(ctx: ActivityContext, (): ()) -> Result<String, Failure> {
    Ok(ctx.name().to_owned())
}

/// Code A, and code B that calls `first` where A calls "a".
fn flow_calling(db: &Db, first: &'static str) -> KeelBuilder {
    Keel::builder()
        .sqlite(&db.path)
        .options(test_options())
        .activity("a", echo_name)
        .activity("b", echo_name)
        .activity("x", echo_name)
        .orchestration(
            "steps",
            move |ctx: OrchestrationContext, (): ()| async move {
                let one: String = ctx.activity(first, &()).await?;
                let word: String = ctx.signal("go").await?;
                let two: String = ctx.activity("b", &()).await?;
                Ok::<_, Failure>(format!("{one}-{word}-{two}"))
            },
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_code_suspends_the_instance_and_fixed_code_resumes_it() -> anyhow::Result<()> {
    let db = Db::new()?;
    let keel = flow_calling(&db, "a").start().await?;
    let client = keel.client();
    let id = client.start("steps", &()).id("drifting").await?;
    // It waits for the signal once "a" has completed and been recorded.
    let reached_wait = tokio::time::timeout(WAIT, async {
        loop {
            let history = client.history(&id).await?;
            let completed = history
                .iter()
                .any(|event| event.kind.name() == "ActivityCompleted");
            if completed {
                return anyhow::Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    reached_wait
        .await
        .context("activity \"a\" never completed")??;
    keel.shutdown().await;

    let keel = flow_calling(&db, "x").start().await?;
    let client = keel.client();
    client.signal(&id, "go", "now").await?;
    let info = wait_for_status(&client, &id, InstanceStatus::Suspended, WAIT).await?;
    let reason = info.reason().context("a suspended instance has a reason")?;
    for expected in [
        "nondeterminism",
        "ActivityScheduled \"a\"",
        "ActivityScheduled \"x\"",
    ] {
        ensure!(
            reason.contains(expected),
            "the reason does not mention {expected:?}: {reason}"
        );
    }
    keel.shutdown().await;

    let keel = flow_calling(&db, "a").start().await?;
    let client = keel.client();
    client.resume(&id).await?;
    let output: String = client.wait(&id, WAIT).await?;
    ensure!(output == "a-now-b", "unexpected output {output:?}");
    keel.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awaiting_a_runtime_sleep_suspends_with_a_clear_reason() -> anyhow::Result<()> {
    let db = Db::new()?;
    let keel = Keel::builder()
        .sqlite(&db.path)
        .options(test_options())
        .orchestration("dozy", |_ctx: OrchestrationContext, (): ()| async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok::<_, Failure>(())
        })
        .start()
        .await?;
    let client = keel.client();
    let id = client.start("dozy", &()).await?;

    let info = wait_for_status(&client, &id, InstanceStatus::Suspended, WAIT).await?;
    let reason = info.reason().context("a suspended instance has a reason")?;
    for expected in ["non-durable", "ctx.sleep"] {
        ensure!(
            reason.contains(expected),
            "the reason does not mention {expected:?}: {reason}"
        );
    }
    keel.shutdown().await;
    Ok(())
}
