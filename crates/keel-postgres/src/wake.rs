//! Wake-ups: a dedicated `LISTEN` connection forwards the database's notifications to
//! this process's waiters; waiting for work also watches for delayed work coming due,
//! and a slow poll remains the safety net.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::poll_fn;
use keel_core::Timestamp;
use keel_provider::{Result, WorkKind};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::convert::{col, timestamp};
use crate::error::db;
use crate::provider::PostgresProvider;
use crate::schema::Channels;

/// The first pause before reconnecting a lost listener; it doubles up to
/// [`MAX_BACKOFF`] and resets once a connection works.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// While the listener is down, waiters look again this often.
const DISCONNECTED_POLL: Duration = Duration::from_millis(250);

/// The notifies of this process's waiters, and what the listener knows.
#[derive(Debug)]
pub(crate) struct Wake {
    orchestrations: Notify,
    activities: Notify,
    ended: Notify,
    channels: Channels,
    connected: AtomicBool,
    /// Delayed work that became visible after the last fetch is work that fetch could
    /// not see: a waiter returns for it at once. Database milliseconds.
    fetched_orchestrations: AtomicI64,
    fetched_activities: AtomicI64,
}

impl Wake {
    pub(crate) fn new(channels: Channels) -> Self {
        Self {
            orchestrations: Notify::new(),
            activities: Notify::new(),
            ended: Notify::new(),
            channels,
            connected: AtomicBool::new(false),
            fetched_orchestrations: AtomicI64::new(0),
            fetched_activities: AtomicI64::new(0),
        }
    }

    fn of(&self, kind: WorkKind) -> &Notify {
        match kind {
            WorkKind::Orchestrations => &self.orchestrations,
            WorkKind::Activities => &self.activities,
        }
    }

    fn last_fetch(&self, kind: WorkKind) -> &AtomicI64 {
        match kind {
            WorkKind::Orchestrations => &self.fetched_orchestrations,
            WorkKind::Activities => &self.fetched_activities,
        }
    }

    /// Records that a fetch of `kind` looked at the queue at database time `at`.
    pub(crate) fn fetched(&self, kind: WorkKind, at: i64) {
        self.last_fetch(kind).fetch_max(at, Ordering::Relaxed);
    }

    /// Wakes everyone: after the listener (re)connects, notifications sent while it
    /// was away are lost, so waiters look for themselves.
    fn notify_all(&self) {
        self.orchestrations.notify_waiters();
        self.activities.notify_waiters();
        self.ended.notify_waiters();
    }

    fn dispatch(&self, channel: &str) {
        if channel == self.channels.orchestrations {
            self.orchestrations.notify_waiters();
        } else if channel == self.channels.activities {
            self.activities.notify_waiters();
        } else if channel == self.channels.ended {
            self.ended.notify_waiters();
        }
    }

    /// Whether the listener connection is up.
    pub(crate) fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
}

/// Runs the listener until aborted: connects, listens on the schema's channels,
/// forwards notifications, and reconnects with back-off when the connection drops.
/// The first attempt's outcome goes to `first`, so that connecting fails loudly.
pub(crate) async fn listen(
    config: tokio_postgres::Config,
    wake: Arc<Wake>,
    first: oneshot::Sender<Result<()>>,
) {
    let mut first = Some(first);
    let mut backoff = FIRST_BACKOFF;
    loop {
        let outcome = session(&config, &wake, &mut first, &mut backoff).await;
        wake.connected.store(false, Ordering::Relaxed);
        match outcome {
            Ok(()) => tracing::warn!("the keel-postgres listener connection closed; reconnecting"),
            Err(error) => {
                if let Some(first) = first.take() {
                    let _ = first.send(Err(error));
                    return;
                }
                tracing::warn!(%error, ?backoff, "the keel-postgres listener cannot connect; retrying");
            }
        }
        // Waiters fall back to polling meanwhile.
        wake.notify_all();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One listener connection, from connect to close.
async fn session(
    config: &tokio_postgres::Config,
    wake: &Wake,
    first: &mut Option<oneshot::Sender<Result<()>>>,
    backoff: &mut Duration,
) -> Result<()> {
    let (client, mut connection) = config.connect(NoTls).await.map_err(db)?;
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    // The connection object does the I/O: polled here, it yields the notifications.
    let driver = tokio::spawn(async move {
        let mut messages = poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n.channel().to_owned()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::debug!(%error, "the keel-postgres listener connection failed");
                    return;
                }
            }
        }
    });
    let channels = &wake.channels;
    // Channel names derive from the validated schema name; LISTEN takes identifiers.
    let listened = client
        .batch_execute(&format!(
            "LISTEN \"{}\"; LISTEN \"{}\"; LISTEN \"{}\"",
            channels.orchestrations, channels.activities, channels.ended
        ))
        .await
        .map_err(db);
    if let Err(error) = listened {
        driver.abort();
        return Err(error);
    }
    wake.connected.store(true, Ordering::Relaxed);
    *backoff = FIRST_BACKOFF;
    if let Some(first) = first.take() {
        let _ = first.send(Ok(()));
    }
    wake.notify_all();
    while let Some(channel) = rx.recv().await {
        wake.dispatch(&channel);
    }
    drop(client);
    driver.abort();
    Ok(())
}

