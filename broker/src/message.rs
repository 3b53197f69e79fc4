//! Between rmqtt's types and the contract's: clients, messages, subscriptions. A message's wire
//! side (its stored ids, its properties) is `host_harness::wire`'s, which rmqtt's `Publish`
//! wraps.

use host_harness::bindings::{Client, Message, Subscription};
use host_harness::protocol::delivery::Held;
use host_harness::wire;
use rmqtt::codec::v5::PublishProperties;
use rmqtt::types::{Id, Publish, SharedGroup, Subscribe};

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
    fn qos(&self) -> u8 {
        self.0.qos.value()
    }
}

pub fn client(id: &Id) -> Client {
    Client {
        clientid: id.client_id.to_string(),
        username: id.username.as_ref().map(|u| u.to_string()),
        peerhost: id.remote_addr.map(|a| a.ip().to_string()),
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

/// Removes the broker's own properties from a publisher's message: a publisher cannot forge them.
pub fn strip_own_properties(publish: &mut Publish) {
    wire::strip_stored_ids(publish);
    if let Some(properties) = publish.properties.as_mut() {
        properties.user_properties.retain(|(key, _)| key != STORE_FAILED);
    }
}

pub fn set_flag(publish: &mut Publish, flag: &str) {
    let properties = publish.properties.get_or_insert_with(PublishProperties::default);
    properties.user_properties.push((flag.into(), "1".into()));
}

pub fn has_flag(publish: &Publish, flag: &str) -> bool {
    wire::user_properties(publish).any(|(key, _)| key == flag)
}

/// The contract's view of `publish` as `sender` published it; `id` is what an extension stored
/// it as.
pub fn to_message(publish: &Publish, sender: &str, id: Option<i64>) -> Message {
    wire::to_message(publish, sender, id, publish.create_time.unwrap_or_else(wire::now_millis))
}

/// Whether `publish` ran out of time on its way to a client, as the broker's own expiry check
/// counts (MQTT 5 message expiry interval, from when the broker created it; the broker gives
/// none to a message published without one).
pub fn expired(publish: &Publish) -> bool {
    let interval = publish.properties.as_ref().and_then(|p| p.message_expiry_interval);
    match (interval, publish.create_time) {
        (Some(seconds), Some(created)) => wire::now_millis() - created >= i64::from(seconds.get()) * 1000,
        _ => false,
    }
}

/// A stored message to deliver at `qos`, carrying the id `extension` gave it.
pub fn to_publish(message: Message, qos: u8, extension: &str) -> Publish {
    // Created now: the broker's own expiry check counts from here; the extension has already
    // shortened message-expiry-interval by the time the message spent stored.
    Publish::new(Box::new(wire::to_publish(message, qos, extension)), None, None, Some(wire::now_millis()))
}
