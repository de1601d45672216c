//! The activity queue: enqueueing and cancelling work items, and leasing them under
//! their names' limits.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use keel_core::{Failure, WorkItem, decode_record, encode_record};
use keel_provider::{
    ActivityLimits, FetchActivities, LeaseToken, LeasedWorkItem, ProviderError, Result, WorkKind,
};
use sqlx::sqlite::{SqliteConnection, SqliteRow};

use crate::convert::{
    check_size, col, count, from_bits, int_array, later, millis, record, small, timestamp, u64_bits,
};
use crate::dead_letter;
use crate::error::db;
use crate::provider::SqliteProvider;
use crate::writer::{WriteCtx, allocate_tokens};

/// The rate limit's window.
const WINDOW_MILLIS: i64 = 1_000;

/// A work item ready to insert: encoded and size-checked, off the writer.
#[derive(Debug)]
pub(crate) struct PreparedItem {
    pub(crate) instance: String,
    pub(crate) execution: i64,
    pub(crate) op: i64,
    pub(crate) name: String,
    pub(crate) queue: String,
    pub(crate) priority: i64,
    pub(crate) attempt: i64,
    pub(crate) body: Vec<u8>,
}

/// Encodes `item`, checking it against `limit`.
pub(crate) fn prepare_item(item: &WorkItem, limit: usize) -> Result<PreparedItem> {
    let body = encode_record(item)?;
    check_size(
        || format!("work item {} of {}", item.name, item.instance),
        body.len(),
        limit,
    )?;
    Ok(PreparedItem {
        instance: item.instance.as_str().to_owned(),
        execution: i64::from(item.execution.get()),
        op: u64_bits(item.op.get()),
        name: item.name.clone(),
        queue: item.options.queue.as_str().to_owned(),
        priority: i64::from(item.options.priority),
        attempt: i64::from(item.attempt),
        body,
    })
}

/// Enqueues a prepared item, visible at `now`.
pub(crate) async fn insert_item(
    conn: &mut SqliteConnection,
    item: &PreparedItem,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO work_items (instance, execution, op, name, queue, priority, attempt, \
         visible_at, created_at, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9)",
    )
    .bind(&item.instance)
    .bind(item.execution)
    .bind(item.op)
    .bind(&item.name)
    .bind(&item.queue)
    .bind(item.priority)
    .bind(item.attempt)
    .bind(now)
    .bind(&item.body)
    .execute(conn)
    .await
    .map_err(db)?;
    Ok(())
}

/// A claimable item, as the candidate scan sees it.
#[derive(Debug)]
struct Candidate {
    id: i64,
    name: String,
    priority: i64,
    /// The name's limits, when it has any.
    limits: Option<ActivityLimits>,
}

/// One queue's candidates, read a page at a time in (priority desc, id) order.
#[derive(Debug)]
struct QueueScan {
    queue: String,
    buffer: VecDeque<Candidate>,
    after: (i64, i64),
    done: bool,
}

/// The limits of one name and how much of them this claim has seen used.
#[derive(Debug)]
struct NameBudget {
    limits: ActivityLimits,
    running: u32,
    recent: u32,
}

impl NameBudget {
    fn allows(&self) -> bool {
        self.limits
            .max_concurrent
            .is_none_or(|max| self.running < max)
            && self
                .limits
                .max_per_second
                .is_none_or(|max| self.recent < max)
    }
}

pub(crate) async fn fetch(
    p: &SqliteProvider,
    request: FetchActivities,
) -> Result<Vec<LeasedWorkItem>> {
    let max = request.max_items.min(p.inner.capabilities.max_fetch_items);
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
    p.inner.wake.fetched(WorkKind::Activities, p.clock_now());
    p.write(move |ctx| Box::pin(fetch_tx(ctx, queues, max, request.lease_for)))
        .await
}

async fn fetch_tx(
    ctx: &mut WriteCtx,
    queues: Vec<String>,
    max: usize,
    lease_for: Duration,
) -> Result<Vec<LeasedWorkItem>> {
    let now_ts = ctx.now();
    let now = millis(now_ts);
    let leased_until = later(now_ts, lease_for);
    let mut leased = Vec::new();
    let mut taken = HashSet::new();
    loop {
        let wanted = max.saturating_sub(leased.len());
        let picked = pick(ctx, &queues, wanted, now, &taken).await?;
        if picked.is_empty() {
            return Ok(leased);
        }
        taken.extend(picked.iter().map(|c| c.id));
        let dead = lease_picked(ctx, picked, now, leased_until, &mut leased).await?;
        // Damaged items became dead letters instead: pick again for their places.
        if dead == 0 || leased.len() >= max {
            return Ok(leased);
        }
    }
}

