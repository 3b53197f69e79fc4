//! The `${name}` placeholders of the sql action: which hookpoint offers which, and their values.

use crate::bindings::broker::extension::sql::Value;
use crate::bindings::broker::extension::types::{Client, Message};
use crate::hookpoint::Hookpoint;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placeholder {
    /// The client the event is about; on message.publish, the publisher.
    Clientid,
    Username,
    Peerhost,
    /// The subscription filter (session hooks) or the message topic (message hooks).
    Topic,
    /// The subscription's QoS (session.subscribed) or the message's QoS.
    Qos,
    Msgid,
    Payload,
    Retain,
    /// When the broker received the message, in milliseconds since the Unix epoch.
    Timestamp,
    /// The stored id of the message, or NULL when it was not stored.
    Id,
    /// The broker node's name.
    Node,
}

use Placeholder::*;

const ALL: &[Placeholder] = &[Clientid, Username, Peerhost, Topic, Qos, Msgid, Payload, Retain, Timestamp, Id, Node];
const CLIENT: &[Placeholder] = &[Clientid, Username, Peerhost, Node];
const SUBSCRIBED: &[Placeholder] = &[Clientid, Username, Peerhost, Topic, Qos, Node];
const UNSUBSCRIBED: &[Placeholder] = &[Clientid, Username, Peerhost, Topic, Node];
const PUBLISH: &[Placeholder] = &[Clientid, Msgid, Topic, Payload, Qos, Retain, Timestamp, Id, Node];
const RECEIVED: &[Placeholder] =
    &[Clientid, Username, Peerhost, Msgid, Topic, Payload, Qos, Retain, Timestamp, Id, Node];

impl Placeholder {
    fn name(self) -> &'static str {
        match self {
            Clientid => "clientid",
            Username => "username",
            Peerhost => "peerhost",
            Topic => "topic",
            Qos => "qos",
            Msgid => "msgid",
            Payload => "payload",
            Retain => "retain",
            Timestamp => "timestamp",
            Id => "id",
            Node => "node",
        }
    }

    fn available_on(hookpoint: Hookpoint) -> &'static [Placeholder] {
        match hookpoint {
            Hookpoint::ClientConnected | Hookpoint::ClientDisconnected => CLIENT,
            Hookpoint::SessionSubscribed => SUBSCRIBED,
            Hookpoint::SessionUnsubscribed => UNSUBSCRIBED,
            Hookpoint::MessagePublish => PUBLISH,
            Hookpoint::MessageDelivered | Hookpoint::MessageAcked => RECEIVED,
        }
    }

    /// The placeholder `name` on `hookpoint`; an unknown or unavailable name is an error, never
    /// a silent NULL (the original's behaviour).
    pub fn parse(name: &str, hookpoint: Hookpoint) -> Result<Placeholder, String> {
        let available = Placeholder::available_on(hookpoint);
        let names = || available.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ");
        match ALL.iter().find(|p| p.name() == name) {
            Some(p) if available.contains(p) => Ok(*p),
            Some(_) => {
                Err(format!("placeholder ${{{name}}} is not available on {}; available: {}", hookpoint.name(), names()))
            }
            None => Err(format!("unknown placeholder ${{{name}}}; available on {}: {}", hookpoint.name(), names())),
        }
    }

    /// The value this placeholder binds for `event`. Configuration already checked that the
    /// hookpoint offers it, so a mismatch can only bind NULL.
    pub fn value(self, event: &Event<'_>) -> Value {
        let text = |s: &str| Value::Text(s.to_owned());
        let optional = |s: &Option<String>| s.as_deref().map_or(Value::Null, text);
        let client = match &event.subject {
            Subject::Client(client) | Subject::Subscription { client, .. } => Some(*client),
            Subject::Message { receiver, .. } => *receiver,
        };
        match (self, &event.subject) {
            (Node, _) => text(event.node),
            (Clientid, Subject::Message { receiver: None, message }) => text(&message.sender),
            (Clientid, _) => client.map_or(Value::Null, |c| text(&c.clientid)),
            (Username, _) => client.map_or(Value::Null, |c| optional(&c.username)),
            (Peerhost, _) => client.map_or(Value::Null, |c| optional(&c.peerhost)),
            (Topic, Subject::Subscription { filter, .. }) => text(filter),
            (Qos, Subject::Subscription { qos: Some(qos), .. }) => Value::Int32(i32::from(*qos)),
            (Topic, Subject::Message { message, .. }) => text(&message.topic),
            (Qos, Subject::Message { message, .. }) => Value::Int32(i32::from(message.qos)),
            (Msgid, Subject::Message { message, .. }) => text(&message.msgid),
            (Payload, Subject::Message { message, .. }) => Value::Bytes(message.payload.clone()),
            (Retain, Subject::Message { message, .. }) => Value::Boolean(message.retain),
            (Timestamp, Subject::Message { message, .. }) => Value::Int64(message.timestamp),
            (Id, Subject::Message { message, .. }) => message.id.map_or(Value::Null, Value::Int64),
            _ => Value::Null,
        }
    }
}

/// What a hook is about, and the broker node it runs on: all that placeholders bind.
pub struct Event<'a> {
    pub node: &'a str,
    pub subject: Subject<'a>,
}

/// What a hook is about, as far as placeholders are concerned.
pub enum Subject<'a> {
    Client(&'a Client),
    Subscription {
        client: &'a Client,
        filter: &'a str,
        qos: Option<u8>,
    },
    /// `receiver` is the subscriber on message.delivered/acked, `None` on message.publish.
    Message {
        receiver: Option<&'a Client>,
        message: &'a Message,
    },
}
