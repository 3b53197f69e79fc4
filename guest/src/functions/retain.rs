//! on_message_retain, on_retain_delete and on_retain_lookup: one retained message per topic in
//! `mqtt_retain`, handed to every new subscription whose filter matches it (wildcards included).

use crate::bindings::broker::extension::sql::{self, Value};
use crate::bindings::broker::extension::types::Message;
use crate::db::{self, Query};
use crate::functions::rows;
use crate::topic;

const UPSERT: &str = "INSERT INTO mqtt_retain (msgid, sender, topic, qos, payload, arrived, properties, expires_at) \
                      VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8) \
                      ON CONFLICT (topic) DO UPDATE SET msgid = excluded.msgid, sender = excluded.sender, \
                        qos = excluded.qos, payload = excluded.payload, arrived = excluded.arrived, \
                        properties = excluded.properties, expires_at = excluded.expires_at";

const DELETE: &str = "DELETE FROM mqtt_retain WHERE topic = $1";

/// Whether on_message_retain keeps this message: RETAIN set, with a payload.
pub fn retains(message: &Message) -> bool {
    message.retain && !message.payload.is_empty()
}

/// Whether on_retain_delete deletes for this message: RETAIN set, empty payload (MQTT's way).
pub fn deletes(message: &Message) -> bool {
    message.retain && message.payload.is_empty()
}

/// Keeps each message as its topic's retained message, in order (the last of a topic wins).
pub fn keep(pool: &str, messages: &[&Message]) -> Result<(), sql::Error> {
    let params: Vec<Vec<Value>> = messages.iter().map(|m| rows::values(m).into()).collect();
    db::run_batch(pool, UPSERT, &params).map(drop)
}

pub fn delete(pool: &str, messages: &[&Message]) -> Result<(), sql::Error> {
    let params: Vec<Vec<Value>> = messages.iter().map(|m| vec![db::text(&m.topic)]).collect();
    db::run_batch(pool, DELETE, &params).map(drop)
}

/// The retained messages `filter` matches, unexpired, by topic.
pub fn lookup(pool: &str, filter: &str) -> Result<Vec<Message>, sql::Error> {
    let select =
        format!("SELECT NULL::bigint, true, {} FROM mqtt_retain WHERE true{}", rows::COLUMNS, rows::NOT_EXPIRED);
    let mut query = Query::new(&select, Vec::new());
    topic::push_match(&mut query, filter);
    query.push(" ORDER BY topic");
    query.run(pool)?.rows.iter_mut().map(|row| rows::decode(row)).collect()
}
