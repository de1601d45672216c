//! The ack that commits a turn, atomically; many acks in one transaction.
//!
//! Everything a turn writes is encoded and size-checked before the transaction
//! begins. In it, one statement locks the instance rows of every ack whose lock is
//! still held: the acks it did not lock are stale, and those whose history would pass
//! its limit (or whose next execution's start would pass the record limit) are
//! rejected too, before anything is written. The accepted acks are then written
//! together by a few set-based statements over arrays that hold the whole batch, sent
//! in one pipeline, so that a batch costs about the round trips of a single ack.
//! Should a write fail for a reason other than the database's availability, each
//! accepted ack is tried again in a transaction of its own: one bad ack changes
//! nothing, while the others commit.

use std::collections::HashMap;

use deadpool_postgres::{Object, Transaction};
use keel_core::{Message, ParentLink, Payload, encode_record};
use keel_provider::{Ack, CustomStatusUpdate, ErrorKind, ProviderError, Result, TurnOutcome};
use tokio_postgres::Statement;
use tokio_postgres::types::ToSql;

use crate::activity::{INSERT_ITEMS, PreparedItems};
use crate::convert::{check_size, col, count, execution, instance_id, int, millis, op, u64_bits};
use crate::error::db;
use crate::instance::{self, INSERT_MANY, PreparedInstance, PreparedInstances};
use crate::provider::PostgresProvider;
use crate::statement::{Params, query};

/// An ack with every record encoded and its sizes checked.
#[derive(Debug)]
struct PreparedAck {
    instance: String,
    token: i64,
    version: Option<i32>,
    events: Vec<Vec<u8>>,
    consumed: Vec<i64>,
    activities: PreparedItems,
    cancel: Vec<i64>,
    message_to: Vec<String>,
    message_at: Vec<Option<i64>>,
    message_body: Vec<Vec<u8>>,
    children: Vec<PreparedInstance>,
    /// 0: unchanged, 1: set to `custom`, 2: cleared.
    custom_mode: i32,
    custom: Option<Vec<u8>>,
    /// The status the turn sets: `running` keeps a paused or suspended one.
    status: &'static str,
    output: Option<Vec<u8>>,
    failure: Option<Vec<u8>>,
    continued: Option<Continued>,
}

/// A continue-as-new: the next execution's input and version, and the encoded
/// messages it carries.
#[derive(Debug)]
struct Continued {
    input: Payload,
    version: Option<u32>,
    carried: Vec<Vec<u8>>,
}

fn prepare(ack: Ack, limit: usize) -> Result<PreparedAck> {
    let id = ack.lock.instance().clone();
    let sized = |what: &dyn Fn() -> String, bytes: Vec<u8>| -> Result<Vec<u8>> {
        check_size(what, bytes.len(), limit)?;
        Ok(bytes)
    };
    let mut events = Vec::with_capacity(ack.events.len());
    for (i, event) in ack.events.iter().enumerate() {
        let what = || format!("event {i} ({}) of the turn of {id}", event.kind.name());
        events.push(sized(&what, encode_record(event)?)?);
    }
    let activities = PreparedItems::new(&ack.activities, limit)?;
    let mut message_to = Vec::with_capacity(ack.messages.len());
    let mut message_at = Vec::with_capacity(ack.messages.len());
    let mut message_body = Vec::with_capacity(ack.messages.len());
    for outgoing in &ack.messages {
        let what = || format!("a message from {id} to {}", outgoing.to);
        message_body.push(sized(&what, encode_record(&outgoing.message)?)?);
        message_to.push(outgoing.to.as_str().to_owned());
        message_at.push(outgoing.visible_at.map(millis));
    }
    let mut children = Vec::with_capacity(ack.children.len());
    for child in ack.children {
        children.push(instance::prepare(child, limit)?);
    }
    let (custom_mode, custom) = match ack.custom_status {
        CustomStatusUpdate::Unchanged => (0, None),
        CustomStatusUpdate::Set(status) => (
            1,
            Some(sized(
                &|| format!("the custom status of {id}"),
                status.into_bytes(),
            )?),
        ),
        CustomStatusUpdate::Cleared => (2, None),
    };
    let failure = |failure: &keel_core::Failure| -> Result<Option<Vec<u8>>> {
        Ok(Some(sized(
            &|| format!("the failure of {id}"),
            encode_record(failure)?,
        )?))
    };
    let (status, output, failure, continued) = match ack.outcome {
        TurnOutcome::Running => ("running", None, None, None),
        TurnOutcome::Completed(output) => (
            "completed",
            Some(sized(
                &|| format!("the output of {id}"),
                output.into_bytes(),
            )?),
            None,
            None,
        ),
        TurnOutcome::Failed(f) => ("failed", None, failure(&f)?, None),
        TurnOutcome::Cancelled(f) => ("cancelled", None, failure(&f)?, None),
        TurnOutcome::ContinuedAsNew {
            input,
            version,
            carried,
        } => {
            check_size(|| format!("the next input of {id}"), input.len(), limit)?;
            let mut encoded = Vec::with_capacity(carried.len());
            for message in &carried {
                let what = || format!("a message {id} carries to its next execution");
                encoded.push(sized(&what, encode_record(message)?)?);
            }
            let continued = Continued {
                input,
                version,
                carried: encoded,
            };
            ("running", None, None, Some(continued))
        }
    };
    Ok(PreparedAck {
        instance: id.as_str().to_owned(),
        token: u64_bits(ack.lock.token()),
        version: ack.version.map(int),
        events,
        consumed: ack.consumed.iter().map(|m| count(m.0)).collect(),
        activities,
        cancel: ack
            .cancel_activities
            .iter()
            .map(|o| u64_bits(o.get()))
            .collect(),
        message_to,
        message_at,
        message_body,
        children,
        custom_mode,
        custom,
        status,
        output,
        failure,
        continued,
    })
}

