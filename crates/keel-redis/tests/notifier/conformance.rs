//! The provider conformance kit, run through the notifier: wrapping a provider changes
//! none of its behaviour.

use std::sync::Arc;

use keel_conformance::TestStore;
use keel_core::Timestamp;
use keel_provider::ManualClock;
use keel_redis::RedisNotifier;
use keel_sqlite::{SqliteOptions, SqliteProvider};

use crate::RedisServer;

/// Where every test's virtual clock starts.
const START: Timestamp = Timestamp::from_millis(1_700_000_000_000);

async fn store() -> TestStore {
    let server = RedisServer::start().expect("redis-server starts");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let clock = ManualClock::new(START);
    let options = SqliteOptions::new().clock(Arc::new(clock.clone()));
    let inner = SqliteProvider::open_with(dir.path().join("keel.db"), options)
        .await
        .expect("the database opens");
    let notifier = RedisNotifier::connect(
        Arc::new(inner),
        &server.url(),
        crate::options(&crate::namespace()),
    )
    .await
    .expect("the notifier connects");
    TestStore::with_clock(Arc::new(notifier), clock).keep((dir, server))
}

keel_conformance::provider_tests!(crate::conformance::store);
