//! Management: reading instances and histories, listing, queue depths, purging and
//! deleting.

use std::collections::BTreeMap;
use std::time::Duration;

use keel_core::{
    Event, EventKind, ExecutionId, Failure, InstanceId, InstanceStatus, Message, OpId, ParentLink,
    Payload, SideEffect, Timestamp,
};
use keel_provider::{
    CustomStatusUpdate, ErrorKind, InstanceQuery, NewInstance, OnConflict, OutgoingMessage,
    PageRequest, Provider, PurgeFilter, QueueDepths, TurnOutcome,
};

use crate::TestStore;
use crate::fixtures::{
    FIRST, ack_all, activity, expect_kind, fetch_instance, id, lease, lease_queues, new_instance,
    payload, provider_now, queue, run_turn, running, schedule, signal,
};

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_management {
    ($factory:expr) => {
        $crate::__stamp!(
            $factory,
            management,
            [
                get_instance_reports_a_new_instance,
                get_instance_reports_a_turns_results,
                a_failed_instance_reports_its_failure,
                getting_an_unknown_instance_is_not_found,
                custom_status_is_set_kept_and_cleared,
                read_history_returns_the_current_executions_events_in_order,
                read_history_reads_earlier_executions_after_continue_as_new,
                reading_the_history_of_an_unknown_instance_or_execution_is_not_found,
                list_instances_filters_by_status,
                list_instances_filters_by_name,
                list_instances_filters_by_creation_time,
                list_instances_filters_by_tag,
                list_instances_filters_combine,
                a_listing_page_holds_at_most_max_page,
                list_instances_pages_visit_each_instance_once_in_creation_order,
                queue_depths_count_each_kind_of_queued_work,
                purge_removes_only_instances_that_ended_before_the_cutoff,
                purge_deletes_history_messages_and_work_items,
                purge_with_statuses_removes_only_those,
                delete_instance_removes_it_and_its_descendants,
                deleting_a_child_leaves_its_parent,
                delete_instance_removes_its_messages_and_work_items,
                deleting_an_unknown_instance_is_not_found,
            ]
        );
    };
}

fn json(value: serde_json::Value) -> Payload {
    payload(&value)
}

fn marker(at: Timestamp, op: u64) -> Event {
    Event {
        at,
        kind: EventKind::SideEffectRecorded {
            op: OpId::from_raw(op),
            value: SideEffect::Random(op),
        },
    }
}

async fn poke(p: &dyn Provider, instance: &InstanceId) {
    p.send_message(instance, signal("poke", 0), None)
        .await
        .expect("send");
}

/// Runs a turn of `instance` (which must have visible messages) ending it with `outcome`.
async fn end(p: &dyn Provider, instance: &InstanceId, outcome: TurnOutcome) {
    run_turn(p, instance, |work| {
        let mut ack = ack_all(work);
        ack.outcome = outcome;
        ack
    })
    .await
    .expect("the final turn acks");
}

async fn create(p: &dyn Provider, instance: NewInstance) -> InstanceId {
    let id = instance.id.clone();
    p.create_instance(instance, OnConflict::Fail)
        .await
        .expect("create");
    id
}

/// Every instance matching `query`, following the cursor, as ids.
async fn list_all(p: &dyn Provider, query: InstanceQuery) -> Vec<String> {
    let mut ids = Vec::new();
    let mut page = PageRequest::first(100);
    loop {
        let listed = p
            .list_instances(query.clone(), page.clone())
            .await
            .expect("list_instances");
        ids.extend(listed.items.iter().map(|r| r.id.to_string()));
        match listed.next {
            Some(cursor) => page.cursor = Some(cursor),
            None => return ids,
        }
    }
}

async fn exists(p: &dyn Provider, instance: &str) -> bool {
    match p.get_instance(&id(instance)).await {
        Ok(_) => true,
        Err(err) if err.is_not_found() => false,
        Err(err) => panic!("get_instance {instance}: {err}"),
    }
}

fn ended(instance: &str) -> TurnOutcome {
    TurnOutcome::Completed(json(serde_json::json!({ "done": instance })))
}

