//! What a provider supports and how large its batches may be.

/// A provider's features and hints. The conformance kit skips (and says so) the tests of
/// features a provider does not claim; it never passes them silently.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// The most instances one orchestration fetch returns.
    pub max_fetch_instances: usize,
    /// The most items one activity fetch returns.
    pub max_fetch_items: usize,
    /// The most acks or completions one call commits.
    pub max_batch: usize,
    /// The most items one listing page returns.
    pub max_page: usize,
    /// The largest stored record (an event, message or work item) in bytes.
    pub max_record_bytes: usize,
    /// The most events one execution's history may hold.
    pub max_history_events: u64,
    /// Activity limits (max concurrent, max per second) are enforced at claim time.
    pub activity_limits: bool,
    /// Lease and visibility times come from the database's own clock.
    pub database_clock: bool,
    /// [`Provider::ack_turns_leasing`](crate::Provider::ack_turns_leasing) leases the
    /// items it enqueues (rather than only enqueueing them).
    pub leases_on_ack: bool,
    /// [`Provider::complete_activities_locking`](crate::Provider::complete_activities_locking)
    /// locks the instances it sends outcomes to (rather than only sending them).
    pub locks_on_completion: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Self {
            max_fetch_instances: 100,
            max_fetch_items: 100,
            max_batch: 100,
            max_page: 1_000,
            max_record_bytes: 16 * 1024 * 1024 + 4096,
            max_history_events: 1_000_000,
            activity_limits: true,
            database_clock: false,
            leases_on_ack: false,
            locks_on_completion: false,
        }
    }
}
