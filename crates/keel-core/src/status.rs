//! The lifecycle status of an instance.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::InvalidInput;

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InstanceStatus {
    /// Created; its first turn has not run (or its start is delayed).
    Pending,
    /// Its orchestration is running or waiting on durable operations.
    Running,
    /// It returned successfully.
    Completed,
    /// It returned an error.
    Failed,
    /// It was cancelled.
    Cancelled,
    /// Its execution ended in continue-as-new (a status of past executions; the instance
    /// itself is Running again in its new one).
    ContinuedAsNew,
    /// Set aside after nondeterminism or repeated turn failures; resumes on request.
    Suspended,
    /// Paused on request: its messages are kept, not processed.
    Paused,
}

impl InstanceStatus {
    /// Every status, in declaration order.
    pub const ALL: [Self; 8] = [
        Self::Pending,
        Self::Running,
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
        Self::ContinuedAsNew,
        Self::Suspended,
        Self::Paused,
    ];

    /// Whether the instance has ended and will do nothing more.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// The stable name stored in databases.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::ContinuedAsNew => "continued_as_new",
            Self::Suspended => "suspended",
            Self::Paused => "paused",
        }
    }
}

impl fmt::Display for InstanceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for InstanceStatus {
    type Err = InvalidInput;
    fn from_str(s: &str) -> Result<Self, InvalidInput> {
        Self::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| InvalidInput::new("instance status", format!("{s:?} is not one")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for status in InstanceStatus::ALL {
            assert_eq!(status.as_str().parse::<InstanceStatus>().unwrap(), status);
        }
        assert!(
            "done"
                .parse::<InstanceStatus>()
                .unwrap_err()
                .to_string()
                .contains("\"done\"")
        );
    }
}