/// Leases the picked items, appending them to `leased`; an item whose stored bytes
/// cannot be decoded becomes a dead letter instead. Returns how many did.
async fn lease_picked(
    ctx: &mut WriteCtx,
    picked: Vec<Candidate>,
    now: i64,
    leased_until: i64,
    leased: &mut Vec<LeasedWorkItem>,
) -> Result<usize> {
    let first_token = allocate_tokens(ctx, picked.len()).await?;
    // One statement leases them all (token = first + position); a second records the
    // lease starts of rate-limited names.
    let rows = sqlx::query(
        "UPDATE work_items SET lease_token = ?3 + j.key, visible_at = ?4, \
           deliveries = deliveries + 1 \
         FROM json_each(?1) AS j WHERE work_items.id = j.value \
         RETURNING work_items.id, instance, execution, op, name, attempt, deliveries, body; \
         INSERT INTO lease_starts (name, started_at) \
         SELECT w.name, ?2 FROM json_each(?1) AS j JOIN work_items w ON w.id = j.value \
         JOIN activity_limits l ON l.name = w.name WHERE l.max_per_second IS NOT NULL",
    )
    .bind(int_array(picked.iter().map(|c| c.id)))
    .bind(now)
    .bind(first_token)
    .bind(leased_until)
    .fetch_all(&mut ctx.conn)
    .await
    .map_err(db)?;
    let mut by_id = HashMap::with_capacity(rows.len());
    for row in rows {
        by_id.insert(col::<i64>(&row, 0)?, row);
    }
    let mut dead = 0;
    for (candidate, token) in picked.into_iter().zip(first_token..) {
        let Some(row) = by_id.remove(&candidate.id) else {
            continue;
        };
        let id = candidate.id;
        let decoded = record(
            &row,
            7,
            decode_record::<WorkItem>,
            format_args!("work item {id}"),
        );
        let item = match decoded {
            Ok(mut item) => {
                // The column is the truth: retries update it without re-encoding.
                item.attempt = small(col(&row, 5)?, "attempt")?;
                item
            }
            Err(error) => {
                dead_letter_corrupt(ctx, &row, id, &error, now).await?;
                dead += 1;
                continue;
            }
        };
        leased.push(LeasedWorkItem {
            lease: LeaseToken::new(from_bits(candidate.id), from_bits(token)),
            leased_until: timestamp(leased_until),
            item,
            deliveries: small(col(&row, 6)?, "deliveries")?,
        });
    }
    Ok(dead)
}

/// Chooses up to `max` visible items of `queues` other than `taken`, highest priority
/// then oldest across the queues, within their names' limits.
async fn pick(
    ctx: &mut WriteCtx,
    queues: &[String],
    max: usize,
    now: i64,
    taken: &HashSet<i64>,
) -> Result<Vec<Candidate>> {
    let mut budgets: HashMap<String, NameBudget> = HashMap::new();
    let mut scans: Vec<QueueScan> = queues
        .iter()
        .map(|queue| QueueScan {
            queue: queue.clone(),
            buffer: VecDeque::new(),
            after: (i64::MAX, i64::MIN),
            done: false,
        })
        .collect();
    let page = count(max.max(16) as u64);
    let mut picked = Vec::new();
    while picked.len() < max {
        for scan in &mut scans {
            if scan.buffer.is_empty() && !scan.done {
                refill(&mut ctx.conn, scan, now, page).await?;
            }
        }
        let best = scans
            .iter()
            .enumerate()
            .filter_map(|(i, scan)| scan.buffer.front().map(|c| ((c.priority, -c.id), i)))
            .max_by_key(|(key, _)| *key)
            .map(|(_, i)| i);
        let Some(candidate) = best.and_then(|i| scans.get_mut(i)?.buffer.pop_front()) else {
            break;
        };
        // Leased earlier in this fetch (and visible still, under a zero-length lease).
        if taken.contains(&candidate.id) {
            continue;
        }
        if let Some(limits) = candidate.limits {
            if !budgets.contains_key(&candidate.name) {
                let budget = load_budget(&mut ctx.conn, &candidate.name, limits, now).await?;
                budgets.insert(candidate.name.clone(), budget);
            }
            if let Some(budget) = budgets.get_mut(&candidate.name) {
                if !budget.allows() {
                    continue;
                }
                budget.running = budget.running.saturating_add(1);
                budget.recent = budget.recent.saturating_add(1);
            }
        }
        picked.push(candidate);
    }
    Ok(picked)
}

/// Sets aside an item whose stored bytes do not decode: a dead letter with what the
/// columns know, never handed out.
async fn dead_letter_corrupt(
    ctx: &mut WriteCtx,
    row: &SqliteRow,
    id: i64,
    error: &ProviderError,
    now: i64,
) -> Result<()> {
    tracing::warn!(item = id, %error, "dead-lettering an undecodable work item");
    let failure = Failure::new(Failure::DECODE, error.message()).retryable(false);
    dead_letter::insert(
        &mut ctx.conn,
        &dead_letter::Record {
            instance: &col::<String>(row, 1)?,
            execution: col(row, 2)?,
            op: col(row, 3)?,
            name: &col::<String>(row, 4)?,
            attempts: col(row, 5)?,
            failure: &failure,
            item: None,
        },
        now,
    )
    .await?;
    sqlx::query("DELETE FROM work_items WHERE id = ?1")
        .bind(id)
        .execute(&mut ctx.conn)
        .await
        .map_err(db)?;
    Ok(())
}

