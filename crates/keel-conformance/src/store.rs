//! The store a factory hands each test.

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use keel_provider::{Capabilities, ManualClock, Provider};

/// A fresh, isolated store for one test: the provider, its clock if the test can move
/// it, and whatever must live as long as the test (a temporary directory, a schema).
pub struct TestStore {
    /// The provider under test.
    pub provider: Arc<dyn Provider>,
    clock: Option<ManualClock>,
    _guard: Option<Box<dyn Any + Send + Sync>>,
}

impl fmt::Debug for TestStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestStore")
            .field("provider", &self.provider)
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

impl TestStore {
    /// A store whose time passes for real (the database owns the clock).
    pub fn new(provider: Arc<dyn Provider>) -> Self {
        Self {
            provider,
            clock: None,
            _guard: None,
        }
    }

    /// A store whose provider reads `clock`, so tests move time instantly.
    pub fn with_clock(provider: Arc<dyn Provider>, clock: ManualClock) -> Self {
        Self {
            provider,
            clock: Some(clock),
            _guard: None,
        }
    }

    /// Keeps `guard` alive for the test (dropped after the provider).
    #[must_use]
    pub fn keep(mut self, guard: impl Any + Send + Sync) -> Self {
        self._guard = Some(Box::new(guard));
        self
    }

    /// Lets `by` pass: moves the manual clock, or sleeps for real.
    pub async fn advance(&self, by: Duration) {
        match &self.clock {
            Some(clock) => clock.advance(by),
            None => tokio::time::sleep(by).await,
        }
    }

    /// The provider's capabilities.
    pub fn capabilities(&self) -> Capabilities {
        self.provider.capabilities()
    }

    /// Whether the test's time is virtual.
    pub fn has_manual_clock(&self) -> bool {
        self.clock.is_some()
    }
}

/// Says that a test is skipped because the provider lacks `capability`. Returns true
/// when skipped, for `if skip(..) { return; }`.
pub fn skip_unless(supported: bool, test: &str, capability: &str) -> bool {
    if !supported {
        eprintln!("SKIPPED {test}: the provider does not claim the `{capability}` capability");
    }
    !supported
}
