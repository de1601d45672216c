//! Turning PostgreSQL's and the pool's errors into [`ProviderError`]s.

use std::error::Error as StdError;
use std::fmt::Write as _;

use deadpool_postgres::PoolError;
use keel_provider::{ErrorKind, ProviderError};
use tokio_postgres::error::SqlState;

/// The kind a driver error maps to, and whether retrying may help.
///
/// Lost connections, a server shutting down or restarting, serialization failures,
/// deadlocks and exhausted resources are `Unavailable` and retryable, so workers ride
/// out a PostgreSQL restart or failover. Unique violations are `AlreadyExists`; bad
/// data is `InvalidInput`; anything else `Internal`.
fn classify(error: &tokio_postgres::Error) -> (ErrorKind, bool) {
    let Some(code) = error.code() else {
        // No SQLSTATE: I/O, a closed connection, a timeout, or a bad row/column (our
        // bug, or a column holding something other than what we wrote).
        let text = error.to_string();
        if text.starts_with("error deserializing") || text.starts_with("invalid column") {
            return (ErrorKind::Corrupt, false);
        }
        return (ErrorKind::Unavailable, true);
    };
    let code = code.code();
    match code {
        c if c == SqlState::UNIQUE_VIOLATION.code() => (ErrorKind::AlreadyExists, false),
        c if c == SqlState::T_R_SERIALIZATION_FAILURE.code()
            || c == SqlState::T_R_DEADLOCK_DETECTED.code()
            || c == SqlState::LOCK_NOT_AVAILABLE.code()
            || c == SqlState::ADMIN_SHUTDOWN.code()
            || c == SqlState::CRASH_SHUTDOWN.code()
            || c == SqlState::CANNOT_CONNECT_NOW.code()
            || c == SqlState::QUERY_CANCELED.code()
            || c == SqlState::READ_ONLY_SQL_TRANSACTION.code()
            || c == SqlState::IDLE_SESSION_TIMEOUT.code() =>
        {
            (ErrorKind::Unavailable, true)
        }
        // Class 08: connection exceptions; 53: insufficient resources (too many
        // connections, out of memory or disk); 58: system errors (I/O).
        c if c.starts_with("08") || c.starts_with("53") || c.starts_with("58") => {
            (ErrorKind::Unavailable, true)
        }
        // Class 28: bad credentials; 3D: no such database. Retrying cannot help until
        // someone fixes the configuration.
        c if c.starts_with("28") || c.starts_with("3D") => (ErrorKind::InvalidInput, false),
        // Class 22: data exceptions (a value that does not fit its column).
        c if c.starts_with("22") => (ErrorKind::InvalidInput, false),
        c if c.starts_with("XX") => (ErrorKind::Corrupt, false),
        _ => (ErrorKind::Internal, false),
    }
}

/// The driver's error with its causes, one after another: tokio-postgres keeps the
/// server's message in the source.
pub(crate) fn describe(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

/// Maps a driver error, attached as the source; the message says it came from
/// PostgreSQL and what the server said.
pub(crate) fn db(error: tokio_postgres::Error) -> ProviderError {
    let (kind, retryable) = classify(&error);
    let message = match error.as_db_error() {
        Some(db) => format!(
            "PostgreSQL: {} (SQLSTATE {}){}",
            db.message(),
            db.code().code(),
            db.detail().map(|d| format!(": {d}")).unwrap_or_default()
        ),
        None => format!("PostgreSQL: {}", describe(&error)),
    };
    ProviderError::new(kind, message)
        .retryable(retryable)
        .with_source(error)
}

/// Maps a pool error: a timeout waiting for a connection or failing to open one is
/// `Unavailable` and retryable; a closed pool is `Unavailable` for good.
pub(crate) fn pool(error: PoolError) -> ProviderError {
    match error {
        PoolError::Backend(error) => db(error),
        PoolError::Closed => closed(),
        PoolError::Timeout(kind) => ProviderError::new(
            ErrorKind::Unavailable,
            format!("PostgreSQL: timed out waiting for a pooled connection ({kind:?})"),
        ),
        other => ProviderError::new(
            ErrorKind::Unavailable,
            format!("PostgreSQL connection pool: {other}"),
        )
        .with_source(other),
    }
}

/// The provider was closed.
pub(crate) fn closed() -> ProviderError {
    ProviderError::new(ErrorKind::Unavailable, "the PostgreSQL provider is closed").retryable(false)
}

/// A stored value that does not fit its Rust type.
pub(crate) fn corrupt(what: impl std::fmt::Display) -> ProviderError {
    ProviderError::new(ErrorKind::Corrupt, format!("corrupt stored value: {what}"))
}

/// Stored record `what` ("message 7") read back as `error`.
pub(crate) fn undecodable(what: impl std::fmt::Display, error: ProviderError) -> ProviderError {
    ProviderError::new(
        ErrorKind::Corrupt,
        format!("stored {what} cannot be decoded: {error}"),
    )
    .with_source(error)
}

/// An invalid argument, naming what was wrong.
pub(crate) fn invalid(message: impl Into<String>) -> ProviderError {
    ProviderError::new(ErrorKind::InvalidInput, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_pool_is_unavailable_for_good() {
        let err = pool(PoolError::Closed);
        assert_eq!(err.kind(), ErrorKind::Unavailable);
        assert!(!err.is_retryable());
        assert!(err.message().contains("closed"));
    }
}