pub(crate) async fn ack_turns(p: &PostgresProvider, acks: Vec<Ack>) -> Result<Vec<Result<()>>> {
    let limits = p.capabilities_ref();
    let limits = Limits {
        record: limits.max_record_bytes,
        history: count(limits.max_history_events),
    };
    let mut results: Vec<Result<()>> = Vec::with_capacity(acks.len());
    let mut prepared = Vec::with_capacity(acks.len());
    for (i, ack) in acks.into_iter().enumerate() {
        match prepare(ack, limits.record) {
            Ok(ack) => {
                prepared.push((i, ack));
                results.push(Ok(()));
            }
            Err(error) => results.push(Err(error)),
        }
    }
    if prepared.is_empty() {
        return Ok(results);
    }
    let mut client = p.client().await?;
    let batch: Vec<(usize, &PreparedAck)> = prepared.iter().map(|(i, a)| (*i, a)).collect();
    match commit(&mut client, &batch, limits).await {
        Ok(verdicts) => {
            for ((i, _), verdict) in batch.iter().zip(verdicts) {
                results[*i] = verdict;
            }
        }
        Err(error) if batch.len() > 1 && !error.is_retryable() => {
            // Nothing was committed. Alone, each ack commits or fails by itself.
            tracing::warn!(%error, acks = batch.len(), "a batch of acks failed: acking one by one");
            for &(i, ack) in &batch {
                results[i] = match commit(&mut client, &[(i, ack)], limits).await {
                    Ok(mut verdicts) => verdicts.pop().unwrap_or(Ok(())),
                    Err(error) => Err(error),
                };
            }
        }
        Err(error) => return Err(error),
    }
    Ok(results)
}

/// The limits an ack is checked against.
#[derive(Debug, Clone, Copy)]
struct Limits {
    record: usize,
    history: i64,
}

/// Locks the instance rows of the acks whose lock is still held (in id order, so that
/// concurrent batches lock in one order); each row comes with the ack's token.
const LOCK: &str = "\
SELECT i.id, a.token, i.history_len, i.execution, i.name, i.parent_instance, \
  i.parent_execution, i.parent_op \
FROM instances i JOIN unnest($1::text[], $2::bigint[]) AS a (id, token) \
  ON i.id = a.id AND i.lock_token = a.token \
WHERE i.locked_until > keel_now() \
ORDER BY i.id FOR UPDATE OF i";

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

/// What the lock statement read of an instance whose lock an ack holds.
#[derive(Debug)]
struct Held {
    history_len: i64,
    execution: i32,
    name: String,
    parent: Option<ParentLink>,
}

/// An accepted ack, with what it writes that depends on its instance's row.
#[derive(Debug)]
struct Accepted<'a> {
    ack: &'a PreparedAck,
    held: Held,
    /// The start message of the next execution, on continue-as-new.
    start: Option<Vec<u8>>,
}

