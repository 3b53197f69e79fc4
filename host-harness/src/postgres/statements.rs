//! Running one statement on a pooled connection (prepared once per connection), and what its
//! errors say to a guest.

use std::error::Error as StdError;

use deadpool_postgres::Object;
use tokio_postgres::Statement;

use futures::{StreamExt, TryStreamExt};
use postgres_types::ToSql;
use tokio_postgres::Row;

use super::MAX_RESULT_ROWS;
use super::values::{Param, row_set};
use crate::bindings::{DatabaseError, RowSet, SqlError, Value};

pub(super) async fn prepare(client: &Object, statement: &str) -> Result<Statement, SqlError> {
    client.prepare_cached(statement).await.map_err(sql_error)
}

pub(super) async fn query(client: &Object, statement: &str, params: &[Value]) -> Result<RowSet, SqlError> {
    let prepared = prepare(client, statement).await?;
    let bound = bind(&prepared, params)?;
    // Streamed, so that a result past the cap is refused before it is all in memory.
    let stream = client.query_raw(&prepared, refs(&bound)).await.map_err(sql_error)?;
    let rows: Vec<Row> = stream.take(MAX_RESULT_ROWS + 1).try_collect().await.map_err(sql_error)?;
    row_set(&prepared, rows)
}

pub(super) async fn execute(client: &Object, statement: &str, params: &[Value]) -> Result<u64, SqlError> {
    let prepared = prepare(client, statement).await?;
    let bound = bind(&prepared, params)?;
    client.execute(&prepared, &refs(&bound)[..]).await.map_err(sql_error)
}

pub(super) fn bind<'a>(statement: &Statement, params: &'a [Value]) -> Result<Vec<Param<'a>>, SqlError> {
    if statement.params().len() != params.len() {
        return Err(SqlError::InvalidParameter(format!(
            "the statement has {} parameters but {} values were given",
            statement.params().len(),
            params.len()
        )));
    }
    Ok(params.iter().map(Param).collect())
}

pub(super) fn refs<'a>(params: &'a [Param<'a>]) -> Vec<&'a (dyn ToSql + Sync)> {
    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
}

pub(super) fn sql_error(e: tokio_postgres::Error) -> SqlError {
    if let Some(db) = e.as_db_error() {
        return SqlError::Database(DatabaseError {
            code: db.code().code().to_owned(),
            message: db.message().to_owned(),
            detail: db.detail().map(str::to_owned),
        });
    }
    // A parameter that could not be converted carries our own message as its source.
    if let Some(source) = e.source()
        && e.to_string().starts_with("error serializing parameter")
    {
        return SqlError::InvalidParameter(format!("{e}: {source}"));
    }
    SqlError::Connection(with_causes(&e))
}

/// An error and its causes on one line: "error performing TLS handshake: invalid peer certificate: UnknownIssuer".
pub(super) fn innermost_cause(e: &dyn StdError) -> String {
    let mut innermost = e;
    while let Some(cause) = innermost.source() {
        innermost = cause;
    }
    innermost.to_string()
}

pub(super) fn with_causes(e: &dyn StdError) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let part = c.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = c.source();
    }
    text
}
