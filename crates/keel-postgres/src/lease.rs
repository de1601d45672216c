//! Leased work items: renewing, completing, retrying and abandoning a lease.
//!
//! A completion that locks for its caller the instances it tells (eager dispatch) does
//! so in its own statement, by the lock every claim takes ([`lock_wanted`]), and reads
//! their messages in that statement too, so that it costs one round trip.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use deadpool_postgres::GenericClient;
use keel_core::{Message, encode_record};
use keel_provider::{
    ActivityCompletion, ActivityRetry, CompletedActivities, ErrorKind, FetchOrchestrations,
    LeaseToken, LeasedWorkItem, ProviderError, Result,
};
use tokio_postgres::types::ToSql;

use crate::convert::{
    check_size, col, count, duration_millis, execution, execution_col, int, op, u64_bits,
};
use crate::orchestration::{self, Claimed, lock_wanted};
use crate::provider::PostgresProvider;
use crate::statement::{query, query_opt};

/// An item's instance, execution and op, as stored.
type Identity = (String, i32, i64);

/// How many identities [`Identities`] holds before it starts afresh.
const REMEMBERED: usize = 65_536;

/// The identities of the items this provider leased, by item id: they never change, so
/// completing one of them needs no read of its row first. Forgotten as the items are
/// completed or released; bounded, since a lease that expired may end in another
/// process, and then its item is never forgotten here.
#[derive(Debug, Default)]
pub(crate) struct Identities(Mutex<HashMap<i64, Identity>>);

impl Identities {
    /// Remembers the identities of items just leased.
    pub(crate) fn remember(&self, leased: &[LeasedWorkItem]) {
        let mut known = self.known();
        if known.len().saturating_add(leased.len()) > REMEMBERED {
            known.clear();
        }
        for leased in leased {
            let item = &leased.item;
            known.insert(
                u64_bits(leased.lease.item()),
                (
                    item.instance.as_str().to_owned(),
                    execution_col(item.execution),
                    u64_bits(item.op.get()),
                ),
            );
        }
    }

    fn recall(&self, item: i64) -> Option<Identity> {
        self.known().get(&item).cloned()
    }

    fn forget(&self, items: impl IntoIterator<Item = i64>) {
        let mut known = self.known();
        for item in items {
            known.remove(&item);
        }
    }

