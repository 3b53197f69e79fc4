//! The sql action: a rule's `${name}` statements, run in one transaction.

use crate::bindings::broker::extension::sql::{self, Value};
use crate::db::Conn;
use crate::placeholder::Event;
use crate::template::Statement;

/// Runs every statement for every event, all or nothing, and returns how many statements ran.
/// One statement for one event needs no explicit transaction (it is one by itself), which saves
/// the begin and commit round trips.
pub fn run(conn: &Conn<'_>, statements: &[Statement], events: &[Event<'_>]) -> Result<u64, sql::Error> {
    let runs = (statements.len() * events.len()) as u64;
    let params = |statement: &Statement, event: &Event<'_>| -> Vec<Value> {
        statement.params.iter().map(|p| p.value(event)).collect()
    };
    if let ([statement], [event]) = (statements, events) {
        conn.execute(&statement.sql, &params(statement, event))?;
        return Ok(runs);
    }
    conn.atomically(|tx| {
        for statement in statements {
            let batch: Vec<Vec<Value>> = events.iter().map(|event| params(statement, event)).collect();
            tx.query_batch(&statement.sql, &batch)?;
        }
        Ok(runs)
    })
}
