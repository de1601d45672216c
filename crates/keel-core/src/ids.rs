//! Identifiers: instances, executions, and the durable operations within one execution.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::InvalidInput;

/// The id of an orchestration instance, chosen by the user or generated.
///
/// It is 1 to 256 bytes of UTF-8 without control characters, so it can be shown,
/// logged and used as a database key without escaping surprises.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct InstanceId(String);

impl InstanceId {
    /// The longest id accepted, in bytes.
    pub const MAX_LEN: usize = 256;

    /// Checks and wraps `id`.
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidInput> {
        let id = id.into();
        if id.is_empty() {
            return Err(InvalidInput::new("instance id", "must not be empty"));
        }
        if id.len() > Self::MAX_LEN {
            return Err(InvalidInput::new(
                "instance id",
                format!("is {} bytes, the limit is {}", id.len(), Self::MAX_LEN),
            ));
        }
        if let Some(c) = id.chars().find(|c| c.is_control()) {
            return Err(InvalidInput::new(
                "instance id",
                format!("contains the control character {c:?}"),
            ));
        }
        Ok(Self(id))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The deterministic id of the child started by durable operation `op` of this
    /// instance's execution `execution`, used when the code names none.
    ///
    /// It stays within [`Self::MAX_LEN`] by keeping the tail of a long parent id.
    pub fn child(&self, execution: ExecutionId, op: OpId) -> Self {
        let suffix = format!(":{}:{}", execution.get(), op.get());
        let room = Self::MAX_LEN - suffix.len();
        let mut start = self.0.len().saturating_sub(room);
        while !self.0.is_char_boundary(start) {
            start += 1;
        }
        Self(format!("{}{suffix}", &self.0[start..]))
    }
}

impl<'de> Deserialize<'de> for InstanceId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let id = String::deserialize(deserializer)?;
        Self::new(id).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl TryFrom<String> for InstanceId {
    type Error = InvalidInput;
    fn try_from(id: String) -> Result<Self, InvalidInput> {
        Self::new(id)
    }
}

impl TryFrom<&str> for InstanceId {
    type Error = InvalidInput;
    fn try_from(id: &str) -> Result<Self, InvalidInput> {
        Self::new(id)
    }
}

impl AsRef<str> for InstanceId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The number of one run of an instance: 1 for the first, one more after each
/// continue-as-new. Messages carry it, so a message meant for an earlier execution is
/// recognised and dropped.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ExecutionId(u32);

impl ExecutionId {
    /// The first execution of every instance.
    pub const FIRST: Self = Self(1);

    /// Wraps a raw execution number (as read back from storage).
    pub const fn from_raw(raw: u32) -> Self {
        Self(raw)
    }

    /// The raw number.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// The execution a continue-as-new starts.
    #[must_use]
    pub const fn next(self) -> Self {
        Self(self.0.saturating_add(1))
    }
}

impl fmt::Display for ExecutionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for ExecutionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ExecutionId({})", self.0)
    }
}

/// The sequence number of a durable operation (activity, timer, child, side effect,
/// ...) within one execution, in the order the orchestration code issued it.
///
/// Replay relies on it: the k-th operation the code issues must be the k-th recorded.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OpId(u64);

impl OpId {
    /// Wraps a raw sequence number.
    pub const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }

    /// The raw number.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

impl fmt::Debug for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OpId({})", self.0)
    }
}

/// The name of a queue that routes activity work items to the workers that serve it.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Debug)]
#[serde(transparent)]
pub struct QueueName(String);

impl QueueName {
    /// The queue used when none is named.
    pub const DEFAULT: &'static str = "default";

    /// Checks and wraps a queue name: 1 to 128 bytes, no control characters.
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidInput> {
        let name = name.into();
        if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
            return Err(InvalidInput::new(
                "queue name",
                format!("{name:?} must be 1 to 128 bytes without control characters"),
            ));
        }
        Ok(Self(name))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for QueueName {
    fn default() -> Self {
        Self(Self::DEFAULT.to_owned())
    }
}

impl<'de> Deserialize<'de> for QueueName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::new(String::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_are_checked() {
        assert!(InstanceId::new("order-42").is_ok());
        let empty = InstanceId::new("").unwrap_err();
        assert!(empty.to_string().contains("must not be empty"), "{empty}");
        let long = InstanceId::new("x".repeat(257)).unwrap_err();
        assert!(
            long.to_string().contains("257 bytes, the limit is 256"),
            "{long}"
        );
        let control = InstanceId::new("a\nb").unwrap_err();
        assert!(
            control.to_string().contains("control character"),
            "{control}"
        );
    }

    #[test]
    fn instance_id_deserialization_validates() {
        let err = serde_json::from_str::<InstanceId>("\"\"").unwrap_err();
        assert!(err.to_string().contains("instance id"), "{err}");
    }

    #[test]
    fn child_ids_are_deterministic_and_bounded() {
        let parent = InstanceId::new("order-1").unwrap();
        let child = parent.child(ExecutionId::FIRST, OpId::from_raw(3));
        assert_eq!(child.as_str(), "order-1:1:3");
        let long = InstanceId::new("é".repeat(128)).unwrap();
        let child = long.child(ExecutionId::FIRST, OpId::from_raw(7));
        assert!(child.as_str().len() <= InstanceId::MAX_LEN);
        assert!(InstanceId::new(child.as_str()).is_ok());
    }
}