/// Waits for a notification of `kind`, for delayed work to come due, or for
/// `timeout`, whichever is first; at most the poll interval (shorter while the
/// listener is down), since a lost notification must only delay work.
///
/// "Comes due" counts from the last fetch of `kind`: delayed work that became visible
/// since then ends the wait at once, since no fetch has seen it; work that was visible
/// at the last fetch and is still queued (its instance locked or paused) does not, so
/// idle dispatchers do not spin.
pub(crate) async fn wait_for_work(
    p: &PostgresProvider,
    kind: WorkKind,
    timeout: Duration,
) -> Result<()> {
    let started = Instant::now();
    let wake = &p.inner.wake;
    let mut notified = std::pin::pin!(wake.of(kind).notified());
    // Registered before reading the queue, so a commit between the read and the wait
    // still wakes us.
    notified.as_mut().enable();
    let since = wake.last_fetch(kind).load(Ordering::Relaxed);
    let (due, db_now) = due_after(p, kind, since).await?;
    let read_at = Instant::now();
    let poll = if wake.connected() {
        p.inner.options.poll_interval
    } else {
        DISCONNECTED_POLL
    };
    let mut limit = timeout.saturating_sub(started.elapsed()).min(poll);
    if let Some(due) = due {
        let wait = u64::try_from(due.saturating_sub(db_now)).unwrap_or(0);
        limit = limit.min(Duration::from_millis(wait));
    }
    let deadline = read_at + limit;
    let _ = tokio::time::timeout_at(deadline, notified.as_mut()).await;
    Ok(())
}

/// When the next invisible item of `kind` becomes visible.
pub(crate) async fn next_due(p: &PostgresProvider, kind: WorkKind) -> Result<Option<Timestamp>> {
    let (due, _) = due_after(p, kind, -1).await?;
    Ok(due.map(timestamp))
}

/// Waits for news of an instance ending, or `timeout`.
pub(crate) async fn wait_for_ended(p: &PostgresProvider, timeout: Duration) -> Result<bool> {
    let notified = p.inner.wake.ended.notified();
    Ok(tokio::time::timeout(timeout, notified).await.is_ok())
}

/// The earliest time after `after` (or after now, when negative) at which delayed work
/// of `kind` becomes visible, with the database's now.
async fn due_after(p: &PostgresProvider, kind: WorkKind, after: i64) -> Result<(Option<i64>, i64)> {
    let sql = match kind {
        // Delayed messages, and instances whose lock was abandoned with a delay.
        WorkKind::Orchestrations => {
            "WITH t AS (SELECT CASE WHEN $1::bigint < 0 THEN keel_now() ELSE $1::bigint END AS after) \
             SELECT LEAST( \
               (SELECT MIN(visible_at) FROM messages, t WHERE visible_at > t.after), \
               (SELECT MIN(delayed_until) FROM instances, t \
                WHERE delayed_until > t.after)), keel_now()"
        }
        // Items waiting for their retry time (leased items are not "queued").
        WorkKind::Activities => {
            "WITH t AS (SELECT CASE WHEN $1::bigint < 0 THEN keel_now() ELSE $1::bigint END AS after) \
             SELECT (SELECT MIN(visible_at) FROM work_items, t \
                     WHERE lease_token IS NULL AND visible_at > t.after), keel_now()"
        }
    };
    let client = p.client().await?;
    let statement = client.prepare_cached(sql).await.map_err(db)?;
    let row = client.query_one(&statement, &[&after]).await.map_err(db)?;
    Ok((col::<Option<i64>>(&row, 0)?, col::<i64>(&row, 1)?))
}
