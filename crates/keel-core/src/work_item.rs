//! Activity work items: one scheduled activity attempt.

use serde::{Deserialize, Serialize};

use crate::event::ActivityOptions;
use crate::ids::{ExecutionId, InstanceId, OpId};
use crate::payload::Payload;
use crate::time::Timestamp;

/// An activity to run, as the activity queue holds it.
///
/// Retries re-queue the same item with `attempt` increased, so a retry neither holds a
/// worker slot nor grows the history (DESIGN §4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkItem {
    /// The instance whose orchestration scheduled it.
    pub instance: InstanceId,
    /// Its execution.
    pub execution: ExecutionId,
    /// The operation the result completes.
    pub op: OpId,
    /// The activity's registered name.
    pub name: String,
    /// Its input.
    pub input: Payload,
    /// Routing, priority and retries.
    pub options: ActivityOptions,
    /// The attempt this item runs, from 1.
    pub attempt: u32,
    /// When the orchestration scheduled it (for schedule-to-start latency).
    pub scheduled_at: Timestamp,
}

impl WorkItem {
    /// A seed for this item's retry jitter: the same on every worker.
    pub fn retry_seed(&self) -> u64 {
        // FNV-1a over the identity: stable across builds, unlike `DefaultHasher`.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let bytes = self.instance.as_str().bytes();
        let numbers = u64::from(self.execution.get())
            .to_le_bytes()
            .into_iter()
            .chain(self.op.get().to_le_bytes());
        for byte in bytes.chain(numbers) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        hash
    }
}
