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
pub(crate) fn db(error: rusqlite::Error) -> ProviderError {
    let kind = match &error {
        // Extended result codes keep the primary code in the low byte.
        rusqlite::Error::SqliteFailure(e, _) => match e.extended_code & 0xff {
            SQLITE_BUSY | SQLITE_LOCKED | SQLITE_NOMEM | SQLITE_IOERR | SQLITE_FULL
            | SQLITE_CANTOPEN | SQLITE_PROTOCOL => ErrorKind::Unavailable,
            SQLITE_CORRUPT | SQLITE_NOTADB => ErrorKind::Corrupt,
            _ => ErrorKind::Internal,
        },
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::InvalidColumnType(..) => ErrorKind::Corrupt,
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

/// The writer thread or the readers are gone: the provider was closed.
pub(crate) fn closed() -> ProviderError {
    ProviderError::new(ErrorKind::Unavailable, "the SQLite provider is closed").retryable(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_and_io_failures_are_retryable() {
        use rusqlite::ffi;
        for code in [
            ffi::SQLITE_BUSY,
            ffi::SQLITE_IOERR_FSYNC,
            ffi::SQLITE_LOCKED_SHAREDCACHE,
        ] {
            let err = db(rusqlite::Error::SqliteFailure(ffi::Error::new(code), None));
            assert_eq!(err.kind(), ErrorKind::Unavailable, "{code}");
            assert!(err.is_retryable());
            assert!(std::error::Error::source(&err).is_some());
        }
        let err = db(rusqlite::Error::SqliteFailure(
            ffi::Error::new(ffi::SQLITE_CORRUPT),
            None,
        ));
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        let err = db(rusqlite::Error::QueryReturnedNoRows);
        assert_eq!(err.kind(), ErrorKind::Internal);
        assert!(!err.is_retryable());
    }
}
