//! The activity queue: enqueueing and cancelling work items, and leasing them under
//! their names' limits.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use keel_core::{Failure, WorkItem, decode_record, encode_record};
use keel_provider::{
    ActivityLimits, FetchActivities, LeaseToken, LeasedWorkItem, ProviderError, Result, WorkKind,
};
use rusqlite::{Connection, Row};

use crate::convert::{
    check_size, col, count, from_bits, later, millis, record, small, timestamp, u64_bits,
};
use crate::dead_letter;
use crate::provider::SqliteProvider;
use crate::query::{self, execute};
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

/// Enqueues a prepared item at `now`: visible at once, or, with `lease` (a token and
/// when it ends), already leased as a fetch at `now` would have left it. Returns its id.
pub(crate) fn insert_item(
    conn: &Connection,
    item: &PreparedItem,
    now: i64,
    lease: Option<(i64, i64)>,
) -> Result<i64> {
    let (token, leased_until) = lease.unzip();
    execute(
        conn,
        "INSERT INTO work_items (instance, execution, op, name, queue, priority, attempt, \
         visible_at, lease_token, deliveries, created_at, body) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, COALESCE(?10, ?8), ?9, ?9 IS NOT NULL, ?8, ?11)",
        (
            &item.instance,
            item.execution,
            item.op,
            &item.name,
            &item.queue,
            item.priority,
            item.attempt,
            now,
            token,
            leased_until,
            &item.body,
        ),
    )?;
    Ok(conn.last_insert_rowid())
}

/// The names that have limits: their items are only ever leased by a fetch, which
/// counts them.
pub(crate) fn limited_names(conn: &Connection) -> Result<HashSet<String>> {
    let names = query::all(conn, "SELECT name FROM activity_limits", [], |row| {
        col::<String>(row, 0)
    })?;
    Ok(names.into_iter().collect())
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
    p.write(move |ctx| fetch_tx(ctx, &queues, max, request.lease_for))
        .await
}

fn fetch_tx(
    ctx: &mut WriteCtx,
    queues: &[String],
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
        let picked = pick(ctx, queues, wanted, now, &taken)?;
        if picked.is_empty() {
            return Ok(leased);
        }
        taken.extend(picked.iter().map(|c| c.id));
        let dead = lease_picked(ctx, picked, now, leased_until, &mut leased)?;
        // Damaged items became dead letters instead: pick again for their places.
        if dead == 0 || leased.len() >= max {
            return Ok(leased);
        }
    }
}

/// Leases the picked items, appending them to `leased`; an item whose stored bytes
/// cannot be decoded becomes a dead letter instead. Returns how many did.
fn lease_picked(
    ctx: &mut WriteCtx,
    picked: Vec<Candidate>,
    now: i64,
    leased_until: i64,
    leased: &mut Vec<LeasedWorkItem>,
) -> Result<usize> {
    let first_token = allocate_tokens(ctx, picked.len())?;
    let mut dead = 0;
    for (candidate, token) in picked.into_iter().zip(first_token..) {
        let id = candidate.id;
        // The item as leased, or what a dead letter needs to know of it when its
        // stored bytes do not decode.
        let outcome = query::first(
            &ctx.conn,
            "UPDATE work_items SET lease_token = ?2, visible_at = ?3, \
               deliveries = deliveries + 1 WHERE id = ?1 \
             RETURNING instance, execution, op, name, attempt, deliveries, body",
            [id, token, leased_until],
            |row| {
                let decoded = record(
                    row,
                    6,
                    decode_record::<WorkItem>,
                    format_args!("work item {id}"),
                );
                Ok(match decoded {
                    Ok(mut item) => {
                        // The column is the truth: retries update it without re-encoding.
                        item.attempt = small(col(row, 4)?, "attempt")?;
                        Ok((item, small(col(row, 5)?, "deliveries")?))
                    }
                    Err(error) => Err(Undecodable {
                        instance: col(row, 0)?,
                        execution: col(row, 1)?,
                        op: col(row, 2)?,
                        name: col(row, 3)?,
                        attempts: col(row, 4)?,
                        error,
                    }),
                })
            },
        )?;
        // Gone meanwhile: cannot happen inside the transaction that picked it.
        let Some(outcome) = outcome else {
            continue;
        };
        if candidate
            .limits
            .is_some_and(|limits| limits.max_per_second.is_some())
        {
            // A lease start of a rate-limited name.
            execute(
                &ctx.conn,
                "INSERT INTO lease_starts (name, started_at) VALUES (?1, ?2)",
                (&candidate.name, now),
            )?;
        }
        match outcome {
            Ok((item, deliveries)) => {
                leased.push(LeasedWorkItem {
                    lease: LeaseToken::new(from_bits(id), from_bits(token)),
                    leased_until: timestamp(leased_until),
                    item,
                    deliveries,
                });
            }
            Err(undecodable) => {
                dead_letter_corrupt(ctx, id, &undecodable, now)?;
                dead += 1;
            }
        }
    }
    Ok(dead)
}

