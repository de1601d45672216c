//! Running the scale-out workload in several processes and checking what it left
//! behind; shared by `tests/scale` and `tests/pg_restart` (which includes this file by
//! path).
//!
//! A [`Run`] owns the worker and client processes: each is killed and reaped when the
//! run is dropped, and each also exits by itself when its standard input (held here)
//! closes, so a failing test leaves none behind.

#![allow(
    dead_code,
    reason = "compiled into two test binaries; each uses a part"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail, ensure};
use keel::{Client, Codec, EventKind, InstanceQuery, InstanceStatus, Keel, PageRequest};

use crate::workload::{
    self, Backend, SIGNAL, STEPS, WORKFLOWS, expected_output, has_timer, instance_id, late_signal,
    signal_value, step_value,
};

/// Milliseconds since the Unix epoch, the unit of the activity logs.
pub(crate) fn unix_millis() -> u64 {
    let since = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// The store for a test run: PostgreSQL, in a fresh schema, unless
/// `KEEL_SCALE_BACKEND=sqlite` asks for a SQLite file in `dir`. It is opened once here,
/// so that its tables exist before several processes open it at the same moment.
pub(crate) async fn test_backend(dir: &Path) -> anyhow::Result<Backend> {
    let backend = match std::env::var("KEEL_SCALE_BACKEND").as_deref() {
        Ok("sqlite") | Err(_) => Backend::Sqlite(dir.join("keel.db")),
        Ok(other) => bail!("KEEL_SCALE_BACKEND={other}: expected sqlite or postgres"),
    };
    drop(backend.provider().await?);
    Ok(backend)
}

/// Removes what the run left in the store, where that is not a temporary file.
pub(crate) async fn drop_backend(backend: &Backend) {
    match backend {
        Backend::Sqlite(_) => {}
    }
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
    /// Starts `workers` worker processes, numbered from 1, logging into `dir`, then the
    /// client process.
    pub(crate) fn start(backend: &Backend, dir: &Path, workers: u32) -> anyhow::Result<Self> {
        let began = Instant::now();
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

    /// How long since the processes were started.
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

/// One line of an activity log: `<worker> <instance> <op> <attempt> <unix ms>`.
#[derive(Debug, Clone)]
pub(crate) struct Attempt {
    pub(crate) worker: u32,
    pub(crate) instance: String,
    pub(crate) op: u64,
    pub(crate) attempt: u32,
    pub(crate) at: u64,
}

/// Every attempt in the logs.
pub(crate) fn read_attempts(logs: &[(u32, PathBuf)]) -> anyhow::Result<Vec<Attempt>> {
    let mut attempts = Vec::new();
    for (id, log) in logs {
        let text = match std::fs::read_to_string(log) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(error) => return Err(error).context("reading an activity log"),
        };
        for line in text.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let [worker, instance, op, attempt, at] = fields[..] else {
                bail!("malformed activity log line {line:?}");
            };
            let parsed = (worker.parse(), op.parse(), attempt.parse(), at.parse());
            let (Ok(worker), Ok(op), Ok(attempt), Ok(at)) = parsed else {
                bail!("malformed activity log line {line:?}");
            };
            ensure!(worker == *id, "worker {worker}'s line in worker {id}'s log");
            attempts.push(Attempt {
                worker,
                instance: instance.to_owned(),
                op,
                attempt,
                at,
            });
        }
    }
    Ok(attempts)
}

/// What the checks of the store and the logs found.
#[derive(Debug, Default)]
pub(crate) struct Report {
    /// Everything wrong, one line each.
    pub(crate) problems: Vec<String>,
    /// Activity attempts started, by worker.
    pub(crate) per_worker: BTreeMap<u32, u64>,
    /// Activities (instance, op) with a recorded result.
    pub(crate) activities: u64,
    /// Activities that started more than once, and the extra starts.
    pub(crate) repeated: u64,
    pub(crate) extra_starts: u64,
    /// Signals that arrived before their workflow waited, and after.
    pub(crate) signals_before_wait: u64,
    pub(crate) signals_while_waiting: u64,
    /// Timers fired, and the latest any fired after it was due.
    pub(crate) timers: u64,
    pub(crate) latest_timer: Duration,
}

impl Report {
    /// Fails with every problem found.
    pub(crate) fn ensure_clean(&self) -> anyhow::Result<()> {
        ensure!(
            self.problems.is_empty(),
            "{} problems:\n{}",
            self.problems.len(),
            self.problems.join("\n")
        );
        Ok(())
    }

    /// The figures, for the test's output.
    pub(crate) fn summary(&self) -> String {
        let workers: Vec<String> = self
            .per_worker
            .iter()
            .map(|(id, count)| format!("worker {id}: {count}"))
            .collect();
        format!(
            "activity attempts by worker: {}; {} activities recorded once each; {} ran more \
             than once ({} extra attempts); signals: {} before the wait, {} while waiting; \
             {} timers, the latest fired {:?} after it was due",
            workers.join(", "),
            self.activities,
            self.repeated,
            self.extra_starts,
            self.signals_before_wait,
            self.signals_while_waiting,
            self.timers,
            self.latest_timer,
        )
    }
}

/// Every instance in the store, following the pages.
async fn all_instances(client: &Client) -> anyhow::Result<Vec<keel::InstanceInfo>> {
    let mut all = Vec::new();
    let mut request = PageRequest::first(1000);
    loop {
        let page = client.list(InstanceQuery::default(), request).await?;
        all.extend(page.items);
        match page.next {
            Some(cursor) => {
                request = PageRequest {
                    limit: 1000,
                    cursor: Some(cursor),
                }
            }
            None => return Ok(all),
        }
    }
}

/// Checks the store and the activity logs after a run: exactly the workload's
/// instances, each completed with the right output, every activity result recorded
/// once, the signal delivered, timers fired; and which worker ran what.
pub(crate) async fn verify(backend: &Backend, logs: &[(u32, PathBuf)]) -> anyhow::Result<Report> {
    let client = Keel::builder()
        .provider(backend.provider().await?)
        .client()
        .await?;
    let mut report = Report::default();

    let instances = all_instances(&client).await?;
    let listed: BTreeSet<String> = instances.iter().map(|i| i.id().to_string()).collect();
    let expected: BTreeSet<String> = (0..WORKFLOWS).map(instance_id).collect();
    if instances.len() != expected.len() || listed != expected {
        report.problems.push(format!(
            "the store lists {} instances ({} distinct); missing {:?}, extra {:?}",
            instances.len(),
            listed.len(),
            expected.difference(&listed).collect::<Vec<_>>(),
            listed.difference(&expected).collect::<Vec<_>>(),
        ));
    }

    let mut scheduled = BTreeSet::new();
    let mut completed = BTreeSet::new();
    for n in 0..WORKFLOWS {
        check_instance(&client, n, &mut report, &mut scheduled, &mut completed).await?;
    }
    report.activities = u64::try_from(completed.len())?;

    let attempts = read_attempts(logs)?;
    for (id, _) in logs {
        report.per_worker.insert(*id, 0);
    }
    let mut runs: BTreeMap<(String, u64), u64> = BTreeMap::new();
    for attempt in &attempts {
        *report.per_worker.entry(attempt.worker).or_default() += 1;
        *runs
            .entry((attempt.instance.clone(), attempt.op))
            .or_default() += 1;
    }
    let ran: BTreeSet<(String, u64)> = runs.keys().cloned().collect();
    for (instance, op) in completed.difference(&ran) {
        let problem = format!("{instance}: activity #{op} has a result but never ran");
        report.problems.push(problem);
    }
    for (instance, op) in ran.difference(&scheduled) {
        let problem = format!("{instance}: activity #{op} ran but was never scheduled");
        report.problems.push(problem);
    }
    report.repeated = u64::try_from(runs.values().filter(|n| **n > 1).count())?;
    report.extra_starts = runs.values().map(|n| n - 1).sum();
    Ok(report)
}

/// Checks one workflow's status, output and history.
async fn check_instance(
    client: &Client,
    n: u64,
    report: &mut Report,
    scheduled: &mut BTreeSet<(String, u64)>,
    completed: &mut BTreeSet<(String, u64)>,
) -> anyhow::Result<()> {
    let name = instance_id(n);
    let id = keel::InstanceId::new(name.clone())?;
    let mut problems = Vec::new();
    let info = client.status(&id).await?;
    if info.status() != InstanceStatus::Completed {
        problems.push(format!("status {:?} ({:?})", info.status(), info.reason()));
    } else {
        let output: u64 = info.output()?;
        if output != expected_output(n) {
            problems.push(format!("output {output}, expected {}", expected_output(n)));
        }
    }

    let codec = Codec::default();
    let history = client.history(&id).await?;
    let mut started = 0;
    let mut ended = 0;
    let mut inputs = BTreeMap::new();
    let mut outputs: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut waiting_from = None;
    let mut signals = Vec::new();
    let mut timers_created = Vec::new();
    let mut timers_fired = Vec::new();
    for (position, event) in history.iter().enumerate() {
        match &event.kind {
            EventKind::ExecutionStarted { .. } => started += 1,
            EventKind::ExecutionCompleted { .. }
            | EventKind::ExecutionFailed { .. }
            | EventKind::ExecutionCancelled { .. } => ended += 1,
            EventKind::ActivityScheduled { op, input, .. } => {
                let input: workload::StepInput = codec.decode(input)?;
                if inputs.insert(op.get(), input).is_some() {
                    problems.push(format!("activity #{op} scheduled twice"));
                }
            }
            EventKind::ActivityCompleted { op, output } => {
                let output = codec.decode(output)?;
                outputs.entry(op.get()).or_default().push(output);
            }
            EventKind::ActivityFailed { op, failure } => {
                problems.push(format!("activity #{op} failed: {failure:?}"));
            }
            EventKind::CustomStatusSet {
                status: Some(_), ..
            } => waiting_from = waiting_from.or(Some(position)),
            EventKind::SignalReceived {
                name: signal,
                payload,
            } => {
                let value: u64 = codec.decode(payload)?;
                signals.push((signal.clone(), value, position));
            }
            EventKind::TimerCreated { fire_at, .. } => timers_created.push(*fire_at),
            EventKind::TimerFired { .. } => timers_fired.push(event.at),
            _ => {}
        }
    }
    if (started, ended) != (1, 1) {
        problems.push(format!(
            "{started} ExecutionStarted and {ended} ends in its history"
        ));
    }
    if inputs.len() as u64 != STEPS {
        problems.push(format!(
            "{} activities scheduled, expected {STEPS}",
            inputs.len()
        ));
    }
    for (op, input) in &inputs {
        match outputs.get(op).map(Vec::as_slice) {
            Some([output]) if *output == step_value(*input) => {}
            Some([output]) => problems.push(format!(
                "activity #{op} recorded {output}, expected {}",
                step_value(*input)
            )),
            None | Some([]) => problems.push(format!("activity #{op} has no result")),
            Some(many) => problems.push(format!("activity #{op} recorded {} results", many.len())),
        }
    }
    for op in outputs.keys().filter(|op| !inputs.contains_key(op)) {
        problems.push(format!(
            "a result for activity #{op}, which was never scheduled"
        ));
    }

    match signals.as_slice() {
        [(signal, value, position)] if signal == SIGNAL && *value == signal_value(n) => {
            let while_waiting = waiting_from.is_some_and(|from| *position > from);
            if while_waiting {
                report.signals_while_waiting += 1;
            } else {
                report.signals_before_wait += 1;
            }
            // The client sends a late signal only once the workflow shows it waits.
            if late_signal(n) && !while_waiting {
                problems.push(format!(
                    "its late signal is recorded at {position}, before it waited (from \
                     {waiting_from:?})"
                ));
            }
        }
        other => problems.push(format!(
            "signals received {other:?}, expected one {SIGNAL:?} with {}",
            signal_value(n)
        )),
    }

    let expected_timers = usize::from(has_timer(n));
    if timers_created.len() != expected_timers || timers_fired.len() != expected_timers {
        problems.push(format!(
            "{} timers created and {} fired, expected {expected_timers}",
            timers_created.len(),
            timers_fired.len()
        ));
    } else if let (Some(fire_at), Some(fired)) = (timers_created.first(), timers_fired.first()) {
        if fired < fire_at {
            problems.push(format!(
                "its timer due at {fire_at} fired early, at {fired}"
            ));
        }
        report.timers += 1;
        report.latest_timer = report
            .latest_timer
            .max(fired.saturating_duration_since(*fire_at));
    }

    scheduled.extend(inputs.keys().map(|op| (name.clone(), *op)));
    completed.extend(outputs.keys().map(|op| (name.clone(), *op)));
    report
        .problems
        .extend(problems.into_iter().map(|p| format!("{name}: {p}")));
    Ok(())
}
