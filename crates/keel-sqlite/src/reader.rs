//! The read-only connections: a small pool, used on tokio's blocking threads so that
//! SQLite's blocking calls never hold up the async runtime.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use keel_provider::{ErrorKind, ProviderError, Result};
use rusqlite::Connection;
use tokio::sync::Semaphore;

use crate::error::{closed, db};

/// Opens one more read-only connection.
type Open = Box<dyn Fn() -> rusqlite::Result<Connection> + Send + Sync>;

/// Up to `size` read-only connections, opened when first needed and kept for reuse
/// (with their prepared statements).
pub(crate) struct Readers {
    idle: Mutex<Vec<Connection>>,
    /// One permit per connection: a read waits (asynchronously) for a free one.
    permits: Arc<Semaphore>,
    open: Open,
}

impl fmt::Debug for Readers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Readers")
            .field("available", &self.permits.available_permits())
            .finish_non_exhaustive()
    }
}

impl Readers {
    /// A pool of up to `size` connections, each opened with `open`.
    pub(crate) fn new(
        size: u32,
        open: impl Fn() -> rusqlite::Result<Connection> + Send + Sync + 'static,
    ) -> Self {
        let size = usize::try_from(size.max(1)).unwrap_or(1);
        Self {
            idle: Mutex::new(Vec::with_capacity(size)),
            permits: Arc::new(Semaphore::new(size)),
            open: Box::new(open),
        }
    }

    /// Runs `read` on a free connection, on a blocking thread.
    pub(crate) async fn read<R, F>(self: &Arc<Self>, read: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R> + Send + 'static,
    {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| closed())?;
        let readers = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let idle = readers.take_idle();
            let conn = match idle {
                Some(conn) => conn,
                None => (readers.open)().map_err(db)?,
            };
            let result = read(&conn);
            if !readers.permits.is_closed() {
                readers.lock_idle().push(conn);
            }
            drop(permit);
            result
        })
        .await
        .map_err(|error| {
            ProviderError::new(
                ErrorKind::Internal,
                format!("a SQLite read failed: {error}"),
            )
        })?
    }

    /// Refuses further reads and closes the idle connections; reads in progress finish
    /// and close theirs.
    pub(crate) fn close(&self) {
        self.permits.close();
        self.lock_idle().clear();
    }

    fn take_idle(&self) -> Option<Connection> {
        self.lock_idle().pop()
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Connection>> {
        // The list stays consistent whatever panicked while holding it.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
