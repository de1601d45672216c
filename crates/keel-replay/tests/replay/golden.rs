//! Golden histories: stored histories in `tests/histories/*.json`, each replayed on a
//! fresh execution of a named orchestration and checked against the outcome it records.
//!
//! A golden file pins down what the engine once wrote. If a change to the engine or to
//! the event format breaks replay of these files, it would break replay of real stored
//! histories too. Each file is
//! `{"orchestration": name, "version": 1, "history": [Event...], "expect": outcome}`,
//! where the outcome is one of `{"completed": value}`, `{"failed": {"kind": ..}}` (the
//! failure's fields to compare), `{"cancelled": reason}`, `{"continued_as_new": input}`,
//! `"running"` or `{"nondeterminism": {"position": n, ..}}`.
//!
//! The files are written by the engine itself: `KEEL_BLESS=1 cargo test -p keel-replay
//! --test replay golden` drives every scenario below with real turns and rewrites them
//! (then checks them as usual). Without it the test only reads and checks.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use futures_util::future::join;
use keel_core::{Event, EventKind, ExecutionId, Failure, InstanceId, Message, OpId, SideEffect};
use keel_replay::{
    Command, Either, Execution, ExecutionState, Orchestration, OrchestrationContext, ReplayError,
    Turn, TurnEnv, from_fn, join_all, select2,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::support::*;

/// The version every golden orchestration is registered as.
const VERSION: u32 = 1;

fn histories_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("histories")
}

// ---------------------------------------------------------------------------------
// The file format.
// ---------------------------------------------------------------------------------

/// One golden file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Golden {
    /// The name of the orchestration (see [`orchestration`]) that replays the history.
    orchestration: String,
    /// The registered version of its code.
    version: u32,
    /// The stored history.
    history: Vec<Event>,
    /// How the execution stands after replaying it.
    expect: Expect,
}

/// How an execution stands after replaying a golden history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Expect {
    /// Completed with this output.
    Completed(Value),
    /// Failed with a failure whose fields include these.
    Failed(Map<String, Value>),
    /// Cancelled with this reason.
    Cancelled(String),
    /// Continued as new with this input.
    ContinuedAsNew(Value),
    /// Still waiting on something durable.
    Running,
    /// Replay fails: the code disagrees with the history at `position`.
    Nondeterminism {
        position: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        recorded: Option<Summary>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        issued: Option<Summary>,
    },
}

/// An event or command as a nondeterminism error names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Summary {
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
}

impl Summary {
    fn of(summary: &keel_replay::EventSummary) -> Self {
        Self {
            kind: summary.kind.to_owned(),
            name: summary.name.clone(),
        }
    }
}

impl Expect {
    /// The expectation that describes `state`, as blessing records it.
    fn of(state: &ExecutionState) -> Self {
        match state {
            ExecutionState::Completed { output } => Self::Completed(decode(output)),
            ExecutionState::Failed { failure } => {
                let mut fields = Map::new();
                fields.insert("kind".to_owned(), json!(failure.kind));
                fields.insert("message".to_owned(), json!(failure.message));
                Self::Failed(fields)
            }
            ExecutionState::Cancelled { reason } => Self::Cancelled(reason.clone()),
            ExecutionState::ContinuedAsNew { input, .. } => Self::ContinuedAsNew(decode(input)),
            ExecutionState::Running => Self::Running,
            ExecutionState::NotStarted => panic!("a golden scenario never started its execution"),
        }
    }

    /// Whether `state` is the one expected; `Err` says how it differs.
    fn check_state(&self, state: &ExecutionState) -> Result<(), String> {
        let matches = match (self, state) {
            (Self::Completed(want), ExecutionState::Completed { output }) => {
                decode_value(output).as_ref() == Some(want)
            }
            (Self::Failed(want), ExecutionState::Failed { failure }) => {
                let got = serde_json::to_value(failure).unwrap_or(Value::Null);
                want.iter()
                    .all(|(field, value)| got.get(field) == Some(value))
            }
            (Self::Cancelled(want), ExecutionState::Cancelled { reason }) => want == reason,
            (Self::ContinuedAsNew(want), ExecutionState::ContinuedAsNew { input, .. }) => {
                decode_value(input).as_ref() == Some(want)
            }
            (Self::Running, ExecutionState::Running) => true,
            _ => false,
        };
        if matches {
            Ok(())
        } else {
            Err(format!("expected {self:?}, but the execution is {state:?}"))
        }
    }
}

