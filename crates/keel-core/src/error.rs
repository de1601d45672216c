//! Errors of this crate.

use thiserror::Error;

/// A `Result` whose error defaults to this crate's [`CodecError`].
pub type Result<T, E = CodecError> = std::result::Result<T, E>;

/// A value given to Keel was not acceptable; the message names what and why.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid {what}: {reason}")]
pub struct InvalidInput {
    what: &'static str,
    reason: String,
}

impl InvalidInput {
    /// A rejection of `what` (e.g. "instance id") for `reason`.
    pub fn new(what: &'static str, reason: impl Into<String>) -> Self {
        Self {
            what,
            reason: reason.into(),
        }
    }

    /// What was rejected.
    pub fn what(&self) -> &'static str {
        self.what
    }
}

/// A payload could not be encoded or decoded.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The value serialised larger than the codec's limit.
    #[error("payload is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// Size of the encoded value, before compression.
        size: usize,
        /// The codec's `max_size`.
        limit: usize,
    },
    /// The value could not be serialised (e.g. a map with non-string keys in JSON).
    #[error("cannot encode a {type_name} as {format}: {detail}")]
    Encode {
        /// The Rust type being encoded.
        type_name: &'static str,
        /// The payload format.
        format: &'static str,
        /// The serializer's message.
        detail: String,
    },
    /// The bytes are not a value of the requested type.
    #[error("cannot decode a {type_name} from a {format} payload: {detail}")]
    Decode {
        /// The Rust type asked for.
        type_name: &'static str,
        /// The payload's format.
        format: &'static str,
        /// The deserializer's message, naming the field where it knows it.
        detail: String,
    },
    /// The payload is not one Keel wrote: empty, an unknown header, or bad compression.
    #[error("corrupt payload: {0}")]
    Corrupt(String),
}

/// An internal record (history event, message, work item) could not be encoded or
/// decoded; the stored bytes are damaged or were written by an incompatible version.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The bytes do not hold a record of the expected type.
    #[error("corrupt {type_name} record: {detail}")]
    Corrupt {
        /// The record type asked for.
        type_name: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The record was written by a newer or unknown format version.
    #[error("{type_name} record has format version {found}, this build reads version {expected}")]
    Version {
        /// The record type asked for.
        type_name: &'static str,
        /// The version byte found.
        found: u8,
        /// The version this build writes and reads.
        expected: u8,
    },
    /// The record could not be serialised.
    #[error("cannot encode {type_name} record: {detail}")]
    Encode {
        /// The record type.
        type_name: &'static str,
        /// The serializer's message.
        detail: String,
    },
}
