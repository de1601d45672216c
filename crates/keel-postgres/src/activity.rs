//! The activity queue: enqueueing work items, and leasing them under their names'
//! limits.

use std::collections::{HashMap, HashSet};

use deadpool_postgres::{GenericClient, Transaction};
use keel_core::{Failure, WorkItem, decode_record, encode_record};
use keel_provider::{
    ActivityLimits, FetchActivities, LeaseToken, LeasedWorkItem, ProviderError, Result, WorkKind,
};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::convert::{
    check_size, col, duration_millis, execution_col, from_bits, int, record, small, timestamp,
    u64_bits,
};
use crate::dead_letter;
use crate::error::db;
use crate::provider::PostgresProvider;
use crate::statement::{execute, query};

/// The rate limit's window, in milliseconds.
const WINDOW_MILLIS: i64 = 1_000;

/// Work items ready to insert, encoded and size-checked, as the columns of one
/// `unnest`.
#[derive(Debug, Default)]
pub(crate) struct PreparedItems {
    instance: Vec<String>,
    execution: Vec<i32>,
    op: Vec<i64>,
    name: Vec<String>,
    queue: Vec<String>,
    priority: Vec<i32>,
    attempt: Vec<i32>,
    body: Vec<Vec<u8>>,
}

impl PreparedItems {
    /// Encodes `items`, checking each against `limit`.
    pub(crate) fn new(items: &[WorkItem], limit: usize) -> Result<Self> {
        let mut prepared = Self::default();
        for item in items {
            let body = encode_record(item)?;
            check_size(
                || format!("work item {} of {}", item.name, item.instance),
                body.len(),
                limit,
            )?;
            prepared.instance.push(item.instance.as_str().to_owned());
            prepared.execution.push(execution_col(item.execution));
            prepared.op.push(u64_bits(item.op.get()));
            prepared.name.push(item.name.clone());
            prepared.queue.push(item.options.queue.as_str().to_owned());
            prepared.priority.push(item.options.priority);
            prepared.attempt.push(int(item.attempt));
            prepared.body.push(body);
        }
        Ok(prepared)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.body.is_empty()
    }

    /// Adds copies of `other`'s items after these.
    pub(crate) fn extend(&mut self, other: &Self) {
        self.instance.extend_from_slice(&other.instance);
        self.execution.extend_from_slice(&other.execution);
        self.op.extend_from_slice(&other.op);
        self.name.extend_from_slice(&other.name);
        self.queue.extend_from_slice(&other.queue);
        self.priority.extend_from_slice(&other.priority);
        self.attempt.extend_from_slice(&other.attempt);
        self.body.extend_from_slice(&other.body);
    }

    /// The parameters of [`INSERT_ITEMS`].
    pub(crate) fn params(&self) -> [&(dyn ToSql + Sync); 8] {
        [
            &self.instance,
            &self.execution,
            &self.op,
            &self.name,
            &self.queue,
            &self.priority,
            &self.attempt,
            &self.body,
        ]
    }
}

/// Enqueues prepared items, visible now, in order. Ids come from the sequence first,
/// so that the narrow queue row and its body are inserted by one statement. The
/// parameters are [`PreparedItems::params`].
pub(crate) const INSERT_ITEMS: &str = "\
WITH src AS MATERIALIZED ( \
  SELECT nextval('work_item_ids') AS id, u.* FROM unnest($1::text[], $2::integer[], \
    $3::bigint[], $4::text[], $5::text[], $6::integer[], $7::integer[], $8::bytea[]) \
    WITH ORDINALITY AS u (instance, execution, op, name, queue, priority, attempt, \
    body, n) ORDER BY u.n), \
items AS (INSERT INTO work_items (id, instance, execution, op, name, queue, priority, \
  attempt, visible_at, created_at) \
  SELECT id, instance, execution, op, name, queue, priority, attempt, keel_now(), \
    keel_now() FROM src ORDER BY n) \
INSERT INTO work_item_bodies (item, body) SELECT id, body FROM src";

/// Enqueues prepared items, visible now, in order.
pub(crate) async fn insert_items<C: GenericClient>(
    client: &C,
    items: &PreparedItems,
) -> Result<()> {
    execute(client, INSERT_ITEMS, &items.params()).await?;
    Ok(())
}

/// The limits of one name and how much of them is in use, as this claim sees it.
#[derive(Debug)]
struct Budget {
    limits: ActivityLimits,
    running: u32,
    recent: u32,
}

impl Budget {
    fn take(&mut self) -> bool {
        let allowed = self
            .limits
            .max_concurrent
            .is_none_or(|max| self.running < max)
            && self
                .limits
                .max_per_second
                .is_none_or(|max| self.recent < max);
        if allowed {
            self.running = self.running.saturating_add(1);
            self.recent = self.recent.saturating_add(1);
        }
        allowed
    }
}

