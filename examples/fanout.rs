//! Fan-out and fan-in: one workflow schedules 1,000 activities at once, waits for all
//! of them, and adds up their results.
//!
//! ```sh
//! cargo run --example fanout             # 1,000 activities
//! cargo run --example fanout -- 5000     # or as many as you like
//! ```
//!
//! Every activity is scheduled, leased, run and recorded in SQLite, durably
//! (`synchronous = FULL`), so the time printed is the store's, not the arithmetic's.

use std::path::Path;
use std::time::{Duration, Instant};

use keel::prelude::*;

/// A fresh database each run, so that every run measures the same work.
const DATABASE: &str = "target/keel-examples/fanout.db";

async fn square(_ctx: ActivityContext, n: u64) -> Result<u64, Failure> {
    Ok(n * n)
}

async fn fan_out(ctx: OrchestrationContext, count: u64) -> Result<u64, Failure> {
    // All the calls are scheduled in the same turn; the workers run them in parallel
    // and the workflow wakes as their results come in.
    let squares = join_all((1..=count).map(|n| ctx.activity::<u64, _>("square", &n))).await;
    squares.into_iter().sum()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let count: u64 = match std::env::args().nth(1) {
        Some(arg) => arg.parse()?,
        None => 1_000,
    };
    let path = Path::new(DATABASE);
    fresh_database(path)?;
    println!("database: {}", path.display());

    let keel = Keel::builder()
        .sqlite(path)
        // Twice the default concurrency: the activities are cheap, the store sets the pace.
        .options(
            WorkerOptions::default()
                .max_concurrent_activities(200)
                .activity_batch(200),
        )
        .activity("square", square)
        .orchestration("fanout", fan_out)
        .start()
        .await?;
    let client = keel.client();

    let began = Instant::now();
    let id = client.start("fanout", &count).id("fanout").await?;
    let sum: u64 = client.wait(&id, Duration::from_secs(50)).await?;
    let elapsed = began.elapsed();

    // The sum of the squares 1..=n, to check that every result came back once.
    let expected = count * (count + 1) * (2 * count + 1) / 6;
    anyhow::ensure!(sum == expected, "sum {sum}, expected {expected}");
    #[allow(clippy::cast_precision_loss, reason = "a rate for display")]
    let rate = count as f64 / elapsed.as_secs_f64();
    println!(
        "{count} activities fanned out and joined in {elapsed:.2?} ({rate:.0} activities/s); sum of squares {sum}"
    );

    keel.shutdown().await;
    Ok(())
}

/// Removes the database left by an earlier run (with its WAL files) and makes sure
/// its directory exists.
fn fresh_database(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        match std::fs::remove_file(file) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
    }
    Ok(())
}
