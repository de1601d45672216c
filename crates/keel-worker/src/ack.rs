//! Turning the engine's view of a turn (events, commands, state) into the provider's
//! atomic ack.

use keel_core::{
    EventKind, ExecutionId, Failure, InstanceId, Message, ParentLink, Timestamp, WorkItem,
};
use keel_provider::{
    Ack, CustomStatusUpdate, LockToken, MessageId, NewInstance, OutgoingMessage, TurnOutcome,
};
use keel_replay::{Command, ExecutionState, Turn};

/// Which execution a turn ran.
#[derive(Debug, Clone)]
pub(crate) struct TurnOf {
    pub(crate) lock: LockToken,
    pub(crate) execution: ExecutionId,
    pub(crate) version: u32,
    pub(crate) now: Timestamp,
}

/// The ack that commits `turn`, consuming `consumed`.
pub(crate) fn ack_for(of: &TurnOf, consumed: Vec<MessageId>, turn: Turn) -> Ack {
    let instance = of.lock.instance().clone();
    let mut ack = Ack::new(of.lock.clone(), consumed);
    ack.version = Some(of.version);
    ack.custom_status = custom_status(&turn);
    for command in turn.commands {
        add_command(&mut ack, &instance, of, command);
    }
    ack.outcome = match turn.state {
        ExecutionState::NotStarted | ExecutionState::Running => TurnOutcome::Running,
        ExecutionState::Completed { output } => TurnOutcome::Completed(output),
        ExecutionState::Failed { failure } => TurnOutcome::Failed(failure),
        ExecutionState::Cancelled { reason } => {
            TurnOutcome::Cancelled(Failure::new(Failure::CANCELLED, reason).retryable(false))
        }
        // The next execution runs the newest registered version: continue-as-new is
        // where a long-lived instance picks up new code.
        ExecutionState::ContinuedAsNew { input, signals } => TurnOutcome::ContinuedAsNew {
            input,
            version: None,
            carried: signals
                .into_iter()
                .map(|(name, payload)| Message::Signal { name, payload })
                .collect(),
        },
    };
    ack.events = turn.events;
    ack
}

/// The last custom-status change of the turn, if any.
fn custom_status(turn: &Turn) -> CustomStatusUpdate {
    turn.events
        .iter()
        .rev()
        .find_map(|event| match &event.kind {
            EventKind::CustomStatusSet { status, .. } => Some(match status {
                Some(status) => CustomStatusUpdate::Set(status.clone()),
                None => CustomStatusUpdate::Cleared,
            }),
            _ => None,
        })
        .unwrap_or_default()
}

