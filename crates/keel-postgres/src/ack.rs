//! The ack that commits a turn, atomically; many acks in one transaction.
//!
//! Everything a turn writes is encoded and size-checked before the transaction
//! begins. In it, each ack runs in a savepoint of its own: its first statement locks
//! the instance row if the lock is still held (and the history within its limit), so
//! a stale ack is rejected before it writes anything; an ack that fails midway rolls
//! back to its savepoint alone, while the others commit.

use deadpool_postgres::Transaction;
use keel_core::{Message, ParentLink, Payload, encode_record};
use keel_provider::{Ack, CustomStatusUpdate, ErrorKind, ProviderError, Result, TurnOutcome};

use crate::activity::{PreparedItems, insert_items};
use crate::convert::{check_size, col, count, execution, instance_id, int, millis, op, u64_bits};
use crate::error::db;
use crate::instance::{self, PreparedInstance, insert_messages};
use crate::provider::PostgresProvider;
use crate::statement::{execute, query_one, query_opt};

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
    let (max_record, max_history) = (limits.max_record_bytes, count(limits.max_history_events));
    let mut results: Vec<Result<()>> = Vec::with_capacity(acks.len());
    let mut prepared = Vec::with_capacity(acks.len());
    for ack in acks {
        match prepare(ack, max_record) {
            Ok(ack) => {
                prepared.push(Some(ack));
                results.push(Ok(()));
            }
            Err(error) => {
                prepared.push(None);
                results.push(Err(error));
            }
        }
    }
    if prepared.iter().all(Option::is_none) {
        return Ok(results);
    }
    let mut client = p.client().await?;
    let mut tx = client.transaction().await.map_err(db)?;
    for (ack, result) in prepared.iter().zip(results.iter_mut()) {
        let Some(ack) = ack else { continue };
        let savepoint = tx.savepoint("keel_ack").await.map_err(db)?;
        match ack_one(&savepoint, ack, max_history, max_record).await {
            Ok(()) => savepoint.commit().await.map_err(db)?,
            Err(error) => {
                // Back to the savepoint: this ack changes nothing, the others go on.
                savepoint.rollback().await.map_err(db)?;
                *result = Err(error);
            }
        }
    }
    tx.commit().await.map_err(db)?;
    Ok(results)
}

