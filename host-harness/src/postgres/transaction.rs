//! A guest's transaction, held on one pooled connection until it commits or is dropped.

use async_trait::async_trait;
use deadpool_postgres::Object;
use futures::future::try_join_all;
use postgres_types::ToSql;

use super::statements::{bind, execute, prepare, query, refs, sql_error};
use super::values::{Param, row_set};
use crate::bindings::{RowSet, SqlError, Value};
use crate::sql::SqlTransaction;

/// A transaction held on one pooled connection. `BEGIN` goes out with the first statement, in
/// the same round trip (tokio-postgres pipelines requests made together).
pub(super) struct PgTransaction {
    /// `None` once committed or rolled back.
    client: Option<Object>,
    /// Whether `BEGIN` was sent.
    begun: bool,
}

impl PgTransaction {
    /// On `client`; `BEGIN` goes out with the first statement.
    pub(super) fn on(client: Object) -> PgTransaction {
        PgTransaction { client: Some(client), begun: false }
    }

    fn client(&self) -> Result<&Object, SqlError> {
        self.client.as_ref().ok_or_else(|| SqlError::Connection("transaction already ended".into()))
    }

    /// Runs `work` on the connection, preceded by `BEGIN` the first time.
    async fn run<T>(&mut self, work: impl AsyncFnOnce(&Object) -> Result<T, SqlError>) -> Result<T, SqlError> {
        let begin = !self.begun;
        self.begun = true;
        let client = self.client()?;
        if !begin {
            return work(client).await;
        }
        // Polled in this order, BEGIN is sent before the statement.
        let (begun, result) = futures::join!(client.batch_execute("BEGIN"), work(client));
        begun.map_err(sql_error)?;
        result
    }
}

#[async_trait]
impl SqlTransaction for PgTransaction {
    async fn query(&mut self, statement: &str, params: &[Value]) -> Result<RowSet, SqlError> {
        self.run(async |client| query(client, statement, params).await).await
    }

    async fn execute(&mut self, statement: &str, params: &[Value]) -> Result<u64, SqlError> {
        self.run(async |client| execute(client, statement, params).await).await
    }

    async fn query_batch(&mut self, statement: &str, params: &[Vec<Value>]) -> Result<Vec<RowSet>, SqlError> {
        self.run(async |client| {
            let prepared = prepare(client, statement).await?;
            let bound: Vec<Vec<Param<'_>>> = params.iter().map(|p| bind(&prepared, p)).collect::<Result<_, _>>()?;
            let bound_refs: Vec<Vec<&(dyn ToSql + Sync)>> = bound.iter().map(|p| refs(p)).collect();
            // Polled together, the queries are pipelined on the connection: one round trip.
            let results =
                try_join_all(bound_refs.iter().map(|p| client.query(&prepared, p))).await.map_err(sql_error)?;
            results.into_iter().map(|rows| row_set(&prepared, rows)).collect::<Result<_, _>>()
        })
        .await
    }

    async fn commit(mut self: Box<Self>) -> Result<(), SqlError> {
        let client = self.client.take().ok_or_else(|| SqlError::Connection("transaction already ended".into()))?;
        if !self.begun {
            return Ok(());
        }
        client.batch_execute("COMMIT").await.map_err(sql_error)
    }

    async fn rollback(mut self: Box<Self>) {
        if let Some(client) = self.client.take()
            && self.begun
            && client.batch_execute("ROLLBACK").await.is_err()
        {
            // The connection's state is unknown: never hand it to another caller.
            let _ = Object::take(client);
        }
    }
}

impl Drop for PgTransaction {
    /// A transaction dropped without commit or rollback (its guest trapped) must not return an
    /// open transaction to the pool: detach the connection, which closes it.
    fn drop(&mut self) {
        if let Some(client) = self.client.take()
            && self.begun
        {
            let _ = Object::take(client);
        }
    }
}
