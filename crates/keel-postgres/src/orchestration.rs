//! The orchestrator queue: fetching instances under a lock, renewing, abandoning and
//! suspending. The ack that commits a turn is in `ack`; the completion that locks the
//! instances it tells (eager dispatch) is in `lease`, and takes its locks as a fetch
//! does ([`lock_wanted`]).

use std::collections::HashMap;
use std::time::Duration;

use deadpool_postgres::Object;
use keel_core::{Event, Message, decode_record};
use keel_provider::{
    FetchOrchestrations, LockToken, MessageId, OrchestrationWork, ProviderError, QueuedMessage,
    Result, WorkKind,
};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, Statement};

use crate::convert::{
    col, duration_millis, execution, from_bits, instance_id, record, small, status, timestamp,
    u64_bits, uncount,
};
use crate::error::{db, undecodable};
use crate::provider::PostgresProvider;
use crate::statement::{Params, execute, query};

/// An instance a claim locked: by a fetch, or by a completion that told it.
#[derive(Debug)]
pub(crate) struct Claimed {
    id: String,
    name: String,
    version: Option<i32>,
    status: String,
    execution: i32,
    history_len: i64,
    token: i64,
    locked_until: i64,
    /// Its oldest visible message.
    first: i64,
    /// The database's now when it was claimed.
    claimed_at: i64,
    /// Its visible messages, oldest first, when the claim read them itself: id,
    /// enqueue time and stored bytes of each.
    messages: Option<Vec<(i64, i64, Vec<u8>)>>,
}

/// What was read for one claimed instance: its visible messages and history, or why
/// they cannot be decoded.
#[derive(Debug, Default)]
struct Loaded {
    messages: Vec<QueuedMessage>,
    history: Vec<Event>,
    corrupt: Option<ProviderError>,
}

/// The lock every claim takes, as the tail of a `WITH` list that holds `wanted`: the
/// instances to lock (column `instance`) in claim order. `claimed` keeps those of them
/// (all of `wanted`'s columns) that it locks, up to `$limit` in that order: each one
/// neither locked (or whose lock expired), paused nor suspended, skipping those another
/// claim holds (`SKIP LOCKED`: concurrent claims never take one instance twice; under
/// READ COMMITTED a row that another claim locked and committed meanwhile is re-checked
/// on its new version, whose lock then excludes it). Each instance is locked by a lookup
/// of its own, so that the lock stops at `$limit` and never scans the table. A third
/// argument adds a condition on the row version locked (`i`: its `xmin`), checked
/// before the limit counts it. `locked` sets their locks for `$lock_for` milliseconds,
/// with a token from the `tokens` sequence, and returns the columns
/// [`Claimed::from_row`] reads, in its order.
macro_rules! lock_wanted {
    ($limit:literal, $lock_for:literal) => {
        lock_wanted!($limit, $lock_for, "")
    };
    ($limit:literal, $lock_for:literal, $also:literal) => {
        concat!(
            "claimed AS ( \
              SELECT w.* FROM wanted w \
              CROSS JOIN LATERAL (SELECT id, xmin FROM instances \
                WHERE id = w.instance \
                  AND (locked_until IS NULL OR locked_until <= keel_now()) \
                  AND status NOT IN ('paused', 'suspended') \
                FOR UPDATE SKIP LOCKED) i ",
            $also,
            " LIMIT ",
            $limit,
            "), \
            locked AS ( \
              UPDATE instances SET lock_token = nextval('tokens'), \
                locked_until = keel_now() + ",
            $lock_for,
            ", delayed_until = NULL \
              WHERE id = ANY(ARRAY(SELECT instance FROM claimed)) \
              RETURNING id, name, version, status, execution, history_len, lock_token, \
                locked_until)"
        )
    };
}
pub(crate) use lock_wanted;

