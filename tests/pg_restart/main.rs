//! PostgreSQL restarted mid-run: three worker processes and a client process run the
//! scale-out workload (`tests/scale`) on PostgreSQL, and the server is restarted with
//! `pg_ctlcluster ... restart` while they work. The workers must ride the outage out
//! (the provider reports a lost server as retryable, and the worker retries), keep
//! running, and take up the work again; every workflow must complete with the right
//! output and every activity result be recorded once.
//!
//! A test binary of its own: restarting the server breaks every connection to it, so
//! no other test may run beside it (cargo runs test binaries one after another). The
//! server is started again when the test ends, whether it passed or not.

#[path = "../scale/check.rs"]
mod check;
#[path = "../scale/run.rs"]
mod run;
#[path = "../scale/workload.rs"]
mod workload;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

use check::{read_attempts, verify};
use run::{Run, postgres_backend, unix_millis};
use workload::{ACTIVITIES, Backend, WORKFLOWS};

/// The restart comes once three tenths of the activities have started.
const RESTART_AT: u64 = ACTIVITIES * 3 / 10;

/// How long each stage may take before the test gives up. Generous: the machine is
/// shared and slow, and running out means work was lost or stuck.
const STAGE: Duration = Duration::from_secs(90);

/// The local PostgreSQL cluster, driven with Debian's `pg_ctlcluster`.
#[derive(Debug, Clone)]
struct Cluster {
    version: String,
}

impl Cluster {
    /// The one cluster version installed under `/etc/postgresql`.
    fn find() -> anyhow::Result<Self> {
        let mut versions = Vec::new();
        for entry in std::fs::read_dir("/etc/postgresql").context("reading /etc/postgresql")? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                versions.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        match <[String; 1]>::try_from(versions) {
            Ok([version]) => Ok(Self { version }),
            Err(versions) => bail!("expected one version in /etc/postgresql, found {versions:?}"),
        }
    }

    /// Runs `pg_ctlcluster <version> main <action>`, bypassing systemd (there is none
    /// here); returns whether it succeeded.
    fn control(&self, action: &str) -> anyhow::Result<bool> {
        let status = Command::new("pg_ctlcluster")
            .arg("--skip-systemctl-redirect")
            .arg(&self.version)
            .arg("main")
            .arg(action)
            .stdout(Stdio::null())
            .status()
            .with_context(|| format!("running pg_ctlcluster {action}"))?;
        Ok(status.success())
    }
}

/// Starts the cluster when dropped unless it runs, so that a test failing mid-restart
/// leaves the server up for whatever runs next.
#[derive(Debug)]
struct StartOnDrop<'a>(&'a Cluster);

impl Drop for StartOnDrop<'_> {
    fn drop(&mut self) {
        // `status` succeeds only when the cluster runs.
        if !matches!(self.0.control("status"), Ok(true)) {
            let started = self.0.control("start");
            eprintln!("pg_restart: started PostgreSQL again: {started:?}");
        }
    }
}

/// How long after `from` the first new connection to the database succeeds.
async fn reachable_after(backend: &Backend, from: Instant) -> anyhow::Result<Duration> {
    let Backend::Postgres { url, .. } = backend else {
        bail!("the restart test runs on PostgreSQL only");
    };
    loop {
        if let Ok((client, connection)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await
        {
            let connection = tokio::spawn(connection);
            let answered = client.simple_query("SELECT 1").await.is_ok();
            drop(client);
            let _ = connection.await;
            if answered {
                return Ok(from.elapsed());
            }
        }
        ensure!(
            from.elapsed() < STAGE,
            "PostgreSQL is still unreachable {STAGE:?} after the restart began"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workers_ride_out_a_postgres_restart_and_every_workflow_completes() -> anyhow::Result<()>
{
    let cluster = Cluster::find()?;
    let guard = StartOnDrop(&cluster);
    let dir = tempfile::tempdir()?;
    let backend = postgres_backend("keel_pg_restart");
    drop(backend.provider().await?);
    eprintln!("pg_restart: {WORKFLOWS} workflows on {backend:?}");
    let mut run = Run::start(&backend, dir.path(), 3).await?;

    run.progress_to(RESTART_AT, STAGE).await?;
    let at = run.elapsed();
    let starts = run.activity_starts()?;
    let began = Instant::now();
    let began_ms = unix_millis();
    let restarting = cluster.clone();
    let restarted = tokio::task::spawn_blocking(move || restarting.control("restart")).await??;
    let command_took = began.elapsed();
    ensure!(restarted, "pg_ctlcluster restart failed");
    let outage = reachable_after(&backend, began).await?;
    let back_ms = unix_millis();
    eprintln!(
        "pg_restart: PostgreSQL restarted at {at:.1?}, {starts} activity attempts in; \
         pg_ctlcluster took {command_took:.1?}; new connections succeeded {outage:.1?} \
         after it began"
    );

    let summary = run.finish(STAGE).await?;
    eprintln!("pg_restart: {summary}");
    let logs = run.logs();
    let took_in_all = run.elapsed();
    drop(run);

    let report = verify(&backend, &logs).await?;
    eprintln!("pg_restart: {}", report.summary());
    let attempts = read_attempts(&logs)?;
    let mut times: Vec<u64> = attempts.iter().map(|a| a.at).collect();
    times.sort_unstable();
    let pause = times
        .windows(2)
        .filter(|pair| pair[1] >= began_ms)
        .map(|pair| pair[1] - pair[0])
        .max()
        .unwrap_or(0);
    let resumed = times.iter().find(|at| **at >= back_ms).map_or_else(
        || "none started".to_owned(),
        |at| format!("the first started {} ms", at - back_ms),
    );
    eprintln!(
        "pg_restart: the longest pause between activity starts from the restart on: \
         {pause} ms; once the server was back, {resumed} later"
    );
    report.ensure_clean()?;
    for (worker, _) in &logs {
        let after = attempts
            .iter()
            .filter(|a| a.worker == *worker && a.at >= back_ms)
            .count();
        ensure!(
            after > 0,
            "worker {worker} ran no activity after the restart ({})",
            report.summary()
        );
    }
    drop(guard);
    run::drop_backend(&backend).await?;
    eprintln!("pg_restart: passed; the run took {took_in_all:.1?} from the client's start");
    Ok(())
}
