//! Writing a batch of accepted acks: a few set-based statements over arrays that hold
//! the whole batch, sent in one pipeline; the items the caller may lease are inserted
//! already leased.

use std::collections::HashSet;

use deadpool_postgres::Transaction;
use keel_core::WorkItem;
use keel_provider::{ErrorKind, LeaseToken, LeasedWorkItem, ProviderError, Result};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, Statement};

use super::{Accepted, Leasing};
use crate::activity::{INSERT_ITEMS, INSERT_LEASING, PreparedItems};
use crate::convert::{col, count, from_bits, int, timestamp};
use crate::error::db;
use crate::instance::{INSERT_MANY, PreparedInstances};
use crate::statement::Params;

/// Appends the events, deletes the consumed messages, and sets each instance's
/// status, version, output, failure and custom status, releasing its lock; on
/// continue-as-new, starts the next execution (a fresh history and input). One row
/// of `a` per ack.
const TURNS: &str = "\
WITH a AS ( \
  SELECT * FROM unnest($1::text[], $2::text[], $3::integer[], $4::bigint[], $5::boolean[], \
    $6::integer[], $7::boolean[], $8::bytea[], $9::bytea[], $10::integer[], $11::bytea[], \
    $12::bytea[]) AS a (id, status, version, events, continued, next_version, pay, output, \
    failure, custom_mode, custom, input)), \
h AS (INSERT INTO history (instance, execution, seq, event) \
  SELECT * FROM unnest($13::text[], $14::integer[], $15::bigint[], $16::bytea[])), \
gone AS (DELETE FROM messages m USING unnest($17::text[], $18::bigint[]) AS c (instance, id) \
  WHERE m.instance = c.instance AND m.id = c.id), \
pay AS (UPDATE instance_payloads d SET \
    input = CASE WHEN a.continued THEN a.input ELSE d.input END, \
    output = CASE WHEN a.continued THEN NULL WHEN a.status = 'running' THEN d.output \
      ELSE a.output END, \
    failure = CASE WHEN a.continued THEN NULL WHEN a.status = 'running' THEN d.failure \
      ELSE a.failure END, \
    custom_status = CASE a.custom_mode WHEN 0 THEN d.custom_status WHEN 1 THEN a.custom \
      ELSE NULL END \
  FROM a WHERE d.instance = a.id AND a.pay) \
UPDATE instances i SET \
  status = CASE \
    WHEN a.continued THEN \
      (CASE WHEN i.status IN ('paused', 'suspended') THEN i.status ELSE 'running' END) \
    WHEN a.status = 'running' THEN \
      (CASE WHEN i.status = 'pending' THEN 'running' ELSE i.status END) \
    ELSE a.status END, \
  status_reason = CASE WHEN a.status = 'running' THEN i.status_reason ELSE NULL END, \
  completed_at = CASE WHEN a.continued THEN NULL WHEN a.status = 'running' \
    THEN i.completed_at ELSE keel_now() END, \
  execution = CASE WHEN a.continued THEN i.execution + 1 ELSE i.execution END, \
  version = CASE WHEN a.continued THEN a.next_version ELSE COALESCE(a.version, i.version) END, \
  history_len = CASE WHEN a.continued THEN 0 ELSE i.history_len + a.events END, \
  lock_token = NULL, locked_until = NULL, acked = true, updated_at = keel_now() \
FROM a WHERE i.id = a.id";

/// Cancels activities: queued items go; leased ones are marked, so that their renewal
/// fails.
const CANCEL: &str = "\
WITH c AS (SELECT * FROM unnest($1::text[], $2::integer[], $3::bigint[]) \
  AS c (instance, execution, op)), \
gone AS (DELETE FROM work_items w USING c WHERE w.instance = c.instance \
  AND w.execution = c.execution AND w.op = c.op \
  AND (w.lease_token IS NULL OR w.visible_at <= keel_now())) \
UPDATE work_items w SET cancelled = true FROM c WHERE w.instance = c.instance \
  AND w.execution = c.execution AND w.op = c.op \
  AND w.lease_token IS NOT NULL AND w.visible_at > keel_now()";

