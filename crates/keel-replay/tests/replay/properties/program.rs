//! Random orchestration programs: a small tree of durable operations, its proptest
//! strategy, and the orchestration that interprets it.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use keel_core::{Failure, Payload, Timestamp};
use keel_replay::{Orchestration, OrchestrationContext, join_all, select};
use proptest::prelude::*;

use crate::support::CODEC;

const ACTIVITIES: [&str; 3] = ["a0", "a1", "a2"];
const CHILDREN: [&str; 2] = ["c0", "c1"];
const SIGNALS: [&str; 2] = ["s0", "s1"];
const PATCHES: [&str; 2] = ["p0", "p1"];
/// The most leaves a generated program has.
const MAX_LEAVES: usize = 25;

/// A value the code takes from the context, recorded once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Effect {
    Now,
    Uuid,
    Random,
    Status,
    Patch(&'static str),
}

/// One step of a program. Leaves are durable operations; the rest combine them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Step {
    Activity(String),
    Sleep(u64),
    Signal(String),
    Child(String),
    Effect(Effect),
    Seq(Vec<Step>),
    Join(Vec<Step>),
    Select(Vec<Step>),
}

/// How the program ends once its body is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    Complete,
    Fail,
    ContinueAsNew,
}

/// A whole program: its body, and how it ends with the values the body collected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Program {
    pub(super) body: Step,
    pub(super) end: End,
}

/// A step's address: the child indexes from the body down to it.
pub(super) type Path = Vec<usize>;

/// The leaves a run started (by path), and those it finished, in order: shared by
/// every execution of one orchestration. A leaf is logged as started in the poll that
/// issues its command, so "started" means "recorded in the history".
#[derive(Debug, Clone, Default)]
pub(super) struct Trace(Arc<Mutex<Log>>);

#[derive(Debug, Default)]
struct Log {
    started: BTreeSet<Path>,
    finished: Vec<Path>,
}

impl Trace {
    fn log(&self) -> MutexGuard<'_, Log> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn start(&self, path: &Path) {
        self.log().started.insert(path.clone());
    }

    fn finish(&self, path: &Path) {
        self.log().finished.push(path.clone());
    }

    pub(super) fn started(&self, path: &Path) -> bool {
        self.log().started.contains(path)
    }

    /// The leaves finished so far, in the order they finished.
    pub(super) fn finished(&self) -> Vec<Path> {
        self.log().finished.clone()
    }
}

impl Step {
    pub(super) fn children(&self) -> &[Step] {
        match self {
            Self::Seq(steps) | Self::Join(steps) | Self::Select(steps) => steps,
            _ => &[],
        }
    }

    fn children_mut(&mut self) -> Option<&mut Vec<Step>> {
        match self {
            Self::Seq(steps) | Self::Join(steps) | Self::Select(steps) => Some(steps),
            _ => None,
        }
    }

    pub(super) fn leaves(&self) -> usize {
        match self {
            Self::Seq(steps) | Self::Join(steps) | Self::Select(steps) => {
                steps.iter().map(Step::leaves).sum()
            }
            _ => 1,
        }
    }

    /// The step at `path`.
    pub(super) fn at_mut(&mut self, path: &[usize]) -> Option<&mut Step> {
        match path.split_first() {
            None => Some(self),
            Some((&first, rest)) => self.children_mut()?.get_mut(first)?.at_mut(rest),
        }
    }

    /// Every step with its path, parents before children.
    pub(super) fn walk(&self) -> Vec<(Path, &Step)> {
        let mut all = Vec::new();
        let mut stack = vec![(Vec::new(), self)];
        while let Some((path, step)) = stack.pop() {
            for (index, child) in step.children().iter().enumerate().rev() {
                let mut child_path = path.clone();
                child_path.push(index);
                stack.push((child_path, child));
            }
            all.push((path, step));
        }
        all
    }

    /// What replay compares the command a leaf issues by (kind, name, side-effect
    /// variant); `None` for steps that issue no command of their own, or (patches) not
    /// every time they run.
    pub(super) fn signature(&self) -> Option<String> {
        match self {
            Self::Activity(name) => Some(format!("activity {name}")),
            Self::Child(name) => Some(format!("child {name}")),
            Self::Sleep(_) => Some("timer".to_owned()),
            Self::Effect(Effect::Now) => Some("side effect time".to_owned()),
            Self::Effect(Effect::Uuid) => Some("side effect uuid".to_owned()),
            Self::Effect(Effect::Random) => Some("side effect random".to_owned()),
            Self::Effect(Effect::Status) => Some("custom status".to_owned()),
            _ => None,
        }
    }

    pub(super) fn signal_names(&self, names: &mut BTreeSet<String>) {
        if let Self::Signal(name) = self {
            names.insert(name.clone());
        }
        for child in self.children() {
            child.signal_names(names);
        }
    }
}

