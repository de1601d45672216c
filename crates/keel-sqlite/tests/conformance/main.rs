//! The conformance kit, run against a file database and an in-memory one; and what
//! the kit cannot reach, stored bytes damaged behind the provider's back.

use std::sync::Arc;

use keel_conformance::TestStore;
use keel_core::Timestamp;
use keel_provider::ManualClock;
use keel_sqlite::{SqliteOptions, SqliteProvider};

/// Where every test's virtual clock starts.
const START: Timestamp = Timestamp::from_millis(1_700_000_000_000);

fn options(clock: &ManualClock) -> SqliteOptions {
    SqliteOptions::new().clock(Arc::new(clock.clone()))
}

async fn file_store() -> TestStore {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let clock = ManualClock::new(START);
    let provider = SqliteProvider::open_with(dir.path().join("keel.db"), options(&clock))
        .await
        .expect("the database opens");
    TestStore::with_clock(Arc::new(provider), clock).keep(dir)
}

async fn memory_store() -> TestStore {
    let clock = ManualClock::new(START);
    let provider = SqliteProvider::in_memory_with(options(&clock))
        .await
        .expect("the database opens");
    TestStore::with_clock(Arc::new(provider), clock)
}

mod file {
    keel_conformance::provider_tests!(crate::file_store);
}

mod memory {
    keel_conformance::provider_tests!(crate::memory_store);
}

mod damaged;