    fn known(&self) -> MutexGuard<'_, HashMap<i64, Identity>> {
        // Every change is complete at each await-free step: a panic cannot leave it
        // half-done.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

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
/// the dead letter of a failure) unless it was cancelled, and deletes it. Items are
/// locked in id order, so that concurrent completions lock in one order. The outcome
/// messages (`msg`) come last, for [`COMPLETE`] and [`COMPLETE_LOCKING`] to end.
macro_rules! completing {
    () => {
        "WITH c AS (SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bytea[], $4::bytea[]) \
          WITH ORDINALITY AS c (id, token, message, failure, n)), \
        held AS ( \
          SELECT w.id, w.instance, w.execution, w.op, w.name, w.attempt, w.cancelled, \
            c.message, c.failure, c.n \
          FROM work_items w JOIN c ON w.id = c.id AND w.lease_token = c.token \
          WHERE w.visible_at > keel_now() OR w.cancelled ORDER BY w.id FOR UPDATE OF w), \
        item AS (SELECT DISTINCT ON (id) * FROM held ORDER BY id, n), \
        dead AS (INSERT INTO dead_letters (instance, execution, op, name, attempts, failure, \
            item, recorded_at) \
          SELECT w.instance, w.execution, w.op, w.name, w.attempt, w.failure, b.body, \
            keel_now() \
          FROM item w JOIN work_item_bodies b ON b.item = w.id \
          WHERE w.failure IS NOT NULL AND NOT w.cancelled ORDER BY w.n), \
        gone AS (DELETE FROM work_items WHERE id IN (SELECT id FROM item)), \
        msg AS (INSERT INTO messages (instance, priority, visible_at, enqueued_at, body) \
          SELECT w.instance, i.priority, keel_now(), keel_now(), w.message \
          FROM item w JOIN instances i ON i.id = w.instance WHERE NOT w.cancelled \
          ORDER BY w.n"
    };
}

/// Completes leased items ([`completing`]); returns the positions (from 1) of the
/// completions that matched: the others are stale, and nothing matched them at all.
const COMPLETE: &str = concat!(completing!(), ") SELECT n FROM item");

/// Completes leased items as [`COMPLETE`] does and locks for `$6` milliseconds up to `$5`
/// of the instances the outcomes went to, in completion order ([`lock_wanted`]): each
/// has a visible message, its outcome. It reads their visible messages itself, which
/// the statement's snapshot shows (those it enqueues come from `msg`), so it locks only
/// instances whose row is the version that snapshot shows: one that an ack committed
/// since changed (the lock then re-checks the new version) may have had messages
/// consumed that the snapshot still shows, and is left to fetches. The first row always
/// comes, with the positions of the completions that matched and the database's now;
/// the locked instances fill the rest of the rows, in completion order, with their
/// messages' ids, enqueue times and bodies as arrays, oldest first.
const COMPLETE_LOCKING: &str = concat!(
    completing!(),
    " RETURNING instance, id, enqueued_at, body), \
    wanted AS ( \
      SELECT instance, min(n) AS n FROM item WHERE NOT cancelled \
      GROUP BY instance ORDER BY min(n)), ",
    lock_wanted!(
        "$5",
        "$6",
        "WHERE i.xmin = (SELECT s.xmin FROM instances s WHERE s.id = w.instance)"
    ),
    " SELECT s.done, s.now, l.id, l.name, l.version, l.status, l.execution, l.history_len, \
      l.lock_token, l.locked_until, 0::bigint AS first, v.ids, v.enqueued, v.bodies \
    FROM (SELECT ARRAY(SELECT n FROM item) AS done, keel_now() AS now) s \
    LEFT JOIN (locked l JOIN claimed c ON c.instance = l.id \
      CROSS JOIN LATERAL ( \
        SELECT array_agg(u.id ORDER BY u.id) AS ids, \
          array_agg(u.enqueued_at ORDER BY u.id) AS enqueued, \
          array_agg(u.body ORDER BY u.id) AS bodies \
        FROM (SELECT m.id, m.enqueued_at, m.body FROM messages m \
            WHERE m.instance = l.id AND m.visible_at <= keel_now() \
          UNION ALL SELECT o.id, o.enqueued_at, o.body FROM msg o \
            WHERE o.instance = l.id) u) v) ON true \
    ORDER BY c.n NULLS FIRST"
);

/// What completions may lock for their caller (eager dispatch): this many more
/// instances, for this long.
#[derive(Debug, Clone, Copy)]
struct Locking {
    left: usize,
    lock_for: i64,
}

/// Completes the items; with `lock`, also locks for the caller the instances the
/// outcomes went to that it allows (eager dispatch of their next turns).
pub(crate) async fn complete(
    p: &PostgresProvider,
    completions: Vec<ActivityCompletion>,
    lock: Option<FetchOrchestrations>,
) -> Result<CompletedActivities> {
    let mut done = CompletedActivities {
        results: Vec::new(),
        locked: Vec::new(),
    };
    if completions.is_empty() {
        return Ok(done);
    }
    let capabilities = p.capabilities_ref();
    let limit = capabilities.max_record_bytes;
    let with_history = lock.as_ref().is_some_and(|lock| lock.with_history);
    let mut locking = lock
        .map(|lock| Locking {
            left: lock.max_instances.min(capabilities.max_fetch_instances),
            lock_for: duration_millis(lock.lock_for),
        })
        .filter(|locking| locking.left > 0);
    let client = p.client().await?;
    // An item's instance, execution and op never change: known already for the items
    // this provider leased, read first for the others, so that the outcome messages are
    // encoded and checked before anything is written.
    let identities = &p.inner.identities;
    let ids: Vec<i64> = completions
        .iter()
        .map(|c| u64_bits(c.lease.item()))
        .collect();
    let mut items = HashMap::with_capacity(ids.len());
    let mut unknown = Vec::new();
    for &id in &ids {
        match identities.recall(id) {
            Some(identity) => {
                items.insert(id, identity);
            }
            None => unknown.push(id),
        }
    }
    if !unknown.is_empty() {
        let rows = query(
            &client,
            "SELECT id, instance, execution, op FROM work_items WHERE id = ANY($1)",
            &[&unknown],
        )
        .await?;
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
    }
    let results = &mut done.results;
    results.reserve(completions.len());
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
        return Ok(done);
    }
    let batch: Vec<(usize, &PreparedCompletion)> = prepared.iter().map(|(i, c)| (*i, c)).collect();
    let mut claimed = Vec::new();
    match complete_batch(&client, &batch, locking).await {
        Ok((verdicts, mine)) => {
            for ((i, _), verdict) in batch.iter().zip(verdicts) {
                results[*i] = verdict;
            }
            claimed = mine;
        }
        Err(error) if batch.len() > 1 && !error.is_retryable() => {
            // Nothing was written. Alone, each completion commits or fails by itself.
            tracing::warn!(%error, completions = batch.len(), "a batch of completions failed: completing one by one");
            for &(i, completion) in &batch {
                results[i] = match complete_batch(&client, &[(i, completion)], locking).await {
                    Ok((mut verdicts, mut mine)) => {
                        if let Some(locking) = locking.as_mut() {
                            locking.left = locking.left.saturating_sub(mine.len());
                        }
                        claimed.append(&mut mine);
                        verdicts.pop().unwrap_or(Ok(()))
                    }
                    Err(error) => Err(error),
                };
            }
        }
        Err(error) => return Err(error),
    }
    // Completed, or gone: their identities are of no further use.
    identities.forget(
        ids.iter()
            .zip(&done.results)
            .filter(|(_, result)| result.as_ref().err().is_none_or(ProviderError::is_stale))
            .map(|(id, _)| *id),
    );
    done.locked = orchestration::deliver_claimed(p, &client, claimed, with_history).await;
    Ok(done)
}

