//! Why a turn could not be computed.

use std::fmt;

use keel_core::EventKind;
use thiserror::Error;

/// A `Result` whose error defaults to [`ReplayError`].
pub type Result<T, E = ReplayError> = std::result::Result<T, E>;

/// An event or command named by kind and, where it has one, by the name it carries
/// (activity, child, signal, change id): what nondeterminism errors show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventSummary {
    /// The event kind, e.g. `ActivityScheduled`.
    pub kind: &'static str,
    /// The activity, child, signal or change name, if any.
    pub name: Option<String>,
}

impl EventSummary {
    pub(crate) fn of(kind: &EventKind) -> Self {
        Self {
            kind: kind.name(),
            name: kind.label().map(str::to_owned),
        }
    }
}

impl fmt::Display for EventSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{} {name:?}", self.kind),
            None => f.write_str(self.kind),
        }
    }
}

/// A turn failed; the execution's state is unchanged in storage and the live instance
/// that produced this must be discarded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// The code no longer does what the history says it did. The instance should be
    /// suspended, not failed: fixing the code and resuming it replays cleanly.
    #[error(
        "nondeterminism at history event {position}: the history has {recorded}, but the code {}",
        match issued { Some(issued) => format!("issued {issued}"), None => "issued nothing there".to_owned() }
    )]
    Nondeterminism {
        /// The position of the history event, from 0.
        position: u64,
        /// The recorded event.
        recorded: EventSummary,
        /// What the code did instead: a command, or none.
        issued: Option<EventSummary>,
    },
    /// The code issued a command the history does not have: past the end of the stored
    /// history, or where the history holds an input event.
    #[error(
        "nondeterminism at history event {position}: the code issued {issued}, which the history does not have"
    )]
    UnexpectedCommand {
        /// Where the history was when the command came.
        position: u64,
        /// The command the code issued.
        issued: EventSummary,
    },
    /// The orchestration is waiting with no durable operation outstanding: it awaited
    /// something Keel cannot record, such as `tokio::time::sleep` or a channel.
    #[error(
        "the orchestration awaited a non-durable future (no activity, timer, child or signal \
         is outstanding, so nothing can ever wake it); use ctx.sleep, ctx.activity, \
         ctx.signal or ctx.child instead of runtime futures"
    )]
    NonDurableAwait,
    /// The orchestration kept waking itself without waiting on anything durable.
    #[error(
        "the orchestration woke itself {polls} times in a row without waiting on a durable operation (a busy loop?)"
    )]
    BusyLoop {
        /// How many polls were made.
        polls: u32,
    },
    /// The orchestration code panicked.
    #[error("the orchestration panicked: {message}")]
    Panic {
        /// The panic's message.
        message: String,
    },
    /// The stored history is not one this engine could have written.
    #[error("corrupt history at event {position}: {reason}")]
    CorruptHistory {
        /// The position of the offending event.
        position: u64,
        /// What is wrong.
        reason: String,
    },
    /// A message other than a start arrived for an execution that has not started.
    #[error("{message} message for execution {execution} arrived before its Start message")]
    NotStarted {
        /// The message's kind.
        message: &'static str,
        /// The execution.
        execution: u32,
    },
}

impl ReplayError {
    /// Whether the code disagrees with its history (suspend at once, do not retry).
    pub fn is_nondeterminism(&self) -> bool {
        matches!(
            self,
            Self::Nondeterminism { .. } | Self::UnexpectedCommand { .. }
        )
    }
}
