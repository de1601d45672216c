//! One scenario per operation of the orchestration context, driven turn by turn, each
//! also replayed from its history on a fresh execution.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use keel_core::{
    EventKind, ExecutionId, Failure, InstanceId, Message, OpId, ParentLink, Payload, Timestamp,
};
use keel_replay::{
    Command, Either, Execution, ExecutionState, OrchestrationContext, ReplayError, from_fn,
    join_all, select, select2,
};

use crate::support::*;

type Boxed<T> = Pin<Box<dyn Future<Output = Result<T, Failure>> + Send>>;

fn op(n: u64) -> OpId {
    OpId::from_raw(n)
}

/// Replays the harness's history on fresh code and checks it ends in the same state.
fn assert_replays(h: &Harness) {
    let fresh = h.replay_fresh().expect("the history replays");
    assert_eq!(fresh.state(), h.live.state());
    assert_eq!(fresh.history_len(), h.history.len() as u64);
}

fn kinds(h: &Harness) -> Vec<&'static str> {
    h.history.iter().map(|e| e.kind.name()).collect()
}

async fn two_steps(ctx: OrchestrationContext, input: u32) -> Result<u32, Failure> {
    let a: u32 = ctx.activity("double", &input).await?;
    let b: u32 = ctx.activity("inc", &a).await?;
    Ok(b)
}

#[test]
fn activities_run_in_sequence() {
    let mut h = Harness::new(from_fn(two_steps));
    let turn = h.start(&5);
    assert_eq!(scheduled(&turn), [(op(0), "double".to_owned())]);
    assert_eq!(turn.state, ExecutionState::Running);
    let turn = h.send(vec![h.done(op(0), &10)]);
    assert_eq!(scheduled(&turn), [(op(1), "inc".to_owned())]);
    let turn = h.send(vec![h.done(op(1), &11)]);
    assert_eq!(output::<u32>(&turn.state), 11);
    assert_eq!(
        kinds(&h),
        [
            "ExecutionStarted",
            "ActivityScheduled",
            "ActivityCompleted",
            "ActivityScheduled",
            "ActivityCompleted",
            "ExecutionCompleted"
        ]
    );
    assert_replays(&h);
}

#[test]
fn activity_options_reach_the_command() {
    let mut h = Harness::new(from_fn(|ctx: OrchestrationContext, _: ()| async move {
        let policy = keel_core::RetryPolicy {
            max_attempts: 9,
            ..Default::default()
        };
        ctx.activity::<(), _>("charge", &1)
            .retry(policy)
            .timeout(Duration::from_secs(3))
            .queue(keel_core::QueueName::new("payments").unwrap())
            .priority(7)
            .await
    }));
    let turn = h.start(&());
    let Command::ScheduleActivity { options, .. } = &turn.commands[0] else {
        panic!("{turn:?}")
    };
    assert_eq!(options.queue.as_str(), "payments");
    assert_eq!(options.priority, 7);
    assert_eq!(options.retry.max_attempts, 9);
    assert_eq!(options.attempt_timeout(), Some(Duration::from_secs(3)));
}

#[test]
fn a_timeout_set_before_the_retry_policy_is_kept() {
    let mut h = Harness::new(from_fn(|ctx: OrchestrationContext, _: ()| async move {
        let policy = keel_core::RetryPolicy {
            max_attempts: 2,
            ..Default::default()
        };
        ctx.activity::<(), _>("charge", &1)
            .timeout(Duration::from_secs(3))
            .retry(policy)
            .await
    }));
    let turn = h.start(&());
    let Command::ScheduleActivity { options, .. } = &turn.commands[0] else {
        panic!("{turn:?}")
    };
    assert_eq!(options.retry.max_attempts, 2);
    assert_eq!(options.attempt_timeout(), Some(Duration::from_secs(3)));
}

#[test]
fn an_invalid_retry_policy_fails_the_call_not_the_engine() {
    let mut h = Harness::new(from_fn(|ctx: OrchestrationContext, _: ()| async move {
        let bad = keel_core::RetryPolicy {
            multiplier: 0.0,
            ..Default::default()
        };
        match ctx.activity::<(), _>("x", &()).retry(bad).await {
            Err(failure) => Ok::<String, Failure>(failure.message),
            Ok(()) => Ok(String::new()),
        }
    }));
    let turn = h.start(&());
    assert!(output::<String>(&turn.state).contains("multiplier"));
}

