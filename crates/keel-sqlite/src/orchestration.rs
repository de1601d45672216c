//! The orchestrator queue: fetching instances under a lock, renewing, abandoning and
//! suspending, and the ack that commits a turn.

use std::time::Duration;

use keel_core::{Event, InstanceId, Message, ParentLink, Payload, decode_record, encode_record};
use keel_provider::{
    Ack, CustomStatusUpdate, ErrorKind, FetchOrchestrations, LockToken, MessageId,
    OrchestrationWork, ProviderError, QueuedMessage, Result, TurnOutcome, WorkKind,
};
use sqlx::sqlite::SqliteRow;

use crate::activity::{self, PreparedItem};
use crate::convert::{
    check_size, col, count, execution, from_bits, instance_id, later, millis, op, small, status,
    timestamp, u64_bits, uncount,
};
use crate::error::db;
use crate::instance::{self, PreparedInstance};
use crate::provider::SqliteProvider;
use crate::writer::{WriteCtx, allocate_tokens};

pub(crate) async fn fetch(
    p: &SqliteProvider,
    request: FetchOrchestrations,
) -> Result<Vec<OrchestrationWork>> {
    let max = request
        .max_instances
        .min(p.inner.capabilities.max_fetch_instances);
    if max == 0 {
        return Ok(Vec::new());
    }
    p.inner
        .wake
        .fetched(WorkKind::Orchestrations, p.clock_now());
    p.write(move |ctx| Box::pin(fetch_tx(ctx, max, request.lock_for, request.with_history)))
        .await
}

async fn fetch_tx(
    ctx: &mut WriteCtx,
    max: usize,
    lock_for: Duration,
    with_history: bool,
) -> Result<Vec<OrchestrationWork>> {
    let now = ctx.now();
    // Instances with a visible message, not locked (or the lock expired), neither
    // paused nor suspended: highest priority first, then the oldest message.
    let candidates = sqlx::query(
        "SELECT i.id, i.name, i.version, i.status, i.execution, i.history_len \
         FROM instances i \
         JOIN (SELECT instance, MIN(id) AS oldest FROM messages WHERE visible_at <= ?1 \
               GROUP BY instance) m ON m.instance = i.id \
         WHERE (i.locked_until IS NULL OR i.locked_until <= ?1) \
           AND i.status NOT IN ('paused', 'suspended') \
         ORDER BY i.priority DESC, m.oldest LIMIT ?2",
    )
    .bind(millis(now))
    .bind(count(max as u64))
    .fetch_all(&mut ctx.conn)
    .await
    .map_err(db)?;
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    let first_token = allocate_tokens(ctx, candidates.len()).await?;
    let locked_until = later(now, lock_for);
    let mut work = Vec::with_capacity(candidates.len());
    for (token, row) in (first_token..).zip(&candidates) {
        let id: String = col(row, 0)?;
        match claim(ctx, row, token, locked_until, with_history).await {
            Ok(claimed) => work.push(claimed),
            Err(error) if error.kind() == ErrorKind::Corrupt => {
                // Set aside, not returned: a human (or a fixed build) resumes it.
                tracing::warn!(instance = %id, %error, "suspending an undecodable instance");
                sqlx::query(
                    "UPDATE instances SET status = 'suspended', status_reason = ?2, \
                     updated_at = ?3 WHERE id = ?1",
                )
                .bind(&id)
                .bind(format!("stored data cannot be decoded: {error}"))
                .bind(millis(now))
                .execute(&mut ctx.conn)
                .await
                .map_err(db)?;
            }
            Err(error) => return Err(error),
        }
    }
    Ok(work)
}

