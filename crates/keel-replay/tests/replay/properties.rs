//! Property tests: random orchestration programs, run against a random environment,
//! must replay to the same state from their history (whole or any turn-boundary
//! prefix), and must be caught, not silently replayed, when their code changes under a
//! recorded history.
//!
//! Any `ReplayError` where none is expected fails a case with the error's message, and
//! so does any panic of the engine. Failing cases are not saved to regression files;
//! `PROPTEST_CASES=10000` searches harder by hand.

mod driver;
mod program;

use keel_core::Timestamp;
use keel_replay::TurnEnv;
use proptest::prelude::*;
use proptest::test_runner::Config;

use driver::{drive, execution, fail, len};
use program::{Path, Program, Step, Trace, orchestration, program};

/// `cases` cases, or as many as `PROPTEST_CASES` asks for.
fn config(cases: u32) -> Config {
    let defaults = Config::default();
    let cases = if std::env::var_os("PROPTEST_CASES").is_some() {
        defaults.cases
    } else {
        cases
    };
    // No regression files: this module must not write into the source tree.
    Config {
        cases,
        failure_persistence: None,
        ..defaults
    }
}

/// A change to a program that alters the commands of its recorded part.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mutation {
    /// Rename an activity or child that ran.
    Rename(Path),
    /// Replace an activity or child that ran with a timer.
    ToSleep(Path),
    /// Swap the steps `i` and `i + 1` of a sequence: two command-issuing leaves of
    /// different kinds, the first of which ran.
    Swap(Path, usize),
    /// Delete a command-issuing leaf that ran, the only one of its signature.
    Delete(Path),
}

fn child_path(path: &Path, index: usize) -> Path {
    let mut child = path.clone();
    child.push(index);
    child
}

/// The mutations of `program` that change a command the run recorded (so replay must
/// report nondeterminism). Each changes the k-th command the code issues for some k
/// the history holds: up to that command the code runs exactly as recorded, so the
/// engine sees the k-th command differ (or go missing) and nothing can mask it.
fn mutations(program: &Program, trace: &Trace) -> Vec<Mutation> {
    let mut found = Vec::new();
    let steps = program.body.walk();
    let signatures: Vec<Option<String>> = steps.iter().map(|(_, step)| step.signature()).collect();
    for (path, step) in steps {
        let ran = trace.started(&path);
        match step {
            Step::Activity(_) | Step::Child(_) if ran => {
                found.push(Mutation::Rename(path.clone()));
                found.push(Mutation::ToSleep(path.clone()));
            }
            Step::Seq(steps) => {
                for (index, pair) in steps.windows(2).enumerate() {
                    let (first, second) = (pair[0].signature(), pair[1].signature());
                    let differ = first.is_some() && second.is_some() && first != second;
                    if differ && trace.started(&child_path(&path, index)) {
                        found.push(Mutation::Swap(path.clone(), index));
                    }
                }
            }
            _ => {}
        }
        // Deleting a leaf skips to whatever the code does next; were that a command of
        // the same signature (the next of two `a0` activities, say), the history could
        // not tell them apart if the run ended before the second. So only unique ones.
        let signature = step.signature();
        let unique = || signatures.iter().filter(|s| **s == signature).count() == 1;
        if ran && signature.is_some() && unique() {
            found.push(Mutation::Delete(path));
        }
    }
    found
}

fn mutate(program: &Program, mutation: &Mutation) -> Program {
    let mut mutated = program.clone();
    let target = match mutation {
        Mutation::Rename(path)
        | Mutation::ToSleep(path)
        | Mutation::Delete(path)
        | Mutation::Swap(path, _) => path,
    };
    let Some(step) = mutated.body.at_mut(target) else {
        return mutated;
    };
    match mutation {
        Mutation::Rename(_) => match step {
            Step::Activity(name) | Step::Child(name) => *name = "renamed".to_owned(),
            _ => {}
        },
        Mutation::ToSleep(_) => *step = Step::Sleep(5),
        // An empty sequence: done at once, issuing nothing (a select keeps a branch).
        Mutation::Delete(_) => *step = Step::Seq(Vec::new()),
        Mutation::Swap(_, index) => {
            if let Step::Seq(steps) = step {
                steps.swap(*index, *index + 1);
            }
        }
    }
    mutated
}

/// A generated program behind a leading activity, so that a mutation always has
/// something recorded to change.
fn program_with_activity() -> impl Strategy<Value = Program> {
    program().prop_map(|mut program| {
        let body = std::mem::replace(&mut program.body, Step::Seq(Vec::new()));
        program.body = Step::Seq(vec![Step::Activity("a0".to_owned()), body]);
        program
    })
}

proptest! {
    #![proptest_config(config(128))]

    /// (1) The recorded history replays on a fresh execution without error, to the same
    /// state, and the replayed execution has nothing left to do.
    #[test]
    fn replaying_the_history_reaches_the_same_state(program in program(), seed in any::<u64>()) {
        let trace = Trace::default();
        let orchestration = orchestration(&program, &trace);
        let run = drive(&orchestration, &program, &trace, seed, false)?;
        let mut fresh = execution(orchestration);
        fresh.replay(run.history.clone()).map_err(|e| fail("replaying the history", &e))?;
        prop_assert_eq!(fresh.state(), run.live.state());
        prop_assert_eq!(fresh.history_len(), len(&run.history));
        let env = TurnEnv { now: Timestamp::from_millis(u64::MAX / 2), seed: !seed };
        let turn = fresh.turn(Vec::new(), env).map_err(|e| fail("an empty turn", &e))?;
        prop_assert!(turn.events.is_empty(), "an empty turn recorded {:?}", turn.events);
        prop_assert!(turn.commands.is_empty(), "an empty turn issued {:?}", turn.commands);
        prop_assert_eq!(&turn.state, run.live.state());
    }
}

