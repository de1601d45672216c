//! Leased work items: renewing, completing, retrying and abandoning a lease.

use std::collections::HashMap;
use std::time::Duration;

use keel_core::{Message, encode_record};
use keel_provider::{
    ActivityCompletion, ActivityRetry, ErrorKind, LeaseToken, ProviderError, Result,
};

use crate::convert::{check_size, col, duration_millis, execution, int, op, u64_bits};
use crate::error::db;
use crate::provider::PostgresProvider;
use crate::statement::{query, query_opt};

fn stale(lease: &LeaseToken) -> ProviderError {
    ProviderError::stale(format!("the lease on work item {}", lease.item()))
}

fn cancelled(lease: &LeaseToken) -> ProviderError {
    ProviderError::new(
        ErrorKind::Cancelled,
        format!(
            "work item {} was cancelled by its orchestration",
            lease.item()
        ),
    )
}

/// Extends a held lease; `Cancelled` once the orchestration cancelled the item
/// (whatever the expiry), `Stale` if the lease expired or was taken over.
pub(crate) async fn renew(
    p: &PostgresProvider,
    lease: &LeaseToken,
    extend: Duration,
) -> Result<()> {
    let client = p.client().await?;
    let row = query_opt(
        &client,
        "UPDATE work_items SET visible_at = CASE WHEN cancelled THEN visible_at \
           ELSE keel_now() + $3 END \
         WHERE id = $1 AND lease_token = $2 AND (cancelled OR visible_at > keel_now()) \
         RETURNING cancelled",
        &[
            &u64_bits(lease.item()),
            &u64_bits(lease.token()),
            &duration_millis(extend),
        ],
    )
    .await?
    .ok_or_else(|| stale(lease))?;
    if col::<bool>(&row, 0)? {
        return Err(cancelled(lease));
    }
    Ok(())
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

/// Completes one leased item in one statement: while the lease is held and the item
/// not cancelled, enqueues the outcome (and the dead letter of a failure); deletes the
/// item if the lease is held or it was cancelled. No row back means the lease is
/// stale, and then nothing matched at all.
const COMPLETE: &str = "\
WITH item AS ( \
  SELECT id, instance, execution, op, name, attempt, cancelled FROM work_items \
  WHERE id = $1 AND lease_token = $2 AND (visible_at > keel_now() OR cancelled) FOR UPDATE), \
msg AS (INSERT INTO messages (instance, priority, visible_at, enqueued_at, body) \
  SELECT w.instance, i.priority, keel_now(), keel_now(), $3 \
  FROM item w JOIN instances i ON i.id = w.instance WHERE NOT w.cancelled), \
dead AS (INSERT INTO dead_letters (instance, execution, op, name, attempts, failure, item, \
    recorded_at) \
  SELECT w.instance, w.execution, w.op, w.name, w.attempt, $4, b.body, keel_now() \
  FROM item w JOIN work_item_bodies b ON b.item = w.id \
  WHERE $4::bytea IS NOT NULL AND NOT w.cancelled), \
gone AS (DELETE FROM work_items WHERE id IN (SELECT id FROM item)) \
SELECT cancelled FROM item";

pub(crate) async fn complete(
    p: &PostgresProvider,
    completions: Vec<ActivityCompletion>,
) -> Result<Vec<Result<()>>> {
    if completions.is_empty() {
        return Ok(Vec::new());
    }
    let limit = p.capabilities_ref().max_record_bytes;
    let mut client = p.client().await?;
    // An item's instance, execution and op never change: read them first, so that the
    // outcome messages are encoded and checked before the transaction begins.
    let ids: Vec<i64> = completions
        .iter()
        .map(|c| u64_bits(c.lease.item()))
        .collect();
    let rows = query(
        &client,
        "SELECT id, instance, execution, op FROM work_items WHERE id = ANY($1)",
        &[&ids],
    )
    .await?;
    let mut items = HashMap::with_capacity(rows.len());
    for row in &rows {
        items.insert(
            col::<i64>(row, 0)?,
            (
                col::<String>(row, 1)?,
                col::<i32>(row, 2)?,
                col::<i64>(row, 3)?,
            ),
        );
    }
    let mut results = Vec::with_capacity(completions.len());
    let mut prepared = Vec::with_capacity(completions.len());
    for completion in completions {
        let item = items.get(&u64_bits(completion.lease.item()));
        match prepare(completion, item, limit) {
            Ok(completion) => {
                prepared.push(Some(completion));
                results.push(Ok(()));
            }
            Err(error) => {
                prepared.push(None);
                results.push(Err(error));
            }
        }
    }
    if prepared.iter().all(Option::is_none) {
        return Ok(results);
    }
    let mut tx = client.transaction().await.map_err(db)?;
    for (completion, result) in prepared.iter().zip(results.iter_mut()) {
        let Some(completion) = completion else {
            continue;
        };
        let savepoint = tx.savepoint("keel_complete").await.map_err(db)?;
        let done = query_opt(
            &savepoint,
            COMPLETE,
            &[
                &u64_bits(completion.lease.item()),
                &u64_bits(completion.lease.token()),
                &completion.message,
                &completion.failure,
            ],
        )
        .await;
        match done {
            Ok(Some(_)) => savepoint.commit().await.map_err(db)?,
            Ok(None) => {
                savepoint.rollback().await.map_err(db)?;
                *result = Err(stale(&completion.lease));
            }
            Err(error) => {
                savepoint.rollback().await.map_err(db)?;
                *result = Err(error);
            }
        }
    }
    tx.commit().await.map_err(db)?;
    Ok(results)
}

fn prepare(
    completion: ActivityCompletion,
    item: Option<&(String, i32, i64)>,
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

/// Releases a held lease, the item visible again after `delay` with `attempt` (when
/// given), and tells dispatchers everywhere; an item cancelled while it ran is deleted
/// instead. One statement: `Stale` when the lease is not held, changing nothing.
async fn release(
    p: &PostgresProvider,
    lease: &LeaseToken,
    delay: Duration,
    attempt: Option<u32>,
) -> Result<()> {
    let client = p.client().await?;
    let rows = query(
        &client,
        "WITH item AS (SELECT id, cancelled FROM work_items \
           WHERE id = $1 AND lease_token = $2 AND (cancelled OR visible_at > keel_now()) \
           FOR UPDATE), \
         gone AS (DELETE FROM work_items WHERE id IN (SELECT id FROM item WHERE cancelled)), \
         back AS (UPDATE work_items SET lease_token = NULL, visible_at = keel_now() + $3, \
           attempt = COALESCE($4, attempt) \
           WHERE id IN (SELECT id FROM item WHERE NOT cancelled)) \
         SELECT pg_notify($5, '')::text FROM item",
        &[
            &u64_bits(lease.item()),
            &u64_bits(lease.token()),
            &duration_millis(delay),
            &attempt.map(int),
            &p.inner.channels.activities,
        ],
    )
    .await?;
    if rows.is_empty() {
        return Err(stale(lease));
    }
    Ok(())
}

pub(crate) async fn retry(p: &PostgresProvider, retry: ActivityRetry) -> Result<()> {
    release(p, &retry.lease, retry.delay, Some(retry.next_attempt)).await
}

pub(crate) async fn abandon(p: &PostgresProvider, lease: &LeaseToken) -> Result<()> {
    release(p, lease, Duration::ZERO, None).await
}