/// Enqueues messages, in order, for those targets that exist.
const MESSAGES: &str = "\
INSERT INTO messages (instance, priority, visible_at, enqueued_at, body) \
SELECT t.id, t.priority, COALESCE(m.visible_at, keel_now()), keel_now(), m.body \
FROM unnest($1::text[], $2::bigint[], $3::bytea[]) WITH ORDINALITY \
  AS m (target, visible_at, body, n) \
JOIN instances t ON t.id = m.target ORDER BY m.n";

/// The columns of the statements that write a batch of accepted acks.
#[derive(Debug, Default)]
struct Columns<'a> {
    // TURNS: one row per ack.
    id: Vec<&'a str>,
    status: Vec<&'static str>,
    version: Vec<Option<i32>>,
    events: Vec<i64>,
    continued: Vec<bool>,
    next_version: Vec<Option<i32>>,
    pay: Vec<bool>,
    output: Vec<Option<&'a [u8]>>,
    failure: Vec<Option<&'a [u8]>>,
    custom_mode: Vec<i32>,
    custom: Vec<Option<&'a [u8]>>,
    input: Vec<Option<&'a [u8]>>,
    // TURNS: the history events, and the consumed messages.
    event_instance: Vec<&'a str>,
    event_execution: Vec<i32>,
    event_seq: Vec<i64>,
    event_body: Vec<&'a [u8]>,
    consumed_instance: Vec<&'a str>,
    consumed_id: Vec<i64>,
    // CANCEL.
    cancel_instance: Vec<&'a str>,
    cancel_execution: Vec<i32>,
    cancel_op: Vec<i64>,
    // MESSAGES.
    message_to: Vec<&'a str>,
    message_at: Vec<Option<i64>>,
    message_body: Vec<&'a [u8]>,
    children: PreparedInstances<'a>,
    items: PreparedItems,
    /// Whether each item is leased to the caller, and as scheduled.
    leased: Vec<bool>,
    scheduled: Vec<&'a WorkItem>,
}

impl<'a> Columns<'a> {
    /// The columns of `accepted`, with the items `leasing` allows (its queues, not the
    /// names with limits, as many as it has room for, in ack order) marked leased.
    fn new(accepted: &'a [Accepted<'a>], leasing: Option<(&Leasing, &HashSet<String>)>) -> Self {
        let mut c = Self::default();
        let mut left = leasing.map_or(0, |(leasing, _)| leasing.left);
        for Accepted { ack, held, start } in accepted {
            let id = ack.instance.as_str();
            c.id.push(id);
            c.status.push(ack.status);
            c.version.push(ack.version);
            c.events.push(count(ack.events.len() as u64));
            c.continued.push(ack.continued.is_some());
            c.next_version
                .push(ack.continued.as_ref().and_then(|n| n.version.map(int)));
            c.pay
                .push(ack.status != "running" || ack.custom_mode != 0 || start.is_some());
            c.output.push(ack.output.as_deref());
            c.failure.push(ack.failure.as_deref());
            c.custom_mode.push(ack.custom_mode);
            c.custom.push(ack.custom.as_deref());
            c.input
                .push(ack.continued.as_ref().map(|n| n.input.as_bytes()));
            for (n, event) in ack.events.iter().enumerate() {
                c.event_instance.push(id);
                c.event_execution.push(held.execution);
                c.event_seq
                    .push(held.history_len.saturating_add(count(n as u64 + 1)));
                c.event_body.push(event);
            }
            for &message in &ack.consumed {
                c.consumed_instance.push(id);
                c.consumed_id.push(message);
            }
            for &op in &ack.cancel {
                c.cancel_instance.push(id);
                c.cancel_execution.push(held.execution);
                c.cancel_op.push(op);
            }
            for ((to, at), body) in ack
                .message_to
                .iter()
                .zip(&ack.message_at)
                .zip(&ack.message_body)
            {
                c.message_to.push(to);
                c.message_at.push(*at);
                c.message_body.push(body);
            }
            // The next execution's start, then the messages it carries, after the
            // turn's own messages.
            if let (Some(start), Some(continued)) = (start, &ack.continued) {
                for body in std::iter::once(start).chain(&continued.carried) {
                    c.message_to.push(id);
                    c.message_at.push(None);
                    c.message_body.push(body);
                }
            }
            for child in &ack.children {
                c.children.push(child);
            }
            c.items.extend(&ack.activities);
            for (name, queue) in ack.activities.routes() {
                let lease = left > 0
                    && leasing.is_some_and(|(leasing, limited)| {
                        leasing.queues.contains(queue) && !limited.contains(name)
                    });
                if lease {
                    left -= 1;
                }
                c.leased.push(lease);
            }
            c.scheduled.extend(&ack.items);
        }
        c
    }
}

