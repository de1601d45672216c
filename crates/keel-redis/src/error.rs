//! The errors of connecting a notifier. Once connected, Redis failures are never
//! errors: they are logged and retried in the background, and waits fall back to the
//! wrapped provider.

use std::time::Duration;

use keel_provider::{ErrorKind, ProviderError};

/// A `Result` whose error defaults to [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why [`RedisNotifier::connect`](crate::RedisNotifier::connect) failed. Each names the
/// URL, with any password replaced by `***`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The URL is not one this client can use (its scheme, host or database number).
    #[error("invalid Redis URL {url}: {source}")]
    InvalidUrl {
        /// The URL, password redacted.
        url: String,
        /// What the client found wrong with it.
        #[source]
        source: redis::RedisError,
    },
    /// Redis refused or failed the connection, the subscription or the `PING`.
    #[error("cannot reach Redis at {url}: {source}")]
    Unreachable {
        /// The URL, password redacted.
        url: String,
        /// The client's error.
        #[source]
        source: redis::RedisError,
    },
    /// Redis did not answer within the connect timeout.
    #[error("Redis at {url} did not answer within {waited:?}")]
    Timeout {
        /// The URL, password redacted.
        url: String,
        /// How long we waited.
        waited: Duration,
    },
}

impl Error {
    /// Whether trying again later may help: an unreachable or silent server may come
    /// up; an invalid URL stays invalid.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Self::InvalidUrl { .. })
    }
}

/// For callers that speak only [`ProviderError`] (a builder that opens every store the
/// same way): an invalid URL is `InvalidInput`, the rest `Unavailable`.
impl From<Error> for ProviderError {
    fn from(error: Error) -> Self {
        let kind = match error {
            Error::InvalidUrl { .. } => ErrorKind::InvalidInput,
            Error::Unreachable { .. } | Error::Timeout { .. } => ErrorKind::Unavailable,
        };
        ProviderError::new(kind, error.to_string()).with_source(error)
    }
}

/// `url` with the password of its user-info part (`redis://user:secret@host`) replaced
/// by `***`, fit for messages and logs.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // The user-info ends at the last '@' before the path: a password may contain '@'.
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    let user = match userinfo.split_once(':') {
        Some((user, _password)) => format!("{user}:***"),
        // A user name alone is no secret.
        None => userinfo.to_owned(),
    };
    format!("{scheme}://{user}@{}", &rest[at + 1..])
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_redacted_and_the_rest_kept() {
        assert_eq!(
            redact("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        assert_eq!(
            redact("redis://user:s3cr@t@host:6379/2"),
            "redis://user:***@host:6379/2"
        );
        assert_eq!(redact("redis://:pw@host"), "redis://:***@host");
        assert_eq!(redact("redis://me@host/1"), "redis://me@host/1");
        assert_eq!(redact("not a url"), "not a url");
    }
}
