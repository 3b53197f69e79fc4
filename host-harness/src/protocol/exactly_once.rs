//! MQTT's exactly-once on the publish side, across reconnections. A QoS 2 PUBLISH whose PUBREL
//! has not come yet may be sent again with DUP set; within one connection rmqtt recognises its
//! packet id and does not publish it twice, but a client that reconnects sends it again on a new
//! connection, where rmqtt publishes it anew. So each extension remembers which QoS 2 messages it
//! stored, by (client id, packet id) and a digest of topic and payload, and a DUP resend that
//! matches gets the id it was stored under instead of a second row. (rmqtt lets the broker see no
//! PUBREL, so entries are not removed when the exchange completes: the newest [`REMEMBERED`] are
//! kept, far more than any client's in-flight window.)

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use crate::bindings::Message;

/// QoS 2 messages remembered per extension (the oldest are forgotten first).
pub const REMEMBERED: usize = 65_536;

/// Who sent a QoS 2 PUBLISH under which packet id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Sent {
    pub clientid: String,
    pub packet_id: u16,
}

#[derive(Default)]
pub struct StoredQos2 {
    memo: Mutex<Memo>,
}

#[derive(Default)]
struct Memo {
    /// (digest, stored id, sequence number of the entry).
    ids: HashMap<Sent, (u64, i64, u64)>,
    /// Entries oldest first, with their sequence numbers: a key stored again (a packet id
    /// reused after its exchange completed) has a newer number, and its old place is skipped.
    order: VecDeque<(Sent, u64)>,
    next: u64,
}

/// What identifies a message's content for a resend: its topic and payload.
pub fn digest(message: &Message) -> u64 {
    let mut hasher = DefaultHasher::new();
    message.topic.hash(&mut hasher);
    message.payload.hash(&mut hasher);
    hasher.finish()
}

impl StoredQos2 {
    /// The id a resend of `sent` with this content was stored under, if it was.
    pub fn stored(&self, sent: &Sent, digest: u64) -> Option<i64> {
        let memo = self.memo.lock().unwrap();
        memo.ids.get(sent).filter(|(d, _, _)| *d == digest).map(|(_, id, _)| *id)
    }

    /// Remembers that `sent` with this content was stored as `id`.
    pub fn remember(&self, sent: Sent, digest: u64, id: i64) {
        let mut memo = self.memo.lock().unwrap();
        let sequence = memo.next;
        memo.next += 1;
        memo.ids.insert(sent.clone(), (digest, id, sequence));
        memo.order.push_back((sent, sequence));
        while memo.order.len() > REMEMBERED {
            let (oldest, sequence) = memo.order.pop_front().expect("not empty");
            if memo.ids.get(&oldest).is_some_and(|(_, _, s)| *s == sequence) {
                memo.ids.remove(&oldest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(clientid: &str, packet_id: u16) -> Sent {
        Sent { clientid: clientid.into(), packet_id }
    }

    #[test]
    fn a_resend_with_the_same_content_finds_its_id_and_nothing_else_does() {
        let memo = StoredQos2::default();
        memo.remember(sent("c", 7), 42, 1000);
        assert_eq!(memo.stored(&sent("c", 7), 42), Some(1000));
        assert_eq!(memo.stored(&sent("c", 7), 43), None, "other content under a reused packet id");
        assert_eq!(memo.stored(&sent("d", 7), 42), None, "another client");
        memo.remember(sent("c", 7), 43, 1001);
        assert_eq!(memo.stored(&sent("c", 7), 43), Some(1001), "the packet id reused for a new message");
    }

    #[test]
    fn the_oldest_are_forgotten_first_and_a_reused_key_keeps_its_newest_entry() {
        let memo = StoredQos2::default();
        memo.remember(sent("c", 1), 1, 1);
        memo.remember(sent("c", 2), 2, 2);
        memo.remember(sent("c", 1), 3, 3);
        for i in 0..REMEMBERED - 1 {
            memo.remember(sent(&format!("x{i}"), 1), 0, 0);
        }
        // "c"/2 is the oldest still there; the first place of "c"/1 went without taking its newer entry.
        assert_eq!(memo.stored(&sent("c", 2), 2), None);
        assert_eq!(memo.stored(&sent("c", 1), 3), Some(3));
    }
}
