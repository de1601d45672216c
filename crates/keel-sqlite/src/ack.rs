//! The ack that commits a turn, atomically.
//!
//! Everything a turn writes is encoded and size-checked before it reaches the writer.
//! On the writer, one turn is one multi-statement round trip: the first statement
//! claims the instance row (lock held, history within its limit) by marking its lock
//! token with `-1`, every following statement acts only while that mark is there,
//! and the last one releases the lock. A stale lock makes the whole list a no-op.
//! Children and continue-as-new, which need more than a fixed statement list, take a
//! few more round trips, inside a savepoint of their own.

use keel_core::{Message, ParentLink, Payload, encode_record};
use keel_provider::{
    Ack, CustomStatusUpdate, ErrorKind, ProviderError, Result, TurnOutcome, WorkKind,
};
use serde_json::{Value, json};

use crate::activity::{PreparedItem, prepare_item};
use crate::convert::{
    check_size, col, count, execution, hex, instance_id, int_array, millis, op, u64_bits,
};
use crate::error::db;
use crate::instance::{self, PreparedInstance};
use crate::provider::SqliteProvider;
use crate::writer::{WriteCtx, end_savepoint, savepoint};

/// An ack with every record encoded and its sizes checked, off the writer, in the
/// shapes the ack's statements bind.
#[derive(Debug)]
struct PreparedAck {
    instance: String,
    token: i64,
    version: Option<i64>,
    /// Events appended, a JSON array of hex blobs.
    events: String,
    event_count: i64,
    /// Consumed message ids, a JSON array.
    consumed: String,
    /// Work items, a JSON array of `[instance, execution, op, name, queue, priority,
    /// attempt, hex body]`.
    activities: String,
    has_activities: bool,
    /// Cancelled op ids, a JSON array.
    cancel: String,
    /// Outgoing messages, a JSON array of `[to, visible_at or null, hex body]`.
    messages: String,
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
        events.push(Value::String(hex(&sized(&what, encode_record(event)?)?)));
    }
    let mut activities = Vec::with_capacity(ack.activities.len());
    for item in &ack.activities {
        let PreparedItem {
            instance,
            execution,
            op,
            name,
            queue,
            priority,
            attempt,
            body,
        } = prepare_item(item, limit)?;
        activities.push(json!([
            instance,
            execution,
            op,
            name,
            queue,
            priority,
            attempt,
            hex(&body)
        ]));
    }
    let mut messages = Vec::with_capacity(ack.messages.len());
    for outgoing in &ack.messages {
        let what = || format!("a message from {id} to {}", outgoing.to);
        let body = sized(&what, encode_record(&outgoing.message)?)?;
        messages.push(json!([
            outgoing.to.as_str(),
            outgoing.visible_at.map(millis),
            hex(&body)
        ]));
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
        event_count: count(events.len() as u64),
        events: Value::Array(events).to_string(),
        consumed: int_array(ack.consumed.iter().map(|m| count(m.0))),
        has_activities: !activities.is_empty(),
        activities: Value::Array(activities).to_string(),
        cancel: int_array(ack.cancel_activities.iter().map(|o| u64_bits(o.get()))),
        messages: Value::Array(messages).to_string(),
        children,
        custom_mode,
        custom,
        status,
        output,
        failure,
        continued,
    })
}

pub(crate) async fn ack_turns(p: &SqliteProvider, acks: Vec<Ack>) -> Result<Vec<Result<()>>> {
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
    if !prepared.is_empty() {
        let max_history = count(max_history);
        let committed = p
            .write(move |ctx| Box::pin(ack_all(ctx, prepared, max_history, max_record)))
            .await?;
        for (i, result) in indexes.into_iter().zip(committed) {
            if let Some(slot) = results.get_mut(i) {
                *slot = Some(result);
            }
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(ProviderError::new(ErrorKind::Internal, "ack lost"))))
        .collect())
}

