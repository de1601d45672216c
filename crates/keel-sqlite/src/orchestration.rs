//! The orchestrator queue: fetching instances under a lock, renewing, abandoning and
//! suspending. The ack that commits a turn is in `ack`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use keel_core::{Event, Message, decode_record};
use keel_provider::{
    FetchOrchestrations, LockToken, MessageId, OrchestrationWork, ProviderError, QueuedMessage,
    Result, WorkKind,
};

use rusqlite::Row;

use crate::convert::{
    col, count, execution, from_bits, instance_id, later, millis, record, small, status, timestamp,
    u64_bits, uncount,
};
use crate::provider::SqliteProvider;
use crate::query::{self, execute};
use crate::writer::{WriteCtx, allocate_tokens};

pub(crate) async fn fetch(
    p: &SqliteProvider,
    request: FetchOrchestrations,
) -> Result<Vec<OrchestrationWork>> {
    let max = request
        .max_instances
        .min(p.inner.capabilities.max_fetch_instances);
    if max == 0 {
        return Ok(Vec::new());
    }
    p.inner
        .wake
        .fetched(WorkKind::Orchestrations, p.clock_now());
    p.write(move |ctx| {
        claim(
            ctx,
            Scope::Queue,
            max,
            request.lock_for,
            request.with_history,
        )
    })
    .await
}

/// Which instances a claim looks at.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Scope<'a> {
    /// Any, in claim order.
    Queue,
    /// Only these, in this order (those a completion just sent outcomes to).
    Only(&'a [String]),
}

/// A claimable instance found by the scan.
#[derive(Debug)]
struct Candidate {
    seq: i64,
    id: String,
    name: String,
    version: Option<i64>,
    status: String,
    execution: i64,
    history_len: i64,
}

impl Candidate {
    /// A candidate from the first columns of a row: seq, id, name, version, status,
    /// execution, history_len.
    fn read(row: &Row<'_>) -> Result<Self> {
        Ok(Self {
            seq: col(row, 0)?,
            id: col(row, 1)?,
            name: col(row, 2)?,
            version: col(row, 3)?,
            status: col(row, 4)?,
            execution: col(row, 5)?,
            history_len: col(row, 6)?,
        })
    }
}

/// What was read for one candidate: its visible messages and history, or why they
/// cannot be decoded.
#[derive(Debug, Default)]
struct Loaded {
    messages: Vec<QueuedMessage>,
    history: Vec<Event>,
    corrupt: Option<ProviderError>,
}

/// Locks up to `max` claimable instances of `scope` for `lock_for` and returns their
/// work, inside the caller's transaction.
pub(crate) fn claim(
    ctx: &mut WriteCtx,
    scope: Scope<'_>,
    max: usize,
    lock_for: Duration,
    with_history: bool,
) -> Result<Vec<OrchestrationWork>> {
    let now_ts = ctx.now();
    let now = millis(now_ts);
    let good = claimable(ctx, scope, max, now, with_history)?;
    if good.is_empty() {
        return Ok(Vec::new());
    }
    let first_token = allocate_tokens(ctx, good.len())?;
    let locked_until = later(now_ts, lock_for);
    let mut work = Vec::with_capacity(good.len());
    for ((candidate, entry), token) in good.into_iter().zip(first_token..) {
        execute(
            &ctx.conn,
            "UPDATE instances SET lock_token = ?2, locked_until = ?3 WHERE seq = ?1",
            [candidate.seq, token, locked_until],
        )?;
        work.push(OrchestrationWork {
            lock: LockToken::new(instance_id(candidate.id)?, from_bits(token)),
            locked_until: timestamp(locked_until),
            name: candidate.name,
            version: candidate.version.map(|v| small(v, "version")).transpose()?,
            status: status(&candidate.status)?,
            execution: execution(candidate.execution)?,
            history_len: uncount(candidate.history_len, "history length")?,
            history: with_history.then_some(entry.history),
            messages: entry.messages,
        });
    }
    Ok(work)
}

/// Up to `max` candidates whose messages (and history, when asked) decode, with what
/// was read for them. An undecodable one is set aside as suspended with the reason,
/// and the scan goes on, so that set-aside instances do not use up the batch.
fn claimable(
    ctx: &mut WriteCtx,
    scope: Scope<'_>,
    max: usize,
    now: i64,
    with_history: bool,
) -> Result<Vec<(Candidate, Loaded)>> {
    let mut good: Vec<(Candidate, Loaded)> = Vec::new();
    let mut chosen = HashSet::new();
    loop {
        // The instances chosen so far are still claimable, and first in claim order:
        // a scan after a set-aside finds them again, then the next ones.
        let found = match scope {
            Scope::Queue => scan(ctx, max, now)?,
            Scope::Only(ids) => scan_only(ctx, ids, now)?,
        };
        let candidates: Vec<Candidate> = found
            .into_iter()
            .filter(|c| !chosen.contains(&c.seq))
            .take(max.saturating_sub(good.len()))
            .collect();
        if candidates.is_empty() {
            return Ok(good);
        }
        let mut loaded = load(ctx, &candidates, now, with_history)?;
        let mut set_aside = false;
        for candidate in candidates {
            let entry = loaded.remove(&candidate.seq).unwrap_or_default();
            match entry.corrupt {
                None => {
                    chosen.insert(candidate.seq);
                    good.push((candidate, entry));
                }
                Some(error) => {
                    set_aside_undecodable(ctx, &candidate, &error, now)?;
                    set_aside = true;
                }
            }
        }
        if !set_aside || good.len() >= max {
            return Ok(good);
        }
    }
}

