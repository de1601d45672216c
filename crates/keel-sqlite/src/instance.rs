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
use rusqlite::Connection;

use crate::convert::{
    check_size, col, count, execution as stored_execution, instance_columns, instance_record,
    millis, record, status, status_set, u64_bits, uncount,
};
use crate::provider::SqliteProvider;
use crate::query::{self, execute};
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
pub(crate) fn insert(ctx: &mut WriteCtx, instance: &PreparedInstance) -> Result<bool> {
    let now = millis(ctx.now());
    let (parent, parent_execution, parent_op) = match &instance.parent {
        Some((id, execution, op)) => (Some(id.as_str()), Some(*execution), Some(*op)),
        None => (None, None, None),
    };
    let inserted = execute(
        &ctx.conn,
        "INSERT INTO instances (id, name, version, status, execution, input, queue, priority, \
         tags, parent_instance, parent_execution, parent_op, created_at, updated_at) \
         VALUES (?1, ?2, ?3, 'pending', 1, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?11) \
         ON CONFLICT (id) DO NOTHING",
        rusqlite::params![
            instance.id.as_str(),
            instance.name,
            instance.version,
            instance.input,
            instance.queue,
            instance.priority,
            instance.tags_blob,
            parent,
            parent_execution,
            parent_op,
            now,
        ],
    )?;
    if inserted == 0 {
        return Ok(false);
    }
    for (key, value) in &instance.tags {
        execute(
            &ctx.conn,
            "INSERT INTO instance_tags (instance, key, value) VALUES (?1, ?2, ?3)",
            (instance.id.as_str(), key, value),
        )?;
    }
    let visible_at = instance.start_at.unwrap_or(now);
    insert_message(
        &ctx.conn,
        instance.id.as_str(),
        visible_at,
        now,
        &instance.start,
    )?;
    ctx.wake(WorkKind::Orchestrations);
    Ok(true)
}

/// Enqueues one encoded message for `instance`, visible at `visible_at`; returns
/// whether the instance exists (nothing is stored when it does not).
pub(crate) fn insert_message(
    conn: &Connection,
    instance: &str,
    visible_at: i64,
    now: i64,
    body: &[u8],
) -> Result<bool> {
    let inserted = execute(
        conn,
        "INSERT INTO messages (instance, priority, ready, visible_at, enqueued_at, body) \
         SELECT id, priority, ?2 <= ?3, ?2, ?3, ?4 FROM instances WHERE id = ?1",
        (instance, visible_at, now, body),
    )?;
    Ok(inserted > 0)
}

/// One instance read on `conn`, if it exists.
fn read_instance(conn: &Connection, instance: &InstanceId) -> Result<Option<InstanceRecord>> {
    query::first(
        conn,
        concat!(
            "SELECT ",
            instance_columns!(),
            " FROM instances WHERE id = ?1"
        ),
        [instance.as_str()],
        instance_record,
    )
}

pub(crate) async fn create(
    p: &SqliteProvider,
    instance: NewInstance,
    on_conflict: OnConflict,
) -> Result<Created> {
    let prepared = prepare(instance, p.inner.capabilities.max_record_bytes)?;
    p.write(move |ctx| {
        if insert(ctx, &prepared)? {
            return Ok(Created::New);
        }
        match on_conflict {
            OnConflict::Fail => Err(ProviderError::new(
                ErrorKind::AlreadyExists,
                format!("instance {} already exists", prepared.id),
            )),
            OnConflict::ReturnExisting => read_instance(&ctx.conn, &prepared.id)?
                .map(|record| Created::Existing(Box::new(record)))
                .ok_or_else(|| ProviderError::not_found(format!("instance {}", prepared.id))),
        }
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
        let now = millis(ctx.now());
        let visible_at = visible_at.map_or(now, millis);
        if !insert_message(&ctx.conn, instance.as_str(), visible_at, now, &body)? {
            return Err(ProviderError::not_found(format!("instance {instance}")));
        }
        ctx.wake(WorkKind::Orchestrations);
        Ok(())
    })
    .await
}

