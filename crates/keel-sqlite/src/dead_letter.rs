//! Dead letters: work that failed for good, kept for inspection and replay.

use keel_core::{Failure, WorkItem, decode_record};
use keel_provider::{
    Cursor, DeadLetter, DeadLetterId, ErrorKind, Page, PageRequest, ProviderError, Result, WorkKind,
};
use rusqlite::{Connection, Row};

use crate::activity::{insert_item, prepare_item};
use crate::convert::{col, count, execution, instance_id, millis, op, small, timestamp, uncount};
use crate::instance::page_size;
use crate::provider::SqliteProvider;
use crate::query::{self, execute};

/// A dead letter to record.
#[derive(Debug)]
pub(crate) struct Record<'a> {
    pub(crate) instance: &'a str,
    pub(crate) execution: i64,
    pub(crate) op: i64,
    pub(crate) name: &'a str,
    pub(crate) attempts: i64,
    /// The encoded [`Failure`].
    pub(crate) failure: &'a [u8],
    /// The item's stored bytes; none when they were corrupt.
    pub(crate) item: Option<&'a [u8]>,
}

/// Records a dead letter.
pub(crate) fn insert(conn: &Connection, record: &Record<'_>, now: i64) -> Result<()> {
    execute(
        conn,
        "INSERT INTO dead_letters (instance, execution, op, name, attempts, failure, item, \
         recorded_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        (
            record.instance,
            record.execution,
            record.op,
            record.name,
            record.attempts,
            record.failure,
            record.item,
            now,
        ),
    )?;
    Ok(())
}

const COLUMNS_BY_ID: &str = "SELECT id, instance, execution, op, name, attempts, failure, item, \
     recorded_at FROM dead_letters WHERE id = ?1";

fn dead_letter(row: &Row<'_>) -> Result<DeadLetter> {
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
    let take = usize::try_from(limit).unwrap_or(usize::MAX);
    let rows = p
        .read(move |conn| {
            // One row past the page says whether there is more; it is not decoded.
            let mut seen = 0;
            query::all(
                conn,
                "SELECT id, instance, execution, op, name, attempts, failure, item, recorded_at \
                 FROM dead_letters WHERE id > ?1 ORDER BY id LIMIT ?2",
                (after, limit + 1),
                |row| {
                    seen += 1;
                    if seen > take {
                        return Ok(None);
                    }
                    dead_letter(row).map(Some)
                },
            )
        })
        .await?;
    let more = rows.len() > take;
    let items: Vec<DeadLetter> = rows.into_iter().flatten().collect();
    let next = match items.last() {
        Some(last) if more => Some(Cursor(last.id.0.to_string())),
        _ => None,
    };
    Ok(Page { items, next })
}

pub(crate) async fn get(p: &SqliteProvider, id: DeadLetterId) -> Result<DeadLetter> {
    p.read(move |conn| {
        query::first(conn, COLUMNS_BY_ID, [count(id.0)], dead_letter)?.ok_or_else(|| not_found(id))
    })
    .await
}

pub(crate) async fn replay(p: &SqliteProvider, id: DeadLetterId) -> Result<()> {
    let limit = p.inner.capabilities.max_record_bytes;
    p.write(move |ctx| {
        let corrupt = || {
            ProviderError::new(
                ErrorKind::InvalidInput,
                format!("dead letter {} has no item to replay: it was corrupt", id.0),
            )
        };
        let bytes = query::first(
            &ctx.conn,
            "SELECT item FROM dead_letters WHERE id = ?1",
            [count(id.0)],
            |row| col::<Option<Vec<u8>>>(row, 0),
        )?
        .ok_or_else(|| not_found(id))?
        .ok_or_else(corrupt)?;
        let mut item = decode_record::<WorkItem>(&bytes).map_err(|_| corrupt())?;
        item.attempt = 1;
        let prepared = prepare_item(&item, limit)?;
        let now = millis(ctx.now());
        insert_item(&ctx.conn, &prepared, now, None)?;
        execute(
            &ctx.conn,
            "DELETE FROM dead_letters WHERE id = ?1",
            [count(id.0)],
        )?;
        ctx.wake(WorkKind::Activities);
        Ok(())
    })
    .await
}

pub(crate) async fn discard(p: &SqliteProvider, id: DeadLetterId) -> Result<()> {
    p.write(move |ctx| {
        let deleted = execute(
            &ctx.conn,
            "DELETE FROM dead_letters WHERE id = ?1",
            [count(id.0)],
        )?;
        if deleted == 0 {
            return Err(not_found(id));
        }
        Ok(())
    })
    .await
}
