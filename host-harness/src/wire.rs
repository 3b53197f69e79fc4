//! A message on the MQTT wire (rmqtt-codec's PUBLISH, which every adapter speaks: the broker
//! through rmqtt, the proxy directly) and the contract's view of it.
//!
//! The ids an extension's store gives a message travel with it as an MQTT 5 user property,
//! [`STORED_ID`] = `<extension>:<id>:<tag>` (one per extension that stored it), so that a
//! subscriber's PUBACK (PUBREC for QoS 2) reaches `message-acked` with them. MQTT 5 subscribers
//! see that property; MQTT 3.1.1 packets have no properties, so 3.1.1 subscribers do not.
//!
//! A publisher cannot forge it. An adapter strips it from what its clients publish
//! ([`strip_stored_ids`]); and a client of the broker behind a proxy, which the proxy never
//! sees, cannot make one either: `<tag>` is an HMAC-SHA-256 (64 bits of it) of the extension,
//! the id and the topic under the process's key ([`set_key`]; random unless configured, and
//! shared by the proxies in front of one broker). A property without a valid tag is no id.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use std::sync::OnceLock;

use rmqtt_codec::types::{Publish, QoS};
use rmqtt_codec::v5::PublishProperties;
use sha2::{Digest, Sha256};

use crate::bindings::{Message, Property, PropertyValue};
use crate::protocol::exactly_once::Sent;

/// The user property that carries stored ids: `<extension>:<id>`.
pub const STORED_ID: &str = "x-offline-id";

/// The key that tags stored ids: set once, before any id is tagged or read (the proxy's
/// `[upstream] id_key`); a random one otherwise. Several processes that must read each other's
/// ids (proxies in front of one broker) need the same key.
pub fn set_key(secret: &str) {
    let _ = KEY.set(Keyed::new(Sha256::digest(secret.as_bytes()).into()));
}

static KEY: OnceLock<Keyed> = OnceLock::new();

/// The HMAC's two hashes with the key's pad block already taken in: a tag then costs the
/// hashing of its message alone (ids are read on every delivery and ack).
struct Keyed {
    inner: Sha256,
    outer: Sha256,
}

impl Keyed {
    fn new(key: [u8; 32]) -> Keyed {
        let pad = |byte: u8| -> [u8; 64] { std::array::from_fn(|i| key.get(i).copied().unwrap_or(0) ^ byte) };
        Keyed { inner: Sha256::new().chain_update(pad(0x36)), outer: Sha256::new().chain_update(pad(0x5c)) }
    }

    /// HMAC-SHA-256 of the concatenation of `parts`.
    fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut inner = self.inner.clone();
        for part in parts {
            inner.update(part);
        }
        self.outer.clone().chain_update(inner.finalize()).finalize().into()
    }
}

fn keyed() -> &'static Keyed {
    KEY.get_or_init(|| {
        // Seeded by the operating system's random source, per process.
        use std::hash::{BuildHasher, Hasher};
        let mut key = [0u8; 32];
        for chunk in key.chunks_mut(8) {
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u64(now_millis() as u64);
            chunk.copy_from_slice(&hasher.finish().to_le_bytes());
        }
        Keyed::new(key)
    })
}

/// HMAC-SHA-256 (RFC 2104) of `<extension>:<id>:<topic>`, its first 8 bytes in hex. Made
/// for every forward and read back on every delivery and ack: no allocation, no formatting.
fn tag(extension: &str, id: i64, topic: &str) -> [u8; 16] {
    let mut digits = itoa::Buffer::new();
    let id = digits.format(id).as_bytes();
    let mac = keyed().mac(&[extension.as_bytes(), b":", id, b":", topic.as_bytes()]);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut hex = [0u8; 16];
    for (i, byte) in mac[..8].iter().enumerate() {
        hex[2 * i] = HEX[usize::from(byte >> 4)];
        hex[2 * i + 1] = HEX[usize::from(byte & 0xf)];
    }
    hex
}

/// The stored id `extension` gave `publish`, if any (and if its tag is valid).
pub fn stored_id(publish: &Publish, extension: &str) -> Option<i64> {
    user_properties(publish).find_map(|(key, value)| {
        if key != STORED_ID {
            return None;
        }
        let mut parts = value.rsplitn(3, ':');
        let (tagged, id, name) = (parts.next()?, parts.next()?, parts.next()?);
        let id: i64 = id.parse().ok()?;
        (name == extension && tagged.as_bytes() == tag(name, id, &publish.topic)).then_some(id)
    })
}