/// The status of `instance` read on the write connection, or `NotFound`.
fn current_status(ctx: &WriteCtx, instance: &InstanceId) -> Result<InstanceStatus> {
    query::first(
        &ctx.conn,
        "SELECT status FROM instances WHERE id = ?1",
        [instance.as_str()],
        |row| status(&col::<String>(row, 0)?),
    )?
    .ok_or_else(|| ProviderError::not_found(format!("instance {instance}")))
}

pub(crate) async fn pause(p: &SqliteProvider, instance: &InstanceId) -> Result<()> {
    let instance = instance.clone();
    p.write(move |ctx| {
        let current = current_status(ctx, &instance)?;
        if current.is_terminal() {
            return Err(ProviderError::new(
                ErrorKind::InvalidInput,
                format!("instance {instance} has ended ({current}) and cannot be paused"),
            ));
        }
        execute(
            &ctx.conn,
            "UPDATE instances SET status = 'paused', status_reason = NULL, updated_at = ?2 \
             WHERE id = ?1",
            (instance.as_str(), millis(ctx.now())),
        )?;
        Ok(())
    })
    .await
}

pub(crate) async fn resume(p: &SqliteProvider, instance: &InstanceId) -> Result<()> {
    let instance = instance.clone();
    p.write(move |ctx| {
        let current = current_status(ctx, &instance)?;
        if !matches!(current, InstanceStatus::Paused | InstanceStatus::Suspended) {
            return Err(ProviderError::new(
                ErrorKind::InvalidInput,
                format!("instance {instance} is {current}, neither paused nor suspended"),
            ));
        }
        execute(
            &ctx.conn,
            "UPDATE instances SET status = CASE WHEN acked = 1 THEN 'running' \
             ELSE 'pending' END, status_reason = NULL, updated_at = ?2 WHERE id = ?1",
            (instance.as_str(), millis(ctx.now())),
        )?;
        ctx.wake(WorkKind::Orchestrations);
        Ok(())
    })
    .await
}

pub(crate) async fn get(p: &SqliteProvider, instance: &InstanceId) -> Result<InstanceRecord> {
    let instance = instance.clone();
    p.read(move |conn| {
        read_instance(conn, &instance)?
            .ok_or_else(|| ProviderError::not_found(format!("instance {instance}")))
    })
    .await
}