#[test]
fn an_activity_failure_reaches_the_code_with_its_chain() {
    let mut h = Harness::new(from_fn(|ctx: OrchestrationContext, _: ()| async move {
        match ctx.activity::<u32, _>("charge", &()).await {
            Ok(_) => Ok::<String, Failure>("charged".to_owned()),
            Err(failure) => Ok(format!("{} / {}", failure.kind, failure.causes.join(","))),
        }
    }));
    h.start(&());
    let failure = Failure::new("Declined", "card declined").with_cause("insufficient funds");
    let turn = h.send(vec![h.failed(op(0), failure)]);
    assert_eq!(
        output::<String>(&turn.state),
        "Declined / insufficient funds"
    );
    assert!(
        h.history
            .iter()
            .any(|e| matches!(e.kind, EventKind::ActivityFailed { .. }))
    );
    assert_replays(&h);
}

#[test]
fn an_orchestration_error_fails_the_execution() {
    let mut h = Harness::new(from_fn(|ctx: OrchestrationContext, _: ()| async move {
        let value: u32 = ctx.activity("get", &()).await?;
        Ok::<u32, Failure>(value)
    }));
    h.start(&());
    let turn = h.send(vec![h.failed(op(0), Failure::new("Gone", "not found"))]);
    let ExecutionState::Failed { failure } = &turn.state else {
        panic!("{:?}", turn.state)
    };
    assert_eq!(failure.kind, "Gone");
    assert_replays(&h);
}

#[test]
fn join_all_schedules_everything_at_once_and_keeps_order() {
    let mut h = Harness::new(from_fn(|ctx: OrchestrationContext, n: u32| async move {
        let calls = (0..n).map(|i| ctx.activity::<u32, _>("square", &i));
        let results: Result<Vec<u32>, Failure> = join_all(calls).await.into_iter().collect();
        results
    }));
    let turn = h.start(&40);
    assert_eq!(scheduled(&turn).len(), 40);
    // Complete in reverse order, a few per turn.
    let mut ops: Vec<u64> = (0..40).collect();
    ops.reverse();
    for chunk in ops.chunks(7) {
        let messages = chunk.iter().map(|&i| h.done(op(i), &(i * i))).collect();
        h.send(messages);
    }
    let expected: Vec<u64> = (0..40).map(|i| i * i).collect();
    assert_eq!(output::<Vec<u64>>(h.live.state()), expected);
    assert_replays(&h);
}

#[test]
fn futures_join_macro_works() {
    let mut h = Harness::new(from_fn(|ctx: OrchestrationContext, _: ()| async move {
        let (a, b) = futures_util::join!(
            ctx.activity::<u32, _>("a", &()),
            ctx.activity::<u32, _>("b", &())
        );
        Ok::<u32, Failure>(a? + b?)
    }));
    let turn = h.start(&());
    assert_eq!(scheduled(&turn).len(), 2);
    h.send(vec![h.done(op(1), &2)]);
    let turn = h.send(vec![h.done(op(0), &1)]);
    assert_eq!(output::<u32>(&turn.state), 3);
    assert_replays(&h);
}

fn race_activity_with_timer() -> impl keel_replay::Orchestration {
    from_fn(|ctx: OrchestrationContext, _: ()| async move {
        let work: Boxed<&'static str> = Box::pin({
            let ctx = ctx.clone();
            async move { ctx.activity::<(), _>("slow", &()).await.map(|()| "work") }
        });
        let timeout: Boxed<&'static str> = Box::pin({
            let ctx = ctx.clone();
            async move {
                ctx.sleep(Duration::from_secs(30)).await;
                Ok("timeout")
            }
        });
        let (index, result) = select(vec![work, timeout]).await;
        Ok::<String, Failure>(format!("{index}:{}", result?))
    })
}

#[test]
fn a_select_loser_is_cancelled() {
    let mut h = Harness::new(race_activity_with_timer());
    let turn = h.start(&());
    assert_eq!(scheduled(&turn), [(op(0), "slow".to_owned())]);
    let timers = timers(&turn);
    assert_eq!(
        timers,
        [(op(1), h.now.saturating_add(Duration::from_secs(30)))]
    );
    let turn = h.send(vec![h.fired(op(1))]);
    assert_eq!(output::<String>(&turn.state), "1:timeout");
    assert!(
        turn.commands
            .contains(&Command::CancelActivity { op: op(0) }),
        "{:?}",
        turn.commands
    );
    assert!(
        h.history
            .iter()
            .any(|e| matches!(e.kind, EventKind::OpCancelled { op: o, .. } if o == op(0))),
        "{:?}",
        kinds(&h)
    );
    // The activity's late result is stale: dropped, nothing recorded.
    let late = h.send(vec![h.done(op(0), &())]);
    assert!(late.events.is_empty() && late.commands.is_empty());
    assert_replays(&h);
}