/// Records that `extension` stored `publish` under `id`.
pub fn attach_stored_id(publish: &mut Publish, extension: &str, id: i64) {
    let topic = publish.topic.clone();
    push_stored_id(publish.properties.get_or_insert_with(PublishProperties::default), extension, id, &topic);
}

fn push_stored_id(properties: &mut PublishProperties, extension: &str, id: i64, topic: &str) {
    let tag = tag(extension, id, topic);
    let mut digits = itoa::Buffer::new();
    let id = digits.format(id);
    let mut value = String::with_capacity(extension.len() + id.len() + tag.len() + 2);
    for part in [extension, ":", id, ":", std::str::from_utf8(&tag).expect("hex digits")] {
        value.push_str(part);
    }
    properties.user_properties.push((STORED_ID.into(), value.into()));
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

/// What a QoS 2 `publish` of `sender` is stored under for its resends (`exactly_once`): its
/// packet id; None for QoS 0 and 1.
pub fn qos2_sent(publish: &Publish, sender: &str) -> Option<Sent> {
    let packet_id = publish.packet_id.filter(|_| publish.qos == QoS::ExactlyOnce)?;
    Some(Sent { clientid: sender.to_owned(), packet_id: packet_id.get() })
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
/// carrying the id `extension` gave it; without a packet id (the sender gives it one). The
/// message's payload, topic and properties move into the packet: nothing is copied.
pub fn to_publish(message: Message, qos: u8, extension: &str) -> Publish {
    let mut properties = PublishProperties::default();
    for Property { key, value } in message.properties {
        let text = match value {
            PropertyValue::Text(text) => text,
            PropertyValue::Bytes(bytes) if key == "correlation-data" => {
                properties.correlation_data = Some(bytes.into());
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
            "correlation-data" => properties.correlation_data = Some(text.into_bytes().into()),
            _ => properties.user_properties.push((key.into(), text.into())),
        }
    }
    if let Some(id) = message.id {
        push_stored_id(&mut properties, extension, id, &message.topic);
    }
    Publish {
        dup: false,
        retain: message.retain,
        qos: QoS::try_from(qos).unwrap_or(QoS::AtMostOnce),
        topic: message.topic.into(),
        packet_id: None,
        payload: message.payload.into(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(topic: &str, stored_id: Option<&str>) -> Publish {
        Publish {
            dup: false,
            retain: false,
            qos: QoS::AtLeastOnce,
            topic: topic.into(),
            packet_id: None,
            payload: "x".into(),
            properties: Some(PublishProperties {
                user_properties: stored_id.map(|v| (STORED_ID.into(), v.into())).into_iter().collect(),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn an_id_reads_back_only_with_its_own_tag_extension_and_topic() {
        let mut tagged = publish("t/a", None);
        attach_stored_id(&mut tagged, "offline", 42);
        assert_eq!(stored_id(&tagged, "offline"), Some(42));
        assert_eq!(stored_id(&tagged, "other"), None, "another extension's");
        let value = wire_value(&tagged);
        assert!(value.starts_with("offline:42:") && value.len() == "offline:42:".len() + 16, "{value}");
        // Forged: no tag, a guessed tag, another id under the same tag, another topic.
        for forged in ["offline:42", "offline:42:0000000000000000", &value.replace(":42:", ":43:")] {
            assert_eq!(stored_id(&publish("t/a", Some(forged)), "offline"), None, "{forged}");
        }
        assert_eq!(stored_id(&publish("t/b", Some(&value)), "offline"), None, "the tag is the topic's");
    }

    /// RFC 4231, test case 2 (a key shorter than the block: zeros after it, as ours), its
    /// message in two parts as a tag's.
    #[test]
    fn the_tag_is_hmac_sha_256() {
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(b"Jefe");
        let mac = Keyed::new(key).mac(&[b"what do ya want", b" for nothing?"]);
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    fn wire_value(publish: &Publish) -> String {
        user_properties(publish).find(|(k, _)| *k == STORED_ID).map(|(_, v)| v.to_owned()).unwrap()
    }
}