/// Commits the acks that hold their locks in one transaction; returns one verdict per
/// ack, in order. An error means nothing was committed.
async fn commit(
    client: &mut Object,
    acks: &[(usize, &PreparedAck)],
    limits: Limits,
) -> Result<Vec<Result<()>>> {
    let tx = client.transaction().await.map_err(db)?;
    let ids: Vec<&str> = acks.iter().map(|(_, a)| a.instance.as_str()).collect();
    let tokens: Vec<i64> = acks.iter().map(|(_, a)| a.token).collect();
    let rows = query(&tx, LOCK, &[&ids, &tokens]).await?;
    let mut held = HashMap::with_capacity(rows.len());
    for row in &rows {
        let parent = match col::<Option<String>>(row, 5)? {
            Some(parent) => Some(ParentLink {
                instance: instance_id(parent)?,
                execution: execution(col::<Option<i32>>(row, 6)?.unwrap_or(0))?,
                op: op(col::<Option<i64>>(row, 7)?.unwrap_or(0)),
            }),
            None => None,
        };
        let key = (col::<String>(row, 0)?, col::<i64>(row, 1)?);
        let value = Held {
            history_len: col(row, 2)?,
            execution: col(row, 3)?,
            name: col(row, 4)?,
            parent,
        };
        held.insert(key, value);
    }
    let mut verdicts = Vec::with_capacity(acks.len());
    let mut accepted = Vec::with_capacity(acks.len());
    // A row serves one ack: an ack accepted earlier in the batch released the lock.
    for &(_, ack) in acks {
        let key = (ack.instance.clone(), ack.token);
        let verdict = match held.get(&key).map(|row| check(ack, row, limits)) {
            None => Err(stale(&ack.instance)),
            // Rejected: the lock stays, and a later ack with it may commit.
            Some(Err(error)) => Err(error),
            Some(Ok(start)) => {
                if let Some(row) = held.remove(&key) {
                    accepted.push(Accepted {
                        ack,
                        held: row,
                        start,
                    });
                }
                Ok(())
            }
        };
        verdicts.push(verdict);
    }
    if !accepted.is_empty() {
        write(&tx, &accepted).await?;
    }
    tx.commit().await.map_err(db)?;
    Ok(verdicts)
}

fn stale(instance: &str) -> ProviderError {
    ProviderError::stale(format!("the lock on instance {instance}"))
}

/// Checks what an ack can only be checked against its instance's row: the history's
/// length and, on continue-as-new, the next execution's start message, which it
/// returns.
fn check(ack: &PreparedAck, held: &Held, limits: Limits) -> Result<Option<Vec<u8>>> {
    let id = ack.instance.as_str();
    let len = held
        .history_len
        .saturating_add(count(ack.events.len() as u64));
    if len > limits.history {
        return Err(ProviderError::new(
            ErrorKind::TooLarge,
            format!(
                "the history of {id} would hold {len} events, over the limit of {} events",
                limits.history
            ),
        ));
    }
    ack.continued
        .as_ref()
        .map(|continued| next_start(id, held, continued, limits.record))
        .transpose()
}

/// The start message of the next execution of a continue-as-new, size-checked.
fn next_start(id: &str, held: &Held, continued: &Continued, limit: usize) -> Result<Vec<u8>> {
    let next = execution(held.execution)?.next();
    let start = encode_record(&Message::Start {
        execution: next,
        name: held.name.clone(),
        version: continued.version,
        input: continued.input.clone(),
        parent: held.parent.clone(),
    })?;
    check_size(
        || format!("the start message of {id}'s next execution"),
        start.len(),
        limit,
    )?;
    Ok(start)
}

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
}

impl<'a> Columns<'a> {
    fn new(accepted: &'a [Accepted<'a>]) -> Self {
        let mut c = Self::default();
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
        }
        c
    }
}

/// Writes the accepted acks: a few statements for the whole batch, pipelined. The
/// server runs them in the order they are sent: children before the messages that may
/// be for them, work items before the cancellations that may name them.
async fn write(tx: &Transaction<'_>, accepted: &[Accepted<'_>]) -> Result<()> {
    let c = Columns::new(accepted);
    let children = prepare_if(tx, !c.children.is_empty(), INSERT_MANY).await?;
    let turns = tx.prepare_cached(TURNS).await.map_err(db)?;
    let items = prepare_if(tx, !c.items.is_empty(), INSERT_ITEMS).await?;
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
    let item_params = c.items.params();
    let cancel_params: [&(dyn ToSql + Sync); 3] =
        [&c.cancel_instance, &c.cancel_execution, &c.cancel_op];
    let message_params: [&(dyn ToSql + Sync); 3] = [&c.message_to, &c.message_at, &c.message_body];
    tokio::try_join!(
        biased;
        run(tx, children.as_ref(), &child_params),
        run(tx, Some(&turns), &turn_params),
        run(tx, items.as_ref(), &item_params),
        run(tx, cancel.as_ref(), &cancel_params),
        run(tx, messages.as_ref(), &message_params),
    )?;
    Ok(())
}

/// `sql` prepared (once per connection) when `needed`.
async fn prepare_if(tx: &Transaction<'_>, needed: bool, sql: &str) -> Result<Option<Statement>> {
    if !needed {
        return Ok(None);
    }
    tx.prepare_cached(sql).await.map(Some).map_err(db)
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
