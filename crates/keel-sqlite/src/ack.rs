//! The ack that commits a turn, atomically.
//!
//! Everything a turn writes is encoded and size-checked before it reaches the writer.
//! On the writer, the first statement settles the instance row (status, outcome,
//! history length) and releases its lock, only while the lock is held and the history
//! stays within its limit; it returns the execution and where the new events go. A
//! stale lock makes it match nothing, and then nothing else is written. The turn's
//! events, work items, cancellations and messages follow, one cached statement per
//! record. Children and continue-as-new, which write before or after that check, run
//! inside a savepoint of their own.

use std::collections::HashSet;
use std::time::Duration;

use keel_core::{Message, ParentLink, Payload, WorkItem, encode_record};
use keel_provider::{
    Ack, AckedTurns, CustomStatusUpdate, ErrorKind, FetchActivities, LeaseToken, LeasedWorkItem,
    ProviderError, Result, TurnOutcome, WorkKind,
};

use crate::activity::{PreparedItem, insert_item, limited_names, prepare_item};
use crate::convert::{
    check_size, col, count, execution, from_bits, instance_id, later, millis, op, timestamp,
    u64_bits,
};
use crate::instance::{self, PreparedInstance};
use crate::provider::SqliteProvider;
use crate::query::{self, execute};
use crate::writer::{WriteCtx, allocate_tokens, end_savepoint, savepoint};

/// An ack with every record encoded and its sizes checked, off the writer, in the
/// shapes the ack's statements bind.
#[derive(Debug)]
struct PreparedAck {
    instance: String,
    token: i64,
    version: Option<i64>,
    /// Events appended, encoded.
    events: Vec<Vec<u8>>,
    /// Consumed message ids.
    consumed: Vec<i64>,
    activities: Vec<PreparedItem>,
    /// The same work items as scheduled, for those leased on the way in.
    items: Vec<WorkItem>,
    /// Cancelled op ids.
    cancel: Vec<i64>,
    /// Outgoing messages: the recipient, when visible (none: now), the encoded message.
    messages: Vec<(String, Option<i64>, Vec<u8>)>,
    children: Vec<PreparedInstance>,
    /// 0: unchanged, 1: set to `custom`, 2: cleared.
    custom_mode: i64,
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
    let mut activities = Vec::with_capacity(ack.activities.len());
    for item in &ack.activities {
        activities.push(prepare_item(item, limit)?);
    }
    let mut messages = Vec::with_capacity(ack.messages.len());
    for outgoing in &ack.messages {
        let what = || format!("a message from {id} to {}", outgoing.to);
        let body = sized(&what, encode_record(&outgoing.message)?)?;
        messages.push((
            outgoing.to.as_str().to_owned(),
            outgoing.visible_at.map(millis),
            body,
        ));
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
        version: ack.version.map(i64::from),
        events,
        consumed: ack.consumed.iter().map(|m| count(m.0)).collect(),
        activities,
        items: ack.activities,
        cancel: ack
            .cancel_activities
            .iter()
            .map(|o| u64_bits(o.get()))
            .collect(),
        messages,
        children,
        custom_mode,
        custom,
        status,
        output,
        failure,
        continued,
    })
}

pub(crate) async fn ack_turns(
    p: &SqliteProvider,
    acks: Vec<Ack>,
    lease: Option<FetchActivities>,
) -> Result<AckedTurns> {
    let limits = &p.inner.capabilities;
    let (max_record, max_history) = (limits.max_record_bytes, limits.max_history_events);
    let mut results: Vec<Option<Result<()>>> = Vec::with_capacity(acks.len());
    let mut indexes = Vec::new();
    let mut prepared = Vec::new();
    for (i, ack) in acks.into_iter().enumerate() {
        match prepare(ack, max_record) {
            Ok(ack) => {
                indexes.push(i);
                prepared.push(ack);
                results.push(None);
            }
            Err(error) => results.push(Some(Err(error))),
        }
    }
    let mut leased = Vec::new();
    if !prepared.is_empty() {
        let max_history = count(max_history);
        let eager = lease
            .filter(|lease| lease.max_items > 0)
            .map(|lease| Eager {
                queues: lease.queues.iter().map(|q| q.as_str().to_owned()).collect(),
                max: lease.max_items,
                lease_for: lease.lease_for,
            });
        let committed = p
            .write(move |ctx| ack_all(ctx, &prepared, max_history, max_record, eager.as_ref()))
            .await?;
        for (i, result) in indexes.into_iter().zip(committed) {
            let result = result.map(|mine| leased.extend(mine));
            if let Some(slot) = results.get_mut(i) {
                *slot = Some(result);
            }
        }
    }
    let results = results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(ProviderError::new(ErrorKind::Internal, "ack lost"))))
        .collect();
    Ok(AckedTurns { results, leased })
}

/// What the acks of one call may lease to their caller as they enqueue (eager dispatch).
#[derive(Debug)]
struct Eager {
    queues: HashSet<String>,
    max: usize,
    lease_for: Duration,
}

