//! Stored messages as rows: what `mqtt_msg` and `mqtt_retain` rows hold of a message, and how
//! fetch and retained lookup read them back. MQTT 5 expiry lives here too.

use crate::bindings::broker::extension::sql::{self, Value};
use serde_json::{Value as Json, json};

use crate::bindings::broker::extension::types::{Message, Property, PropertyValue};
use crate::db;

/// The property whose value (seconds) bounds a message's life; delivered as what is left of it.
const EXPIRY_PROPERTY: &str = "message-expiry-interval";

/// What a reader selects after `id, retain`, in this order; see [`decode`].
pub const COLUMNS: &str = "msgid, sender, topic, qos, payload, arrived, properties::text, \
                           ceil(extract(epoch FROM expires_at - now()))::bigint AS expiry_left";

/// How many columns [`decode`] reads (`id, retain, COLUMNS`); a reader's own columns follow.
pub const DECODED_COLUMNS: usize = 10;

/// An expired message is never delivered.
pub const NOT_EXPIRED: &str = " AND (expires_at IS NULL OR expires_at > now())";

/// The values of `msgid, sender, topic, qos, payload, arrived, properties, expires_at`.
pub fn values(message: &Message) -> [Value; 8] {
    let properties = if message.properties.is_empty() {
        Value::Null
    } else {
        Value::Text(properties_json(&message.properties).to_string())
    };
    let arrived_micros = message.timestamp.saturating_mul(1000);
    let expires_at = message
        .properties
        .iter()
        .find(|p| p.key == EXPIRY_PROPERTY)
        .and_then(|p| match &p.value {
            PropertyValue::Text(text) => text.trim().parse::<i64>().ok(),
            PropertyValue::Bytes(_) => None,
        })
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

/// Properties as stored in a `jsonb` column: an array of `[key, value]` pairs (user properties may
/// repeat a key). A text value is a JSON string; bytes, and text that `jsonb` cannot hold (a NUL
/// character), are `{"hex": "..."}` with `"text": true` for the latter, so that every value comes
/// back exactly as it went in.
pub fn properties_json(properties: &[Property]) -> Json {
    let value = |value: &PropertyValue| match value {
        PropertyValue::Text(text) if !text.contains('\0') => json!(text),
        PropertyValue::Text(text) => json!({"hex": hex(text.as_bytes()), "text": true}),
        PropertyValue::Bytes(bytes) => json!({"hex": hex(bytes)}),
    };
    Json::Array(properties.iter().map(|p| json!([p.key, value(&p.value)])).collect())
}

/// The inverse of [`properties_json`]; anything else (a hand-written row) is skipped.
pub fn properties_from_json(json: &str) -> Vec<Property> {
    let Ok(Json::Array(pairs)) = serde_json::from_str::<Json>(json) else { return Vec::new() };
    let value = |json: &Json| -> Option<PropertyValue> {
        match json {
            Json::String(text) => Some(PropertyValue::Text(text.clone())),
            Json::Object(object) => {
                let bytes = unhex(object.get("hex")?.as_str()?)?;
                match object.get("text") {
                    Some(Json::Bool(true)) => String::from_utf8(bytes).ok().map(PropertyValue::Text),
                    _ => Some(PropertyValue::Bytes(bytes)),
                }
            }
            _ => None,
        }
    };
    pairs
        .iter()
        .filter_map(|pair| {
            let [key, v] = pair.as_array()?.as_slice() else { return None };
            Some(Property { key: key.as_str()?.to_owned(), value: value(v)? })
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

/// A row of `id, retain, COLUMNS`.
pub fn decode(row: &mut [Value]) -> Result<Message, sql::Error> {
    let expiry_left = match row.get(9) {
        Some(Value::Null) | None => None,
        Some(_) => Some(db::int64(row, 9)?),
    };
    let properties = db::optional_string(row, 8)?
        .map(|json| properties_from_json(&json))
        .unwrap_or_default()
        .into_iter()
        .map(|p| match expiry_left {
            Some(left) if p.key == EXPIRY_PROPERTY => Property { value: PropertyValue::Text(left.to_string()), ..p },
            _ => p,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_property_value_comes_back_as_it_went_in() {
        let properties = vec![
            Property { key: "content-type".into(), value: PropertyValue::Text("text/plain".into()) },
            Property { key: "correlation-data".into(), value: PropertyValue::Bytes(vec![0, 1, 0xff, 0]) },
            Property { key: "k".into(), value: PropertyValue::Text("nul \0 inside, é".into()) },
            Property { key: "k".into(), value: PropertyValue::Text(String::new()) },
            Property { key: "empty".into(), value: PropertyValue::Bytes(Vec::new()) },
        ];
        let json = properties_json(&properties).to_string();
        assert!(!json.contains("\\u0000"), "jsonb refuses NUL: {json}");
        assert_eq!(format!("{:?}", properties_from_json(&json)), format!("{properties:?}"));
    }
}