fn leaf() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => prop::sample::select(&ACTIVITIES[..]).prop_map(|n| Step::Activity(n.to_owned())),
        2 => (1_u64..5_000).prop_map(Step::Sleep),
        2 => prop::sample::select(&SIGNALS[..]).prop_map(|n| Step::Signal(n.to_owned())),
        1 => prop::sample::select(&CHILDREN[..]).prop_map(|n| Step::Child(n.to_owned())),
        2 => prop_oneof![
            Just(Effect::Now),
            Just(Effect::Uuid),
            Just(Effect::Random),
            Just(Effect::Status),
            prop::sample::select(&PATCHES[..]).prop_map(Effect::Patch),
        ]
        .prop_map(Step::Effect),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Step::Seq),
            prop::collection::vec(inner.clone(), 1..4).prop_map(Step::Join),
            // A select of nothing never resolves: no such program is valid.
            prop::collection::vec(inner, 1..4).prop_map(Step::Select),
        ]
    })
}

/// Programs of at most [`MAX_LEAVES`] operations, nested at most three deep in a body.
pub(super) fn program() -> impl Strategy<Value = Program> {
    let end = prop_oneof![
        6 => Just(End::Complete),
        2 => Just(End::Fail),
        1 => Just(End::ContinueAsNew),
    ];
    (prop::collection::vec(step(), 1..8).prop_map(Step::Seq), end)
        .prop_map(|(body, end)| Program { body, end })
        .prop_filter("too many operations", |p| p.body.leaves() <= MAX_LEAVES)
}

type Values = Pin<Box<dyn Future<Output = Vec<String>> + Send>>;

fn label(path: &Path) -> String {
    path.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

fn describe(what: &str, outcome: Result<String, Failure>) -> String {
    match outcome {
        Ok(value) => format!("{what}={value}"),
        Err(failure) => format!("{what}!{}", failure.kind),
    }
}

fn child_path(path: &Path, index: usize) -> Path {
    let mut child = path.clone();
    child.push(index);
    child
}

/// Runs `step` and returns the values it produced, in program order.
fn interpret(ctx: OrchestrationContext, step: Step, path: Path, trace: Trace) -> Values {
    Box::pin(async move {
        match step {
            Step::Activity(name) => {
                trace.start(&path);
                let outcome = ctx.activity::<String, _>(name.clone(), &label(&path)).await;
                trace.finish(&path);
                vec![describe(&name, outcome)]
            }
            Step::Child(name) => {
                trace.start(&path);
                let outcome = ctx.child::<String, _>(name.clone(), &label(&path)).await;
                trace.finish(&path);
                vec![describe(&name, outcome)]
            }
            Step::Sleep(millis) => {
                trace.start(&path);
                ctx.sleep(Duration::from_millis(millis)).await;
                trace.finish(&path);
                vec![format!("slept {millis}")]
            }
            Step::Signal(name) => {
                trace.start(&path);
                let received = ctx.signal::<String>(name.clone()).await;
                trace.finish(&path);
                vec![describe(&name, received)]
            }
            Step::Effect(effect) => {
                trace.start(&path);
                let value = match effect {
                    Effect::Now => Timestamp::from_system_time(ctx.now())
                        .as_millis()
                        .to_string(),
                    Effect::Uuid => ctx.uuid().to_string(),
                    Effect::Random => ctx.random().to_string(),
                    Effect::Status => describe(
                        "status",
                        ctx.set_custom_status(&label(&path)).map(|()| label(&path)),
                    ),
                    Effect::Patch(id) => format!("{id}:{}", ctx.patched(id)),
                };
                trace.finish(&path);
                vec![value]
            }
            Step::Seq(steps) => {
                let mut values = Vec::new();
                for (index, step) in steps.into_iter().enumerate() {
                    let next =
                        interpret(ctx.clone(), step, child_path(&path, index), trace.clone());
                    values.extend(next.await);
                }
                values
            }
            Step::Join(steps) => {
                let branches = steps.into_iter().enumerate().map(|(index, step)| {
                    interpret(ctx.clone(), step, child_path(&path, index), trace.clone())
                });
                join_all(branches).await.into_iter().flatten().collect()
            }
            Step::Select(steps) => {
                let branches = steps.into_iter().enumerate().map(|(index, step)| {
                    interpret(ctx.clone(), step, child_path(&path, index), trace.clone())
                });
                let (winner, values) = select(branches).await;
                std::iter::once(format!("won {winner}"))
                    .chain(values)
                    .collect()
            }
        }
    })
}

/// The orchestration that runs `program`, logging its leaves in `trace`.
pub(super) fn orchestration(program: &Program, trace: &Trace) -> Arc<dyn Orchestration> {
    let program = Arc::new(program.clone());
    let trace = trace.clone();
    Arc::new(move |ctx: OrchestrationContext, _input: Payload| {
        let program = program.clone();
        let trace = trace.clone();
        async move {
            let values = interpret(ctx.clone(), program.body.clone(), Vec::new(), trace).await;
            match program.end {
                End::Complete => CODEC.encode(&values).map_err(Failure::from),
                End::Fail => Err(Failure::new("program.failed", values.join(", "))),
                End::ContinueAsNew => {
                    ctx.continue_as_new::<_, Result<Payload, Failure>>(&values)
                        .await
                }
            }
        }
    })
}
