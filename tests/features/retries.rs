//! Activity failures: retries with back-off, non-retryable failures and their cause
//! chains, per-attempt timeouts, panics, and inputs that do not decode.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use keel::prelude::*;
use keel::{Error, Event, KeelBuilder};
use keel_tests::{Db, WAIT, test_options};
use serde::{Deserialize, Serialize};

/// A builder on the test's own SQLite file with the fast test options.
fn builder(db: &Db) -> KeelBuilder {
    Keel::builder().sqlite(&db.path).options(test_options())
}

fn kinds(history: &[Event]) -> Vec<&'static str> {
    history.iter().map(|event| event.kind.name()).collect()
}

/// `max_attempts` attempts, `initial_ms` doubling, no jitter.
fn policy(max_attempts: u32, initial_ms: u64) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_interval: Duration::from_millis(initial_ms),
        multiplier: 2.0,
        jitter: 0.0,
        ..RetryPolicy::default()
    }
}

/// The attempts an activity saw, with when each began.
#[derive(Debug, Clone, Default)]
struct Attempts(Arc<Mutex<Vec<(u32, Instant)>>>);

impl Attempts {
    fn record(&self, ctx: &ActivityContext) -> u32 {
        let mut seen = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        seen.push((ctx.attempt(), Instant::now()));
        ctx.attempt()
    }

    fn numbers(&self) -> Vec<u32> {
        let seen = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        seen.iter().map(|(n, _)| *n).collect()
    }

    /// The time between the starts of successive attempts.
    fn gaps(&self) -> Vec<Duration> {
        let seen = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        seen.windows(2).map(|w| w[1].1 - w[0].1).collect()
    }
}

/// Calls activity `name` (input `()`) with the given policy and per-attempt timeout,
/// and returns its output.
#[derive(Debug, Serialize, Deserialize)]
struct Call {
    name: String,
    policy: RetryPolicy,
    timeout_ms: Option<u64>,
}

fn call(name: &str, policy: RetryPolicy, timeout_ms: Option<u64>) -> Call {
    let name = name.to_owned();
    Call {
        name,
        policy,
        timeout_ms,
    }
}

async fn caller(ctx: OrchestrationContext, call: Call) -> Result<String, Failure> {
    let mut activity = ctx.activity(call.name, &()).retry(call.policy);
    if let Some(ms) = call.timeout_ms {
        activity = activity.timeout(Duration::from_millis(ms));
    }
    activity.await
}

