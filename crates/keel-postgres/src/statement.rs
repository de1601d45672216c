//! Running parameterised statements through the connection's prepared-statement
//! cache: every query is prepared once per connection, then only bound and run.

use deadpool_postgres::GenericClient;
use keel_provider::Result;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::error::db;

/// Parameters of a statement.
pub(crate) type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// Runs `sql`, returning its rows.
pub(crate) async fn query<C: GenericClient>(
    client: &C,
    sql: &str,
    params: Params<'_>,
) -> Result<Vec<Row>> {
    let statement = client.prepare_cached(sql).await.map_err(db)?;
    client.query(&statement, params).await.map_err(db)
}

/// Runs `sql`, returning its one row if any.
pub(crate) async fn query_opt<C: GenericClient>(
    client: &C,
    sql: &str,
    params: Params<'_>,
) -> Result<Option<Row>> {
    let statement = client.prepare_cached(sql).await.map_err(db)?;
    client.query_opt(&statement, params).await.map_err(db)
}

/// Runs `sql`, returning its one row.
pub(crate) async fn query_one<C: GenericClient>(
    client: &C,
    sql: &str,
    params: Params<'_>,
) -> Result<Row> {
    let statement = client.prepare_cached(sql).await.map_err(db)?;
    client.query_one(&statement, params).await.map_err(db)
}

/// Runs `sql`, returning how many rows it changed.
pub(crate) async fn execute<C: GenericClient>(
    client: &C,
    sql: &str,
    params: Params<'_>,
) -> Result<u64> {
    let statement = client.prepare_cached(sql).await.map_err(db)?;
    client.execute(&statement, params).await.map_err(db)
}