/// A leased work item whose stored bytes do not decode, with what its columns say.
#[derive(Debug)]
struct Undecodable {
    instance: String,
    execution: i64,
    op: i64,
    name: String,
    attempts: i64,
    error: ProviderError,
}

/// Chooses up to `max` visible items of `queues` other than `taken`, highest priority
/// then oldest across the queues, within their names' limits.
fn pick(
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
                refill(&ctx.conn, scan, now, page)?;
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
                let budget = load_budget(&ctx.conn, &candidate.name, limits, now)?;
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
fn dead_letter_corrupt(ctx: &WriteCtx, id: i64, item: &Undecodable, now: i64) -> Result<()> {
    let error = &item.error;
    tracing::warn!(item = id, %error, "dead-lettering an undecodable work item");
    let failure = Failure::new(Failure::DECODE, error.message()).retryable(false);
    dead_letter::insert(
        &ctx.conn,
        &dead_letter::Record {
            instance: &item.instance,
            execution: item.execution,
            op: item.op,
            name: &item.name,
            attempts: item.attempts,
            failure: &encode_record(&failure)?,
            item: None,
        },
        now,
    )?;
    execute(&ctx.conn, "DELETE FROM work_items WHERE id = ?1", [id])?;
    Ok(())
}

/// Reads the next page of `scan`'s queue, with each item's limits. Cancelled items
/// whose lease ran out will never be completed: they are dropped on the way.
fn refill(conn: &Connection, scan: &mut QueueScan, now: i64, page: i64) -> Result<()> {
    execute(
        conn,
        "DELETE FROM work_items WHERE cancelled = 1 AND visible_at <= ?1",
        [now],
    )?;
    let limit = |v: Option<i64>| v.map(|v| small(v, "an activity limit")).transpose();
    let candidates = query::all(
        conn,
        "SELECT w.id, w.name, w.priority, l.name IS NOT NULL, l.max_concurrent, \
           l.max_per_second \
         FROM work_items w LEFT JOIN activity_limits l ON l.name = w.name \
         WHERE w.queue = ?2 AND w.cancelled = 0 AND w.visible_at <= ?1 \
           AND (w.priority < ?3 OR (w.priority = ?3 AND w.id > ?4)) \
         ORDER BY w.priority DESC, w.id LIMIT ?5",
        rusqlite::params![now, scan.queue, scan.after.0, scan.after.1, page],
        |row: &Row<'_>| {
            let limits = if col::<bool>(row, 3)? {
                Some(ActivityLimits {
                    max_concurrent: limit(col(row, 4)?)?,
                    max_per_second: limit(col(row, 5)?)?,
                })
            } else {
                None
            };
            Ok(Candidate {
                id: col(row, 0)?,
                name: col(row, 1)?,
                priority: col(row, 2)?,
                limits,
            })
        },
    )?;
    if i64::try_from(candidates.len()).unwrap_or(i64::MAX) < page {
        scan.done = true;
    }
    for candidate in candidates {
        scan.after = (candidate.priority, candidate.id);
        scan.buffer.push_back(candidate);
    }
    Ok(())
}

/// How much of `name`'s limits is in use now: unexpired leases, and leases started
/// within the last second (forgetting older starts).
fn load_budget(
    conn: &Connection,
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
        budget.running = query::one(
            conn,
            "SELECT COUNT(*) FROM work_items \
             WHERE name = ?1 AND lease_token IS NOT NULL AND visible_at > ?2",
            (name, now),
            |row| small(col(row, 0)?, "a count"),
        )?;
    }
    if limits.max_per_second.is_some() {
        let since = now.saturating_sub(WINDOW_MILLIS);
        execute(
            conn,
            "DELETE FROM lease_starts WHERE name = ?1 AND started_at <= ?2",
            (name, since),
        )?;
        budget.recent = query::one(
            conn,
            "SELECT COUNT(*) FROM lease_starts WHERE name = ?1 AND started_at > ?2",
            (name, since),
            |row| small(col(row, 0)?, "a count"),
        )?;
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
        if limits.max_concurrent.is_none() && limits.max_per_second.is_none() {
            execute(
                &ctx.conn,
                "DELETE FROM activity_limits WHERE name = ?1",
                [&name],
            )?;
        } else {
            execute(
                &ctx.conn,
                "INSERT INTO activity_limits (name, max_concurrent, max_per_second) \
                 VALUES (?1, ?2, ?3) ON CONFLICT (name) DO UPDATE SET \
                 max_concurrent = excluded.max_concurrent, \
                 max_per_second = excluded.max_per_second",
                (
                    &name,
                    limits.max_concurrent.map(i64::from),
                    limits.max_per_second.map(i64::from),
                ),
            )?;
        }
        // Looser limits may make waiting items claimable.
        ctx.wake(WorkKind::Activities);
        Ok(())
    })
    .await
}
