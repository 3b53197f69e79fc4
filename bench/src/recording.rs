//! A [`SqlBackend`] that records what the guest sends before passing it on, so that the very
//! same statements and parameters can be replayed natively (without wasm) for comparison.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use host_harness::bindings::{RowSet, SqlError, Value};
use host_harness::sql::{SqlBackend, SqlTransaction};

/// One unit of work as the guest issued it.
#[derive(Debug, Clone)]
pub enum Unit {
    /// A statement outside a transaction (`query` or `execute`).
    Single { statement: String, params: Vec<Value> },
    /// A transaction's `query-batch` calls.
    Transaction(Vec<(String, Vec<Vec<Value>>)>),
}

pub struct Recording {
    inner: Arc<dyn SqlBackend>,
    pub units: Arc<Mutex<Vec<Unit>>>,
    /// Off while timing: recording (a lock and a copy of every parameter) is not the guest's cost.
    pub on: Arc<AtomicBool>,
    /// When the last `query` outside a transaction (a publish batch of up to 512 messages) went
    /// to the database and when its answer came back: what of a hook call's time is the
    /// database's (kept while off, too).
    pub last_statement: Arc<Mutex<Option<(Instant, Instant)>>>,
}

impl Recording {
    pub fn new(inner: Arc<dyn SqlBackend>) -> Recording {
        Recording { inner, units: Arc::default(), on: Arc::new(AtomicBool::new(true)), last_statement: Arc::default() }
    }

    /// Records the unit `make` builds, unless recording is off (then nothing is copied).
    fn record(&self, make: impl FnOnce() -> Unit) {
        if self.on.load(Ordering::Relaxed) {
            self.units.lock().unwrap().push(make());
        }
    }
}

#[async_trait]
impl SqlBackend for Recording {
    async fn query(&self, pool: &str, statement: &str, params: &[Value]) -> Result<RowSet, SqlError> {
        self.record(|| Unit::Single { statement: statement.into(), params: params.to_vec() });
        let sent = Instant::now();
        let answer = self.inner.query(pool, statement, params).await;
        *self.last_statement.lock().unwrap() = Some((sent, Instant::now()));
        answer
    }

    async fn execute(&self, pool: &str, statement: &str, params: &[Value]) -> Result<u64, SqlError> {
        self.record(|| Unit::Single { statement: statement.into(), params: params.to_vec() });
        self.inner.execute(pool, statement, params).await
    }

    async fn begin(&self, pool: &str) -> Result<Box<dyn SqlTransaction>, SqlError> {
        let inner = self.inner.begin(pool).await?;
        if !self.on.load(Ordering::Relaxed) {
            return Ok(inner);
        }
        Ok(Box::new(RecordingTransaction { inner, calls: Vec::new(), units: self.units.clone() }))
    }
}

struct RecordingTransaction {
    inner: Box<dyn SqlTransaction>,
    calls: Vec<(String, Vec<Vec<Value>>)>,
    units: Arc<Mutex<Vec<Unit>>>,
}

#[async_trait]
impl SqlTransaction for RecordingTransaction {
    async fn query(&mut self, statement: &str, params: &[Value]) -> Result<RowSet, SqlError> {
        self.calls.push((statement.into(), vec![params.to_vec()]));
        self.inner.query(statement, params).await
    }

    async fn execute(&mut self, statement: &str, params: &[Value]) -> Result<u64, SqlError> {
        self.calls.push((statement.into(), vec![params.to_vec()]));
        self.inner.execute(statement, params).await
    }

    async fn query_batch(&mut self, statement: &str, params: &[Vec<Value>]) -> Result<Vec<RowSet>, SqlError> {
        self.calls.push((statement.into(), params.to_vec()));
        self.inner.query_batch(statement, params).await
    }

    async fn commit(self: Box<Self>) -> Result<(), SqlError> {
        self.units.lock().unwrap().push(Unit::Transaction(self.calls));
        self.inner.commit().await
    }

    async fn rollback(self: Box<Self>) {
        self.inner.rollback().await
    }
}

/// Runs `units` straight through `backend`: the guest's work without the guest.
pub async fn replay(backend: &dyn SqlBackend, pool: &str, units: &[Unit]) -> Result<(), SqlError> {
    for unit in units {
        match unit {
            Unit::Single { statement, params } => {
                backend.query(pool, statement, params).await?;
            }
            Unit::Transaction(calls) => {
                let mut transaction = backend.begin(pool).await?;
                for (statement, params) in calls {
                    transaction.query_batch(statement, params).await?;
                }
                transaction.commit().await?;
            }
        }
    }
    Ok(())
}
