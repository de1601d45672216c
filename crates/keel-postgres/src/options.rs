//! How a provider connects: schema, pool size, timeouts and limits.

use std::time::Duration;

use keel_provider::Capabilities;

/// Options for [`PostgresProvider::connect`](crate::PostgresProvider::connect), a
/// builder:
///
/// ```
/// use std::time::Duration;
/// use keel_postgres::PostgresOptions;
///
/// let options = PostgresOptions::new()
///     .schema("billing")
///     .pool_size(8)
///     .connect_timeout(Duration::from_secs(3));
/// # let _ = options;
/// ```
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    pub(crate) schema: String,
    pub(crate) pool_size: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) wait_timeout: Duration,
    pub(crate) poll_interval: Duration,
    pub(crate) max_record_bytes: usize,
    pub(crate) max_history_events: u64,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        let limits = Capabilities::default();
        Self {
            schema: "keel".to_owned(),
            pool_size: 8,
            connect_timeout: Duration::from_secs(5),
            wait_timeout: Duration::from_secs(30),
            poll_interval: Duration::from_secs(5),
            max_record_bytes: limits.max_record_bytes,
            max_history_events: limits.max_history_events,
        }
    }
}

impl PostgresOptions {
    /// The defaults: schema `keel`, eight pooled connections, a five-second connect
    /// timeout, a thirty-second wait for a pooled connection, a five-second safety-net
    /// poll and the default [`Capabilities`] limits.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the schema holding Keel's tables, created at connect if missing. It must be
    /// a plain identifier: a lowercase ASCII letter or `_`, then lowercase letters,
    /// digits or `_`, at most 56 bytes (the channel names add a prefix to it).
    #[must_use]
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Sets how many connections the pool holds at most (at least one). The listener
    /// for wake-ups uses one more, outside the pool.
    #[must_use]
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// Sets how long opening one connection may take before it fails as
    /// `Unavailable`.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets how long a call waits for a free pooled connection before it fails as
    /// `Unavailable`.
    #[must_use]
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.wait_timeout = timeout;
        self
    }

    /// Sets the safety net: a dispatcher waiting for work looks again at least this
    /// often, even without a notification (a lost one only delays work).
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(10));
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
}
