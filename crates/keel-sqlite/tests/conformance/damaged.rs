//! Stored bytes damaged behind the provider's back, which the kit cannot plant: the
//! records are rewritten through a connection of the test's own. An undecodable
//! message or history event sets its instance aside as suspended, an undecodable work
//! item becomes a dead letter, and neither keeps the healthy work beside it from being
//! fetched in the same call.

use std::time::Duration;

use keel_conformance::fixtures::{
    FIRST, activity, complete, end, expect_kind, fetch, id, lease, new_instance, payload, poke,
    provider_now, running, schedule, send, signal, signal_numbers,
};
use keel_core::{Failure, InstanceId, InstanceStatus, QueueName, RECORD_VERSION};
use keel_provider::{
    ErrorKind, FetchActivities, FetchOrchestrations, ManualClock, OnConflict, OrchestrationWork,
    PageRequest, Provider,
};
use keel_sqlite::SqliteProvider;
use rusqlite::Connection;
use rusqlite::types::Value;
use tempfile::TempDir;

/// A provider on a file, and a connection of the test's own to the same file.
struct Damaged {
    provider: SqliteProvider,
    raw: Connection,
    _dir: TempDir,
}

impl Damaged {
    async fn open() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("keel.db");
        let clock = ManualClock::new(crate::START);
        let provider = SqliteProvider::open_with(&path, crate::options(&clock))
            .await
            .expect("the database opens");
        let raw = Connection::open(&path).expect("a second connection opens");
        raw.busy_timeout(Duration::from_secs(10))
            .expect("the busy timeout is set");
        Self {
            provider,
            raw,
            _dir: dir,
        }
    }
}

/// A column of records, addressed by rowid.
#[derive(Debug, Clone, Copy)]
enum Column {
    Message,
    HistoryEvent,
    WorkItem,
}

impl Column {
    fn read(self) -> &'static str {
        match self {
            Self::Message => "SELECT body FROM messages WHERE rowid = ?1",
            Self::HistoryEvent => "SELECT event FROM history WHERE rowid = ?1",
            Self::WorkItem => "SELECT body FROM work_items WHERE rowid = ?1",
        }
    }

    fn write(self) -> &'static str {
        match self {
            Self::Message => "UPDATE messages SET body = ?1 WHERE rowid = ?2",
            Self::HistoryEvent => "UPDATE history SET event = ?1 WHERE rowid = ?2",
            Self::WorkItem => "UPDATE work_items SET body = ?1 WHERE rowid = ?2",
        }
    }
}

/// Ways a stored record gets damaged.
#[derive(Debug, Clone, Copy)]
enum Damage {
    Empty,
    Truncated,
    WrongVersion,
    TrailingByte,
    Garbage,
    /// Not a blob at all: SQLite stores whatever type it is given.
    Text,
    Integer,
}

const DAMAGES: [Damage; 7] = [
    Damage::Empty,
    Damage::Truncated,
    Damage::WrongVersion,
    Damage::TrailingByte,
    Damage::Garbage,
    Damage::Text,
    Damage::Integer,
];

impl Damage {
    /// Damages record `rowid` of `column`; returns its bytes as they were.
    fn apply(self, raw: &Connection, column: Column, rowid: i64) -> Vec<u8> {
        let original: Vec<u8> = raw
            .query_row(column.read(), [rowid], |row| row.get(0))
            .expect("the record exists");
        let mut bytes = original.clone();
        let damaged = match self {
            Self::Empty => Value::Blob(Vec::new()),
            Self::Truncated => Value::Blob(original[..original.len() / 2].to_vec()),
            Self::WrongVersion => {
                bytes[0] = RECORD_VERSION + 1;
                Value::Blob(bytes)
            }
            Self::TrailingByte => {
                bytes.push(0);
                Value::Blob(bytes)
            }
            // The right version, then a variant number no record type has.
            Self::Garbage => Value::Blob(vec![RECORD_VERSION, 0xde, 0xad, 0xbe, 0xef, 0x0f, 0xff]),
            Self::Text => Value::Text("not a record".to_owned()),
            Self::Integer => Value::Integer(42),
        };
        let changed = raw
            .execute(column.write(), (damaged, rowid))
            .expect("the damage is written");
        assert_eq!(changed, 1, "record {rowid} was damaged");
        original
    }
}