/// Reads one candidate's messages (and history), then locks it.
async fn claim(
    ctx: &mut WriteCtx,
    row: &SqliteRow,
    token: i64,
    locked_until: i64,
    with_history: bool,
) -> Result<OrchestrationWork> {
    let id: String = col(row, 0)?;
    let instance = instance_id(id.clone())?;
    let current = execution(col(row, 4)?)?;
    let now = millis(ctx.now());
    let rows = sqlx::query(
        "SELECT id, enqueued_at, body FROM messages WHERE instance = ?1 AND visible_at <= ?2 \
         ORDER BY id",
    )
    .bind(&id)
    .bind(now)
    .fetch_all(&mut ctx.conn)
    .await
    .map_err(db)?;
    let mut messages = Vec::with_capacity(rows.len());
    for row in &rows {
        messages.push(QueuedMessage {
            id: MessageId(uncount(col(row, 0)?, "a message id")?),
            enqueued_at: timestamp(col(row, 1)?),
            message: decode_record::<Message>(&col::<Vec<u8>>(row, 2)?)?,
        });
    }
    let history = if with_history {
        let rows = sqlx::query(
            "SELECT event FROM history WHERE instance = ?1 AND execution = ?2 ORDER BY seq",
        )
        .bind(&id)
        .bind(i64::from(current.get()))
        .fetch_all(&mut ctx.conn)
        .await
        .map_err(db)?;
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            events.push(decode_record::<Event>(&col::<Vec<u8>>(row, 0)?)?);
        }
        Some(events)
    } else {
        None
    };
    let work = OrchestrationWork {
        lock: LockToken::new(instance, from_bits(token)),
        locked_until: timestamp(locked_until),
        name: col(row, 1)?,
        version: col::<Option<i64>>(row, 2)?
            .map(|v| small(v, "version"))
            .transpose()?,
        status: status(&col::<String>(row, 3)?)?,
        execution: current,
        history_len: uncount(col(row, 5)?, "history length")?,
        history,
        messages,
    };
    sqlx::query("UPDATE instances SET lock_token = ?2, locked_until = ?3 WHERE id = ?1")
        .bind(&id)
        .bind(token)
        .bind(locked_until)
        .execute(&mut ctx.conn)
        .await
        .map_err(db)?;
    Ok(work)
}

fn stale(lock: &LockToken) -> ProviderError {
    ProviderError::stale(format!("the lock on instance {}", lock.instance()))
}

/// What to do to a held lock.
#[derive(Debug)]
enum LockChange {
    /// Hold it until now + this.
    Renew(Duration),
    /// Release it; fetchable again after this.
    Abandon(Duration),
    /// Release it and suspend the instance for this reason.
    Suspend(String),
}

/// Applies `change` to a held lock (the token matches and has not expired); `Stale`,
/// changing nothing, otherwise.
async fn change_lock(p: &SqliteProvider, lock: &LockToken, change: LockChange) -> Result<()> {
    let lock = lock.clone();
    p.write(move |ctx| {
        Box::pin(async move {
            let now_ts = ctx.now();
            let now = millis(now_ts);
            let query = match &change {
                LockChange::Renew(extend) => sqlx::query(
                    "UPDATE instances SET locked_until = ?4 \
                     WHERE id = ?1 AND lock_token = ?2 AND locked_until > ?3",
                )
                .bind(lock.instance().as_str())
                .bind(u64_bits(lock.token()))
                .bind(now)
                .bind(later(now_ts, *extend)),
                // The token goes, so the old holder is stale at once; `locked_until`
                // stays as the time the instance may be fetched again.
                LockChange::Abandon(delay) => sqlx::query(
                    "UPDATE instances SET lock_token = NULL, locked_until = ?4 \
                     WHERE id = ?1 AND lock_token = ?2 AND locked_until > ?3",
                )
                .bind(lock.instance().as_str())
                .bind(u64_bits(lock.token()))
                .bind(now)
                .bind(later(now_ts, *delay)),
                LockChange::Suspend(reason) => sqlx::query(
                    "UPDATE instances SET status = 'suspended', status_reason = ?4, \
                     lock_token = NULL, locked_until = NULL, updated_at = ?3 \
                     WHERE id = ?1 AND lock_token = ?2 AND locked_until > ?3",
                )
                .bind(lock.instance().as_str())
                .bind(u64_bits(lock.token()))
                .bind(now)
                .bind(reason.as_str()),
            };
            let changed = query
                .execute(&mut ctx.conn)
                .await
                .map_err(db)?
                .rows_affected();
            if changed == 0 {
                return Err(stale(&lock));
            }
            if matches!(change, LockChange::Abandon(_)) {
                ctx.wake(WorkKind::Orchestrations);
            }
            Ok(())
        })
    })
    .await
}

