//! The `sql` interface of the contract, implemented for guests over a [`SqlBackend`]: the seam
//! between what a guest may ask and the database that answers (PostgreSQL in
//! [`crate::postgres`], a stub in benchmarks, a fake in the protocol tests: `Host::with_sql`).

use async_trait::async_trait;
use wasmtime::component::Resource;

use crate::bindings::broker::extension::sql::{Host, HostTransaction};
use crate::bindings::{RowSet, SqlError, Value};
use crate::state::HostState;

/// A database that runs a guest's statements on named pools.
#[async_trait]
pub trait SqlBackend: Send + Sync {
    async fn query(&self, pool: &str, statement: &str, params: &[Value]) -> Result<RowSet, SqlError>;
    async fn execute(&self, pool: &str, statement: &str, params: &[Value]) -> Result<u64, SqlError>;
    async fn begin(&self, pool: &str) -> Result<Box<dyn SqlTransaction>, SqlError>;
}

/// An open transaction on one connection. Dropping it without [`SqlTransaction::commit`] rolls
/// it back.
#[async_trait]
pub trait SqlTransaction: Send {
    async fn query(&mut self, statement: &str, params: &[Value]) -> Result<RowSet, SqlError>;
    async fn execute(&mut self, statement: &str, params: &[Value]) -> Result<u64, SqlError>;
    async fn query_batch(&mut self, statement: &str, params: &[Vec<Value>]) -> Result<Vec<RowSet>, SqlError>;
    async fn commit(self: Box<Self>) -> Result<(), SqlError>;
    async fn rollback(self: Box<Self>);
}

/// The guest's `transaction` resource.
pub struct Transaction(Box<dyn SqlTransaction>);

impl Host for HostState {
    async fn query(
        &mut self,
        pool: String,
        statement: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<RowSet, SqlError>> {
        Ok(self.sql.query(&pool, &statement, &params).await)
    }

    async fn execute(
        &mut self,
        pool: String,
        statement: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<u64, SqlError>> {
        Ok(self.sql.execute(&pool, &statement, &params).await)
    }
}

impl HostTransaction for HostState {
    async fn begin(&mut self, pool: String) -> wasmtime::Result<Result<Resource<Transaction>, SqlError>> {
        match self.sql.begin(&pool).await {
            Ok(transaction) => Ok(Ok(self.table.push(Transaction(transaction))?)),
            Err(e) => Ok(Err(e)),
        }
    }

    async fn query(
        &mut self,
        this: Resource<Transaction>,
        statement: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<RowSet, SqlError>> {
        Ok(self.table.get_mut(&this)?.0.query(&statement, &params).await)
    }

    async fn execute(
        &mut self,
        this: Resource<Transaction>,
        statement: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<u64, SqlError>> {
        Ok(self.table.get_mut(&this)?.0.execute(&statement, &params).await)
    }

    async fn query_batch(
        &mut self,
        this: Resource<Transaction>,
        statement: String,
        params: Vec<Vec<Value>>,
    ) -> wasmtime::Result<Result<Vec<RowSet>, SqlError>> {
        Ok(self.table.get_mut(&this)?.0.query_batch(&statement, &params).await)
    }

    async fn commit(&mut self, this: Resource<Transaction>) -> wasmtime::Result<Result<(), SqlError>> {
        Ok(self.table.delete(this)?.0.commit().await)
    }

    async fn drop(&mut self, this: Resource<Transaction>) -> wasmtime::Result<()> {
        self.table.delete(this)?.0.rollback().await;
        Ok(())
    }
}