/// Claims up to `$1` instances in one statement: scans the first `$2` visible messages
/// of claimable instances in claim order (highest priority, then oldest message) and
/// locks their instances in that order for `$3` milliseconds ([`lock_wanted`]). The
/// first row always comes, with how many messages were scanned and the database's now;
/// the claimed instances fill the rest of the rows, in claim order, with their oldest
/// visible message.
const CLAIM: &str = concat!(
    "WITH visible AS ( \
      SELECT m.instance, m.priority, m.id FROM messages m JOIN instances i ON i.id = m.instance \
      WHERE m.visible_at <= keel_now() \
        AND (i.locked_until IS NULL OR i.locked_until <= keel_now()) \
        AND i.status NOT IN ('paused', 'suspended') \
      ORDER BY m.priority DESC, m.id LIMIT $2), \
    wanted AS ( \
      SELECT instance, max(priority) AS priority, min(id) AS first FROM visible \
      GROUP BY instance ORDER BY max(priority) DESC, min(id)), ",
    lock_wanted!("$1", "$3"),
    " SELECT s.scanned, s.now, l.id, l.name, l.version, l.status, l.execution, \
      l.history_len, l.lock_token, l.locked_until, c.first \
    FROM (SELECT count(*) AS scanned, keel_now() AS now FROM visible) s \
    LEFT JOIN (locked l JOIN claimed c ON c.instance = l.id) ON true \
    ORDER BY c.priority DESC NULLS FIRST, c.first"
);

/// The messages of the claimed instances that were visible when they were claimed,
/// oldest first. A statement of its own, after the claim's commit, so that it sees
/// every ack committed before the locks were taken. Each instance's read starts at its
/// oldest visible message, found by the claim: older entries of the index belong to
/// consumed messages, dead until vacuum, which a read from the start would step over
/// one by one, turn after turn.
const MESSAGES: &str = "\
SELECT m.instance, m.id, m.enqueued_at, m.body \
FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS u (instance, first, claimed_at) \
JOIN messages m ON m.instance = u.instance AND m.id >= u.first \
WHERE m.visible_at <= u.claimed_at ORDER BY m.id";

/// The current executions' histories of the claimed instances.
const HISTORY: &str = "\
SELECT h.instance, h.seq, h.execution, h.event \
FROM history h JOIN unnest($1::text[], $2::integer[]) AS u (instance, execution) \
  ON h.instance = u.instance AND h.execution = u.execution \
ORDER BY h.instance, h.seq";

pub(crate) async fn fetch(
    p: &PostgresProvider,
    request: FetchOrchestrations,
) -> Result<Vec<OrchestrationWork>> {
    let max = request
        .max_instances
        .min(p.capabilities_ref().max_fetch_instances);
    if max == 0 {
        return Ok(Vec::new());
    }
    let client = p.client().await?;
    let claimed = claim(p, &client, max, request.lock_for).await?;
    deliver(&client, claimed, request.with_history).await
}

/// The work of instances just claimed: reads their messages that were visible when they
/// were claimed (and their histories, when asked) and hands them out in claim order.
/// One whose records do not decode is set aside instead ([`set_aside_undecodable`]).
pub(crate) async fn deliver(
    client: &Object,
    claimed: Vec<Claimed>,
    with_history: bool,
) -> Result<Vec<OrchestrationWork>> {
    if claimed.is_empty() {
        return Ok(Vec::new());
    }
    let mut loaded = load(client, &claimed, with_history).await?;
    let mut work = Vec::with_capacity(claimed.len());
    for claimed in claimed {
        let entry = loaded.remove(&claimed.id).unwrap_or_default();
        if let Some(error) = entry.corrupt {
            set_aside_undecodable(client, &claimed, &error).await?;
            continue;
        }
        work.push(OrchestrationWork {
            lock: LockToken::new(instance_id(claimed.id)?, from_bits(claimed.token)),
            locked_until: timestamp(claimed.locked_until),
            name: claimed.name,
            version: claimed.version.map(|v| small(v, "version")).transpose()?,
            status: status(&claimed.status)?,
            execution: execution(claimed.execution)?,
            history_len: uncount(claimed.history_len, "history length")?,
            history: with_history.then_some(entry.history),
            messages: entry.messages,
        });
    }
    Ok(work)
}

