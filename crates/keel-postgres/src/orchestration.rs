//! The orchestrator queue: fetching instances under a lock, renewing, abandoning and
//! suspending. The ack that commits a turn is in `ack`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use deadpool_postgres::Transaction;
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

/// A claimable instance, locked (`FOR UPDATE`) by this transaction.
#[derive(Debug)]
struct Candidate {
    seq: i64,
    id: String,
    name: String,
    version: Option<i32>,
    status: String,
    execution: i32,
    history_len: i64,
}

/// What was read for one candidate: its visible messages and history, or why they
/// cannot be decoded.
#[derive(Debug, Default)]
struct Loaded {
    messages: Vec<QueuedMessage>,
    history: Vec<Event>,
    corrupt: Option<ProviderError>,
}

/// One page of visible messages of claimable instances, in claim order: highest
/// priority, then oldest message. The instance's lock and status are checked again,
/// on the newest row versions, when [`LOCK`] locks them.
const SCAN: &str = "\
SELECT m.instance, m.priority, m.id, keel_now() \
FROM messages m JOIN instances i ON i.id = m.instance \
WHERE m.visible_at <= keel_now() \
  AND (i.locked_until IS NULL OR i.locked_until <= keel_now()) \
  AND i.status NOT IN ('paused', 'suspended') \
  AND (m.priority < $1 OR (m.priority = $1 AND m.id > $2)) \
ORDER BY m.priority DESC, m.id LIMIT $3";

/// Locks the scanned instances that are still claimable, skipping those another
/// fetch holds: concurrent fetches never claim one instance twice. Under READ
/// COMMITTED a row another fetch locked and committed meanwhile is re-checked on its
/// new version, whose lock then excludes it.
const LOCK: &str = "\
SELECT seq, id, name, version, status, execution, history_len FROM instances \
WHERE id = ANY($1) \
  AND (locked_until IS NULL OR locked_until <= keel_now()) \
  AND status NOT IN ('paused', 'suspended') \
FOR UPDATE SKIP LOCKED";

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
    let mut client = p.client().await?;
    let tx = client.transaction().await.map_err(db)?;
    let (candidates, now) = claimable(&tx, max).await?;
    p.inner.wake.fetched(WorkKind::Orchestrations, now);
    if candidates.is_empty() {
        tx.commit().await.map_err(db)?;
        return Ok(Vec::new());
    }
    let mut loaded = load(&tx, &candidates, request.with_history).await?;
    let mut good = Vec::with_capacity(candidates.len());
    for candidate in candidates {
        let entry = loaded.remove(&candidate.id).unwrap_or_default();
        match entry.corrupt {
            None => good.push((candidate, entry)),
            Some(error) => set_aside_undecodable(&tx, &candidate, &error).await?,
        }
    }
    let seqs: Vec<i64> = good.iter().map(|(c, _)| c.seq).collect();
    let rows = query(
        &tx,
        "UPDATE instances SET lock_token = nextval('tokens'), \
           locked_until = keel_now() + $2 \
         WHERE seq = ANY($1) RETURNING seq, lock_token, locked_until",
        &[&seqs, &duration_millis(request.lock_for)],
    )
    .await?;
    tx.commit().await.map_err(db)?;
    let mut locks = HashMap::with_capacity(rows.len());
    for row in &rows {
        locks.insert(
            col::<i64>(row, 0)?,
            (col::<i64>(row, 1)?, col::<i64>(row, 2)?),
        );
    }
    let mut work = Vec::with_capacity(good.len());
    for (candidate, entry) in good {
        let Some(&(token, until)) = locks.get(&candidate.seq) else {
            continue;
        };
        work.push(OrchestrationWork {
            lock: LockToken::new(instance_id(candidate.id)?, from_bits(token)),
            locked_until: timestamp(until),
            name: candidate.name,
            version: candidate.version.map(|v| small(v, "version")).transpose()?,
            status: status(&candidate.status)?,
            execution: execution(candidate.execution)?,
            history_len: uncount(candidate.history_len, "history length")?,
            history: request.with_history.then_some(entry.history),
            messages: entry.messages,
        });
    }
    Ok(work)
}