/// One page of visible items of the queues, in claim order, locked by this
/// transaction (`SKIP LOCKED`: items another claim holds are passed over).
const SCAN: &str = "\
SELECT w.id, w.name, w.priority, l.name IS NOT NULL, keel_now() \
FROM work_items w LEFT JOIN activity_limits l ON l.name = w.name \
WHERE w.queue = ANY($1) AND NOT w.cancelled AND w.visible_at <= keel_now() \
  AND (w.priority < $2 OR (w.priority = $2 AND w.id > $3)) \
ORDER BY w.priority DESC, w.id LIMIT $4 \
FOR UPDATE OF w SKIP LOCKED";

pub(crate) async fn fetch(
    p: &PostgresProvider,
    request: FetchActivities,
) -> Result<Vec<LeasedWorkItem>> {
    let max = request.max_items.min(p.capabilities_ref().max_fetch_items);
    if max == 0 || request.queues.is_empty() {
        return Ok(Vec::new());
    }
    let mut queues: Vec<String> = request
        .queues
        .iter()
        .map(|q| q.as_str().to_owned())
        .collect();
    queues.sort();
    queues.dedup();
    let mut client = p.client().await?;
    let tx = client.transaction().await.map_err(db)?;
    // Cancelled items whose lease ran out will never be completed.
    execute(
        &tx,
        "DELETE FROM work_items WHERE id IN (SELECT id FROM work_items \
         WHERE cancelled AND visible_at <= keel_now() FOR UPDATE SKIP LOCKED)",
        &[],
    )
    .await?;
    let (picked, rated, now) = pick(&tx, &queues, max).await?;
    p.inner.wake.fetched(WorkKind::Activities, now);
    if picked.is_empty() {
        tx.commit().await.map_err(db)?;
        return Ok(Vec::new());
    }
    let rows = query(
        &tx,
        "UPDATE work_items w SET lease_token = nextval('tokens'), \
           visible_at = keel_now() + $2, deliveries = w.deliveries + 1 \
         FROM work_item_bodies b WHERE w.id = ANY($1) AND b.item = w.id \
         RETURNING w.id, w.lease_token, w.instance, w.execution, w.op, w.name, w.attempt, \
           w.deliveries, b.body, w.visible_at",
        &[&picked, &duration_millis(request.lease_for)],
    )
    .await?;
    if !rated.is_empty() {
        execute(
            &tx,
            "INSERT INTO lease_starts (name, started_at) \
             SELECT name, keel_now() FROM unnest($1::text[]) AS u (name)",
            &[&rated],
        )
        .await?;
    }
    let mut by_id: HashMap<i64, Row> = HashMap::with_capacity(rows.len());
    for row in rows {
        by_id.insert(col(&row, 0)?, row);
    }
    let mut leased = Vec::with_capacity(picked.len());
    for id in picked {
        let Some(row) = by_id.remove(&id) else {
            continue;
        };
        let decoded = record(
            &row,
            8,
            decode_record::<WorkItem>,
            format!("work item {id}"),
        );
        let item = match decoded {
            Ok(mut item) => {
                // The column is the truth: retries update it without re-encoding.
                item.attempt = small(col(&row, 6)?, "attempt")?;
                item
            }
            Err(error) => {
                dead_letter_corrupt(&tx, &row, id, &error).await?;
                continue;
            }
        };
        leased.push(LeasedWorkItem {
            lease: LeaseToken::new(from_bits(id), from_bits(col(&row, 1)?)),
            leased_until: timestamp(col(&row, 9)?),
            item,
            deliveries: small(col(&row, 7)?, "deliveries")?,
        });
    }
    tx.commit().await.map_err(db)?;
    Ok(leased)
}

/// Chooses up to `max` visible items of `queues`, highest priority then oldest,
/// within their names' limits; returns their ids, the names of rate-limited ones (one
/// entry per item, to record their lease starts), and the database's now.
///
/// A limited name's limits row is locked (`FOR UPDATE`) before its leases are counted,
/// so concurrent claims of one name take turns: the second counts, under READ
/// COMMITTED, with a snapshot taken after the first committed. No count-then-claim race.
async fn pick(
    tx: &Transaction<'_>,
    queues: &[String],
    max: usize,
) -> Result<(Vec<i64>, Vec<String>, i64)> {
    let page = i64::try_from(max.saturating_mul(2).max(32)).unwrap_or(i64::MAX);
    let mut after: (i32, i64) = (i32::MAX, i64::MIN);
    let mut budgets: HashMap<String, Option<Budget>> = HashMap::new();
    let mut picked = Vec::new();
    let mut rated = Vec::new();
    let mut now = 0;
    loop {
        let rows = query(tx, SCAN, &[&queues, &after.0, &after.1, &page]).await?;
        let mut limited: Vec<String> = Vec::new();
        let mut seen = HashSet::new();
        for row in &rows {
            now = col(row, 4)?;
            let name: String = col(row, 1)?;
            if col::<bool>(row, 3)? && !budgets.contains_key(&name) && seen.insert(name.clone()) {
                limited.push(name);
            }
        }
        if !limited.is_empty() {
            limited.sort();
            load_budgets(tx, &limited, &mut budgets).await?;
        }
        for row in &rows {
            after = (col(row, 2)?, col(row, 0)?);
            if picked.len() >= max {
                break;
            }
            let name: String = col(row, 1)?;
            // A name without limits (or whose limits were removed since the scan)
            // has nothing to respect.
            if let Some(Some(budget)) = budgets.get_mut(&name) {
                if !budget.take() {
                    continue;
                }
                if budget.limits.max_per_second.is_some() {
                    rated.push(name);
                }
            }
            picked.push(col(row, 0)?);
        }
        if picked.len() >= max || i64::try_from(rows.len()).unwrap_or(0) < page {
            break;
        }
    }
    if now == 0 {
        let rows = query(tx, "SELECT keel_now()", &[]).await?;
        if let Some(row) = rows.first() {
            now = col(row, 0)?;
        }
    }
    Ok((picked, rated, now))
}