/// An [`Eager`] request as one transaction applies it: its lease end, the names it
/// leaves to fetches, and how many more items it may lease.
struct Leasing<'a> {
    queues: &'a HashSet<String>,
    limited: HashSet<String>,
    leased_until: i64,
    left: usize,
}

/// Settles the instance row of a turn and releases its lock, while the lock is held
/// and the history stays within its limit (`:max_history`); returns the execution and
/// the sequence number of the turn's first event.
const SETTLE: &str = "\
UPDATE instances SET \
 status = CASE WHEN :status = 'running' \
   THEN (CASE WHEN status = 'pending' THEN 'running' ELSE status END) ELSE :status END, \
 status_reason = CASE WHEN :status = 'running' THEN status_reason ELSE NULL END, \
 output = CASE WHEN :status = 'running' THEN output ELSE :output END, \
 failure = CASE WHEN :status = 'running' THEN failure ELSE :failure END, \
 completed_at = CASE WHEN :status = 'running' THEN completed_at ELSE :now END, \
 custom_status = CASE :custom_mode WHEN 0 THEN custom_status WHEN 1 THEN :custom ELSE NULL END, \
 version = COALESCE(:version, version), history_len = history_len + :events, \
 lock_token = NULL, locked_until = NULL, acked = 1, updated_at = :now \
 WHERE id = :id AND lock_token = :token AND locked_until > :now \
   AND history_len + :events <= :max_history \
 RETURNING execution, history_len - :events";

/// Commits the turns in order, one result each.
///
/// A plain turn needs no savepoint of its own: rejected (stale lock, history limit),
/// it wrote nothing. One that creates children or continues as new writes before or
/// after its check, so it gets a savepoint and fails alone. A failing statement fails
/// the whole request, whose savepoint then undoes every turn of it.
fn ack_all(
    ctx: &mut WriteCtx,
    acks: &[PreparedAck],
    max_history: i64,
    max_record: usize,
    eager: Option<&Eager>,
) -> Result<Vec<Result<Vec<LeasedWorkItem>>>> {
    let mut leasing = match eager {
        Some(eager) => Some(Leasing {
            queues: &eager.queues,
            limited: limited_names(&ctx.conn)?,
            leased_until: later(ctx.now(), eager.lease_for),
            left: eager.max,
        }),
        None => None,
    };
    let mut results = Vec::with_capacity(acks.len());
    for ack in acks {
        let result = if ack.children.is_empty() && ack.continued.is_none() {
            ack_one(ctx, ack, max_history, max_record, leasing.as_mut())?
        } else {
            savepoint(ctx)?;
            let left = leasing.as_ref().map(|l| l.left);
            let result = ack_one(ctx, ack, max_history, max_record, leasing.as_mut())
                .and_then(|result| result);
            end_savepoint(ctx, result.is_ok())?;
            if let (Err(_), Some(leasing), Some(left)) = (&result, leasing.as_mut(), left) {
                leasing.left = left; // rolled back with the rest of the turn
            }
            result
        };
        results.push(result);
    }
    Ok(results)
}

/// Commits one turn. `Ok(Err(_))`: rejected by its check, having written nothing of
/// its own (its children, if any, are the caller's savepoint's to undo); `Err(_)`: a
/// statement failed midway.
fn ack_one(
    ctx: &mut WriteCtx,
    ack: &PreparedAck,
    max_history: i64,
    max_record: usize,
    leasing: Option<&mut Leasing<'_>>,
) -> Result<Result<Vec<LeasedWorkItem>>> {
    let now = millis(ctx.now());
    let id = ack.instance.as_str();
    // Children first, so that the turn's messages to them find them; a rejected ack
    // rolls them back with everything else.
    for child in &ack.children {
        instance::insert(ctx, child)?;
    }
    let event_count = count(ack.events.len() as u64);
    let settled = query::first(
        &ctx.conn,
        SETTLE,
        rusqlite::named_params! {
            ":id": id,
            ":token": ack.token,
            ":now": now,
            ":events": event_count,
            ":max_history": max_history,
            ":version": ack.version,
            ":custom_mode": ack.custom_mode,
            ":custom": ack.custom,
            ":status": ack.status,
            ":output": ack.output,
            ":failure": ack.failure,
        },
        |row| Ok((col::<i64>(row, 0)?, col::<i64>(row, 1)?)),
    )?;
    let Some((execution, first_seq)) = settled else {
        return Ok(Err(rejected(ctx, ack, now, max_history)));
    };
    let leased = insert_items(ctx, ack, now, leasing)?;
    let conn = &ctx.conn;
    for (seq, event) in (first_seq..).zip(&ack.events) {
        execute(
            conn,
            "INSERT INTO history (instance, execution, seq, event) VALUES (?1, ?2, ?3, ?4)",
            (id, execution, seq, event),
        )?;
    }
    // A cancelled item that is queued, or whose lease expired, goes; one that runs
    // under a live lease is marked, for its worker to hear at its next renewal.
    for &op in &ack.cancel {
        execute(
            conn,
            "DELETE FROM work_items WHERE instance = ?1 AND execution = ?2 AND op = ?3 \
             AND (lease_token IS NULL OR visible_at <= ?4)",
            (id, execution, op, now),
        )?;
        execute(
            conn,
            "UPDATE work_items SET cancelled = 1 WHERE instance = ?1 AND execution = ?2 \
             AND op = ?3 AND lease_token IS NOT NULL AND visible_at > ?4",
            (id, execution, op, now),
        )?;
    }
    for (to, visible_at, body) in &ack.messages {
        instance::insert_message(conn, to, visible_at.unwrap_or(now), now, body)?;
    }
    for &message in &ack.consumed {
        execute(
            conn,
            "DELETE FROM messages WHERE id = ?1 AND instance = ?2",
            (message, id),
        )?;
    }
    ctx.wake(WorkKind::Orchestrations);
    if leased.len() < ack.activities.len() {
        ctx.wake(WorkKind::Activities);
    }
    if let Some(continued) = &ack.continued {
        continue_as_new(ctx, id, continued, now, max_record)?;
    }
    Ok(Ok(leased))
}

