//! The provider under random operation sequences, checked against a model of its
//! observable state after every step.
//!
//! Each case runs on the test's one store with instance ids of its own, after deleting
//! what earlier cases left. A failing case is shrunk (by proptest's value trees, driven
//! here so that each run can be async) and reported with its smallest sequence.

/// Returns the error `format!($why)` unless `$cond` holds.
macro_rules! ensure {
    ($cond:expr, $($why:tt)+) => {
        if !$cond {
            return Err(format!($($why)+));
        }
    };
}

mod harness;
mod state;
mod turns;
mod work;

use std::time::Duration;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};

use crate::TestStore;

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_model {
    ($factory:expr) => {
        $crate::__stamp!(
            $factory,
            model,
            [random_operation_sequences_match_the_model]
        );
    };
}

/// Cases per run, and the most operations per case.
const CASES: u32 = 32;
const MAX_OPS: usize = 40;
/// How many re-runs shrinking a failure may take.
const MAX_SHRINK_RUNS: u32 = 500;
/// Instances per case: the last index is rarely created, so calls naming it probe
/// `NotFound`.
pub(super) const INSTANCES: u8 = 4;

/// One step of a case. Numbers that pick a lock or lease choose among the handles taken
/// so far (stale ones included), mostly among the latest two.
#[derive(Debug, Clone)]
enum Op {
    Create {
        instance: u8,
        delay: Option<u8>,
        fail_on_conflict: bool,
    },
    Send {
        instance: u8,
        delay: Option<u8>,
    },
    Fetch {
        max: u8,
        lock: u8,
        with_history: bool,
    },
    Ack {
        lock: u8,
        turn: Turn,
    },
    RenewLock {
        lock: u8,
        extend: u8,
    },
    AbandonLock {
        lock: u8,
    },
    Suspend {
        lock: u8,
    },
    Pause {
        instance: u8,
    },
    Resume {
        instance: u8,
    },
    FetchActivities {
        max: u8,
        lease: u8,
    },
    Complete {
        lease: u8,
        fail: bool,
    },
    RenewLease {
        lease: u8,
        extend: u8,
    },
    Retry {
        lease: u8,
        delay: u8,
    },
    AbandonLease {
        lease: u8,
    },
    Advance {
        seconds: u8,
    },
    /// A worker's turn: fetch, then ack each fetched instance with `turn`.
    Step {
        max: u8,
        turn: Turn,
    },
    /// An activity worker: lease, then complete each leased item (the first one failing
    /// when `fail`).
    Work {
        max: u8,
        action: WorkAction,
    },
}

/// What an activity worker does with the items it leased.
#[derive(Debug, Clone, Copy)]
enum WorkAction {
    /// Completes them all.
    Complete,
    /// Fails the first for good (a dead letter) and completes the rest.
    Fail,
    /// Retries the first after a delay of so many units and completes the rest.
    Retry(u8),
}

/// What an ack does (when the model allows it; otherwise it continues).
#[derive(Debug, Clone)]
enum Turn {
    Continue {
        markers: u8,
        schedule: u8,
        timer: Option<u8>,
        cancel: Option<u8>,
        consume_all: bool,
    },
    End {
        fail: bool,
    },
    ContinueAsNew {
        carry: bool,
    },
}

fn turn() -> impl Strategy<Value = Turn> {
    prop_oneof![
        6 => (
            0..3u8,
            0..4u8,
            proptest::option::weighted(0.3, 1..6u8),
            proptest::option::weighted(0.5, any::<u8>()),
            proptest::bool::weighted(0.8),
        )
            .prop_map(|(markers, schedule, timer, cancel, consume_all)| Turn::Continue {
                markers,
                schedule,
                timer,
                cancel,
                consume_all,
            }),
        1 => any::<bool>().prop_map(|fail| Turn::End { fail }),
        1 => any::<bool>().prop_map(|carry| Turn::ContinueAsNew { carry }),
    ]
}

fn work_action() -> impl Strategy<Value = WorkAction> {
    prop_oneof![
        4 => Just(WorkAction::Complete),
        1 => Just(WorkAction::Fail),
        2 => (0..3u8).prop_map(WorkAction::Retry),
    ]
}