/// Releases locks a claim took, if still held, and tells dispatchers everywhere.
const RELEASE: &str = "\
WITH r AS (UPDATE instances i SET lock_token = NULL, locked_until = NULL \
  FROM unnest($1::text[], $2::bigint[]) AS u (id, token) \
  WHERE i.id = u.id AND i.lock_token = u.token RETURNING 1) \
SELECT pg_notify($3, '')::text WHERE EXISTS (SELECT 1 FROM r)";

/// [`deliver`] for instances a completion locked (eager dispatch), which has committed:
/// when their work cannot be read, the completion still stands, and the locks are
/// released for fetches to take (or, if that fails too, expire).
pub(crate) async fn deliver_claimed(
    p: &PostgresProvider,
    client: &Object,
    claimed: Vec<Claimed>,
    with_history: bool,
) -> Vec<OrchestrationWork> {
    let (ids, tokens): (Vec<String>, Vec<i64>) =
        claimed.iter().map(|c| (c.id.clone(), c.token)).unzip();
    let error = match deliver(client, claimed, with_history).await {
        Ok(work) => return work,
        Err(error) => error,
    };
    tracing::warn!(%error, instances = ids.len(), "could not read the work of instances locked on completion: releasing them");
    let channel = &p.inner.channels.orchestrations;
    if let Err(error) = query(client, RELEASE, &[&ids, &tokens, channel]).await {
        tracing::warn!(%error, "could not release the instances: their locks will expire");
    }
    Vec::new()
}

impl Claimed {
    /// The instance a claim locked at database time `claimed_at`, from the columns of
    /// `row` from `at` on: those `locked` of [`lock_wanted`] returns, then the instance's
    /// oldest visible message (where [`load`] reads its messages from, unless the claim
    /// read them itself). `None` when they are null (a claim's first row, which only says
    /// what the claim saw).
    pub(crate) fn from_row(row: &Row, at: usize, claimed_at: i64) -> Result<Option<Self>> {
        let Some(id) = col::<Option<String>>(row, at)? else {
            return Ok(None);
        };
        Ok(Some(Self {
            id,
            name: col(row, at + 1)?,
            version: col(row, at + 2)?,
            status: col(row, at + 3)?,
            execution: col(row, at + 4)?,
            history_len: col(row, at + 5)?,
            token: col(row, at + 6)?,
            locked_until: col(row, at + 7)?,
            first: col(row, at + 8)?,
            claimed_at,
            messages: None,
        }))
    }

    /// The same, with its visible messages as the claim read them, from the columns of
    /// `row` from `at` on: their ids, enqueue times and stored bytes, as arrays in order
    /// (null for none).
    pub(crate) fn with_messages(mut self, row: &Row, at: usize) -> Result<Self> {
        let ids: Vec<i64> = col::<Option<_>>(row, at)?.unwrap_or_default();
        let enqueued: Vec<i64> = col::<Option<_>>(row, at + 1)?.unwrap_or_default();
        let bodies: Vec<Vec<u8>> = col::<Option<_>>(row, at + 2)?.unwrap_or_default();
        self.messages = Some(
            ids.into_iter()
                .zip(enqueued)
                .zip(bodies)
                .map(|((id, at), body)| (id, at, body))
                .collect(),
        );
        Ok(self)
    }
}

/// Claims up to `max` instances, in claim order. Claims again while a scan was full but
/// claimed too few (many messages of one instance, or instances other fetches took):
/// what this fetch locked is no longer claimable, so each round scans further on.
async fn claim(
    p: &PostgresProvider,
    client: &Object,
    max: usize,
    lock_for: Duration,
) -> Result<Vec<Claimed>> {
    let page = i64::try_from(max.saturating_mul(2).max(32)).unwrap_or(i64::MAX);
    let lock_for = duration_millis(lock_for);
    let mut claimed = Vec::new();
    loop {
        let want = i64::try_from(max - claimed.len()).unwrap_or(i64::MAX);
        let rows = query(client, CLAIM, &[&want, &page, &lock_for]).await?;
        let Some(first) = rows.first() else {
            return Ok(claimed);
        };
        let scanned: i64 = col(first, 0)?;
        let now: i64 = col(first, 1)?;
        p.inner.wake.fetched(WorkKind::Orchestrations, now);
        let before = claimed.len();
        for row in &rows {
            claimed.extend(Claimed::from_row(row, 2, now)?);
        }
        if claimed.len() >= max || claimed.len() == before || scanned < page {
            return Ok(claimed);
        }
    }
}