/// Writes `bytes` back into record `rowid` of `column`.
fn repair(raw: &Connection, column: Column, rowid: i64, bytes: Vec<u8>) {
    raw.execute(column.write(), (bytes, rowid))
        .expect("the repair is written");
}

/// The first column of `sql`'s rows, bound to `instance`.
fn rowids(raw: &Connection, sql: &'static str, instance: &InstanceId) -> Vec<i64> {
    let mut statement = raw.prepare(sql).expect("the query prepares");
    statement
        .query_map([instance.as_str()], |row| row.get(0))
        .expect("the rows are read")
        .collect::<Result<_, _>>()
        .expect("the rows are read")
}

fn fetched_ids(work: &[OrchestrationWork]) -> Vec<&str> {
    let mut ids: Vec<&str> = work.iter().map(|w| w.lock.instance().as_str()).collect();
    ids.sort_unstable();
    ids
}

/// Asserts that `instance` is suspended with a reason that contains `names`.
async fn assert_set_aside(p: &SqliteProvider, instance: &InstanceId, names: &str) {
    let record = p.get_instance(instance).await.expect("get");
    assert_eq!(record.status, InstanceStatus::Suspended, "{instance}");
    let reason = record.status_reason.unwrap_or_default();
    assert!(
        reason.contains("cannot be decoded") && reason.contains(names),
        "{instance}: the reason names {names:?}: {reason:?}"
    );
}

/// An instance with a damaged message is suspended, naming the message, and not
/// returned, while the healthy instances are; resumed as it is, it is set aside again
/// at the next fetch; repaired and resumed, it gets all its messages.
#[tokio::test]
async fn an_undecodable_message_suspends_its_instance_and_spares_the_others() {
    let s = Damaged::open().await;
    let p = &s.provider;
    // Everything is in place before the damage (a fetch would find it early), the
    // damaged instances first in claim order.
    let mut instances = Vec::new();
    for i in 0..DAMAGES.len() {
        instances.push(running(p, &format!("bad-{i}")).await);
    }
    let good = [running(p, "good-1").await, running(p, "good-2").await];
    for instance in &instances {
        send(p, instance, signal("s", 1)).await;
        send(p, instance, signal("s", 2)).await;
    }
    for instance in &good {
        send(p, instance, signal("s", 1)).await;
    }
    let mut bad = Vec::new();
    for (instance, damage) in instances.into_iter().zip(DAMAGES) {
        let sql = "SELECT id FROM messages WHERE instance = ?1 ORDER BY id";
        let message = rowids(&s.raw, sql, &instance)[1];
        let original = damage.apply(&s.raw, Column::Message, message);
        bad.push((instance, message, original));
    }

    let work = fetch(p, 100).await;
    assert_eq!(fetched_ids(&work), ["good-1", "good-2"]);
    for w in &work {
        assert_eq!(signal_numbers(w), [1]);
    }
    for (instance, message, _) in &bad {
        assert_set_aside(p, instance, &format!("message {message}")).await;
        let record = p.get_instance(instance).await.expect("get");
        assert_eq!(record.history_len, 1, "the history is untouched");
    }

    // Resumed while still damaged: Running again, and set aside again by the next fetch.
    for (instance, _, _) in &bad {
        p.resume(instance).await.expect("resume");
        let record = p.get_instance(instance).await.expect("get");
        assert_eq!(record.status, InstanceStatus::Running);
        assert_eq!(record.status_reason, None);
    }
    assert!(
        fetch(p, 100).await.is_empty(),
        "only damaged instances left"
    );
    for (instance, message, _) in &bad {
        assert_set_aside(p, instance, &format!("message {message}")).await;
    }

    // Repaired and resumed: every message was kept, in order.
    for (instance, message, original) in bad.iter().cloned() {
        repair(&s.raw, Column::Message, message, original);
        p.resume(&instance).await.expect("resume");
    }
    let work = fetch(p, 100).await;
    assert_eq!(work.len(), bad.len());
    for w in &work {
        assert_eq!(signal_numbers(w), [1, 2], "{}", w.lock.instance());
    }
}

