//! Instances: creating them, messages for them, pause and resume, reading, listing,
//! purging and deleting.

use keel_core::{
    Event, ExecutionId, InstanceId, InstanceStatus, Message, Timestamp, decode_record,
    encode_record,
};
use keel_provider::{
    Created, Cursor, ErrorKind, InstanceQuery, InstanceRecord, NewInstance, OnConflict, Page,
    PageRequest, ProviderError, PurgeFilter, QueueDepths, Result, WorkKind,
};
use sqlx::sqlite::SqliteConnection;

use crate::convert::{
    check_size, col, count, execution as stored_execution, instance_columns, instance_record,
    millis, record, status, status_set, u64_bits, uncount,
};
use crate::error::db;
use crate::provider::SqliteProvider;
use crate::writer::WriteCtx;

/// An instance ready to insert: every record encoded, sizes checked, off the writer.
#[derive(Debug)]
pub(crate) struct PreparedInstance {
    id: InstanceId,
    name: String,
    version: Option<i64>,
    input: Vec<u8>,
    start_at: Option<i64>,
    queue: String,
    priority: i64,
    tags: Vec<(String, String)>,
    tags_blob: Vec<u8>,
    parent: Option<(String, i64, i64)>,
    start: Vec<u8>,
}

/// Encodes `instance` and its start message, checking the start against `limit`.
pub(crate) fn prepare(instance: NewInstance, limit: usize) -> Result<PreparedInstance> {
    let NewInstance {
        id,
        name,
        version,
        input,
        start_at,
        queue,
        priority,
        tags,
        parent,
    } = instance;
    let start = encode_record(&Message::Start {
        execution: ExecutionId::FIRST,
        name: name.clone(),
        version,
        input: input.clone(),
        parent: parent.clone(),
    })?;
    check_size(|| format!("the start message of {id}"), start.len(), limit)?;
    let tags_blob = encode_record(&tags)?;
    Ok(PreparedInstance {
        name,
        version: version.map(i64::from),
        input: input.into_bytes(),
        start_at: start_at.map(millis),
        queue: queue.as_str().to_owned(),
        priority: i64::from(priority),
        tags: tags.into_iter().collect(),
        tags_blob,
        parent: parent.map(|p| {
            (
                p.instance.as_str().to_owned(),
                i64::from(p.execution.get()),
                u64_bits(p.op.get()),
            )
        }),
        start,
        id,
    })
}

