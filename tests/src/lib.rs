//! Shared helpers of the end-to-end tests: fresh SQLite files and worker options that
//! keep the tests quick.

use std::path::PathBuf;
use std::time::Duration;

use keel::{Client, InstanceId, InstanceInfo, InstanceStatus, WorkerOptions};
use tempfile::TempDir;

/// How long a test waits for a workflow that should finish quickly. Generous: the
/// machine is shared and slow, and a timeout here means a bug, not a slow run.
pub const WAIT: Duration = Duration::from_secs(30);

/// A fresh database file in its own directory, deleted with the directory.
#[derive(Debug)]
pub struct Db {
    /// Keeps the directory alive.
    pub dir: TempDir,
    /// The database file.
    pub path: PathBuf,
}

impl Db {
    /// A new, empty database path.
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("keel.db");
        Ok(Self { dir, path })
    }
}

/// Worker options for tests: failed turns retried after 10 ms, shutdown after 5 s.
pub fn test_options() -> WorkerOptions {
    WorkerOptions::default()
        .turn_retry_delay(Duration::from_millis(10))
        .shutdown_timeout(Duration::from_secs(5))
        .queue_depth_interval(None)
}

/// Resolves once standard input reaches its end. The worker and client programs the
/// process tests spawn watch it: the test holds the other end, so they exit when the
/// test closes it or dies, and no orphan outlives a failed test.
pub fn stdin_closed() -> anyhow::Result<tokio::sync::oneshot::Receiver<()>> {
    use std::io::Read as _;
    let (closed, on_close) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("stdin-watch".into())
        .spawn(move || {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
            let _ = closed.send(());
        })?;
    Ok(on_close)
}

/// Polls `done` every 10 ms until it holds, for at most `timeout`.
pub async fn eventually(
    what: &str,
    timeout: Duration,
    done: impl Fn() -> bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    while !done() {
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Polls the instance's status every 10 ms until it is `status`, for at most `timeout`.
pub async fn wait_for_status(
    client: &Client,
    id: &InstanceId,
    status: InstanceStatus,
    timeout: Duration,
) -> anyhow::Result<InstanceInfo> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let info = client.status(id).await?;
        if info.status() == status {
            return Ok(info);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "{id} is {} after {timeout:?}, not {status} (reason: {:?})",
                info.status(),
                info.reason()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