#[test]
fn the_winner_of_a_select_cancels_the_timer() {
    let mut h = Harness::new(race_activity_with_timer());
    h.start(&());
    let turn = h.send(vec![h.done(op(0), &())]);
    assert_eq!(output::<String>(&turn.state), "0:work");
    assert!(turn.commands.contains(&Command::CancelTimer { op: op(1) }));
    assert_replays(&h);
}

#[test]
fn selects_nest() {
    let mut h = Harness::new(from_fn(|ctx: OrchestrationContext, _: ()| async move {
        let inner = {
            let ctx = ctx.clone();
            async move {
                let (i, r) = select(vec![
                    ctx.activity::<u32, _>("a", &()),
                    ctx.activity::<u32, _>("b", &()),
                ])
                .await;
                r.map(|v| v + 10 * u32::try_from(i).unwrap_or(0))
            }
        };
        match select2(inner, ctx.signal::<u32>("stop")).await {
            Either::Left(result) => Ok::<String, Failure>(format!("work {}", result?)),
            Either::Right(signal) => Ok(format!("stopped {}", signal?)),
        }
    }));
    let turn = h.start(&());
    assert_eq!(scheduled(&turn).len(), 2);
    let turn = h.send(vec![h.done(op(1), &5)]);
    assert_eq!(output::<String>(&turn.state), "work 15");
    assert!(
        turn.commands
            .contains(&Command::CancelActivity { op: op(0) })
    );
    assert_replays(&h);

    let mut h2 = Harness::with_arc(h.orchestration.clone());
    h2.start(&());
    let turn = h2.send(vec![h2.signal("stop", &9)]);
    assert_eq!(output::<String>(&turn.state), "stopped 9");
    let cancels = turn
        .commands
        .iter()
        .filter(|c| matches!(c, Command::CancelActivity { .. }))
        .count();
    assert_eq!(cancels, 2);
    assert_replays(&h2);
}

#[test]
fn durable_timers_use_the_orchestrations_clock() {
    let mut h = Harness::new(from_fn(|ctx: OrchestrationContext, _: ()| async move {
        ctx.sleep(Duration::from_secs(86_400 * 30)).await;
        ctx.sleep_until(Timestamp::from_millis(5)).await;
        Ok::<(), Failure>(())
    }));
    let start = h.now;
    let turn = h.start(&());
    assert_eq!(
        timers(&turn),
        [(
            op(0),
            start.saturating_add(Duration::from_secs(86_400 * 30))
        )]
    );
    // The second timer is due at its absolute time, even if that is past.
    h.now = start.saturating_add(Duration::from_secs(86_400 * 30));
    let turn = h.send(vec![h.fired(op(0))]);
    assert_eq!(timers(&turn), [(op(1), Timestamp::from_millis(5))]);
    let turn = h.send(vec![h.fired(op(1))]);
    assert!(matches!(turn.state, ExecutionState::Completed { .. }));
    // Replayed later, with another wall clock, the timers are the recorded ones.
    assert_replays(&h);
}

fn collect_signals(count: usize) -> impl keel_replay::Orchestration {
    from_fn(move |ctx: OrchestrationContext, _: ()| async move {
        let mut seen = Vec::new();
        for _ in 0..count {
            seen.push(ctx.signal::<String>("approve").await?);
        }
        Ok::<Vec<String>, Failure>(seen)
    })
}

#[test]
fn signals_sent_before_the_wait_are_buffered_in_order() {
    let mut h = Harness::new(from_fn(|ctx: OrchestrationContext, _: ()| async move {
        ctx.activity::<(), _>("first", &()).await?;
        let a = ctx.signal::<String>("approve").await?;
        let b = ctx.signal::<String>("approve").await?;
        Ok::<String, Failure>(format!("{a},{b}"))
    }));
    h.start(&());
    h.send(vec![
        h.signal("approve", &"x"),
        h.signal("other", &"ignored"),
        h.signal("approve", &"y"),
    ]);
    let turn = h.send(vec![h.done(op(0), &())]);
    assert_eq!(output::<String>(&turn.state), "x,y");
    assert_replays(&h);
}