/// A new instance reports what it was created with: Pending, no history, no output.
pub async fn get_instance_reports_a_new_instance(store: TestStore) {
    let p = &*store.provider;
    let mut new = new_instance("a");
    new.queue = queue("orders");
    new.priority = 4;
    new.tags = BTreeMap::from([("team".to_owned(), "billing".to_owned())]);
    let before = provider_now(p).await;
    create(p, new.clone()).await;
    let after = provider_now(p).await;
    let record = p.get_instance(&new.id).await.expect("get");
    assert_eq!(record.id, new.id);
    assert_eq!(record.name, "test");
    assert_eq!(record.status, InstanceStatus::Pending);
    assert_eq!(record.execution, FIRST);
    assert_eq!(record.input, new.input);
    assert_eq!(record.queue, new.queue);
    assert_eq!(record.priority, 4);
    assert_eq!(record.tags, new.tags);
    assert_eq!(record.parent, None);
    assert_eq!(record.history_len, 0);
    assert_eq!(record.output, None);
    assert_eq!(record.failure, None);
    assert_eq!(record.completed_at, None);
    assert!(record.created_at >= before && record.created_at <= after);
}

/// After a turn, `get_instance` reports its status, version, output, custom status,
/// history length and when it changed and ended.
pub async fn get_instance_reports_a_turns_results(store: TestStore) {
    let p = &*store.provider;
    let a = create(p, new_instance("a")).await;
    let created_at = p.get_instance(&a).await.expect("get").created_at;
    store.advance(Duration::from_millis(20)).await;
    let before = provider_now(p).await;
    let custom = json(serde_json::json!({"stage": "shipping"}));
    let out = json(serde_json::json!({"total": 42}));
    run_turn(p, &a, |work| {
        let mut ack = ack_all(work);
        ack.version = Some(3);
        ack.events = vec![marker(before, 1), marker(before, 2)];
        ack.custom_status = CustomStatusUpdate::Set(custom.clone());
        ack.outcome = TurnOutcome::Completed(out.clone());
        ack
    })
    .await
    .expect("ack");
    let after = provider_now(p).await;
    let record = p.get_instance(&a).await.expect("get");
    assert_eq!(record.status, InstanceStatus::Completed);
    assert_eq!(record.version, Some(3));
    assert_eq!(record.output, Some(out));
    assert_eq!(record.failure, None);
    assert_eq!(record.custom_status, Some(custom));
    assert_eq!(record.history_len, 2);
    assert_eq!(record.created_at, created_at, "creation time is kept");
    assert!(
        record.updated_at >= before && record.updated_at <= after,
        "updated_at {:?} is the turn's time ({before:?}..{after:?})",
        record.updated_at
    );
    let completed_at = record.completed_at.expect("completed_at is set");
    assert!(completed_at >= before && completed_at <= after);
}

/// A failed instance reports its failure and no output.
pub async fn a_failed_instance_reports_its_failure(store: TestStore) {
    let p = &*store.provider;
    let a = create(p, new_instance("a")).await;
    let failure = Failure::new("Boom", "it broke").with_cause("underneath");
    end(p, &a, TurnOutcome::Failed(failure.clone())).await;
    let record = p.get_instance(&a).await.expect("get");
    assert_eq!(record.status, InstanceStatus::Failed);
    assert_eq!(record.failure, Some(failure));
    assert_eq!(record.output, None);
    assert!(record.completed_at.is_some());
}

/// `get_instance` of an unknown id is `NotFound`.
pub async fn getting_an_unknown_instance_is_not_found(store: TestStore) {
    expect_kind(
        store.provider.get_instance(&id("ghost")).await,
        ErrorKind::NotFound,
        "an unknown instance",
    );
}

/// A turn sets, keeps or clears the custom status.
pub async fn custom_status_is_set_kept_and_cleared(store: TestStore) {
    let p = &*store.provider;
    let a = running(p, "a").await;
    let custom = json(serde_json::json!("step 1"));
    let updates = [
        (
            CustomStatusUpdate::Set(custom.clone()),
            Some(custom.clone()),
        ),
        (CustomStatusUpdate::Unchanged, Some(custom)),
        (CustomStatusUpdate::Cleared, None),
    ];
    for (update, expected) in updates {
        poke(p, &a).await;
        run_turn(p, &a, |work| {
            let mut ack = ack_all(work);
            ack.custom_status = update;
            ack
        })
        .await
        .expect("ack");
        let record = p.get_instance(&a).await.expect("get");
        assert_eq!(record.custom_status, expected);
    }
}

