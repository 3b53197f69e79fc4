//! Acks are written in the background, coalesced: while one round of `message-acked` calls runs,
//! newer acks of the same client and topic replace older ones (a read position only moves
//! forward, so the newest says all). A subscriber acking every message then costs a few position
//! updates per round instead of one durable UPDATE per message.
//!
//! The price is the usual one of at-least-once: a broker that dies with acks not yet written
//! delivers those messages again. A client's pending acks are written before its next
//! subscription fetches, so a reconnecting client does not see them again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use host_harness::Host;
use host_harness::bindings::{Client, Describe, Message};
use tokio::sync::Notify;

/// `message-acked` calls made at once in a round.
const AT_ONCE: usize = 16;

pub struct AckWriter {
    host: Arc<Host>,
    extension: String,
    /// The newest ack per (client id, topic).
    pending: Mutex<HashMap<(String, String), (Client, Message)>>,
    wake: Notify,
    /// Held while a round is written, so that a flush waits for acks already taken.
    writing: tokio::sync::Mutex<()>,
}

impl AckWriter {
    pub fn start(host: Arc<Host>, extension: String) -> Arc<AckWriter> {
        let writer = Arc::new(AckWriter {
            host,
            extension,
            pending: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            writing: tokio::sync::Mutex::new(()),
        });
        let worker = writer.clone();
        tokio::spawn(async move {
            loop {
                worker.wake.notified().await;
                loop {
                    let _writing = worker.writing.lock().await;
                    let round: Vec<_> = worker.pending.lock().unwrap().drain().map(|(_, ack)| ack).collect();
                    if round.is_empty() {
                        break;
                    }
                    worker.write(round).await;
                }
            }
        });
        writer
    }

    /// Queues an ack; a newer one of the same client and topic replaces an older one.
    pub fn push(&self, client: Client, message: Message) {
        let key = (client.clientid.clone(), message.topic.clone());
        let mut pending = self.pending.lock().unwrap();
        let newer = pending.get(&key).is_none_or(|(_, queued)| queued.id < message.id);
        if newer {
            pending.insert(key, (client, message));
        }
        drop(pending);
        self.wake.notify_one();
    }

    /// Writes `clientid`'s pending acks now (after the round being written, if any).
    pub async fn flush(&self, clientid: &str) {
        let _writing = self.writing.lock().await;
        let round: Vec<_> = {
            let mut pending = self.pending.lock().unwrap();
            let keys: Vec<_> = pending.keys().filter(|(c, _)| c == clientid).cloned().collect();
            keys.iter().filter_map(|k| pending.remove(k)).collect()
        };
        self.write(round).await;
    }

    async fn write(&self, round: Vec<(Client, Message)>) {
        for slice in round.chunks(AT_ONCE) {
            let calls = slice.iter().map(|(client, message)| async move {
                match self.host.call("message-acked", async |i| i.message_acked(client, message).await).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(extension = self.extension, "message-acked: {}", e.describe()),
                    Err(e) => tracing::error!(extension = self.extension, "message-acked: {e:#}"),
                }
            });
            futures::future::join_all(calls).await;
        }
    }
}
