//! The schema: its validated name, the channels named after it, and the numbered
//! migrations embedded in the binary and applied at connect.
//!
//! `keel_schema_version` lists the migrations applied. Connecting applies the missing
//! ones in one transaction that first takes a transaction-scoped advisory lock on the
//! schema's name, so several processes starting at once migrate it exactly once; it
//! refuses a schema written by a newer build. Never edit a released migration: add the
//! next number.

use deadpool_postgres::Client;
use keel_provider::{ErrorKind, ProviderError, Result};

use crate::error::{db, invalid};

/// The longest schema name: PostgreSQL identifiers hold 63 bytes, and the channel
/// names add a seven-byte prefix.
const MAX_NAME: usize = 56;

/// A schema name checked to be a plain lowercase identifier. It cannot be a query
/// parameter, so it is the one name formatted into SQL, always double-quoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SchemaName(String);

impl SchemaName {
    /// Checks `name`, naming what is wrong with it.
    pub(crate) fn new(name: &str) -> Result<Self> {
        let bad = |why: &str| invalid(format!("schema name {name:?} is not valid: {why}"));
        let mut chars = name.chars();
        let Some(first) = chars.next() else {
            return Err(bad("it is empty"));
        };
        if name.len() > MAX_NAME {
            return Err(bad(&format!("it is longer than {MAX_NAME} bytes")));
        }
        if !(first.is_ascii_lowercase() || first == '_') {
            return Err(bad("it must start with a lowercase ASCII letter or `_`"));
        }
        if !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
            return Err(bad(
                "it may hold only lowercase ASCII letters, digits and `_`",
            ));
        }
        if name.starts_with("pg_") {
            return Err(bad("names starting with `pg_` are reserved by PostgreSQL"));
        }
        Ok(Self(name.to_owned()))
    }

    /// The name as given.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as a quoted identifier (it holds no quotes: see [`SchemaName::new`]).
    pub(crate) fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }
}

/// The `LISTEN/NOTIFY` channels of one schema: the triggers and statements that
/// notify build the same names from `TG_TABLE_SCHEMA` or these strings.
#[derive(Debug, Clone)]
pub(crate) struct Channels {
    /// Orchestrator messages became visible (or may have).
    pub(crate) orchestrations: String,
    /// Activity work items became visible (or may have).
    pub(crate) activities: String,
    /// An instance ended, continued as new or was suspended.
    pub(crate) ended: String,
}

impl Channels {
    pub(crate) fn new(schema: &SchemaName) -> Self {
        Self {
            orchestrations: format!("keel_o_{}", schema.as_str()),
            activities: format!("keel_a_{}", schema.as_str()),
            ended: format!("keel_e_{}", schema.as_str()),
        }
    }
}

/// The migrations, in order: `(version, SQL)`.
const MIGRATIONS: &[(i32, &str)] = &[(1, V1_INITIAL), (2, V2_HOT_LOCKS), (3, V3_EAGER_WAKE_UPS)];

/// The first schema.
///
/// Records are postcard blobs (`keel_core::encode_record`); the columns beside them
/// are what queries filter, order and index on. Times are milliseconds since the Unix
/// epoch from the database's clock (`keel_now()`: the transaction's `now()`). Hot rows
/// stay small: instance payloads live in `instance_payloads` and work item bodies in
/// `work_item_bodies`, so that locking an instance or leasing an item rewrites a
/// narrow row (and `fillfactor` leaves room for HOT updates). Work items use one
/// `visible_at` column for "claimable from": the retry time while queued, the lease's
/// expiry while leased, so an expired lease is simply visible again.
const V1_INITIAL: &str = r"
CREATE FUNCTION keel_now() RETURNS bigint LANGUAGE sql STABLE
    AS $$ SELECT floor(extract(epoch FROM now()) * 1000)::bigint $$;

-- Lock and lease tokens: never repeated, across processes and restarts.
CREATE SEQUENCE tokens;

CREATE TABLE instances (
    seq bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    id text PRIMARY KEY,
    name text NOT NULL,
    version integer,
    status text NOT NULL,
    status_reason text,
    -- Whether any turn has been acked: a resumed instance is Running, else Pending.
    acked boolean NOT NULL DEFAULT false,
    execution integer NOT NULL,
    queue text NOT NULL,
    priority integer NOT NULL,
    parent_instance text,
    parent_execution integer,
    parent_op bigint,
    history_len bigint NOT NULL DEFAULT 0,
    -- The lock is held iff lock_token matches and locked_until is in the future.
    lock_token bigint,
    locked_until bigint,
    created_at bigint NOT NULL,
    updated_at bigint NOT NULL,
    completed_at bigint
) WITH (fillfactor = 70);
CREATE INDEX instances_by_created ON instances (created_at, seq);
CREATE INDEX instances_by_parent ON instances (parent_instance)
    WHERE parent_instance IS NOT NULL;
CREATE INDEX instances_by_completion ON instances (completed_at)
    WHERE completed_at IS NOT NULL;