/// `read_history` returns the current execution's events, in order, across turns.
pub async fn read_history_returns_the_current_executions_events_in_order(store: TestStore) {
    let p = &*store.provider;
    let a = running(p, "a").await;
    let mut expected = p.read_history(&a, None).await.expect("history");
    for ops in [[1, 2], [3, 4]] {
        let at = provider_now(p).await;
        let events: Vec<Event> = ops.iter().map(|&op| marker(at, op)).collect();
        expected.extend(events.iter().cloned());
        poke(p, &a).await;
        run_turn(p, &a, |work| {
            let mut ack = ack_all(work);
            ack.events = events;
            ack
        })
        .await
        .expect("ack");
    }
    assert_eq!(p.read_history(&a, None).await.expect("history"), expected);
    assert_eq!(
        p.read_history(&a, Some(FIRST)).await.expect("history"),
        expected
    );
    let record = p.get_instance(&a).await.expect("get");
    assert_eq!(record.history_len, expected.len() as u64);
}

/// After continue-as-new the current execution has a fresh history and its start (then
/// the carried messages) is queued; the earlier execution's history stays readable.
pub async fn read_history_reads_earlier_executions_after_continue_as_new(store: TestStore) {
    let p = &*store.provider;
    let a = create(p, new_instance("a")).await;
    let at = provider_now(p).await;
    let input2 = json(serde_json::json!({"n": 2}));
    let first_events = vec![
        marker(at, 1),
        Event {
            at,
            kind: EventKind::ContinuedAsNew {
                input: input2.clone(),
            },
        },
    ];
    run_turn(p, &a, |work| {
        let mut ack = ack_all(work);
        ack.version = Some(1);
        ack.events = first_events.clone();
        ack.outcome = TurnOutcome::ContinuedAsNew {
            input: input2.clone(),
            version: Some(1),
            carried: vec![signal("carried", 9)],
        };
        ack
    })
    .await
    .expect("ack");
    let second = ExecutionId::FIRST.next();
    let record = p.get_instance(&a).await.expect("get");
    assert_eq!(record.execution, second);
    assert_eq!(record.history_len, 0);
    assert_eq!(record.input, input2);
    assert!(!record.status.is_terminal(), "{:?}", record.status);
    assert_eq!(p.read_history(&a, None).await.expect("history"), []);
    assert_eq!(
        p.read_history(&a, Some(FIRST)).await.expect("history"),
        first_events
    );

    let work = fetch_instance(p, &a)
        .await
        .expect("the next execution starts");
    let messages: Vec<&Message> = work.messages.iter().map(|m| &m.message).collect();
    assert_eq!(messages.len(), 2, "{messages:?}");
    let Message::Start {
        execution, input, ..
    } = messages[0]
    else {
        panic!("expected the next execution's start, got {:?}", messages[0]);
    };
    assert_eq!((*execution, input), (second, &input2));
    assert_eq!(messages[1], &signal("carried", 9));
    let second_events = vec![marker(at, 1)];
    let mut ack = ack_all(&work);
    ack.events = second_events.clone();
    p.ack_turns(vec![ack]).await.expect("ack")[0]
        .as_ref()
        .expect("ack");
    assert_eq!(p.read_history(&a, None).await.expect("h"), second_events);
    assert_eq!(
        p.read_history(&a, Some(second)).await.expect("h"),
        second_events
    );
    assert_eq!(
        p.read_history(&a, Some(FIRST)).await.expect("h"),
        first_events
    );
}

/// `read_history` of an unknown instance or execution is `NotFound`.
pub async fn reading_the_history_of_an_unknown_instance_or_execution_is_not_found(
    store: TestStore,
) {
    let p = &*store.provider;
    let a = running(p, "a").await;
    expect_kind(
        p.read_history(&id("ghost"), None).await,
        ErrorKind::NotFound,
        "an unknown instance",
    );
    expect_kind(
        p.read_history(&a, Some(ExecutionId::from_raw(7))).await,
        ErrorKind::NotFound,
        "an unknown execution",
    );
}

