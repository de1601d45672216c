//! Checking what a scale-out run left behind: the store's instances and histories, and
//! the workers' activity logs. Shared by `tests/scale` and `tests/pg_restart` (which
//! includes this file by path).

#![allow(
    dead_code,
    reason = "compiled into two test binaries; each uses a part"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use keel::{Client, Codec, EventKind, InstanceQuery, InstanceStatus, Keel, PageRequest};

use crate::workload::{
    self, Backend, SIGNAL, STEPS, WORKFLOWS, expected_output, has_timer, instance_id, late_signal,
    signal_value, step_value,
};

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
    /// Activities that started more than once, by the worker of their first start.
    pub(crate) repeated_after: BTreeMap<u32, u64>,
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
        let after: Vec<String> = self
            .repeated_after
            .iter()
            .map(|(id, count)| format!("{count} first started by worker {id}"))
            .collect();
        format!(
            "activity attempts by worker: {}; {} activities recorded once each; {} ran more \
             than once ({} extra attempts; {}); signals: {} before the wait, {} while \
             waiting; {} timers, the latest fired {:?} after it was due",
            workers.join(", "),
            self.activities,
            self.repeated,
            self.extra_starts,
            after.join(", "),
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
    let mut runs: BTreeMap<(String, u64), Vec<&Attempt>> = BTreeMap::new();
    for attempt in &attempts {
        *report.per_worker.entry(attempt.worker).or_default() += 1;
        let key = (attempt.instance.clone(), attempt.op);
        runs.entry(key).or_default().push(attempt);
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
    for starts in runs.values().filter(|starts| starts.len() > 1) {
        report.repeated += 1;
        report.extra_starts += u64::try_from(starts.len() - 1)?;
        if let Some(first) = starts.iter().min_by_key(|start| start.at) {
            *report.repeated_after.entry(first.worker).or_default() += 1;
        }
    }
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
