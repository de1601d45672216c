//! How a provider opens its database: durability, clock, pool size and limits.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use keel_provider::{Capabilities, Clock, SystemClock};

/// How hard SQLite works to make a commit durable (`PRAGMA synchronous`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Synchronous {
    /// Every commit is on disk before it returns: a power loss loses nothing that was
    /// acknowledged. The default.
    #[default]
    Full,
    /// In WAL mode a commit is durable at the next checkpoint: a power loss (not a
    /// process crash) may lose the last commits, and commits are much cheaper.
    Normal,
}

impl Synchronous {
    /// The value of `PRAGMA synchronous`.
    pub(crate) fn pragma(self) -> &'static str {
        match self {
            Self::Full => "FULL",
            Self::Normal => "NORMAL",
        }
    }
}

/// Options for [`SqliteProvider::open_with`](crate::SqliteProvider::open_with) and
/// [`SqliteProvider::in_memory_with`](crate::SqliteProvider::in_memory_with), a builder:
///
/// ```
/// use std::time::Duration;
/// use keel_sqlite::{SqliteOptions, Synchronous};
///
/// let options = SqliteOptions::new()
///     .synchronous(Synchronous::Normal)
///     .readers(2)
///     .busy_timeout(Duration::from_secs(10));
/// # let _ = options;
/// ```
#[derive(Clone)]
pub struct SqliteOptions {
    pub(crate) synchronous: Synchronous,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) readers: u32,
    pub(crate) busy_timeout: Duration,
    pub(crate) max_record_bytes: usize,
    pub(crate) max_history_events: u64,
    pub(crate) checkpoint_pages: u32,
}

impl fmt::Debug for SqliteOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteOptions")
            .field("synchronous", &self.synchronous)
            .field("clock", &self.clock)
            .field("readers", &self.readers)
            .field("busy_timeout", &self.busy_timeout)
            .field("max_record_bytes", &self.max_record_bytes)
            .field("max_history_events", &self.max_history_events)
            .field("checkpoint_pages", &self.checkpoint_pages)
            .finish()
    }
}

impl Default for SqliteOptions {
    fn default() -> Self {
        let limits = Capabilities::default();
        Self {
            synchronous: Synchronous::Full,
            clock: Arc::new(SystemClock),
            readers: 4,
            busy_timeout: Duration::from_secs(5),
            max_record_bytes: limits.max_record_bytes,
            max_history_events: limits.max_history_events,
            checkpoint_pages: 4_096,
        }
    }
}

impl SqliteOptions {
    /// The defaults: `synchronous = FULL`, the system clock, four readers, a five-second
    /// busy timeout, the default [`Capabilities`] limits and checkpoints every 4,096
    /// WAL pages.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets how durable each commit is.
    #[must_use]
    pub fn synchronous(mut self, synchronous: Synchronous) -> Self {
        self.synchronous = synchronous;
        self
    }

    /// Sets the clock that leases, visibility and timestamps are computed with (SQLite
    /// has none of its own). Tests pass a [`ManualClock`](keel_provider::ManualClock).
    #[must_use]
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Sets how many read-only connections serve queries that change nothing (at least
    /// one). Writes always go through the one writer connection.
    #[must_use]
    pub fn readers(mut self, readers: u32) -> Self {
        self.readers = readers.max(1);
        self
    }

    /// Sets how long a connection waits for another process's lock before giving up
    /// with an `Unavailable` error.
    #[must_use]
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// Sets the largest record (an event, message or work item) accepted, in bytes.
    #[must_use]
    pub fn max_record_bytes(mut self, bytes: usize) -> Self {
        self.max_record_bytes = bytes;
        self
    }

    /// Sets the most events one execution's history may hold.
    #[must_use]
    pub fn max_history_events(mut self, events: u64) -> Self {
        self.max_history_events = events;
        self
    }

    /// Sets how many pages the write-ahead log may hold before a commit copies them
    /// back into the database file (`PRAGMA wal_autocheckpoint`; 0 turns automatic
    /// checkpoints off). The default, 4,096 pages (16 MiB of 4 KiB pages), is four
    /// times SQLite's own: a busy workflow store rewrites the same hot pages in every
    /// commit, and a checkpoint copies each page once however often it was logged, so
    /// rarer checkpoints cost the writer less per commit (linear-3 ~5 % faster here).
    /// Larger logs gained no more throughput but made single commits slower while the
    /// log file grew (1-activity latency p50 1.9 -> 2.4 ms at 16,384).
    #[must_use]
    pub fn checkpoint_pages(mut self, pages: u32) -> Self {
        self.checkpoint_pages = pages;
        self
    }
}
