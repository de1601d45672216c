//! Dead letters: work that failed for good, kept for inspection and replay.

use keel_core::{Failure, WorkItem, decode_record, encode_record};
use keel_provider::{
    Cursor, DeadLetter, DeadLetterId, ErrorKind, Page, PageRequest, ProviderError, Result, WorkKind,
};
use sqlx::sqlite::{SqliteConnection, SqliteRow};

use crate::activity::{insert_item, prepare_item};
use crate::convert::{col, count, execution, instance_id, millis, op, small, timestamp, uncount};
use crate::error::db;
use crate::instance::page_size;
use crate::provider::SqliteProvider;

/// A dead letter to record.
#[derive(Debug)]
pub(crate) struct Record<'a> {
    pub(crate) instance: &'a str,
    pub(crate) execution: i64,
    pub(crate) op: i64,
    pub(crate) name: &'a str,
    pub(crate) attempts: i64,
    pub(crate) failure: &'a Failure,
    /// The item's stored bytes; none when they were corrupt.
    pub(crate) item: Option<&'a [u8]>,
}

/// Records a dead letter.
pub(crate) async fn insert(
    conn: &mut SqliteConnection,
    record: &Record<'_>,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO dead_letters (instance, execution, op, name, attempts, failure, item, \
         recorded_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .bind(record.instance)
    .bind(record.execution)
    .bind(record.op)
    .bind(record.name)
    .bind(record.attempts)
    .bind(encode_record(record.failure)?)
    .bind(record.item)
    .bind(now)
    .execute(conn)
    .await
    .map_err(db)?;
    Ok(())
}

const COLUMNS_BY_ID: &str = "SELECT id, instance, execution, op, name, attempts, failure, item, \
     recorded_at FROM dead_letters WHERE id = ?1";

fn dead_letter(row: &SqliteRow) -> Result<DeadLetter> {
    let attempts = small(col(row, 5)?, "attempts")?;
    // An item that no longer decodes is reported as corrupt (none), like one that never did.
    let item = col::<Option<Vec<u8>>>(row, 7)?
        .and_then(|bytes| decode_record::<WorkItem>(&bytes).ok())
        .map(|mut item| {
            item.attempt = attempts;
            item
        });
    Ok(DeadLetter {
        id: DeadLetterId(uncount(col(row, 0)?, "a dead letter id")?),
        instance: instance_id(col(row, 1)?)?,
        execution: execution(col(row, 2)?)?,
        op: op(col(row, 3)?),
        name: col(row, 4)?,
        attempts,
        failure: decode_record::<Failure>(&col::<Vec<u8>>(row, 6)?)?,
        item,
        recorded_at: timestamp(col(row, 8)?),
    })
}

fn not_found(id: DeadLetterId) -> ProviderError {
    ProviderError::not_found(format!("dead letter {}", id.0))
}

pub(crate) async fn list(p: &SqliteProvider, page: PageRequest) -> Result<Page<DeadLetter>> {
    let limit = page_size(&page, p.inner.capabilities.max_page)?;
    let after = match &page.cursor {
        Some(cursor) => cursor.0.parse::<i64>().map_err(|_| {
            ProviderError::new(
                ErrorKind::InvalidInput,
                format!("{:?} is not a cursor of this listing", cursor.0),
            )
        })?,
        None => 0,
    };
    let rows = sqlx::query(
        "SELECT id, instance, execution, op, name, attempts, failure, item, recorded_at \
         FROM dead_letters WHERE id > ?1 ORDER BY id LIMIT ?2",
    )
    .bind(after)
    .bind(limit + 1)
    .fetch_all(p.readers())
    .await
    .map_err(db)?;
    let more = i64::try_from(rows.len()).unwrap_or(i64::MAX) > limit;
    let items = rows
        .iter()
        .take(usize::try_from(limit).unwrap_or(usize::MAX))
        .map(dead_letter)
        .collect::<Result<Vec<_>>>()?;
    let next = match items.last() {
        Some(last) if more => Some(Cursor(last.id.0.to_string())),
        _ => None,
    };
    Ok(Page { items, next })
}

pub(crate) async fn get(p: &SqliteProvider, id: DeadLetterId) -> Result<DeadLetter> {
    let row = sqlx::query(COLUMNS_BY_ID)
        .bind(count(id.0))
        .fetch_optional(p.readers())
        .await
        .map_err(db)?
        .ok_or_else(|| not_found(id))?;
    dead_letter(&row)
}

pub(crate) async fn replay(p: &SqliteProvider, id: DeadLetterId) -> Result<()> {
    let limit = p.inner.capabilities.max_record_bytes;
    p.write(move |ctx| {
        Box::pin(async move {
            let row = sqlx::query(COLUMNS_BY_ID)
                .bind(count(id.0))
                .fetch_optional(&mut ctx.conn)
                .await
                .map_err(db)?
                .ok_or_else(|| not_found(id))?;
            let corrupt = || {
                ProviderError::new(
                    ErrorKind::InvalidInput,
                    format!("dead letter {} has no item to replay: it was corrupt", id.0),
                )
            };
            let bytes = col::<Option<Vec<u8>>>(&row, 7)?.ok_or_else(corrupt)?;
            let mut item = decode_record::<WorkItem>(&bytes).map_err(|_| corrupt())?;
            item.attempt = 1;
            let prepared = prepare_item(&item, limit)?;
            let now = millis(ctx.now());
            insert_item(&mut ctx.conn, &prepared, now).await?;
            sqlx::query("DELETE FROM dead_letters WHERE id = ?1")
                .bind(count(id.0))
                .execute(&mut ctx.conn)
                .await
                .map_err(db)?;
            ctx.wake(WorkKind::Activities);
            Ok(())
        })
    })
    .await
}

pub(crate) async fn discard(p: &SqliteProvider, id: DeadLetterId) -> Result<()> {
    p.write(move |ctx| {
        Box::pin(async move {
            let deleted = sqlx::query("DELETE FROM dead_letters WHERE id = ?1")
                .bind(count(id.0))
                .execute(&mut ctx.conn)
                .await
                .map_err(db)?
                .rows_affected();
            if deleted == 0 {
                return Err(not_found(id));
            }
            Ok(())
        })
    })
    .await
}