-- next_due: instances whose lock was abandoned with a delay.
CREATE INDEX instances_by_release ON instances (locked_until)
    WHERE lock_token IS NULL AND locked_until IS NOT NULL;

CREATE TABLE instance_payloads (
    instance text PRIMARY KEY REFERENCES instances (id) ON DELETE CASCADE,
    input bytea NOT NULL,
    output bytea,
    failure bytea,
    custom_status bytea,
    tags bytea NOT NULL
);

-- The tags again, one row each, for filtering listings by tag.
CREATE TABLE instance_tags (
    instance text NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    key text NOT NULL,
    value text NOT NULL,
    PRIMARY KEY (instance, key)
);
CREATE INDEX instance_tags_by_value ON instance_tags (key, value);

-- Messages are inserted once and deleted once, never updated: their bodies stay.
CREATE TABLE messages (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance text NOT NULL,
    -- The instance's priority (fixed at creation), copied so that the fetch walks one
    -- index in claim order: highest priority, then oldest message.
    priority integer NOT NULL,
    visible_at bigint NOT NULL,
    enqueued_at bigint NOT NULL,
    body bytea NOT NULL
);
CREATE INDEX messages_claim ON messages (priority DESC, id) INCLUDE (instance, visible_at);
CREATE INDEX messages_by_instance ON messages (instance, id);
CREATE INDEX messages_by_visible ON messages (visible_at);

CREATE TABLE history (
    instance text NOT NULL,
    execution integer NOT NULL,
    seq bigint NOT NULL,
    event bytea NOT NULL,
    PRIMARY KEY (instance, execution, seq)
);

CREATE SEQUENCE work_item_ids;
CREATE TABLE work_items (
    id bigint PRIMARY KEY DEFAULT nextval('work_item_ids'),
    instance text NOT NULL,
    execution integer NOT NULL,
    op bigint NOT NULL,
    name text NOT NULL,
    queue text NOT NULL,
    priority integer NOT NULL,
    attempt integer NOT NULL,
    visible_at bigint NOT NULL,
    lease_token bigint,
    deliveries integer NOT NULL DEFAULT 0,
    cancelled boolean NOT NULL DEFAULT false,
    created_at bigint NOT NULL
) WITH (fillfactor = 70);
-- The activity fetch: per queue, highest priority then oldest.
CREATE INDEX work_items_claim ON work_items (queue, priority DESC, id, visible_at)
    WHERE NOT cancelled;
-- Concurrency limits: leases of one name that have not expired.
CREATE INDEX work_items_leased ON work_items (name, visible_at)
    WHERE lease_token IS NOT NULL;
-- next_due: the earliest queued (not leased) item that is not visible yet.
CREATE INDEX work_items_due ON work_items (visible_at) WHERE lease_token IS NULL;
-- Cancelled items whose lease expired, to drop.
CREATE INDEX work_items_cancelled ON work_items (visible_at) WHERE cancelled;
CREATE INDEX work_items_by_op ON work_items (instance, execution, op);

CREATE TABLE work_item_bodies (
    item bigint PRIMARY KEY REFERENCES work_items (id) ON DELETE CASCADE,
    body bytea NOT NULL
);

CREATE TABLE activity_limits (
    name text PRIMARY KEY,
    max_concurrent integer,
    max_per_second integer
);

-- Recent lease starts of rate-limited names: a sliding one-second window.
CREATE TABLE lease_starts (
    name text NOT NULL,
    started_at bigint NOT NULL
);
CREATE INDEX lease_starts_by_name ON lease_starts (name, started_at);

CREATE TABLE dead_letters (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance text NOT NULL,
    execution integer NOT NULL,
    op bigint NOT NULL,
    name text NOT NULL,
    attempts integer NOT NULL,
    failure bytea NOT NULL,
    item bytea,
    recorded_at bigint NOT NULL
);
CREATE INDEX dead_letters_by_instance ON dead_letters (instance);

-- Wake-ups: whatever enqueues work notifies in its own transaction, so a listener
-- hears of it exactly when it is committed. The channel carries the schema's name,
-- so that schemas sharing a database do not wake each other.
CREATE FUNCTION notify_enqueued() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM added) THEN
        PERFORM pg_notify(TG_ARGV[0] || TG_TABLE_SCHEMA, '');
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER messages_enqueued AFTER INSERT ON messages
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION notify_enqueued('keel_o_');
CREATE TRIGGER work_items_enqueued AFTER INSERT ON work_items
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION notify_enqueued('keel_a_');

-- News of an end: a terminal status, a suspension, or a continue-as-new.
CREATE FUNCTION notify_ended() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('keel_e_' || TG_TABLE_SCHEMA, '');
    RETURN NULL;
END $$;
CREATE TRIGGER instances_ended AFTER UPDATE ON instances FOR EACH ROW
    WHEN ((NEW.status IS DISTINCT FROM OLD.status
           AND NEW.status IN ('completed', 'failed', 'cancelled', 'suspended'))
          OR NEW.execution <> OLD.execution)
    EXECUTE FUNCTION notify_ended();
