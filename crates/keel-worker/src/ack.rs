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