/// Reads the claimed instances' messages that were visible when they were claimed
/// (oldest first), unless the claim read them itself, and, when asked, their current
/// histories, in one pipeline; decodes them. A record that does not decode marks its
/// instance corrupt, naming the record; the other instances are unaffected.
async fn load(
    client: &Object,
    claimed: &[Claimed],
    with_history: bool,
) -> Result<HashMap<String, Loaded>> {
    let unread: Vec<&Claimed> = claimed.iter().filter(|c| c.messages.is_none()).collect();
    let ids: Vec<&str> = unread.iter().map(|c| c.id.as_str()).collect();
    let firsts: Vec<i64> = unread.iter().map(|c| c.first).collect();
    let claimed_at: Vec<i64> = unread.iter().map(|c| c.claimed_at).collect();
    let all: Vec<&str> = claimed.iter().map(|c| c.id.as_str()).collect();
    let executions: Vec<i32> = claimed.iter().map(|c| c.execution).collect();
    let messages = if unread.is_empty() {
        None
    } else {
        Some(client.prepare_cached(MESSAGES).await.map_err(db)?)
    };
    let history = if with_history {
        Some(client.prepare_cached(HISTORY).await.map_err(db)?)
    } else {
        None
    };
    let message_params: [&(dyn ToSql + Sync); 3] = [&ids, &firsts, &claimed_at];
    let history_params: [&(dyn ToSql + Sync); 2] = [&all, &executions];
    let (message_rows, history_rows) = tokio::try_join!(
        biased;
        rows(client, messages.as_ref(), &message_params),
        rows(client, history.as_ref(), &history_params),
    )?;
    let mut loaded: HashMap<String, Loaded> = HashMap::with_capacity(claimed.len());
    for claimed in claimed {
        if let Some(messages) = &claimed.messages {
            let entry = loaded.entry(claimed.id.clone()).or_default();
            for (id, enqueued_at, body) in messages {
                if entry.corrupt.is_none() {
                    let message = decode_record::<Message>(body)
                        .map_err(|error| undecodable(format_args!("message {id}"), error.into()));
                    entry.admit(*id, *enqueued_at, message)?;
                }
            }
        }
    }
    for row in &message_rows {
        let entry = loaded.entry(col(row, 0)?).or_default();
        if entry.corrupt.is_some() {
            continue;
        }
        let id: i64 = col(row, 1)?;
        let what = format_args!("message {id}");
        let message = record(row, 3, decode_record::<Message>, what);
        entry.admit(id, col(row, 2)?, message)?;
    }
    for row in &history_rows {
        let entry = loaded.entry(col(row, 0)?).or_default();
        if entry.corrupt.is_some() {
            continue;
        }
        let seq: i64 = col(row, 1)?;
        let execution: i32 = col(row, 2)?;
        let what = format_args!("history event {seq} of execution {execution}");
        match record(row, 3, decode_record::<Event>, what) {
            Ok(event) => entry.history.push(event),
            Err(error) => entry.corrupt = Some(error),
        }
    }
    Ok(loaded)
}

/// Runs `statement` if there is one, returning its rows.
async fn rows(
    client: &Object,
    statement: Option<&Statement>,
    params: Params<'_>,
) -> Result<Vec<Row>> {
    match statement {
        Some(statement) => client.query(statement, params).await.map_err(db),
        None => Ok(Vec::new()),
    }
}