fn decode_value(payload: &keel_core::Payload) -> Option<Value> {
    CODEC.decode(payload).ok()
}

// ---------------------------------------------------------------------------------
// The orchestrations golden files name.
// ---------------------------------------------------------------------------------

/// Every orchestration a golden file may name.
const ORCHESTRATIONS: &[&str] = &[
    "sequence",
    "join",
    "fetch_with_timeout",
    "approval",
    "compensation",
    "children",
    "counter",
    "side_effects",
    "cancellable",
    "patched",
    "calls_b",
];

/// The code a golden file names, by name.
fn orchestration(name: &str) -> Option<Arc<dyn Orchestration>> {
    let code: Arc<dyn Orchestration> = match name {
        "sequence" => Arc::new(from_fn(sequence)),
        "join" => Arc::new(from_fn(join_prices)),
        "fetch_with_timeout" => Arc::new(from_fn(fetch_with_timeout)),
        "approval" => Arc::new(from_fn(approval)),
        "compensation" => Arc::new(from_fn(compensation)),
        "children" => Arc::new(from_fn(children)),
        "counter" => Arc::new(from_fn(counter)),
        "side_effects" => Arc::new(from_fn(side_effects)),
        "cancellable" => Arc::new(from_fn(cancellable)),
        "patched" => Arc::new(from_fn(patched)),
        "calls_b" => Arc::new(from_fn(calls_b)),
        _ => return None,
    };
    Some(code)
}

/// Two activities, the second fed the first's output.
async fn sequence(ctx: OrchestrationContext, order: String) -> Result<Vec<String>, Failure> {
    let reserved: String = ctx.activity("reserve", &order).await?;
    let shipped: String = ctx.activity("ship", &reserved).await?;
    Ok(vec![reserved, shipped])
}

/// Prices every item at once and sums them.
async fn join_prices(ctx: OrchestrationContext, items: Vec<String>) -> Result<u32, Failure> {
    let prices = join_all(
        items
            .iter()
            .map(|item| ctx.activity::<u32, _>("price", item)),
    )
    .await;
    prices.into_iter().sum()
}

/// An activity raced against a 30 s timer; the loser is cancelled.
async fn fetch_with_timeout(ctx: OrchestrationContext, url: String) -> Result<String, Failure> {
    let fetch = ctx.activity::<String, _>("fetch", &url);
    match select2(fetch, ctx.sleep(Duration::from_secs(30))).await {
        Either::Left(fetched) => fetched,
        Either::Right(()) => Err(Failure::new("Timeout", format!("{url} took over 30 s"))),
    }
}

/// Drafts a document, then waits for two approvals.
async fn approval(ctx: OrchestrationContext, doc: String) -> Result<Vec<String>, Failure> {
    let draft: String = ctx.activity("draft", &doc).await?;
    let first: String = ctx.signal("approve").await?;
    let second: String = ctx.signal("approve").await?;
    Ok(vec![draft, first, second])
}

/// Charges; when the charge fails, releases the stock instead.
async fn compensation(ctx: OrchestrationContext, amount: u32) -> Result<String, Failure> {
    match ctx.activity::<String, _>("charge", &amount).await {
        Ok(receipt) => Ok(receipt),
        Err(failure) => {
            let released: String = ctx.activity("release", &amount).await?;
            Ok(format!("{released} after {}", failure.kind))
        }
    }
}

/// Two children in turn; a failure of either fails the parent.
async fn children(ctx: OrchestrationContext, order: String) -> Result<Vec<String>, Failure> {
    let reserved: String = ctx.child("reserve_stock", &order).await?;
    let charged: String = ctx.child("charge_card", &order).await?;
    Ok(vec![reserved, charged])
}

/// Ticks, then continues as new with the next count until it reaches 3.
async fn counter(ctx: OrchestrationContext, count: u32) -> Result<u32, Failure> {
    let ticked: u32 = ctx.activity("tick", &count).await?;
    if ticked < 3 {
        return ctx.continue_as_new(&ticked).await;
    }
    Ok(ticked)
}

/// Reads the time, a UUID and a random number, and sets its custom status around an
/// activity: replay must hand back the recorded values, not fresh ones.
async fn side_effects(ctx: OrchestrationContext, (): ()) -> Result<Value, Failure> {
    let now = ctx.now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let id = ctx.uuid();
    let random = ctx.random();
    ctx.set_custom_status(&"working")?;
    let worked: String = ctx.activity("work", &id).await?;
    ctx.clear_custom_status();
    Ok(json!({
        "now_ms": u64::try_from(now.as_millis()).unwrap_or(u64::MAX),
        "uuid": id,
        "random": format!("{random:016x}"),
        "worked": worked,
    }))
}