/// Up to `max` claimable instances, locked, in claim order; and the database's now.
/// Pages through the visible messages until enough instances are locked or none are
/// left.
async fn claimable(tx: &Transaction<'_>, max: usize) -> Result<(Vec<Candidate>, i64)> {
    let page = i64::try_from(max.saturating_mul(2).max(32)).unwrap_or(i64::MAX);
    let mut after: (i32, i64) = (i32::MAX, i64::MIN);
    let mut seen = HashSet::new();
    let mut candidates = Vec::new();
    let mut now = 0;
    loop {
        let rows = query(tx, SCAN, &[&after.0, &after.1, &page]).await?;
        let mut fresh = Vec::new();
        for row in &rows {
            after = (col(row, 1)?, col(row, 2)?);
            now = col(row, 3)?;
            let instance: String = col(row, 0)?;
            if seen.insert(instance.clone()) {
                fresh.push(instance);
            }
        }
        if !fresh.is_empty() {
            let locked = query(tx, LOCK, &[&fresh]).await?;
            let mut by_id = HashMap::with_capacity(locked.len());
            for row in &locked {
                let candidate = Candidate {
                    seq: col(row, 0)?,
                    id: col(row, 1)?,
                    name: col(row, 2)?,
                    version: col(row, 3)?,
                    status: col(row, 4)?,
                    execution: col(row, 5)?,
                    history_len: col(row, 6)?,
                };
                by_id.insert(candidate.id.clone(), candidate);
            }
            // Locks taken beyond `max` are released at commit, unused.
            for id in &fresh {
                if candidates.len() >= max {
                    break;
                }
                if let Some(candidate) = by_id.remove(id) {
                    candidates.push(candidate);
                }
            }
        }
        if candidates.len() >= max || i64::try_from(rows.len()).unwrap_or(0) < page {
            break;
        }
    }
    // Nothing was scanned: the fetch still records when it looked.
    if now == 0 {
        now = db_now(tx).await?;
    }
    Ok((candidates, now))
}

async fn db_now(tx: &Transaction<'_>) -> Result<i64> {
    let rows = query(tx, "SELECT keel_now()", &[]).await?;
    match rows.first() {
        Some(row) => col(row, 0),
        None => Ok(0),
    }
}

/// Reads the candidates' visible messages (oldest first) and, when asked, their
/// current histories; decodes them. A record that does not decode marks its instance
/// corrupt, naming the record; the other candidates are unaffected.
async fn load(
    tx: &Transaction<'_>,
    candidates: &[Candidate],
    with_history: bool,
) -> Result<HashMap<String, Loaded>> {
    let ids: Vec<&str> = candidates.iter().map(|c| c.id.as_str()).collect();
    let mut loaded: HashMap<String, Loaded> = HashMap::with_capacity(candidates.len());
    let rows = query(
        tx,
        "SELECT instance, id, enqueued_at, body FROM messages \
         WHERE instance = ANY($1) AND visible_at <= keel_now() ORDER BY id",
        &[&ids],
    )
    .await?;
    for row in &rows {
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
    if with_history {
        let rows = query(
            tx,
            "SELECT h.instance, h.seq, h.execution, h.event \
             FROM history h JOIN instances i ON i.id = h.instance AND h.execution = i.execution \
             WHERE i.id = ANY($1) ORDER BY h.instance, h.seq",
            &[&ids],
        )
        .await?;
        for row in &rows {
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
    }
    Ok(loaded)
}

/// Suspends an instance whose stored data cannot be decoded, keeping its messages: a
/// human (or a fixed build) resumes it. A finished instance is not brought back to
/// life: its undecodable late messages are dropped instead.
async fn set_aside_undecodable(
    tx: &Transaction<'_>,
    candidate: &Candidate,
    error: &ProviderError,
) -> Result<()> {
    if matches!(
        candidate.status.as_str(),
        "completed" | "failed" | "cancelled"
    ) {
        tracing::warn!(instance = %candidate.id, %error, "dropping undecodable messages of a finished instance");
        execute(
            tx,
            "DELETE FROM messages WHERE instance = $1",
            &[&candidate.id],
        )
        .await?;
        return Ok(());
    }
    tracing::warn!(instance = %candidate.id, %error, "suspending an undecodable instance");
    execute(
        tx,
        "UPDATE instances SET status = 'suspended', status_reason = $2, \
         updated_at = keel_now() WHERE seq = $1",
        &[&candidate.seq, &error.message()],
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
/// `locked_until` stays as the time the instance may be fetched again. Dispatchers
/// everywhere hear of it.
pub(crate) async fn abandon(p: &PostgresProvider, lock: &LockToken, delay: Duration) -> Result<()> {
    let client = p.client().await?;
    let rows = query(
        &client,
        "WITH u AS (UPDATE instances SET lock_token = NULL, locked_until = keel_now() + $3 \
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