/// Writes the accepted acks: a few statements for the whole batch, pipelined; returns
/// the items leased to the caller, in ack order. The server runs them in the order they
/// are sent: children before the messages that may be for them, work items before the
/// cancellations that may name them.
pub(super) async fn write(
    tx: &Transaction<'_>,
    accepted: &[Accepted<'_>],
    leasing: Option<(&Leasing, &HashSet<String>)>,
) -> Result<Vec<LeasedWorkItem>> {
    let c = Columns::new(accepted, leasing);
    let lease_for = leasing.map_or(0, |(leasing, _)| leasing.lease_for);
    let leases = c.leased.contains(&true);
    let children = prepare_if(tx, !c.children.is_empty(), INSERT_MANY).await?;
    let turns = tx.prepare_cached(TURNS).await.map_err(db)?;
    let insert = if leases { INSERT_LEASING } else { INSERT_ITEMS };
    let items = prepare_if(tx, !c.items.is_empty(), insert).await?;
    let cancel = prepare_if(tx, !c.cancel_op.is_empty(), CANCEL).await?;
    let messages = prepare_if(tx, !c.message_body.is_empty(), MESSAGES).await?;
    let turn_params: [&(dyn ToSql + Sync); 18] = [
        &c.id,
        &c.status,
        &c.version,
        &c.events,
        &c.continued,
        &c.next_version,
        &c.pay,
        &c.output,
        &c.failure,
        &c.custom_mode,
        &c.custom,
        &c.input,
        &c.event_instance,
        &c.event_execution,
        &c.event_seq,
        &c.event_body,
        &c.consumed_instance,
        &c.consumed_id,
    ];
    let child_params = c.children.params();
    let mut item_params = c.items.params().to_vec();
    if leases {
        item_params.extend([&c.leased as &(dyn ToSql + Sync), &lease_for]);
    }
    let cancel_params: [&(dyn ToSql + Sync); 3] =
        [&c.cancel_instance, &c.cancel_execution, &c.cancel_op];
    let message_params: [&(dyn ToSql + Sync); 3] = [&c.message_to, &c.message_at, &c.message_body];
    let ((), (), leased, (), ()) = tokio::try_join!(
        biased;
        run(tx, children.as_ref(), &child_params),
        run(tx, Some(&turns), &turn_params),
        rows(tx, items.as_ref(), &item_params),
        run(tx, cancel.as_ref(), &cancel_params),
        run(tx, messages.as_ref(), &message_params),
    )?;
    leased
        .iter()
        .map(|row| {
            let n: i64 = col(row, 0)?;
            let item = usize::try_from(n - 1)
                .ok()
                .and_then(|i| c.scheduled.get(i))
                .ok_or_else(|| {
                    ProviderError::new(ErrorKind::Internal, format!("leased item {n} is unknown"))
                })?;
            Ok(LeasedWorkItem {
                lease: LeaseToken::new(from_bits(col(row, 1)?), from_bits(col(row, 2)?)),
                leased_until: timestamp(col(row, 3)?),
                item: (*item).clone(),
                deliveries: 1,
            })
        })
        .collect()
}

/// `sql` prepared (once per connection) when `needed`.
async fn prepare_if(tx: &Transaction<'_>, needed: bool, sql: &str) -> Result<Option<Statement>> {
    if !needed {
        return Ok(None);
    }
    tx.prepare_cached(sql).await.map(Some).map_err(db)
}

/// Runs `statement` if there is one, returning its rows, as [`run`] does.
async fn rows(
    tx: &Transaction<'_>,
    statement: Option<&Statement>,
    params: Params<'_>,
) -> Result<Vec<Row>> {
    match statement {
        Some(statement) => tx.query(statement, params).await.map_err(db),
        None => Ok(Vec::new()),
    }
}

/// Runs `statement` if there is one. Its request is sent when this is first polled,
/// so that statements joined in order reach the server in that order.
async fn run(
    tx: &Transaction<'_>,
    statement: Option<&Statement>,
    params: Params<'_>,
) -> Result<()> {
    if let Some(statement) = statement {
        tx.execute(statement, params).await.map_err(db)?;
    }
    Ok(())
}