#[test]
fn signals_after_the_wait_and_repeated_waits() {
    let mut h = Harness::new(collect_signals(3));
    h.start(&());
    h.send(vec![h.signal("approve", &"1")]);
    h.send(vec![
        h.signal("approve", &"2"),
        h.signal("approve", &"3"),
        h.signal("approve", &"4"),
    ]);
    assert_eq!(output::<Vec<String>>(h.live.state()), ["1", "2", "3"]);
    assert_replays(&h);
}

#[test]
fn each_signal_is_consumed_exactly_once() {
    // Two waits on one name in a select: one signal wins one wait; the other wait is
    // dropped and the next signal goes to the next wait.
    let mut h = Harness::new(from_fn(|ctx: OrchestrationContext, _: ()| async move {
        let (first, value) = select(vec![ctx.signal::<u32>("s"), ctx.signal::<u32>("s")]).await;
        let second = ctx.signal::<u32>("s").await?;
        Ok::<(usize, u32, u32), Failure>((first, value?, second))
    }));
    h.start(&());
    h.send(vec![h.signal("s", &1), h.signal("s", &2)]);
    assert_eq!(output::<(usize, u32, u32)>(h.live.state()), (0, 1, 2));
    assert_replays(&h);
}

#[test]
fn a_signal_that_does_not_decode_is_a_typed_error() {
    let mut h = Harness::new(from_fn(|ctx: OrchestrationContext, _: ()| async move {
        match ctx.signal::<u32>("n").await {
            Ok(n) => Ok::<String, Failure>(n.to_string()),
            Err(failure) => Ok(failure.kind),
        }
    }));
    h.start(&());
    let turn = h.send(vec![h.signal("n", &"not a number")]);
    assert_eq!(output::<String>(&turn.state), Failure::DECODE);
}

#[test]
fn children_start_report_and_fail() {
    let mut h = Harness::new(from_fn(|ctx: OrchestrationContext, _: ()| async move {
        let a: u32 = ctx.child("pricing", &1).await?;
        let named = InstanceId::new("explicit-child").unwrap();
        match ctx
            .child::<u32, _>("pricing", &2)
            .instance_id(named)
            .version(3)
            .await
        {
            Ok(b) => Ok::<String, Failure>(format!("{a}+{b}")),
            Err(failure) => Ok(format!("{a}, then {}", failure.kind)),
        }
    }));
    let turn = h.start(&());
    let Command::StartChild {
        op: o,
        instance,
        name,
        version,
        ..
    } = &turn.commands[0]
    else {
        panic!()
    };
    assert_eq!((*o, name.as_str(), *version), (op(0), "pricing", None));
    assert_eq!(instance.as_str(), "test-instance:1:0");
    let turn = h.send(vec![h.child_done(op(0), Ok(encode(&7)))]);
    let Command::StartChild {
        instance, version, ..
    } = &turn.commands[0]
    else {
        panic!()
    };
    assert_eq!((instance.as_str(), *version), ("explicit-child", Some(3)));
    let turn = h.send(vec![
        h.child_done(op(1), Err(Failure::new("Boom", "child failed"))),
    ]);
    assert_eq!(output::<String>(&turn.state), "7, then Boom");
    assert_replays(&h);
}

#[test]
fn a_child_execution_reports_to_its_parent() {
    let mut h = Harness::new(from_fn(two_steps));
    let parent = ParentLink {
        instance: InstanceId::new("parent").unwrap(),
        execution: ExecutionId::FIRST,
        op: op(4),
    };
    let start = Message::Start {
        execution: ExecutionId::FIRST,
        name: "child".into(),
        version: None,
        input: encode(&1),
        parent: Some(parent.clone()),
    };
    h.send(vec![start]);
    h.send(vec![h.done(op(0), &2)]);
    let turn = h.send(vec![h.done(op(1), &3)]);
    assert_eq!(
        turn.commands,
        [Command::ReportToParent {
            parent,
            outcome: Ok(encode(&3))
        }]
    );
    assert_replays(&h);
}