pub(crate) async fn renew(p: &SqliteProvider, lock: &LockToken, extend: Duration) -> Result<()> {
    change_lock(p, lock, LockChange::Renew(extend)).await
}

pub(crate) async fn abandon(p: &SqliteProvider, lock: &LockToken, delay: Duration) -> Result<()> {
    change_lock(p, lock, LockChange::Abandon(delay)).await
}

pub(crate) async fn suspend(p: &SqliteProvider, lock: &LockToken, reason: &str) -> Result<()> {
    change_lock(p, lock, LockChange::Suspend(reason.to_owned())).await
}

/// The custom status an ack leaves.
#[derive(Debug)]
enum Custom {
    Unchanged,
    Set(Vec<u8>),
    Cleared,
}

/// How the execution stands, encoded.
#[derive(Debug)]
enum Outcome {
    Running,
    /// A terminal status, with its output or failure.
    Ended {
        status: &'static str,
        output: Option<Vec<u8>>,
        failure: Option<Vec<u8>>,
    },
    ContinuedAsNew {
        input: Payload,
        version: Option<u32>,
        carried: Vec<Vec<u8>>,
    },
}

/// An ack with every record encoded and its sizes checked, off the writer.
#[derive(Debug)]
struct PreparedAck {
    lock: LockToken,
    version: Option<i64>,
    consumed: Vec<i64>,
    events: Vec<Vec<u8>>,
    activities: Vec<PreparedItem>,
    cancel: Vec<i64>,
    messages: Vec<(String, Option<i64>, Vec<u8>)>,
    children: Vec<PreparedInstance>,
    custom: Custom,
    outcome: Outcome,
}

