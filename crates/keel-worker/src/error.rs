//! What can go wrong when building or running a worker.

use keel_provider::ProviderError;
use thiserror::Error;

/// A `Result` whose error defaults to [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a registration, an option or a worker call failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// No code is registered under that name (and version).
    #[error("{what} {name:?} is not registered; registered: {}", registered_list(.registered))]
    Unregistered {
        /// `"orchestration"` or `"activity"`.
        what: &'static str,
        /// The name asked for (with the version, if one was asked for).
        name: String,
        /// What is registered, sorted.
        registered: Vec<String>,
    },
    /// The same name (and version) was registered twice.
    #[error("{what} {name:?} is registered twice")]
    Duplicate {
        /// `"orchestration"` or `"activity"`.
        what: &'static str,
        /// The name (and version).
        name: String,
    },
    /// A worker option is out of range.
    #[error("invalid worker option {option}: {reason}")]
    InvalidOption {
        /// The option's name.
        option: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The store failed.
    #[error(transparent)]
    Provider(#[from] ProviderError),
}

fn registered_list(registered: &[String]) -> String {
    if registered.is_empty() {
        "none".to_owned()
    } else {
        registered.join(", ")
    }
}
