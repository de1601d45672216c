//! The orchestrator queue: fetching instances under a lock, renewing, abandoning and
//! suspending. The ack that commits a turn is in `ack`.

use std::collections::HashMap;
use std::time::Duration;

use deadpool_postgres::Object;
use keel_core::{Event, Message, decode_record};
use keel_provider::{
    FetchOrchestrations, LockToken, MessageId, OrchestrationWork, ProviderError, QueuedMessage,
    Result, WorkKind,
};

use crate::convert::{
    col, duration_millis, execution, from_bits, instance_id, record, small, status, timestamp,
    u64_bits, uncount,
};
use crate::error::db;
use crate::provider::PostgresProvider;
use crate::statement::{execute, query};

/// An instance this fetch locked.
#[derive(Debug)]
struct Claimed {
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
}

/// What was read for one claimed instance: its visible messages and history, or why
/// they cannot be decoded.
#[derive(Debug, Default)]
struct Loaded {
    messages: Vec<QueuedMessage>,
    history: Vec<Event>,
    corrupt: Option<ProviderError>,
}

/// Claims up to `$1` instances in one statement: scans the first `$2` visible messages
/// of claimable instances in claim order (highest priority, then oldest message), locks
/// their instances in that order, skipping those another fetch holds (`SKIP LOCKED`:
/// concurrent fetches never claim one instance twice; under READ COMMITTED a row that
/// another fetch locked and committed meanwhile is re-checked on its new version, whose
/// lock then excludes it), and sets their locks for `$3` milliseconds. Each instance is
/// locked by a lookup of its own, in claim order, so that the lock stops at `$1` and
/// never scans the table. The first row always comes, with how many messages were
/// scanned and the database's now; the claimed instances fill the rest of the rows, in
/// claim order.
const CLAIM: &str = "\
WITH visible AS ( \
  SELECT m.instance, m.priority, m.id FROM messages m JOIN instances i ON i.id = m.instance \
  WHERE m.visible_at <= keel_now() \
    AND (i.locked_until IS NULL OR i.locked_until <= keel_now()) \
    AND i.status NOT IN ('paused', 'suspended') \
  ORDER BY m.priority DESC, m.id LIMIT $2), \
firsts AS ( \
  SELECT instance, max(priority) AS priority, min(id) AS first FROM visible \
  GROUP BY instance ORDER BY max(priority) DESC, min(id)), \
claimed AS ( \
  SELECT i.id, f.priority, f.first FROM firsts f \
  CROSS JOIN LATERAL (SELECT id FROM instances \
    WHERE id = f.instance AND (locked_until IS NULL OR locked_until <= keel_now()) \
      AND status NOT IN ('paused', 'suspended') \
    FOR UPDATE SKIP LOCKED) i \
  LIMIT $1), \
locked AS ( \
  UPDATE instances SET lock_token = nextval('tokens'), \
    locked_until = keel_now() + $3, delayed_until = NULL \
  WHERE id = ANY(ARRAY(SELECT id FROM claimed)) \
  RETURNING id, name, version, status, execution, history_len, lock_token, locked_until) \
SELECT s.scanned, s.now, l.id, l.name, l.version, l.status, l.execution, l.history_len, \
  l.lock_token, l.locked_until, c.first \
FROM (SELECT count(*) AS scanned, keel_now() AS now FROM visible) s \
LEFT JOIN (locked l JOIN claimed c ON c.id = l.id) ON true \
ORDER BY c.priority DESC NULLS FIRST, c.first";

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
    if claimed.is_empty() {
        return Ok(Vec::new());
    }
    let mut loaded = load(&client, &claimed, request.with_history).await?;
    let mut work = Vec::with_capacity(claimed.len());
    for claimed in claimed {
        let entry = loaded.remove(&claimed.id).unwrap_or_default();
        if let Some(error) = entry.corrupt {
            set_aside_undecodable(&client, &claimed, &error).await?;
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
            history: request.with_history.then_some(entry.history),
            messages: entry.messages,
        });
    }
    Ok(work)
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
            let Some(id) = col::<Option<String>>(row, 2)? else {
                continue;
            };
            claimed.push(Claimed {
                id,
                name: col(row, 3)?,
                version: col(row, 4)?,
                status: col(row, 5)?,
                execution: col(row, 6)?,
                history_len: col(row, 7)?,
                token: col(row, 8)?,
                locked_until: col(row, 9)?,
                first: col(row, 10)?,
                claimed_at: now,
            });
        }
        if claimed.len() >= max || claimed.len() == before || scanned < page {
            return Ok(claimed);
        }
    }
}

/// Reads the claimed instances' messages that were visible when they were claimed
/// (oldest first) and, when asked, their current histories, in one pipeline; decodes
/// them. A record that does not decode marks its instance corrupt, naming the record;
/// the other instances are unaffected.
async fn load(
    client: &Object,
    claimed: &[Claimed],
    with_history: bool,
) -> Result<HashMap<String, Loaded>> {
    let ids: Vec<&str> = claimed.iter().map(|c| c.id.as_str()).collect();
    let firsts: Vec<i64> = claimed.iter().map(|c| c.first).collect();
    let claimed_at: Vec<i64> = claimed.iter().map(|c| c.claimed_at).collect();
    let executions: Vec<i32> = claimed.iter().map(|c| c.execution).collect();
    let messages = client.prepare_cached(MESSAGES).await.map_err(db)?;
    let history = if with_history {
        Some(client.prepare_cached(HISTORY).await.map_err(db)?)
    } else {
        None
    };
    let read_history = async {
        match &history {
            Some(statement) => client
                .query(statement, &[&ids, &executions])
                .await
                .map_err(db),
            None => Ok(Vec::new()),
        }
    };
    let (message_rows, history_rows) = tokio::try_join!(
        biased;
        async {
            client
                .query(&messages, &[&ids, &firsts, &claimed_at])
                .await
                .map_err(db)
        },
        read_history,
    )?;
    let mut loaded: HashMap<String, Loaded> = HashMap::with_capacity(claimed.len());
    for row in &message_rows {
        let entry = loaded.entry(col(row, 0)?).or_default();
        if entry.corrupt.is_some() {
            continue;
        }
        let id: i64 = col(row, 1)?;
        match record(
            row,
            3,
            decode_record::<Message>,
            format_args!("message {id}"),
        ) {
            Ok(message) => entry.messages.push(QueuedMessage {
                id: MessageId(uncount(id, "a message id")?),
                enqueued_at: timestamp(col(row, 2)?),
                message,
            }),
            Err(error) => entry.corrupt = Some(error),
        }
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
