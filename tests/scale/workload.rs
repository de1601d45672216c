//! The workload of the scale-out tests, shared by the tests (`tests/scale`,
//! `tests/pg_restart`), the worker processes (`tests/src/bin/scale_worker.rs`) and the
//! client process (`tests/src/bin/scale_client.rs`), which all include this file by
//! path: the orchestration, its arithmetic, the signal, the workers' timings and the
//! store they share. One source, so the outputs the test expects cannot drift from what
//! the workers compute.

#![allow(
    dead_code,
    reason = "compiled into the tests and both binaries; each uses a part"
)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use keel::prelude::*;
use keel::sqlite::{SqliteOptions, SqliteProvider};
use keel::{Provider, join_all};
use keel_postgres::{PostgresOptions, PostgresProvider};

/// The orchestration's registered name.
pub(crate) const ORCHESTRATION: &str = "scale";

/// The activity's registered name.
pub(crate) const STEP: &str = "step";

/// The name of the signal every workflow waits for after its second step.
pub(crate) const SIGNAL: &str = "go";

/// The custom status a workflow sets in the turn in which it starts waiting for the
/// signal: the client sends the late signals only to workflows showing it.
pub(crate) const WAITING: &str = "waiting for go";

/// The tag that tells the client which workflows get their signal late.
pub(crate) const LATE_TAG: (&str, &str) = ("signal", "late");

/// Workflows the client starts.
pub(crate) const WORKFLOWS: u64 = 500;

/// Activities per workflow.
pub(crate) const STEPS: u64 = 5;

/// Every activity execution of the run when none is repeated: progress is measured
/// against it.
pub(crate) const ACTIVITIES: u64 = WORKFLOWS * STEPS;

/// The durable sleep of the workflows that have one.
pub(crate) const TIMER: Duration = Duration::from_secs(1);

/// How long an instance lock and an activity lease last: a killed worker's claims
/// block their work this long. Leases are renewed every third of it.
pub(crate) const LOCK: Duration = Duration::from_secs(3);

/// How long a worker told to stop lets its running work finish.
pub(crate) const SHUTDOWN: Duration = Duration::from_secs(10);

/// At most this many activities run at once in one worker: small enough that no
/// worker can claim the whole queue, so the work spreads over all of them.
pub(crate) const CONCURRENCY: usize = 8;

/// The modulus of the workload's arithmetic.
const MODULUS: u64 = 1_000_000_007;

/// The input of one activity: the workflow's number, the step's index, the value so far.
pub(crate) type StepInput = (u64, u64, u64);

/// The file a worker creates once it runs, next to its activity log.
pub(crate) fn ready_file(log: &Path) -> PathBuf {
    log.with_extension("ready")
}

/// The instance id of workflow `n`.
pub(crate) fn instance_id(n: u64) -> String {
    format!("scale-{n}")
}

/// The workflow number of an instance id, if it is one of ours.
pub(crate) fn workflow_number(id: &str) -> Option<u64> {
    id.strip_prefix("scale-")?.parse().ok()
}

/// Whether workflow `n` sleeps durably after its first step (one in two).
pub(crate) fn has_timer(n: u64) -> bool {
    n.is_multiple_of(2)
}

/// Whether the client signals workflow `n` only once it waits (one in two, crossed with
/// the timers so that every combination occurs); the others get theirs right after the
/// start, long before they wait.
pub(crate) fn late_signal(n: u64) -> bool {
    n % 4 >= 2
}

/// Whether workflow `n` runs its last two steps concurrently (one in three).
pub(crate) fn has_fan_out(n: u64) -> bool {
    n.is_multiple_of(3)
}

/// The data of workflow `n`'s signal.
pub(crate) fn signal_value(n: u64) -> u64 {
    n * 1_000 + 17
}

/// What one step computes: deterministic, and different for every (n, index, value).
pub(crate) fn step_value((n, index, value): StepInput) -> u64 {
    (value * 31 + n * 10 + index + 1) % MODULUS
}

/// How long step `index` of workflow `n` works: 20 to 59 ms, spread evenly.
pub(crate) fn step_duration(n: u64, index: u64) -> Duration {
    let spread = (n * 7919 + index * 104_729) % 40;
    Duration::from_millis(20 + spread)
}

/// The output workflow `n` must complete with, computed the way [`scale`] computes it.
pub(crate) fn expected_output(n: u64) -> u64 {
    let mut value = step_value((n, 0, n));
    value = step_value((n, 1, value));
    value = (value + signal_value(n)) % MODULUS;
    value = step_value((n, 2, value));
    if has_fan_out(n) {
        step_value((n, 3, value)) + step_value((n, 4, value))
    } else {
        value = step_value((n, 3, value));
        step_value((n, 4, value))
    }
}

