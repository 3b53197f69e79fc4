//! on_message_publish and on_message_store: store messages in `mqtt_msg`.

use crate::bindings::broker::extension::sql::{self, Value};
use crate::bindings::broker::extension::types::Message;
use crate::db::{self, Conn};
use crate::functions::Builtin;
use crate::functions::rows;
use crate::hookpoint::Hookpoint;
use crate::rules::{Function, StoreOpts};

/// `on_message_publish`: store QoS 1/2 messages; the stored id travels with the message.
pub const ON_MESSAGE_PUBLISH: Builtin = Builtin {
    name: "on_message_publish",
    hookpoint: Hookpoint::MessagePublish,
    function: || Function::MessagePublish(StoreOpts::default()),
};
/// `on_message_store`: store every message, QoS 0 included, for archive use; no id travels.
pub const ON_MESSAGE_STORE: Builtin = Builtin {
    name: "on_message_store",
    hookpoint: Hookpoint::MessagePublish,
    function: || Function::MessageStore(StoreOpts::default()),
};

/// Rows per INSERT statement: the powers of two up to 512. A batch of up to 512 messages goes out
/// as one statement of the smallest size that holds it, the unused rows (fewer than half) bound
/// to NULL and filtered out: one statement is one round trip in its own implicit transaction,
/// with no BEGIN or COMMIT of its own, and each connection prepares at most ten shapes. (Powers
/// of four padded up to 4x: a batch of 100 in 256 rows cost the server 25 % more CPU than in 128.)
/// 512 rows x 10 parameters stays far below PostgreSQL's 65535.
const SHAPES: [usize; 10] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512];

/// The largest statement; a bigger batch is several of these, and a padded rest, in a transaction.
const ROWS_PER_INSERT: usize = SHAPES[SHAPES.len() - 1];

/// Parameters per row: retain, then `rows::values` (8), then the row's place in the statement.
const PARAMS_PER_ROW: usize = 10;

/// The INSERT of up to `rows` rows (one of [`SHAPES`]). It takes the commit-order lock (see
/// schema/schema.sql) before any id is drawn, so that ids become visible in id order and a read
/// position "up to id N" never skips a late commit. Rows are inserted, and their ids returned, in
/// the order given (`ord`); padding rows have no `ord` and are not inserted. The casts fix the
/// parameter types, which VALUES alone would not.
fn insert_statement(rows: usize) -> &'static str {
    thread_local! {
        /// Built once per size: a 512-row statement is some 60 KB of text.
        static STATEMENTS: [&'static str; SHAPES.len()] =
            SHAPES.map(|size| &*Box::leak(build_insert(size).into_boxed_str()));
    }
    let index = SHAPES.iter().position(|&size| size == rows).expect("a statement size of SHAPES");
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
         WHERE v.ord IS NOT NULL ORDER BY v.ord RETURNING id",
        rows.join(", ")
    )
}

/// Whether on_message_publish stores this message: QoS 0 is never stored (on_message_store
/// stores every message).
pub fn publish_stores(message: &Message) -> bool {
    message.qos > 0
}

/// Stores `messages` atomically and returns their ids, in order. Up to [`ROWS_PER_INSERT`] messages
/// are one statement and one round trip; more are a transaction: the full statements of
/// [`ROWS_PER_INSERT`] pipelined in one round trip, then the padded rest.
pub fn store(conn: &Conn<'_>, messages: &[&Message]) -> Result<Vec<i64>, sql::Error> {
    let row_sets = if messages.len() <= ROWS_PER_INSERT {
        let (statement, params) = padded_insert(messages);
        vec![conn.query(statement, &params)?]
    } else {
        // Full statements first, then the padded rest: concatenated results keep message order.
        let (full, rest) = messages.split_at(messages.len() - messages.len() % ROWS_PER_INSERT);
        let lists: Vec<Vec<Value>> = full.chunks(ROWS_PER_INSERT).map(|chunk| padded_insert(chunk).1).collect();
        conn.atomically(|tx| {
            let mut all = tx.query_batch(insert_statement(ROWS_PER_INSERT), &lists)?;
            if !rest.is_empty() {
                let (statement, params) = padded_insert(rest);
                all.push(tx.query(statement, &params)?);
            }
            Ok(all)
        })?
    };
    row_sets.iter().flat_map(|set| &set.rows).map(|row| db::int64(row, 0)).collect()
}

/// The statement of the smallest shape that holds `messages` (at most [`ROWS_PER_INSERT`]), and its
/// parameters: the messages' rows, then NULL rows up to the shape's size.
fn padded_insert(messages: &[&Message]) -> (&'static str, Vec<Value>) {
    assert!(messages.len() <= ROWS_PER_INSERT, "at most ROWS_PER_INSERT messages");
    let shape = messages.len().next_power_of_two();
    let mut params = Vec::with_capacity(shape * PARAMS_PER_ROW);
    params.extend(messages.iter().enumerate().flat_map(|(ord, m)| row_values(m, ord)));
    params.resize(shape * PARAMS_PER_ROW, Value::Null);
    (insert_statement(shape), params)
}

fn row_values(message: &Message, ord: usize) -> impl Iterator<Item = Value> {
    std::iter::once(Value::Boolean(message.retain))
        .chain(rows::values(message))
        .chain(std::iter::once(Value::Int32(ord as i32)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(i: usize) -> Message {
        Message {
            id: None,
            msgid: format!("m{i}"),
            sender: "s".into(),
            topic: "t".into(),
            payload: vec![1],
            qos: 1,
            retain: false,
            timestamp: 0,
            properties: vec![],
        }
    }

    #[test]
    fn a_batch_takes_the_smallest_shape_that_holds_it_and_pads_with_null_rows() {
        for (count, shape) in [(1, 1), (2, 2), (3, 4), (5, 8), (65, 128), (257, 512), (512, 512)] {
            let messages: Vec<Message> = (0..count).map(message).collect();
            let refs: Vec<&Message> = messages.iter().collect();
            let (statement, params) = padded_insert(&refs);
            assert_eq!(statement, insert_statement(shape), "{count} messages");
            assert_eq!(params.len(), shape * PARAMS_PER_ROW, "{count} messages");
            // The last message's place is its `ord`; every padding parameter is NULL, `ord` too.
            assert!(matches!(params[count * PARAMS_PER_ROW - 1], Value::Int32(ord) if ord as usize == count - 1));
            assert!(params[count * PARAMS_PER_ROW..].iter().all(|p| matches!(p, Value::Null)));
        }
    }
}
