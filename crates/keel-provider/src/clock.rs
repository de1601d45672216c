//! Time for providers whose store has no clock of its own.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use keel_core::Timestamp;

/// A source of the current time. A provider whose database has a clock (PostgreSQL's
/// `now()`) uses that, so workers' clock skew cannot cause double execution; one
/// without (SQLite, one host) uses a `Clock`, which an embedder or test can replace.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The system's wall clock: the default.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_system_time(SystemTime::now())
    }
}

/// A clock that moves only when told: a test harness can skip a workflow's 30-day sleep
/// in milliseconds. Clones share one time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    millis: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock stopped at `start`.
    pub fn new(start: Timestamp) -> Self {
        Self {
            millis: Arc::new(AtomicU64::new(start.as_millis())),
        }
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let millis = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.millis.fetch_add(millis, Ordering::SeqCst);
    }

    /// Sets the clock (it may go backwards: tests of skew do that on purpose).
    pub fn set(&self, to: Timestamp) {
        self.millis.store(to.as_millis(), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_millis(self.millis.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(Timestamp::from_millis(10));
        let shared = clock.clone();
        assert_eq!(clock.now(), Timestamp::from_millis(10));
        shared.advance(Duration::from_secs(1));
        assert_eq!(clock.now(), Timestamp::from_millis(1_010));
        assert!(SystemClock.now() > Timestamp::from_millis(1_700_000_000_000));
    }
}