/// Completes a batch in one statement (atomic on its own), locking what `locking`
/// allows of the instances told; returns one verdict per completion, in order, and the
/// instances locked, in completion order. An error means nothing was written.
async fn complete_batch<C: GenericClient>(
    client: &C,
    batch: &[(usize, &PreparedCompletion)],
    locking: Option<Locking>,
) -> Result<(Vec<Result<()>>, Vec<Claimed>)> {
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
    let mut done = HashSet::with_capacity(batch.len());
    let mut claimed = Vec::new();
    if let Some(locking) = locking {
        let max = count(locking.left as u64);
        let params: [&(dyn ToSql + Sync); 6] = [
            &items,
            &tokens,
            &messages,
            &failures,
            &max,
            &locking.lock_for,
        ];
        let rows = query(client, COMPLETE_LOCKING, &params).await?;
        if let Some(first) = rows.first() {
            done.extend(col::<Vec<i64>>(first, 0)?);
            let now: i64 = col(first, 1)?;
            for row in &rows {
                if let Some(instance) = Claimed::from_row(row, 2, now)? {
                    claimed.push(instance.with_messages(row, 11)?);
                }
            }
        }
    } else {
        let rows = query(client, COMPLETE, &[&items, &tokens, &messages, &failures]).await?;
        for row in &rows {
            done.insert(col::<i64>(row, 0)?);
        }
    }
    let verdicts = batch
        .iter()
        .enumerate()
        .map(|(n, (_, completion))| {
            if done.contains(&count(n as u64 + 1)) {
                Ok(())
            } else {
                Err(stale(&completion.lease))
            }
        })
        .collect();
    Ok((verdicts, claimed))
}

fn prepare(
    completion: ActivityCompletion,
    item: Option<&Identity>,
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
    p.inner.identities.forget([u64_bits(lease.item())]);
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
