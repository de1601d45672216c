//! Conversions between Keel's records and SQLite's columns (INTEGER is i64).

use std::collections::BTreeMap;
use std::time::Duration;

use keel_core::{
    ExecutionId, Failure, InstanceId, InstanceStatus, OpId, ParentLink, Payload, QueueName,
    RecordError, Timestamp, decode_record,
};
use keel_provider::{InstanceRecord, ProviderError, Result};
use rusqlite::Row;
use rusqlite::types::FromSql;

use crate::error::{corrupt, db, undecodable};

/// A timestamp as stored: milliseconds, saturating at the far future.
pub(crate) fn millis(time: Timestamp) -> i64 {
    i64::try_from(time.as_millis()).unwrap_or(i64::MAX)
}

/// `time + by`, as stored.
pub(crate) fn later(time: Timestamp, by: Duration) -> i64 {
    millis(time.saturating_add(by))
}

/// A stored timestamp (negative values, which Keel never writes, read as the epoch).
pub(crate) fn timestamp(millis: i64) -> Timestamp {
    Timestamp::from_millis(u64::try_from(millis).unwrap_or(0))
}

/// A u64 that is only compared for equality (op ids, tokens), stored bit for bit.
pub(crate) fn u64_bits(value: u64) -> i64 {
    i64::from_ne_bytes(value.to_ne_bytes())
}

/// The inverse of [`u64_bits`].
pub(crate) fn from_bits(value: i64) -> u64 {
    u64::from_ne_bytes(value.to_ne_bytes())
}

/// A count or length as stored.
pub(crate) fn count(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A stored count, length or row id.
pub(crate) fn uncount(value: i64, what: &str) -> Result<u64> {
    u64::try_from(value).map_err(|_| corrupt(format!("{what} is {value}")))
}

/// A stored execution number.
pub(crate) fn execution(value: i64) -> Result<ExecutionId> {
    u32::try_from(value)
        .map(ExecutionId::from_raw)
        .map_err(|_| corrupt(format!("execution {value}")))
}

/// A stored u32 (attempts, deliveries, versions).
pub(crate) fn small(value: i64, what: &str) -> Result<u32> {
    u32::try_from(value).map_err(|_| corrupt(format!("{what} is {value}")))
}

/// A stored op id.
pub(crate) fn op(value: i64) -> OpId {
    OpId::from_raw(from_bits(value))
}

/// A stored payload.
pub(crate) fn payload(bytes: Vec<u8>) -> Result<Payload> {
    Payload::from_bytes(bytes).map_err(|e| corrupt(format!("payload: {e}")))
}

/// A stored instance id.
pub(crate) fn instance_id(id: String) -> Result<InstanceId> {
    InstanceId::new(id).map_err(|e| corrupt(e.to_string()))
}

/// A stored status name.
pub(crate) fn status(name: &str) -> Result<InstanceStatus> {
    name.parse()
        .map_err(|_| corrupt(format!("status {name:?}")))
}

/// Reads column `index` of `row`.
pub(crate) fn col<T: FromSql>(row: &Row<'_>, index: usize) -> Result<T> {
    row.get(index).map_err(db)
}

/// Decodes the record in column `index` of `row` with `decode`; an error names it as
/// `what`, whether its bytes are damaged or the column holds no blob at all.
pub(crate) fn record<T>(
    row: &Row<'_>,
    index: usize,
    decode: impl FnOnce(&[u8]) -> Result<T, RecordError>,
    what: impl std::fmt::Display,
) -> Result<T> {
    // Borrowed from the row: the bytes are decoded where SQLite holds them.
    row.get_ref(index)
        .map_err(db)
        .and_then(|value| {
            value
                .as_blob()
                .map_err(|e| corrupt(format!("column {index}: {e}")))
        })
        .and_then(|bytes| Ok(decode(bytes)?))
        .map_err(|error| undecodable(what, error))
}

/// The columns [`instance_record`] reads, in order, `seq` last (for cursors): a macro
/// so that queries are `concat!`-ed string literals.
macro_rules! instance_columns {
    () => {
        "id, name, version, status, status_reason, execution, input, output, failure, \
         custom_status, queue, priority, tags, parent_instance, parent_execution, parent_op, \
         history_len, created_at, updated_at, completed_at, seq"
    };
}
pub(crate) use instance_columns;

/// An instance from a row of [`instance_columns!`].
pub(crate) fn instance_record(row: &Row<'_>) -> Result<InstanceRecord> {
    let parent = match col::<Option<String>>(row, 13)? {
        Some(parent) => Some(ParentLink {
            instance: instance_id(parent)?,
            execution: execution(col::<Option<i64>>(row, 14)?.unwrap_or(0))?,
            op: op(col::<Option<i64>>(row, 15)?.unwrap_or(0)),
        }),
        None => None,
    };
    let failure = match col::<Option<Vec<u8>>>(row, 8)? {
        Some(bytes) => Some(decode_record::<Failure>(&bytes)?),
        None => None,
    };
    Ok(InstanceRecord {
        id: instance_id(col(row, 0)?)?,
        name: col(row, 1)?,
        version: col::<Option<i64>>(row, 2)?
            .map(|v| small(v, "version"))
            .transpose()?,
        status: status(&col::<String>(row, 3)?)?,
        status_reason: col(row, 4)?,
        execution: execution(col(row, 5)?)?,
        input: payload(col(row, 6)?)?,
        output: col::<Option<Vec<u8>>>(row, 7)?.map(payload).transpose()?,
        failure,
        custom_status: col::<Option<Vec<u8>>>(row, 9)?.map(payload).transpose()?,
        queue: QueueName::new(col::<String>(row, 10)?).map_err(|e| corrupt(e.to_string()))?,
        priority: i32::try_from(col::<i64>(row, 11)?).map_err(|e| corrupt(e.to_string()))?,
        tags: decode_record::<BTreeMap<String, String>>(&col::<Vec<u8>>(row, 12)?)?,
        parent,
        history_len: uncount(col(row, 16)?, "history length")?,
        created_at: timestamp(col(row, 17)?),
        updated_at: timestamp(col(row, 18)?),
        completed_at: col::<Option<i64>>(row, 19)?.map(timestamp),
    })
}

/// The `,a,b,` form of a set of statuses that queries test with `instr`.
pub(crate) fn status_set(statuses: &[InstanceStatus]) -> Option<String> {
    if statuses.is_empty() {
        return None;
    }
    let mut set = String::from(",");
    for status in statuses {
        set.push_str(status.as_str());
        set.push(',');
    }
    Some(set)
}

/// An error for a record over the size limit.
pub(crate) fn check_size(what: impl FnOnce() -> String, size: usize, limit: usize) -> Result<()> {
    if size > limit {
        return Err(ProviderError::too_large(what(), size, limit));
    }
    Ok(())
}
