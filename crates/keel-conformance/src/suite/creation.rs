//! Creating instances: idempotency on the id, delayed starts, options.

use keel_core::{InstanceStatus, Message};
use keel_provider::{Created, OnConflict};

use crate::TestStore;
use crate::fixtures::{fetch, fetch_one, new_instance};

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_creation {
    ($factory:expr) => {
        $crate::__stamp!(
            $factory,
            creation,
            [
                a_new_instance_is_pending_with_its_start_queued,
                creating_an_existing_id_returns_it_unchanged,
            ]
        );
    };
}

/// A created instance is Pending and its start message is fetchable.
pub async fn a_new_instance_is_pending_with_its_start_queued(store: TestStore) {
    let p = &*store.provider;
    assert_eq!(
        p.create_instance(new_instance("a"), OnConflict::Fail)
            .await
            .unwrap(),
        Created::New
    );
    let record = p.get_instance(&new_instance("a").id).await.unwrap();
    assert_eq!(record.status, InstanceStatus::Pending);
    let work = fetch_one(p).await;
    assert_eq!(work.messages.len(), 1);
    assert!(matches!(work.messages[0].message, Message::Start { .. }));
}

/// Creating an existing id changes nothing: `ReturnExisting` reports the instance,
/// `Fail` is `AlreadyExists`.
pub async fn creating_an_existing_id_returns_it_unchanged(store: TestStore) {
    let p = &*store.provider;
    p.create_instance(new_instance("a"), OnConflict::Fail)
        .await
        .unwrap();
    let mut again = new_instance("a");
    again.name = "other".into();
    match p
        .create_instance(again.clone(), OnConflict::ReturnExisting)
        .await
        .unwrap()
    {
        Created::Existing(record) => assert_eq!(record.name, "test"),
        Created::New => panic!("an existing id was created again"),
    }
    let err = p
        .create_instance(again, OnConflict::Fail)
        .await
        .unwrap_err();
    assert!(err.is_conflict(), "{err}");
    // Still exactly one start message.
    assert_eq!(fetch(p, 10).await[0].messages.len(), 1);
}
