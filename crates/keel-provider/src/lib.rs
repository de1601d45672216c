#![doc = include_str!("../README.md")]

mod activity;
mod capabilities;
mod clock;
mod error;
pub mod guide;
mod instance;
mod orchestration;
mod provider;

pub use activity::{
    ActivityCompletion, ActivityLimits, ActivityRetry, CompletedActivities, DeadLetter,
    DeadLetterId, FetchActivities, LeaseToken, LeasedWorkItem, WorkKind,
};
pub use async_trait::async_trait;
pub use capabilities::Capabilities;
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{ErrorKind, ProviderError, Result};
pub use instance::{
    Created, Cursor, InstanceQuery, InstanceRecord, NewInstance, OnConflict, Page, PageRequest,
    PurgeFilter, QueueDepths,
};
pub use orchestration::{
    Ack, AckedTurns, CustomStatusUpdate, FetchOrchestrations, LockToken, MessageId,
    OrchestrationWork, OutgoingMessage, QueuedMessage, TurnOutcome,
};
pub use provider::Provider;
