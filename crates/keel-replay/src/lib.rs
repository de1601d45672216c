#![doc = include_str!("../README.md")]

mod combinators;
mod command;
mod context;
mod error;
mod execution;
mod orchestration;
mod state;

pub use combinators::{Either, Select, Select2, join_all, select, select2};
pub use command::{Command, ExecutionState, Turn};
pub use context::{
    ActivityCall, ChildCall, ContinueAsNew, OrchestrationContext, SignalWait, Timer,
};
pub use error::{EventSummary, ReplayError, Result};
pub use execution::{Execution, TurnEnv};
pub use orchestration::{Orchestration, OrchestrationFuture, TypedOrchestration, from_fn};
