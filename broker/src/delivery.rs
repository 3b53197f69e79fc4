//! What the broker keeps per connected client so that stored messages reach it once, in order,
//! and acks never move a read position past an unread message:
//!
//! - **Backlogs.** After a SUBSCRIBE, the backlog the extension returns is forwarded to the
//!   client page by page, each page once the previous one has left the broker. Until the whole
//!   backlog has gone out, live stored messages for that subscription are held back; they follow
//!   the backlog, minus those the backlog already sent. Pages run in id order over every
//!   matching message from the read position on, so a held message whose id lies between the
//!   lowest and the highest id the pages sent was sent; one below (the position had passed it,
//!   e.g. `first_fetch: latest`) or above (committed after the last page) was not. A live
//!   message that arrives after the backlog but lies in that range is a duplicate and is dropped.
//! - **The ack gate.** An ack moves a read position to the acked message. Clients may ack out of
//!   order, and live messages from different publishers may arrive out of id order, so an ack is
//!   passed on only when no lower stored id delivered to that client is still unacked: what a
//!   client acks past an unacked message waits for it.
//!
//! One [`Deliveries`] per extension: ids are the extension's own.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use host_harness::bindings::Message;
use rmqtt::types::Publish;
use tokio::sync::Notify;

/// A client connection: its client id and when rmqtt created it (a reconnection is another).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub clientid: String,
    pub since: i64,
}

#[derive(Default)]
pub struct Deliveries {
    clients: Mutex<HashMap<String, ClientState>>,
}

struct ClientState {
    since: i64,
    /// Subscriptions whose backlog is still going out, by filter.
    backlogs: HashMap<String, Backlog>,
    /// Subscriptions whose backlog has gone out: the range of ids its pages sent.
    sent: HashMap<String, (i64, i64)>,
    /// Messages this extension forwarded to the session that have not left the broker yet.
    queued: usize,
    /// Woken when `queued` drops or the client goes away.
    progress: Arc<Notify>,
    /// Stored ids delivered with QoS 1 or 2 and not acked yet.
    unacked: BTreeSet<i64>,
    /// Acked, but waiting for a lower unacked id.
    acked: BTreeMap<i64, Message>,
    /// Filters whose backlog could not be fetched: their acks are not passed on during this
    /// connection, so that the positions stay before the unread messages.
    stalled: Vec<String>,
}

#[derive(Default)]
struct Backlog {
    /// The lowest and highest stored ids the pages sent.
    sent: Option<(i64, i64)>,
    /// Live stored messages held back meanwhile.
    held: Vec<(i64, Publish)>,
}

fn within(range: Option<(i64, i64)>, id: i64) -> bool {
    range.is_some_and(|(low, high)| (low..=high).contains(&id))
}

/// Messages forwarded to a session at a time (a slice of a page, or of the held-back ones), well
/// below rmqtt's per-session queue (1000 by default), which drops messages when full.
pub const FORWARD_AT_ONCE: usize = 100;

/// What is left to do when a backlog's last page has gone out.
pub enum BacklogEnd {
    /// Live messages were held back meanwhile: forward these (the lowest ids, in order), wait for
    /// them to go out, and ask again.
    Release(Vec<Publish>),
    /// The subscription is live now.
    Live,
}

impl Deliveries {
    pub fn connected(&self, connection: &Connection) {
        let state = ClientState {
            since: connection.since,
            backlogs: HashMap::new(),
            sent: HashMap::new(),
            queued: 0,
            progress: Arc::new(Notify::new()),
            unacked: BTreeSet::new(),
            acked: BTreeMap::new(),
            stalled: Vec::new(),
        };
        if let Some(old) = self.clients.lock().unwrap().insert(connection.clientid.clone(), state) {
            old.progress.notify_waiters();
        }
    }

    pub fn disconnected(&self, connection: &Connection) {
        let mut clients = self.clients.lock().unwrap();
        if clients.get(&connection.clientid).is_some_and(|s| s.since == connection.since) {
            let state = clients.remove(&connection.clientid).expect("present");
            state.progress.notify_waiters();
        }
    }

    /// Runs `f` on the state of `connection`, if it is still the client's current connection.
    fn with<T>(&self, connection: &Connection, f: impl FnOnce(&mut ClientState) -> T) -> Option<T> {
        let mut clients = self.clients.lock().unwrap();
        clients.get_mut(&connection.clientid).filter(|s| s.since == connection.since).map(f)
    }