/// Commits one turn inside its savepoint, or fails (and the caller rolls it back).
async fn ack_one(
    tx: &Transaction<'_>,
    ack: &PreparedAck,
    max_history: i64,
    max_record: usize,
) -> Result<()> {
    let id = ack.instance.as_str();
    let held = query_opt(
        tx,
        "SELECT history_len, execution FROM instances \
         WHERE id = $1 AND lock_token = $2 AND locked_until > keel_now() FOR UPDATE",
        &[&id, &ack.token],
    )
    .await?
    .ok_or_else(|| ProviderError::stale(format!("the lock on instance {id}")))?;
    let history_len: i64 = col(&held, 0)?;
    let current: i32 = col(&held, 1)?;
    let event_count = count(ack.events.len() as u64);
    if history_len.saturating_add(event_count) > max_history {
        return Err(ProviderError::new(
            ErrorKind::TooLarge,
            format!(
                "the history of {id} would hold {} events, over the limit of {max_history} \
                 events",
                history_len.saturating_add(event_count)
            ),
        ));
    }
    // Children first, so that the turn's messages to them find them.
    for child in &ack.children {
        instance::insert(tx, child).await?;
    }
    if !ack.events.is_empty() {
        execute(
            tx,
            "INSERT INTO history (instance, execution, seq, event) \
             SELECT $1, $2, $3 + e.n, e.event \
             FROM unnest($4::bytea[]) WITH ORDINALITY AS e (event, n)",
            &[&id, &current, &history_len, &ack.events],
        )
        .await?;
    }
    if !ack.activities.is_empty() {
        insert_items(tx, &ack.activities).await?;
    }
    if !ack.cancel.is_empty() {
        // Queued items go; leased ones are marked, so that their renewal fails.
        execute(
            tx,
            "WITH gone AS (DELETE FROM work_items WHERE instance = $1 AND execution = $2 \
               AND op = ANY($3) AND (lease_token IS NULL OR visible_at <= keel_now())) \
             UPDATE work_items SET cancelled = true WHERE instance = $1 AND execution = $2 \
               AND op = ANY($3) AND lease_token IS NOT NULL AND visible_at > keel_now()",
            &[&id, &current, &ack.cancel],
        )
        .await?;
    }
    if !ack.message_body.is_empty() {
        execute(
            tx,
            "INSERT INTO messages (instance, priority, visible_at, enqueued_at, body) \
             SELECT t.id, t.priority, COALESCE(m.visible_at, keel_now()), keel_now(), m.body \
             FROM unnest($1::text[], $2::bigint[], $3::bytea[]) WITH ORDINALITY \
               AS m (target, visible_at, body, n) \
             JOIN instances t ON t.id = m.target ORDER BY m.n",
            &[&ack.message_to, &ack.message_at, &ack.message_body],
        )
        .await?;
    }
    if !ack.consumed.is_empty() {
        execute(
            tx,
            "DELETE FROM messages WHERE instance = $1 AND id = ANY($2)",
            &[&id, &ack.consumed],
        )
        .await?;
    }
    execute(
        tx,
        "WITH pay AS (UPDATE instance_payloads SET \
           output = CASE WHEN $2 = 'running' THEN output ELSE $5 END, \
           failure = CASE WHEN $2 = 'running' THEN failure ELSE $6 END, \
           custom_status = CASE $7::integer WHEN 0 THEN custom_status WHEN 1 THEN $8 \
             ELSE NULL END \
           WHERE instance = $1 AND ($2 <> 'running' OR $7::integer <> 0)) \
         UPDATE instances SET \
           status = CASE WHEN $2 = 'running' \
             THEN (CASE WHEN status = 'pending' THEN 'running' ELSE status END) ELSE $2 END, \
           status_reason = CASE WHEN $2 = 'running' THEN status_reason ELSE NULL END, \
           completed_at = CASE WHEN $2 = 'running' THEN completed_at ELSE keel_now() END, \
           version = COALESCE($3, version), history_len = history_len + $4, \
           lock_token = NULL, locked_until = NULL, acked = true, updated_at = keel_now() \
         WHERE id = $1",
        &[
            &id,
            &ack.status,
            &ack.version,
            &event_count,
            &ack.output,
            &ack.failure,
            &ack.custom_mode,
            &ack.custom,
        ],
    )
    .await?;
    if let Some(continued) = &ack.continued {
        continue_as_new(tx, id, continued, max_record).await?;
    }
    Ok(())
}

/// Starts the next execution: a fresh history, its start message, then the carried
/// messages.
async fn continue_as_new(
    tx: &Transaction<'_>,
    id: &str,
    continued: &Continued,
    max_record: usize,
) -> Result<()> {
    let row = query_one(
        tx,
        "WITH pay AS (UPDATE instance_payloads SET input = $2, output = NULL, failure = NULL \
           WHERE instance = $1) \
         UPDATE instances SET status = CASE WHEN status IN ('paused', 'suspended') \
           THEN status ELSE 'running' END, execution = execution + 1, version = $3, \
           history_len = 0, completed_at = NULL, updated_at = keel_now() WHERE id = $1 \
         RETURNING execution, name, parent_instance, parent_execution, parent_op",
        &[
            &id,
            &continued.input.as_bytes(),
            &continued.version.map(int),
        ],
    )
    .await?;
    let parent = match col::<Option<String>>(&row, 2)? {
        Some(parent) => Some(ParentLink {
            instance: instance_id(parent)?,
            execution: execution(col::<Option<i32>>(&row, 3)?.unwrap_or(0))?,
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
    let mut bodies: Vec<&[u8]> = Vec::with_capacity(continued.carried.len() + 1);
    bodies.push(&start);
    bodies.extend(continued.carried.iter().map(Vec::as_slice));
    insert_messages(tx, id, None, &bodies).await?;
    Ok(())
}