proptest! {
    #![proptest_config(config(128))]

    /// (2) At every turn boundary, a fresh execution replaying the history so far
    /// agrees with the cached live one, and both make the same next turn from the same
    /// messages.
    #[test]
    fn cached_and_replayed_executions_make_the_same_turns(
        program in program(),
        seed in any::<u64>(),
    ) {
        let trace = Trace::default();
        let orchestration = orchestration(&program, &trace);
        drive(&orchestration, &program, &trace, seed, true)?;
    }
}

proptest! {
    #![proptest_config(config(128))]

    /// (3) Changing a recorded step of the code is reported as nondeterminism when the
    /// old history is replayed: never a silent replay, never a panic.
    #[test]
    fn changing_a_recorded_step_is_nondeterminism(
        program in program_with_activity(),
        seed in any::<u64>(),
        kind in any::<prop::sample::Index>(),
        choice in any::<prop::sample::Index>(),
    ) {
        let trace = Trace::default();
        let run = drive(&orchestration(&program, &trace), &program, &trace, seed, false)?;
        // Pick a kind of mutation first, so that rarer kinds (swaps) get their share.
        let mut kinds: Vec<Vec<Mutation>> = Vec::new();
        for mutation in mutations(&program, &trace) {
            let same = |group: &Vec<Mutation>| {
                std::mem::discriminant(&group[0]) == std::mem::discriminant(&mutation)
            };
            match kinds.iter_mut().find(|group| same(group)) {
                Some(group) => group.push(mutation),
                None => kinds.push(vec![mutation]),
            }
        }
        prop_assert!(!kinds.is_empty(), "the leading activity always runs");
        let group: &Vec<Mutation> = kind.get(&kinds);
        let mutation = choice.get(group);
        let mutated = mutate(&program, mutation);
        prop_assert_ne!(&mutated, &program);
        let mut replayed = execution(orchestration(&mutated, &Trace::default()));
        match replayed.replay(run.history.clone()) {
            Err(error) => {
                prop_assert!(
                    error.is_nondeterminism(),
                    "{:?} was reported as {:?}, not as nondeterminism",
                    mutation,
                    error
                );
                // A diverged execution refuses further use.
                let env = TurnEnv { now: Timestamp::from_millis(1), seed };
                prop_assert_eq!(replayed.turn(Vec::new(), env), Err(error));
            }
            Ok(()) => prop_assert!(
                false,
                "{:?} replayed silently to {:?} (recorded: {:?})",
                mutation,
                replayed.state(),
                run.live.state()
            ),
        }
    }
}

/// `program` with a new activity right after the step at `path`.
fn insert_after(program: &Program, path: &Path) -> Program {
    let mut mutated = program.clone();
    if let Some(step) = mutated.body.at_mut(path) {
        let old = std::mem::replace(step, Step::Seq(Vec::new()));
        *step = Step::Seq(vec![old, Step::Activity("inserted".to_owned())]);
    }
    mutated
}

proptest! {
    #![proptest_config(config(128))]

    /// (3b) Code that now does more right after a recorded step is reported as
    /// nondeterminism, also where the history ends. Every stored history ends at a turn
    /// boundary and a turn records all that the code did in response to its inputs, so
    /// a command the code issues while replaying the last turn is one the recorded code
    /// did not issue.
    #[test]
    fn doing_more_after_a_recorded_step_is_nondeterminism(
        program in program_with_activity(),
        seed in any::<u64>(),
        boundary in any::<prop::sample::Index>(),
        choice in any::<prop::sample::Index>(),
    ) {
        let trace = Trace::default();
        let run = drive(&orchestration(&program, &trace), &program, &trace, seed, false)?;
        let finished = trace.finished();
        // The turn boundaries by which some leaf had finished (none, if cancelled at once).
        let boundaries: Vec<(usize, usize)> =
            run.boundaries.iter().copied().filter(|&(_, done)| done > 0).collect();
        if boundaries.is_empty() {
            return Ok(());
        }
        let (history_len, done) = *boundary.get(&boundaries);
        let leaf = choice.get(&finished[..done]);
        let mutated = insert_after(&program, leaf);
        prop_assert_ne!(&mutated, &program);
        let prefix = run.history[..history_len].to_vec();
        let mut replayed = execution(orchestration(&mutated, &Trace::default()));
        match replayed.replay(prefix) {
            Err(error) => prop_assert!(
                error.is_nondeterminism(),
                "an activity after {:?} was reported as {:?}, not as nondeterminism",
                leaf,
                error
            ),
            Ok(()) => prop_assert!(
                false,
                "an activity after {:?} replayed silently: {} events applied of a history \
                 of {}, ending {:?}",
                leaf,
                replayed.history_len(),
                history_len,
                run.history[history_len - 1].kind
            ),
        }
    }
}
