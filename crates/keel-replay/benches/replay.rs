//! What replay costs: a full replay per history event, and one incremental turn of a
//! live execution at several history lengths.
//!
//! `cargo bench -p keel-replay`. The claim under test (DESIGN.md §2): a live execution's
//! turn costs the same whatever the length of the history behind it; only a cache miss
//! pays for the whole history, once per event.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{
    BatchSize, BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use keel_core::{
    Codec, Event, ExecutionId, Failure, InstanceId, Message, OpId, Payload, Timestamp,
};
use keel_replay::{
    Command, Execution, Orchestration, OrchestrationContext, Turn, TurnEnv, from_fn,
};

/// The history lengths measured, in events.
const LENGTHS: [u64; 3] = [10, 1_000, 100_000];

/// `steps` activities one after another, then done: `2 + 2 * steps` events.
async fn sequential(ctx: OrchestrationContext, steps: u64) -> Result<u64, Failure> {
    let mut sum = 0;
    for step in 0..steps {
        sum += ctx.activity::<u64, _>("step", &step).await?;
    }
    Ok(sum)
}

/// Activities one after another, for ever: every turn does the same work.
async fn endless(ctx: OrchestrationContext, (): ()) -> Result<(), Failure> {
    let mut step: u64 = 0;
    loop {
        let _: u64 = ctx.activity("step", &step).await?;
        step += 1;
    }
}

fn instance() -> InstanceId {
    InstanceId::new("bench-instance").expect("a valid instance id")
}

fn env() -> TurnEnv {
    TurnEnv {
        now: Timestamp::from_millis(1_000_000),
        seed: 7,
    }
}

fn encode<T: serde::Serialize + ?Sized>(value: &T) -> Payload {
    Codec::default().encode(value).expect("bench values encode")
}

fn start(input: Payload) -> Message {
    Message::Start {
        execution: ExecutionId::FIRST,
        name: "bench".into(),
        version: None,
        input,
        parent: None,
    }
}

fn done(op: OpId, output: &Payload) -> Message {
    Message::ActivityDone {
        execution: ExecutionId::FIRST,
        op,
        outcome: Ok(output.clone()),
    }
}

/// The activity a turn scheduled; every measured turn schedules exactly one.
fn next_op(turn: &Turn) -> OpId {
    match turn.commands.first() {
        Some(Command::ScheduleActivity { op, .. }) => *op,
        other => panic!("expected the next activity, got {other:?}"),
    }
}

/// Runs `code` with `input` turn by turn, answering each activity, until the history
/// holds `events` events; returns the history and, if still running, the live
/// execution with the activity it waits on.
fn drive(
    code: &Arc<dyn Orchestration>,
    input: Payload,
    events: u64,
) -> (Vec<Event>, Execution, OpId) {
    let mut live = Execution::new(instance(), ExecutionId::FIRST, 1, code.clone());
    let output = encode(&1_u64);
    let mut history = Vec::new();
    let mut turn = live
        .turn([start(input)], env())
        .expect("the start turn succeeds");
    loop {
        history.extend(turn.events.iter().cloned());
        let Some(Command::ScheduleActivity { op, .. }) = turn.commands.first() else {
            break;
        };
        let op = *op;
        if history.len() as u64 >= events {
            return (history, live, op);
        }
        turn = live
            .turn([done(op, &output)], env())
            .expect("the turn succeeds");
    }
    (history, live, OpId::from_raw(u64::MAX))
}

/// (a) `Execution::new` + `replay` of a finished sequential history, per event.
fn full_replay(c: &mut Criterion) {
    let code: Arc<dyn Orchestration> = Arc::new(from_fn(sequential));
    let mut group = c.benchmark_group("full_replay");
    group.measurement_time(Duration::from_secs(4));
    for events in LENGTHS {
        let steps = (events - 2) / 2;
        let (history, live, _) = drive(&code, encode(&steps), events);
        assert!(
            live.state().is_finished(),
            "the sequential history runs to its end"
        );
        assert_eq!(history.len() as u64, events);
        if events >= 100_000 {
            // ~50 ms an iteration: fewer, flat samples keep the run short.
            group.sample_size(10).sampling_mode(SamplingMode::Flat);
        } else {
            group.sample_size(20).sampling_mode(SamplingMode::Auto);
        }
        group.throughput(Throughput::Elements(events));
        group.bench_with_input(
            BenchmarkId::from_parameter(events),
            &history,
            |b, history| {
                b.iter_batched(
                    || history.clone(),
                    |history| {
                        let mut execution =
                            Execution::new(instance(), ExecutionId::FIRST, 1, code.clone());
                        execution.replay(history).expect("the history replays");
                        // Returned, so that dropping it happens outside the timing.
                        execution
                    },
                    BatchSize::LargeInput,
                );
            },
        );
    }
    group.finish();
}

/// (b) One turn of a live execution whose history holds `events` events: deliver the
/// outstanding activity's result, get the next activity.
///
/// Every measured turn adds two events. So that the history stays near its nominal
/// length, the execution is rebuilt (by replay, untimed) after each run of turns that
/// would grow it by 40 %: the 10-event case is measured between 10 and 14 events, the
/// 100,000-event case between 100,000 and 140,000.
#[expect(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "a benchmark measures wall-clock time; the ban keeps it out of the engine"
)]
fn incremental_turn(c: &mut Criterion) {
    let code: Arc<dyn Orchestration> = Arc::new(from_fn(endless));
    let output = encode(&1_u64);
    let mut group = c.benchmark_group("incremental_turn");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(4));
    for events in LENGTHS {
        let (history, _, waiting_on) = drive(&code, encode(&()), events);
        assert_eq!(history.len() as u64, events);
        let turns_per_build = (events / 5).max(1);
        let rebuild = || {
            let mut execution = Execution::new(instance(), ExecutionId::FIRST, 1, code.clone());
            execution
                .replay(history.clone())
                .expect("the history replays");
            execution
        };
        group.bench_function(BenchmarkId::from_parameter(events), |b| {
            b.iter_custom(|iters| {
                let mut elapsed = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let batch = left.min(turns_per_build);
                    left -= batch;
                    let mut execution = rebuild();
                    let mut op = waiting_on;
                    let started = std::time::Instant::now();
                    for _ in 0..batch {
                        let turn = execution
                            .turn([done(op, &output)], env())
                            .expect("the turn succeeds");
                        op = next_op(&turn);
                        black_box(turn);
                    }
                    elapsed += started.elapsed();
                    drop(execution);
                }
                elapsed
            });
        });
    }
    group.finish();
}

criterion_group!(benches, full_replay, incremental_turn);
criterion_main!(benches);
