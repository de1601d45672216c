//! The error every provider method returns.

use std::error::Error as StdError;
use std::fmt;

/// A `Result` whose error defaults to [`ProviderError`].
pub type Result<T, E = ProviderError> = std::result::Result<T, E>;

/// What went wrong, as far as a caller needs to decide what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The instance, execution or dead letter does not exist.
    NotFound,
    /// An instance with that id already exists.
    AlreadyExists,
    /// The lock or lease is no longer held: it expired, or another worker took the work.
    Stale,
    /// The activity was cancelled by its orchestration.
    Cancelled,
    /// The request itself is invalid (names what); retrying it cannot help.
    InvalidInput,
    /// A record is over a size limit (names the limit and the size).
    TooLarge,
    /// Stored data could not be decoded.
    Corrupt,
    /// The store cannot be reached or is overloaded; retrying later may help.
    Unavailable,
    /// Anything else the store reported.
    Internal,
}

/// An error from a provider: a kind to branch on, a message, whether retrying may help,
/// and the underlying cause.
#[derive(Debug)]
pub struct ProviderError {
    kind: ErrorKind,
    message: String,
    retryable: bool,
    source: Option<Box<dyn StdError + Send + Sync>>,
}

impl ProviderError {
    /// An error of `kind`; retryable only for [`ErrorKind::Unavailable`] by default.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            retryable: kind == ErrorKind::Unavailable,
            source: None,
        }
    }

    /// [`ErrorKind::NotFound`] for `what` (e.g. "instance order-1").
    pub fn not_found(what: impl fmt::Display) -> Self {
        Self::new(ErrorKind::NotFound, format!("{what} does not exist"))
    }

    /// [`ErrorKind::Stale`] for `what` (e.g. "lock on order-1").
    pub fn stale(what: impl fmt::Display) -> Self {
        Self::new(
            ErrorKind::Stale,
            format!("{what} is no longer held (expired or taken over)"),
        )
    }

    /// [`ErrorKind::TooLarge`] naming the record, its size and the limit.
    pub fn too_large(what: impl fmt::Display, size: usize, limit: usize) -> Self {
        Self::new(
            ErrorKind::TooLarge,
            format!("{what} is {size} bytes, over the limit of {limit} bytes"),
        )
    }

    /// [`ErrorKind::Unavailable`] wrapping the driver's error.
    pub fn unavailable(source: impl StdError + Send + Sync + 'static) -> Self {
        Self::new(ErrorKind::Unavailable, source.to_string()).with_source(source)
    }

    /// Attaches the underlying cause.
    #[must_use]
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Overrides whether retrying may help.
    #[must_use]
    pub fn retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// Whether the thing asked for does not exist.
    pub fn is_not_found(&self) -> bool {
        self.kind == ErrorKind::NotFound
    }

    /// Whether the call lost a race: the instance exists already, or the lock or lease
    /// is held by someone else now.
    pub fn is_conflict(&self) -> bool {
        matches!(self.kind, ErrorKind::AlreadyExists | ErrorKind::Stale)
    }

    /// Whether a lock or lease was no longer held.
    pub fn is_stale(&self) -> bool {
        self.kind == ErrorKind::Stale
    }

    /// Whether the activity was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.kind == ErrorKind::Cancelled
    }
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl StdError for ProviderError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn StdError + 'static))
    }
}

impl From<keel_core::RecordError> for ProviderError {
    fn from(error: keel_core::RecordError) -> Self {
        Self::new(ErrorKind::Corrupt, error.to_string()).with_source(error)
    }
}

impl From<keel_core::InvalidInput> for ProviderError {
    fn from(error: keel_core::InvalidInput) -> Self {
        Self::new(ErrorKind::InvalidInput, error.to_string())
    }
}