/// Listing by status returns exactly the instances in any of the statuses, oldest
/// first; no status matches all.
pub async fn list_instances_filters_by_status(store: TestStore) {
    let p = &*store.provider;
    create(p, new_instance("p")).await;
    store.advance(Duration::from_millis(10)).await;
    running(p, "r").await;
    store.advance(Duration::from_millis(10)).await;
    let c = create(p, new_instance("c")).await;
    end(p, &c, ended("c")).await;
    store.advance(Duration::from_millis(10)).await;
    let f = create(p, new_instance("f")).await;
    end(p, &f, TurnOutcome::Failed(Failure::new("Boom", "failed"))).await;

    let by = |statuses: Vec<InstanceStatus>| InstanceQuery {
        statuses,
        ..InstanceQuery::default()
    };
    use InstanceStatus::{Completed, Failed, Pending, Running};
    assert_eq!(list_all(p, by(vec![Completed, Failed])).await, ["c", "f"]);
    assert_eq!(list_all(p, by(vec![Pending])).await, ["p"]);
    assert_eq!(list_all(p, by(vec![Running])).await, ["r"]);
    assert_eq!(list_all(p, by(vec![])).await, ["p", "r", "c", "f"]);
}

/// Listing by name returns only instances of that orchestration.
pub async fn list_instances_filters_by_name(store: TestStore) {
    let p = &*store.provider;
    for (instance, name) in [("a", "billing"), ("b", "search"), ("c", "billing")] {
        let mut new = new_instance(instance);
        new.name = name.to_owned();
        create(p, new).await;
        store.advance(Duration::from_millis(10)).await;
    }
    let query = InstanceQuery {
        name: Some("billing".to_owned()),
        ..InstanceQuery::default()
    };
    assert_eq!(list_all(p, query).await, ["a", "c"]);
}

/// Listing by creation time: `created_from` is inclusive, `created_until` exclusive.
pub async fn list_instances_filters_by_creation_time(store: TestStore) {
    let p = &*store.provider;
    let mut created = Vec::new();
    for instance in ["a", "b", "c"] {
        let id = create(p, new_instance(instance)).await;
        created.push(p.get_instance(&id).await.expect("get").created_at);
        store.advance(Duration::from_millis(50)).await;
    }
    let query = |from: Option<Timestamp>, until: Option<Timestamp>| InstanceQuery {
        created_from: from,
        created_until: until,
        ..InstanceQuery::default()
    };
    assert_eq!(list_all(p, query(Some(created[1]), None)).await, ["b", "c"]);
    assert_eq!(list_all(p, query(None, Some(created[2]))).await, ["a", "b"]);
    assert_eq!(
        list_all(p, query(Some(created[1]), Some(created[2]))).await,
        ["b"]
    );
}

/// Listing by tag returns the instances carrying that tag with that value.
pub async fn list_instances_filters_by_tag(store: TestStore) {
    let p = &*store.provider;
    let tagged: [(&str, &[(&str, &str)]); 4] = [
        ("a", &[("team", "billing")]),
        ("b", &[("team", "search")]),
        ("c", &[]),
        ("d", &[("env", "prod"), ("team", "billing")]),
    ];
    for (instance, tags) in tagged {
        let mut new = new_instance(instance);
        new.tags = tags
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        create(p, new).await;
        store.advance(Duration::from_millis(10)).await;
    }
    let tag = |k: &str, v: &str| InstanceQuery {
        tag: Some((k.to_owned(), v.to_owned())),
        ..InstanceQuery::default()
    };
    assert_eq!(list_all(p, tag("team", "billing")).await, ["a", "d"]);
    assert_eq!(list_all(p, tag("env", "prod")).await, ["d"]);
    assert!(list_all(p, tag("team", "none")).await.is_empty());
    assert!(list_all(p, tag("billing", "team")).await.is_empty());
}