/// Locks the limits rows of `names` (sorted, so that claims lock them in one order),
/// then counts what is in use: unexpired leases, and lease starts within the last
/// second (forgetting older starts).
async fn load_budgets(
    tx: &Transaction<'_>,
    names: &[String],
    budgets: &mut HashMap<String, Option<Budget>>,
) -> Result<()> {
    let limits = query(
        tx,
        "SELECT name, max_concurrent, max_per_second FROM activity_limits \
         WHERE name = ANY($1) ORDER BY name FOR UPDATE",
        &[&names],
    )
    .await?;
    for name in names {
        budgets.insert(name.clone(), None);
    }
    let limit = |v: Option<i32>| v.map(|v| small(v, "an activity limit")).transpose();
    for row in &limits {
        let budget = Budget {
            limits: ActivityLimits {
                max_concurrent: limit(col(row, 1)?)?,
                max_per_second: limit(col(row, 2)?)?,
            },
            running: 0,
            recent: 0,
        };
        budgets.insert(col(row, 0)?, Some(budget));
    }
    // Each statement of a READ COMMITTED transaction sees what committed before it
    // began: after the locks above, every earlier claim of these names.
    let running = query(
        tx,
        "SELECT name, count(*) FROM work_items \
         WHERE name = ANY($1) AND lease_token IS NOT NULL AND visible_at > keel_now() \
         GROUP BY name",
        &[&names],
    )
    .await?;
    for row in &running {
        let name: String = col(row, 0)?;
        if let Some(Some(budget)) = budgets.get_mut(&name) {
            budget.running = u32::try_from(col::<i64>(row, 1)?).unwrap_or(u32::MAX);
        }
    }
    let recent = query(
        tx,
        "WITH old AS (DELETE FROM lease_starts \
           WHERE name = ANY($1) AND started_at <= keel_now() - $2) \
         SELECT name, count(*) FROM lease_starts \
         WHERE name = ANY($1) AND started_at > keel_now() - $2 GROUP BY name",
        &[&names, &WINDOW_MILLIS],
    )
    .await?;
    for row in &recent {
        let name: String = col(row, 0)?;
        if let Some(Some(budget)) = budgets.get_mut(&name) {
            budget.recent = u32::try_from(col::<i64>(row, 1)?).unwrap_or(u32::MAX);
        }
    }
    Ok(())
}

/// Sets aside an item whose stored bytes do not decode: a dead letter with what the
/// columns know, never handed out.
async fn dead_letter_corrupt(
    tx: &Transaction<'_>,
    row: &Row,
    id: i64,
    error: &ProviderError,
) -> Result<()> {
    tracing::warn!(item = id, %error, "dead-lettering an undecodable work item");
    let failure = Failure::new(Failure::DECODE, error.message()).retryable(false);
    dead_letter::insert(
        tx,
        &dead_letter::Record {
            instance: col(row, 2)?,
            execution: col(row, 3)?,
            op: col(row, 4)?,
            name: col(row, 5)?,
            attempts: col(row, 6)?,
            failure: &failure,
            item: None,
        },
    )
    .await?;
    execute(tx, "DELETE FROM work_items WHERE id = $1", &[&id]).await?;
    Ok(())
}

pub(crate) async fn set_limits(
    p: &PostgresProvider,
    name: &str,
    limits: ActivityLimits,
) -> Result<()> {
    let client = p.client().await?;
    let channel = &p.inner.channels.activities;
    if limits.max_concurrent.is_none() && limits.max_per_second.is_none() {
        query(
            &client,
            "WITH d AS (DELETE FROM activity_limits WHERE name = $1) \
             SELECT pg_notify($2, '')::text",
            &[&name, channel],
        )
        .await?;
    } else {
        // Looser limits may make waiting items claimable: dispatchers hear of it.
        query(
            &client,
            "WITH u AS (INSERT INTO activity_limits (name, max_concurrent, max_per_second) \
               VALUES ($1, $2, $3) ON CONFLICT (name) DO UPDATE SET \
               max_concurrent = excluded.max_concurrent, \
               max_per_second = excluded.max_per_second) \
             SELECT pg_notify($4, '')::text",
            &[
                &name,
                &limits.max_concurrent.map(int),
                &limits.max_per_second.map(int),
                channel,
            ],
        )
        .await?;
    }
    Ok(())
}