    /// A backlog starts for `filter`: live stored messages for it are held back from now on. A
    /// repeated SUBSCRIBE while a backlog is going out keeps what is held so far.
    pub fn backlog_started(&self, connection: &Connection, filter: &str) {
        self.with(connection, |s| {
            s.backlogs.entry(filter.to_owned()).or_default();
        });
    }

    /// The subscription went away: nothing more of its backlog is sent, nothing held back.
    pub fn unsubscribed(&self, connection: &Connection, filter: &str) {
        self.with(connection, |s| {
            s.backlogs.remove(filter);
            s.sent.remove(filter);
        });
    }

    /// `count` messages were forwarded; `ids` are the stored ids among them that a page sent.
    /// Returns false when the backlog is no longer wanted (client gone, unsubscribed).
    pub fn page_forwarded(
        &self,
        connection: &Connection,
        filter: &str,
        count: usize,
        ids: impl Iterator<Item = i64>,
    ) -> bool {
        self.with(connection, |s| {
            let Some(backlog) = s.backlogs.get_mut(filter) else { return false };
            for id in ids {
                backlog.sent = Some(backlog.sent.map_or((id, id), |(low, high)| (low.min(id), high.max(id))));
            }
            s.queued += count;
            true
        })
        .unwrap_or(false)
    }

    /// Waits until everything forwarded has left the broker. False if the client went away.
    pub async fn sent(&self, connection: &Connection) -> bool {
        loop {
            let Some((queued, progress)) = self.with(connection, |s| (s.queued, s.progress.clone())) else {
                return false;
            };
            if queued == 0 {
                return true;
            }
            // The timeout covers a wake-up sent between the check and the wait.
            let _ = tokio::time::timeout(Duration::from_millis(50), progress.notified()).await;
        }
    }

    /// The last page of `filter`'s backlog has gone out. Either held-back messages are left to
    /// release, or the subscription goes live, atomically with respect to [`Deliveries::hold`].
    pub fn backlog_end(&self, connection: &Connection, filter: &str) -> Option<BacklogEnd> {
        self.with(connection, |s| {
            let backlog = s.backlogs.get_mut(filter)?;
            let mut held = std::mem::take(&mut backlog.held);
            held.retain(|(id, _)| !within(backlog.sent, *id));
            if held.is_empty() {
                if let Some(sent) = backlog.sent {
                    s.sent.insert(filter.to_owned(), sent);
                }
                s.backlogs.remove(filter);
                return Some(BacklogEnd::Live);
            }
            held.sort_by_key(|(id, _)| *id);
            held.dedup_by_key(|(id, _)| *id);
            // The rest waits for the next call: the session's queue is bounded.
            backlog.held = held.split_off(held.len().min(FORWARD_AT_ONCE));
            Some(BacklogEnd::Release(held.into_iter().map(|(_, p)| p).collect()))
        })
        .flatten()
    }

    /// The backlog of `filter` could not be fetched: the subscription goes live, but acks of
    /// what it matches are kept back until the client reconnects.
    pub fn backlog_failed(&self, connection: &Connection, filter: &str) {
        self.with(connection, |s| {
            s.backlogs.remove(filter);
            s.stalled.push(filter.to_owned());
        });
    }

    /// A live message stored as `id` is about to go to the client. Returns true when it must not
    /// go now: a backlog it belongs to is still going out (it is held back, to follow), or a
    /// backlog already sent it (a duplicate).
    pub fn hold(&self, connection: &Connection, id: i64, publish: &Publish) -> bool {
        self.with(connection, |s| {
            let topic = &publish.topic;
            if let Some((_, backlog)) = s.backlogs.iter_mut().find(|(filter, _)| mqtt_topic::matches(filter, topic)) {
                backlog.held.push((id, publish.clone()));
                return true;
            }
            s.sent.iter().any(|(filter, sent)| mqtt_topic::matches(filter, topic) && within(Some(*sent), id))
        })
        .unwrap_or(false)
    }

    /// A message this extension forwarded left the broker (or was dropped).
    pub fn forwarded_gone(&self, connection: &Connection) {
        self.with(connection, |s| {
            s.queued = s.queued.saturating_sub(1);
            s.progress.notify_waiters();
        });
    }

    /// A stored message went to the client with QoS 1 or 2 (or was lost on the way): no ack
    /// passes it until it is acked.
    pub fn awaiting_ack(&self, connection: &Connection, id: i64) {
        self.with(connection, |s| s.unacked.insert(id));
    }

