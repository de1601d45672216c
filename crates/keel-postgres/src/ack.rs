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
//!
//! Acks that lease to their caller (eager dispatch) pick, in ack order among the
//! accepted acks, the items of the queues the caller serves while it has room, leaving
//! names with limits to fetches (which count the limits): those are inserted already
//! leased by the same statement that inserts the rest. The names with limits are read
//! in the lock's round trip.

use std::collections::{HashMap, HashSet};

use deadpool_postgres::Object;
use keel_core::{Message, ParentLink, Payload, WorkItem, encode_record};
use keel_provider::{
    Ack, AckedTurns, CustomStatusUpdate, ErrorKind, FetchActivities, LeasedWorkItem, ProviderError,
    Result, TurnOutcome,
};
use tokio_postgres::types::ToSql;

use crate::activity::{PreparedItems, limited_names};
use crate::convert::{
    check_size, col, count, duration_millis, execution, instance_id, int, millis, op, u64_bits,
};
use crate::error::db;
use crate::instance::{self, PreparedInstance};
use crate::provider::PostgresProvider;
use crate::statement::query;

mod write;

/// An ack with every record encoded and its sizes checked.
#[derive(Debug)]
struct PreparedAck {
    instance: String,
    token: i64,
    version: Option<i32>,
    events: Vec<Vec<u8>>,
    consumed: Vec<i64>,
    activities: PreparedItems,
    /// The same items as scheduled, for those leased to the caller.
    items: Vec<WorkItem>,
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
        items: ack.activities,
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

/// Commits the acks; with `lease`, also leases to the caller the items they enqueue
/// that it allows (eager dispatch).
pub(crate) async fn ack_turns(
    p: &PostgresProvider,
    acks: Vec<Ack>,
    lease: Option<FetchActivities>,
) -> Result<AckedTurns> {
    let capabilities = p.capabilities_ref();
    let limits = Limits {
        record: capabilities.max_record_bytes,
        history: count(capabilities.max_history_events),
    };
    let mut leasing = lease.and_then(|lease| Leasing::new(&lease, capabilities.max_fetch_items));
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
    let mut leased = Vec::new();
    if prepared.is_empty() {
        return Ok(AckedTurns { results, leased });
    }
    let mut client = p.client().await?;
    let batch: Vec<(usize, &PreparedAck)> = prepared.iter().map(|(i, a)| (*i, a)).collect();
    match commit(&mut client, &batch, limits, leasing.as_ref()).await {
        Ok(committed) => {
            for ((i, _), verdict) in batch.iter().zip(committed.verdicts) {
                results[*i] = verdict;
            }
            leased = committed.leased;
        }
        Err(error) if batch.len() > 1 && !error.is_retryable() => {
            // Nothing was committed. Alone, each ack commits or fails by itself.
            tracing::warn!(%error, acks = batch.len(), "a batch of acks failed: acking one by one");
            for &(i, ack) in &batch {
                results[i] = match commit(&mut client, &[(i, ack)], limits, leasing.as_ref()).await
                {
                    Ok(mut committed) => {
                        if let Some(leasing) = leasing.as_mut() {
                            leasing.left = leasing.left.saturating_sub(committed.leased.len());
                        }
                        leased.append(&mut committed.leased);
                        committed.verdicts.pop().unwrap_or(Ok(()))
                    }
                    Err(error) => Err(error),
                };
            }
        }
        Err(error) => return Err(error),
    }
    p.inner.identities.remember(&leased);
    Ok(AckedTurns { results, leased })
}

/// What the acks of one call may lease to their caller as they enqueue (eager
/// dispatch): items of these queues, this many more, for this long.
#[derive(Debug)]
struct Leasing {
    queues: HashSet<String>,
    left: usize,
    lease_for: i64,
}

impl Leasing {
    /// The leasing `lease` asks for, capped at `max` items as a fetch is; `None` when
    /// it allows nothing.
    fn new(lease: &FetchActivities, max: usize) -> Option<Self> {
        let left = lease.max_items.min(max);
        if left == 0 || lease.queues.is_empty() {
            return None;
        }
        Some(Self {
            queues: lease.queues.iter().map(|q| q.as_str().to_owned()).collect(),
            left,
            lease_for: duration_millis(lease.lease_for),
        })
    }

    /// The names of the items of `acks` that this may lease but for their limits,
    /// sorted and without repeats.
    fn names<'a>(&self, acks: &[(usize, &'a PreparedAck)]) -> Vec<&'a str> {
        let mut names: Vec<&str> = acks
            .iter()
            .flat_map(|(_, ack)| ack.activities.routes())
            .filter(|(_, queue)| self.queues.contains(*queue))
            .map(|(name, _)| name)
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }
}

/// What committing a batch did: one verdict per ack, in order, and the items leased to
/// the caller, in ack order.
#[derive(Debug)]
struct Committed {
    verdicts: Vec<Result<()>>,
    leased: Vec<LeasedWorkItem>,
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

/// Commits the acks that hold their locks in one transaction, leasing what `leasing`
/// allows of the items they enqueue. An error means nothing was committed.
async fn commit(
    client: &mut Object,
    acks: &[(usize, &PreparedAck)],
    limits: Limits,
    leasing: Option<&Leasing>,
) -> Result<Committed> {
    let tx = client.transaction().await.map_err(db)?;
    let ids: Vec<&str> = acks.iter().map(|(_, a)| a.instance.as_str()).collect();
    let tokens: Vec<i64> = acks.iter().map(|(_, a)| a.token).collect();
    // Read after the transaction began (READ COMMITTED: each statement sees what
    // committed before it started), so that a name that had limits then is seen to
    // have them; limits set meanwhile may go either way.
    let names = leasing.map(|l| l.names(acks)).unwrap_or_default();
    let lock_params: [&(dyn ToSql + Sync); 2] = [&ids, &tokens];
    let (rows, limited) = tokio::try_join!(
        biased;
        query(&tx, LOCK, &lock_params),
        limited_names(&tx, &names),
    )?;
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
    let leasing = leasing.map(|leasing| (leasing, &limited));
    let leased = if accepted.is_empty() {
        Vec::new()
    } else {
        write::write(&tx, &accepted, leasing).await?
    };
    tx.commit().await.map_err(db)?;
    Ok(Committed { verdicts, leased })
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
