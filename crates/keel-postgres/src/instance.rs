//! Instances: creating them, messages for them, pause and resume, reading, listing,
//! purging and deleting.

use deadpool_postgres::GenericClient;
use keel_core::{
    Event, ExecutionId, InstanceId, InstanceStatus, Message, Timestamp, decode_record,
    encode_record,
};
use keel_provider::{
    Created, Cursor, InstanceQuery, InstanceRecord, NewInstance, OnConflict, Page, PageRequest,
    ProviderError, PurgeFilter, QueueDepths, Result,
};
use tokio_postgres::types::ToSql;

use crate::convert::{
    check_size, col, count, execution as stored_execution, execution_col, instance_columns,
    instance_record, int, millis, record, status, status_names, u64_bits, uncount,
};
use crate::error::invalid;
use crate::provider::PostgresProvider;
use crate::statement::{execute, query, query_one, query_opt};

/// An instance ready to insert: every record encoded, sizes checked.
#[derive(Debug)]
pub(crate) struct PreparedInstance {
    pub(crate) id: InstanceId,
    name: String,
    version: Option<i32>,
    input: Vec<u8>,
    start_at: Option<i64>,
    queue: String,
    priority: i32,
    tag_keys: Vec<String>,
    tag_values: Vec<String>,
    tags_blob: Vec<u8>,
    parent: Option<String>,
    parent_execution: Option<i32>,
    parent_op: Option<i64>,
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
    let (tag_keys, tag_values) = tags.into_iter().unzip();
    Ok(PreparedInstance {
        name,
        version: version.map(int),
        input: input.into_bytes(),
        start_at: start_at.map(millis),
        queue: queue.as_str().to_owned(),
        priority,
        tag_keys,
        tag_values,
        tags_blob,
        parent: parent.as_ref().map(|p| p.instance.as_str().to_owned()),
        parent_execution: parent.as_ref().map(|p| execution_col(p.execution)),
        parent_op: parent.as_ref().map(|p| u64_bits(p.op.get())),
        start,
        id,
    })
}

/// Inserts the instance, its payloads and tags and its start message in one statement,
/// unless the id exists.
const INSERT: &str = "\
WITH ins AS ( \
  INSERT INTO instances (id, name, version, status, execution, queue, priority, \
    parent_instance, parent_execution, parent_op, created_at, updated_at) \
  VALUES ($1, $2, $3, 'pending', 1, $4, $5, $6, $7, $8, keel_now(), keel_now()) \
  ON CONFLICT (id) DO NOTHING RETURNING id, priority), \
pay AS (INSERT INTO instance_payloads (instance, input, tags) SELECT id, $9, $10 FROM ins), \
tag AS (INSERT INTO instance_tags (instance, key, value) \
  SELECT ins.id, t.key, t.value FROM ins, unnest($11::text[], $12::text[]) AS t (key, value)), \
msg AS (INSERT INTO messages (instance, priority, visible_at, enqueued_at, body) \
  SELECT id, priority, COALESCE($13, keel_now()), keel_now(), $14 FROM ins) \
SELECT count(*) FROM ins";

/// Inserts a prepared instance with its start message, unless its id exists. Returns
/// whether it was inserted.
pub(crate) async fn insert<C: GenericClient>(
    client: &C,
    instance: &PreparedInstance,
) -> Result<bool> {
    let row = query_one(
        client,
        INSERT,
        &[
            &instance.id.as_str(),
            &instance.name,
            &instance.version,
            &instance.queue,
            &instance.priority,
            &instance.parent,
            &instance.parent_execution,
            &instance.parent_op,
            &instance.input,
            &instance.tags_blob,
            &instance.tag_keys,
            &instance.tag_values,
            &instance.start_at,
            &instance.start,
        ],
    )
    .await?;
    Ok(col::<i64>(&row, 0)? > 0)
}

