//! Listing instances: filters by status, name, creation time and tag, alone and
//! combined, and pages that visit each instance once, in creation order.

use std::collections::BTreeMap;
use std::time::Duration;

use keel_core::{Failure, InstanceStatus, Timestamp};
use keel_provider::{InstanceQuery, PageRequest, Provider, TurnOutcome};

use crate::TestStore;
use crate::fixtures::{create, end, ended, new_instance, running};

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_listing {
    ($factory:expr) => {
        $crate::__stamp!(
            $factory,
            listing,
            [
                list_instances_filters_by_status,
                list_instances_filters_by_name,
                list_instances_filters_by_creation_time,
                list_instances_filters_by_tag,
                list_instances_filters_combine,
                a_listing_page_holds_at_most_max_page,
                list_instances_pages_visit_each_instance_once_in_creation_order,
            ]
        );
    };
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
            "SKIPPED listing::a_listing_page_holds_at_most_max_page: max_page is {cap}, \
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
