//! Leased work items: renewing, completing, retrying and abandoning a lease.

use std::time::Duration;

use keel_core::{Message, encode_record};
use keel_provider::{
    ActivityCompletion, ActivityRetry, CompletedActivities, ErrorKind, FetchOrchestrations,
    LeaseToken, ProviderError, Result, WorkKind,
};

use crate::convert::{check_size, col, execution, later, millis, op, u64_bits};
use crate::dead_letter;
use crate::instance::insert_message;
use crate::orchestration::{Scope, claim};
use crate::provider::SqliteProvider;
use crate::query::{self, execute};
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
fn check_lease(ctx: &WriteCtx, lease: &LeaseToken, now: i64) -> Result<Held> {
    let (cancelled, visible_at) = query::first(
        &ctx.conn,
        "SELECT cancelled, visible_at FROM work_items WHERE id = ?1 AND lease_token = ?2",
        [u64_bits(lease.item()), u64_bits(lease.token())],
        |row| Ok((col::<i64>(row, 0)?, col::<i64>(row, 1)?)),
    )?
    .ok_or_else(|| stale(lease))?;
    if cancelled != 0 {
        return Ok(Held::Cancelled);
    }
    if visible_at <= now {
        return Err(stale(lease));
    }
    Ok(Held::Yes)
}

fn delete_item(ctx: &WriteCtx, lease: &LeaseToken) -> Result<()> {
    execute(
        &ctx.conn,
        "DELETE FROM work_items WHERE id = ?1",
        [u64_bits(lease.item())],
    )?;
    Ok(())
}

pub(crate) async fn renew(p: &SqliteProvider, lease: &LeaseToken, extend: Duration) -> Result<()> {
    let lease = lease.clone();
    p.write(move |ctx| {
        let now_ts = ctx.now();
        if let Held::Cancelled = check_lease(ctx, &lease, millis(now_ts))? {
            return Err(ProviderError::new(
                ErrorKind::Cancelled,
                format!(
                    "work item {} was cancelled by its orchestration",
                    lease.item()
                ),
            ));
        }
        execute(
            &ctx.conn,
            "UPDATE work_items SET visible_at = ?2 WHERE id = ?1",
            [u64_bits(lease.item()), later(now_ts, extend)],
        )?;
        Ok(())
    })
    .await
}

/// A completion with its outcome message encoded and size-checked.
#[derive(Debug)]
struct PreparedCompletion {
    lease: LeaseToken,
    /// The `ActivityDone` message for the instance.
    message: Vec<u8>,
    /// The failure, encoded, when the outcome is one: it becomes a dead letter too.
    failure: Option<Vec<u8>>,
}

/// Completes the items; with `lock`, also locks the instances the outcomes went to
/// (eager dispatch of their next turns).
pub(crate) async fn complete(
    p: &SqliteProvider,
    completions: Vec<ActivityCompletion>,
    lock: Option<FetchOrchestrations>,
) -> Result<CompletedActivities> {
    if completions.is_empty() {
        return Ok(CompletedActivities {
            results: Vec::new(),
            locked: Vec::new(),
        });
    }
    let limit = p.inner.capabilities.max_record_bytes;
    let max_locked = p.inner.capabilities.max_fetch_instances;
    // Each outcome is encoded on the writer, where the item's identity is one primary
    // key read away: a read on another connection first would cost a thread hop.
    p.write(move |ctx| {
        let mut results = Vec::with_capacity(completions.len());
        let mut told = Vec::new();
        for completion in completions {
            let item = query::first(
                &ctx.conn,
                "SELECT instance, execution, op FROM work_items WHERE id = ?1",
                [u64_bits(completion.lease.item())],
                |row| {
                    Ok((
                        col::<String>(row, 0)?,
                        col::<i64>(row, 1)?,
                        col::<i64>(row, 2)?,
                    ))
                },
            )?;
            let result = match prepare(completion, item, limit) {
                Ok(prepared) => complete_one(ctx, prepared)?,
                Err(error) => Err(error),
            };
            if let Ok(Some(instance)) = &result
                && !told.contains(instance)
            {
                told.push(instance.clone());
            }
            results.push(result.map(|_| ()));
        }
        let locked = match lock {
            Some(lock) => {
                let max = lock.max_instances.min(max_locked);
                let scope = Scope::Only(&told);
                claim(ctx, scope, max, lock.lock_for, lock.with_history)?
            }
            None => Vec::new(),
        };
        // Outcomes for instances left unlocked are work for the fetchers.
        if locked.len() < told.len() {
            ctx.wake(WorkKind::Orchestrations);
        }
        Ok(CompletedActivities { results, locked })
    })
    .await
}

