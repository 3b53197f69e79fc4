//! Stored messages as rows: what `mqtt_msg` and `mqtt_retain` rows hold of a message, and how
//! fetch and retained lookup read them back. MQTT 5 expiry lives here too.

use crate::bindings::broker::extension::sql::{self, Value};
use crate::bindings::broker::extension::types::{Message, Property};
use crate::db;

/// The property whose value (seconds) bounds a message's life; delivered as what is left of it.
const EXPIRY_PROPERTY: &str = "message-expiry-interval";

/// What a reader selects after `id, retain`, in this order; see [`decode`].
pub const COLUMNS: &str = "msgid, sender, topic, qos, payload, arrived, properties::text, \
                           ceil(extract(epoch FROM expires_at - now()))::bigint AS expiry_left";

/// An expired message is never delivered.
pub const NOT_EXPIRED: &str = " AND (expires_at IS NULL OR expires_at > now())";

/// The values of `msgid, sender, topic, qos, payload, arrived, properties, expires_at`.
pub fn values(message: &Message) -> [Value; 8] {
    let properties = if message.properties.is_empty() {
        Value::Null
    } else {
        let pairs: Vec<[&str; 2]> = message.properties.iter().map(|p| [p.key.as_str(), p.value.as_str()]).collect();
        Value::Text(serde_json::to_string(&pairs).unwrap_or_default())
    };
    let arrived_micros = message.timestamp.saturating_mul(1000);
    let expires_at = message
        .properties
        .iter()
        .find(|p| p.key == EXPIRY_PROPERTY)
        .and_then(|p| p.value.trim().parse::<i64>().ok())
        .map_or(Value::Null, |secs| Value::Timestamp(arrived_micros.saturating_add(secs.saturating_mul(1_000_000))));
    [
        db::text(&message.msgid),
        db::text(&message.sender),
        db::text(&message.topic),
        Value::Int32(i32::from(message.qos)),
        Value::Bytes(message.payload.clone()),
        Value::Timestamp(arrived_micros),
        properties,
        expires_at,
    ]
}

/// A row of `id, retain, COLUMNS`.
pub fn decode(row: &mut [Value]) -> Result<Message, sql::Error> {
    let expiry_left = match row.get(9) {
        Some(Value::Null) | None => None,
        Some(_) => Some(db::int64(row, 9)?),
    };
    let properties = db::optional_string(row, 8)?
        .and_then(|json| serde_json::from_str::<Vec<(String, String)>>(&json).ok())
        .unwrap_or_default()
        .into_iter()
        .map(|(key, value)| match expiry_left {
            Some(left) if key == EXPIRY_PROPERTY => Property { key, value: left.to_string() },
            _ => Property { key, value },
        })
        .collect();
    Ok(Message {
        id: match row.first() {
            Some(Value::Null) => None,
            _ => Some(db::int64(row, 0)?),
        },
        retain: db::boolean(row, 1)?,
        msgid: db::string(row, 2)?,
        sender: db::string(row, 3)?,
        topic: db::string(row, 4)?,
        qos: u8::try_from(db::int64(row, 5)?).unwrap_or(1),
        payload: db::bytes(row, 6)?,
        timestamp: db::timestamp_micros(row, 7)?.div_euclid(1000),
        properties,
    })
}
