//! Waking dispatchers that wait for work: an in-process notify per kind of queue.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keel_core::Timestamp;
use keel_provider::{Result, WorkKind};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::convert::{col, millis, timestamp};
use crate::provider::SqliteProvider;
use crate::query;

/// How often a waiter with a delayed item pending re-reads the clock: a virtual clock
/// can jump past the item's due time without anyone enqueueing anything.
pub(crate) const DUE_CHECK: Duration = Duration::from_millis(50);

/// One notify per kind, fired by the writer after a commit that enqueued work, and
/// the time of the last fetch of each kind.
#[derive(Debug, Default)]
pub(crate) struct Wake {
    orchestrations: Notify,
    activities: Notify,
    /// Delayed work that became visible after the last fetch is work that fetch
    /// could not see: a waiter returns for it at once.
    fetched_orchestrations: AtomicU64,
    fetched_activities: AtomicU64,
    /// How many commits enqueued work of each kind, and that count as the last fetch
    /// began: a commit between a fetch and the following wait (whose notify found no
    /// waiter yet) ends that wait at once instead of being lost.
    enqueued: [AtomicU64; 2],
    seen: [AtomicU64; 2],
}

impl Wake {
    /// The notify of `kind`.
    pub(crate) fn of(&self, kind: WorkKind) -> &Notify {
        match kind {
            WorkKind::Orchestrations => &self.orchestrations,
            WorkKind::Activities => &self.activities,
        }
    }

    /// Records that a fetch of `kind` looked at the queue at `at`.
    pub(crate) fn fetched(&self, kind: WorkKind, at: Timestamp) {
        self.last_fetch(kind)
            .fetch_max(at.as_millis(), Ordering::Relaxed);
        let enqueued = self.enqueued[index(kind)].load(Ordering::SeqCst);
        self.seen[index(kind)].fetch_max(enqueued, Ordering::SeqCst);
    }

    /// Whether work of `kind` was enqueued since the last fetch began.
    fn enqueued_since_fetch(&self, kind: WorkKind) -> bool {
        self.enqueued[index(kind)].load(Ordering::SeqCst)
            > self.seen[index(kind)].load(Ordering::SeqCst)
    }

    fn last_fetch(&self, kind: WorkKind) -> &AtomicU64 {
        match kind {
            WorkKind::Orchestrations => &self.fetched_orchestrations,
            WorkKind::Activities => &self.fetched_activities,
        }
    }

    /// Wakes everyone waiting on `kind` now. No permit is stored: a waiter that comes
    /// later first looks at the queue itself, and a lost wake-up only delays work.
    pub(crate) fn notify(&self, kind: WorkKind) {
        self.enqueued[index(kind)].fetch_add(1, Ordering::SeqCst);
        self.of(kind).notify_waiters();
    }
}

fn index(kind: WorkKind) -> usize {
    match kind {
        WorkKind::Orchestrations => 0,
        WorkKind::Activities => 1,
    }
}

/// Waits for a notify of `kind`, for delayed work to come due, or for `timeout`.
///
/// "Comes due" counts from the last fetch of `kind`, not from now: delayed work that
/// became visible since then (a virtual clock jumped past it, or it came due while the
/// caller was busy) ends the wait at once, since no fetch has seen it. Work that was
/// visible at the last fetch and is still queued (its instance locked or paused) does
/// not, so idle dispatchers do not spin on it.
pub(crate) async fn wait_for_work(
    p: &SqliteProvider,
    kind: WorkKind,
    timeout: Duration,
) -> Result<()> {
    let started = Instant::now();
    let wake = &p.inner.wake;
    let mut notified = std::pin::pin!(wake.of(kind).notified());
    // Registered before reading the queue, so a commit between the read and the wait
    // still wakes us.
    notified.as_mut().enable();
    if wake.enqueued_since_fetch(kind) {
        return Ok(());
    }
    let since = Timestamp::from_millis(wake.last_fetch(kind).load(Ordering::Relaxed));
    let due = due_after(p, kind, since).await?;
    loop {
        let now = p.clock_now();
        if due.is_some_and(|due| due <= now) {
            return Ok(());
        }
        let remaining = timeout.saturating_sub(started.elapsed());
        if remaining.is_zero() {
            return Ok(());
        }
        // With delayed work pending, re-read the clock now and then: a virtual clock
        // can jump past its due time.
        let slice = match due {
            Some(due) => remaining
                .min(due.saturating_duration_since(now))
                .min(DUE_CHECK),
            None => remaining,
        };
        if tokio::time::timeout(slice, notified.as_mut()).await.is_ok() {
            return Ok(());
        }
    }
}

/// When the next invisible item of `kind` becomes visible.
pub(crate) async fn next_due(p: &SqliteProvider, kind: WorkKind) -> Result<Option<Timestamp>> {
    due_after(p, kind, p.clock_now()).await
}

/// The earliest time after `after` at which delayed work of `kind` becomes visible.
async fn due_after(
    p: &SqliteProvider,
    kind: WorkKind,
    after: Timestamp,
) -> Result<Option<Timestamp>> {
    let sql = match kind {
        // Delayed messages, and instances whose lock was abandoned with a delay.
        WorkKind::Orchestrations => {
            "SELECT MIN(t) FROM ( \
               SELECT MIN(visible_at) AS t FROM messages WHERE ready = 0 AND visible_at > ?1 \
               UNION ALL \
               SELECT MIN(locked_until) FROM instances \
               WHERE lock_token IS NULL AND locked_until IS NOT NULL AND locked_until > ?1)"
        }
        // Items waiting for their retry time (leased items are not "queued").
        WorkKind::Activities => {
            "SELECT MIN(visible_at) FROM work_items WHERE lease_token IS NULL AND visible_at > ?1"
        }
    };
    let after = millis(after);
    let due = p
        .read(move |conn| query::one(conn, sql, [after], |row| col::<Option<i64>>(row, 0)))
        .await?;
    Ok(due.map(timestamp))
}