/// Waits on an activity and an hour-long timer together: cancelled, it cancels both.
async fn cancellable(ctx: OrchestrationContext, report: String) -> Result<String, Failure> {
    let build = ctx.activity::<String, _>("build_report", &report);
    let (built, ()) = join(build, ctx.sleep(Duration::from_secs(3600))).await;
    built
}

/// A patched step: histories from before the patch take the old path.
async fn patched(ctx: OrchestrationContext, order: String) -> Result<String, Failure> {
    if ctx.patched("x") {
        let checked: String = ctx.activity("new_step", &order).await?;
        Ok(format!("new path: {checked}"))
    } else {
        old_step(&ctx, &order).await
    }
}

/// The code of `patched` before the patch existed.
async fn before_patch(ctx: OrchestrationContext, order: String) -> Result<String, Failure> {
    old_step(&ctx, &order).await
}

async fn old_step(ctx: &OrchestrationContext, order: &str) -> Result<String, Failure> {
    let checked: String = ctx.activity("old_step", order).await?;
    Ok(format!("old path: {checked}"))
}

/// Calls activity "b"; its golden history was recorded by code that called "a".
async fn calls_b(ctx: OrchestrationContext, input: String) -> Result<String, Failure> {
    ctx.activity("b", &input).await
}

/// The code that recorded `calls_b`'s history.
async fn calls_a(ctx: OrchestrationContext, input: String) -> Result<String, Failure> {
    ctx.activity("a", &input).await
}

// ---------------------------------------------------------------------------------
// The scenarios that write the files (bless mode).
// ---------------------------------------------------------------------------------

/// A golden file and how to drive the turns that write it.
struct Scenario {
    /// The file's stem in `tests/histories`.
    file: &'static str,
    /// The orchestration the file names.
    orchestration: &'static str,
    /// Runs the turns; returns the history and the outcome to expect.
    drive: fn() -> Recorded,
}

struct Recorded {
    history: Vec<Event>,
    expect: Expect,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        file: "sequence",
        orchestration: "sequence",
        drive: drive_sequence,
    },
    Scenario {
        file: "sequence_running",
        orchestration: "sequence",
        drive: drive_sequence_running,
    },
    Scenario {
        file: "join",
        orchestration: "join",
        drive: drive_join,
    },
    Scenario {
        file: "select_timer_loser",
        orchestration: "fetch_with_timeout",
        drive: drive_select_timer_loser,
    },
    Scenario {
        file: "select_timer_wins",
        orchestration: "fetch_with_timeout",
        drive: drive_select_timer_wins,
    },
    Scenario {
        file: "signals_buffered",
        orchestration: "approval",
        drive: drive_signals_buffered,
    },
    Scenario {
        file: "activity_failure",
        orchestration: "compensation",
        drive: drive_activity_failure,
    },
    Scenario {
        file: "child_failure",
        orchestration: "children",
        drive: drive_child_failure,
    },
    Scenario {
        file: "continue_as_new",
        orchestration: "counter",
        drive: drive_continue_as_new,
    },
    Scenario {
        file: "side_effects",
        orchestration: "side_effects",
        drive: drive_side_effects,
    },
    Scenario {
        file: "cancel_running",
        orchestration: "cancellable",
        drive: drive_cancel_running,
    },
    Scenario {
        file: "patched_before",
        orchestration: "patched",
        drive: drive_patched_before,
    },
    Scenario {
        file: "patched_after",
        orchestration: "patched",
        drive: drive_patched_after,
    },
    Scenario {
        file: "nondeterministic",
        orchestration: "calls_b",
        drive: drive_nondeterministic,
    },
];

fn harness(name: &str) -> Harness {
    let code = orchestration(name).unwrap_or_else(|| panic!("no orchestration {name:?}"));
    Harness::with_arc(code)
}

/// Starts the execution as the orchestration `name`.
fn start<T: Serialize + ?Sized>(h: &mut Harness, name: &str, input: &T) -> Turn {
    let start = Message::Start {
        execution: h.execution,
        name: name.to_owned(),
        version: None,
        input: encode(input),
        parent: None,
    };
    h.send(vec![start])
}

