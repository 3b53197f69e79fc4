//! The broker events a rule can hang on. Its own module: rules, templates and placeholders all
//! name hookpoints, and none of them should need another to do so.

/// The broker events a rule can hang on, in the EMQX spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hookpoint {
    ClientConnected,
    ClientDisconnected,
    SessionSubscribed,
    SessionUnsubscribed,
    MessagePublish,
    MessageDelivered,
    MessageAcked,
}

impl Hookpoint {
    pub const ALL: [Hookpoint; 7] = [
        Hookpoint::ClientConnected,
        Hookpoint::ClientDisconnected,
        Hookpoint::SessionSubscribed,
        Hookpoint::SessionUnsubscribed,
        Hookpoint::MessagePublish,
        Hookpoint::MessageDelivered,
        Hookpoint::MessageAcked,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Hookpoint::ClientConnected => "client.connected",
            Hookpoint::ClientDisconnected => "client.disconnected",
            Hookpoint::SessionSubscribed => "session.subscribed",
            Hookpoint::SessionUnsubscribed => "session.unsubscribed",
            Hookpoint::MessagePublish => "message.publish",
            Hookpoint::MessageDelivered => "message.delivered",
            Hookpoint::MessageAcked => "message.acked",
        }
    }

    pub fn from_name(name: &str) -> Option<Hookpoint> {
        Hookpoint::ALL.into_iter().find(|h| h.name() == name)
    }
}
