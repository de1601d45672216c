//! Listing with filters, delayed starts, unregistered activities, and the metrics a
//! worker records.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::ensure;
use keel::prelude::*;
use keel::{Error, InstanceQuery, PageRequest};
use keel_tests::{Db, WAIT, test_options};

async fn echo(_ctx: ActivityContext, text: String) -> Result<String, Failure> {
    Ok(text)
}

async fn relay(ctx: OrchestrationContext, text: String) -> Result<String, Failure> {
    ctx.activity("echo", &text).await
}

async fn ask(ctx: OrchestrationContext, name: String) -> Result<String, Failure> {
    ctx.activity(name, &"hello").await
}

async fn greeting(ctx: OrchestrationContext, (): ()) -> Result<String, Failure> {
    ctx.signal::<String>("name")
        .await
        .map(|name| format!("hello {name}"))
}

fn builder(db: &Db) -> keel::KeelBuilder {
    Keel::builder()
        .sqlite(&db.path)
        .options(test_options())
        .activity("echo", echo)
        .orchestration("relay", relay)
        .orchestration("ask", ask)
        .orchestration("greeting", greeting)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_filters_by_status_name_and_tag() -> anyhow::Result<()> {
    let db = Db::new()?;
    let keel = builder(&db).start().await?;
    let client = keel.client();
    let eu = client
        .start("relay", "a")
        .id("eu-1")
        .tag("region", "eu")
        .await?;
    client
        .start("relay", "b")
        .id("us-1")
        .tag("region", "us")
        .await?;
    let waiting = client.start("greeting", &()).id("waiting").await?;
    let _: String = client.wait(&eu, WAIT).await?;
    let _: String = client.wait(&InstanceId::new("us-1")?, WAIT).await?;

    let ids = |page: keel::Page<keel::InstanceInfo>| -> Vec<String> {
        page.items
            .iter()
            .map(|info| info.id().to_string())
            .collect()
    };
    let tagged = InstanceQuery {
        tag: Some(("region".to_owned(), "eu".to_owned())),
        ..InstanceQuery::default()
    };
    assert_eq!(
        ids(client.list(tagged, PageRequest::first(10)).await?),
        ["eu-1"]
    );
    let named = InstanceQuery {
        name: Some("greeting".to_owned()),
        ..InstanceQuery::default()
    };
    assert_eq!(
        ids(client.list(named, PageRequest::first(10)).await?),
        ["waiting"]
    );
    let completed = InstanceQuery {
        statuses: vec![InstanceStatus::Completed],
        ..InstanceQuery::default()
    };
    assert_eq!(
        ids(client.list(completed, PageRequest::first(10)).await?),
        ["eu-1", "us-1"]
    );
    // Pages follow one another without gaps or repeats.
    let first = client
        .list(InstanceQuery::default(), PageRequest::first(2))
        .await?;
    let next = PageRequest {
        limit: 2,
        cursor: first.next.clone(),
    };
    let mut all = ids(first);
    all.extend(ids(client.list(InstanceQuery::default(), next).await?));
    assert_eq!(all, ["eu-1", "us-1", "waiting"]);

    client.signal(&waiting, "name", "ada").await?;
    assert_eq!(client.wait::<String>(&waiting, WAIT).await?, "hello ada");
    keel.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_start_waits_and_keeps_an_early_signal() -> anyhow::Result<()> {
    let db = Db::new()?;
    let keel = builder(&db).start().await?;
    let client = keel.client();
    let started = Instant::now();
    let id = client
        .start("greeting", &())
        .delay(Duration::from_millis(800))
        .await?;
    // Sent before the start is due: kept until the workflow runs and waits for it.
    client.signal(&id, "name", "grace").await?;
    assert_eq!(client.status(&id).await?.status(), InstanceStatus::Pending);
    assert_eq!(client.wait::<String>(&id, WAIT).await?, "hello grace");
    ensure!(
        started.elapsed() >= Duration::from_millis(800),
        "the delayed start ran after {:?}",
        started.elapsed()
    );
    keel.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unregistered_activity_fails_the_call_naming_what_is_registered() -> anyhow::Result<()> {
    let db = Db::new()?;
    let keel = builder(&db).start().await?;
    let client = keel.client();
    let id = client.start("ask", "translate").await?;
    let error = client.wait::<String>(&id, WAIT).await.unwrap_err();
    let Error::Failed { failure, .. } = &error else {
        anyhow::bail!("expected a failed workflow, got {error}");
    };
    assert_eq!(failure.kind, Failure::UNREGISTERED);
    assert!(failure.message.contains("\"translate\""), "{failure}");
    assert!(failure.message.contains("registered: echo"), "{failure}");
    // The registered one still works on the same worker.
    let ok = client.start("ask", "echo").await?;
    assert_eq!(client.wait::<String>(&ok, WAIT).await?, "hello");
    keel.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_records_its_metrics() -> anyhow::Result<()> {
    let recorded = Recorded::install();
    let db = Db::new()?;
    // Names of its own, so that other tests of this binary do not disturb the counts.
    let keel = Keel::builder()
        .sqlite(&db.path)
        .options(test_options())
        .activity("metered", echo)
        .orchestration(
            "metered-flow",
            |ctx: OrchestrationContext, text: String| async move {
                let first: String = ctx.activity("metered", &text).await?;
                ctx.activity::<String, _>("metered", &first).await
            },
        )
        .start()
        .await?;
    let client = keel.client();
    for n in 0..3 {
        let id = client.start("metered-flow", &format!("m{n}")).await?;
        let _: String = client.wait(&id, WAIT).await?;
    }
    keel.shutdown().await;

    let count = |name: &str, label: &str| recorded.sum(&format!("{name}{{{label}}}"));
    assert_eq!(
        count("keel_activities_started_total", "activity=metered"),
        6.0
    );
    assert_eq!(
        count("keel_activities_completed_total", "activity=metered"),
        6.0
    );
    assert_eq!(
        count("keel_activities_failed_total", "activity=metered"),
        0.0
    );
    assert_eq!(
        recorded.samples(r"keel_activity_schedule_to_start_seconds{activity=metered}"),
        6
    );
    assert_eq!(
        count(
            "keel_workflows_finished_total",
            "orchestration=metered-flow,status=completed"
        ),
        3.0
    );
    assert_eq!(
        recorded.samples("keel_workflow_duration_seconds{orchestration=metered-flow}"),
        3
    );
    ensure!(count("keel_turns_total", "outcome=acked") >= 9.0);
    ensure!(recorded.samples("keel_turn_duration_seconds{}") > 0);
    ensure!(count("keel_turn_cache_total", "result=hit") > 0.0);
    Ok(())
}

/// A recorder that keeps every sample, keyed `name{label=value,...}`. One per process:
/// installed by the first test that asks.
#[derive(Debug, Default)]
struct Recorded {
    samples: Mutex<BTreeMap<String, Vec<f64>>>,
}

#[derive(Debug)]
struct Handle {
    key: String,
    recorded: &'static Recorded,
}

impl Recorded {
    fn install() -> &'static Self {
        static RECORDED: OnceLock<&'static Recorded> = OnceLock::new();
        RECORDED.get_or_init(|| {
            let recorded: &'static Self = Box::leak(Box::default());
            let _ = metrics::set_global_recorder(recorded);
            recorded
        })
    }

    fn record(&self, key: &str, value: f64) {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        samples.entry(key.to_owned()).or_default().push(value);
    }

    fn sum(&self, key: &str) -> f64 {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        samples.get(key).map_or(0.0, |values| values.iter().sum())
    }

    fn samples(&self, key: &str) -> usize {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        samples.get(key).map_or(0, Vec::len)
    }

    fn handle(&'static self, key: &metrics::Key) -> Arc<Handle> {
        let labels: Vec<String> = key
            .labels()
            .map(|label| format!("{}={}", label.key(), label.value()))
            .collect();
        Arc::new(Handle {
            key: format!("{}{{{}}}", key.name(), labels.join(",")),
            recorded: self,
        })
    }
}

impl metrics::Recorder for &'static Recorded {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::from_arc(self.handle(key))
    }

    fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::from_arc(self.handle(key))
    }

    fn register_histogram(
        &self,
        key: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::from_arc(self.handle(key))
    }
}

impl metrics::CounterFn for Handle {
    #[allow(clippy::cast_precision_loss, reason = "test counts stay tiny")]
    fn increment(&self, value: u64) {
        self.recorded.record(&self.key, value as f64);
    }

    fn absolute(&self, _: u64) {}
}

impl metrics::GaugeFn for Handle {
    fn increment(&self, _: f64) {}
    fn decrement(&self, _: f64) {}
    fn set(&self, value: f64) {
        self.recorded.record(&self.key, value);
    }
}

impl metrics::HistogramFn for Handle {
    fn record(&self, value: f64) {
        self.recorded.record(&self.key, value);
    }
}