/// Moves the harness's clock on, as time passes between turns.
fn later(h: &mut Harness, secs: u64) {
    h.now = h.now.saturating_add(Duration::from_secs(secs));
}

fn activity_op(turn: &Turn, name: &str) -> OpId {
    scheduled(turn)
        .into_iter()
        .find_map(|(op, scheduled)| (scheduled == name).then_some(op))
        .unwrap_or_else(|| {
            panic!(
                "the turn scheduled no activity {name:?}: {:?}",
                turn.commands
            )
        })
}

fn child_op(turn: &Turn, name: &str) -> OpId {
    turn.commands
        .iter()
        .find_map(|command| match command {
            Command::StartChild {
                op, name: started, ..
            } if started == name => Some(*op),
            _ => None,
        })
        .unwrap_or_else(|| panic!("the turn started no child {name:?}: {:?}", turn.commands))
}

/// The history so far, and the state the execution reached as the expectation.
fn outcome(h: Harness) -> Recorded {
    let expect = Expect::of(h.live.state());
    Recorded {
        history: h.history,
        expect,
    }
}

fn drive_sequence() -> Recorded {
    let mut h = harness("sequence");
    let turn = start(&mut h, "sequence", "order-7");
    later(&mut h, 2);
    let turn = h.send(vec![
        h.done(activity_op(&turn, "reserve"), &"reserved order-7"),
    ]);
    later(&mut h, 3);
    h.send(vec![h.done(activity_op(&turn, "ship"), &"shipped order-7")]);
    outcome(h)
}

fn drive_sequence_running() -> Recorded {
    let mut h = harness("sequence");
    let turn = start(&mut h, "sequence", "order-8");
    later(&mut h, 2);
    h.send(vec![
        h.done(activity_op(&turn, "reserve"), &"reserved order-8"),
    ]);
    outcome(h)
}

fn drive_join() -> Recorded {
    let mut h = harness("join");
    let turn = start(&mut h, "join", &["apple", "pear", "plum"]);
    let ops: Vec<OpId> = scheduled(&turn).into_iter().map(|(op, _)| op).collect();
    // Out of order and over two turns: replay must follow the history's order.
    later(&mut h, 1);
    h.send(vec![h.done(ops[2], &7_u32)]);
    later(&mut h, 1);
    h.send(vec![h.done(ops[0], &3_u32), h.done(ops[1], &5_u32)]);
    outcome(h)
}

fn drive_select_timer_loser() -> Recorded {
    let mut h = harness("fetch_with_timeout");
    let turn = start(&mut h, "fetch_with_timeout", "https://example.com/a");
    later(&mut h, 4);
    h.send(vec![h.done(activity_op(&turn, "fetch"), &"<html>a</html>")]);
    outcome(h)
}

fn drive_select_timer_wins() -> Recorded {
    let mut h = harness("fetch_with_timeout");
    let turn = start(&mut h, "fetch_with_timeout", "https://example.com/slow");
    let (timer, fire_at) = timers(&turn)[0];
    h.now = fire_at;
    h.send(vec![h.fired(timer)]);
    outcome(h)
}

fn drive_signals_buffered() -> Recorded {
    let mut h = harness("approval");
    let turn = start(&mut h, "approval", "contract");
    // Both approvals arrive while the code still waits on its draft: they are buffered.
    later(&mut h, 1);
    h.send(vec![h.signal("approve", &"alice")]);
    later(&mut h, 1);
    h.send(vec![h.signal("approve", &"bob")]);
    later(&mut h, 1);
    h.send(vec![h.done(activity_op(&turn, "draft"), &"contract v1")]);
    outcome(h)
}

fn drive_activity_failure() -> Recorded {
    let mut h = harness("compensation");
    let turn = start(&mut h, "compensation", &42_u32);
    later(&mut h, 1);
    let declined = Failure::new("CardDeclined", "insufficient funds").retryable(false);
    let turn = h.send(vec![h.failed(activity_op(&turn, "charge"), declined)]);
    later(&mut h, 1);
    h.send(vec![h.done(activity_op(&turn, "release"), &"released 42")]);
    outcome(h)
}

