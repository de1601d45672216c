//! Leased work items: renewing, completing, retrying and abandoning a lease.

use std::collections::HashMap;
use std::time::Duration;

use keel_core::{Message, encode_record};
use keel_provider::{
    ActivityCompletion, ActivityRetry, ErrorKind, LeaseToken, ProviderError, Result, WorkKind,
};

use crate::convert::{check_size, col, execution, int_array, later, millis, op, u64_bits};
use crate::error::db;
use crate::provider::SqliteProvider;
use crate::writer::WriteCtx;

fn stale(lease: &LeaseToken) -> ProviderError {
    ProviderError::stale(format!("the lease on work item {}", lease.item()))
}

/// Where a lease stands.
enum Held {
    /// Held: the token matches and has not expired.
    Yes,
    /// The orchestration cancelled the item (whatever the expiry).
    Cancelled,
}

/// Checks `lease`: `Stale` unless its token matches and has not expired.
async fn check_lease(ctx: &mut WriteCtx, lease: &LeaseToken, now: i64) -> Result<Held> {
    let row = sqlx::query(
        "SELECT cancelled, visible_at FROM work_items WHERE id = ?1 AND lease_token = ?2",
    )
    .bind(u64_bits(lease.item()))
    .bind(u64_bits(lease.token()))
    .fetch_optional(&mut ctx.conn)
    .await
    .map_err(db)?
    .ok_or_else(|| stale(lease))?;
    if col::<i64>(&row, 0)? != 0 {
        return Ok(Held::Cancelled);
    }
    if col::<i64>(&row, 1)? <= now {
        return Err(stale(lease));
    }
    Ok(Held::Yes)
}

async fn delete_item(ctx: &mut WriteCtx, lease: &LeaseToken) -> Result<()> {
    sqlx::query("DELETE FROM work_items WHERE id = ?1")
        .bind(u64_bits(lease.item()))
        .execute(&mut ctx.conn)
        .await
        .map_err(db)?;
    Ok(())
}

pub(crate) async fn renew(p: &SqliteProvider, lease: &LeaseToken, extend: Duration) -> Result<()> {
    let lease = lease.clone();
    p.write(move |ctx| {
        Box::pin(async move {
            let now_ts = ctx.now();
            if let Held::Cancelled = check_lease(ctx, &lease, millis(now_ts)).await? {
                return Err(ProviderError::new(
                    ErrorKind::Cancelled,
                    format!(
                        "work item {} was cancelled by its orchestration",
                        lease.item()
                    ),
                ));
            }
            sqlx::query("UPDATE work_items SET visible_at = ?2 WHERE id = ?1")
                .bind(u64_bits(lease.item()))
                .bind(later(now_ts, extend))
                .execute(&mut ctx.conn)
                .await
                .map_err(db)?;
            Ok(())
        })
    })
    .await
}

/// A completion with its outcome message encoded and size-checked, off the writer.
#[derive(Debug)]
struct PreparedCompletion {
    lease: LeaseToken,
    /// The `ActivityDone` message for the instance.
    message: Vec<u8>,
    /// The failure, encoded, when the outcome is one: it becomes a dead letter too.
    failure: Option<Vec<u8>>,
}

pub(crate) async fn complete(
    p: &SqliteProvider,
    completions: Vec<ActivityCompletion>,
) -> Result<Vec<Result<()>>> {
    if completions.is_empty() {
        return Ok(Vec::new());
    }
    let limit = p.inner.capabilities.max_record_bytes;
    // An item's instance, execution and op never change: read them from a reader, so
    // that the outcome messages are encoded off the writer.
    let rows = sqlx::query(
        "SELECT w.id, w.instance, w.execution, w.op \
         FROM json_each(?1) AS j JOIN work_items w ON w.id = j.value",
    )
    .bind(int_array(
        completions.iter().map(|c| u64_bits(c.lease.item())),
    ))
    .fetch_all(p.readers())
    .await
    .map_err(db)?;
    let mut items = HashMap::with_capacity(rows.len());
    for row in &rows {
        let id: i64 = col(row, 0)?;
        items.insert(
            id,
            (
                col::<String>(row, 1)?,
                col::<i64>(row, 2)?,
                col::<i64>(row, 3)?,
            ),
        );
    }
    let mut results: Vec<Option<Result<()>>> = Vec::with_capacity(completions.len());
    let mut indexes = Vec::new();
    let mut prepared = Vec::new();
    for (i, completion) in completions.into_iter().enumerate() {
        let item = items.get(&u64_bits(completion.lease.item()));
        match prepare(completion, item, limit) {
            Ok(completion) => {
                indexes.push(i);
                prepared.push(completion);
                results.push(None);
            }
            Err(error) => results.push(Some(Err(error))),
        }
    }
    if !prepared.is_empty() {
        let committed = p
            .write(move |ctx| {
                Box::pin(async move {
                    let mut results = Vec::with_capacity(prepared.len());
                    for completion in prepared {
                        results.push(complete_one(ctx, completion).await?);
                    }
                    Ok(results)
                })
            })
            .await?;
        for (i, result) in indexes.into_iter().zip(committed) {
            if let Some(slot) = results.get_mut(i) {
                *slot = Some(result);
            }
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(ProviderError::new(ErrorKind::Internal, "lost"))))
        .collect())
}

