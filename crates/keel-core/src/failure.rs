//! The structured error that crosses the wire: what an activity, child or orchestration
//! failed with.

use std::error::Error as StdError;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::CodecError;
use crate::payload::Payload;

/// A failure as Keel records it: a kind to match on, a message, the chain of causes,
/// whether retrying may help, and optional user data.
///
/// Never a bare string, so a workflow can branch on `kind`, a retry policy can refuse
/// kinds, and the dashboard can show the whole chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// A stable, machine-matchable name, e.g. `"PaymentDeclined"`; Keel's own kinds
    /// start with `keel.`.
    pub kind: String,
    /// A human-readable message.
    pub message: String,
    /// The messages of the error's sources, outermost first.
    pub causes: Vec<String>,
    /// Whether another attempt could succeed. Retry policies only retry these.
    pub retryable: bool,
    /// Structured details for the caller, encoded like any other payload.
    pub data: Option<Payload>,
}

impl Failure {
    /// Kind of a failure made from a panic; the message is the panic's.
    pub const PANIC: &'static str = "keel.panic";
    /// Kind of an attempt that ran past its per-attempt timeout.
    pub const TIMEOUT: &'static str = "keel.timeout";
    /// Kind of an operation or workflow that was cancelled.
    pub const CANCELLED: &'static str = "keel.cancelled";
    /// Kind of a payload that did not decode to the type asked for.
    pub const DECODE: &'static str = "keel.decode";
    /// Kind of a value that could not be encoded (or was over the size limit).
    pub const ENCODE: &'static str = "keel.encode";
    /// Kind of a call to a name that no worker has registered.
    pub const UNREGISTERED: &'static str = "keel.unregistered";

    /// A retryable failure of `kind` with `message` and no causes or data.
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            message: message.into(),
            causes: Vec::new(),
            retryable: true,
            data: None,
        }
    }

    /// A failure of `kind` from an error value: its message, and its `source()` chain
    /// as causes.
    pub fn from_error(kind: impl Into<String>, error: &(dyn StdError + 'static)) -> Self {
        let mut failure = Self::new(kind, error.to_string());
        let mut source = error.source();
        while let Some(cause) = source {
            failure.causes.push(cause.to_string());
            source = cause.source();
        }
        failure
    }

    /// Marks whether another attempt could succeed.
    #[must_use]
    pub fn retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    /// Attaches structured details.
    #[must_use]
    pub fn with_data(mut self, data: Payload) -> Self {
        self.data = Some(data);
        self
    }

    /// Appends a cause.
    #[must_use]
    pub fn with_cause(mut self, cause: impl Into<String>) -> Self {
        self.causes.push(cause.into());
        self
    }

    /// Whether this failure is of `kind`.
    pub fn is(&self, kind: &str) -> bool {
        self.kind == kind
    }

    /// Whether this is Keel's cancellation.
    pub fn is_cancelled(&self) -> bool {
        self.is(Self::CANCELLED)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)?;
        for cause in &self.causes {
            write!(f, ": {cause}")?;
        }
        Ok(())
    }
}

impl StdError for Failure {}

impl From<CodecError> for Failure {
    /// Decode errors become [`Failure::DECODE`], the rest [`Failure::ENCODE`]; neither is
    /// retryable, since the same bytes fail the same way again.
    fn from(error: CodecError) -> Self {
        let kind = match error {
            CodecError::Decode { .. } | CodecError::Corrupt(_) => Self::DECODE,
            _ => Self::ENCODE,
        };
        Self::new(kind, error.to_string()).retryable(false)
    }
}

/// Turns the error an activity or orchestration returned into the [`Failure`] Keel
/// records.
///
/// Every `std::error::Error` converts: its kind is the error type's name (e.g.
/// `"PaymentError"`), its message and source chain are kept, and it is retryable. Return
/// a [`Failure`] itself to choose the kind, retryability and data; it passes through
/// unchanged.
pub trait IntoFailure {
    /// The failure to record.
    fn into_failure(self) -> Failure;
}

impl<E: StdError + Send + Sync + 'static> IntoFailure for E {
    fn into_failure(self) -> Failure {
        let error: Box<dyn StdError + Send + Sync> = Box::new(self);
        match error.downcast::<Failure>() {
            Ok(failure) => *failure,
            Err(error) => Failure::from_error(short_type_name::<E>(), error.as_ref()),
        }
    }
}

/// `my_crate::errors::PaymentError<T>` -> `PaymentError`.
fn short_type_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    let path = full.split('<').next().unwrap_or(full);
    path.rsplit("::").next().unwrap_or(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("charging the card failed")
        }
    }
    impl StdError for Outer {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn errors_become_failures_named_by_their_type() {
        let failure = Outer(std::io::Error::other("connection reset")).into_failure();
        assert_eq!(failure.kind, "Outer");
        assert_eq!(failure.causes, ["connection reset"]);
        assert!(failure.retryable);

        let chosen = Failure::new("PaymentDeclined", "card refused").retryable(false);
        assert_eq!(chosen.clone().into_failure(), chosen);
    }

    #[test]
    fn the_source_chain_is_kept() {
        let err = Outer(std::io::Error::other("connection reset"));
        let failure = Failure::from_error("Payment", &err).retryable(false);
        assert_eq!(failure.causes, ["connection reset"]);
        assert!(!failure.retryable);
        assert_eq!(
            failure.to_string(),
            "Payment: charging the card failed: connection reset"
        );
    }
}