/// Instances ready to insert together (the children of a batch of turns), as the
/// columns of one `unnest`; each tag names its instance by position (from 1).
#[derive(Debug, Default)]
pub(crate) struct PreparedInstances<'a> {
    id: Vec<&'a str>,
    name: Vec<&'a str>,
    version: Vec<Option<i32>>,
    queue: Vec<&'a str>,
    priority: Vec<i32>,
    parent: Vec<Option<&'a str>>,
    parent_execution: Vec<Option<i32>>,
    parent_op: Vec<Option<i64>>,
    input: Vec<&'a [u8]>,
    tags_blob: Vec<&'a [u8]>,
    start_at: Vec<Option<i64>>,
    start: Vec<&'a [u8]>,
    tag_of: Vec<i64>,
    tag_key: Vec<&'a str>,
    tag_value: Vec<&'a str>,
}

impl<'a> PreparedInstances<'a> {
    pub(crate) fn push(&mut self, instance: &'a PreparedInstance) {
        self.id.push(instance.id.as_str());
        self.name.push(&instance.name);
        self.version.push(instance.version);
        self.queue.push(&instance.queue);
        self.priority.push(instance.priority);
        self.parent.push(instance.parent.as_deref());
        self.parent_execution.push(instance.parent_execution);
        self.parent_op.push(instance.parent_op);
        self.input.push(&instance.input);
        self.tags_blob.push(&instance.tags_blob);
        self.start_at.push(instance.start_at);
        self.start.push(&instance.start);
        let position = count(self.id.len() as u64);
        for (key, value) in instance.tag_keys.iter().zip(&instance.tag_values) {
            self.tag_of.push(position);
            self.tag_key.push(key);
            self.tag_value.push(value);
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.id.is_empty()
    }

    /// The parameters of [`INSERT_MANY`].
    pub(crate) fn params(&self) -> [&(dyn ToSql + Sync); 15] {
        [
            &self.id,
            &self.name,
            &self.version,
            &self.queue,
            &self.priority,
            &self.parent,
            &self.parent_execution,
            &self.parent_op,
            &self.input,
            &self.tags_blob,
            &self.start_at,
            &self.start,
            &self.tag_of,
            &self.tag_key,
            &self.tag_value,
        ]
    }
}

/// Inserts many instances, each with its payloads, tags and start message, in one
/// statement, skipping ids that exist (or came earlier in the arrays): [`INSERT`] for
/// a batch.
pub(crate) const INSERT_MANY: &str = "\
WITH src AS ( \
  SELECT * FROM unnest($1::text[], $2::text[], $3::integer[], $4::text[], $5::integer[], \
    $6::text[], $7::integer[], $8::bigint[], $9::bytea[], $10::bytea[], $11::bigint[], \
    $12::bytea[]) WITH ORDINALITY AS s (id, name, version, queue, priority, parent, \
    parent_execution, parent_op, input, tags, start_at, start, n)), \
ins AS ( \
  INSERT INTO instances (id, name, version, status, execution, queue, priority, \
    parent_instance, parent_execution, parent_op, created_at, updated_at) \
  SELECT id, name, version, 'pending', 1, queue, priority, parent, parent_execution, \
    parent_op, keel_now(), keel_now() FROM src ORDER BY n \
  ON CONFLICT (id) DO NOTHING RETURNING id), \
new AS (SELECT DISTINCT ON (s.id) s.* FROM src s JOIN ins ON ins.id = s.id \
  ORDER BY s.id, s.n), \
pay AS (INSERT INTO instance_payloads (instance, input, tags) \
  SELECT id, input, tags FROM new), \
tag AS (INSERT INTO instance_tags (instance, key, value) \
  SELECT new.id, t.key, t.value FROM new \
  JOIN unnest($13::bigint[], $14::text[], $15::text[]) AS t (child, key, value) \
    ON t.child = new.n), \
msg AS (INSERT INTO messages (instance, priority, visible_at, enqueued_at, body) \
  SELECT id, priority, COALESCE(start_at, keel_now()), keel_now(), start FROM new \
  ORDER BY n) \
SELECT count(*) FROM ins";

/// Enqueues encoded messages for `instance`, visible at `visible_at` (now when none);
/// returns whether the instance exists (nothing is stored when it does not).
pub(crate) async fn insert_messages<C: GenericClient>(
    client: &C,
    instance: &str,
    visible_at: Option<i64>,
    bodies: &[&[u8]],
) -> Result<bool> {
    let inserted = execute(
        client,
        "INSERT INTO messages (instance, priority, visible_at, enqueued_at, body) \
         SELECT i.id, i.priority, COALESCE($2, keel_now()), keel_now(), b.body \
         FROM instances i, unnest($3::bytea[]) WITH ORDINALITY AS b (body, n) \
         WHERE i.id = $1 ORDER BY b.n",
        &[&instance, &visible_at, &bodies],
    )
    .await?;
    Ok(inserted > 0)
}

/// One instance, if it exists.
async fn read_instance<C: GenericClient>(
    client: &C,
    instance: &InstanceId,
) -> Result<Option<InstanceRecord>> {
    let row = query_opt(
        client,
        concat!(
            "SELECT ",
            instance_columns!(),
            " FROM instances i JOIN instance_payloads d ON d.instance = i.id WHERE i.id = $1"
        ),
        &[&instance.as_str()],
    )
    .await?;
    row.as_ref().map(instance_record).transpose()
}

fn unknown(instance: &InstanceId) -> ProviderError {
    ProviderError::not_found(format!("instance {instance}"))
}

pub(crate) async fn create(
    p: &PostgresProvider,
    instance: NewInstance,
    on_conflict: OnConflict,
) -> Result<Created> {
    let prepared = prepare(instance, p.capabilities_ref().max_record_bytes)?;
    let client = p.client().await?;
    if insert(&client, &prepared).await? {
        return Ok(Created::New);
    }
    match on_conflict {
        OnConflict::Fail => Err(ProviderError::new(
            keel_provider::ErrorKind::AlreadyExists,
            format!("instance {} already exists", prepared.id),
        )),
        OnConflict::ReturnExisting => read_instance(&client, &prepared.id)
            .await?
            .map(|record| Created::Existing(Box::new(record)))
            // Deleted between the insert and the read: as good as never there.
            .ok_or_else(|| unknown(&prepared.id)),
    }
}

pub(crate) async fn send_message(
    p: &PostgresProvider,
    instance: &InstanceId,
    message: Message,
    visible_at: Option<Timestamp>,
) -> Result<()> {
    let body = encode_record(&message)?;
    let limit = p.capabilities_ref().max_record_bytes;
    check_size(|| format!("a message for {instance}"), body.len(), limit)?;
    let client = p.client().await?;
    if !insert_messages(&client, instance.as_str(), visible_at.map(millis), &[&body]).await? {
        return Err(unknown(instance));
    }
    Ok(())
}

/// The status of `instance`, or `NotFound`.
async fn current_status<C: GenericClient>(
    client: &C,
    instance: &InstanceId,
) -> Result<InstanceStatus> {
    let row = query_opt(
        client,
        "SELECT status FROM instances WHERE id = $1",
        &[&instance.as_str()],
    )
    .await?
    .ok_or_else(|| unknown(instance))?;
    status(col::<&str>(&row, 0)?)
}

pub(crate) async fn pause(p: &PostgresProvider, instance: &InstanceId) -> Result<()> {
    let client = p.client().await?;
    let changed = execute(
        &client,
        "UPDATE instances SET status = 'paused', status_reason = NULL, updated_at = keel_now() \
         WHERE id = $1 AND status NOT IN ('completed', 'failed', 'cancelled')",
        &[&instance.as_str()],
    )
    .await?;
    if changed == 0 {
        let current = current_status(&client, instance).await?;
        return Err(invalid(format!(
            "instance {instance} has ended ({current}) and cannot be paused"
        )));
    }
    Ok(())
}

pub(crate) async fn resume(p: &PostgresProvider, instance: &InstanceId) -> Result<()> {
    let client = p.client().await?;
    // Its messages are fetchable again: the notify wakes dispatchers everywhere.
    let changed = query(
        &client,
        "WITH u AS (UPDATE instances SET \
           status = CASE WHEN acked THEN 'running' ELSE 'pending' END, \
           status_reason = NULL, updated_at = keel_now() \
         WHERE id = $1 AND status IN ('paused', 'suspended') RETURNING 1) \
         SELECT pg_notify($2, '')::text FROM u",
        &[&instance.as_str(), &p.inner.channels.orchestrations],
    )
    .await?;
    if changed.is_empty() {
        let current = current_status(&client, instance).await?;
        return Err(invalid(format!(
            "instance {instance} is {current}, neither paused nor suspended"
        )));
    }
    Ok(())
}

pub(crate) async fn get(p: &PostgresProvider, instance: &InstanceId) -> Result<InstanceRecord> {
    let client = p.client().await?;
    read_instance(&client, instance)
        .await?
        .ok_or_else(|| unknown(instance))
}

pub(crate) async fn read_history(
    p: &PostgresProvider,
    instance: &InstanceId,
    execution: Option<ExecutionId>,
) -> Result<Vec<Event>> {
    let client = p.client().await?;
    // One statement: the instance's current execution, with the events of the one
    // asked for (the current one when none is); a row with no event when it has none.
    let rows = query(
        &client,
        "SELECT i.execution, h.seq, h.event FROM instances i \
         LEFT JOIN history h ON h.instance = i.id \
           AND h.execution = COALESCE($2, i.execution) \
         WHERE i.id = $1 ORDER BY h.seq",
        &[&instance.as_str(), &execution.map(execution_col)],
    )
    .await?;
    let first = rows.first().ok_or_else(|| unknown(instance))?;
    let current = stored_execution(col(first, 0)?)?;
    let execution = execution.unwrap_or(current);
    if execution.get() == 0 || execution > current {
        return Err(ProviderError::not_found(format!(
            "execution {execution} of instance {instance}"
        )));
    }
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        let Some(seq) = col::<Option<i64>>(row, 1)? else {
            continue;
        };
        events.push(record(
            row,
            2,
            decode_record::<Event>,
            format_args!("history event {seq} of execution {execution} of instance {instance}"),
        )?);
    }
    Ok(events)
}

