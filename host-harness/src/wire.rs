//! A message on the MQTT wire (rmqtt-codec's PUBLISH, which every adapter speaks: the broker
//! through rmqtt, the proxy directly) and the contract's view of it.
//!
//! The ids an extension's store gives a message travel with it as an MQTT 5 user property,
//! [`STORED_ID`] = `<extension>:<id>` (one per extension that stored it), so that a subscriber's
//! PUBACK (PUBREC for QoS 2) reaches `message-acked` with them. MQTT 5 subscribers see that
//! property; MQTT 3.1.1 packets have no properties, so 3.1.1 subscribers do not. A publisher
//! cannot forge it: an adapter strips it from what clients publish ([`strip_stored_ids`]).

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rmqtt_codec::types::{Publish, QoS};
use rmqtt_codec::v5::PublishProperties;

use crate::bindings::{Message, Property, PropertyValue};

/// The user property that carries stored ids: `<extension>:<id>`.
pub const STORED_ID: &str = "x-offline-id";

/// The stored id `extension` gave `publish`, if any.
pub fn stored_id(publish: &Publish, extension: &str) -> Option<i64> {
    user_properties(publish).find_map(|(key, value)| {
        let (name, id) = value.rsplit_once(':')?;
        (key == STORED_ID && name == extension).then(|| id.parse().ok()).flatten()
    })
}

/// Records that `extension` stored `publish` under `id`.
pub fn attach_stored_id(publish: &mut Publish, extension: &str, id: i64) {
    push_stored_id(publish.properties.get_or_insert_with(PublishProperties::default), extension, id);
}

fn push_stored_id(properties: &mut PublishProperties, extension: &str, id: i64) {
    properties.user_properties.push((STORED_ID.into(), format!("{extension}:{id}").into()));
}

/// Removes stored ids from a publisher's message: a publisher cannot forge them.
pub fn strip_stored_ids(publish: &mut Publish) {
    if let Some(properties) = publish.properties.as_mut() {
        properties.user_properties.retain(|(key, _)| key != STORED_ID);
    }
}

pub fn user_properties(publish: &Publish) -> impl Iterator<Item = (&str, &str)> {
    publish.properties.iter().flat_map(|p| p.user_properties.iter()).map(|(k, v)| (&**k, &**v))
}

/// The contract's view of `publish` as `sender` published it at `timestamp` (milliseconds);
/// `id` is what the extension stored it as.
pub fn to_message(publish: &Publish, sender: &str, id: Option<i64>, timestamp: i64) -> Message {
    Message {
        id,
        msgid: next_msgid(),
        sender: sender.to_owned(),
        topic: publish.topic.to_string(),
        payload: publish.payload.to_vec(),
        qos: publish.qos.value(),
        retain: publish.retain,
        timestamp,
        properties: properties(publish),
    }
}

fn properties(publish: &Publish) -> Vec<Property> {
    let Some(p) = &publish.properties else { return Vec::new() };
    let text = |key: &str, value: String| Property { key: key.into(), value: PropertyValue::Text(value) };
    let mut out = Vec::new();
    if let Some(seconds) = p.message_expiry_interval {
        out.push(text("message-expiry-interval", seconds.to_string()));
    }
    if let Some(content_type) = &p.content_type {
        out.push(text("content-type", content_type.to_string()));
    }
    if let Some(topic) = &p.response_topic {
        out.push(text("response-topic", topic.to_string()));
    }
    if p.is_utf8_payload {
        out.push(text("payload-format-indicator", "1".into()));
    }
    // Binary data: it stays bytes, whatever they hold.
    if let Some(data) = &p.correlation_data {
        out.push(Property { key: "correlation-data".into(), value: PropertyValue::Bytes(data.to_vec()) });
    }
    out.extend(p.user_properties.iter().filter(|(k, _)| k != STORED_ID).map(|(k, v)| text(k, v.to_string())));
    out
}

/// A stored message to deliver at `qos` (the lower of the message's and the subscription's),
/// carrying the id `extension` gave it; without a packet id (the sender gives it one).
pub fn to_publish(message: &Message, qos: u8, extension: &str) -> Publish {
    let mut properties = PublishProperties::default();
    for Property { key, value } in &message.properties {
        let text = match value {
            PropertyValue::Text(text) => text.as_str(),
            PropertyValue::Bytes(bytes) if key == "correlation-data" => {
                properties.correlation_data = Some(bytes.clone().into());
                continue;
            }
            // MQTT has no other binary property of a message; a guest that made one is ignored.
            PropertyValue::Bytes(_) => continue,
        };
        match key.as_str() {
            "message-expiry-interval" => {
                properties.message_expiry_interval = text.parse().ok().and_then(NonZeroU32::new)
            }
            "content-type" => properties.content_type = Some(text.into()),
            "response-topic" => properties.response_topic = Some(text.into()),
            "payload-format-indicator" => properties.is_utf8_payload = text == "1",
            "correlation-data" => properties.correlation_data = Some(text.as_bytes().to_vec().into()),
            _ => properties.user_properties.push((key.as_str().into(), text.into())),
        }
    }
    if let Some(id) = message.id {
        push_stored_id(&mut properties, extension, id);
    }
    Publish {
        dup: false,
        retain: message.retain,
        qos: QoS::try_from(qos).unwrap_or(QoS::AtMostOnce),
        topic: message.topic.as_str().into(),
        packet_id: None,
        payload: message.payload.clone().into(),
        properties: Some(properties),
    }
}

pub fn now_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as i64
}

/// A host-unique message identifier (`msgid` in the rules): start time and a sequence number.
fn next_msgid() -> String {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    static START: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    let start = START.get_or_init(|| SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_micros());
    format!("{start:x}-{}", SEQUENCE.fetch_add(1, Ordering::Relaxed))
}