fn op(manual_clock: bool) -> impl Strategy<Value = Op> {
    let instance = || prop_oneof![6 => 0..INSTANCES - 1, 1 => Just(INSTANCES - 1)];
    let delay = || proptest::option::weighted(0.25, 1..6u8);
    // Time moves only on a manual clock; elsewhere the op is replaced by a harmless fetch.
    let advance = if manual_clock {
        (1..5u8).prop_map(|seconds| Op::Advance { seconds }).boxed()
    } else {
        Just(Op::FetchActivities { max: 1, lease: 1 }).boxed()
    };
    prop_oneof![
        4 => (instance(), delay(), any::<bool>()).prop_map(|(instance, delay, fail_on_conflict)| {
            Op::Create { instance, delay, fail_on_conflict }
        }),
        4 => (instance(), delay()).prop_map(|(instance, delay)| Op::Send { instance, delay }),
        4 => (1..4u8, 1..10u8, any::<bool>())
            .prop_map(|(max, lock, with_history)| Op::Fetch { max, lock, with_history }),
        6 => (any::<u8>(), turn()).prop_map(|(lock, turn)| Op::Ack { lock, turn }),
        1 => (any::<u8>(), 1..6u8).prop_map(|(lock, extend)| Op::RenewLock { lock, extend }),
        1 => any::<u8>().prop_map(|lock| Op::AbandonLock { lock }),
        1 => any::<u8>().prop_map(|lock| Op::Suspend { lock }),
        1 => instance().prop_map(|instance| Op::Pause { instance }),
        1 => instance().prop_map(|instance| Op::Resume { instance }),
        4 => (1..4u8, 1..10u8).prop_map(|(max, lease)| Op::FetchActivities { max, lease }),
        4 => (any::<u8>(), proptest::bool::weighted(0.2))
            .prop_map(|(lease, fail)| Op::Complete { lease, fail }),
        1 => (any::<u8>(), 1..6u8).prop_map(|(lease, extend)| Op::RenewLease { lease, extend }),
        2 => (any::<u8>(), 0..4u8).prop_map(|(lease, delay)| Op::Retry { lease, delay }),
        1 => any::<u8>().prop_map(|lease| Op::AbandonLease { lease }),
        2 => advance,
        8 => (1..4u8, turn()).prop_map(|(max, turn)| Op::Step { max, turn }),
        6 => (1..4u8, work_action()).prop_map(|(max, action)| Op::Work { max, action }),
    ]
}

/// Random sequences of creates, sends, fetches, acks (continuing, ending, continuing as
/// new, scheduling and cancelling activities, setting timers), lock and lease renewals
/// and abandonments, suspensions, pauses and resumes, activity fetches, completions and
/// retries, and clock moves leave the provider in the state the model predicts: the same
/// instances with the same status, execution and history length, the same fetch
/// results, queue depths, next due times and `Stale`/`NotFound`/`InvalidInput` answers.
pub async fn random_operation_sequences_match_the_model(store: TestStore) {
    let manual_clock = store.has_manual_clock();
    let strategy = vec(op(manual_clock), 1..=MAX_OPS);
    let config = Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let mut run = 0u32;
    for _ in 0..CASES {
        let mut tree = strategy
            .new_tree(&mut runner)
            .expect("the strategy generates values");
        run += 1;
        let Err(failure) = harness::run_case(&store, run, &tree.current()).await else {
            continue;
        };
        // Shrink: simplify while it still fails, complicate back when it passes.
        let mut smallest = (tree.current(), failure);
        let mut runs = 0;
        let mut more = tree.simplify();
        while more && runs < MAX_SHRINK_RUNS {
            runs += 1;
            run += 1;
            match harness::run_case(&store, run, &tree.current()).await {
                Err(failure) => {
                    smallest = (tree.current(), failure);
                    more = tree.simplify();
                }
                Ok(()) => more = tree.complicate(),
            }
        }
        let (ops, (step, failure)) = smallest;
        let steps: Vec<String> = ops[..=step.min(ops.len() - 1)]
            .iter()
            .enumerate()
            .map(|(i, op)| format!("  {i:>2}: {op:?}"))
            .collect();
        panic!(
            "the provider departed from the model: {failure}\nsmallest failing sequence \
             (up to the failing step, after {runs} shrinking runs):\n{}",
            steps.join("\n")
        );
    }
}

/// Milliseconds of a duration given in the op's units: seconds on a manual clock, and
/// hours otherwise, so that real time passing during a case never reaches any deadline.
/// The half second keeps deadlines off the whole seconds the clock moves by.
fn span(manual_clock: bool, units: u8) -> Duration {
    if manual_clock {
        Duration::from_millis(u64::from(units) * 1_000 + 500)
    } else {
        Duration::from_secs(u64::from(units) * 3_600 + 1_800)
    }
}

/// Milliseconds of a delay of `units`: whole seconds on a manual clock, hours otherwise.
/// Zero stays zero.
fn delay(manual_clock: bool, units: u8) -> Duration {
    if manual_clock {
        Duration::from_secs(u64::from(units))
    } else {
        Duration::from_secs(u64::from(units) * 3_600)
    }
}
