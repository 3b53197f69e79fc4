//! Small helpers over the host's `sql` interface.

use crate::bindings::broker::extension::sql::{self, RowSet, Transaction, Value};

/// Runs `work` in one transaction on `pool`: all of it is committed, or none of it.
pub fn in_transaction<T>(
    pool: &str,
    work: impl FnOnce(&Transaction) -> Result<T, sql::Error>,
) -> Result<T, sql::Error> {
    let transaction = Transaction::begin(pool)?;
    let result = work(&transaction)?;
    Transaction::commit(transaction)?;
    Ok(result)
}

/// Where a rule's statements run: on a pool, each statement (or each function's own group of
/// statements) its own transaction; or inside a transaction that other rules share.
pub enum Conn<'a> {
    Pool(&'a str),
    Shared(&'a Transaction),
}

impl Conn<'_> {
    pub fn query(&self, statement: &str, params: &[Value]) -> Result<RowSet, sql::Error> {
        match self {
            Conn::Pool(pool) => sql::query(pool, statement, params),
            Conn::Shared(tx) => tx.query(statement, params),
        }
    }

    pub fn execute(&self, statement: &str, params: &[Value]) -> Result<u64, sql::Error> {
        match self {
            Conn::Pool(pool) => sql::execute(pool, statement, params),
            Conn::Shared(tx) => tx.execute(statement, params),
        }
    }

    /// Runs `work` all or nothing: in a transaction of its own on a pool, or inside the shared one.
    pub fn atomically<T>(&self, work: impl FnOnce(&Transaction) -> Result<T, sql::Error>) -> Result<T, sql::Error> {
        match self {
            Conn::Pool(pool) => in_transaction(pool, work),
            Conn::Shared(tx) => work(tx),
        }
    }

    /// Runs `statement` once per parameter list, all or nothing: one list needs no explicit
    /// transaction; several are pipelined in one.
    pub fn run_batch(&self, statement: &str, params: &[Vec<Value>]) -> Result<Vec<RowSet>, sql::Error> {
        match params {
            [] => Ok(Vec::new()),
            [one] => Ok(vec![self.query(statement, one)?]),
            _ => self.atomically(|tx| tx.query_batch(statement, params)),
        }
    }
}

/// The rules of one event that must take effect together. `Work::shared` begins one
/// transaction per pool (its BEGIN goes out with its first statement), every rule's statements
/// run in it, and `commit` commits them one after another: a failing statement undoes every
/// pool's work, a failing commit only its own pool's. `Work::alone` is for a single rule, which
/// needs no more than its own statements give it.
pub struct Work {
    open: Vec<(String, Transaction)>,
}

impl Work {
    pub fn alone() -> Work {
        Work { open: Vec::new() }
    }

    pub fn shared<'a>(pools: impl IntoIterator<Item = &'a str>) -> Result<Work, sql::Error> {
        let mut open: Vec<(String, Transaction)> = Vec::new();
        for pool in pools {
            if !open.iter().any(|(name, _)| name == pool) {
                open.push((pool.to_owned(), Transaction::begin(pool)?));
            }
        }
        Ok(Work { open })
    }

    pub fn conn<'a>(&'a self, pool: &'a str) -> Conn<'a> {
        match self.open.iter().find(|(name, _)| name == pool) {
            Some((_, tx)) => Conn::Shared(tx),
            None => Conn::Pool(pool),
        }
    }

    /// Commits what is open; dropping a `Work` instead rolls it back.
    pub fn commit(self) -> Result<(), sql::Error> {
        for (_, tx) in self.open {
            Transaction::commit(tx)?;
        }
        Ok(())
    }
}

pub fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

/// A result cell the extension's own statements produced; a mismatch means the schema is not ours.
pub fn int64(row: &[Value], column: usize) -> Result<i64, sql::Error> {
    match row.get(column) {
        Some(Value::Int64(v)) => Ok(*v),
        Some(Value::Int32(v)) => Ok(i64::from(*v)),
        other => Err(unexpected(column, "an integer", other)),
    }
}

pub fn string(row: &[Value], column: usize) -> Result<String, sql::Error> {
    match row.get(column) {
        Some(Value::Text(v)) => Ok(v.clone()),
        Some(Value::Null) => Ok(String::new()),
        other => Err(unexpected(column, "text", other)),
    }
}

pub fn optional_string(row: &[Value], column: usize) -> Result<Option<String>, sql::Error> {
    match row.get(column) {
        Some(Value::Null) => Ok(None),
        _ => string(row, column).map(Some),
    }
}

pub fn bytes(row: &mut [Value], column: usize) -> Result<Vec<u8>, sql::Error> {
    match row.get_mut(column) {
        Some(Value::Bytes(v)) => Ok(std::mem::take(v)),
        other => Err(unexpected(column, "bytes", other.as_deref())),
    }
}

pub fn boolean(row: &[Value], column: usize) -> Result<bool, sql::Error> {
    match row.get(column) {
        Some(Value::Boolean(v)) => Ok(*v),
        other => Err(unexpected(column, "a boolean", other)),
    }
}

pub fn timestamp_micros(row: &[Value], column: usize) -> Result<i64, sql::Error> {
    match row.get(column) {
        Some(Value::Timestamp(v)) => Ok(*v),
        other => Err(unexpected(column, "a timestamp", other)),
    }
}

fn unexpected(column: usize, expected: &str, got: Option<&Value>) -> sql::Error {
    sql::Error::UnsupportedType(format!(
        "column {column}: expected {expected}, got {got:?}; is the schema the one in schema/schema.sql?"
    ))
}

/// A statement assembled from fixed SQL fragments, every value a bound parameter.
pub struct Query {
    pub sql: String,
    pub params: Vec<Value>,
}

impl Query {
    pub fn new(sql: &str, params: Vec<Value>) -> Query {
        Query { sql: sql.to_owned(), params }
    }

    /// Appends `fragment`, whose `?` becomes the next parameter, bound to `value`.
    pub fn bind(&mut self, fragment: &str, value: Value) -> &mut Query {
        self.params.push(value);
        self.sql.push_str(&fragment.replace('?', &format!("${}", self.params.len())));
        self
    }

    pub fn push(&mut self, fragment: &str) -> &mut Query {
        self.sql.push_str(fragment);
        self
    }

    pub fn run(&self, pool: &str) -> Result<sql::RowSet, sql::Error> {
        sql::query(pool, &self.sql, &self.params)
    }
}