/// Inserts a prepared instance with its start message, unless its id exists. Returns
/// whether it was inserted.
pub(crate) async fn insert(ctx: &mut WriteCtx, instance: &PreparedInstance) -> Result<bool> {
    let now = millis(ctx.now());
    let (parent, parent_execution, parent_op) = match &instance.parent {
        Some((id, execution, op)) => (Some(id.as_str()), Some(*execution), Some(*op)),
        None => (None, None, None),
    };
    let inserted = sqlx::query(
        "INSERT INTO instances (id, name, version, status, execution, input, queue, priority, \
         tags, parent_instance, parent_execution, parent_op, created_at, updated_at) \
         VALUES (?1, ?2, ?3, 'pending', 1, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?11) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(instance.id.as_str())
    .bind(&instance.name)
    .bind(instance.version)
    .bind(&instance.input)
    .bind(&instance.queue)
    .bind(instance.priority)
    .bind(&instance.tags_blob)
    .bind(parent)
    .bind(parent_execution)
    .bind(parent_op)
    .bind(now)
    .execute(&mut ctx.conn)
    .await
    .map_err(db)?
    .rows_affected();
    if inserted == 0 {
        return Ok(false);
    }
    for (key, value) in &instance.tags {
        sqlx::query("INSERT INTO instance_tags (instance, key, value) VALUES (?1, ?2, ?3)")
            .bind(instance.id.as_str())
            .bind(key)
            .bind(value)
            .execute(&mut ctx.conn)
            .await
            .map_err(db)?;
    }
    let visible_at = instance.start_at.unwrap_or(now);
    insert_message(
        &mut ctx.conn,
        instance.id.as_str(),
        visible_at,
        now,
        &instance.start,
    )
    .await?;
    ctx.wake(WorkKind::Orchestrations);
    Ok(true)
}

/// Enqueues one encoded message for `instance`, visible at `visible_at`; returns
/// whether the instance exists (nothing is stored when it does not).
pub(crate) async fn insert_message(
    conn: &mut SqliteConnection,
    instance: &str,
    visible_at: i64,
    now: i64,
    body: &[u8],
) -> Result<bool> {
    let inserted = sqlx::query(
        "INSERT INTO messages (instance, priority, ready, visible_at, enqueued_at, body) \
         SELECT id, priority, ?2 <= ?3, ?2, ?3, ?4 FROM instances WHERE id = ?1",
    )
    .bind(instance)
    .bind(visible_at)
    .bind(now)
    .bind(body)
    .execute(conn)
    .await
    .map_err(db)?
    .rows_affected();
    Ok(inserted > 0)
}

/// One instance read on `conn`, if it exists.
async fn read_instance(
    conn: &mut SqliteConnection,
    instance: &InstanceId,
) -> Result<Option<InstanceRecord>> {
    let row = sqlx::query(concat!(
        "SELECT ",
        instance_columns!(),
        " FROM instances WHERE id = ?1"
    ))
    .bind(instance.as_str())
    .fetch_optional(conn)
    .await
    .map_err(db)?;
    row.as_ref().map(instance_record).transpose()
}

pub(crate) async fn create(
    p: &SqliteProvider,
    instance: NewInstance,
    on_conflict: OnConflict,
) -> Result<Created> {
    let prepared = prepare(instance, p.inner.capabilities.max_record_bytes)?;
    p.write(move |ctx| {
        Box::pin(async move {
            if insert(ctx, &prepared).await? {
                return Ok(Created::New);
            }
            match on_conflict {
                OnConflict::Fail => Err(ProviderError::new(
                    ErrorKind::AlreadyExists,
                    format!("instance {} already exists", prepared.id),
                )),
                OnConflict::ReturnExisting => read_instance(&mut ctx.conn, &prepared.id)
                    .await?
                    .map(|record| Created::Existing(Box::new(record)))
                    .ok_or_else(|| ProviderError::not_found(format!("instance {}", prepared.id))),
            }
        })
    })
    .await
}

pub(crate) async fn send_message(
    p: &SqliteProvider,
    instance: &InstanceId,
    message: Message,
    visible_at: Option<Timestamp>,
) -> Result<()> {
    let body = encode_record(&message)?;
    let limit = p.inner.capabilities.max_record_bytes;
    check_size(|| format!("a message for {instance}"), body.len(), limit)?;
    let instance = instance.clone();
    p.write(move |ctx| {
        Box::pin(async move {
            let now = millis(ctx.now());
            let visible_at = visible_at.map_or(now, millis);
            if !insert_message(&mut ctx.conn, instance.as_str(), visible_at, now, &body).await? {
                return Err(ProviderError::not_found(format!("instance {instance}")));
            }
            ctx.wake(WorkKind::Orchestrations);
            Ok(())
        })
    })
    .await
}

/// The status of `instance` read on the write connection, or `NotFound`.
async fn current_status(ctx: &mut WriteCtx, instance: &InstanceId) -> Result<InstanceStatus> {
    let row = sqlx::query("SELECT status FROM instances WHERE id = ?1")
        .bind(instance.as_str())
        .fetch_optional(&mut ctx.conn)
        .await
        .map_err(db)?
        .ok_or_else(|| ProviderError::not_found(format!("instance {instance}")))?;
    status(&col::<String>(&row, 0)?)
}

pub(crate) async fn pause(p: &SqliteProvider, instance: &InstanceId) -> Result<()> {
    let instance = instance.clone();
    p.write(move |ctx| {
        Box::pin(async move {
            let current = current_status(ctx, &instance).await?;
            if current.is_terminal() {
                return Err(ProviderError::new(
                    ErrorKind::InvalidInput,
                    format!("instance {instance} has ended ({current}) and cannot be paused"),
                ));
            }
            sqlx::query(
                "UPDATE instances SET status = 'paused', status_reason = NULL, updated_at = ?2 \
                 WHERE id = ?1",
            )
            .bind(instance.as_str())
            .bind(millis(ctx.now()))
            .execute(&mut ctx.conn)
            .await
            .map_err(db)?;
            Ok(())
        })
    })
    .await
}

pub(crate) async fn resume(p: &SqliteProvider, instance: &InstanceId) -> Result<()> {
    let instance = instance.clone();
    p.write(move |ctx| {
        Box::pin(async move {
            let current = current_status(ctx, &instance).await?;
            if !matches!(current, InstanceStatus::Paused | InstanceStatus::Suspended) {
                return Err(ProviderError::new(
                    ErrorKind::InvalidInput,
                    format!("instance {instance} is {current}, neither paused nor suspended"),
                ));
            }
            sqlx::query(
                "UPDATE instances SET status = CASE WHEN acked = 1 THEN 'running' \
                 ELSE 'pending' END, status_reason = NULL, updated_at = ?2 WHERE id = ?1",
            )
            .bind(instance.as_str())
            .bind(millis(ctx.now()))
            .execute(&mut ctx.conn)
            .await
            .map_err(db)?;
            ctx.wake(WorkKind::Orchestrations);
            Ok(())
        })
    })
    .await
}

pub(crate) async fn get(p: &SqliteProvider, instance: &InstanceId) -> Result<InstanceRecord> {
    let mut conn = p.readers().acquire().await.map_err(db)?;
    read_instance(&mut conn, instance)
        .await?
        .ok_or_else(|| ProviderError::not_found(format!("instance {instance}")))
}

pub(crate) async fn read_history(
    p: &SqliteProvider,
    instance: &InstanceId,
    execution: Option<ExecutionId>,
) -> Result<Vec<Event>> {
    let mut conn = p.readers().acquire().await.map_err(db)?;
    let row = sqlx::query("SELECT execution FROM instances WHERE id = ?1")
        .bind(instance.as_str())
        .fetch_optional(&mut *conn)
        .await
        .map_err(db)?
        .ok_or_else(|| ProviderError::not_found(format!("instance {instance}")))?;
    let current = stored_execution(col(&row, 0)?)?;
    let execution = execution.unwrap_or(current);
    if execution.get() == 0 || execution > current {
        return Err(ProviderError::not_found(format!(
            "execution {execution} of instance {instance}"
        )));
    }
    let rows = sqlx::query(
        "SELECT event, seq FROM history WHERE instance = ?1 AND execution = ?2 ORDER BY seq",
    )
    .bind(instance.as_str())
    .bind(i64::from(execution.get()))
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?;
    rows.iter()
        .map(|row| {
            let seq: i64 = col(row, 1)?;
            record(
                row,
                0,
                decode_record::<Event>,
                format_args!("history event {seq} of execution {execution} of instance {instance}"),
            )
        })
        .collect()
}

/// A listing position: the last item's creation time and row number.
fn parse_cursor(cursor: &Cursor) -> Result<(i64, i64)> {
    cursor
        .0
        .split_once(':')
        .and_then(|(at, seq)| Some((at.parse().ok()?, seq.parse().ok()?)))
        .ok_or_else(|| {
            ProviderError::new(
                ErrorKind::InvalidInput,
                format!("{:?} is not a cursor of this listing", cursor.0),
            )
        })
}

/// How many items a page holds: the request's limit, capped by `max_page`.
pub(crate) fn page_size(page: &PageRequest, max_page: usize) -> Result<i64> {
    if page.limit == 0 {
        return Err(ProviderError::new(
            ErrorKind::InvalidInput,
            "a page must hold at least one item",
        ));
    }
    Ok(count(page.limit.min(max_page) as u64))
}

pub(crate) async fn list(
    p: &SqliteProvider,
    query: InstanceQuery,
    page: PageRequest,
) -> Result<Page<InstanceRecord>> {
    let limit = page_size(&page, p.inner.capabilities.max_page)?;
    let after = page.cursor.as_ref().map(parse_cursor).transpose()?;
    let (tag_key, tag_value) = query.tag.unzip();
    let rows = sqlx::query(concat!(
        "SELECT ",
        instance_columns!(),
        " FROM instances WHERE (?1 IS NULL OR instr(?1, ',' || status || ',') > 0) \
         AND (?2 IS NULL OR name = ?2) \
         AND (?3 IS NULL OR created_at >= ?3) \
         AND (?4 IS NULL OR created_at < ?4) \
         AND (?5 IS NULL OR EXISTS (SELECT 1 FROM instance_tags t \
              WHERE t.instance = instances.id AND t.key = ?5 AND t.value = ?6)) \
         AND (?7 IS NULL OR created_at > ?7 OR (created_at = ?7 AND seq > ?8)) \
         ORDER BY created_at, seq LIMIT ?9"
    ))
    .bind(status_set(&query.statuses))
    .bind(query.name)
    .bind(query.created_from.map(millis))
    .bind(query.created_until.map(millis))
    .bind(tag_key)
    .bind(tag_value)
    .bind(after.map(|(at, _)| at))
    .bind(after.map_or(0, |(_, seq)| seq))
    .bind(limit + 1)
    .fetch_all(p.readers())
    .await
    .map_err(db)?;
    let more = i64::try_from(rows.len()).unwrap_or(i64::MAX) > limit;
    let mut items = Vec::with_capacity(rows.len());
    let mut next = None;
    for row in rows
        .iter()
        .take(usize::try_from(limit).unwrap_or(usize::MAX))
    {
        items.push(instance_record(row)?);
        next = Some((col::<i64>(row, 17)?, col::<i64>(row, 20)?));
    }
    Ok(Page {
        items,
        next: next
            .filter(|_| more)
            .map(|(at, seq)| Cursor(format!("{at}:{seq}"))),
    })
}

pub(crate) async fn queue_depths(p: &SqliteProvider) -> Result<QueueDepths> {
    let now = millis(p.clock_now());
    let mut conn = p.readers().acquire().await.map_err(db)?;
    let row = sqlx::query(
        "SELECT COALESCE(SUM(visible_at <= ?1), 0), COALESCE(SUM(visible_at > ?1), 0) \
         FROM messages",
    )
    .bind(now)
    .fetch_one(&mut *conn)
    .await
    .map_err(db)?;
    let messages_ready = uncount(col(&row, 0)?, "a count")?;
    let messages_delayed = uncount(col(&row, 1)?, "a count")?;
    let row = sqlx::query(
        "SELECT COALESCE(SUM(lease_token IS NULL AND visible_at > ?1), 0), \
         COALESCE(SUM(lease_token IS NOT NULL AND visible_at > ?1), 0) FROM work_items",
    )
    .bind(now)
    .fetch_one(&mut *conn)
    .await
    .map_err(db)?;
    let activities_delayed = uncount(col(&row, 0)?, "a count")?;
    let activities_running = uncount(col(&row, 1)?, "a count")?;
    let rows = sqlx::query(
        "SELECT queue, COUNT(*) FROM work_items WHERE cancelled = 0 AND visible_at <= ?1 \
         GROUP BY queue",
    )
    .bind(now)
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?;
    let mut activities_ready = std::collections::BTreeMap::new();
    for row in &rows {
        activities_ready.insert(col::<String>(row, 0)?, uncount(col(row, 1)?, "a count")?);
    }
    let row = sqlx::query("SELECT COUNT(*) FROM dead_letters")
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
    Ok(QueueDepths {
        messages_ready,
        messages_delayed,
        activities_ready,
        activities_delayed,
        activities_running,
        dead_letters: uncount(col(&row, 0)?, "a count")?,
    })
}

/// Deletes one instance and everything stored for it.
async fn delete_everything(conn: &mut SqliteConnection, instance: &str) -> Result<()> {
    for sql in [
        "DELETE FROM history WHERE instance = ?1",
        "DELETE FROM messages WHERE instance = ?1",
        "DELETE FROM work_items WHERE instance = ?1",
        "DELETE FROM dead_letters WHERE instance = ?1",
        "DELETE FROM instance_tags WHERE instance = ?1",
        "DELETE FROM instances WHERE id = ?1",
    ] {
        sqlx::query(sql)
            .bind(instance)
            .execute(&mut *conn)
            .await
            .map_err(db)?;
    }
    Ok(())
}

pub(crate) async fn purge(p: &SqliteProvider, filter: PurgeFilter) -> Result<u64> {
    let statuses: Vec<InstanceStatus> = if filter.statuses.is_empty() {
        vec![
            InstanceStatus::Completed,
            InstanceStatus::Failed,
            InstanceStatus::Cancelled,
        ]
    } else {
        // Only finished instances are purged, whatever the filter names.
        let finished: Vec<_> = filter
            .statuses
            .into_iter()
            .filter(|status| status.is_terminal())
            .collect();
        if finished.is_empty() {
            return Ok(0);
        }
        finished
    };
    let statuses = status_set(&statuses);
    let before = millis(filter.completed_before);
    p.write(move |ctx| {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT id FROM instances WHERE completed_at < ?1 \
                 AND instr(?2, ',' || status || ',') > 0",
            )
            .bind(before)
            .bind(statuses)
            .fetch_all(&mut ctx.conn)
            .await
            .map_err(db)?;
            for row in &rows {
                delete_everything(&mut ctx.conn, &col::<String>(row, 0)?).await?;
            }
            Ok(rows.len() as u64)
        })
    })
    .await
}

pub(crate) async fn delete(p: &SqliteProvider, instance: &InstanceId) -> Result<u64> {
    let instance = instance.clone();
    p.write(move |ctx| {
        Box::pin(async move {
            let rows = sqlx::query(
                "WITH RECURSIVE tree (id) AS ( \
                   SELECT id FROM instances WHERE id = ?1 \
                   UNION SELECT i.id FROM instances i JOIN tree t ON i.parent_instance = t.id) \
                 SELECT id FROM tree",
            )
            .bind(instance.as_str())
            .fetch_all(&mut ctx.conn)
            .await
            .map_err(db)?;
            if rows.is_empty() {
                return Err(ProviderError::not_found(format!("instance {instance}")));
            }
            for row in &rows {
                delete_everything(&mut ctx.conn, &col::<String>(row, 0)?).await?;
            }
            Ok(rows.len() as u64)
        })
    })
    .await
}
