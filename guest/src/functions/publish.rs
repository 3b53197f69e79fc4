//! on_message_publish and on_message_store: store messages in `mqtt_msg`.

use crate::bindings::broker::extension::sql::{self, Value};
use crate::bindings::broker::extension::types::Message;
use crate::db;
use crate::functions::rows;

/// Takes the commit-order lock (see schema/schema.sql) before the id is drawn, so that ids
/// become visible in id order and a read position "up to id N" never skips a late commit.
/// The casts fix the parameter types, which an INSERT ... SELECT does not infer.
const INSERT: &str = "INSERT INTO mqtt_msg (retain, msgid, sender, topic, qos, payload, arrived, properties, expires_at) \
                      SELECT $1::boolean, $2::text, $3::text, $4::text, $5::smallint, $6::bytea, $7::timestamptz, \
                             $8::jsonb, $9::timestamptz \
                      FROM (SELECT pg_advisory_xact_lock(7526752370208940653)) AS commit_order \
                      RETURNING id";

/// Whether on_message_publish stores this message: QoS 0 is never stored (on_message_store
/// stores every message).
pub fn publish_stores(message: &Message) -> bool {
    message.qos > 0
}

/// Stores `messages` atomically and returns their ids, in order: one round trip for one
/// message; for a batch, one for the inserts (pipelined) plus the transaction's begin and commit.
pub fn store(pool: &str, messages: &[&Message]) -> Result<Vec<i64>, sql::Error> {
    let params: Vec<Vec<Value>> = messages
        .iter()
        .map(|m| std::iter::once(Value::Boolean(m.retain)).chain(rows::values(m)).collect())
        .collect();
    db::run_batch(pool, INSERT, &params)?
        .iter()
        .map(|set| db::int64(set.rows.first().map_or(&[][..], |r| r), 0))
        .collect()
}
