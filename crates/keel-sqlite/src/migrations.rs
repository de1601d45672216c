//! The schema, as numbered migrations embedded in the binary and applied at open.
//!
//! `keel_schema_version` lists the migrations applied. Opening applies the missing
//! ones in order, each in its own transaction, and refuses a database written by a
//! newer build. Never edit a released migration: add the next number.

use rusqlite::Connection;

use keel_provider::{ErrorKind, ProviderError, Result};

use crate::error::db;

/// The migrations, in order: `(version, SQL)`.
pub(crate) const MIGRATIONS: &[(i64, &str)] = &[(1, V1_INITIAL)];

/// The first schema.
///
/// Records are postcard blobs (`keel_core::encode_record`); the columns beside them
/// are what queries filter, order and index on. Times are milliseconds since the Unix
/// epoch from the provider's clock. Work items use one `visible_at` column for
/// "claimable from": the retry time while queued, the lease's expiry while leased, so
/// an expired lease is simply visible again.
const V1_INITIAL: &str = r"
CREATE TABLE keel_meta (
    key TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
) WITHOUT ROWID;
-- The last lock or lease token handed out: tokens change on every claim, across
-- restarts and processes, because they come from the database.
INSERT INTO keel_meta (key, value) VALUES ('token', 0);

CREATE TABLE instances (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    version INTEGER,
    status TEXT NOT NULL,
    status_reason TEXT,
    -- Whether any turn has been acked: a resumed instance is Running, else Pending.
    acked INTEGER NOT NULL DEFAULT 0,
    execution INTEGER NOT NULL,
    input BLOB NOT NULL,
    output BLOB,
    failure BLOB,
    custom_status BLOB,
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL,
    tags BLOB NOT NULL,
    parent_instance TEXT,
    parent_execution INTEGER,
    parent_op INTEGER,
    history_len INTEGER NOT NULL DEFAULT 0,
    -- The lock is held iff lock_token matches and locked_until is in the future.
    lock_token INTEGER,
    locked_until INTEGER,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    completed_at INTEGER
);
CREATE INDEX instances_by_created ON instances (created_at, seq);
CREATE INDEX instances_by_parent ON instances (parent_instance)
    WHERE parent_instance IS NOT NULL;
CREATE INDEX instances_by_completion ON instances (completed_at)
    WHERE completed_at IS NOT NULL;
-- next_due: instances whose lock was abandoned with a delay.
CREATE INDEX instances_by_release ON instances (locked_until)
    WHERE lock_token IS NULL AND locked_until IS NOT NULL;

-- The tags again, one row each, for filtering listings by tag.
CREATE TABLE instance_tags (
    instance TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (instance, key)
) WITHOUT ROWID;
CREATE INDEX instance_tags_by_value ON instance_tags (key, value);

CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    instance TEXT NOT NULL,
    -- The instance's priority (fixed at creation), copied so that the fetch walks one
    -- index in claim order: highest priority, then oldest message.
    priority INTEGER NOT NULL,
    -- 1 once visible: set at insert when visible_at has passed, else by the first
    -- fetch after it passes. Timers far in the future stay out of the fetch's index.
    ready INTEGER NOT NULL,
    visible_at INTEGER NOT NULL,
    enqueued_at INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX messages_ready ON messages (priority DESC, id, visible_at, instance)
    WHERE ready = 1;
CREATE INDEX messages_delayed ON messages (visible_at) WHERE ready = 0;
CREATE INDEX messages_by_instance ON messages (instance);

CREATE TABLE history (
    instance TEXT NOT NULL,
    execution INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    event BLOB NOT NULL,
    PRIMARY KEY (instance, execution, seq)
);

CREATE TABLE work_items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    instance TEXT NOT NULL,
    execution INTEGER NOT NULL,
    op INTEGER NOT NULL,
    name TEXT NOT NULL,
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    visible_at INTEGER NOT NULL,
    lease_token INTEGER,
    deliveries INTEGER NOT NULL DEFAULT 0,
    cancelled INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    body BLOB NOT NULL
);
-- The activity fetch: per queue, highest priority then oldest, visible now.
CREATE INDEX work_items_ready ON work_items (queue, priority DESC, id, visible_at)
    WHERE cancelled = 0;
-- Concurrency limits: leases of one name that have not expired.
CREATE INDEX work_items_leased ON work_items (name, visible_at)
    WHERE lease_token IS NOT NULL;
-- next_due: the earliest queued (not leased) item that is not visible yet.
CREATE INDEX work_items_due ON work_items (visible_at) WHERE lease_token IS NULL;
-- Cancelled items whose lease expired, to drop.
CREATE INDEX work_items_cancelled ON work_items (visible_at) WHERE cancelled = 1;
CREATE INDEX work_items_by_op ON work_items (instance, execution, op);

CREATE TABLE activity_limits (
    name TEXT PRIMARY KEY NOT NULL,
    max_concurrent INTEGER,
    max_per_second INTEGER
) WITHOUT ROWID;

-- Recent lease starts of rate-limited names: a sliding one-second window.
CREATE TABLE lease_starts (
    name TEXT NOT NULL,
    started_at INTEGER NOT NULL
);
CREATE INDEX lease_starts_by_name ON lease_starts (name, started_at);

CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    instance TEXT NOT NULL,
    execution INTEGER NOT NULL,
    op INTEGER NOT NULL,
    name TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    failure BLOB NOT NULL,
    item BLOB,
    recorded_at INTEGER NOT NULL
);
CREATE INDEX dead_letters_by_instance ON dead_letters (instance);
";

/// Applies the migrations `conn`'s database lacks. Safe to run on every open, from
/// several processes at once: each step runs under SQLite's write lock and re-checks
/// the version inside it.
pub(crate) fn apply(conn: &Connection, now_millis: i64) -> Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS keel_schema_version (
            version INTEGER PRIMARY KEY NOT NULL,
            applied_at INTEGER NOT NULL
        )",
    )
    .map_err(db)?;
    let newest = MIGRATIONS.last().map_or(0, |(version, _)| *version);
    for &(version, sql) in MIGRATIONS {
        conn.execute_batch("BEGIN IMMEDIATE").map_err(db)?;
        let step = || -> Result<()> {
            let current = current_version(conn)?;
            if current > newest {
                return Err(ProviderError::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "the database has schema version {current}, newer than this build's \
                         {newest}: upgrade keel-sqlite"
                    ),
                ));
            }
            if current < version {
                conn.execute_batch(sql).map_err(db)?;
                conn.execute(
                    "INSERT INTO keel_schema_version (version, applied_at) VALUES (?1, ?2)",
                    [version, now_millis],
                )
                .map_err(db)?;
            }
            Ok(())
        };
        match step() {
            Ok(()) => conn.execute_batch("COMMIT").map_err(db)?,
            Err(error) => {
                // The step's error is the one worth reporting; a failed rollback leaves
                // the connection unusable anyway, and it is dropped with the open.
                let _ = conn.execute_batch("ROLLBACK");
                return Err(error);
            }
        }
    }
    Ok(())
}

/// The newest migration applied, 0 for a new database.
pub(crate) fn current_version(conn: &Connection) -> Result<i64> {
    conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM keel_schema_version",
        [],
        |row| row.get(0),
    )
    .map_err(db)
}