#[test]
fn cancelling_an_instance_cancels_its_activities_children_and_reports() {
    let mut h = Harness::new(from_fn(|ctx: OrchestrationContext, _: ()| async move {
        let work = ctx.activity::<u32, _>("work", &());
        let child = ctx.child::<u32, _>("sub", &());
        let (a, b) = futures_util::join!(work, child);
        Ok::<u32, Failure>(a? + b?)
    }));
    let parent = ParentLink {
        instance: InstanceId::new("p").unwrap(),
        execution: ExecutionId::FIRST,
        op: op(0),
    };
    let start = Message::Start {
        execution: ExecutionId::FIRST,
        name: "x".into(),
        version: None,
        input: encode(&()),
        parent: Some(parent),
    };
    h.send(vec![start]);
    let turn = h.send(vec![Message::Cancel {
        reason: "user asked".into(),
    }]);
    assert_eq!(
        turn.state,
        ExecutionState::Cancelled {
            reason: "user asked".into()
        }
    );
    assert!(
        turn.commands
            .contains(&Command::CancelActivity { op: op(0) })
    );
    assert!(
        turn.commands
            .iter()
            .any(|c| matches!(c, Command::CancelChild { op: o, .. } if *o == op(1)))
    );
    let report = turn.commands.iter().find_map(|c| match c {
        Command::ReportToParent {
            outcome: Err(failure),
            ..
        } => Some(failure.clone()),
        _ => None,
    });
    assert!(report.is_some_and(|f| f.is_cancelled()));
    assert_eq!(
        h.history.last().map(|e| e.kind.name()),
        Some("ExecutionCancelled")
    );
    // Anything after the end is dropped.
    let after = h.send(vec![h.done(op(0), &1), h.signal("s", &1)]);
    assert!(after.events.is_empty());
    assert_replays(&h);
}

#[test]
fn continue_as_new_carries_the_input_and_unconsumed_signals() {
    let mut h = Harness::new(from_fn(
        |ctx: OrchestrationContext, round: u32| async move {
            ctx.activity::<(), _>("tick", &round).await?;
            if round < 3 {
                return ctx.continue_as_new(&(round + 1)).await;
            }
            Ok::<u32, Failure>(round)
        },
    ));
    h.start(&1);
    let turn = h.send(vec![h.signal("late", &"keep me"), h.done(op(0), &())]);
    let ExecutionState::ContinuedAsNew { input, signals } = &turn.state else {
        panic!("{:?}", turn.state)
    };
    assert_eq!(decode::<u32>(input), 2);
    assert_eq!(signals, &[("late".to_owned(), encode(&"keep me"))]);
    assert_eq!(
        h.history.last().map(|e| e.kind.name()),
        Some("ContinuedAsNew")
    );
    assert_replays(&h);
}

#[test]
fn side_effects_are_recorded_once() {
    let mut h = Harness::new(from_fn(|ctx: OrchestrationContext, _: ()| async move {
        let time = ctx.now();
        let id = ctx.uuid();
        let n = ctx.random();
        ctx.activity::<(), _>("wait", &()).await?;
        let millis = time
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        Ok::<(u128, String, u64), Failure>((millis, id.to_string(), n))
    }));
    h.start(&());
    let turn = h.send(vec![h.done(op(3), &())]);
    let (millis, id, n) = output::<(u128, String, u64)>(&turn.state);
    assert_eq!(millis, 1_000_000);
    assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 4);
    // A fresh replay at another time with another seed returns the recorded values.
    let mut fresh = Execution::new(h.instance.clone(), h.execution, 1, h.orchestration.clone());
    fresh.replay(h.history.clone()).unwrap();
    assert_eq!(
        output::<(u128, String, u64)>(fresh.state()),
        (millis, id, n)
    );
    let effects = h
        .history
        .iter()
        .filter(|e| matches!(e.kind, EventKind::SideEffectRecorded { .. }))
        .count();
    assert_eq!(effects, 3);
}

#[test]
fn different_seeds_give_different_random_values() {
    let orchestration = Arc::new(from_fn(|ctx: OrchestrationContext, _: ()| async move {
        Ok::<(u64, String), Failure>((ctx.random(), ctx.uuid().to_string()))
    }));
    let mut a = Harness::with_arc(orchestration.clone());
    let mut b = Harness::with_arc(orchestration);
    b.env();
    a.start(&());
    b.start(&());
    assert_ne!(
        output::<(u64, String)>(a.live.state()),
        output::<(u64, String)>(b.live.state())
    );
}