/// A finished instance is not brought back to life by a damaged late message: the
/// message is dropped, as its turn would have drained it, and the status stays.
#[tokio::test]
async fn an_undecodable_message_to_a_finished_instance_is_dropped() {
    let s = Damaged::open().await;
    let p = &s.provider;
    let done = running(p, "done").await;
    poke(p, &done).await;
    end(
        p,
        &done,
        keel_provider::TurnOutcome::Completed(payload(&serde_json::json!("ok"))),
    )
    .await;
    send(p, &done, signal("late", 1)).await;
    let sql = "SELECT id FROM messages WHERE instance = ?1 ORDER BY id";
    let message = rowids(&s.raw, sql, &done)[0];
    Damage::Garbage.apply(&s.raw, Column::Message, message);

    assert!(fetch(p, 10).await.is_empty());
    let record = p.get_instance(&done).await.expect("get");
    assert_eq!(record.status, InstanceStatus::Completed);
    assert_eq!(record.status_reason, None);
    assert!(
        rowids(&s.raw, sql, &done).is_empty(),
        "the late message is gone"
    );
}

/// A new instance whose start message is damaged is set aside too; resumed, it is
/// Pending again, since no turn of it was ever acked.
#[tokio::test]
async fn an_undecodable_start_suspends_a_new_instance_and_resume_leaves_it_pending() {
    let s = Damaged::open().await;
    let p = &s.provider;
    let instance = id("new");
    p.create_instance(new_instance("new"), OnConflict::Fail)
        .await
        .expect("create");
    let sql = "SELECT id FROM messages WHERE instance = ?1";
    let start = rowids(&s.raw, sql, &instance)[0];
    Damage::Truncated.apply(&s.raw, Column::Message, start);
    assert!(fetch(p, 10).await.is_empty());
    assert_set_aside(p, &instance, &format!("message {start}")).await;
    p.resume(&instance).await.expect("resume");
    let record = p.get_instance(&instance).await.expect("get");
    assert_eq!(record.status, InstanceStatus::Pending);
}

/// A fetch of fewer instances than are damaged still returns a healthy one queued
/// behind them: set-aside instances do not use up the batch.
#[tokio::test]
async fn damaged_instances_do_not_use_up_a_small_batch() {
    let s = Damaged::open().await;
    let p = &s.provider;
    let mut bad = Vec::new();
    for i in 0..3 {
        bad.push(running(p, &format!("bad-{i}")).await);
    }
    let good = running(p, "good").await;
    for instance in bad.iter().chain([&good]) {
        send(p, instance, signal("s", 1)).await;
    }
    for instance in &bad {
        let sql = "SELECT id FROM messages WHERE instance = ?1";
        let message = rowids(&s.raw, sql, instance)[0];
        Damage::Garbage.apply(&s.raw, Column::Message, message);
    }
    let work = p
        .fetch_orchestrations(FetchOrchestrations {
            max_instances: 1,
            lock_for: Duration::from_secs(60),
            with_history: true,
        })
        .await
        .expect("fetch");
    assert_eq!(fetched_ids(&work), ["good"]);
    for instance in &bad {
        let record = p.get_instance(instance).await.expect("get");
        assert_eq!(record.status, InstanceStatus::Suspended);
    }
}

/// A damaged history event makes `read_history` fail with `Corrupt`, naming the event,
/// and sets its instance aside at a fetch that reads histories, while the healthy
/// instances are returned. A fetch without histories does not read it.
#[tokio::test]
async fn an_undecodable_history_event_suspends_its_instance_when_read() {
    let s = Damaged::open().await;
    let p = &s.provider;
    let at = provider_now(p).await;
    let mut bad = Vec::new();
    for i in 0..DAMAGES.len() {
        let name = format!("bad-{i}");
        // Two events: ExecutionStarted, then ActivityScheduled (to be damaged).
        bad.push(schedule(p, &name, vec![activity(&name, 1, "w", at)]).await);
    }
    let good = running(p, "good").await;
    for instance in bad.iter().chain([&good]) {
        send(p, instance, signal("s", 1)).await;
    }
    for (instance, damage) in bad.iter().zip(DAMAGES) {
        let sql = "SELECT rowid FROM history WHERE instance = ?1 ORDER BY seq";
        let event = rowids(&s.raw, sql, instance)[1];
        damage.apply(&s.raw, Column::HistoryEvent, event);
    }
    let history_error = "history event 1 of execution 1";

    for instance in &bad {
        for execution in [None, Some(FIRST)] {
            let err = expect_kind(
                p.read_history(instance, execution).await,
                ErrorKind::Corrupt,
                "a damaged history",
            );
            assert!(err.message().contains(history_error), "{err}");
        }
    }
    let work = fetch(p, 100).await;
    assert_eq!(fetched_ids(&work), ["good"]);
    assert_eq!(work[0].history.as_ref().map(Vec::len), Some(1));
    for instance in &bad {
        assert_set_aside(p, instance, history_error).await;
        let record = p.get_instance(instance).await.expect("get");
        assert_eq!(record.history_len, 2);
    }
    assert_eq!(p.read_history(&good, None).await.expect("read").len(), 1);

    // Resumed, it is returned to a fetch that does not read histories (a worker with
    // the history cached needs none of it), and set aside by one that does.
    for instance in &bad {
        p.resume(instance).await.expect("resume");
    }
    let without = p
        .fetch_orchestrations(FetchOrchestrations {
            max_instances: 100,
            lock_for: Duration::from_secs(60),
            with_history: false,
        })
        .await
        .expect("fetch");
    assert_eq!(without.len(), bad.len());
    for w in &without {
        assert_eq!(w.history, None);
        assert_eq!(w.history_len, 2);
        assert_eq!(signal_numbers(w), [1]);
        p.abandon_lock(&w.lock, Duration::ZERO)
            .await
            .expect("abandon");
    }
    assert!(
        fetch(p, 100).await.is_empty(),
        "only damaged histories left"
    );
    for instance in &bad {
        assert_set_aside(p, instance, history_error).await;
    }
}