impl Loaded {
    /// Adds message `id` as decoded, or marks the instance corrupt with why it did not
    /// decode.
    fn admit(&mut self, id: i64, enqueued_at: i64, message: Result<Message>) -> Result<()> {
        match message {
            Ok(message) => self.messages.push(QueuedMessage {
                id: MessageId(uncount(id, "a message id")?),
                enqueued_at: timestamp(enqueued_at),
                message,
            }),
            Err(error) => self.corrupt = Some(error),
        }
        Ok(())
    }
}

/// Suspends an instance whose stored data cannot be decoded, keeping its messages: a
/// human (or a fixed build) resumes it. A finished instance is not brought back to
/// life: its undecodable late messages are dropped instead.
async fn set_aside_undecodable(
    client: &Object,
    claimed: &Claimed,
    error: &ProviderError,
) -> Result<()> {
    if matches!(
        claimed.status.as_str(),
        "completed" | "failed" | "cancelled"
    ) {
        tracing::warn!(instance = %claimed.id, %error, "dropping undecodable messages of a finished instance");
        execute(
            client,
            "WITH gone AS (DELETE FROM messages WHERE instance = $1) \
             UPDATE instances SET lock_token = NULL, locked_until = NULL \
             WHERE id = $1 AND lock_token = $2",
            &[&claimed.id, &claimed.token],
        )
        .await?;
        return Ok(());
    }
    tracing::warn!(instance = %claimed.id, %error, "suspending an undecodable instance");
    execute(
        client,
        "UPDATE instances SET status = 'suspended', status_reason = $3, \
           lock_token = NULL, locked_until = NULL, updated_at = keel_now() \
         WHERE id = $1 AND lock_token = $2",
        &[&claimed.id, &claimed.token, &error.message()],
    )
    .await?;
    Ok(())
}

fn stale(lock: &LockToken) -> ProviderError {
    ProviderError::stale(format!("the lock on instance {}", lock.instance()))
}

/// Extends a held lock.
pub(crate) async fn renew(p: &PostgresProvider, lock: &LockToken, extend: Duration) -> Result<()> {
    let client = p.client().await?;
    let changed = execute(
        &client,
        "UPDATE instances SET locked_until = keel_now() + $3 \
         WHERE id = $1 AND lock_token = $2 AND locked_until > keel_now()",
        &[
            &lock.instance().as_str(),
            &u64_bits(lock.token()),
            &duration_millis(extend),
        ],
    )
    .await?;
    if changed == 0 {
        return Err(stale(lock));
    }
    Ok(())
}

/// Releases a held lock; the token goes, so the old holder is stale at once, and
/// `locked_until` stays as the time the instance may be fetched again (and, after a
/// delay, `delayed_until` too, for `next_due`). Dispatchers everywhere hear of it.
pub(crate) async fn abandon(p: &PostgresProvider, lock: &LockToken, delay: Duration) -> Result<()> {
    let client = p.client().await?;
    let rows = query(
        &client,
        "WITH u AS (UPDATE instances SET lock_token = NULL, locked_until = keel_now() + $3, \
           delayed_until = CASE WHEN $3 > 0 THEN keel_now() + $3 END \
           WHERE id = $1 AND lock_token = $2 AND locked_until > keel_now() RETURNING 1) \
         SELECT pg_notify($4, '')::text FROM u",
        &[
            &lock.instance().as_str(),
            &u64_bits(lock.token()),
            &duration_millis(delay),
            &p.inner.channels.orchestrations,
        ],
    )
    .await?;
    if rows.is_empty() {
        return Err(stale(lock));
    }
    Ok(())
}

/// Sets a locked instance aside, releasing the lock and keeping its messages.
pub(crate) async fn suspend(p: &PostgresProvider, lock: &LockToken, reason: &str) -> Result<()> {
    let client = p.client().await?;
    let changed = execute(
        &client,
        "UPDATE instances SET status = 'suspended', status_reason = $3, \
           lock_token = NULL, locked_until = NULL, updated_at = keel_now() \
         WHERE id = $1 AND lock_token = $2 AND locked_until > keel_now()",
        &[&lock.instance().as_str(), &u64_bits(lock.token()), &reason],
    )
    .await?;
    if changed == 0 {
        return Err(stale(lock));
    }
    Ok(())
}
