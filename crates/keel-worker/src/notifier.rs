//! Telling waiting clients in this process that an instance has finished.

use keel_core::InstanceId;
use tokio::sync::Notify;
use tokio::sync::futures::Notified;

/// Announces executions that end, so a client waiting for a result in the same process
/// wakes at once instead of at its next poll. Waiters re-read the instance's status
/// when woken, so one notify serves every instance; a missed announcement only delays a
/// waiter until its fallback poll.
#[derive(Debug, Default)]
pub struct Notifier {
    finished: Notify,
}

impl Notifier {
    /// A notifier nobody waits on yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Announces that `instance` finished (completed, failed, was cancelled, continued
    /// as new or was suspended).
    pub fn finished(&self, instance: &InstanceId) {
        tracing::trace!(%instance, "announcing a finished instance");
        self.finished.notify_waiters();
    }

    /// A future that resolves at the next announcement. Create it (and
    /// [`enable`](Notified::enable) it) before checking the status, so an
    /// announcement between the check and the wait is not missed.
    pub fn next_finished(&self) -> Notified<'_> {
        self.finished.notified()
    }
}