#[test]
fn custom_status_is_recorded() {
    let mut h = Harness::new(from_fn(|ctx: OrchestrationContext, _: ()| async move {
        ctx.set_custom_status(&"step 1")?;
        ctx.activity::<(), _>("a", &()).await?;
        ctx.clear_custom_status();
        Ok::<(), Failure>(())
    }));
    let turn = h.start(&());
    assert!(turn.events.iter().any(|e| matches!(&e.kind, EventKind::CustomStatusSet { status: Some(p), .. } if *p == encode(&"step 1"))));
    let turn = h.send(vec![h.done(op(1), &())]);
    assert!(
        turn.events
            .iter()
            .any(|e| matches!(e.kind, EventKind::CustomStatusSet { status: None, .. }))
    );
    assert_replays(&h);
}

fn before_patch() -> impl keel_replay::Orchestration {
    from_fn(|ctx: OrchestrationContext, _: ()| async move {
        ctx.activity::<(), _>("old", &()).await?;
        ctx.activity::<(), _>("last", &()).await?;
        Ok::<&'static str, Failure>("old path")
    })
}

fn after_patch() -> impl keel_replay::Orchestration {
    from_fn(|ctx: OrchestrationContext, _: ()| async move {
        let path = if ctx.patched("use-new") {
            ctx.activity::<(), _>("new", &()).await?;
            "new path"
        } else {
            ctx.activity::<(), _>("old", &()).await?;
            "old path"
        };
        // Asked again, the answer is the same.
        assert_eq!(ctx.patched("use-new"), path == "new path");
        ctx.activity::<(), _>("last", &()).await?;
        Ok::<&'static str, Failure>(path)
    })
}

#[test]
fn patched_takes_the_old_path_on_old_histories() {
    // An instance started before the patch: its history has no marker.
    let mut h = Harness::new(before_patch());
    h.start(&());
    h.send(vec![h.done(op(0), &())]);
    // Deploy the patched code: the running instance replays, then continues.
    let mut patched = h
        .replay_with(Arc::new(after_patch()))
        .expect("old history replays on patched code");
    let turn = patched.turn(vec![h.done(op(1), &())], h.env()).unwrap();
    assert_eq!(output::<String>(&turn.state), "old path");
}

#[test]
fn patched_takes_the_new_path_on_new_histories() {
    let mut h = Harness::new(after_patch());
    let turn = h.start(&());
    assert!(turn.events.iter().any(
        |e| matches!(&e.kind, EventKind::Patched { change_id, .. } if change_id == "use-new")
    ));
    assert_eq!(scheduled(&turn), [(op(1), "new".to_owned())]);
    h.send(vec![h.done(op(1), &())]);
    let turn = h.send(vec![h.done(op(2), &())]);
    assert_eq!(output::<String>(&turn.state), "new path");
    assert_replays(&h);
}

#[test]
fn is_replaying_tells_replay_from_progress() {
    let mut h = Harness::new(from_fn(|ctx: OrchestrationContext, _: ()| async move {
        let before = ctx.is_replaying();
        ctx.activity::<(), _>("a", &()).await?;
        let after = ctx.is_replaying();
        ctx.activity::<(), _>("b", &()).await?;
        Ok::<(bool, bool), Failure>((before, after))
    }));
    h.start(&());
    h.send(vec![h.done(op(0), &())]);
    // Cache miss: replay the two turns, then the new message arrives live.
    let mut fresh = h.replay_fresh().unwrap();
    let turn = fresh.turn(vec![h.done(op(1), &())], h.env()).unwrap();
    assert_eq!(output::<(bool, bool)>(&turn.state), (true, true));
    let live = h.send(vec![h.done(op(1), &())]);
    assert_eq!(output::<(bool, bool)>(&live.state), (false, false));
}

#[test]
fn a_changed_activity_is_nondeterminism_naming_both() {
    let mut h = Harness::new(from_fn(two_steps));
    h.start(&1);
    h.send(vec![h.done(op(0), &2)]);
    let changed = Arc::new(from_fn(
        |ctx: OrchestrationContext, input: u32| async move {
            let a: u32 = ctx.activity("double", &input).await?;
            let b: u32 = ctx.activity("triple", &a).await?;
            Ok::<u32, Failure>(b)
        },
    ));
    let error = h.replay_with(changed).unwrap_err();
    assert!(error.is_nondeterminism());
    assert_eq!(
        error.to_string(),
        "nondeterminism at history event 3: the history has ActivityScheduled \"inc\", but the code issued ActivityScheduled \"triple\""
    );
}