/// The orchestration: two steps, a durable sleep between them in some workflows, a wait
/// for the client's signal, whose data feeds the three steps after it; the last two
/// concurrent in some workflows.
pub(crate) async fn scale(ctx: OrchestrationContext, n: u64) -> Result<u64, Failure> {
    let mut value: u64 = ctx.activity(STEP, &(n, 0, n)).await?;
    if has_timer(n) {
        ctx.sleep(TIMER).await;
    }
    value = ctx.activity(STEP, &(n, 1, value)).await?;
    ctx.set_custom_status(WAITING)?;
    let signal: u64 = ctx.signal(SIGNAL).await?;
    ctx.clear_custom_status();
    value = (value + signal) % MODULUS;
    value = ctx.activity(STEP, &(n, 2, value)).await?;
    if has_fan_out(n) {
        let last = [3, 4].map(|index| ctx.activity::<u64, _>(STEP, &(n, index, value)));
        let mut sum = 0;
        for output in join_all(last).await {
            sum += output?;
        }
        Ok(sum)
    } else {
        value = ctx.activity(STEP, &(n, 3, value)).await?;
        ctx.activity(STEP, &(n, 4, value)).await
    }
}

/// The store the processes of one run share.
#[derive(Debug, Clone)]
pub(crate) enum Backend {
    /// One SQLite file: several processes can share it; wake-ups across processes come
    /// from polling only.
    Sqlite(PathBuf),
    /// One schema of a PostgreSQL database: wake-ups across processes come by
    /// `LISTEN/NOTIFY`.
    Postgres {
        /// The database's URL.
        url: String,
        /// The schema holding the run's tables.
        schema: String,
    },
}

impl Backend {
    /// The command-line arguments that name this store to a worker or client process.
    pub(crate) fn args(&self) -> Vec<String> {
        match self {
            Self::Sqlite(path) => vec!["sqlite".to_owned(), path.display().to_string()],
            Self::Postgres { url, schema } => {
                vec!["postgres".to_owned(), url.clone(), schema.clone()]
            }
        }
    }

    /// Reads the store back from arguments made by [`Backend::args`].
    pub(crate) fn from_args(args: &mut impl Iterator<Item = String>) -> anyhow::Result<Self> {
        match args.next().as_deref() {
            Some("sqlite") => {
                let path = args.next().context("sqlite needs a database path")?;
                Ok(Self::Sqlite(PathBuf::from(path)))
            }
            Some("postgres") => {
                let url = args.next().context("postgres needs a URL")?;
                let schema = args.next().context("postgres needs a schema")?;
                Ok(Self::Postgres { url, schema })
            }
            other => bail!(
                "unknown backend {other:?}: expected `sqlite <path>` or `postgres <url> <schema>`"
            ),
        }
    }

    /// Opens the store.
    pub(crate) async fn provider(&self) -> anyhow::Result<Arc<dyn Provider>> {
        match self {
            Self::Sqlite(path) => {
                // Four processes contend for the one writer lock: wait for it longer
                // than the default before reporting the store busy.
                let options = SqliteOptions::new().busy_timeout(Duration::from_secs(20));
                let provider = SqliteProvider::open_with(path, options)
                    .await
                    .with_context(|| format!("opening {}", path.display()))?;
                Ok(Arc::new(provider))
            }
            Self::Postgres { url, schema } => {
                // A worker runs at most eight activities, two turn lanes and their
                // commits at once; six connections keep four processes well inside
                // the server's limit. Connecting fails fast while it restarts, and the
                // caller retries.
                let options = PostgresOptions::new()
                    .schema(schema)
                    .pool_size(6)
                    .connect_timeout(Duration::from_secs(2));
                let provider = PostgresProvider::connect(url, options)
                    .await
                    .with_context(|| format!("connecting to {url}, schema {schema}"))?;
                Ok(Arc::new(provider))
            }
        }
    }

    /// The longest an idle dispatcher waits before it looks for work again. SQLite
    /// shared by processes has no wake-ups across them, so it polls often; PostgreSQL
    /// notifies, and the poll only covers a lost notification (or a restart).
    fn poll_interval(&self) -> Duration {
        match self {
            Self::Sqlite(_) => Duration::from_millis(100),
            Self::Postgres { .. } => Duration::from_millis(500),
        }
    }

    /// The worker's options: short locks and leases so a killed worker's claims expire
    /// quickly, a bounded number of activities at once, a shutdown bound.
    pub(crate) fn worker_options(&self) -> WorkerOptions {
        WorkerOptions::default()
            .lock_duration(LOCK)
            .lease_duration(LOCK)
            .max_poll_interval(self.poll_interval())
            .max_concurrent_activities(CONCURRENCY)
            .activity_batch(CONCURRENCY)
            .orchestration_batch(20)
            .shutdown_timeout(SHUTDOWN)
            .turn_retry_delay(Duration::from_millis(50))
            .queue_depth_interval(None)
    }
}
