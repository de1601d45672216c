//! The database's own limit on this machine, measured with the driver the provider
//! uses: how many single-row transactions it commits per second, and how many rows
//! per second it takes in 100-row transactions.
//!
//! Keel's step rate is printed as a ratio of the first, so a figure from a noisy,
//! shared machine still says how close Keel comes to what the disk allows.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use crate::backend::{self, Backend};
use crate::metric::{Outcome, Unit, key};

/// Rows per transaction in the batched measurement.
const BATCH: usize = 100;

/// A payload about the size of a small history event.
const PAYLOAD: [u8; 96] = [7; 96];

/// Measures `backend`'s database for `duration` per figure.
pub(crate) async fn measure(
    backend: Backend,
    scratch: &Path,
    duration: Duration,
) -> Result<Outcome> {
    match backend.synchronous() {
        Some(_) => sqlite(backend, scratch, duration).await,
        None => postgres(duration).await,
    }
}

/// Both figures from a fresh SQLite file opened with keel-sqlite's writer pragmas,
/// through rusqlite on a thread of its own, as keel-sqlite's writer runs.
async fn sqlite(backend: Backend, scratch: &Path, duration: Duration) -> Result<Outcome> {
    let path = scratch.join(format!("{}-limits.db", backend.name()));
    backend::remove_database(&path)?;
    let synchronous = match backend.synchronous() {
        Some(keel::sqlite::Synchronous::Normal) => "NORMAL",
        _ => "FULL",
    };
    let measured = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || sqlite_rates(&path, synchronous, duration))
            .await
            .context("the SQLite measurement panicked")??
    };
    backend::remove_database(&path)?;
    let (single, batched) = measured;
    let mut outcome = Outcome::default();
    outcome
        .set(key::SINGLE_ROW_COMMITS_PER_S, Unit::PerSecond, single)
        .set(key::BATCHED_ROWS_PER_S, Unit::PerSecond, batched);
    Ok(outcome)
}

/// Single-row commits per second, then rows per second in `BATCH`-row transactions.
fn sqlite_rates(path: &Path, synchronous: &str, duration: Duration) -> Result<(f64, f64)> {
    let mut conn = rusqlite::Connection::open(path).context("could not open SQLite")?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous}; \
         PRAGMA foreign_keys = OFF; \
         CREATE TABLE rows (id INTEGER PRIMARY KEY, payload BLOB NOT NULL);"
    ))?;
    let insert = "INSERT INTO rows (payload) VALUES (?1)";

    let began = Instant::now();
    let mut commits = 0u64;
    while began.elapsed() < duration {
        conn.prepare_cached(insert)?.execute([&PAYLOAD[..]])?;
        commits += 1;
    }
    let single = rate(commits, began.elapsed());

    let began = Instant::now();
    let mut rows = 0u64;
    while began.elapsed() < duration {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for _ in 0..BATCH {
            tx.prepare_cached(insert)?.execute([&PAYLOAD[..]])?;
        }
        tx.commit()?;
        rows += BATCH as u64;
    }
    let batched = rate(rows, began.elapsed());
    Ok((single, batched))
}

/// Both figures from PostgreSQL through tokio-postgres, in a table of our own. Not a
/// temporary table: those skip the write-ahead log, so their commits cost nothing.
async fn postgres(duration: Duration) -> Result<Outcome> {
    let url = backend::postgres_url();
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("could not connect to PostgreSQL at `{url}`"))?;
    let driver = tokio::spawn(connection);
    let table = format!("keel_bench_limits_{}", std::process::id());
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {table}; \
             CREATE TABLE {table} (id BIGSERIAL PRIMARY KEY, payload BYTEA NOT NULL)"
        ))
        .await?;
    let insert = client
        .prepare(&format!("INSERT INTO {table} (payload) VALUES ($1)"))
        .await?;
    let payload = &PAYLOAD[..];

    let began = Instant::now();
    let mut commits = 0u64;
    while began.elapsed() < duration {
        client.execute(&insert, &[&payload]).await?;
        commits += 1;
    }
    let single = rate(commits, began.elapsed());

    let began = Instant::now();
    let mut rows = 0u64;
    while began.elapsed() < duration {
        client.batch_execute("BEGIN").await?;
        for _ in 0..BATCH {
            client.execute(&insert, &[&payload]).await?;
        }
        client.batch_execute("COMMIT").await?;
        rows += BATCH as u64;
    }
    let batched = rate(rows, began.elapsed());

    client.batch_execute(&format!("DROP TABLE {table}")).await?;
    drop(client);
    // The connection ends when the client is dropped; its result says nothing more.
    let _ = driver.await;
    let mut outcome = Outcome::default();
    outcome
        .set(key::SINGLE_ROW_COMMITS_PER_S, Unit::PerSecond, single)
        .set(key::BATCHED_ROWS_PER_S, Unit::PerSecond, batched);
    Ok(outcome)
}

/// `count` events over `elapsed`, per second.
#[allow(clippy::cast_precision_loss, reason = "a rate for display")]
pub(crate) fn rate(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(f64::EPSILON)
}