/// A damaged work item is not returned but becomes a dead letter without an item and
/// with a `keel.decode` failure that cannot be replayed, while the healthy items of
/// the same fetch are leased; a fetch of fewer items than are damaged still leases a
/// healthy one behind them.
#[tokio::test]
async fn an_undecodable_work_item_becomes_a_dead_letter_and_spares_the_others() {
    let s = Damaged::open().await;
    let p = &s.provider;
    let at = provider_now(p).await;
    let damaged = DAMAGES.len() as u64;
    let items = (1..=damaged + 2)
        .map(|op| activity("a", op, "w", at))
        .collect();
    let a = schedule(p, "a", items).await;
    let b = schedule(p, "b", vec![activity("b", 1, "w", at)]).await;
    let sql = "SELECT id FROM work_items WHERE instance = ?1 ORDER BY op";
    let ids = rowids(&s.raw, sql, &a);
    for (damage, &item) in DAMAGES.into_iter().zip(&ids) {
        damage.apply(&s.raw, Column::WorkItem, item);
    }

    let one = p
        .fetch_activities(FetchActivities {
            queues: vec![QueueName::default()],
            max_items: 1,
            lease_for: Duration::from_secs(60),
        })
        .await
        .expect("fetch");
    assert_eq!(one.len(), 1, "a healthy item behind the damaged ones");
    let mut leased = lease(p, 100).await;
    leased.extend(one);
    let mut got: Vec<(String, u64)> = leased
        .iter()
        .map(|l| (l.item.instance.as_str().to_owned(), l.item.op.get()))
        .collect();
    got.sort_unstable();
    let a_name = a.as_str().to_owned();
    let b_name = b.as_str().to_owned();
    assert_eq!(
        got,
        [
            (a_name.clone(), damaged + 1),
            (a_name.clone(), damaged + 2),
            (b_name, 1)
        ]
    );

    let letters = p
        .list_dead_letters(PageRequest::first(100))
        .await
        .expect("list")
        .items;
    let mut ops: Vec<u64> = letters.iter().map(|d| d.op.get()).collect();
    ops.sort_unstable();
    assert_eq!(ops, (1..=damaged).collect::<Vec<_>>());
    for letter in &letters {
        assert_eq!(letter.instance, a);
        assert_eq!(letter.name, "w");
        assert_eq!(letter.attempts, 1);
        assert_eq!(letter.item, None, "a damaged item is not kept");
        assert_eq!(letter.failure.kind, Failure::DECODE);
        assert!(!letter.failure.retryable);
        assert!(
            letter.failure.message.contains("work item"),
            "{:?}",
            letter.failure
        );
        expect_kind(
            p.replay_dead_letter(letter.id).await,
            ErrorKind::InvalidInput,
            "replaying a damaged item",
        );
    }
    assert!(lease(p, 100).await.is_empty(), "the damaged items are gone");
    let depths = p.queue_depths().await.expect("depths");
    assert_eq!(depths.dead_letters, damaged);
    assert_eq!(depths.activities_running, 3);
    for l in &leased {
        complete(p, &l.lease, Ok(payload(&serde_json::json!(1))))
            .await
            .expect("a healthy item completes");
    }
}
