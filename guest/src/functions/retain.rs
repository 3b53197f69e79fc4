//! on_message_retain, on_retain_delete and on_retain_lookup: one retained message per topic in
//! `mqtt_retain`, handed to every new subscription whose filter matches it (wildcards included).

use crate::bindings::broker::extension::sql::{self, Value};
use crate::bindings::broker::extension::types::Message;
use crate::db::{self, Conn, Query};
use crate::functions::Builtin;
use crate::functions::rows;
use crate::hookpoint::Hookpoint;
use crate::rules::Function;
use crate::topic;

/// `on_retain_lookup`: hand a subscriber the retained messages its filter matches.
pub const ON_RETAIN_LOOKUP: Builtin =
    Builtin { name: "on_retain_lookup", hookpoint: Hookpoint::SessionSubscribed, function: || Function::RetainLookup };
/// `on_message_retain`: keep a retained message with a payload as its topic's retained message.
pub const ON_MESSAGE_RETAIN: Builtin =
    Builtin { name: "on_message_retain", hookpoint: Hookpoint::MessagePublish, function: || Function::MessageRetain };
/// `on_retain_delete`: a retained message with an empty payload deletes its topic's retained message.
pub const ON_RETAIN_DELETE: Builtin =
    Builtin { name: "on_retain_delete", hookpoint: Hookpoint::MessagePublish, function: || Function::RetainDelete };

/// `msg_id` is the id the message was stored under in `mqtt_msg`, if a rule stored it.
const UPSERT: &str = "INSERT INTO mqtt_retain (msgid, sender, topic, qos, payload, arrived, properties, expires_at, msg_id) \
                      VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9) \
                      ON CONFLICT (topic) DO UPDATE SET msgid = excluded.msgid, sender = excluded.sender, msg_id = excluded.msg_id, \
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
pub fn keep(conn: &Conn<'_>, messages: &[&Message]) -> Result<(), sql::Error> {
    let params: Vec<Vec<Value>> = messages
        .iter()
        .map(|m| rows::values(m).into_iter().chain([m.id.map_or(Value::Null, Value::Int64)]).collect())
        .collect();
    conn.run_batch(UPSERT, &params).map(drop)
}

pub fn delete(conn: &Conn<'_>, messages: &[&Message]) -> Result<(), sql::Error> {
    let params: Vec<Vec<Value>> = messages.iter().map(|m| vec![db::text(&m.topic)]).collect();
    conn.run_batch(DELETE, &params).map(drop)
}

/// The retained messages `filter` matches, unexpired, by topic, each with the id it is still
/// stored under in `mqtt_msg` (if it is): a backlog may hold it too. The messages themselves carry
/// no id and RETAIN set, as the contract delivers retained messages.
pub fn lookup(pool: &str, filter: &str) -> Result<Vec<(Option<i64>, Message)>, sql::Error> {
    let select = format!(
        "SELECT (SELECT m.id FROM mqtt_msg m WHERE m.id = mqtt_retain.msg_id), true, {} FROM mqtt_retain WHERE true{}",
        rows::COLUMNS,
        rows::NOT_EXPIRED
    );
    let mut query = Query::new(&select, Vec::new());
    topic::push_match(&mut query, filter);
    query.push(" ORDER BY topic");
    query
        .run(pool)?
        .rows
        .iter_mut()
        .map(|row| rows::decode(row).map(|mut message| (message.id.take(), message)))
        .collect()
}
