//! The conformance kit against a real PostgreSQL, each test in a fresh schema that is
//! dropped when the test ends; and what the kit cannot reach (connect errors,
//! concurrent migrations, the listener's reconnection, limits under many claimers).
//!
//! The database is `KEEL_POSTGRES_URL`, or `postgres://postgres@127.0.0.1:5432/test`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use keel_conformance::TestStore;
use keel_postgres::{PostgresOptions, PostgresProvider};

mod connect;
mod eager;
mod limits;
mod listener;

/// The database the tests use.
pub(crate) fn url() -> String {
    std::env::var("KEEL_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A schema name no other test (of this run or an earlier one) uses.
pub(crate) fn fresh_schema() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() % 100_000_000)
        .unwrap_or(0);
    format!("keel_t{}_{stamp}_{n}", std::process::id())
}

/// Small pools: many tests run at once against one server.
pub(crate) fn options(schema: &str) -> PostgresOptions {
    PostgresOptions::new().schema(schema).pool_size(3)
}

/// Drops its schema when dropped (after the provider, which the store drops first).
pub(crate) struct DropSchema(pub(crate) String);

impl Drop for DropSchema {
    fn drop(&mut self) {
        let schema = self.0.clone();
        // Drop runs inside the test's runtime, which cannot be blocked on: a thread of
        // its own with a runtime of its own does the dropping.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let (client, connection) = tokio_postgres::connect(&url(), tokio_postgres::NoTls)
                    .await
                    .expect("connect to drop the schema");
                let driver = tokio::spawn(connection);
                client
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                    .await
                    .expect("drop the schema");
                drop(client);
                let _ = driver.await;
            });
        })
        .join();
        if dropped.is_err() {
            eprintln!("could not drop schema {}", self.0);
        }
    }
}

/// A fresh provider in a fresh schema, for the kit.
async fn store() -> TestStore {
    let schema = fresh_schema();
    let provider = PostgresProvider::connect(&url(), options(&schema))
        .await
        .expect("PostgreSQL is reachable (see KEEL_POSTGRES_URL)");
    TestStore::new(Arc::new(provider)).keep(DropSchema(schema))
}

mod kit {
    keel_conformance::provider_tests!(crate::store);
}
