//! on_message_publish and on_message_store: store messages in `mqtt_msg`.

use crate::bindings::broker::extension::sql::{self, Value};
use crate::bindings::broker::extension::types::Message;
use crate::db;
use crate::functions::rows;

/// Rows per INSERT statement. A batch goes out as multi-row INSERTs of these sizes (largest
/// first), so that the server parses and plans few statements and each connection prepares at
/// most four shapes. 512 rows x 10 parameters stays far below PostgreSQL's 65535.
const CHUNKS: [usize; 4] = [512, 64, 8, 1];

/// Parameters per row: retain, then `rows::values` (8), then the row's place in the statement.
const PARAMS_PER_ROW: usize = 10;

/// The INSERT of `count` rows (one of [`CHUNKS`]). It takes the commit-order lock (see schema/schema.sql) before any
/// id is drawn, so that ids become visible in id order and a read position "up to id N" never
/// skips a late commit. Rows are inserted, and their ids returned, in the order given (`ord`).
/// The casts fix the parameter types, which VALUES alone would not.
fn insert_statement(count: usize) -> &'static str {
    thread_local! {
        /// Built once per size: a 512-row statement is some 60 KB of text.
        static STATEMENTS: [&'static str; CHUNKS.len()] =
            CHUNKS.map(|size| &*Box::leak(build_insert(size).into_boxed_str()));
    }
    let index = CHUNKS.iter().position(|&size| size == count).expect("a statement size of CHUNKS");
    STATEMENTS.with(|statements| statements[index])
}

fn build_insert(count: usize) -> String {
    let rows: Vec<String> = (0..count)
        .map(|row| {
            let p = |i: usize| row * PARAMS_PER_ROW + i;
            format!(
                "(${}::boolean, ${}::text, ${}::text, ${}::text, ${}::smallint, ${}::bytea, ${}::timestamptz, ${}::jsonb, ${}::timestamptz, ${}::int)",
                p(1), p(2), p(3), p(4), p(5), p(6), p(7), p(8), p(9), p(10)
            )
        })
        .collect();
    format!(
        "INSERT INTO mqtt_msg (retain, msgid, sender, topic, qos, payload, arrived, properties, expires_at) \
         SELECT v.retain, v.msgid, v.sender, v.topic, v.qos, v.payload, v.arrived, v.properties, v.expires_at \
         FROM (SELECT pg_advisory_xact_lock(7526752370208940653)) AS commit_order, \
              (VALUES {}) AS v(retain, msgid, sender, topic, qos, payload, arrived, properties, expires_at, ord) \
         ORDER BY v.ord RETURNING id",
        rows.join(", ")
    )
}

/// Whether on_message_publish stores this message: QoS 0 is never stored (on_message_store
/// stores every message).
pub fn publish_stores(message: &Message) -> bool {
    message.qos > 0
}

/// Stores `messages` atomically and returns their ids, in order. One message is one round trip;
/// a batch is the transaction's begin and commit plus one round trip per statement size used.
pub fn store(pool: &str, messages: &[&Message]) -> Result<Vec<i64>, sql::Error> {
    // Consecutive chunks, largest first: concatenating the sizes' results keeps message order.
    let mut by_size: Vec<(usize, Vec<Vec<Value>>)> = Vec::new();
    let mut rest = messages;
    for size in CHUNKS {
        let mut lists = Vec::new();
        while rest.len() >= size {
            let (chunk, tail) = rest.split_at(size);
            lists.push(chunk.iter().enumerate().flat_map(|(ord, m)| row_values(m, ord)).collect());
            rest = tail;
        }
        if !lists.is_empty() {
            by_size.push((size, lists));
        }
    }
    let row_sets = match by_size.as_slice() {
        [(1, lists)] if lists.len() == 1 => vec![sql::query(pool, insert_statement(1), &lists[0])?],
        _ => db::in_transaction(pool, |tx| {
            let mut all = Vec::new();
            for (size, lists) in &by_size {
                all.extend(tx.query_batch(insert_statement(*size), lists)?);
            }
            Ok(all)
        })?,
    };
    row_sets.iter().flat_map(|set| &set.rows).map(|row| db::int64(row, 0)).collect()
}

fn row_values(message: &Message, ord: usize) -> impl Iterator<Item = Value> {
    std::iter::once(Value::Boolean(message.retain))
        .chain(rows::values(message))
        .chain(std::iter::once(Value::Int32(ord as i32)))
}
