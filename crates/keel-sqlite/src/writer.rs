//! The one writer connection and its group commit.
//!
//! SQLite allows one writer at a time, and a durable commit costs an fsync, so every
//! write of the provider goes through one OS thread that owns the write connection.
//! The thread takes the first request waiting on its channel plus every other request
//! that arrived meanwhile, and runs them all in one transaction: one commit (one
//! fsync) for the whole group. Each request runs inside its own `SAVEPOINT`, so one
//! that fails rolls back alone while the others in the group still commit. Replies
//! are sent only once the commit has succeeded; if the commit fails, every request of
//! the group gets the error.
//!
//! Requests are plain synchronous closures: SQLite's calls block, and a thread of its
//! own keeps them off the async runtime without a hop per statement.

use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use keel_core::Timestamp;
use keel_provider::{Clock, ErrorKind, ProviderError, Result, WorkKind};
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::error::{closed, db, replicate};
use crate::wake::Wake;

/// The most requests one transaction commits: bounds how long readers of an
/// in-memory database (whose tables the transaction locks) wait.
const MAX_GROUP: usize = 256;

/// How many requests may queue for the writer before senders wait.
const CHANNEL: usize = 1024;

/// What a request's code sees: the write connection inside the group's transaction,
/// the clock, and a place to say which dispatchers to wake after the commit.
pub(crate) struct WriteCtx {
    /// The write connection, inside a transaction and the request's savepoint.
    pub(crate) conn: Connection,
    clock: Arc<dyn Clock>,
    wake_orchestrations: bool,
    wake_activities: bool,
    /// Tokens reserved in the database and not handed out yet.
    tokens: Range<i64>,
}

impl WriteCtx {
    /// The current time of the provider's clock.
    pub(crate) fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// Wakes dispatchers of `kind` once the transaction commits.
    pub(crate) fn wake(&mut self, kind: WorkKind) {
        match kind {
            WorkKind::Orchestrations => self.wake_orchestrations = true,
            WorkKind::Activities => self.wake_activities = true,
        }
    }
}

/// A request's code: runs on the write connection and returns its result. An `Err`
/// rolls the request's savepoint back; an `Ok` keeps its writes.
pub(crate) type Work<R> = Box<dyn FnOnce(&mut WriteCtx) -> Result<R> + Send>;

/// A request with its reply channel, its result type erased.
trait Job: Send {
    /// Runs the request; returns whether to keep its writes and how to answer.
    fn run(self: Box<Self>, ctx: &mut WriteCtx) -> Box<dyn Reply>;
    /// Answers without running: the group's transaction could not begin.
    fn fail(self: Box<Self>, error: ProviderError);
}

/// A request's answer, held until its transaction's fate is known.
trait Reply: Send {
    /// Whether the request succeeded, so its savepoint is kept.
    fn keep(&self) -> bool;
    /// Sends the result, or `failure` when the group's transaction did not commit.
    fn send(self: Box<Self>, failure: Option<&ProviderError>);
}

struct Request<R> {
    work: Work<R>,
    reply: oneshot::Sender<Result<R>>,
}

struct Answer<R> {
    result: Result<R>,
    reply: oneshot::Sender<Result<R>>,
}

impl<R: Send + 'static> Job for Request<R> {
    fn run(self: Box<Self>, ctx: &mut WriteCtx) -> Box<dyn Reply> {
        let Self { work, reply } = *self;
        // A panicking request is a bug; it fails (its savepoint rolls back) rather than
        // taking the writer, and every later write, down with it.
        let result = catch_unwind(AssertUnwindSafe(|| work(ctx))).unwrap_or_else(|_| {
            Err(ProviderError::new(
                ErrorKind::Internal,
                "a SQLite write request panicked",
            ))
        });
        Box::new(Answer { result, reply })
    }

    fn fail(self: Box<Self>, error: ProviderError) {
        // The caller may have stopped waiting; then nobody needs the answer.
        let _ = self.reply.send(Err(error));
    }
}

impl<R: Send + 'static> Reply for Answer<R> {
    fn keep(&self) -> bool {
        self.result.is_ok()
    }

    fn send(self: Box<Self>, failure: Option<&ProviderError>) {
        let result = match failure {
            None => self.result,
            Some(error) => Err(replicate(error)),
        };
        let _ = self.reply.send(result);
    }
}

