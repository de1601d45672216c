//! Dead letters: work that failed for good, kept for inspection and replay.

use deadpool_postgres::GenericClient;
use keel_core::{Failure, WorkItem, decode_record};
use keel_provider::{Cursor, DeadLetter, DeadLetterId, Page, PageRequest, ProviderError, Result};
use tokio_postgres::Row;

use crate::activity::{PreparedItems, insert_items};
use crate::convert::{col, count, execution, instance_id, op, small, timestamp, uncount};
use crate::error::{db, invalid};
use crate::instance::page_size;
use crate::provider::PostgresProvider;
use crate::statement::{execute, query, query_opt};

const COLUMNS: &str = "SELECT id, instance, execution, op, name, attempts, failure, item, \
     recorded_at FROM dead_letters";

fn dead_letter(row: &Row) -> Result<DeadLetter> {
    let attempts = small(col(row, 5)?, "attempts")?;
    // An item that no longer decodes is reported as corrupt (none), like one that never did.
    let item = col::<Option<&[u8]>>(row, 7)?
        .and_then(|bytes| decode_record::<WorkItem>(bytes).ok())
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
        failure: decode_record::<Failure>(col::<&[u8]>(row, 6)?)?,
        item,
        recorded_at: timestamp(col(row, 8)?),
    })
}

fn not_found(id: DeadLetterId) -> ProviderError {
    ProviderError::not_found(format!("dead letter {}", id.0))
}

pub(crate) async fn list(p: &PostgresProvider, page: PageRequest) -> Result<Page<DeadLetter>> {
    let limit = page_size(&page, p.capabilities_ref().max_page)?;
    let after = match &page.cursor {
        Some(cursor) => cursor
            .0
            .parse::<i64>()
            .map_err(|_| invalid(format!("{:?} is not a cursor of this listing", cursor.0)))?,
        None => 0,
    };
    let client = p.client().await?;
    let rows = query(
        &client,
        "SELECT id, instance, execution, op, name, attempts, failure, item, recorded_at \
         FROM dead_letters WHERE id > $1 ORDER BY id LIMIT $2",
        &[&after, &(limit + 1)],
    )
    .await?;
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

pub(crate) async fn get(p: &PostgresProvider, id: DeadLetterId) -> Result<DeadLetter> {
    let client = p.client().await?;
    let row = query_opt(
        &client,
        &format!("{COLUMNS} WHERE id = $1"),
        &[&count(id.0)],
    )
    .await?
    .ok_or_else(|| not_found(id))?;
    dead_letter(&row)
}

/// Re-queues the item as attempt 1 and removes the dead letter, in one transaction.
pub(crate) async fn replay(p: &PostgresProvider, id: DeadLetterId) -> Result<()> {
    let limit = p.capabilities_ref().max_record_bytes;
    let mut client = p.client().await?;
    let tx = client.transaction().await.map_err(db)?;
    let row = query_opt(
        &tx,
        &format!("{COLUMNS} WHERE id = $1 FOR UPDATE"),
        &[&count(id.0)],
    )
    .await?
    .ok_or_else(|| not_found(id))?;
    let corrupt = || {
        invalid(format!(
            "dead letter {} has no item to replay: it was corrupt",
            id.0
        ))
    };
    let bytes = col::<Option<&[u8]>>(&row, 7)?.ok_or_else(corrupt)?;
    let mut item = decode_record::<WorkItem>(bytes).map_err(|_| corrupt())?;
    item.attempt = 1;
    insert_items(&tx, &PreparedItems::new(&[item], limit)?).await?;
    execute(
        &tx,
        "DELETE FROM dead_letters WHERE id = $1",
        &[&count(id.0)],
    )
    .await?;
    tx.commit().await.map_err(db)?;
    Ok(())
}

pub(crate) async fn discard(p: &PostgresProvider, id: DeadLetterId) -> Result<()> {
    let client = p.client().await?;
    let deleted = execute(
        &client,
        "DELETE FROM dead_letters WHERE id = $1",
        &[&count(id.0)],
    )
    .await?;
    if deleted == 0 {
        return Err(not_found(id));
    }
    Ok(())
}
