//! on_message_publish: store QoS 1/2 messages in `mqtt_msg`; the new id travels with the message.

use crate::bindings::broker::extension::sql::{self, Value};
use crate::bindings::broker::extension::types::Message;
use crate::db;

/// Takes the commit-order lock (see schema/schema.sql) before the id is drawn, so that ids
/// become visible in id order and a read position "up to id N" never skips a late commit.
/// The casts fix the parameter types, which an INSERT ... SELECT does not infer.
const INSERT: &str = "INSERT INTO mqtt_msg (msgid, sender, topic, qos, retain, payload, arrived, properties) \
                      SELECT $1::text, $2::text, $3::text, $4::smallint, $5::boolean, $6::bytea, $7::timestamptz, $8::jsonb \
                      FROM (SELECT pg_advisory_xact_lock(7526752370208940653)) AS commit_order \
                      RETURNING id";

/// Whether on_message_publish stores this message: QoS 0 is never stored.
pub fn stores(message: &Message) -> bool {
    message.qos > 0
}

/// Stores `messages` atomically and returns their ids, in order. A batch takes one round trip
/// for its inserts (pipelined) plus the transaction's begin and commit.
pub fn store(pool: &str, messages: &[&Message]) -> Result<Vec<i64>, sql::Error> {
    let params: Vec<Vec<Value>> = messages.iter().map(|m| insert_params(m)).collect();
    let row_sets = match params.as_slice() {
        [one] => vec![sql::query(pool, INSERT, one)?],
        _ => db::in_transaction(pool, |tx| tx.query_batch(INSERT, &params))?,
    };
    row_sets.iter().map(|set| db::int64(set.rows.first().map_or(&[][..], |r| r), 0)).collect()
}

fn insert_params(message: &Message) -> Vec<Value> {
    let properties = if message.properties.is_empty() {
        Value::Null
    } else {
        let pairs: Vec<[&str; 2]> = message.properties.iter().map(|p| [p.key.as_str(), p.value.as_str()]).collect();
        Value::Text(serde_json::to_string(&pairs).unwrap_or_default())
    };
    vec![
        db::text(&message.msgid),
        db::text(&message.sender),
        db::text(&message.topic),
        Value::Int32(i32::from(message.qos)),
        Value::Boolean(message.retain),
        Value::Bytes(message.payload.clone()),
        Value::Timestamp(message.timestamp.saturating_mul(1000)),
        properties,
    ]
}