/// Filters combine: an instance is listed only when it matches every one that is set.
pub async fn list_instances_filters_combine(store: TestStore) {
    let p = &*store.provider;
    let specs = [
        ("a", "billing", "eu", true),
        ("b", "billing", "us", true),
        ("c", "search", "eu", true),
        ("d", "billing", "eu", false),
    ];
    for (instance, name, region, finish) in specs {
        let mut new = new_instance(instance);
        new.name = name.to_owned();
        new.tags = BTreeMap::from([("region".to_owned(), region.to_owned())]);
        let id = create(p, new).await;
        if finish {
            end(p, &id, ended(instance)).await;
        }
        store.advance(Duration::from_millis(10)).await;
    }
    let query = InstanceQuery {
        statuses: vec![InstanceStatus::Completed],
        name: Some("billing".to_owned()),
        tag: Some(("region".to_owned(), "eu".to_owned())),
        ..InstanceQuery::default()
    };
    assert_eq!(list_all(p, query).await, ["a"]);
}

/// A page asking for more than the provider's `max_page` holds at most `max_page`
/// items, and the cursor leads to the rest.
pub async fn a_listing_page_holds_at_most_max_page(store: TestStore) {
    // Creating instances past the cap costs time in proportion to it.
    const AFFORDABLE: usize = 2_000;
    let cap = store.capabilities().max_page;
    if cap >= AFFORDABLE {
        eprintln!(
            "SKIPPED management::a_listing_page_holds_at_most_max_page: max_page is {cap}, \
             above the {AFFORDABLE} this test can afford to fill"
        );
        return;
    }
    let p = &*store.provider;
    for n in 0..=cap {
        create(p, new_instance(&format!("i{n:05}"))).await;
    }
    let first = p
        .list_instances(InstanceQuery::default(), PageRequest::first(cap * 10))
        .await
        .expect("list");
    assert!(first.items.len() <= cap, "a page of {}", first.items.len());
    assert_eq!(list_all(p, InstanceQuery::default()).await.len(), cap + 1);
}

/// Following the cursor visits every instance exactly once, in creation order, even
/// with pages of one and instances created during the listing (those appear at the end
/// or not at all).
pub async fn list_instances_pages_visit_each_instance_once_in_creation_order(store: TestStore) {
    let p = &*store.provider;
    let originals: Vec<String> = (0..7).map(|i| format!("i{i}")).collect();
    for instance in &originals {
        create(p, new_instance(instance)).await;
        store.advance(Duration::from_millis(10)).await;
    }
    for (limit, late) in [(1, "late-1"), (3, "late-3")] {
        let mut seen = Vec::new();
        let mut page = PageRequest::first(limit);
        for n in 1.. {
            let listed = p
                .list_instances(InstanceQuery::default(), page.clone())
                .await
                .expect("list");
            assert!(
                listed.items.len() <= limit,
                "a page holds at most its limit"
            );
            seen.extend(listed.items.iter().map(|r| r.id.to_string()));
            if n == 3 {
                create(p, new_instance(late)).await;
            }
            match listed.next {
                Some(cursor) => page.cursor = Some(cursor),
                None => break,
            }
            assert!(n < 100, "the listing does not end");
        }
        let mut distinct = seen.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), seen.len(), "no instance twice: {seen:?}");
        let (old, new): (Vec<&String>, Vec<&String>) =
            seen.iter().partition(|s| s.starts_with('i'));
        assert_eq!(old, originals.iter().collect::<Vec<_>>(), "{seen:?}");
        assert!(
            seen[..old.len()].iter().all(|s| s.starts_with('i')),
            "instances created during the listing come last: {seen:?}"
        );
        assert!(new.iter().all(|s| s.starts_with("late")), "{seen:?}");
    }
}