enum Command {
    Job(Box<dyn Job>),
    Close(oneshot::Sender<()>),
}

/// The handle requests are sent through.
#[derive(Debug, Clone)]
pub(crate) struct Writer {
    sender: mpsc::Sender<Command>,
    commits: Arc<AtomicU64>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Job(_) => "Job",
            Self::Close(_) => "Close",
        })
    }
}

impl Writer {
    /// Starts the writer thread: it opens its connection with `open` (which also
    /// migrates the database) and, once that succeeded, serves requests until the
    /// provider is closed or dropped. Returns `open`'s error if it failed.
    pub(crate) async fn start<F>(open: F, clock: Arc<dyn Clock>, wake: Arc<Wake>) -> Result<Self>
    where
        F: FnOnce() -> Result<Connection> + Send + 'static,
    {
        let (sender, receiver) = mpsc::channel(CHANNEL);
        let (ready, opened) = oneshot::channel();
        let commits = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&commits);
        std::thread::Builder::new()
            .name("keel-sqlite-writer".to_owned())
            .spawn(move || {
                let conn = match open() {
                    Ok(conn) => conn,
                    Err(error) => {
                        let _ = ready.send(Err(error));
                        return;
                    }
                };
                if ready.send(Ok(())).is_err() {
                    // Nobody waits for the provider any more.
                    return;
                }
                let ctx = WriteCtx {
                    conn,
                    clock,
                    wake_orchestrations: false,
                    wake_activities: false,
                    tokens: 0..0,
                };
                serve(ctx, receiver, &wake, &counter);
            })
            .map_err(|error| {
                ProviderError::new(
                    ErrorKind::Unavailable,
                    format!("cannot start the SQLite writer thread: {error}"),
                )
                .with_source(error)
            })?;
        opened.await.map_err(|_| closed())??;
        Ok(Self { sender, commits })
    }

    /// Runs `work` in the next group transaction and returns its result once that
    /// transaction has committed.
    pub(crate) async fn run<R: Send + 'static>(&self, work: Work<R>) -> Result<R> {
        let (reply, answer) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(Request { work, reply });
        self.sender
            .send(Command::Job(job))
            .await
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    /// Finishes the requests already queued, closes the connection and stops the thread.
    pub(crate) async fn close(&self) {
        let (done, wait) = oneshot::channel();
        if self.sender.send(Command::Close(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// How many transactions the writer has committed.
    pub(crate) fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }
}

/// The writer thread's loop: one group transaction per turn, until a close or until
/// every handle is gone.
fn serve(
    mut ctx: WriteCtx,
    mut receiver: mpsc::Receiver<Command>,
    wake: &Wake,
    commits: &AtomicU64,
) {
    let mut closing = None;
    while let Some(first) = receiver.blocking_recv() {
        let mut group = Vec::new();
        match first {
            Command::Job(job) => group.push(job),
            Command::Close(done) => {
                closing = Some(done);
                break;
            }
        }
        // Everything that queued while the previous transaction committed joins this one.
        while group.len() < MAX_GROUP {
            match receiver.try_recv() {
                Ok(Command::Job(job)) => group.push(job),
                Ok(Command::Close(done)) => {
                    closing = Some(done);
                    break;
                }
                Err(_) => break,
            }
        }
        commit_group(&mut ctx, group, commits);
        if std::mem::take(&mut ctx.wake_orchestrations) {
            wake.notify(WorkKind::Orchestrations);
        }
        if std::mem::take(&mut ctx.wake_activities) {
            wake.notify(WorkKind::Activities);
        }
        if closing.is_some() {
            break;
        }
    }
    receiver.close();
    // Requests that raced the close are answered, not dropped silently.
    while let Ok(command) = receiver.try_recv() {
        if let Command::Job(job) = command {
            job.fail(closed());
        }
    }
    if let Err((_, error)) = ctx.conn.close() {
        tracing::warn!(%error, "closing the SQLite write connection failed");
    }
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

/// Runs transaction-control statements in order (each one cached once prepared).
fn control(conn: &Connection, statements: &[&str]) -> rusqlite::Result<()> {
    for sql in statements {
        conn.prepare_cached(sql)?.execute([])?;
    }
    Ok(())
}

/// Runs `group` in one transaction, each request in its own savepoint, and answers
/// every request, counting a commit in `commits` before anyone hears of it.
fn commit_group(ctx: &mut WriteCtx, group: Vec<Box<dyn Job>>, commits: &AtomicU64) {
    let mut replies: Vec<Box<dyn Reply>> = Vec::with_capacity(group.len());
    let mut broken: Option<ProviderError> = None;
    for job in group {
        if let Some(error) = &broken {
            job.fail(replicate(error));
            continue;
        }
        let open: &[&str] = match replies.last() {
            None => &["BEGIN IMMEDIATE", "SAVEPOINT request"],
            Some(previous) if previous.keep() => &["RELEASE request", "SAVEPOINT request"],
            Some(_) => &[
                "ROLLBACK TO request",
                "RELEASE request",
                "SAVEPOINT request",
            ],
        };
        if let Err(error) = control(&ctx.conn, open) {
            // Some errors (a full disk, an I/O error) roll the whole transaction back,
            // taking the savepoints with them: nothing of this group can commit.
            let error = db(error);
            job.fail(replicate(&error));
            broken = Some(error);
            continue;
        }
        let reply = job.run(ctx);
        if !reply.keep() {
            // Its token reservation, if it made one, is rolled back with it.
            ctx.tokens = 0..0;
        }
        replies.push(reply);
    }
    let failure = match broken {
        Some(error) => Some(error),
        None => {
            let close: &[&str] = match replies.last() {
                Some(last) if !last.keep() => &["ROLLBACK TO request", "RELEASE request", "COMMIT"],
                _ => &["RELEASE request", "COMMIT"],
            };
            control(&ctx.conn, close).err().map(db)
        }
    };
    if let Some(error) = &failure {
        // Harmless when the failure already ended the transaction.
        if !ctx.conn.is_autocommit() {
            let _ = ctx.conn.execute_batch("ROLLBACK");
        }
        ctx.tokens = 0..0;
        tracing::warn!(%error, requests = replies.len(), "a SQLite group commit failed");
    }
    if failure.is_none() {
        commits.fetch_add(1, Ordering::Relaxed);
    }
    for reply in replies {
        reply.send(failure.as_ref());
    }
}

/// Opens a savepoint inside a request, for one item of a batch that must fail alone.
pub(crate) fn savepoint(ctx: &WriteCtx) -> Result<()> {
    control(&ctx.conn, &["SAVEPOINT item"]).map_err(db)
}

/// Closes the savepoint [`savepoint`] opened, keeping its writes or rolling them back.
pub(crate) fn end_savepoint(ctx: &WriteCtx, keep: bool) -> Result<()> {
    let statements: &[&str] = if keep {
        &["RELEASE item"]
    } else {
        &["ROLLBACK TO item", "RELEASE item"]
    };
    control(&ctx.conn, statements).map_err(db)
}

/// How many tokens one reservation takes from the database.
const TOKEN_BLOCK: i64 = 1024;

/// Takes `n` consecutive lock or lease tokens and returns the first. They come from
/// blocks reserved in the database in the same transaction that uses them, so they
/// never repeat, across restarts and processes; a block whose reservation was rolled
/// back is forgotten.
pub(crate) fn allocate_tokens(ctx: &mut WriteCtx, n: usize) -> Result<i64> {
    let n = i64::try_from(n).unwrap_or(i64::MAX);
    if ctx.tokens.end.saturating_sub(ctx.tokens.start) < n {
        let block = n.max(TOKEN_BLOCK);
        let last: i64 = ctx
            .conn
            .prepare_cached(
                "UPDATE keel_meta SET value = value + ?1 WHERE key = 'token' RETURNING value",
            )
            .and_then(|mut statement| statement.query_row([block], |row| row.get(0)))
            .map_err(db)?;
        ctx.tokens = (last - block + 1)..(last + 1);
    }
    let first = ctx.tokens.start;
    ctx.tokens.start += n;
    Ok(first)
}