    /// The client acked `message` (stored as `id`). Returns the acks to pass on: for each topic,
    /// the highest acked id below every unacked one.
    pub fn acked(&self, connection: &Connection, id: i64, message: Message) -> Vec<Message> {
        self.with(connection, |s| {
            s.unacked.remove(&id);
            s.acked.insert(id, message);
            let floor = s.unacked.first().copied().unwrap_or(i64::MAX);
            let rest = s.acked.split_off(&floor);
            let passable = std::mem::replace(&mut s.acked, rest);
            let mut by_topic: HashMap<String, Message> = HashMap::new();
            for (_, message) in passable {
                if s.stalled.iter().any(|filter| mqtt_topic::matches(filter, &message.topic)) {
                    continue;
                }
                by_topic.insert(message.topic.clone(), message);
            }
            by_topic.into_values().collect()
        })
        .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message;

    fn stored(id: i64, topic: &str) -> Message {
        Message {
            id: Some(id),
            msgid: String::new(),
            sender: "p".into(),
            topic: topic.into(),
            payload: id.to_string().into_bytes(),
            qos: 1,
            retain: false,
            timestamp: 0,
            properties: vec![],
        }
    }

    fn client() -> (Deliveries, Connection) {
        let deliveries = Deliveries::default();
        let connection = Connection { clientid: "c".into(), since: 1 };
        deliveries.connected(&connection);
        (deliveries, connection)
    }

    #[test]
    fn held_messages_are_released_in_id_order_in_slices_without_what_the_backlog_sent() {
        let (deliveries, connection) = client();
        deliveries.backlog_started(&connection, "t/#");
        // The pages sent ids 5 to 10; the position had passed 1 to 4.
        assert!(deliveries.page_forwarded(&connection, "t/#", 6, 5..=10));
        // Live messages arrive out of order, some of them already in the backlog.
        for id in (1..=260).rev() {
            assert!(deliveries.hold(&connection, id, &message::to_publish(&stored(id, "t/a"), 1, "x")));
        }
        assert!(!deliveries.hold(&connection, 999, &message::to_publish(&stored(999, "other"), 1, "x")));
        let mut released = Vec::new();
        loop {
            match deliveries.backlog_end(&connection, "t/#").unwrap() {
                BacklogEnd::Release(slice) => {
                    assert!(slice.len() <= FORWARD_AT_ONCE);
                    released.extend(slice.iter().map(|p| message::stored_id(p, "x").unwrap()));
                }
                BacklogEnd::Live => break,
            }
        }
        let expected: Vec<i64> = (1..=4).chain(11..=260).collect();
        assert_eq!(released, expected, "all but what the pages sent, in order");
        assert!(!deliveries.hold(&connection, 261, &message::to_publish(&stored(261, "t/a"), 1, "x")), "live now");
        assert!(deliveries.hold(&connection, 7, &message::to_publish(&stored(7, "t/a"), 1, "x")), "a duplicate");
        assert!(!deliveries.hold(&connection, 3, &message::to_publish(&stored(3, "t/a"), 1, "x")), "not one");
    }

    #[test]
    fn an_ack_waits_for_every_lower_unacked_id_and_then_passes_the_highest_per_topic() {
        let (deliveries, connection) = client();
        for id in [1, 2, 3, 4] {
            deliveries.awaiting_ack(&connection, id);
        }
        let ids = |acked: Vec<Message>| {
            let mut ids: Vec<i64> = acked.iter().map(|m| m.id.unwrap()).collect();
            ids.sort();
            ids
        };
        assert_eq!(ids(deliveries.acked(&connection, 3, stored(3, "a"))), Vec::<i64>::new(), "1 is unacked");
        assert_eq!(ids(deliveries.acked(&connection, 2, stored(2, "b"))), Vec::<i64>::new());
        assert_eq!(ids(deliveries.acked(&connection, 1, stored(1, "a"))), [2, 3], "per topic, the highest");
        assert_eq!(ids(deliveries.acked(&connection, 4, stored(4, "a"))), [4]);
    }

    #[test]
    fn a_backlog_that_failed_keeps_the_acks_of_its_filter() {
        let (deliveries, connection) = client();
        deliveries.backlog_started(&connection, "t/#");
        deliveries.backlog_failed(&connection, "t/#");
        deliveries.awaiting_ack(&connection, 7);
        assert!(deliveries.acked(&connection, 7, stored(7, "t/a")).is_empty());
        deliveries.awaiting_ack(&connection, 8);
        assert_eq!(deliveries.acked(&connection, 8, stored(8, "u")).len(), 1, "other filters go on");
    }
}