/// The statements of one turn; see the module's documentation.
const ACK: &str = "\
UPDATE instances SET lock_token = -1 \
 WHERE id = ?1 AND lock_token = ?2 AND locked_until > ?3 AND history_len + ?4 <= ?5; \
INSERT INTO history (instance, execution, seq, event) \
 SELECT i.id, i.execution, i.history_len + j.key, unhex(j.value) \
 FROM instances i, json_each(?6) AS j WHERE i.id = ?1 AND i.lock_token = -1; \
INSERT INTO work_items (instance, execution, op, name, queue, priority, attempt, \
   visible_at, created_at, body) \
 SELECT j.value ->> 0, j.value ->> 1, j.value ->> 2, j.value ->> 3, j.value ->> 4, \
   j.value ->> 5, j.value ->> 6, ?3, ?3, unhex(j.value ->> 7) \
 FROM json_each(?9) AS j \
 WHERE EXISTS (SELECT 1 FROM instances WHERE id = ?1 AND lock_token = -1) \
 ORDER BY j.key; \
DELETE FROM work_items WHERE instance = ?1 \
 AND execution = (SELECT execution FROM instances WHERE id = ?1 AND lock_token = -1) \
 AND op IN (SELECT value FROM json_each(?10)) \
 AND (lease_token IS NULL OR visible_at <= ?3); \
UPDATE work_items SET cancelled = 1 WHERE instance = ?1 \
 AND execution = (SELECT execution FROM instances WHERE id = ?1 AND lock_token = -1) \
 AND op IN (SELECT value FROM json_each(?10)) \
 AND lease_token IS NOT NULL AND visible_at > ?3; \
INSERT INTO messages (instance, priority, ready, visible_at, enqueued_at, body) \
 SELECT t.id, t.priority, COALESCE(j.value ->> 1, ?3) <= ?3, COALESCE(j.value ->> 1, ?3), \
   ?3, unhex(j.value ->> 2) \
 FROM json_each(?11) AS j JOIN instances t ON t.id = j.value ->> 0 \
 WHERE EXISTS (SELECT 1 FROM instances WHERE id = ?1 AND lock_token = -1) \
 ORDER BY j.key; \
DELETE FROM messages WHERE instance = ?1 AND id IN (SELECT value FROM json_each(?7)) \
 AND EXISTS (SELECT 1 FROM instances WHERE id = ?1 AND lock_token = -1); \
UPDATE instances SET \
 status = CASE WHEN ?14 = 'running' \
   THEN (CASE WHEN status = 'pending' THEN 'running' ELSE status END) ELSE ?14 END, \
 status_reason = CASE WHEN ?14 = 'running' THEN status_reason ELSE NULL END, \
 output = CASE WHEN ?14 = 'running' THEN output ELSE ?15 END, \
 failure = CASE WHEN ?14 = 'running' THEN failure ELSE ?16 END, \
 completed_at = CASE WHEN ?14 = 'running' THEN completed_at ELSE ?3 END, \
 custom_status = CASE ?12 WHEN 0 THEN custom_status WHEN 1 THEN ?13 ELSE NULL END, \
 version = COALESCE(?8, version), history_len = history_len + ?4, \
 lock_token = NULL, locked_until = NULL, acked = 1, updated_at = ?3 \
 WHERE id = ?1 AND lock_token = -1 \
 RETURNING execution";

/// More spare arguments than [`ACK`]'s statements leave parameter slots unused.
const UNUSED_SLOTS: usize = 64;

/// Commits the turns in order, one result each.
///
/// A plain turn needs no savepoint of its own: rejected (stale lock, history limit),
/// it wrote nothing. One that creates children or continues as new writes before or
/// after its check, so it gets a savepoint and fails alone. A failing statement fails
/// the whole request, whose savepoint then undoes every turn of it.
async fn ack_all(
    ctx: &mut WriteCtx,
    acks: Vec<PreparedAck>,
    max_history: i64,
    max_record: usize,
) -> Result<Vec<Result<()>>> {
    let mut results = Vec::with_capacity(acks.len());
    for ack in &acks {
        if ack.children.is_empty() && ack.continued.is_none() {
            results.push(ack_one(ctx, ack, max_history, max_record).await?);
            continue;
        }
        savepoint(ctx).await?;
        let result = match ack_one(ctx, ack, max_history, max_record).await {
            Ok(result) => result,
            Err(error) => Err(error),
        };
        end_savepoint(ctx, result.is_ok()).await?;
        results.push(result);
    }
    Ok(results)
}