fn prepare_ack(ack: Ack, limit: usize) -> Result<PreparedAck> {
    let id = ack.lock.instance().clone();
    let checked = |what: &dyn Fn() -> String, bytes: Vec<u8>| -> Result<Vec<u8>> {
        check_size(what, bytes.len(), limit)?;
        Ok(bytes)
    };
    let mut events = Vec::with_capacity(ack.events.len());
    for (i, event) in ack.events.iter().enumerate() {
        let what = || format!("event {i} ({}) of the turn of {id}", event.kind.name());
        events.push(checked(&what, encode_record(event)?)?);
    }
    let mut activities = Vec::with_capacity(ack.activities.len());
    for item in &ack.activities {
        activities.push(activity::prepare_item(item, limit)?);
    }
    let mut messages = Vec::with_capacity(ack.messages.len());
    for outgoing in &ack.messages {
        let what = || format!("a message from {id} to {}", outgoing.to);
        let body = checked(&what, encode_record(&outgoing.message)?)?;
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
    let custom = match ack.custom_status {
        CustomStatusUpdate::Unchanged => Custom::Unchanged,
        CustomStatusUpdate::Cleared => Custom::Cleared,
        CustomStatusUpdate::Set(status) => Custom::Set(checked(
            &|| format!("the custom status of {id}"),
            status.into_bytes(),
        )?),
    };
    let ended = |status, output, failure: Option<&keel_core::Failure>| -> Result<Outcome> {
        let failure = match failure {
            Some(failure) => Some(checked(
                &|| format!("the failure of {id}"),
                encode_record(failure)?,
            )?),
            None => None,
        };
        Ok(Outcome::Ended {
            status,
            output,
            failure,
        })
    };
    let outcome = match ack.outcome {
        TurnOutcome::Running => Outcome::Running,
        TurnOutcome::Completed(output) => ended(
            "completed",
            Some(checked(
                &|| format!("the output of {id}"),
                output.into_bytes(),
            )?),
            None,
        )?,
        TurnOutcome::Failed(failure) => ended("failed", None, Some(&failure))?,
        TurnOutcome::Cancelled(failure) => ended("cancelled", None, Some(&failure))?,
        TurnOutcome::ContinuedAsNew {
            input,
            version,
            carried,
        } => {
            check_size(|| format!("the next input of {id}"), input.len(), limit)?;
            let mut encoded = Vec::with_capacity(carried.len());
            for message in &carried {
                let what = || format!("a message {id} carries to its next execution");
                encoded.push(checked(&what, encode_record(message)?)?);
            }
            Outcome::ContinuedAsNew {
                input,
                version,
                carried: encoded,
            }
        }
    };
    Ok(PreparedAck {
        version: ack.version.map(i64::from),
        consumed: ack.consumed.iter().map(|m| count(m.0)).collect(),
        cancel: ack
            .cancel_activities
            .iter()
            .map(|o| u64_bits(o.get()))
            .collect(),
        lock: ack.lock,
        events,
        activities,
        messages,
        children,
        custom,
        outcome,
    })
}

pub(crate) async fn ack_turns(p: &SqliteProvider, acks: Vec<Ack>) -> Result<Vec<Result<()>>> {
    let limits = &p.inner.capabilities;
    let (max_record, max_history) = (limits.max_record_bytes, limits.max_history_events);
    let mut results: Vec<Option<Result<()>>> = Vec::with_capacity(acks.len());
    let mut prepared = Vec::new();
    for (i, ack) in acks.into_iter().enumerate() {
        match prepare_ack(ack, max_record) {
            Ok(ack) => {
                prepared.push((i, ack));
                results.push(None);
            }
            Err(error) => results.push(Some(Err(error))),
        }
    }
    if !prepared.is_empty() {
        let (indexes, prepared): (Vec<usize>, Vec<PreparedAck>) = prepared.into_iter().unzip();
        let committed = p
            .write_each(prepared, move |ctx, ack| {
                Box::pin(async move {
                    ctx.wake(WorkKind::Orchestrations);
                    ack_one(ctx, &ack, max_history, max_record).await
                })
            })
            .await?;
        let committed = indexes.into_iter().zip(committed);
        for (i, result) in committed {
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

/// Commits one turn; the caller's savepoint undoes it on error.
async fn ack_one(
    ctx: &mut WriteCtx,
    ack: &PreparedAck,
    max_history: u64,
    max_record: usize,
) -> Result<()> {
    let now = millis(ctx.now());
    let id = ack.lock.instance().as_str();
    let row = sqlx::query(
        "SELECT execution, history_len, name, parent_instance, parent_execution, parent_op \
         FROM instances WHERE id = ?1 AND lock_token = ?2 AND locked_until > ?3",
    )
    .bind(id)
    .bind(u64_bits(ack.lock.token()))
    .bind(now)
    .fetch_optional(&mut ctx.conn)
    .await
    .map_err(db)?
    .ok_or_else(|| stale(&ack.lock))?;
    let current: i64 = col(&row, 0)?;
    let history_len = uncount(col(&row, 1)?, "history length")?;
    let new_len = history_len.saturating_add(ack.events.len() as u64);
    if new_len > max_history {
        return Err(ProviderError::new(
            ErrorKind::TooLarge,
            format!(
                "the history of {id} would hold {new_len} events, over the limit of \
                 {max_history} events"
            ),
        ));
    }
    for (seq, event) in (count(history_len)..).zip(&ack.events) {
        sqlx::query(
            "INSERT INTO history (instance, execution, seq, event) VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(id)
        .bind(current)
        .bind(seq)
        .bind(event)
        .execute(&mut ctx.conn)
        .await
        .map_err(db)?;
    }
    for item in &ack.activities {
        activity::insert_item(&mut ctx.conn, item, now).await?;
    }
    if !ack.activities.is_empty() {
        ctx.wake(WorkKind::Activities);
    }
    for &cancel in &ack.cancel {
        activity::cancel(&mut ctx.conn, id, current, cancel, now).await?;
    }
    // Children first, so that messages to them (a cancel in the same turn) find them.
    for child in &ack.children {
        instance::insert(ctx, child).await?;
    }
    for (to, visible_at, body) in &ack.messages {
        // A message to an instance that no longer exists (a report to a deleted parent)
        // would never be fetched: it is dropped rather than left behind.
        sqlx::query(
            "INSERT INTO messages (instance, visible_at, enqueued_at, body) \
             SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM instances WHERE id = ?1)",
        )
        .bind(to)
        .bind(visible_at.unwrap_or(now))
        .bind(now)
        .bind(body)
        .execute(&mut ctx.conn)
        .await
        .map_err(db)?;
    }
    for &message in &ack.consumed {
        sqlx::query("DELETE FROM messages WHERE id = ?1 AND instance = ?2")
            .bind(message)
            .bind(id)
            .execute(&mut ctx.conn)
            .await
            .map_err(db)?;
    }
    match &ack.custom {
        Custom::Unchanged => {}
        Custom::Set(status) => set_custom_status(ctx, id, Some(status)).await?,
        Custom::Cleared => set_custom_status(ctx, id, None).await?,
    }
    match &ack.outcome {
        Outcome::Running => {
            sqlx::query(
                "UPDATE instances SET status = CASE WHEN status = 'pending' THEN 'running' \
                 ELSE status END, version = COALESCE(?2, version), history_len = ?3, \
                 lock_token = NULL, locked_until = NULL, acked = 1, updated_at = ?4 \
                 WHERE id = ?1",
            )
            .bind(id)
            .bind(ack.version)
            .bind(count(new_len))
            .bind(now)
            .execute(&mut ctx.conn)
            .await
            .map_err(db)?;
        }
        Outcome::Ended {
            status,
            output,
            failure,
        } => {
            sqlx::query(
                "UPDATE instances SET status = ?2, status_reason = NULL, output = ?3, \
                 failure = ?4, completed_at = ?5, version = COALESCE(?6, version), \
                 history_len = ?7, lock_token = NULL, locked_until = NULL, acked = 1, \
                 updated_at = ?5 WHERE id = ?1",
            )
            .bind(id)
            .bind(*status)
            .bind(output.as_deref())
            .bind(failure.as_deref())
            .bind(now)
            .bind(ack.version)
            .bind(count(new_len))
            .execute(&mut ctx.conn)
            .await
            .map_err(db)?;
        }
        Outcome::ContinuedAsNew {
            input,
            version,
            carried,
        } => {
            let next = execution(current)?.next();
            let parent = match col::<Option<String>>(&row, 3)? {
                Some(parent) => Some(ParentLink {
                    instance: InstanceId::new(parent)
                        .map_err(|e| crate::error::corrupt(format!("the parent of {id}: {e}")))?,
                    execution: execution(col::<Option<i64>>(&row, 4)?.unwrap_or(0))?,
                    op: op(col::<Option<i64>>(&row, 5)?.unwrap_or(0)),
                }),
                None => None,
            };
            let start = encode_record(&Message::Start {
                execution: next,
                name: col(&row, 2)?,
                version: *version,
                input: input.clone(),
                parent,
            })?;
            check_size(
                || format!("the start message of {id}'s next execution"),
                start.len(),
                max_record,
            )?;
            sqlx::query(
                "UPDATE instances SET status = CASE WHEN status IN ('paused', 'suspended') \
                 THEN status ELSE 'running' END, execution = ?2, input = ?3, version = ?4, \
                 output = NULL, failure = NULL, history_len = 0, lock_token = NULL, \
                 locked_until = NULL, acked = 1, updated_at = ?5 WHERE id = ?1",
            )
            .bind(id)
            .bind(i64::from(next.get()))
            .bind(input.as_bytes())
            .bind(version.map(i64::from))
            .bind(now)
            .execute(&mut ctx.conn)
            .await
            .map_err(db)?;
            instance::insert_message(&mut ctx.conn, id, now, now, &start).await?;
            for body in carried {
                instance::insert_message(&mut ctx.conn, id, now, now, body).await?;
            }
        }
    }
    Ok(())
}

async fn set_custom_status(ctx: &mut WriteCtx, id: &str, status: Option<&Vec<u8>>) -> Result<()> {
    sqlx::query("UPDATE instances SET custom_status = ?2 WHERE id = ?1")
        .bind(id)
        .bind(status.map(Vec::as_slice))
        .execute(&mut ctx.conn)
        .await
        .map_err(db)?;
    Ok(())
}
