//! Connecting: clear errors for what is wrong, migrations that run once however many
//! processes start at once, closing, and schemas that keep deployments apart.

use std::time::Duration;

use keel_conformance::fixtures::{id, new_instance};
use keel_postgres::{PostgresOptions, PostgresProvider};
use keel_provider::{ErrorKind, OnConflict, Provider};

use crate::{DropSchema, fresh_schema, options, url};

#[tokio::test]
async fn a_malformed_url_is_invalid_input_naming_the_connection_string() {
    let err = PostgresProvider::connect("postgres://[::1", PostgresOptions::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(!err.is_retryable());
    assert!(err.message().contains("connection string"), "{err}");
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable_naming_where() {
    // Nothing listens on port 1.
    let options = PostgresOptions::new()
        .schema(fresh_schema())
        .connect_timeout(Duration::from_secs(2));
    let err = PostgresProvider::connect("postgres://postgres@127.0.0.1:1/test", options)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.is_retryable());
    assert!(err.message().contains("127.0.0.1:1/test"), "{err}");
}

#[tokio::test]
async fn a_missing_database_is_invalid_input_saying_so() {
    let mut bad = url();
    let slash = bad.rfind('/').expect("the URL names a database");
    bad.truncate(slash);
    bad.push_str("/keel_no_such_database");
    let err = PostgresProvider::connect(&bad, options(&fresh_schema()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert!(err.message().contains("keel_no_such_database"), "{err}");
    assert!(err.message().contains("does not exist"), "{err}");
}

#[tokio::test]
async fn a_bad_schema_name_is_refused_before_connecting() {
    let err = PostgresProvider::connect(&url(), options("keel\"; DROP SCHEMA public; --"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(err.message().contains("schema name"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_connects_at_once_migrate_a_new_schema_once() {
    let schema = fresh_schema();
    let _drop = DropSchema(schema.clone());
    let connects: Vec<_> = (0..6)
        .map(|_| {
            let options = PostgresOptions::new().schema(&schema).pool_size(1);
            tokio::spawn(async move { PostgresProvider::connect(&url(), options).await })
        })
        .collect();
    let mut providers = Vec::new();
    for connect in connects {
        providers.push(connect.await.unwrap().expect("every connect succeeds"));
    }
    let (client, connection) = tokio_postgres::connect(&url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let row = client
        .query_one(
            &format!("SELECT count(*), max(version) FROM \"{schema}\".keel_schema_version"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, i64>(0),
        i64::from(PostgresProvider::schema_version()),
        "one row per migration"
    );
    assert_eq!(row.get::<_, i32>(1), PostgresProvider::schema_version());
    // They all work on the one schema.
    providers[0]
        .create_instance(new_instance("a"), OnConflict::Fail)
        .await
        .unwrap();
    assert!(providers[5].get_instance(&id("a")).await.is_ok());
    for p in &providers {
        p.close().await;
    }
}

#[tokio::test]
async fn a_closed_provider_refuses_calls() {
    let schema = fresh_schema();
    let _drop = DropSchema(schema.clone());
    let p = PostgresProvider::connect(&url(), options(&schema))
        .await
        .unwrap();
    assert_eq!(p.schema(), schema);
    p.close().await;
    let err = p.get_instance(&id("a")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(err.message().contains("closed"), "{err}");
}

#[tokio::test]
async fn schemas_keep_providers_apart_and_reconnecting_keeps_data() {
    let (a, b) = (fresh_schema(), fresh_schema());
    let _drop = (DropSchema(a.clone()), DropSchema(b.clone()));
    let pa = PostgresProvider::connect(&url(), options(&a))
        .await
        .unwrap();
    let pb = PostgresProvider::connect(&url(), options(&b))
        .await
        .unwrap();
    pa.create_instance(new_instance("x"), OnConflict::Fail)
        .await
        .unwrap();
    assert_eq!(
        pb.get_instance(&id("x")).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    let before = pa.get_instance(&id("x")).await.unwrap();
    pa.close().await;
    let again = PostgresProvider::connect(&url(), options(&a))
        .await
        .unwrap();
    assert_eq!(again.get_instance(&id("x")).await.unwrap(), before);
    again.close().await;
    pb.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_connections_are_unavailable_and_retryable_then_replaced() {
    let schema = fresh_schema();
    let _drop = DropSchema(schema.clone());
    let p = PostgresProvider::connect(&url(), options(&schema))
        .await
        .unwrap();
    p.create_instance(new_instance("a"), OnConflict::Fail)
        .await
        .unwrap();
    let (admin, connection) = tokio_postgres::connect(&url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    // What an administrator's shutdown or a server restart does to the pool.
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&format!("keel:{schema}")],
        )
        .await
        .unwrap();
    let mut errors = 0;
    let mut recovered = false;
    for _ in 0..5 {
        match p.get_instance(&id("a")).await {
            Ok(record) => {
                assert_eq!(record.id, id("a"));
                recovered = true;
                break;
            }
            Err(err) => {
                assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
                assert!(err.is_retryable(), "{err}");
                errors += 1;
            }
        }
    }
    assert!(
        recovered,
        "fresh connections replace the terminated ones ({errors} errors)"
    );
    p.close().await;
}
