//! The activity queue: enqueueing work items, and leasing them under their names'
//! limits.

use std::collections::{HashMap, HashSet};

use deadpool_postgres::{GenericClient, Transaction};
use keel_core::{Failure, WorkItem, decode_record, encode_record};
use keel_provider::{
    ActivityLimits, FetchActivities, LeaseToken, LeasedWorkItem, Result, WorkKind,
};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::convert::{
    check_size, col, duration_millis, execution_col, from_bits, int, record, small, timestamp,
    u64_bits,
};
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

    /// The name and queue of each item, in order.
    pub(crate) fn routes(&self) -> impl Iterator<Item = (&str, &str)> {
        self.name
            .iter()
            .map(String::as_str)
            .zip(self.queue.iter().map(String::as_str))
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

/// Enqueues prepared items as [`INSERT_ITEMS`] does, except that those marked in `$9`
/// are inserted leased for `$10` milliseconds, as a claim at this moment would have
/// leased them (eager dispatch): a lease token from the `tokens` sequence, one delivery,
/// claimable again when the lease ends. Returns the leased ones in order: their position
/// among the items (from 1), id, lease token and lease expiry. The parameters are
/// [`PreparedItems::params`], the marks and the lease's length.
pub(crate) const INSERT_LEASING: &str = "\
WITH src AS MATERIALIZED ( \
  SELECT nextval('work_item_ids') AS id, \
    CASE WHEN u.leased THEN nextval('tokens') END AS token, u.* \
  FROM unnest($1::text[], $2::integer[], $3::bigint[], $4::text[], $5::text[], \
    $6::integer[], $7::integer[], $8::bytea[], $9::boolean[]) \
    WITH ORDINALITY AS u (instance, execution, op, name, queue, priority, attempt, \
    body, leased, n) ORDER BY u.n), \
items AS (INSERT INTO work_items (id, instance, execution, op, name, queue, priority, \
  attempt, visible_at, lease_token, deliveries, created_at) \
  SELECT id, instance, execution, op, name, queue, priority, attempt, \
    CASE WHEN leased THEN keel_now() + $10 ELSE keel_now() END, token, \
    CASE WHEN leased THEN 1 ELSE 0 END, keel_now() FROM src ORDER BY n), \
bodies AS (INSERT INTO work_item_bodies (item, body) SELECT id, body FROM src) \
SELECT n, id, token, keel_now() + $10 FROM src WHERE leased ORDER BY n";

/// Enqueues prepared items, visible now, in order.
pub(crate) async fn insert_items<C: GenericClient>(
    client: &C,
    items: &PreparedItems,
) -> Result<()> {
    execute(client, INSERT_ITEMS, &items.params()).await?;
    Ok(())
}

/// Which of `names` have limits; no query when there are none to ask about.
pub(crate) async fn limited_names<C: GenericClient>(
    client: &C,
    names: &[&str],
) -> Result<HashSet<String>> {
    if names.is_empty() {
        return Ok(HashSet::new());
    }
    let rows = query(
        client,
        "SELECT name FROM activity_limits WHERE name = ANY($1)",
        &[&names],
    )
    .await?;
    rows.iter().map(|row| col(row, 0)).collect()
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

/// Leases, in one statement, up to `$2` visible items of the queues `$1` for `$3`
/// milliseconds, highest priority then oldest, passing over items another claim holds
/// (`SKIP LOCKED`), as long as their names have no limits: the claim stops at the first
/// candidate whose name has a limits row, and says so, for [`fetch_limited`] to go on
/// from there. Each queue is read by one index scan in claim order, which marks the
/// entries of items gone since as dead on the way, so that later claims skip them until
/// vacuum. It also drops cancelled items whose lease ran out: they will never be
/// completed. The first row always comes, with the database's now and whether a
/// limited name stopped the claim; the leased items fill the rest, in claim order.
const CLAIM: &str = "\
WITH gone AS ( \
  DELETE FROM work_items WHERE id = ANY(ARRAY( \
    SELECT id FROM work_items WHERE cancelled AND visible_at <= keel_now() \
    FOR UPDATE SKIP LOCKED))), \
candidates AS ( \
  SELECT w.id, w.priority, l.name IS NOT NULL AS limited \
  FROM unnest($1::text[]) AS q (queue) \
  CROSS JOIN LATERAL ( \
    SELECT id, name, priority FROM work_items \
    WHERE queue = q.queue AND NOT cancelled AND visible_at <= keel_now() \
    ORDER BY priority DESC, id LIMIT $2 FOR UPDATE SKIP LOCKED) w \
  LEFT JOIN activity_limits l ON l.name = w.name \
  ORDER BY w.priority DESC, w.id LIMIT $2), \
stop AS ( \
  SELECT priority, id FROM candidates WHERE limited ORDER BY priority DESC, id LIMIT 1), \
free AS ( \
  SELECT c.id FROM candidates c WHERE NOT EXISTS (SELECT 1 FROM stop s \
    WHERE c.priority < s.priority OR (c.priority = s.priority AND c.id >= s.id))), \
leased AS ( \
  UPDATE work_items w SET lease_token = nextval('tokens'), \
    visible_at = keel_now() + $3, deliveries = w.deliveries + 1 \
  WHERE w.id = ANY(ARRAY(SELECT id FROM free)) \
  RETURNING w.priority, w.id, w.lease_token, w.instance, w.execution, w.op, w.name, \
    w.attempt, w.deliveries, \
    (SELECT body FROM work_item_bodies b WHERE b.item = w.id) AS body, w.visible_at) \
SELECT s.now, s.limited, l.id, l.lease_token, l.instance, l.execution, l.op, l.name, \
  l.attempt, l.deliveries, l.body, l.visible_at \
FROM (SELECT keel_now() AS now, EXISTS (SELECT 1 FROM stop) AS limited) s \
LEFT JOIN leased l ON true ORDER BY l.priority DESC NULLS FIRST, l.id";

/// One page of visible items of the queues, in claim order, locked by this
/// transaction (`SKIP LOCKED`: items another claim holds are passed over).
const SCAN: &str = "\
SELECT w.id, w.name, w.priority, l.name IS NOT NULL \
FROM work_items w LEFT JOIN activity_limits l ON l.name = w.name \
WHERE w.queue = ANY($1) AND NOT w.cancelled AND w.visible_at <= keel_now() \
  AND (w.priority < $2 OR (w.priority = $2 AND w.id > $3)) \
ORDER BY w.priority DESC, w.id LIMIT $4 \
FOR UPDATE OF w SKIP LOCKED";

/// Leases the picked items of [`fetch_limited`]; returns the columns the claim does,
/// after its first two.
const LEASE: &str = "\
UPDATE work_items w SET lease_token = nextval('tokens'), \
  visible_at = keel_now() + $2, deliveries = w.deliveries + 1 \
FROM work_item_bodies b WHERE w.id = ANY($1) AND b.item = w.id \
RETURNING w.id, w.lease_token, w.instance, w.execution, w.op, w.name, w.attempt, \
  w.deliveries, b.body, w.visible_at";

/// Sets aside a leased item whose stored bytes do not decode: a dead letter with what
/// the columns know, never handed out.
const DEAD_LETTER_CORRUPT: &str = "\
WITH gone AS (DELETE FROM work_items WHERE id = $1 AND lease_token = $2 \
  RETURNING instance, execution, op, name, attempt) \
INSERT INTO dead_letters (instance, execution, op, name, attempts, failure, item, recorded_at) \
SELECT instance, execution, op, name, attempt, $3, NULL, keel_now() FROM gone";

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
    let lease_for = duration_millis(request.lease_for);
    let mut client = p.client().await?;
    let want = i64::try_from(max).unwrap_or(i64::MAX);
    let rows = query(&client, CLAIM, &[&queues, &want, &lease_for]).await?;
    let Some(first) = rows.first() else {
        return Ok(Vec::new());
    };
    p.inner.wake.fetched(WorkKind::Activities, col(first, 0)?);
    let limited: bool = col(first, 1)?;
    let mut leased = Vec::with_capacity(rows.len());
    for row in &rows {
        if col::<Option<i64>>(row, 2)?.is_some() {
            hand_out(&client, row, 2, &mut leased).await?;
        }
    }
    if limited && leased.len() < max {
        let tx = client.transaction().await.map_err(db)?;
        fetch_limited(&tx, &queues, max - leased.len(), lease_for, &mut leased).await?;
        tx.commit().await.map_err(db)?;
    }
    p.inner.identities.remember(&leased);
    Ok(leased)
}

/// Hands out the item leased in `row` (its columns from `at` on: id, lease token,
/// instance, execution, op, name, attempt, deliveries, body, lease expiry); one that
/// does not decode becomes a dead letter instead.
async fn hand_out<C: GenericClient>(
    client: &C,
    row: &Row,
    at: usize,
    leased: &mut Vec<LeasedWorkItem>,
) -> Result<()> {
    let id: i64 = col(row, at)?;
    let token: i64 = col(row, at + 1)?;
    match record(
        row,
        at + 8,
        decode_record::<WorkItem>,
        format!("work item {id}"),
    ) {
        Ok(mut item) => {
            // The column is the truth: retries update it without re-encoding.
            item.attempt = small(col(row, at + 6)?, "attempt")?;
            leased.push(LeasedWorkItem {
                lease: LeaseToken::new(from_bits(id), from_bits(token)),
                leased_until: timestamp(col(row, at + 9)?),
                item,
                deliveries: small(col(row, at + 7)?, "deliveries")?,
            });
        }
        Err(error) => {
            tracing::warn!(item = id, %error, "dead-lettering an undecodable work item");
            let failure = Failure::new(Failure::DECODE, error.message()).retryable(false);
            execute(
                client,
                DEAD_LETTER_CORRUPT,
                &[&id, &token, &encode_record(&failure)?],
            )
            .await?;
        }
    }
    Ok(())
}

/// Leases up to `max` visible items of `queues` within their names' limits, appending
/// them to `leased` in claim order, and records the lease starts of rate-limited names.
async fn fetch_limited(
    tx: &Transaction<'_>,
    queues: &[String],
    max: usize,
    lease_for: i64,
    leased: &mut Vec<LeasedWorkItem>,
) -> Result<()> {
    let (picked, rated) = pick(tx, queues, max).await?;
    if picked.is_empty() {
        return Ok(());
    }
    let rows = query(tx, LEASE, &[&picked, &lease_for]).await?;
    if !rated.is_empty() {
        execute(
            tx,
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
    for id in picked {
        if let Some(row) = by_id.remove(&id) {
            hand_out(tx, &row, 0, leased).await?;
        }
    }
    Ok(())
}

/// Chooses up to `max` visible items of `queues`, highest priority then oldest,
/// within their names' limits; returns their ids and the names of rate-limited ones
/// (one entry per item, to record their lease starts).
///
/// A limited name's limits row is locked (`FOR UPDATE`) before its leases are counted,
/// so concurrent claims of one name take turns: the second counts, under READ
/// COMMITTED, with a snapshot taken after the first committed. No count-then-claim race.
async fn pick(
    tx: &Transaction<'_>,
    queues: &[String],
    max: usize,
) -> Result<(Vec<i64>, Vec<String>)> {
    let page = i64::try_from(max.saturating_mul(2).max(32)).unwrap_or(i64::MAX);
    let mut after: (i32, i64) = (i32::MAX, i64::MIN);
    let mut budgets: HashMap<String, Option<Budget>> = HashMap::new();
    let mut picked = Vec::new();
    let mut rated = Vec::new();
    loop {
        let rows = query(tx, SCAN, &[&queues, &after.0, &after.1, &page]).await?;
        let mut limited: Vec<String> = Vec::new();
        let mut seen = HashSet::new();
        for row in &rows {
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
    Ok((picked, rated))
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
