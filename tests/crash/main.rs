//! Crash recovery: a worker process is killed with SIGKILL at random moments while it
//! runs 200 workflows of five activities each, restarted every time, and then left to
//! finish. Nothing may be lost or done twice where it counts: every workflow completes
//! with the right output, every activity result is recorded exactly once, and timers
//! that were pending when the worker died fire at their original time.
//!
//! The kills are seeded: set `KEEL_CRASH_SEED` to repeat a run's choice of moments
//! (the timing of the work around them still varies).

mod workload;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail, ensure};
use keel::{Client, Codec, EventKind, InstanceId, InstanceQuery, InstanceStatus, Keel};
use keel::{PageRequest, Timestamp};
use keel_tests::Db;

use workload::{LOCK, ORCHESTRATION, POLL, STEPS, TIMER, expected_output, has_timer, step_value};

/// Workflows started.
const WORKFLOWS: u64 = 200;

/// Times the worker is killed before it is left to finish.
const KILLS: u32 = 12;

/// The shortest and longest a worker lives before it is killed, in milliseconds.
const LIFE_MS: (u64, u64) = (100, 1_500);

/// How long the last worker gets to finish everything. Generous: the machine is shared
/// and slow, and running out means a workflow was lost or stuck.
const FINISH: Duration = Duration::from_secs(120);

/// The latest a timer may fire after its original time: a killed worker's lock on the
/// instance must expire, the next worker must look, and a busy machine needs slack.
/// A timer restarted by the crash would fire up to a whole `TIMER` late.
const TIMER_BOUND: Duration = Duration::from_secs(5);

const _: () = assert!(TIMER_BOUND.as_millis() >= LOCK.as_millis() + POLL.as_millis());
const _: () = assert!(TIMER.as_millis() > TIMER_BOUND.as_millis() + 2_000);

/// A small seeded generator (SplitMix64): enough to pick kill moments reproducibly.
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `low..=high`.
    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }
}

/// The seed from `KEEL_CRASH_SEED`, or from the clock.
fn seed() -> anyhow::Result<u64> {
    match std::env::var("KEEL_CRASH_SEED") {
        Ok(seed) => seed.parse().context("KEEL_CRASH_SEED is a number"),
        Err(_) => {
            let since = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?;
            Ok(u64::try_from(since.as_nanos() % u128::from(u64::MAX))?)
        }
    }
}

/// A running worker process, killed and reaped when dropped so that a failing test
/// leaves none behind (the worker also exits when its standard input closes).
#[derive(Debug)]
struct Worker {
    child: Child,
    generation: u32,
}

impl Worker {
    fn spawn(db: &Path, log: &Path, generation: u32) -> anyhow::Result<Self> {
        let child = Command::new(env!("CARGO_BIN_EXE_crash_worker"))
            .arg(db)
            .arg(log)
            .arg(generation.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning the crash worker")?;
        Ok(Self { child, generation })
    }

    /// Fails if the worker has exited on its own: it should run until killed.
    fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("worker {} exited by itself: {status}", self.generation);
        }
        Ok(())
    }

    /// SIGKILL (what `Child::kill` sends on Unix), then reap.
    fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Already reaped after `kill`; otherwise a failing test's worker.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn id(n: u64) -> anyhow::Result<InstanceId> {
    Ok(InstanceId::new(format!("wf-{n}"))?)
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

/// One line of the attempts log: `<instance> <op> <attempt> <generation>`.
#[derive(Debug)]
struct Attempt {
    attempt: u32,
    generation: u32,
}

/// The attempts log, by (instance, op).
fn read_attempts(log: &Path) -> anyhow::Result<BTreeMap<(String, u64), Vec<Attempt>>> {
    let text = std::fs::read_to_string(log).context("reading the attempts log")?;
    let mut attempts: BTreeMap<(String, u64), Vec<Attempt>> = BTreeMap::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let [instance, op, attempt, generation] = fields[..] else {
            bail!("malformed attempts log line {line:?}");
        };
        let parsed = (op.parse(), attempt.parse(), generation.parse());
        let (Ok(op), Ok(attempt), Ok(generation)) = parsed else {
            bail!("malformed attempts log line {line:?}");
        };
        let entry = attempts.entry((instance.to_owned(), op)).or_default();
        entry.push(Attempt {
            attempt,
            generation,
        });
    }
    Ok(attempts)
}