/// Suspends an instance whose stored data cannot be decoded, keeping its messages: a
/// human (or a fixed build) resumes it. A finished instance is not brought back to
/// life: its turns would only drain its late messages, so they are dropped instead.
fn set_aside_undecodable(
    ctx: &WriteCtx,
    candidate: &Candidate,
    error: &ProviderError,
    now: i64,
) -> Result<()> {
    if matches!(
        candidate.status.as_str(),
        "completed" | "failed" | "cancelled"
    ) {
        tracing::warn!(instance = %candidate.id, %error, "dropping undecodable messages of a finished instance");
        execute(
            &ctx.conn,
            "DELETE FROM messages WHERE instance = ?1",
            [&candidate.id],
        )?;
        return Ok(());
    }
    tracing::warn!(instance = %candidate.id, %error, "suspending an undecodable instance");
    execute(
        &ctx.conn,
        "UPDATE instances SET status = 'suspended', status_reason = ?2, updated_at = ?3 \
         WHERE seq = ?1",
        (candidate.seq, error.message(), now),
    )?;
    Ok(())
}

/// Up to `max` instances with a visible message, not locked (or the lock expired),
/// neither paused nor suspended: highest priority first, then the oldest message.
///
/// Delayed messages that came due are marked ready first; then one index is walked in
/// claim order, a page at a time, keeping each instance's first message.
fn scan(ctx: &WriteCtx, max: usize, now: i64) -> Result<Vec<Candidate>> {
    let page = count(max.saturating_mul(2).max(32) as u64);
    let mut after = (i64::MAX, i64::MIN);
    let mut seen = HashSet::new();
    let mut candidates = Vec::new();
    execute(
        &ctx.conn,
        "UPDATE messages SET ready = 1 WHERE ready = 0 AND visible_at <= ?1",
        [now],
    )?;
    loop {
        let rows = query::all(
            &ctx.conn,
            "SELECT i.seq, i.id, i.name, i.version, i.status, i.execution, i.history_len, \
                    m.priority, m.id \
             FROM messages m JOIN instances i ON i.id = m.instance \
             WHERE m.ready = 1 AND m.visible_at <= ?1 \
               AND (m.priority < ?2 OR (m.priority = ?2 AND m.id > ?3)) \
               AND (i.locked_until IS NULL OR i.locked_until <= ?1) \
               AND i.status NOT IN ('paused', 'suspended') \
             ORDER BY m.priority DESC, m.id LIMIT ?4",
            [now, after.0, after.1, page],
            |row| {
                let position: (i64, i64) = (col(row, 7)?, col(row, 8)?);
                Ok((position, Candidate::read(row)?))
            },
        )?;
        let full = i64::try_from(rows.len()).unwrap_or(i64::MAX) >= page;
        for (position, candidate) in rows {
            after = position;
            if seen.insert(candidate.seq) {
                candidates.push(candidate);
                if candidates.len() >= max {
                    return Ok(candidates);
                }
            }
        }
        if !full {
            return Ok(candidates);
        }
    }
}

/// Those of `ids` that are claimable (as [`scan`] defines it), in that order.
fn scan_only(ctx: &WriteCtx, ids: &[String], now: i64) -> Result<Vec<Candidate>> {
    let mut candidates = Vec::new();
    for id in ids {
        let candidate = query::first(
            &ctx.conn,
            "SELECT seq, id, name, version, status, execution, history_len FROM instances i \
             WHERE id = ?1 AND (locked_until IS NULL OR locked_until <= ?2) \
               AND status NOT IN ('paused', 'suspended') \
               AND EXISTS (SELECT 1 FROM messages m \
                 WHERE m.instance = i.id AND m.ready = 1 AND m.visible_at <= ?2)",
            (id, now),
            Candidate::read,
        )?;
        candidates.extend(candidate);
    }
    Ok(candidates)
}