/// Reads the next page of `scan`'s queue, with each item's limits. Cancelled items
/// whose lease ran out will never be completed: they are dropped on the way.
async fn refill(
    conn: &mut SqliteConnection,
    scan: &mut QueueScan,
    now: i64,
    page: i64,
) -> Result<()> {
    let rows = sqlx::query(
        "DELETE FROM work_items WHERE cancelled = 1 AND visible_at <= ?1; \
         SELECT w.id, w.name, w.priority, l.name IS NOT NULL, l.max_concurrent, \
           l.max_per_second \
         FROM work_items w LEFT JOIN activity_limits l ON l.name = w.name \
         WHERE w.queue = ?2 AND w.cancelled = 0 AND w.visible_at <= ?1 \
           AND (w.priority < ?3 OR (w.priority = ?3 AND w.id > ?4)) \
         ORDER BY w.priority DESC, w.id LIMIT ?5",
    )
    .bind(now)
    .bind(&scan.queue)
    .bind(scan.after.0)
    .bind(scan.after.1)
    .bind(page)
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?;
    if i64::try_from(rows.len()).unwrap_or(i64::MAX) < page {
        scan.done = true;
    }
    let limit = |v: Option<i64>| v.map(|v| small(v, "an activity limit")).transpose();
    for row in &rows {
        let limits = if col::<bool>(row, 3)? {
            Some(ActivityLimits {
                max_concurrent: limit(col(row, 4)?)?,
                max_per_second: limit(col(row, 5)?)?,
            })
        } else {
            None
        };
        let candidate = Candidate {
            id: col(row, 0)?,
            name: col(row, 1)?,
            priority: col(row, 2)?,
            limits,
        };
        scan.after = (candidate.priority, candidate.id);
        scan.buffer.push_back(candidate);
    }
    Ok(())
}

/// How much of `name`'s limits is in use now: unexpired leases, and leases started
/// within the last second (forgetting older starts).
async fn load_budget(
    conn: &mut SqliteConnection,
    name: &str,
    limits: ActivityLimits,
    now: i64,
) -> Result<NameBudget> {
    let mut budget = NameBudget {
        limits,
        running: 0,
        recent: 0,
    };
    if limits.max_concurrent.is_some() {
        let row = sqlx::query(
            "SELECT COUNT(*) FROM work_items \
             WHERE name = ?1 AND lease_token IS NOT NULL AND visible_at > ?2",
        )
        .bind(name)
        .bind(now)
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
        budget.running = small(col(&row, 0)?, "a count")?;
    }
    if limits.max_per_second.is_some() {
        let since = now.saturating_sub(WINDOW_MILLIS);
        sqlx::query("DELETE FROM lease_starts WHERE name = ?1 AND started_at <= ?2")
            .bind(name)
            .bind(since)
            .execute(&mut *conn)
            .await
            .map_err(db)?;
        let row =
            sqlx::query("SELECT COUNT(*) FROM lease_starts WHERE name = ?1 AND started_at > ?2")
                .bind(name)
                .bind(since)
                .fetch_one(&mut *conn)
                .await
                .map_err(db)?;
        budget.recent = small(col(&row, 0)?, "a count")?;
    }
    Ok(budget)
}

pub(crate) async fn set_limits(
    p: &SqliteProvider,
    name: &str,
    limits: ActivityLimits,
) -> Result<()> {
    let name = name.to_owned();
    p.write(move |ctx| {
        Box::pin(async move {
            if limits.max_concurrent.is_none() && limits.max_per_second.is_none() {
                sqlx::query("DELETE FROM activity_limits WHERE name = ?1")
                    .bind(&name)
                    .execute(&mut ctx.conn)
                    .await
                    .map_err(db)?;
            } else {
                sqlx::query(
                    "INSERT INTO activity_limits (name, max_concurrent, max_per_second) \
                     VALUES (?1, ?2, ?3) ON CONFLICT (name) DO UPDATE SET \
                     max_concurrent = excluded.max_concurrent, \
                     max_per_second = excluded.max_per_second",
                )
                .bind(&name)
                .bind(limits.max_concurrent.map(i64::from))
                .bind(limits.max_per_second.map(i64::from))
                .execute(&mut ctx.conn)
                .await
                .map_err(db)?;
            }
            // Looser limits may make waiting items claimable.
            ctx.wake(WorkKind::Activities);
            Ok(())
        })
    })
    .await
}
