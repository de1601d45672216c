//! The error every facade call returns.

use std::time::Duration;

use keel_core::{CodecError, Failure, InstanceId, InstanceStatus, InvalidInput};
use keel_provider::ProviderError;
use thiserror::Error;

/// A `Result` whose error defaults to [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a Keel call failed. A workflow's own failure comes back as [`Error::Failed`] with
/// the structured [`Failure`] (kind, message, cause chain, data) it ended with.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// The workflow ended in failure; `failure` is what it failed with, often the
    /// failure of the activity or child it awaited.
    #[error("workflow {instance} failed: {failure}")]
    Failed {
        /// The instance.
        instance: InstanceId,
        /// Its failure.
        failure: Box<Failure>,
    },
    /// The workflow was cancelled.
    #[error("workflow {instance} was cancelled: {failure}")]
    Cancelled {
        /// The instance.
        instance: InstanceId,
        /// Why, as a [`Failure::CANCELLED`] failure.
        failure: Box<Failure>,
    },
    /// The workflow did not finish in time; it goes on running.
    #[error(
        "workflow {instance} did not finish within {waited:?}: it is {status}{}",
        reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default()
    )]
    Timeout {
        /// The instance.
        instance: InstanceId,
        /// How long the caller waited.
        waited: Duration,
        /// Its status when the wait ended.
        status: InstanceStatus,
        /// Why it is suspended, if it is.
        reason: Option<String>,
    },
    /// The instance has not finished, so it has no output yet.
    #[error("workflow {instance} has not finished: it is {status}")]
    NotFinished {
        /// The instance.
        instance: InstanceId,
        /// Its status.
        status: InstanceStatus,
    },
    /// No instance has this id.
    #[error("instance {0} does not exist")]
    NotFound(InstanceId),
    /// An instance with this id exists already (a start that asked to fail then).
    #[error("instance {0} already exists")]
    AlreadyExists(InstanceId),
    /// A registration, an unregistered name, or a worker option.
    #[error(transparent)]
    Worker(#[from] keel_worker::Error),
    /// A value could not be encoded, or a result decoded to the type asked for.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// An argument is invalid (an instance id, a queue name).
    #[error(transparent)]
    InvalidInput(#[from] InvalidInput),
    /// The store failed.
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// The Redis notifier could not connect.
    #[cfg(feature = "redis")]
    #[error(transparent)]
    Redis(#[from] keel_redis::Error),
}

impl Error {
    /// The workflow's failure, when it failed or was cancelled.
    pub fn failure(&self) -> Option<&Failure> {
        match self {
            Self::Failed { failure, .. } | Self::Cancelled { failure, .. } => Some(failure),
            _ => None,
        }
    }

    /// Whether a wait ended before the workflow did.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout { .. })
    }

    /// Whether a name was not registered.
    pub fn is_unregistered(&self) -> bool {
        matches!(self, Self::Worker(keel_worker::Error::Unregistered { .. }))
    }

    /// Maps the provider's `NotFound` for `instance` to [`Error::NotFound`].
    pub(crate) fn about(instance: &InstanceId) -> impl FnOnce(ProviderError) -> Self + '_ {
        move |error| match error.kind() {
            keel_provider::ErrorKind::NotFound => Self::NotFound(instance.clone()),
            keel_provider::ErrorKind::AlreadyExists => Self::AlreadyExists(instance.clone()),
            _ => Self::Provider(error),
        }
    }
}
