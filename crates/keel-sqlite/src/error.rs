//! Turning SQLite's errors into [`ProviderError`]s.

use keel_provider::{ErrorKind, ProviderError};

/// SQLite's primary result codes that mean "try again later": the database is busy
/// or locked, or the disk, memory or file system failed.
const SQLITE_NOMEM: i32 = 7;
const SQLITE_BUSY: i32 = 5;
const SQLITE_LOCKED: i32 = 6;
const SQLITE_IOERR: i32 = 10;
const SQLITE_CORRUPT: i32 = 11;
const SQLITE_FULL: i32 = 13;
const SQLITE_CANTOPEN: i32 = 14;
const SQLITE_PROTOCOL: i32 = 15;
const SQLITE_NOTADB: i32 = 26;

/// Maps a driver error: busy, locked and I/O failures are `Unavailable` (retryable),
/// damaged files and undecodable columns `Corrupt`, anything else `Internal`; the
/// driver's error is attached as the source.
pub(crate) fn db(error: sqlx::Error) -> ProviderError {
    let kind = match &error {
        sqlx::Error::Database(e) => {
            let code = e
                .code()
                .and_then(|code| code.parse::<i32>().ok())
                .unwrap_or(0);
            // Extended result codes keep the primary code in the low byte.
            match code & 0xff {
                SQLITE_BUSY | SQLITE_LOCKED | SQLITE_NOMEM | SQLITE_IOERR | SQLITE_FULL
                | SQLITE_CANTOPEN | SQLITE_PROTOCOL => ErrorKind::Unavailable,
                SQLITE_CORRUPT | SQLITE_NOTADB => ErrorKind::Corrupt,
                _ => ErrorKind::Internal,
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => ErrorKind::Unavailable,
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => ErrorKind::Corrupt,
        _ => ErrorKind::Internal,
    };
    ProviderError::new(kind, format!("SQLite: {error}")).with_source(error)
}

/// A copy of `error` for each request of a group whose transaction failed: the same
/// kind, message and retryability (the source stays with the first).
pub(crate) fn replicate(error: &ProviderError) -> ProviderError {
    ProviderError::new(error.kind(), error.message()).retryable(error.is_retryable())
}

/// A stored value that does not fit its Rust type.
pub(crate) fn corrupt(what: impl std::fmt::Display) -> ProviderError {
    ProviderError::new(ErrorKind::Corrupt, format!("corrupt stored value: {what}"))
}

/// Stored record `what` ("message 7") read back as `error`: damaged or foreign bytes,
/// or a value of another type than a blob in its column.
pub(crate) fn undecodable(what: impl std::fmt::Display, error: ProviderError) -> ProviderError {
    ProviderError::new(
        ErrorKind::Corrupt,
        format!("stored {what} cannot be decoded: {error}"),
    )
    .with_source(error)
}

/// The writer task is gone: the provider was closed (or its runtime shut down).
pub(crate) fn closed() -> ProviderError {
    ProviderError::new(ErrorKind::Unavailable, "the SQLite provider is closed").retryable(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_and_io_failures_are_retryable() {
        let err = db(sqlx::Error::PoolTimedOut);
        assert_eq!(err.kind(), ErrorKind::Unavailable);
        assert!(err.is_retryable());
        assert!(std::error::Error::source(&err).is_some());
        let err = db(sqlx::Error::RowNotFound);
        assert_eq!(err.kind(), ErrorKind::Internal);
        assert!(!err.is_retryable());
    }
}