fn drive_child_failure() -> Recorded {
    let mut h = harness("children");
    let turn = start(&mut h, "children", "order-9");
    later(&mut h, 5);
    let turn =
        h.send(vec![h.child_done(
            child_op(&turn, "reserve_stock"),
            Ok(encode("reserved")),
        )]);
    later(&mut h, 5);
    let declined = Failure::new("PaymentDeclined", "card declined").retryable(false);
    h.send(vec![
        h.child_done(child_op(&turn, "charge_card"), Err(declined)),
    ]);
    outcome(h)
}

fn drive_continue_as_new() -> Recorded {
    let mut h = harness("counter");
    let turn = start(&mut h, "counter", &0_u32);
    later(&mut h, 1);
    h.send(vec![h.done(activity_op(&turn, "tick"), &1_u32)]);
    outcome(h)
}

fn drive_side_effects() -> Recorded {
    let mut h = harness("side_effects");
    let turn = start(&mut h, "side_effects", &());
    later(&mut h, 1);
    h.send(vec![h.done(activity_op(&turn, "work"), &"done")]);
    outcome(h)
}

fn drive_cancel_running() -> Recorded {
    let mut h = harness("cancellable");
    start(&mut h, "cancellable", "q3");
    later(&mut h, 60);
    h.send(vec![Message::Cancel {
        reason: "operator request".to_owned(),
    }]);
    outcome(h)
}

fn drive_patched_before() -> Recorded {
    // Recorded by the code as it was before the patch, replayed by the patched code.
    let mut h = Harness::new(from_fn(before_patch));
    let turn = start(&mut h, "patched", "order-1");
    later(&mut h, 1);
    h.send(vec![
        h.done(activity_op(&turn, "old_step"), &"checked the old way"),
    ]);
    outcome(h)
}

fn drive_patched_after() -> Recorded {
    let mut h = harness("patched");
    let turn = start(&mut h, "patched", "order-2");
    later(&mut h, 1);
    h.send(vec![
        h.done(activity_op(&turn, "new_step"), &"checked the new way"),
    ]);
    outcome(h)
}

fn drive_nondeterministic() -> Recorded {
    // Recorded by code that called "a"; the orchestration it names calls "b".
    let mut h = Harness::new(from_fn(calls_a));
    let turn = start(&mut h, "calls_b", "input");
    later(&mut h, 1);
    h.send(vec![h.done(activity_op(&turn, "a"), &"from a")]);
    let summary = |kind: &str, name: &str| {
        Some(Summary {
            kind: kind.to_owned(),
            name: Some(name.to_owned()),
        })
    };
    let expect = Expect::Nondeterminism {
        position: 1,
        recorded: summary("ActivityScheduled", "a"),
        issued: summary("ActivityScheduled", "b"),
    };
    Recorded {
        history: h.history,
        expect,
    }
}

fn bless(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    for scenario in SCENARIOS {
        let Recorded { history, expect } = (scenario.drive)();
        let golden = Golden {
            orchestration: scenario.orchestration.to_owned(),
            version: VERSION,
            history,
            expect,
        };
        let path = dir.join(format!("{}.json", scenario.file));
        let text = serde_json::to_string_pretty(&golden).expect("golden files serialise");
        std::fs::write(&path, text + "\n")
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
}

// ---------------------------------------------------------------------------------
// The check.
// ---------------------------------------------------------------------------------

/// Parses, replays and checks one golden file; returns its history for the coverage
/// count. Every error names the file.
fn check_file(path: &Path) -> Result<Vec<Event>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
    let golden: Golden = serde_json::from_str(&text)
        .map_err(|e| format!("does not parse as a golden history: {e}"))?;
    let code = orchestration(&golden.orchestration).ok_or_else(|| {
        format!(
            "names the unknown orchestration {:?} (known: {})",
            golden.orchestration,
            ORCHESTRATIONS.join(", ")
        )
    })?;
    let instance = InstanceId::new("test-instance").map_err(|e| e.to_string())?;
    let mut execution = Execution::new(instance, ExecutionId::FIRST, golden.version, code);
    let replayed = execution.replay(golden.history.clone());

    if let Expect::Nondeterminism {
        position,
        recorded,
        issued,
    } = &golden.expect
    {
        return match replayed {
            Err(ReplayError::Nondeterminism {
                position: at,
                recorded: got_recorded,
                issued: got_issued,
            }) if at == *position
                && recorded
                    .as_ref()
                    .is_none_or(|want| *want == Summary::of(&got_recorded))
                && issued.as_ref().is_none_or(|want| {
                    Some(want) == got_issued.as_ref().map(Summary::of).as_ref()
                }) =>
            {
                Ok(golden.history)
            }
            other => Err(format!(
                "expected {:?}, but replay gave {other:?}",
                golden.expect
            )),
        };
    }

    replayed.map_err(|e| format!("replay failed: {e}"))?;
    let applied = execution.history_len();
    if applied != golden.history.len() as u64 {
        return Err(format!(
            "replay applied {applied} of the history's {} events",
            golden.history.len()
        ));
    }
    golden.expect.check_state(execution.state())?;

    // With nothing new to apply, a turn must add nothing: no events, no commands.
    let before = execution.state().clone();
    let env = TurnEnv {
        now: keel_core::Timestamp::from_millis(9_000_000),
        seed: 99,
    };
    let idle = execution
        .turn(Vec::new(), env)
        .map_err(|e| format!("an empty turn after replay failed: {e}"))?;
    if !idle.events.is_empty() || !idle.commands.is_empty() || idle.state != before {
        return Err(format!(
            "an empty turn after replay was not empty: {idle:?}"
        ));
    }
    Ok(golden.history)
}