#[test]
fn code_that_stops_issuing_a_recorded_command_is_nondeterminism() {
    let mut h = Harness::new(from_fn(two_steps));
    h.start(&1);
    let sleeper = Arc::new(from_fn(|ctx: OrchestrationContext, _: u32| async move {
        ctx.signal::<u32>("never").await
    }));
    let error = h.replay_with(sleeper).unwrap_err();
    let ReplayError::Nondeterminism {
        position,
        recorded,
        issued,
    } = &error
    else {
        panic!("{error}")
    };
    assert_eq!(
        (*position, recorded.kind, issued),
        (1, "ActivityScheduled", &None)
    );
    assert!(error.to_string().contains("issued nothing"), "{error}");
}

#[test]
fn a_different_kind_of_command_is_nondeterminism() {
    let mut h = Harness::new(from_fn(two_steps));
    h.start(&1);
    let timer_instead = Arc::new(from_fn(|ctx: OrchestrationContext, _: u32| async move {
        ctx.sleep(Duration::from_secs(1)).await;
        Ok::<u32, Failure>(0)
    }));
    let error = h.replay_with(timer_instead).unwrap_err();
    assert!(
        error.to_string().contains(
            "the history has ActivityScheduled \"double\", but the code issued TimerCreated"
        ),
        "{error}"
    );
}

#[test]
fn awaiting_a_non_durable_future_is_a_clear_error() {
    let mut h = Harness::new(from_fn(|_ctx: OrchestrationContext, _: ()| async move {
        std::future::pending::<()>().await;
        Ok::<(), Failure>(())
    }));
    let error = h.turn(vec![h.start_message(&())]).unwrap_err();
    assert_eq!(error, ReplayError::NonDurableAwait);
    assert!(error.to_string().contains("non-durable future"));
    // The execution is spent: it refuses further turns with the same error.
    let env = h.env();
    assert_eq!(
        h.live.turn(vec![], env).unwrap_err(),
        ReplayError::NonDurableAwait
    );
}

#[test]
fn a_busy_loop_is_reported() {
    let mut h = Harness::new(from_fn(|_ctx: OrchestrationContext, _: ()| async move {
        loop {
            futures_util::pending!();
        }
        #[allow(unreachable_code)]
        Ok::<(), Failure>(())
    }));
    // `pending!` yields without waking; a self-waking yield is a busy loop.
    let error = h.turn(vec![h.start_message(&())]).unwrap_err();
    assert_eq!(error, ReplayError::NonDurableAwait);

    let mut h = Harness::new(from_fn(|_ctx: OrchestrationContext, _: ()| async move {
        loop {
            YieldNow(false).await;
        }
        #[allow(unreachable_code)]
        Ok::<(), Failure>(())
    }));
    let error = h.turn(vec![h.start_message(&())]).unwrap_err();
    assert!(matches!(error, ReplayError::BusyLoop { .. }), "{error}");
}

/// Wakes itself and yields once, like `tokio::task::yield_now`.
struct YieldNow(bool);

