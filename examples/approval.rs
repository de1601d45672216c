//! A workflow that waits for a human: an approval signal or a timeout, whichever
//! comes first.
//!
//! ```sh
//! cargo run --example approval
//! ```
//!
//! Two requests start together. The first gets its decision from the client a
//! second later; nobody answers the second, so its 2-second timer wins.

use std::path::Path;
use std::time::{Duration, Instant};

use keel::prelude::*;
use serde::{Deserialize, Serialize};

/// A fresh database each run, so that the fixed instance ids start over.
const DATABASE: &str = "target/keel-examples/approval.db";

#[derive(Debug, Serialize, Deserialize)]
struct Request {
    what: String,
    /// How long to wait for a decision.
    timeout_secs: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Decision {
    approved: bool,
    by: String,
}

#[derive(Debug, Serialize, Deserialize)]
enum Outcome {
    Approved { by: String },
    Rejected { by: String },
    TimedOut { after_secs: u64 },
}

async fn notify(_ctx: ActivityContext, message: String) -> Result<(), Failure> {
    println!("  activity: notify \"{message}\"");
    Ok(())
}

async fn approval(ctx: OrchestrationContext, request: Request) -> Result<Outcome, Failure> {
    let timeout = Duration::from_secs(request.timeout_secs);
    // Both waits are durable: the signal is buffered if it comes early, the timer is
    // in the store, and a restarted worker picks up whichever comes first.
    let outcome = match select2(ctx.signal::<Decision>("approval"), ctx.sleep(timeout)).await {
        Either::Left(decision) => {
            let Decision { approved, by } = decision?;
            if approved {
                Outcome::Approved { by }
            } else {
                Outcome::Rejected { by }
            }
        }
        Either::Right(()) => Outcome::TimedOut {
            after_secs: request.timeout_secs,
        },
    };
    let message = format!("{}: {outcome:?}", request.what);
    ctx.activity::<(), _>("notify", &message).await?;
    Ok(outcome)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let path = Path::new(DATABASE);
    fresh_database(path)?;
    println!("database: {}", path.display());

    let keel = Keel::builder()
        .sqlite(path)
        .activity("notify", notify)
        .orchestration("approval", approval)
        .start()
        .await?;
    let client = keel.client();
    let began = Instant::now();

    let answered = Request {
        what: "buy a teapot".to_owned(),
        timeout_secs: 30,
    };
    let answered = client.start("approval", &answered).id("approval-1").await?;
    let ignored = Request {
        what: "buy a second teapot".to_owned(),
        timeout_secs: 2,
    };
    let ignored = client.start("approval", &ignored).id("approval-2").await?;
    println!("started {answered} (30 s timeout) and {ignored} (2 s timeout)");

    tokio::time::sleep(Duration::from_secs(1)).await;
    let decision = Decision {
        approved: true,
        by: "alice".to_owned(),
    };
    client.signal(&answered, "approval", &decision).await?;
    println!("sent {decision:?} to {answered}");

    for id in [answered, ignored] {
        let outcome: Outcome = client.wait(&id, Duration::from_secs(30)).await?;
        let secs = began.elapsed().as_secs_f64();
        println!("{id}: {outcome:?} (after {secs:.1} s)");
    }

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