/// A timer of one workflow, as its history recorded it.
#[derive(Debug)]
struct TimerRecord {
    instance: String,
    created: Timestamp,
    fire_at: Timestamp,
    fired: Timestamp,
}

impl TimerRecord {
    /// How long after its original time it fired.
    fn delay(&self) -> Duration {
        self.fired.saturating_duration_since(self.fire_at)
    }
}

/// What the checks of the histories found.
#[derive(Debug, Default)]
struct Findings {
    problems: Vec<String>,
    /// (instance, op) of every activity scheduled.
    scheduled: BTreeSet<(String, u64)>,
    /// (instance, op) of every activity result recorded.
    completed: BTreeSet<(String, u64)>,
    timers: Vec<TimerRecord>,
}

/// Checks one workflow's status, output and history.
async fn check_instance(client: &Client, n: u64, found: &mut Findings) -> anyhow::Result<()> {
    let id = id(n)?;
    let name = id.to_string();
    let mut problem = |what: String| found.problems.push(format!("{name}: {what}"));
    let info = client.status(&id).await?;
    if info.status() != InstanceStatus::Completed {
        problem(format!("status {:?} ({:?})", info.status(), info.reason()));
    } else {
        let output: u64 = info.output()?;
        if output != expected_output(n) {
            problem(format!("output {output}, expected {}", expected_output(n)));
        }
    }

    let codec = Codec::default();
    let history = client.history(&id).await?;
    let mut started = 0;
    let mut ended = 0;
    let mut inputs = BTreeMap::new();
    let mut outputs: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut created = Vec::new();
    let mut fired = Vec::new();
    for event in &history {
        match &event.kind {
            EventKind::ExecutionStarted { .. } => started += 1,
            EventKind::ExecutionCompleted { .. }
            | EventKind::ExecutionFailed { .. }
            | EventKind::ExecutionCancelled { .. } => ended += 1,
            EventKind::ActivityScheduled { op, input, .. } => {
                let input: workload::StepInput = codec.decode(input)?;
                if inputs.insert(op.get(), input).is_some() {
                    problem(format!("activity {op} scheduled twice"));
                }
            }
            EventKind::ActivityCompleted { op, output } => {
                outputs
                    .entry(op.get())
                    .or_default()
                    .push(codec.decode(output)?);
            }
            EventKind::ActivityFailed { op, failure } => {
                problem(format!("activity {op} failed: {failure:?}"));
            }
            EventKind::TimerCreated { op, fire_at } => created.push((*op, event.at, *fire_at)),
            EventKind::TimerFired { op } => fired.push((*op, event.at)),
            _ => {}
        }
    }
    if (started, ended) != (1, 1) {
        problem(format!(
            "{started} ExecutionStarted and {ended} ends in its history"
        ));
    }
    if inputs.len() as u64 != STEPS {
        problem(format!(
            "{} activities scheduled, expected {STEPS}",
            inputs.len()
        ));
    }
    for (op, input) in &inputs {
        match outputs.get(op).map(Vec::as_slice) {
            Some([output]) if *output == step_value(*input) => {}
            Some([output]) => problem(format!(
                "activity #{op} recorded {output}, expected {}",
                step_value(*input)
            )),
            None | Some([]) => problem(format!("activity #{op} has no result")),
            Some(many) => problem(format!("activity #{op} recorded {} results", many.len())),
        }
    }
    for op in outputs.keys().filter(|op| !inputs.contains_key(op)) {
        problem(format!(
            "a result for activity #{op}, which was never scheduled"
        ));
    }

    let expected_timers = usize::from(has_timer(n));
    if created.len() != expected_timers || fired.len() != expected_timers {
        problem(format!(
            "{} timers created and {} fired, expected {expected_timers}",
            created.len(),
            fired.len()
        ));
    } else if let (Some(&(op, created, fire_at)), Some(&(fired_op, fired))) =
        (created.first(), fired.first())
    {
        if op != fired_op {
            problem(format!("timer {op} created but timer {fired_op} fired"));
        }
        // Due a sleep's length after the turn that set it (or after an earlier point
        // of the orchestration), never later.
        let due_in = fire_at.saturating_duration_since(created);
        if due_in.is_zero() || due_in > TIMER {
            problem(format!("timer {op} set at {created} to fire at {fire_at}"));
        }
        if fired < fire_at {
            problem(format!(
                "timer {op} due at {fire_at} fired early, at {fired}"
            ));
        }
        found.timers.push(TimerRecord {
            instance: name.clone(),
            created,
            fire_at,
            fired,
        });
    }

    found
        .scheduled
        .extend(inputs.keys().map(|op| (name.clone(), *op)));
    found
        .completed
        .extend(outputs.keys().map(|op| (name.clone(), *op)));
    Ok(())
}

