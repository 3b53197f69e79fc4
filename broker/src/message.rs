//! Between rmqtt's types and the contract's: clients, messages, subscriptions.
//!
//! The ids the extensions' stores give a message travel with it inside the broker as an MQTT 5
//! user property, [`STORED_ID`] = `<extension>:<id>` (one per extension that stored it), so that
//! a subscriber's PUBACK (PUBREC for QoS 2) reaches `message-acked` with them. MQTT 5
//! subscribers see that property; MQTT 3.1.1 packets have no properties, so 3.1.1 subscribers
//! do not. A publisher cannot forge it: incoming messages lose any property of that name.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use host_harness::bindings::{Client, Message, Property, PropertyValue, Subscription};
use host_harness::protocol::delivery::Held;
use rmqtt::codec::v5::PublishProperties;
use rmqtt::session::Session;
use rmqtt::types::{Publish, QoS, SharedGroup, Subscribe};

/// The user property that carries stored ids: `<extension>:<id>`.
pub const STORED_ID: &str = "x-offline-id";

/// Marks, between the publish hook and the ACL check that follows it, a message that an
/// extension failed to store. Never leaves the broker: the message is refused.
pub const STORE_FAILED: &str = "x-offline-store-failed";

/// A live message as rmqtt routes it, for the delivery protocol to hold back and release as it
/// came.
#[derive(Debug, Clone)]
pub struct Routed(pub Publish);

impl Held for Routed {
    fn topic(&self) -> &str {
        &self.0.topic
    }
}

pub fn client(session: &Session) -> Client {
    Client {
        clientid: session.id.client_id.to_string(),
        username: session.id.username.as_ref().map(|u| u.to_string()),
        peerhost: session.id.remote_addr.map(|a| a.ip().to_string()),
    }
}

/// A subscription as the contract names it: a shared one as `$share/<group>/<filter>` (rmqtt
/// keeps the group apart).
pub fn subscription(subscribe: &Subscribe) -> Subscription {
    let filter = filter(&subscribe.topic_filter, subscribe.opts.shared_group());
    Subscription { filter, qos: subscribe.opts.qos().value() }
}

/// The filter as subscribed: `$share/<group>/<filter>` for a shared subscription.
pub fn filter(topic_filter: &str, group: Option<&SharedGroup>) -> String {
    match group {
        Some(group) => format!("$share/{group}/{topic_filter}"),
        None => topic_filter.to_owned(),
    }
}

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

/// Removes the broker's own properties from a publisher's message: a publisher cannot forge them.
pub fn strip_own_properties(publish: &mut Publish) {
    if let Some(properties) = publish.properties.as_mut() {
        properties.user_properties.retain(|(key, _)| key != STORED_ID && key != STORE_FAILED);
    }
}

pub fn set_flag(publish: &mut Publish, flag: &str) {
    let properties = publish.properties.get_or_insert_with(PublishProperties::default);
    properties.user_properties.push((flag.into(), "1".into()));
}

pub fn has_flag(publish: &Publish, flag: &str) -> bool {
    user_properties(publish).any(|(key, _)| key == flag)
}

fn user_properties(publish: &Publish) -> impl Iterator<Item = (&str, &str)> {
    publish.properties.iter().flat_map(|p| p.user_properties.iter()).map(|(k, v)| (&**k, &**v))
}

/// The contract's view of `publish` as `sender` published it; `id` is what `extension` stored it as.
pub fn to_message(publish: &Publish, sender: &str, id: Option<i64>) -> Message {
    Message {
        id,
        msgid: next_msgid(),
        sender: sender.to_owned(),
        topic: publish.topic.to_string(),
        payload: publish.payload.to_vec(),
        qos: publish.qos.value(),
        retain: publish.retain,
        timestamp: publish.create_time.unwrap_or_else(now_millis),
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
/// carrying the id `extension` gave it.
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
    let codec = rmqtt::codec::types::Publish {
        dup: false,
        retain: message.retain,
        qos: QoS::try_from(qos).unwrap_or(QoS::AtMostOnce),
        topic: message.topic.as_str().into(),
        packet_id: None,
        payload: message.payload.clone().into(),
        properties: Some(properties),
    };
    // Created now: the broker's own expiry check counts from here; the extension has already
    // shortened message-expiry-interval by the time the message spent stored.
    Publish::new(Box::new(codec), None, None, Some(now_millis()))
}

fn now_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as i64
}

/// A broker-unique message identifier (`msgid` in the rules): start time and a sequence number.
fn next_msgid() -> String {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    static START: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    let start = START.get_or_init(|| SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_micros());
    format!("{start:x}-{}", SEQUENCE.fetch_add(1, Ordering::Relaxed))
}
