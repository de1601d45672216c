//! Running the scale-out workload in several processes; shared by `tests/scale` and
//! `tests/pg_restart` (which includes this file by path).
//!
//! A [`Run`] owns the worker and client processes: each is killed and reaped when the
//! run is dropped, and each also exits by itself when its standard input (held here)
//! closes, so a failing test leaves none behind.

#![allow(
    dead_code,
    reason = "compiled into two test binaries; each uses a part"
)]

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail, ensure};

use crate::workload::{Backend, ready_file};

/// How long a worker process may take to start.
const READY: Duration = Duration::from_secs(60);

/// Milliseconds since the Unix epoch, the unit of the activity logs.
pub(crate) fn unix_millis() -> u64 {
    let since = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// The PostgreSQL database the tests use unless `KEEL_POSTGRES_URL` names another.
pub(crate) const POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A fresh schema of the test database, named after `prefix`, the process and the time.
pub(crate) fn postgres_backend(prefix: &str) -> Backend {
    let url = std::env::var("KEEL_POSTGRES_URL").unwrap_or_else(|_| POSTGRES_URL.to_owned());
    let schema = format!("{prefix}_{}_{}", std::process::id(), unix_millis());
    Backend::Postgres { url, schema }
}

/// The store for a test run: PostgreSQL, in a fresh schema, unless
/// `KEEL_SCALE_BACKEND=sqlite` asks for a SQLite file in `dir`. It is opened once here,
/// so that a missing database fails the test at once and the tables exist before
/// several processes open the store at the same moment.
pub(crate) async fn test_backend(dir: &Path, prefix: &str) -> anyhow::Result<Backend> {
    let backend = match std::env::var("KEEL_SCALE_BACKEND").as_deref() {
        Ok("sqlite") => Backend::Sqlite(dir.join("keel.db")),
        Ok("postgres") | Err(_) => postgres_backend(prefix),
        Ok(other) => bail!("KEEL_SCALE_BACKEND={other}: expected sqlite or postgres"),
    };
    drop(backend.provider().await?);
    Ok(backend)
}

/// Removes the run's schema from PostgreSQL (a SQLite file goes with its temporary
/// directory). Called after a run that passed: a failed run's schema stays, to be
/// looked at.
pub(crate) async fn drop_backend(backend: &Backend) -> anyhow::Result<()> {
    let Backend::Postgres { url, schema } = backend else {
        return Ok(());
    };
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let connection = tokio::spawn(connection);
    // The name is ours (a prefix, a process id and a time), never outside input; an
    // identifier cannot be a query parameter.
    let statement = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
    client.batch_execute(&statement).await?;
    drop(client);
    let _ = connection.await;
    Ok(())
}

/// A child process, killed and reaped when dropped.
#[derive(Debug)]
struct Process {
    name: String,
    child: Child,
}

impl Process {
    fn spawn(name: String, command: &mut Command) -> anyhow::Result<Self> {
        let child = command
            .stdin(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawning {name}"))?;
        Ok(Self { name, child })
    }

    /// Its exit status, if it has exited.
    fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        let status = self.child.try_wait();
        status.with_context(|| format!("checking on {}", self.name))
    }

    /// Fails if it has exited: it should still be running.
    fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.exited()? {
            bail!("{} exited by itself: {status}", self.name);
        }
        Ok(())
    }

    /// SIGKILL (what `Child::kill` sends on Unix), then reap.
    fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM, through `kill(1)`: the standard library sends only SIGKILL.
    fn terminate(&self) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .context("running kill -TERM")?;
        ensure!(status.success(), "kill -TERM {}: {status}", self.name);
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Already reaped when it exited or was killed; otherwise a failing test's.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What happened to a worker.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Fate {
    /// Still running.
    Running,
    /// SIGKILLed at this Unix time (ms).
    Killed(u64),
    /// Sent SIGTERM at this Unix time (ms); exited cleanly this long after.
    Stopped(u64, Duration),
}

#[derive(Debug)]
struct WorkerProcess {
    id: u32,
    process: Process,
    log: PathBuf,
    fate: Fate,
}

/// Worker processes and a client process running the workload on one store.
#[derive(Debug)]
pub(crate) struct Run {
    workers: Vec<WorkerProcess>,
    client: Option<Process>,
    began: Instant,
}