impl Future for YieldNow {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

#[test]
fn a_self_waking_yield_is_fine() {
    let mut h = Harness::new(from_fn(|ctx: OrchestrationContext, _: ()| async move {
        YieldNow(false).await;
        ctx.activity::<u32, _>("a", &()).await
    }));
    let turn = h.start(&());
    assert_eq!(scheduled(&turn).len(), 1);
}

#[test]
fn a_panic_becomes_an_error_value() {
    let mut h = Harness::new(from_fn(|ctx: OrchestrationContext, _: ()| async move {
        let n: u32 = ctx.activity("a", &()).await?;
        assert!(n < 10, "n was {n}, far too big");
        Ok::<u32, Failure>(n)
    }));
    h.start(&());
    let error = h.turn(vec![h.done(op(0), &99)]).unwrap_err();
    assert_eq!(
        error,
        ReplayError::Panic {
            message: "n was 99, far too big".into()
        }
    );
    // Replaying the stored history (without the failed turn) still works.
    assert!(h.replay_fresh().is_ok());
}

#[test]
fn stale_duplicate_and_unknown_messages_are_dropped() {
    let mut h = Harness::new(from_fn(two_steps));
    h.start(&1);
    let stale = Message::ActivityDone {
        execution: ExecutionId::FIRST.next(),
        op: op(0),
        outcome: Ok(encode(&5)),
    };
    let turn = h.send(vec![
        stale,
        h.done(op(7), &1),
        h.fired(op(0)),
        h.child_done(op(0), Ok(encode(&1))),
    ]);
    assert!(
        turn.events.is_empty() && turn.commands.is_empty(),
        "{turn:?}"
    );
    let turn = h.send(vec![h.done(op(0), &2), h.done(op(0), &3)]);
    assert_eq!(
        turn.events
            .iter()
            .filter(|e| e.kind.name() == "ActivityCompleted")
            .count(),
        1
    );
    let turn = h.send(vec![h.done(op(1), &3)]);
    assert_eq!(output::<u32>(&turn.state), 3);
    assert_replays(&h);
}

#[test]
fn the_start_is_applied_first_and_required() {
    let mut h = Harness::new(collect_signals(1));
    let error = h.turn(vec![h.signal("approve", &"x")]).unwrap_err();
    assert!(matches!(error, ReplayError::NotStarted { .. }), "{error}");

    let mut h = Harness::new(collect_signals(1));
    let turn = h.send(vec![h.signal("approve", &"x"), h.start_message(&())]);
    assert_eq!(output::<Vec<String>>(&turn.state), ["x"]);
    assert_eq!(kinds(&h)[..2], ["ExecutionStarted", "SignalReceived"]);
}

#[test]
fn an_input_that_does_not_decode_fails_the_execution() {
    let mut h = Harness::new(from_fn(two_steps));
    let turn = h.start(&"not a number");
    let ExecutionState::Failed { failure } = &turn.state else {
        panic!("{:?}", turn.state)
    };
    assert_eq!(failure.kind, Failure::DECODE);
    assert!(failure.message.contains("u32"), "{}", failure.message);
}

#[test]
fn a_history_of_another_version_is_refused() {
    let mut h = Harness::new(from_fn(two_steps));
    h.start(&1);
    let mut other = Execution::new(h.instance.clone(), h.execution, 2, h.orchestration.clone());
    let error = other.replay(h.history.clone()).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("version 1 of the code, but this is version 2"),
        "{error}"
    );
}

#[test]
fn corrupt_histories_are_errors_not_panics() {
    let mut h = Harness::new(from_fn(two_steps));
    h.start(&1);
    h.send(vec![h.done(op(0), &2)]);
    let mut history = h.history.clone();
    // A completion for an operation that was never scheduled.
    history.push(keel_core::Event {
        at: h.now,
        kind: EventKind::TimerFired { op: op(42) },
    });
    let mut fresh = Execution::new(h.instance.clone(), h.execution, 1, h.orchestration.clone());
    let error = fresh.replay(history).unwrap_err();
    assert!(
        matches!(error, ReplayError::CorruptHistory { position: 4, .. }),
        "{error}"
    );
    // A history that does not begin with its start.
    let mut fresh = Execution::new(h.instance.clone(), h.execution, 1, h.orchestration.clone());
    let error = fresh.replay(h.history[1..].to_vec()).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("does not begin with ExecutionStarted"),
        "{error}"
    );
}

#[test]
fn a_cached_execution_turns_without_its_history() {
    let mut h = Harness::new(from_fn(|ctx: OrchestrationContext, _: ()| async move {
        let mut total = 0_u64;
        for i in 0..500_u64 {
            total += ctx.activity::<u64, _>("step", &i).await?;
        }
        Ok::<u64, Failure>(total)
    }));
    h.start(&());
    for i in 0..500 {
        let turn = h.send(vec![h.done(op(i), &i)]);
        // The completion, then the next schedule (or the end).
        assert_eq!(turn.events.len(), 2);
    }
    assert_eq!(output::<u64>(h.live.state()), (0..500).sum::<u64>());
    assert_eq!(h.live.history_len(), h.history.len() as u64);
    assert_replays(&h);
}

#[test]
fn raw_payload_orchestrations_work() {
    let raw = |ctx: OrchestrationContext, input: Payload| async move {
        let echoed: serde_json::Value = ctx
            .activity("echo", &decode::<serde_json::Value>(&input))
            .await?;
        Ok::<Payload, Failure>(encode(&echoed))
    };
    let mut h = Harness::new(raw);
    h.start(&serde_json::json!({"a": 1}));
    let turn = h.send(vec![h.done(op(0), &serde_json::json!({"b": 2}))]);
    assert_eq!(
        output::<serde_json::Value>(&turn.state),
        serde_json::json!({"b": 2})
    );
}