fn prepare(
    completion: ActivityCompletion,
    item: Option<&(String, i64, i64)>,
    limit: usize,
) -> Result<PreparedCompletion> {
    let lease = completion.lease;
    // Gone already: completed, cancelled and dropped, or its instance deleted.
    let (instance, execution_raw, op_raw) = item.ok_or_else(|| stale(&lease))?;
    let message = Message::ActivityDone {
        execution: execution(*execution_raw)?,
        op: op(*op_raw),
        outcome: completion.outcome,
    };
    let body = encode_record(&message)?;
    check_size(
        || format!("the outcome of work item {} of {instance}", lease.item()),
        body.len(),
        limit,
    )?;
    let failure = match &message {
        Message::ActivityDone {
            outcome: Err(failure),
            ..
        } => Some(encode_record(failure)?),
        _ => None,
    };
    Ok(PreparedCompletion {
        lease,
        message: body,
        failure,
    })
}

/// Completes one leased item in one round trip: enqueues the outcome (and the dead
/// letter of a failure) while the lease is held and the item not cancelled, then
/// deletes the item if the lease is held or it was cancelled. No row back means the
/// lease is stale, and then nothing matched at all.
const COMPLETE: &str = "\
INSERT INTO messages (instance, priority, ready, visible_at, enqueued_at, body) \
 SELECT w.instance, i.priority, 1, ?3, ?3, ?4 \
 FROM work_items w JOIN instances i ON i.id = w.instance \
 WHERE w.id = ?1 AND w.lease_token = ?2 AND w.visible_at > ?3 AND w.cancelled = 0; \
INSERT INTO dead_letters (instance, execution, op, name, attempts, failure, item, recorded_at) \
 SELECT instance, execution, op, name, attempt, ?5, body, ?3 FROM work_items \
 WHERE ?5 IS NOT NULL AND id = ?1 AND lease_token = ?2 AND visible_at > ?3 \
   AND cancelled = 0; \
DELETE FROM work_items \
 WHERE id = ?1 AND lease_token = ?2 AND (visible_at > ?3 OR cancelled = 1) \
 RETURNING cancelled";

/// Completes one item. A stale lease is `Ok(Err(_))` and wrote nothing, so no
/// savepoint is needed; `Err(_)` is a failed statement, which fails the request. An
/// item cancelled while it ran is deleted and its outcome dropped.
async fn complete_one(ctx: &mut WriteCtx, completion: PreparedCompletion) -> Result<Result<()>> {
    let now = millis(ctx.now());
    let deleted = sqlx::query(COMPLETE)
        .bind(u64_bits(completion.lease.item()))
        .bind(u64_bits(completion.lease.token()))
        .bind(now)
        .bind(&completion.message)
        .bind(completion.failure.as_deref())
        .fetch_optional(&mut ctx.conn)
        .await
        .map_err(db)?;
    if deleted.is_none() {
        return Ok(Err(stale(&completion.lease)));
    }
    ctx.wake(WorkKind::Orchestrations);
    Ok(Ok(()))
}

/// Releases a held lease, the item visible again at `visible_at` with `attempt` (when
/// given). An item cancelled while it ran is dropped instead.
async fn release(
    p: &SqliteProvider,
    lease: &LeaseToken,
    delay: Duration,
    attempt: Option<u32>,
) -> Result<()> {
    let lease = lease.clone();
    p.write(move |ctx| {
        Box::pin(async move {
            let now_ts = ctx.now();
            if let Held::Cancelled = check_lease(ctx, &lease, millis(now_ts)).await? {
                return delete_item(ctx, &lease).await;
            }
            sqlx::query(
                "UPDATE work_items SET lease_token = NULL, visible_at = ?2, \
                 attempt = COALESCE(?3, attempt) WHERE id = ?1",
            )
            .bind(u64_bits(lease.item()))
            .bind(later(now_ts, delay))
            .bind(attempt.map(i64::from))
            .execute(&mut ctx.conn)
            .await
            .map_err(db)?;
            ctx.wake(WorkKind::Activities);
            Ok(())
        })
    })
    .await
}

pub(crate) async fn retry(p: &SqliteProvider, retry: ActivityRetry) -> Result<()> {
    release(p, &retry.lease, retry.delay, Some(retry.next_attempt)).await
}

pub(crate) async fn abandon(p: &SqliteProvider, lease: &LeaseToken) -> Result<()> {
    release(p, lease, Duration::ZERO, None).await
}
