//! Running statements: every statement is prepared once per connection and cached,
//! and rows are mapped straight into Keel's types.

use keel_provider::Result;
use rusqlite::{Connection, Params, Row};

use crate::error::db;

/// How many prepared statements each connection keeps: more than the provider has,
/// so none is ever prepared twice.
pub(crate) const STATEMENT_CACHE: usize = 128;

/// Runs `sql` and returns how many rows it changed.
pub(crate) fn execute(conn: &Connection, sql: &str, params: impl Params) -> Result<usize> {
    conn.prepare_cached(sql)
        .and_then(|mut statement| statement.execute(params))
        .map_err(db)
}

/// Runs `sql` and maps each row it returns with `map`.
pub(crate) fn all<T>(
    conn: &Connection,
    sql: &str,
    params: impl Params,
    mut map: impl FnMut(&Row<'_>) -> Result<T>,
) -> Result<Vec<T>> {
    let mut statement = conn.prepare_cached(sql).map_err(db)?;
    let mut rows = statement.query(params).map_err(db)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(db)? {
        out.push(map(row)?);
    }
    Ok(out)
}

/// Runs `sql` and maps the first row it returns, if any, with `map`. A statement that
/// writes (`... RETURNING`) is run to completion all the same.
pub(crate) fn first<T>(
    conn: &Connection,
    sql: &str,
    params: impl Params,
    map: impl FnOnce(&Row<'_>) -> Result<T>,
) -> Result<Option<T>> {
    let mut statement = conn.prepare_cached(sql).map_err(db)?;
    let mut rows = statement.query(params).map_err(db)?;
    match rows.next().map_err(db)? {
        Some(row) => map(row).map(Some),
        None => Ok(None),
    }
}

/// Runs `sql`, which returns one row, and maps it with `map`.
pub(crate) fn one<T>(
    conn: &Connection,
    sql: &str,
    params: impl Params,
    map: impl FnOnce(&Row<'_>) -> Result<T>,
) -> Result<T> {
    first(conn, sql, params, map)?.ok_or_else(|| db(rusqlite::Error::QueryReturnedNoRows))
}
