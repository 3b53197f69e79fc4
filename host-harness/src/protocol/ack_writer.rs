//! Acks are written in the background, coalesced: while one round of `message-acked` calls runs,
//! newer acks of the same client and subscription replace older ones (a read position only moves
//! forward, so the newest says all). A subscriber acking every message then costs a few position
//! updates per round instead of one durable UPDATE per message. What reaches this writer has
//! passed the ack gates of `delivery`: each ack names the filters whose positions it may move.
//!
//! A shared subscription's acks are not coalesced: its group's position records each one (the
//! group's members ack out of order), so each is written.
//!
//! The price is the usual one of at-least-once: a broker that dies with acks not yet written
//! delivers those messages again. A client's pending acks are written before its next
//! subscription fetches, so a reconnecting client does not see them again; a share group's, before
//! any member's fetch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::Host;
use crate::bindings::{Client, Message};
use tokio::sync::Notify;

/// `message-acked` calls made at once in a round.
const AT_ONCE: usize = 16;

/// One `message-acked` call: the client, the message, the filters whose positions move to it.
type Ack = (Client, Message, Vec<String>);

/// What a pending ack is kept under: client id, filter, and for a shared subscription the id.
type Pending = (String, String, Option<i64>);

pub struct AckWriter {
    host: Arc<Host>,
    /// The newest ack per (client id, subscription filter), and every ack of a shared one.
    pending: Mutex<HashMap<Pending, (Client, Message)>>,
    wake: Notify,
    /// Held while a round is written, so that a flush waits for acks already taken.
    writing: tokio::sync::Mutex<()>,
}

impl AckWriter {
    pub fn start(host: Arc<Host>) -> Arc<AckWriter> {
        let writer = Arc::new(AckWriter {
            host,
            pending: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            writing: tokio::sync::Mutex::new(()),
        });
        let worker = writer.clone();
        tokio::spawn(async move {
            loop {
                worker.wake.notified().await;
                while worker.write_pending(|_, _| true).await {}
            }
        });
        writer
    }

    /// Queues an ack that may move the positions of `filters`; a newer one of the same client
    /// and filter replaces an older one.
    pub fn push(&self, client: Client, message: Message, filters: Vec<String>) {
        let mut pending = self.pending.lock().unwrap();
        for filter in filters {
            let each = mqtt_topic::shared(&filter).is_some().then_some(message.id).flatten();
            let key = (client.clientid.clone(), filter, each);
            if pending.get(&key).is_none_or(|(_, queued)| queued.id < message.id) {
                pending.insert(key, (client.clone(), message.clone()));
            }
        }
        drop(pending);
        self.wake.notify_one();
    }

    /// Acks waiting to be written (a gauge for `/metrics`).
    pub fn pending(&self) -> usize {
        self.pending.lock().unwrap().len()
    }

    /// Writes now (after the round being written, if any) the acks a fetch of `filter` by
    /// `clientid` must find written: the client's own, and for a shared subscription those of
    /// every member of the group.
    pub async fn flush(&self, clientid: &str, filter: &str) {
        let shared = mqtt_topic::shared(filter).is_some();
        self.write_pending(|c, f| c == clientid || (shared && f == filter)).await;
    }

    /// Writes everything pending that `which` selects (by client id and filter); false if
    /// there was nothing.
    async fn write_pending(&self, which: impl Fn(&str, &str) -> bool) -> bool {
        let _writing = self.writing.lock().await;
        let taken: Vec<(Pending, (Client, Message))> = {
            let mut pending = self.pending.lock().unwrap();
            let keys: Vec<_> = pending.keys().filter(|(c, f, _)| which(c, f)).cloned().collect();
            keys.into_iter().filter_map(|k| pending.remove_entry(&k)).collect()
        };
        if taken.is_empty() {
            return false;
        }
        // One call per (client, message): its filters together.
        let mut round: HashMap<(String, Option<i64>), Ack> = HashMap::new();
        for ((clientid, filter, _), (client, message)) in taken {
            round.entry((clientid, message.id)).or_insert_with(|| (client, message, Vec::new())).2.push(filter);
        }
        self.write(round.into_values().collect()).await;
        true
    }

    async fn write(&self, round: Vec<Ack>) {
        for slice in round.chunks(AT_ONCE) {
            let calls = slice.iter().map(|(client, message, filters)| async move {
                let call = async |i: &mut crate::Instance| i.message_acked(client, message, filters).await;
                self.host.call_or_log(call).await;
            });
            futures::future::join_all(calls).await;
        }
    }

    /// Writes every pending ack now (a shutdown).
    pub async fn flush_all(&self) {
        while self.write_pending(|_, _| true).await {}
    }
}