/// A listing position: the last item's creation time and row number.
fn parse_cursor(cursor: &Cursor) -> Result<(i64, i64)> {
    cursor
        .0
        .split_once(':')
        .and_then(|(at, seq)| Some((at.parse().ok()?, seq.parse().ok()?)))
        .ok_or_else(|| invalid(format!("{:?} is not a cursor of this listing", cursor.0)))
}

/// How many items a page holds: the request's limit, capped by `max_page`.
pub(crate) fn page_size(page: &PageRequest, max_page: usize) -> Result<i64> {
    if page.limit == 0 {
        return Err(invalid("a page must hold at least one item"));
    }
    Ok(count(page.limit.min(max_page) as u64))
}

pub(crate) async fn list(
    p: &PostgresProvider,
    query_: InstanceQuery,
    page: PageRequest,
) -> Result<Page<InstanceRecord>> {
    let limit = page_size(&page, p.capabilities_ref().max_page)?;
    let after = page.cursor.as_ref().map(parse_cursor).transpose()?;
    let (tag_key, tag_value) = query_.tag.unzip();
    let statuses = (!query_.statuses.is_empty()).then(|| status_names(&query_.statuses));
    let client = p.client().await?;
    let rows = query(
        &client,
        concat!(
            "SELECT ",
            instance_columns!(),
            " FROM instances i JOIN instance_payloads d ON d.instance = i.id \
             WHERE ($1::text[] IS NULL OR i.status = ANY($1)) \
             AND ($2::text IS NULL OR i.name = $2) \
             AND ($3::bigint IS NULL OR i.created_at >= $3) \
             AND ($4::bigint IS NULL OR i.created_at < $4) \
             AND ($5::text IS NULL OR EXISTS (SELECT 1 FROM instance_tags t \
                  WHERE t.instance = i.id AND t.key = $5 AND t.value = $6)) \
             AND ($7::bigint IS NULL OR (i.created_at, i.seq) > ($7, $8)) \
             ORDER BY i.created_at, i.seq LIMIT $9"
        ),
        &[
            &statuses,
            &query_.name,
            &query_.created_from.map(millis),
            &query_.created_until.map(millis),
            &tag_key,
            &tag_value,
            &after.map(|(at, _)| at),
            &after.map_or(0, |(_, seq)| seq),
            &(limit + 1),
        ],
    )
    .await?;
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

pub(crate) async fn queue_depths(p: &PostgresProvider) -> Result<QueueDepths> {
    let client = p.client().await?;
    let row = query_one(
        &client,
        "WITH t AS (SELECT keel_now() AS now) SELECT \
           (SELECT count(*) FROM messages, t WHERE visible_at <= t.now), \
           (SELECT count(*) FROM messages, t WHERE visible_at > t.now), \
           (SELECT count(*) FROM work_items, t WHERE lease_token IS NULL AND visible_at > t.now), \
           (SELECT count(*) FROM work_items, t \
            WHERE lease_token IS NOT NULL AND visible_at > t.now), \
           (SELECT count(*) FROM dead_letters)",
        &[],
    )
    .await?;
    let rows = query(
        &client,
        "SELECT queue, count(*) FROM work_items \
         WHERE NOT cancelled AND visible_at <= keel_now() GROUP BY queue",
        &[],
    )
    .await?;
    let mut activities_ready = std::collections::BTreeMap::new();
    for r in &rows {
        activities_ready.insert(col::<String>(r, 0)?, uncount(col(r, 1)?, "a count")?);
    }
    Ok(QueueDepths {
        messages_ready: uncount(col(&row, 0)?, "a count")?,
        messages_delayed: uncount(col(&row, 1)?, "a count")?,
        activities_ready,
        activities_delayed: uncount(col(&row, 2)?, "a count")?,
        activities_running: uncount(col(&row, 3)?, "a count")?,
        dead_letters: uncount(col(&row, 4)?, "a count")?,
    })
}

/// Deletes the instances `gone` selects, with everything stored for them (payloads
/// and tags go by cascade), in one statement; its one row counts them.
macro_rules! delete_everything {
    ($gone:literal) => {
        concat!(
            $gone,
            ", h AS (DELETE FROM history WHERE instance IN (SELECT id FROM gone)), \
             m AS (DELETE FROM messages WHERE instance IN (SELECT id FROM gone)), \
             w AS (DELETE FROM work_items WHERE instance IN (SELECT id FROM gone)), \
             d AS (DELETE FROM dead_letters WHERE instance IN (SELECT id FROM gone)) \
             SELECT count(*) FROM gone"
        )
    };
}

pub(crate) async fn purge(p: &PostgresProvider, filter: PurgeFilter) -> Result<u64> {
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
    let client = p.client().await?;
    let row = query_one(
        &client,
        delete_everything!(
            "WITH gone AS (DELETE FROM instances WHERE completed_at < $1 \
             AND status = ANY($2) RETURNING id)"
        ),
        &[&millis(filter.completed_before), &status_names(&statuses)],
    )
    .await?;
    uncount(col(&row, 0)?, "a count")
}

pub(crate) async fn delete(p: &PostgresProvider, instance: &InstanceId) -> Result<u64> {
    let client = p.client().await?;
    let row = query_one(
        &client,
        delete_everything!(
            "WITH RECURSIVE tree (id) AS ( \
               SELECT id FROM instances WHERE id = $1 \
               UNION SELECT i.id FROM instances i JOIN tree t ON i.parent_instance = t.id), \
             gone AS (DELETE FROM instances WHERE id IN (SELECT id FROM tree) RETURNING id)"
        ),
        &[&instance.as_str()],
    )
    .await?;
    let deleted = uncount(col(&row, 0)?, "a count")?;
    if deleted == 0 {
        return Err(unknown(instance));
    }
    Ok(deleted)
}