/// `queue_depths` counts ready and delayed messages, ready activities per queue,
/// delayed (retrying) and running (leased) activities.
pub async fn queue_depths_count_each_kind_of_queued_work(store: TestStore) {
    let p = &*store.provider;
    let at = provider_now(p).await;
    let items = [(1, "q1"), (2, "q1"), (3, "q2"), (4, "q2"), (5, "q2")]
        .into_iter()
        .map(|(op, q)| {
            let mut item = activity("x", op, "work", at);
            item.options.queue = queue(q);
            item
        })
        .collect();
    let x = schedule(p, "x", items).await;
    let hour = Duration::from_secs(3_600);
    let running_item = lease_queues(p, &["q2"], 1, hour).await;
    assert_eq!(running_item.len(), 1);
    let retried = lease_queues(p, &["q2"], 1, hour).await.remove(0);
    p.retry_activity(keel_provider::ActivityRetry {
        lease: retried.lease,
        next_attempt: 2,
        delay: hour,
        failure: Failure::new("Flaky", "again"),
    })
    .await
    .expect("retry");
    create(p, new_instance("y")).await;
    let mut z = new_instance("z");
    let later = provider_now(p).await.saturating_add(hour);
    z.start_at = Some(later);
    create(p, z).await;
    p.send_message(&x, signal("later", 1), Some(later))
        .await
        .expect("send");

    let mut depths = p.queue_depths().await.expect("queue depths");
    depths.activities_ready.retain(|_, n| *n > 0);
    let expected = QueueDepths {
        messages_ready: 1,
        messages_delayed: 2,
        activities_ready: BTreeMap::from([("q1".to_owned(), 2), ("q2".to_owned(), 1)]),
        activities_delayed: 1,
        activities_running: 1,
        dead_letters: 0,
    };
    assert_eq!(depths, expected);
}

/// Sets up, in order: "c1" completed and "f1" failed (before the cutoff), "r1" running,
/// "p1" pending, then after the cutoff "c2" completed. Returns the cutoff.
async fn mixed_ages(store: &TestStore) -> Timestamp {
    let p = &*store.provider;
    let c1 = create(p, new_instance("c1")).await;
    end(p, &c1, ended("c1")).await;
    let f1 = create(p, new_instance("f1")).await;
    end(p, &f1, TurnOutcome::Failed(Failure::new("Boom", "failed"))).await;
    running(p, "r1").await;
    create(p, new_instance("p1")).await;
    store.advance(Duration::from_millis(50)).await;
    let cutoff = provider_now(p).await;
    store.advance(Duration::from_millis(50)).await;
    let c2 = create(p, new_instance("c2")).await;
    end(p, &c2, ended("c2")).await;
    cutoff
}

/// Purge deletes only instances that ended before the cutoff, and returns how many.
pub async fn purge_removes_only_instances_that_ended_before_the_cutoff(store: TestStore) {
    let cutoff = mixed_ages(&store).await;
    let p = &*store.provider;
    let filter = PurgeFilter {
        completed_before: cutoff,
        statuses: Vec::new(),
    };
    assert_eq!(p.purge(filter.clone()).await.expect("purge"), 2);
    for (instance, kept) in [
        ("c1", false),
        ("f1", false),
        ("r1", true),
        ("p1", true),
        ("c2", true),
    ] {
        assert_eq!(exists(p, instance).await, kept, "{instance}");
    }
    assert_eq!(p.purge(filter).await.expect("purge"), 0, "nothing left");
}

/// Purge with statuses deletes only ended instances of those statuses.
pub async fn purge_with_statuses_removes_only_those(store: TestStore) {
    let cutoff = mixed_ages(&store).await;
    let p = &*store.provider;
    let filter = PurgeFilter {
        completed_before: cutoff,
        statuses: vec![InstanceStatus::Failed],
    };
    assert_eq!(p.purge(filter).await.expect("purge"), 1);
    assert!(!exists(p, "f1").await);
    assert!(exists(p, "c1").await);
}

/// Zero everywhere, dead letters included.
fn assert_nothing_queued(depths: &QueueDepths) {
    let mut depths = depths.clone();
    depths.activities_ready.retain(|_, n| *n > 0);
    assert_eq!(depths, QueueDepths::default(), "nothing is left queued");
}

/// Schedules an item and a delayed timer message for `instance`, then ends it.
async fn ended_with_leftovers(p: &dyn Provider, instance: &str) -> InstanceId {
    let at = provider_now(p).await;
    let a = schedule(p, instance, vec![activity(instance, 1, "work", at)]).await;
    poke(p, &a).await;
    run_turn(p, &a, |work| {
        let mut ack = ack_all(work);
        ack.messages = vec![OutgoingMessage {
            to: a.clone(),
            message: Message::TimerFired {
                execution: FIRST,
                op: OpId::from_raw(2),
            },
            visible_at: Some(at.saturating_add(Duration::from_secs(3_600))),
        }];
        ack.outcome = ended(instance);
        ack
    })
    .await
    .expect("ack");
    a
}