/// The variants serde knows for `T`: asked of serde itself, so that a variant added
/// later shows up here without anyone updating a list.
fn serde_variants<T: DeserializeOwned + std::fmt::Debug>() -> Vec<String> {
    let probe = r#"{"NoSuchVariant": null}"#;
    let error = match serde_json::from_str::<T>(probe) {
        Ok(value) => panic!("the probe variant deserialised as {value:?}"),
        Err(error) => error.to_string(),
    };
    // serde says: unknown variant `NoSuchVariant`, expected one of `A`, `B`, ...
    let names: Vec<String> = error
        .split_once("expected")
        .map(|(_, expected)| {
            expected
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    assert!(
        names.len() > 1,
        "cannot read the variant list of {} from serde's error: {error}",
        std::any::type_name::<T>()
    );
    names
}

/// Every variant a golden file must contain: each event kind, with side effects split
/// by the kind of value they record.
fn all_variants() -> BTreeSet<String> {
    let side_effects = serde_variants::<SideEffect>();
    serde_variants::<EventKind>()
        .into_iter()
        .flat_map(|kind| {
            if kind == "SideEffectRecorded" {
                side_effects
                    .iter()
                    .map(|value| format!("{kind}({value})"))
                    .collect()
            } else {
                vec![kind]
            }
        })
        .collect()
}

/// The variant an event counts for in [`all_variants`].
fn variant(kind: &EventKind) -> String {
    match kind {
        EventKind::SideEffectRecorded { value, .. } => {
            // Named by hand (a u128 does not fit serde_json's `Value`); the match is
            // exhaustive, so a new kind of side effect cannot be missed here.
            let tag = match value {
                SideEffect::Time(_) => "Time",
                SideEffect::Uuid(_) => "Uuid",
                SideEffect::Random(_) => "Random",
            };
            format!("{}({tag})", kind.name())
        }
        other => other.name().to_owned(),
    }
}

#[test]
fn golden_histories_replay_to_their_recorded_outcome() {
    let dir = histories_dir();
    if std::env::var_os("KEEL_BLESS").is_some_and(|v| v == "1") {
        bless(&dir);
    }

    let mut problems = Vec::new();
    for scenario in SCENARIOS {
        let path = dir.join(format!("{}.json", scenario.file));
        if !path.is_file() {
            problems.push(format!(
                "{}: the golden file is missing (KEEL_BLESS=1 cargo test -p keel-replay --test replay golden writes it)",
                path.display()
            ));
        }
    }

    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .collect();
    files.sort();
    let mut covered = BTreeSet::new();
    let mut checked = 0;
    for path in files {
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if path.extension().is_none_or(|ext| ext != "json") {
            problems.push(format!(
                "{}: not a golden history (those end in .json)",
                path.display()
            ));
            continue;
        }
        checked += 1;
        match check_file(&path) {
            Ok(history) => covered.extend(history.iter().map(|event| variant(&event.kind))),
            Err(problem) => problems.push(format!("{}: {problem}", path.display())),
        }
    }
    if checked == 0 {
        problems.push(format!("{}: holds no golden histories", dir.display()));
    }

    let missing: Vec<String> = all_variants().difference(&covered).cloned().collect();
    if !missing.is_empty() {
        problems.push(format!(
            "no golden history contains these event variants: {}",
            missing.join(", ")
        ));
    }
    assert!(
        problems.is_empty(),
        "{} golden problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}
