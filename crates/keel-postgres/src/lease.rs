//! Leased work items: renewing, completing, retrying and abandoning a lease.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use deadpool_postgres::GenericClient;
use keel_core::{Message, encode_record};
use keel_provider::{
    ActivityCompletion, ActivityRetry, ErrorKind, LeaseToken, ProviderError, Result,
};

use crate::convert::{check_size, col, count, duration_millis, execution, int, op, u64_bits};
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

/// Completes leased items in one statement: for each item whose lease is held (or that
/// was cancelled), the first completion of it in the arrays enqueues its outcome (and
/// the dead letter of a failure) unless it was cancelled, and deletes it. Returns the
/// positions (from 1) of the completions that matched: the others are stale, and
/// nothing matched them at all. Items are locked in id order, so that concurrent
/// completions lock in one order.
const COMPLETE: &str = "\
WITH c AS (SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bytea[], $4::bytea[]) \
  WITH ORDINALITY AS c (id, token, message, failure, n)), \
locked AS ( \
  SELECT w.id, w.instance, w.execution, w.op, w.name, w.attempt, w.cancelled, c.message, \
    c.failure, c.n \
  FROM work_items w JOIN c ON w.id = c.id AND w.lease_token = c.token \
  WHERE w.visible_at > keel_now() OR w.cancelled ORDER BY w.id FOR UPDATE OF w), \
item AS (SELECT DISTINCT ON (id) * FROM locked ORDER BY id, n), \
msg AS (INSERT INTO messages (instance, priority, visible_at, enqueued_at, body) \
  SELECT w.instance, i.priority, keel_now(), keel_now(), w.message \
  FROM item w JOIN instances i ON i.id = w.instance WHERE NOT w.cancelled ORDER BY w.n), \
dead AS (INSERT INTO dead_letters (instance, execution, op, name, attempts, failure, item, \
    recorded_at) \
  SELECT w.instance, w.execution, w.op, w.name, w.attempt, w.failure, b.body, keel_now() \
  FROM item w JOIN work_item_bodies b ON b.item = w.id \
  WHERE w.failure IS NOT NULL AND NOT w.cancelled ORDER BY w.n), \
gone AS (DELETE FROM work_items WHERE id IN (SELECT id FROM item)) \
SELECT n FROM item";

pub(crate) async fn complete(
    p: &PostgresProvider,
    completions: Vec<ActivityCompletion>,
) -> Result<Vec<Result<()>>> {
    if completions.is_empty() {
        return Ok(Vec::new());
    }
    let limit = p.capabilities_ref().max_record_bytes;
    let client = p.client().await?;
    // An item's instance, execution and op never change: read them first, so that the
    // outcome messages are encoded and checked before anything is written.
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
    for (i, completion) in completions.into_iter().enumerate() {
        let item = items.get(&u64_bits(completion.lease.item()));
        match prepare(completion, item, limit) {
            Ok(completion) => {
                prepared.push((i, completion));
                results.push(Ok(()));
            }
            Err(error) => results.push(Err(error)),
        }
    }
    if prepared.is_empty() {
        return Ok(results);
    }
    let batch: Vec<(usize, &PreparedCompletion)> = prepared.iter().map(|(i, c)| (*i, c)).collect();
    match complete_batch(&client, &batch).await {
        Ok(verdicts) => {
            for ((i, _), verdict) in batch.iter().zip(verdicts) {
                results[*i] = verdict;
            }
        }
        Err(error) if batch.len() > 1 && !error.is_retryable() => {
            // Nothing was written. Alone, each completion commits or fails by itself.
            tracing::warn!(%error, completions = batch.len(), "a batch of completions failed: completing one by one");
            for &(i, completion) in &batch {
                results[i] = match complete_batch(&client, &[(i, completion)]).await {
                    Ok(mut verdicts) => verdicts.pop().unwrap_or(Ok(())),
                    Err(error) => Err(error),
                };
            }
        }
        Err(error) => return Err(error),
    }
    Ok(results)
}

/// Completes a batch in one statement (atomic on its own); returns one verdict per
/// completion, in order. An error means nothing was written.
async fn complete_batch<C: GenericClient>(
    client: &C,
    batch: &[(usize, &PreparedCompletion)],
) -> Result<Vec<Result<()>>> {
    let items: Vec<i64> = batch
        .iter()
        .map(|(_, c)| u64_bits(c.lease.item()))
        .collect();
    let tokens: Vec<i64> = batch
        .iter()
        .map(|(_, c)| u64_bits(c.lease.token()))
        .collect();
    let messages: Vec<&[u8]> = batch.iter().map(|(_, c)| c.message.as_slice()).collect();
    let failures: Vec<Option<&[u8]>> = batch.iter().map(|(_, c)| c.failure.as_deref()).collect();
    let rows = query(client, COMPLETE, &[&items, &tokens, &messages, &failures]).await?;
    let mut done = HashSet::with_capacity(rows.len());
    for row in &rows {
        done.insert(col::<i64>(row, 0)?);
    }
    Ok(batch
        .iter()
        .enumerate()
        .map(|(n, (_, completion))| {
            if done.contains(&count(n as u64 + 1)) {
                Ok(())
            } else {
                Err(stale(&completion.lease))
            }
        })
        .collect())
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