/// Waits for every workflow to finish, up to `deadline`; names the ones that did not.
async fn wait_for_all(client: &Client, deadline: Instant) -> anyhow::Result<()> {
    let mut unfinished = Vec::new();
    for n in 0..WORKFLOWS {
        let id = id(n)?;
        let left = deadline.saturating_duration_since(Instant::now());
        match client.wait::<u64>(&id, left).await {
            Ok(_) => {}
            Err(keel::Error::Timeout { status, reason, .. }) => {
                unfinished.push(format!("{id}: {status:?} {reason:?}"));
            }
            Err(error) => unfinished.push(format!("{id}: {error}")),
        }
    }
    ensure!(
        unfinished.is_empty(),
        "{} workflows did not complete within {FINISH:?} of the last restart: {unfinished:#?}",
        unfinished.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_at_random_moments_loses_nothing_and_records_everything_once()
-> anyhow::Result<()> {
    let began = Instant::now();
    let db = Db::new()?;
    let log = db.dir.path().join("attempts.log");
    let client = Keel::builder().sqlite(&db.path).client().await?;
    for n in 0..WORKFLOWS {
        client
            .start(ORCHESTRATION, &n)
            .id(format!("wf-{n}"))
            .await?;
    }

    let seed = seed()?;
    eprintln!("crash: seed {seed} (KEEL_CRASH_SEED={seed} repeats the kill moments)");
    let mut rng = SplitMix64(seed);
    let mut kills = Vec::new();
    for generation in 0..KILLS {
        let mut worker = Worker::spawn(&db.path, &log, generation)?;
        let life = Duration::from_millis(rng.between(LIFE_MS.0, LIFE_MS.1));
        tokio::time::sleep(life).await;
        worker.ensure_running()?;
        kills.push(Timestamp::from_system_time(SystemTime::now()));
        worker.kill()?;
    }
    let done_when_killing_stopped = all_instances(&client)
        .await?
        .iter()
        .filter(|info| info.status() == InstanceStatus::Completed)
        .count();
    eprintln!(
        "crash: {KILLS} kills in {:.1?}; {done_when_killing_stopped} of {WORKFLOWS} workflows \
         had completed by then",
        began.elapsed()
    );

    let mut last = Worker::spawn(&db.path, &log, KILLS)?;
    let finishing = Instant::now();
    wait_for_all(&client, finishing + FINISH).await?;
    eprintln!(
        "crash: the last worker finished the rest in {:.1?}",
        finishing.elapsed()
    );
    last.ensure_running()?;
    last.kill()?;

    // No lost and no extra instance.
    let instances = all_instances(&client).await?;
    let listed: BTreeSet<String> = instances.iter().map(|i| i.id().to_string()).collect();
    let expected: BTreeSet<String> = (0..WORKFLOWS).map(|n| format!("wf-{n}")).collect();
    ensure!(
        instances.len() == expected.len() && listed == expected,
        "the store lists {} instances ({} distinct); missing {:?}, extra {:?}",
        instances.len(),
        listed.len(),
        expected.difference(&listed).collect::<Vec<_>>(),
        listed.difference(&expected).collect::<Vec<_>>(),
    );

    let mut found = Findings::default();
    for n in 0..WORKFLOWS {
        check_instance(&client, n, &mut found).await?;
    }

    // Activities ran at least once, and only the ones that were scheduled ran.
    let attempts = read_attempts(&log)?;
    let ran: BTreeSet<(String, u64)> = attempts.keys().cloned().collect();
    for (instance, op) in found.completed.difference(&ran) {
        let problem = format!("{instance}: activity #{op} has a result but never ran");
        found.problems.push(problem);
    }
    for (instance, op) in ran.difference(&found.scheduled) {
        let problem = format!("{instance}: activity #{op} ran but was never scheduled");
        found.problems.push(problem);
    }
    let executions: usize = attempts.values().map(Vec::len).sum();
    let repeated: Vec<_> = attempts.iter().filter(|(_, runs)| runs.len() > 1).collect();
    let repeated_in_one_process = repeated
        .iter()
        .filter(|(_, runs)| {
            let generations: BTreeSet<u32> = runs.iter().map(|run| run.generation).collect();
            generations.len() < runs.len()
        })
        .count();
    let highest_attempt = attempts
        .values()
        .flatten()
        .map(|run| run.attempt)
        .max()
        .unwrap_or(0);
    eprintln!(
        "crash: {executions} activity executions for {} activities; {} activities ran more \
         than once ({} extra executions; {repeated_in_one_process} of them repeated within \
         one worker process); highest attempt number {highest_attempt}",
        attempts.len(),
        repeated.len(),
        executions - attempts.len(),
    );

    // Timers fire at their original time, delayed at most by the recovery.
    let pending_across_kill = |timer: &TimerRecord| {
        kills
            .iter()
            .any(|kill| timer.created <= *kill && *kill < timer.fire_at)
    };
    // A kill this long after the timer was set would have pushed a restarted timer
    // past the bound: these timers tell a kept timer from a restarted one.
    let telling = |timer: &TimerRecord| {
        kills.iter().any(|kill| {
            *kill < timer.fire_at && kill.saturating_duration_since(timer.created) > TIMER_BOUND
        })
    };
    for timer in &found.timers {
        if timer.delay() > TIMER_BOUND {
            let problem = format!(
                "{}: timer due at {} fired {:?} late (bound {TIMER_BOUND:?}); pending across \
                 a kill: {}",
                timer.instance,
                timer.fire_at,
                timer.delay(),
                pending_across_kill(timer)
            );
            found.problems.push(problem);
        }
    }
    let across: Vec<&TimerRecord> = found
        .timers
        .iter()
        .filter(|t| pending_across_kill(t))
        .collect();
    let max_delay = |timers: &mut dyn Iterator<Item = &TimerRecord>| {
        let delay = timers.map(TimerRecord::delay).max();
        delay.map_or_else(|| "-".to_owned(), |delay| format!("{delay:?}"))
    };
    eprintln!(
        "crash: {} timers; {} pending across a kill ({} of them with a kill more than \
         {TIMER_BOUND:?} after they were set, which a restarted timer would not survive); \
         latest firing after the original time: {} for those, {} for the others",
        found.timers.len(),
        across.len(),
        found.timers.iter().filter(|t| telling(t)).count(),
        max_delay(&mut across.iter().copied()),
        max_delay(&mut found.timers.iter().filter(|t| !pending_across_kill(t))),
    );

    let problems = &found.problems;
    ensure!(
        problems.is_empty(),
        "{} problems (seed {seed}):\n{}",
        problems.len(),
        problems.join("\n")
    );
    ensure!(
        found.timers.iter().any(telling),
        "no timer was pending across a kill long enough to tell a kept timer from a \
         restarted one (seed {seed})"
    );
    eprintln!("crash: passed in {:.1?}", began.elapsed());
    Ok(())
}