";

/// Locking and acking an instance become HOT updates (no new index entries, dead
/// versions pruned within the page), so a hot instance's row does not bloat its indexes
/// turn after turn. An update is HOT only if it changes no column an index names,
/// predicates included: `instances_by_release` named `lock_token` and `locked_until`,
/// which every turn sets twice. Its place is taken by `delayed_until`, which only an
/// abandon with a delay sets and the next claim clears: `next_due` reads that alone.
const V2_HOT_LOCKS: &str = r"
ALTER TABLE instances ADD COLUMN delayed_until bigint;
UPDATE instances SET delayed_until = locked_until
    WHERE lock_token IS NULL AND locked_until IS NOT NULL;
DROP INDEX instances_by_release;
CREATE INDEX instances_by_delay ON instances (delayed_until)
    WHERE delayed_until IS NOT NULL;
";

/// Eager dispatch takes work in the commit that enqueues it, for the committing worker:
/// what it took wakes nobody else, who would only look and find nothing. Work items
/// wake activity dispatchers only when some of those inserted are queued rather than
/// leased to an acking worker; messages wake orchestration dispatchers unless every one
/// went to an instance that this very transaction locked (a completion that locked the
/// instance its outcome tells): such an instance is locked by a row version this
/// transaction wrote. (`pg_current_xact_id()` needs PostgreSQL 13.)
const V3_EAGER_WAKE_UPS: &str = r"
CREATE FUNCTION notify_items_queued() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM added WHERE lease_token IS NULL) THEN
        PERFORM pg_notify('keel_a_' || TG_TABLE_SCHEMA, '');
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER work_items_enqueued ON work_items;
CREATE TRIGGER work_items_enqueued AFTER INSERT ON work_items
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION notify_items_queued();

CREATE FUNCTION notify_messages_for_others() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM added a WHERE NOT EXISTS (
        SELECT 1 FROM instances i
        WHERE i.id = a.instance AND i.lock_token IS NOT NULL
          AND i.locked_until > keel_now() AND i.xmin = pg_current_xact_id()::xid)) THEN
        PERFORM pg_notify('keel_o_' || TG_TABLE_SCHEMA, '');
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER messages_enqueued ON messages;
CREATE TRIGGER messages_enqueued AFTER INSERT ON messages
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION notify_messages_for_others();

DROP FUNCTION notify_enqueued();
";

/// Creates the schema if missing and applies the migrations it lacks, in one
/// transaction serialised by an advisory lock on the schema's name.
pub(crate) async fn migrate(client: &mut Client, schema: &SchemaName) -> Result<()> {
    let newest = MIGRATIONS.last().map_or(0, |(version, _)| *version);
    let tx = client.transaction().await.map_err(db)?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        &[&format!("keel-migrate:{}", schema.as_str())],
    )
    .await
    .map_err(db)?;
    // The schema name is validated and quoted: identifiers cannot be parameters.
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema}; SET LOCAL search_path TO {schema}; \
         CREATE TABLE IF NOT EXISTS keel_schema_version ( \
             version integer PRIMARY KEY, \
             applied_at timestamptz NOT NULL DEFAULT now())",
        schema = schema.quoted()
    ))
    .await
    .map_err(db)?;
    let row = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM keel_schema_version",
            &[],
        )
        .await
        .map_err(db)?;
    let current: i32 = row.try_get(0).map_err(db)?;
    if current > newest {
        return Err(ProviderError::new(
            ErrorKind::InvalidInput,
            format!(
                "schema {} has version {current}, newer than this build's {newest}: \
                 upgrade keel-postgres",
                schema.as_str()
            ),
        ));
    }
    for &(version, sql) in MIGRATIONS {
        if version <= current {
            continue;
        }
        tx.batch_execute(sql).await.map_err(db)?;
        tx.execute(
            "INSERT INTO keel_schema_version (version) VALUES ($1)",
            &[&version],
        )
        .await
        .map_err(db)?;
        tracing::info!(
            schema = schema.as_str(),
            version,
            "applied a keel-postgres migration"
        );
    }
    tx.commit().await.map_err(db)?;
    Ok(())
}

/// The newest migration this build knows.
pub(crate) fn newest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |(version, _)| *version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_plain_identifiers() {
        for good in ["keel", "_k", "keel_test_12", &"a".repeat(MAX_NAME)] {
            assert!(SchemaName::new(good).is_ok(), "{good}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("Keel", "start"),
            ("1keel", "start"),
            ("ke-el", "only"),
            ("k\"; DROP TABLE x; --", "only"),
            ("pg_catalog", "reserved"),
            (&"a".repeat(MAX_NAME + 1), "longer"),
        ] {
            let err = SchemaName::new(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput);
            assert!(err.message().contains(why), "{bad}: {err}");
        }
        assert_eq!(SchemaName::new("k").unwrap().quoted(), "\"k\"");
    }
}