fn add_command(ack: &mut Ack, instance: &InstanceId, of: &TurnOf, command: Command) {
    match command {
        Command::ScheduleActivity {
            op,
            name,
            input,
            options,
        } => ack.activities.push(WorkItem {
            instance: instance.clone(),
            execution: of.execution,
            op,
            name,
            input,
            options,
            attempt: 1,
            scheduled_at: of.now,
        }),
        Command::StartTimer { op, fire_at } => ack.messages.push(OutgoingMessage {
            to: instance.clone(),
            message: Message::TimerFired {
                execution: of.execution,
                op,
            },
            visible_at: Some(fire_at),
        }),
        Command::StartChild {
            op,
            name,
            version,
            instance: child,
            input,
        } => {
            let mut new = NewInstance::new(child, name, input);
            new.version = version;
            new.parent = Some(ParentLink {
                instance: instance.clone(),
                execution: of.execution,
                op,
            });
            ack.children.push(new);
        }
        Command::CancelActivity { op } => ack.cancel_activities.push(op),
        // The timer's message may still arrive; the engine drops it as stale.
        Command::CancelTimer { .. } => {}
        Command::CancelChild {
            instance: child, ..
        } => ack.messages.push(OutgoingMessage {
            to: child,
            message: Message::Cancel {
                reason: format!("its parent {instance} cancelled it"),
            },
            visible_at: None,
        }),
        Command::ReportToParent { parent, outcome } => ack.messages.push(OutgoingMessage {
            to: parent.instance,
            message: Message::ChildDone {
                execution: parent.execution,
                op: parent.op,
                outcome,
            },
            visible_at: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use keel_core::{ActivityOptions, Codec, Event, OpId, Payload};

    use super::*;

    fn payload(value: &str) -> Payload {
        Codec::default().encode(value).unwrap()
    }

    fn of() -> TurnOf {
        TurnOf {
            lock: LockToken::new(InstanceId::new("parent").unwrap(), 7),
            execution: ExecutionId::FIRST,
            version: 2,
            now: Timestamp::from_millis(5_000),
        }
    }

    fn op(n: u64) -> OpId {
        OpId::from_raw(n)
    }

    #[test]
    fn every_command_lands_in_the_ack() {
        let parent_link = ParentLink {
            instance: InstanceId::new("grandparent").unwrap(),
            execution: ExecutionId::FIRST,
            op: op(9),
        };
        let turn = Turn {
            events: vec![
                Event {
                    at: Timestamp::from_millis(5_000),
                    kind: EventKind::CustomStatusSet {
                        op: op(1),
                        status: Some(payload("a")),
                    },
                },
                Event {
                    at: Timestamp::from_millis(5_000),
                    kind: EventKind::CustomStatusSet {
                        op: op(2),
                        status: None,
                    },
                },
            ],
            commands: vec![
                Command::ScheduleActivity {
                    op: op(3),
                    name: "charge".to_owned(),
                    input: payload("card"),
                    options: ActivityOptions::default(),
                },
                Command::StartTimer {
                    op: op(4),
                    fire_at: Timestamp::from_millis(9_000),
                },
                Command::StartChild {
                    op: op(5),
                    name: "ship".to_owned(),
                    version: Some(1),
                    instance: InstanceId::new("child").unwrap(),
                    input: payload("box"),
                },
                Command::CancelActivity { op: op(6) },
                Command::CancelTimer { op: op(4) },
                Command::CancelChild {
                    op: op(5),
                    instance: InstanceId::new("child").unwrap(),
                },
                Command::ReportToParent {
                    parent: parent_link.clone(),
                    outcome: Ok(payload("done")),
                },
            ],
            state: ExecutionState::Completed {
                output: payload("done"),
            },
        };
        let ack = ack_for(&of(), vec![MessageId(1)], turn);

        assert_eq!(ack.version, Some(2));
        assert_eq!(ack.consumed, [MessageId(1)]);
        assert_eq!(ack.events.len(), 2);
        // The last change of the turn wins.
        assert_eq!(ack.custom_status, CustomStatusUpdate::Cleared);
        let item = &ack.activities[0];
        assert_eq!(
            (item.op, item.attempt, item.scheduled_at),
            (op(3), 1, of().now)
        );
        assert_eq!(item.instance.as_str(), "parent");
        let timer = &ack.messages[0];
        assert_eq!(timer.visible_at, Some(Timestamp::from_millis(9_000)));
        assert!(matches!(timer.message, Message::TimerFired { op: o, .. } if o == op(4)));
        let child = &ack.children[0];
        assert_eq!(child.parent.as_ref().map(|p| p.op), Some(op(5)));
        assert_eq!(child.version, Some(1));
        assert_eq!(ack.cancel_activities, [op(6)]);
        assert_eq!(ack.messages.len(), 3, "the cancelled timer sends nothing");
        assert_eq!(ack.messages[1].to.as_str(), "child");
        assert!(matches!(ack.messages[1].message, Message::Cancel { .. }));
        assert_eq!(ack.messages[2].to, parent_link.instance);
        assert!(matches!(ack.messages[2].message, Message::ChildDone { op: o, .. } if o == op(9)));
        assert_eq!(ack.outcome, TurnOutcome::Completed(payload("done")));
    }

    #[test]
    fn continue_as_new_carries_unconsumed_signals_and_takes_the_newest_version() {
        let turn = Turn {
            events: Vec::new(),
            commands: Vec::new(),
            state: ExecutionState::ContinuedAsNew {
                input: payload("next"),
                signals: vec![("go".to_owned(), payload("1"))],
            },
        };
        let ack = ack_for(&of(), Vec::new(), turn);
        let TurnOutcome::ContinuedAsNew {
            input,
            version,
            carried,
        } = ack.outcome
        else {
            panic!("expected continue-as-new, got {:?}", ack.outcome);
        };
        assert_eq!((input, version), (payload("next"), None));
        assert!(matches!(&carried[..], [Message::Signal { name, .. }] if name == "go"));
    }

    #[test]
    fn a_cancelled_execution_records_a_cancellation_failure() {
        let turn = Turn {
            events: Vec::new(),
            commands: Vec::new(),
            state: ExecutionState::Cancelled {
                reason: "customer asked".to_owned(),
            },
        };
        let TurnOutcome::Cancelled(failure) = ack_for(&of(), Vec::new(), turn).outcome else {
            panic!("expected a cancellation");
        };
        assert!(failure.is_cancelled());
        assert_eq!(failure.message, "customer asked");
    }
}