/// Encodes and size-checks `completion`'s outcome message for `item` (its instance,
/// execution and op, as stored).
fn prepare(
    completion: ActivityCompletion,
    item: Option<(String, i64, i64)>,
    limit: usize,
) -> Result<PreparedCompletion> {
    let lease = completion.lease;
    // Gone already: completed, cancelled and dropped, or its instance deleted.
    let (instance, execution_raw, op_raw) = item.ok_or_else(|| stale(&lease))?;
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

/// Completes one item. A stale lease is `Ok(Err(_))` and wrote nothing, so no
/// savepoint is needed; `Err(_)` is a failed statement, which fails the request. An
/// item cancelled while it ran is deleted and its outcome dropped.
///
/// The item is deleted first if the lease is held (the token matches and has not
/// expired) or the item was cancelled; nothing deleted means the lease is stale. A
/// held, uncancelled item then enqueues its outcome, and a failure becomes a dead
/// letter with the item's stored bytes.
/// Completes one item; `Ok(Some(instance))` when its outcome was sent to `instance`.
fn complete_one(
    ctx: &mut WriteCtx,
    completion: PreparedCompletion,
) -> Result<Result<Option<String>>> {
    let now = millis(ctx.now());
    let deleted = query::first(
        &ctx.conn,
        "DELETE FROM work_items \
         WHERE id = ?1 AND lease_token = ?2 AND (visible_at > ?3 OR cancelled = 1) \
         RETURNING cancelled, instance, execution, op, name, attempt, body",
        [
            u64_bits(completion.lease.item()),
            u64_bits(completion.lease.token()),
            now,
        ],
        |row| {
            if col::<i64>(row, 0)? != 0 {
                return Ok(None);
            }
            Ok(Some((
                col::<String>(row, 1)?,
                col::<i64>(row, 2)?,
                col::<i64>(row, 3)?,
                col::<String>(row, 4)?,
                col::<i64>(row, 5)?,
                col::<Vec<u8>>(row, 6)?,
            )))
        },
    )?;
    let Some(deleted) = deleted else {
        return Ok(Err(stale(&completion.lease)));
    };
    let Some((instance, execution, op, name, attempts, body)) = deleted else {
        return Ok(Ok(None)); // cancelled while it ran: the outcome is dropped
    };
    insert_message(&ctx.conn, &instance, now, now, &completion.message)?;
    if let Some(failure) = &completion.failure {
        dead_letter::insert(
            &ctx.conn,
            &dead_letter::Record {
                instance: &instance,
                execution,
                op,
                name: &name,
                attempts,
                failure,
                item: Some(&body),
            },
            now,
        )?;
    }
    Ok(Ok(Some(instance)))
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
        let now_ts = ctx.now();
        if let Held::Cancelled = check_lease(ctx, &lease, millis(now_ts))? {
            return delete_item(ctx, &lease);
        }
        execute(
            &ctx.conn,
            "UPDATE work_items SET lease_token = NULL, visible_at = ?2, \
             attempt = COALESCE(?3, attempt) WHERE id = ?1",
            (
                u64_bits(lease.item()),
                later(now_ts, delay),
                attempt.map(i64::from),
            ),
        )?;
        ctx.wake(WorkKind::Activities);
        Ok(())
    })
    .await
}

pub(crate) async fn retry(p: &SqliteProvider, retry: ActivityRetry) -> Result<()> {
    release(p, &retry.lease, retry.delay, Some(retry.next_attempt)).await
}

pub(crate) async fn abandon(p: &SqliteProvider, lease: &LeaseToken) -> Result<()> {
    release(p, lease, Duration::ZERO, None).await
}