/// Reads the candidates' visible messages (oldest first) and, when asked, their
/// current histories; decodes them. A record that does not decode marks its instance
/// corrupt, naming the record; the other candidates are unaffected.
fn load(
    ctx: &WriteCtx,
    candidates: &[Candidate],
    now: i64,
    with_history: bool,
) -> Result<HashMap<i64, Loaded>> {
    let mut loaded: HashMap<i64, Loaded> = HashMap::with_capacity(candidates.len());
    for candidate in candidates {
        let mut entry = Loaded::default();
        let messages = query::all(
            &ctx.conn,
            "SELECT id, enqueued_at, body FROM messages \
             WHERE instance = ?1 AND ready = 1 AND visible_at <= ?2 ORDER BY id",
            (&candidate.id, now),
            |row| {
                let id: i64 = col(row, 0)?;
                let decoded = record(
                    row,
                    2,
                    decode_record::<Message>,
                    format_args!("message {id}"),
                );
                Ok(match decoded {
                    Ok(message) => Ok(QueuedMessage {
                        id: MessageId(uncount(id, "a message id")?),
                        enqueued_at: timestamp(col(row, 1)?),
                        message,
                    }),
                    Err(error) => Err(error),
                })
            },
        )?;
        for message in messages {
            match message {
                Ok(message) => entry.messages.push(message),
                Err(error) => {
                    entry.corrupt = Some(error);
                    break;
                }
            }
        }
        if with_history && entry.corrupt.is_none() {
            let events = query::all(
                &ctx.conn,
                "SELECT seq, event FROM history \
                 WHERE instance = ?1 AND execution = ?2 ORDER BY seq",
                (&candidate.id, candidate.execution),
                |row| {
                    let seq: i64 = col(row, 0)?;
                    let execution = candidate.execution;
                    Ok(record(
                        row,
                        1,
                        decode_record::<Event>,
                        format_args!("history event {seq} of execution {execution}"),
                    ))
                },
            )?;
            for event in events {
                match event {
                    Ok(event) => entry.history.push(event),
                    Err(error) => {
                        entry.corrupt = Some(error);
                        break;
                    }
                }
            }
        }
        loaded.insert(candidate.seq, entry);
    }
    Ok(loaded)
}

fn stale(lock: &LockToken) -> ProviderError {
    ProviderError::stale(format!("the lock on instance {}", lock.instance()))
}

/// What to do to a held lock.
#[derive(Debug)]
enum LockChange {
    /// Hold it until now + this.
    Renew(Duration),
    /// Release it; fetchable again after this.
    Abandon(Duration),
    /// Release it and suspend the instance for this reason.
    Suspend(String),
}

/// Applies `change` to a held lock (the token matches and has not expired); `Stale`,
/// changing nothing, otherwise.
async fn change_lock(p: &SqliteProvider, lock: &LockToken, change: LockChange) -> Result<()> {
    let lock = lock.clone();
    p.write(move |ctx| {
        let now_ts = ctx.now();
        let now = millis(now_ts);
        let instance = lock.instance().as_str();
        let token = u64_bits(lock.token());
        let changed = match &change {
            LockChange::Renew(extend) => execute(
                &ctx.conn,
                "UPDATE instances SET locked_until = ?4 \
                 WHERE id = ?1 AND lock_token = ?2 AND locked_until > ?3",
                (instance, token, now, later(now_ts, *extend)),
            )?,
            // The token goes, so the old holder is stale at once; `locked_until`
            // stays as the time the instance may be fetched again.
            LockChange::Abandon(delay) => execute(
                &ctx.conn,
                "UPDATE instances SET lock_token = NULL, locked_until = ?4 \
                 WHERE id = ?1 AND lock_token = ?2 AND locked_until > ?3",
                (instance, token, now, later(now_ts, *delay)),
            )?,
            LockChange::Suspend(reason) => execute(
                &ctx.conn,
                "UPDATE instances SET status = 'suspended', status_reason = ?4, \
                 lock_token = NULL, locked_until = NULL, updated_at = ?3 \
                 WHERE id = ?1 AND lock_token = ?2 AND locked_until > ?3",
                (instance, token, now, reason.as_str()),
            )?,
        };
        if changed == 0 {
            return Err(stale(&lock));
        }
        if matches!(change, LockChange::Abandon(_)) {
            ctx.wake(WorkKind::Orchestrations);
        }
        Ok(())
    })
    .await
}

pub(crate) async fn renew(p: &SqliteProvider, lock: &LockToken, extend: Duration) -> Result<()> {
    change_lock(p, lock, LockChange::Renew(extend)).await
}

pub(crate) async fn abandon(p: &SqliteProvider, lock: &LockToken, delay: Duration) -> Result<()> {
    change_lock(p, lock, LockChange::Abandon(delay)).await
}

pub(crate) async fn suspend(p: &SqliteProvider, lock: &LockToken, reason: &str) -> Result<()> {
    change_lock(p, lock, LockChange::Suspend(reason.to_owned())).await
}