impl Run {
    /// Starts `workers` worker processes, numbered from 1, logging into `dir`, and once
    /// they all run, the client process (so that every worker has its chance at the
    /// work from the start).
    pub(crate) async fn start(backend: &Backend, dir: &Path, workers: u32) -> anyhow::Result<Self> {
        let mut spawned = Vec::new();
        for id in 1..=workers {
            let log = dir.join(format!("worker-{id}.log"));
            let process = Process::spawn(
                format!("worker {id}"),
                Command::new(env!("CARGO_BIN_EXE_scale_worker"))
                    .arg(id.to_string())
                    .arg(&log)
                    .args(backend.args())
                    .stdout(Stdio::null()),
            )?;
            spawned.push(WorkerProcess {
                id,
                process,
                log,
                fate: Fate::Running,
            });
        }
        let deadline = Instant::now() + READY;
        for worker in &mut spawned {
            while !ready_file(&worker.log).exists() {
                worker.process.ensure_running()?;
                ensure!(
                    Instant::now() < deadline,
                    "worker {} did not start within {READY:?}",
                    worker.id
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let began = Instant::now();
        let client = Process::spawn(
            "the client".to_owned(),
            Command::new(env!("CARGO_BIN_EXE_scale_client"))
                .args(backend.args())
                .stdout(Stdio::piped()),
        )?;
        Ok(Self {
            workers: spawned,
            client: Some(client),
            began,
        })
    }

    /// How long since the client was started.
    pub(crate) fn elapsed(&self) -> Duration {
        self.began.elapsed()
    }

    fn worker(&mut self, id: u32) -> anyhow::Result<&mut WorkerProcess> {
        let found = self.workers.iter_mut().find(|w| w.id == id);
        found.with_context(|| format!("no worker {id}"))
    }

    /// The activity logs, by worker.
    pub(crate) fn logs(&self) -> Vec<(u32, PathBuf)> {
        self.workers.iter().map(|w| (w.id, w.log.clone())).collect()
    }

    /// What happened to each worker.
    pub(crate) fn fates(&self) -> BTreeMap<u32, Fate> {
        self.workers.iter().map(|w| (w.id, w.fate)).collect()
    }

    /// Activity attempts started so far, in all workers.
    pub(crate) fn activity_starts(&self) -> anyhow::Result<u64> {
        let mut lines = 0;
        for worker in &self.workers {
            match std::fs::read(&worker.log) {
                Ok(text) => lines += text.iter().filter(|b| **b == b'\n').count(),
                // Not created before the worker's first activity.
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(error).context("reading an activity log"),
            }
        }
        Ok(u64::try_from(lines)?)
    }

    /// Fails if a worker that should run has exited, or the client has failed.
    fn check_processes(&mut self) -> anyhow::Result<()> {
        for worker in &mut self.workers {
            if matches!(worker.fate, Fate::Running) {
                worker.process.ensure_running()?;
            }
        }
        if let Some(client) = &mut self.client
            && let Some(status) = client.exited()?
        {
            bail!("the client exited with {status} before the run reached its next stage");
        }
        Ok(())
    }

    /// Waits until `target` activity attempts have started, watching the processes.
    pub(crate) async fn progress_to(
        &mut self,
        target: u64,
        within: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            self.check_processes()?;
            let starts = self.activity_starts()?;
            if starts >= target {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "only {starts} of the {target} activity attempts expected by now started \
                 within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILLs worker `id`.
    pub(crate) fn kill(&mut self, id: u32) -> anyhow::Result<()> {
        let worker = self.worker(id)?;
        worker.process.ensure_running()?;
        worker.fate = Fate::Killed(unix_millis());
        worker.process.kill()
    }

    /// Sends worker `id` SIGTERM and waits for it to exit, which it must do cleanly
    /// within `bound`; returns how long it took.
    pub(crate) async fn stop(&mut self, id: u32, bound: Duration) -> anyhow::Result<Duration> {
        let worker = self.worker(id)?;
        worker.process.ensure_running()?;
        let sent = Instant::now();
        let sent_at = unix_millis();
        worker.process.terminate()?;
        loop {
            if let Some(status) = worker.process.exited()? {
                let took = sent.elapsed();
                ensure!(
                    status.success(),
                    "worker {id} exited with {status} after SIGTERM"
                );
                ensure!(
                    took <= bound,
                    "worker {id} took {took:?} to stop after SIGTERM; the bound is {bound:?}"
                );
                worker.fate = Fate::Stopped(sent_at, took);
                return Ok(took);
            }
            ensure!(
                sent.elapsed() <= bound,
                "worker {id} still runs {bound:?} after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits up to `within` for the client to exit; it must succeed, and the workers
    /// not stopped on purpose must still run. Returns the client's summary line.
    pub(crate) async fn finish(&mut self, within: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + within;
        let mut client = self
            .client
            .take()
            .context("the client was finished already")?;
        let status = loop {
            if let Some(status) = client.exited()? {
                break status;
            }
            for worker in &mut self.workers {
                if matches!(worker.fate, Fate::Running) {
                    worker.process.ensure_running()?;
                }
            }
            ensure!(
                Instant::now() < deadline,
                "the client did not finish within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut summary = String::new();
        if let Some(stdout) = &mut client.child.stdout {
            stdout.read_to_string(&mut summary)?;
        }
        ensure!(status.success(), "the client failed: {status}; {summary}");
        for worker in &mut self.workers {
            if matches!(worker.fate, Fate::Running) {
                worker.process.ensure_running()?;
            }
        }
        Ok(summary.trim().to_owned())
    }
}