/// Commits one turn. `Ok(Err(_))`: rejected by its check, having written nothing of
/// its own (its children, if any, are the caller's savepoint's to undo); `Err(_)`: a
/// statement failed midway.
async fn ack_one(
    ctx: &mut WriteCtx,
    ack: &PreparedAck,
    max_history: i64,
    max_record: usize,
) -> Result<Result<()>> {
    let now = millis(ctx.now());
    let id = ack.instance.as_str();
    // Children first, so that the turn's messages to them find them; a rejected ack
    // rolls them back with everything else.
    for child in &ack.children {
        instance::insert(ctx, child).await?;
    }
    let mut query = sqlx::query(ACK)
        .bind(id)
        .bind(ack.token)
        .bind(now)
        .bind(ack.event_count)
        .bind(max_history)
        .bind(&ack.events)
        .bind(&ack.consumed)
        .bind(ack.version)
        .bind(&ack.activities)
        .bind(&ack.cancel)
        .bind(&ack.messages)
        .bind(ack.custom_mode)
        .bind(ack.custom.as_deref())
        .bind(ack.status)
        .bind(ack.output.as_deref())
        .bind(ack.failure.as_deref());
    // sqlx-sqlite binds a multi-statement query's `?NNN` parameters by number, but
    // counts each statement's unused lower-numbered slots as positional arguments
    // and stops binding once that count passes the arguments given. Spare NULLs
    // (more than the statements' unused slots, 44) keep it binding every slot.
    for _ in 0..UNUSED_SLOTS {
        query = query.bind(None::<i64>);
    }
    let released = query.fetch_optional(&mut ctx.conn).await.map_err(db)?;
    if released.is_none() {
        return Ok(Err(rejected(ctx, ack, now, max_history).await));
    }
    ctx.wake(WorkKind::Orchestrations);
    if ack.has_activities {
        ctx.wake(WorkKind::Activities);
    }
    if let Some(continued) = &ack.continued {
        continue_as_new(ctx, id, continued, now, max_record).await?;
    }
    Ok(Ok(()))
}

/// Why an ack matched nothing: its history would pass the limit, or (the usual case)
/// its lock is no longer held.
async fn rejected(
    ctx: &mut WriteCtx,
    ack: &PreparedAck,
    now: i64,
    max_history: i64,
) -> ProviderError {
    let held = sqlx::query(
        "SELECT history_len FROM instances WHERE id = ?1 AND lock_token = ?2 AND locked_until > ?3",
    )
    .bind(&ack.instance)
    .bind(ack.token)
    .bind(now)
    .fetch_optional(&mut ctx.conn)
    .await;
    match held {
        Ok(Some(row)) => {
            let len = col::<i64>(&row, 0).unwrap_or(0);
            ProviderError::new(
                ErrorKind::TooLarge,
                format!(
                    "the history of {} would hold {} events, over the limit of {max_history} \
                     events",
                    ack.instance,
                    len.saturating_add(ack.event_count)
                ),
            )
        }
        Ok(None) => ProviderError::stale(format!("the lock on instance {}", ack.instance)),
        Err(error) => db(error),
    }
}

/// Starts the next execution: a fresh history, its start message, then the carried
/// messages.
async fn continue_as_new(
    ctx: &mut WriteCtx,
    id: &str,
    continued: &Continued,
    now: i64,
    max_record: usize,
) -> Result<()> {
    let row = sqlx::query(
        "UPDATE instances SET status = CASE WHEN status IN ('paused', 'suspended') \
         THEN status ELSE 'running' END, execution = execution + 1, input = ?2, version = ?3, \
         output = NULL, failure = NULL, history_len = 0, updated_at = ?4 WHERE id = ?1 \
         RETURNING execution, name, parent_instance, parent_execution, parent_op",
    )
    .bind(id)
    .bind(continued.input.as_bytes())
    .bind(continued.version.map(i64::from))
    .bind(now)
    .fetch_one(&mut ctx.conn)
    .await
    .map_err(db)?;
    let parent = match col::<Option<String>>(&row, 2)? {
        Some(parent) => Some(ParentLink {
            instance: instance_id(parent)?,
            execution: execution(col::<Option<i64>>(&row, 3)?.unwrap_or(0))?,
            op: op(col::<Option<i64>>(&row, 4)?.unwrap_or(0)),
        }),
        None => None,
    };
    let start = encode_record(&Message::Start {
        execution: execution(col(&row, 0)?)?,
        name: col(&row, 1)?,
        version: continued.version,
        input: continued.input.clone(),
        parent,
    })?;
    check_size(
        || format!("the start message of {id}'s next execution"),
        start.len(),
        max_record,
    )?;
    instance::insert_message(&mut ctx.conn, id, now, now, &start).await?;
    for body in &continued.carried {
        instance::insert_message(&mut ctx.conn, id, now, now, body).await?;
    }
    Ok(())
}
