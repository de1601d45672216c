//! Leased work items: renewing, completing, retrying and abandoning a lease.

use std::time::Duration;

use keel_core::{Message, encode_record};
use keel_provider::{
    ActivityCompletion, ActivityRetry, ErrorKind, LeaseToken, ProviderError, Result, WorkKind,
};

use crate::convert::{check_size, col, execution, later, millis, op, u64_bits};
use crate::dead_letter;
use crate::error::db;
use crate::instance;
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

pub(crate) async fn complete(
    p: &SqliteProvider,
    completions: Vec<ActivityCompletion>,
) -> Result<Vec<Result<()>>> {
    if completions.is_empty() {
        return Ok(Vec::new());
    }
    let limit = p.inner.capabilities.max_record_bytes;
    p.write_each(completions, move |ctx, completion| {
        Box::pin(complete_one(ctx, completion, limit))
    })
    .await
}

/// Deletes a leased item and enqueues its outcome; the caller's savepoint undoes it
/// on error.
async fn complete_one(
    ctx: &mut WriteCtx,
    completion: ActivityCompletion,
    limit: usize,
) -> Result<()> {
    let now = millis(ctx.now());
    let lease = completion.lease;
    let row = sqlx::query(
        "SELECT instance, execution, op, name, attempt, visible_at, cancelled, body \
         FROM work_items WHERE id = ?1 AND lease_token = ?2",
    )
    .bind(u64_bits(lease.item()))
    .bind(u64_bits(lease.token()))
    .fetch_optional(&mut ctx.conn)
    .await
    .map_err(db)?
    .ok_or_else(|| stale(&lease))?;
    if col::<i64>(&row, 6)? != 0 {
        // Cancelled while it ran: the orchestration no longer waits for the outcome.
        return delete_item(ctx, &lease).await;
    }
    if col::<i64>(&row, 5)? <= now {
        return Err(stale(&lease));
    }
    let instance: String = col(&row, 0)?;
    let execution_raw: i64 = col(&row, 1)?;
    let op_raw: i64 = col(&row, 2)?;
    let message = Message::ActivityDone {
        execution: execution(execution_raw)?,
        op: op(op_raw),
        outcome: completion.outcome,
    };
    let body = encode_record(&message)?;
    check_size(
        || format!("the outcome of work item {} of {instance}", lease.item()),
        body.len(),
        limit,
    )?;
    delete_item(ctx, &lease).await?;
    instance::insert_message(&mut ctx.conn, &instance, now, now, &body).await?;
    if let Message::ActivityDone {
        outcome: Err(failure),
        ..
    } = &message
    {
        dead_letter::insert(
            &mut ctx.conn,
            &dead_letter::Record {
                instance: &instance,
                execution: execution_raw,
                op: op_raw,
                name: &col::<String>(&row, 3)?,
                attempts: col(&row, 4)?,
                failure,
                item: Some(&col::<Vec<u8>>(&row, 7)?),
            },
            now,
        )
        .await?;
    }
    ctx.wake(WorkKind::Orchestrations);
    Ok(())
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