/// Like `caller`, but handles a failure: returns `"<kind>: <message>"`.
async fn handler(ctx: OrchestrationContext, call: Call) -> Result<String, Failure> {
    match caller(ctx, call).await {
        Ok(out) => Ok(format!("ok: {out}")),
        Err(failure) => Ok(format!("{}: {}", failure.kind, failure.message)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_activity_is_retried_with_back_off() -> anyhow::Result<()> {
    let db = Db::new()?;
    let attempts = Attempts::default();
    let seen = attempts.clone();
    let keel = builder(&db)
        .activity("flaky", move |ctx: ActivityContext, (): ()| {
            let attempt = seen.record(&ctx);
            async move {
                match attempt {
                    1 | 2 => Err(Failure::new("Flaky", format!("attempt {attempt} failed"))),
                    _ => Ok(format!("done at attempt {attempt}")),
                }
            }
        })
        .orchestration("caller", caller)
        .start()
        .await?;
    let client = keel.client();
    let started = Instant::now();
    let id = client
        .start("caller", &call("flaky", policy(5, 50), None))
        .await?;
    let out: String = client.wait(&id, WAIT).await?;
    let elapsed = started.elapsed();
    assert_eq!(out, "done at attempt 3");
    assert_eq!(attempts.numbers(), [1, 2, 3]);
    let gaps = attempts.gaps();
    assert!(gaps[0] >= Duration::from_millis(50), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(100), "{gaps:?}");
    assert!(elapsed >= Duration::from_millis(150), "{elapsed:?}");

    // Retries are the worker's business: the history records the activity once.
    let names = kinds(&client.history(&id).await?);
    let activity: Vec<_> = names.iter().filter(|n| n.starts_with("Activity")).collect();
    assert_eq!(
        activity,
        [&"ActivityScheduled", &"ActivityCompleted"],
        "{names:?}"
    );
    keel.shutdown().await;
    Ok(())
}

static DECLINED_RUNS: AtomicUsize = AtomicUsize::new(0);
static FRAUD_RUNS: AtomicUsize = AtomicUsize::new(0);

async fn decline(_ctx: ActivityContext, (): ()) -> Result<String, Failure> {
    DECLINED_RUNS.fetch_add(1, Ordering::SeqCst);
    Err(Failure::new("Declined", "card refused").retryable(false))
}

async fn fraud(_ctx: ActivityContext, (): ()) -> Result<String, Failure> {
    FRAUD_RUNS.fetch_add(1, Ordering::SeqCst);
    Err(Failure::new("Fraud", "looks stolen"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_retryable_failure_runs_once_and_can_be_handled() -> anyhow::Result<()> {
    let db = Db::new()?;
    let keel = builder(&db)
        .activity("decline", decline)
        .activity("fraud", fraud)
        .orchestration("handler", handler)
        .start()
        .await?;
    let client = keel.client();
    // Flagged not retryable by the activity itself.
    let id = client
        .start("handler", &call("decline", policy(5, 10), None))
        .await?;
    let out: String = client.wait(&id, WAIT).await?;
    assert_eq!(out, "Declined: card refused");

    // Retryable, but of a kind the policy refuses to retry.
    let refusing = RetryPolicy {
        non_retryable: vec!["Fraud".to_owned()],
        ..policy(5, 10)
    };
    let id = client
        .start("handler", &call("fraud", refusing, None))
        .await?;
    let out: String = client.wait(&id, WAIT).await?;
    assert_eq!(out, "Fraud: looks stolen");

    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(DECLINED_RUNS.load(Ordering::SeqCst), 1);
    assert_eq!(FRAUD_RUNS.load(Ordering::SeqCst), 1);
    keel.shutdown().await;
    Ok(())
}

/// A plain `std` error with a source, as an application would write it.
#[derive(Debug)]
struct ChargeError(std::io::Error);

impl fmt::Display for ChargeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("charging the card failed")
    }
}

impl std::error::Error for ChargeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

static CHARGE_RUNS: AtomicUsize = AtomicUsize::new(0);

async fn charge(_ctx: ActivityContext, (): ()) -> Result<String, ChargeError> {
    CHARGE_RUNS.fetch_add(1, Ordering::SeqCst);
    Err(ChargeError(std::io::Error::other("connection reset")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_propagated_failure_keeps_its_kind_and_causes() -> anyhow::Result<()> {
    let db = Db::new()?;
    let keel = builder(&db)
        .activity("charge", charge)
        .orchestration("caller", caller)
        .start()
        .await?;
    let client = keel.client();
    let refusing = RetryPolicy {
        non_retryable: vec!["ChargeError".to_owned()],
        ..policy(5, 10)
    };
    let id = client
        .start("caller", &call("charge", refusing, None))
        .await?;
    let failure = match client.wait::<String>(&id, WAIT).await {
        Err(Error::Failed { instance, failure }) => {
            assert_eq!(instance, id);
            // Deref coercion: the field may be boxed.
            Failure::clone(&failure)
        }
        other => anyhow::bail!("expected Error::Failed, got {other:?}"),
    };
    assert_eq!(failure.kind, "ChargeError");
    assert_eq!(failure.message, "charging the card failed");
    assert_eq!(failure.causes, ["connection reset"]);
    assert_eq!(CHARGE_RUNS.load(Ordering::SeqCst), 1);

    let info = client.status(&id).await?;
    assert_eq!(info.status(), InstanceStatus::Failed);
    assert_eq!(info.failure(), Some(&failure));
    keel.shutdown().await;
    Ok(())
}

/// Hangs for 10 s on its first attempt, answers at once on later ones.
fn stall(attempts: Attempts) -> impl Fn(ActivityContext, ()) -> StallFuture + Send + Sync {
    move |ctx, ()| {
        let attempt = attempts.record(&ctx);
        Box::pin(async move {
            if attempt == 1 {
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
            Ok(format!("answered attempt {attempt}"))
        })
    }
}

type StallFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, Failure>> + Send>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_past_its_timeout_is_retried() -> anyhow::Result<()> {
    let db = Db::new()?;
    let attempts = Attempts::default();
    let keel = builder(&db)
        .activity("stall", stall(attempts.clone()))
        .orchestration("caller", caller)
        .start()
        .await?;
    let client = keel.client();
    let started = Instant::now();
    let id = client
        .start("caller", &call("stall", policy(3, 10), Some(100)))
        .await?;
    let out: String = client.wait(&id, WAIT).await?;
    assert_eq!(out, "answered attempt 2");
    assert_eq!(attempts.numbers(), [1, 2]);
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(100), "{elapsed:?}");
    assert!(
        elapsed < Duration::from_secs(10),
        "waited out the stall: {elapsed:?}"
    );
    keel.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_past_its_timeout_fails_without_retries() -> anyhow::Result<()> {
    let db = Db::new()?;
    let attempts = Attempts::default();
    let keel = builder(&db)
        .activity("stall", stall(attempts.clone()))
        .orchestration("caller", caller)
        .start()
        .await?;
    let client = keel.client();
    let started = Instant::now();
    let id = client
        .start("caller", &call("stall", policy(1, 10), Some(100)))
        .await?;
    let result = client.wait::<String>(&id, WAIT).await;
    let failure = result.as_ref().err().and_then(Error::failure);
    assert_eq!(
        failure.map(|f| &*f.kind),
        Some(Failure::TIMEOUT),
        "{result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "waited out the stall"
    );
    assert_eq!(attempts.numbers(), [1]);
    keel.shutdown().await;
    Ok(())
}

/// Panics on its first attempt, answers on later ones.
fn fragile(attempts: Attempts) -> impl Fn(ActivityContext, ()) -> StallFuture + Send + Sync {
    move |ctx, ()| {
        let attempt = attempts.record(&ctx);
        Box::pin(async move {
            assert!(attempt > 1, "boom on attempt {attempt}");
            Ok(format!("survived attempt {attempt}"))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_activity_is_retried() -> anyhow::Result<()> {
    let db = Db::new()?;
    let attempts = Attempts::default();
    let keel = builder(&db)
        .activity("fragile", fragile(attempts.clone()))
        .orchestration("handler", handler)
        .start()
        .await?;
    let client = keel.client();
    let id = client
        .start("handler", &call("fragile", policy(3, 10), None))
        .await?;
    let out: String = client.wait(&id, WAIT).await?;
    assert_eq!(out, "ok: survived attempt 2");
    assert_eq!(attempts.numbers(), [1, 2]);
    keel.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_without_retries_reaches_the_workflow() -> anyhow::Result<()> {
    let db = Db::new()?;
    let attempts = Attempts::default();
    let keel = builder(&db)
        .activity("fragile", fragile(attempts.clone()))
        .orchestration("handler", handler)
        .start()
        .await?;
    let client = keel.client();
    let id = client
        .start("handler", &call("fragile", RetryPolicy::never(), None))
        .await?;
    let out: String = client.wait(&id, WAIT).await?;
    assert!(out.starts_with("keel.panic: "), "{out}");
    assert!(out.contains("boom on attempt 1"), "{out}");
    assert_eq!(attempts.numbers(), [1]);
    keel.shutdown().await;
    Ok(())
}

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    item: String,
    quantity: u32,
}

static ORDER_RUNS: AtomicUsize = AtomicUsize::new(0);

async fn place(_ctx: ActivityContext, order: Order) -> Result<String, Failure> {
    ORDER_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(format!("{} x {}", order.quantity, order.item))
}

/// Places `order` (any JSON) with up to 3 attempts, 5 s apart; reports a failure as
/// `[kind, message, causes...]`.
async fn order_flow(
    ctx: OrchestrationContext,
    order: serde_json::Value,
) -> Result<Vec<String>, Failure> {
    let call = ctx
        .activity::<String, _>("place", &order)
        .retry(policy(3, 5_000));
    Ok(match call.await {
        Ok(out) => vec![out],
        Err(failure) => [failure.kind, failure.message]
            .into_iter()
            .chain(failure.causes)
            .collect(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_that_does_not_decode_fails_at_once() -> anyhow::Result<()> {
    let db = Db::new()?;
    let keel = builder(&db)
        .activity("place", place)
        .orchestration("order_flow", order_flow)
        .start()
        .await?;
    let client = keel.client();
    let started = Instant::now();
    let bad = serde_json::json!({ "item": "tea", "quantity": "three" });
    let good = serde_json::json!({ "item": "tea", "quantity": 3 });
    let bad = client.start("order_flow", &bad).await?;
    let good = client.start("order_flow", &good).await?;

    let report: Vec<String> = client.wait(&bad, WAIT).await?;
    // A retry would have come 5 s later: the failure came back after one attempt.
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(5),
        "retried? {elapsed:?} {report:?}"
    );
    assert_eq!(report[0], Failure::DECODE, "{report:?}");
    assert!(
        report[1].contains("Order"),
        "the type is not named: {report:?}"
    );
    assert!(
        report[1].contains("quantity"),
        "the field is not named: {report:?}"
    );
    assert!(
        report[2..].iter().any(|c| c.contains("place")),
        "{report:?}"
    );

    let out: Vec<String> = client.wait(&good, WAIT).await?;
    assert_eq!(out, ["3 x tea"]);
    assert_eq!(
        ORDER_RUNS.load(Ordering::SeqCst),
        1,
        "only the good order ran"
    );
    keel.shutdown().await;
    Ok(())
}