/// Enqueues the turn's work items, leasing to the caller those `leasing` allows;
/// returns the leased ones.
fn insert_items(
    ctx: &mut WriteCtx,
    ack: &PreparedAck,
    now: i64,
    mut leasing: Option<&mut Leasing<'_>>,
) -> Result<Vec<LeasedWorkItem>> {
    let mut leased = Vec::new();
    for (prepared, item) in ack.activities.iter().zip(&ack.items) {
        let lease = leasing.as_deref_mut().filter(|l| {
            l.left > 0 && l.queues.contains(&prepared.queue) && !l.limited.contains(&prepared.name)
        });
        let Some(lease) = lease else {
            insert_item(&ctx.conn, prepared, now, None)?;
            continue;
        };
        lease.left -= 1;
        let leased_until = lease.leased_until;
        let token = allocate_tokens(ctx, 1)?;
        let id = insert_item(&ctx.conn, prepared, now, Some((token, leased_until)))?;
        leased.push(LeasedWorkItem {
            lease: LeaseToken::new(from_bits(id), from_bits(token)),
            leased_until: timestamp(leased_until),
            item: item.clone(),
            deliveries: 1,
        });
    }
    Ok(leased)
}

/// Why an ack matched nothing: its history would pass the limit, or (the usual case)
/// its lock is no longer held.
fn rejected(ctx: &WriteCtx, ack: &PreparedAck, now: i64, max_history: i64) -> ProviderError {
    let held = query::first(
        &ctx.conn,
        "SELECT history_len FROM instances WHERE id = ?1 AND lock_token = ?2 AND locked_until > ?3",
        (&ack.instance, ack.token, now),
        |row| col::<i64>(row, 0),
    );
    match held {
        Ok(Some(len)) => ProviderError::new(
            ErrorKind::TooLarge,
            format!(
                "the history of {} would hold {} events, over the limit of {max_history} events",
                ack.instance,
                len.saturating_add(count(ack.events.len() as u64))
            ),
        ),
        Ok(None) => ProviderError::stale(format!("the lock on instance {}", ack.instance)),
        Err(error) => error,
    }
}

/// Starts the next execution: a fresh history, its start message, then the carried
/// messages.
fn continue_as_new(
    ctx: &WriteCtx,
    id: &str,
    continued: &Continued,
    now: i64,
    max_record: usize,
) -> Result<()> {
    let (next, name, parent) = query::one(
        &ctx.conn,
        "UPDATE instances SET status = CASE WHEN status IN ('paused', 'suspended') \
         THEN status ELSE 'running' END, execution = execution + 1, input = ?2, version = ?3, \
         output = NULL, failure = NULL, history_len = 0, updated_at = ?4 WHERE id = ?1 \
         RETURNING execution, name, parent_instance, parent_execution, parent_op",
        (
            id,
            continued.input.as_bytes(),
            continued.version.map(i64::from),
            now,
        ),
        |row| {
            let parent = match col::<Option<String>>(row, 2)? {
                Some(parent) => Some(ParentLink {
                    instance: instance_id(parent)?,
                    execution: execution(col::<Option<i64>>(row, 3)?.unwrap_or(0))?,
                    op: op(col::<Option<i64>>(row, 4)?.unwrap_or(0)),
                }),
                None => None,
            };
            Ok((execution(col(row, 0)?)?, col::<String>(row, 1)?, parent))
        },
    )?;
    let start = encode_record(&Message::Start {
        execution: next,
        name,
        version: continued.version,
        input: continued.input.clone(),
        parent,
    })?;
    check_size(
        || format!("the start message of {id}'s next execution"),
        start.len(),
        max_record,
    )?;
    instance::insert_message(&ctx.conn, id, now, now, &start)?;
    for body in &continued.carried {
        instance::insert_message(&ctx.conn, id, now, now, body)?;
    }
    Ok(())
}
