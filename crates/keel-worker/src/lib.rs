#![doc = include_str!("../README.md")]

mod ack;
mod activities;
mod activity;
mod cache;
mod error;
pub mod metrics;
mod notifier;
mod options;
mod orchestrations;
mod registry;
mod worker;

pub use activity::{Activity, ActivityContext, ActivityFuture, TypedActivity, activity_fn};
pub use error::{Error, Result};
pub use notifier::{Notifier, Watch};
pub use options::WorkerOptions;
pub use registry::Registry;
pub use tokio_util::sync::CancellationToken;
pub use worker::{ShutdownReport, Worker};