pub(crate) async fn read_history(
    p: &SqliteProvider,
    instance: &InstanceId,
    execution: Option<ExecutionId>,
) -> Result<Vec<Event>> {
    let instance = instance.clone();
    p.read(move |conn| {
        let current = query::first(
            conn,
            "SELECT execution FROM instances WHERE id = ?1",
            [instance.as_str()],
            |row| stored_execution(col(row, 0)?),
        )?
        .ok_or_else(|| ProviderError::not_found(format!("instance {instance}")))?;
        let execution = execution.unwrap_or(current);
        if execution.get() == 0 || execution > current {
            return Err(ProviderError::not_found(format!(
                "execution {execution} of instance {instance}"
            )));
        }
        query::all(
            conn,
            "SELECT event, seq FROM history WHERE instance = ?1 AND execution = ?2 ORDER BY seq",
            (instance.as_str(), i64::from(execution.get())),
            |row| {
                let seq: i64 = col(row, 1)?;
                record(
                    row,
                    0,
                    decode_record::<Event>,
                    format_args!(
                        "history event {seq} of execution {execution} of instance {instance}"
                    ),
                )
            },
        )
    })
    .await
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
    let take = usize::try_from(limit).unwrap_or(usize::MAX);
    let rows = p
        .read(move |conn| {
            // One row past the page says whether there is more; it is not decoded.
            let mut seen = 0;
            query::all(
                conn,
                concat!(
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
                ),
                rusqlite::params![
                    status_set(&query.statuses),
                    query.name,
                    query.created_from.map(millis),
                    query.created_until.map(millis),
                    tag_key,
                    tag_value,
                    after.map(|(at, _)| at),
                    after.map_or(0, |(_, seq)| seq),
                    limit + 1,
                ],
                |row| {
                    seen += 1;
                    if seen > take {
                        return Ok(None);
                    }
                    let position = (col::<i64>(row, 17)?, col::<i64>(row, 20)?);
                    Ok(Some((instance_record(row)?, position)))
                },
            )
        })
        .await?;
    let more = rows.len() > take;
    let mut items = Vec::with_capacity(rows.len());
    let mut next = None;
    for (record, (at, seq)) in rows.into_iter().flatten() {
        items.push(record);
        next = Some((at, seq));
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
    p.read(move |conn| {
        let (messages_ready, messages_delayed) = query::one(
            conn,
            "SELECT COALESCE(SUM(visible_at <= ?1), 0), COALESCE(SUM(visible_at > ?1), 0) \
             FROM messages",
            [now],
            |row| {
                Ok((
                    uncount(col(row, 0)?, "a count")?,
                    uncount(col(row, 1)?, "a count")?,
                ))
            },
        )?;
        let (activities_delayed, activities_running) = query::one(
            conn,
            "SELECT COALESCE(SUM(lease_token IS NULL AND visible_at > ?1), 0), \
             COALESCE(SUM(lease_token IS NOT NULL AND visible_at > ?1), 0) FROM work_items",
            [now],
            |row| {
                Ok((
                    uncount(col(row, 0)?, "a count")?,
                    uncount(col(row, 1)?, "a count")?,
                ))
            },
        )?;
        let activities_ready = query::all(
            conn,
            "SELECT queue, COUNT(*) FROM work_items WHERE cancelled = 0 AND visible_at <= ?1 \
             GROUP BY queue",
            [now],
            |row| Ok((col::<String>(row, 0)?, uncount(col(row, 1)?, "a count")?)),
        )?
        .into_iter()
        .collect();
        let dead_letters = query::one(conn, "SELECT COUNT(*) FROM dead_letters", [], |row| {
            uncount(col(row, 0)?, "a count")
        })?;
        Ok(QueueDepths {
            messages_ready,
            messages_delayed,
            activities_ready,
            activities_delayed,
            activities_running,
            dead_letters,
        })
    })
    .await
}

/// Deletes one instance and everything stored for it.
fn delete_everything(conn: &Connection, instance: &str) -> Result<()> {
    for sql in [
        "DELETE FROM history WHERE instance = ?1",
        "DELETE FROM messages WHERE instance = ?1",
        "DELETE FROM work_items WHERE instance = ?1",
        "DELETE FROM dead_letters WHERE instance = ?1",
        "DELETE FROM instance_tags WHERE instance = ?1",
        "DELETE FROM instances WHERE id = ?1",
    ] {
        execute(conn, sql, [instance])?;
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
        let ids = query::all(
            &ctx.conn,
            "SELECT id FROM instances WHERE completed_at < ?1 \
             AND instr(?2, ',' || status || ',') > 0",
            (before, statuses),
            |row| col::<String>(row, 0),
        )?;
        for id in &ids {
            delete_everything(&ctx.conn, id)?;
        }
        Ok(ids.len() as u64)
    })
    .await
}

pub(crate) async fn delete(p: &SqliteProvider, instance: &InstanceId) -> Result<u64> {
    let instance = instance.clone();
    p.write(move |ctx| {
        let ids = query::all(
            &ctx.conn,
            "WITH RECURSIVE tree (id) AS ( \
               SELECT id FROM instances WHERE id = ?1 \
               UNION SELECT i.id FROM instances i JOIN tree t ON i.parent_instance = t.id) \
             SELECT id FROM tree",
            [instance.as_str()],
            |row| col::<String>(row, 0),
        )?;
        if ids.is_empty() {
            return Err(ProviderError::not_found(format!("instance {instance}")));
        }
        for id in &ids {
            delete_everything(&ctx.conn, id)?;
        }
        Ok(ids.len() as u64)
    })
    .await
}