/// Purging an instance deletes its history, messages and work items too.
pub async fn purge_deletes_history_messages_and_work_items(store: TestStore) {
    let p = &*store.provider;
    let a = ended_with_leftovers(p, "a").await;
    store.advance(Duration::from_millis(10)).await;
    let filter = PurgeFilter {
        completed_before: provider_now(p)
            .await
            .saturating_add(Duration::from_millis(1)),
        statuses: Vec::new(),
    };
    assert_eq!(p.purge(filter).await.expect("purge"), 1);
    expect_kind(
        p.read_history(&a, None).await,
        ErrorKind::NotFound,
        "a purged history",
    );
    assert!(lease(p, 10).await.is_empty(), "its work item is gone");
    assert_nothing_queued(&p.queue_depths().await.expect("depths"));
}

/// Creates "p" with children "c1" and "c2", and "c1" with child "g"; all running.
async fn family(p: &dyn Provider) {
    let parent = running(p, "p").await;
    let child = |name: &str, of: &InstanceId, op: u64| {
        let mut new = new_instance(name);
        new.parent = Some(ParentLink {
            instance: of.clone(),
            execution: FIRST,
            op: OpId::from_raw(op),
        });
        new
    };
    poke(p, &parent).await;
    let children = vec![child("c1", &parent, 1), child("c2", &parent, 2)];
    run_turn(p, &parent, |work| {
        let mut ack = ack_all(work);
        ack.children = children;
        ack
    })
    .await
    .expect("the parent's turn acks");
    let c1 = id("c1");
    let grandchild = vec![child("g", &c1, 1)];
    run_turn(p, &c1, |work| {
        let mut ack = ack_all(work);
        ack.children = grandchild;
        ack
    })
    .await
    .expect("the child's turn acks");
}

/// Deleting an instance deletes its children and their children, whatever their
/// status, and returns how many it deleted.
pub async fn delete_instance_removes_it_and_its_descendants(store: TestStore) {
    let p = &*store.provider;
    family(p).await;
    running(p, "u").await;
    assert_eq!(p.delete_instance(&id("p")).await.expect("delete"), 4);
    for gone in ["p", "c1", "c2", "g"] {
        assert!(!exists(p, gone).await, "{gone} was deleted");
        expect_kind(
            p.read_history(&id(gone), None).await,
            ErrorKind::NotFound,
            gone,
        );
    }
    assert!(exists(p, "u").await, "an unrelated instance stays");
    assert_nothing_queued(&p.queue_depths().await.expect("depths"));
}

/// Deleting a child deletes it and its own children, not its parent or siblings.
pub async fn deleting_a_child_leaves_its_parent(store: TestStore) {
    let p = &*store.provider;
    family(p).await;
    assert_eq!(p.delete_instance(&id("c1")).await.expect("delete"), 2);
    for (instance, kept) in [("p", true), ("c1", false), ("c2", true), ("g", false)] {
        assert_eq!(exists(p, instance).await, kept, "{instance}");
    }
}

/// Deleting an instance deletes its messages and work items.
pub async fn delete_instance_removes_its_messages_and_work_items(store: TestStore) {
    let p = &*store.provider;
    let at = provider_now(p).await;
    let a = schedule(
        p,
        "a",
        vec![activity("a", 1, "w", at), activity("a", 2, "w", at)],
    )
    .await;
    lease(p, 1).await;
    poke(p, &a).await;
    p.send_message(
        &a,
        signal("later", 1),
        Some(at.saturating_add(Duration::from_secs(60))),
    )
    .await
    .expect("send");
    assert_eq!(p.delete_instance(&a).await.expect("delete"), 1);
    assert!(lease(p, 10).await.is_empty(), "its work items are gone");
    assert!(
        fetch_instance(p, &a).await.is_none(),
        "its messages are gone"
    );
    assert_nothing_queued(&p.queue_depths().await.expect("depths"));
}

/// Deleting an unknown instance is `NotFound`.
pub async fn deleting_an_unknown_instance_is_not_found(store: TestStore) {
    expect_kind(
        store.provider.delete_instance(&id("ghost")).await,
        ErrorKind::NotFound,
        "an unknown instance",
    );
}
