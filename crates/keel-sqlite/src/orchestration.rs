//! The orchestrator queue: fetching instances under a lock, renewing, abandoning and
//! suspending. The ack that commits a turn is in `ack`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use keel_core::{Event, Message, decode_record};
use keel_provider::{
    FetchOrchestrations, LockToken, MessageId, OrchestrationWork, ProviderError, QueuedMessage,
    Result, WorkKind,
};

use crate::convert::{
    col, count, execution, from_bits, instance_id, int_array, later, millis, record, small, status,
    timestamp, u64_bits, uncount,
};
use crate::error::db;
use crate::provider::SqliteProvider;
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
    p.write(move |ctx| Box::pin(fetch_tx(ctx, max, request.lock_for, request.with_history)))
        .await
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

/// What was read for one candidate: its visible messages and history, or why they
/// cannot be decoded.
#[derive(Debug, Default)]
struct Loaded {
    messages: Vec<QueuedMessage>,
    history: Vec<Event>,
    corrupt: Option<ProviderError>,
}

async fn fetch_tx(
    ctx: &mut WriteCtx,
    max: usize,
    lock_for: Duration,
    with_history: bool,
) -> Result<Vec<OrchestrationWork>> {
    let now_ts = ctx.now();
    let now = millis(now_ts);
    let good = claimable(ctx, max, now, with_history).await?;
    if good.is_empty() {
        return Ok(Vec::new());
    }
    let first_token = allocate_tokens(ctx, good.len()).await?;
    let locked_until = later(now_ts, lock_for);
    sqlx::query(
        "UPDATE instances SET lock_token = ?2 + j.key, locked_until = ?3 \
         FROM json_each(?1) AS j WHERE instances.seq = j.value",
    )
    .bind(int_array(good.iter().map(|(c, _)| c.seq)))
    .bind(first_token)
    .bind(locked_until)
    .execute(&mut ctx.conn)
    .await
    .map_err(db)?;
    let mut work = Vec::with_capacity(good.len());
    for ((candidate, entry), token) in good.into_iter().zip(first_token..) {
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
async fn claimable(
    ctx: &mut WriteCtx,
    max: usize,
    now: i64,
    with_history: bool,
) -> Result<Vec<(Candidate, Loaded)>> {
    let mut good: Vec<(Candidate, Loaded)> = Vec::new();
    let mut chosen = HashSet::new();
    loop {
        // The instances chosen so far are still claimable, and first in claim order:
        // a scan after a set-aside finds them again, then the next ones.
        let candidates: Vec<Candidate> = scan(ctx, max, now)
            .await?
            .into_iter()
            .filter(|c| !chosen.contains(&c.seq))
            .take(max.saturating_sub(good.len()))
            .collect();
        if candidates.is_empty() {
            return Ok(good);
        }
        let mut loaded = load(ctx, &candidates, now, with_history).await?;
        let mut set_aside = false;
        for candidate in candidates {
            let entry = loaded.remove(&candidate.seq).unwrap_or_default();
            match entry.corrupt {
                None => {
                    chosen.insert(candidate.seq);
                    good.push((candidate, entry));
                }
                Some(error) => {
                    set_aside_undecodable(ctx, &candidate, &error, now).await?;
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
async fn set_aside_undecodable(
    ctx: &mut WriteCtx,
    candidate: &Candidate,
    error: &ProviderError,
    now: i64,
) -> Result<()> {
    if matches!(
        candidate.status.as_str(),
        "completed" | "failed" | "cancelled"
    ) {
        tracing::warn!(instance = %candidate.id, %error, "dropping undecodable messages of a finished instance");
        sqlx::query("DELETE FROM messages WHERE instance = ?1")
            .bind(&candidate.id)
            .execute(&mut ctx.conn)
            .await
            .map_err(db)?;
        return Ok(());
    }
    tracing::warn!(instance = %candidate.id, %error, "suspending an undecodable instance");
    sqlx::query(
        "UPDATE instances SET status = 'suspended', status_reason = ?2, updated_at = ?3 \
         WHERE seq = ?1",
    )
    .bind(candidate.seq)
    .bind(error.message())
    .bind(now)
    .execute(&mut ctx.conn)
    .await
    .map_err(db)?;
    Ok(())
}

/// Up to `max` instances with a visible message, not locked (or the lock expired),
/// neither paused nor suspended: highest priority first, then the oldest message.
///
/// Delayed messages that came due are marked ready first; then one index is walked in
/// claim order, a page at a time, keeping each instance's first message.
async fn scan(ctx: &mut WriteCtx, max: usize, now: i64) -> Result<Vec<Candidate>> {
    let page = count(max.saturating_mul(2).max(32) as u64);
    let mut after = (i64::MAX, i64::MIN);
    let mut seen = HashSet::new();
    let mut candidates = Vec::new();
    loop {
        let rows = sqlx::query(
            "UPDATE messages SET ready = 1 WHERE ready = 0 AND visible_at <= ?1; \
             SELECT i.seq, i.id, i.name, i.version, i.status, i.execution, i.history_len, \
                    m.priority, m.id \
             FROM messages m JOIN instances i ON i.id = m.instance \
             WHERE m.ready = 1 AND m.visible_at <= ?1 \
               AND (m.priority < ?2 OR (m.priority = ?2 AND m.id > ?3)) \
               AND (i.locked_until IS NULL OR i.locked_until <= ?1) \
               AND i.status NOT IN ('paused', 'suspended') \
             ORDER BY m.priority DESC, m.id LIMIT ?4",
        )
        .bind(now)
        .bind(after.0)
        .bind(after.1)
        .bind(page)
        .fetch_all(&mut ctx.conn)
        .await
        .map_err(db)?;
        let full = i64::try_from(rows.len()).unwrap_or(i64::MAX) >= page;
        for row in &rows {
            after = (col(row, 7)?, col(row, 8)?);
            let seq: i64 = col(row, 0)?;
            if seen.insert(seq) {
                candidates.push(Candidate {
                    seq,
                    id: col(row, 1)?,
                    name: col(row, 2)?,
                    version: col(row, 3)?,
                    status: col(row, 4)?,
                    execution: col(row, 5)?,
                    history_len: col(row, 6)?,
                });
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

/// Reads the candidates' visible messages (oldest first) and, when asked, their
/// current histories, in one round trip; decodes them. A record that does not decode
/// marks its instance corrupt, naming the record; the other candidates are unaffected.
async fn load(
    ctx: &mut WriteCtx,
    candidates: &[Candidate],
    now: i64,
    with_history: bool,
) -> Result<HashMap<i64, Loaded>> {
    let rows = sqlx::query(
        "SELECT 0, i.seq, m.id, m.enqueued_at, m.body \
         FROM json_each(?1) AS j JOIN instances i ON i.seq = j.value \
         JOIN messages m ON m.instance = i.id \
         WHERE m.ready = 1 AND m.visible_at <= ?2 ORDER BY m.id; \
         SELECT 1, i.seq, h.seq, h.execution, h.event \
         FROM json_each(?1) AS j JOIN instances i ON i.seq = j.value \
         JOIN history h ON h.instance = i.id AND h.execution = i.execution \
         WHERE ?3 ORDER BY i.seq, h.seq",
    )
    .bind(int_array(candidates.iter().map(|c| c.seq)))
    .bind(now)
    .bind(with_history)
    .fetch_all(&mut ctx.conn)
    .await
    .map_err(db)?;
    let mut loaded: HashMap<i64, Loaded> = HashMap::with_capacity(candidates.len());
    for row in &rows {
        let entry = loaded.entry(col(row, 1)?).or_default();
        if entry.corrupt.is_some() {
            continue;
        }
        // A message's id, or an event's sequence number.
        let number: i64 = col(row, 2)?;
        if col::<i64>(row, 0)? == 0 {
            let decoded = record(
                row,
                4,
                decode_record::<Message>,
                format_args!("message {number}"),
            );
            match decoded {
                Ok(message) => entry.messages.push(QueuedMessage {
                    id: MessageId(uncount(number, "a message id")?),
                    enqueued_at: timestamp(col(row, 3)?),
                    message,
                }),
                Err(error) => entry.corrupt = Some(error),
            }
        } else {
            let execution: i64 = col(row, 3)?;
            let decoded = record(
                row,
                4,
                decode_record::<Event>,
                format_args!("history event {number} of execution {execution}"),
            );
            match decoded {
                Ok(event) => entry.history.push(event),
                Err(error) => entry.corrupt = Some(error),
            }
        }
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
        Box::pin(async move {
            let now_ts = ctx.now();
            let now = millis(now_ts);
            let query = match &change {
                LockChange::Renew(extend) => sqlx::query(
                    "UPDATE instances SET locked_until = ?4 \
                     WHERE id = ?1 AND lock_token = ?2 AND locked_until > ?3",
                )
                .bind(lock.instance().as_str())
                .bind(u64_bits(lock.token()))
                .bind(now)
                .bind(later(now_ts, *extend)),
                // The token goes, so the old holder is stale at once; `locked_until`
                // stays as the time the instance may be fetched again.
                LockChange::Abandon(delay) => sqlx::query(
                    "UPDATE instances SET lock_token = NULL, locked_until = ?4 \
                     WHERE id = ?1 AND lock_token = ?2 AND locked_until > ?3",
                )
                .bind(lock.instance().as_str())
                .bind(u64_bits(lock.token()))
                .bind(now)
                .bind(later(now_ts, *delay)),
                LockChange::Suspend(reason) => sqlx::query(
                    "UPDATE instances SET status = 'suspended', status_reason = ?4, \
                     lock_token = NULL, locked_until = NULL, updated_at = ?3 \
                     WHERE id = ?1 AND lock_token = ?2 AND locked_until > ?3",
                )
                .bind(lock.instance().as_str())
                .bind(u64_bits(lock.token()))
                .bind(now)
                .bind(reason.as_str()),
            };
            let changed = query
                .execute(&mut ctx.conn)
                .await
                .map_err(db)?
                .rows_affected();
            if changed == 0 {
                return Err(stale(&lock));
            }
            if matches!(change, LockChange::Abandon(_)) {
                ctx.wake(WorkKind::Orchestrations);
            }
            Ok(())
        })
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
