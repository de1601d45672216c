#![doc = include_str!("../README.md")]

mod builder;
mod client;
mod error;

pub use builder::{DEFAULT_DATABASE, Keel, KeelBuilder};
pub use client::{Client, InstanceInfo, Start};
pub use error::{Error, Result};

pub use keel_core::{
    Codec, Event, EventKind, ExecutionId, Failure, Format, InstanceId, InstanceStatus, IntoFailure,
    OpId, Payload, QueueName, RetryPolicy, Timestamp,
};
pub use keel_provider::{InstanceQuery, Page, PageRequest, Provider};
pub use keel_replay::{Either, OrchestrationContext, join_all, select, select2};
pub use keel_worker::{ActivityContext, CancellationToken, ShutdownReport, WorkerOptions, metrics};

/// The storage contract and its records, for custom providers and management tools.
pub mod provider {
    pub use keel_provider::*;
}

/// The embedded SQLite provider, for opening it with your own options (a virtual clock,
/// `synchronous = NORMAL`).
#[cfg(feature = "sqlite")]
pub mod sqlite {
    pub use keel_sqlite::*;
}

/// The PostgreSQL provider, for opening it with your own options (pool size, schema).
#[cfg(feature = "postgres")]
pub mod postgres {
    pub use keel_postgres::*;
}

/// The Redis wake-up notifier, for wrapping a provider with your own options.
#[cfg(feature = "redis")]
pub mod redis {
    pub use keel_redis::*;
}

/// What most programs need: `use keel::prelude::*;`.
pub mod prelude {
    pub use crate::{
        ActivityContext, Client, Either, Failure, InstanceId, InstanceStatus, IntoFailure, Keel,
        OrchestrationContext, RetryPolicy, WorkerOptions, join_all, select, select2,
    };
}
