//! Group commit: publishes from every client of the broker are handed to one extension's
//! `message-publish` in batches, so that one database round trip (and one commit) serves many
//! publishers. While one batch is being stored, the next fills up, so batches grow with the load
//! by themselves; a batch closes when it is full, or when nothing more is queued (after the
//! linger, if one is set: tokio's timers tick in milliseconds, so a linger costs at least one).
//! Up to `in_flight` batches are stored at once: one waits for the commit-order lock while the
//! one before it commits, which hides a round trip. Each publisher's messages stay in order, as
//! rmqtt hands a session's next publish over only once the previous one was answered.
//!
//! A batch is bounded in payload bytes too (the guest holds it in its memory). Each message's
//! outcome is its own: the guest refuses a failing message alone, and a batch on which the guest
//! trapped is stored again one message at a time, so that one message that traps the guest
//! refuses nobody else's.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::Host;
use crate::bindings::{HookError, Message, PublishOutcome};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

/// How batches form.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// A batch closes when it holds this many messages...
    pub max_messages: usize,
    /// ...or this many bytes of payload (it always takes one message)...
    pub max_bytes: usize,
    /// ...or when nothing more is queued; with a linger, this long after its first message.
    pub linger: Duration,
    /// Batches being stored at once.
    pub in_flight: usize,
}

/// One extension's publish queue.
#[derive(Clone)]
pub struct GroupCommit {
    queue: mpsc::UnboundedSender<Pending>,
    /// Messages handed over and not answered yet.
    unanswered: Arc<AtomicUsize>,
}

struct Pending {
    message: Message,
    outcome: oneshot::Sender<PublishOutcome>,
}

impl GroupCommit {
    /// Starts the task that stores batches through `host`.
    pub fn start(host: Arc<Host>, batching: Batching) -> GroupCommit {
        let (queue, requests) = mpsc::unbounded_channel();
        tokio::spawn(store_batches(host, batching, requests));
        GroupCommit { queue, unanswered: Arc::new(AtomicUsize::new(0)) }
    }

    /// Waits until every message handed over has its answer (at most `patience`); true if so.
    pub async fn drained(&self, patience: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + patience;
        while self.unanswered.load(Ordering::SeqCst) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Stores `message` with the next batch and returns what became of it. A batch that could
    /// not be stored at all (the guest trapped) fails each of its messages.
    pub async fn store(&self, message: Message) -> PublishOutcome {
        let (outcome, receiver) = oneshot::channel();
        self.unanswered.fetch_add(1, Ordering::SeqCst);
        let answer = match self.queue.send(Pending { message, outcome }) {
            Ok(()) => receiver.await.unwrap_or_else(|_| failed("the publish queue dropped the message")),
            Err(_) => failed("the publish queue is closed"),
        };
        self.unanswered.fetch_sub(1, Ordering::SeqCst);
        answer
    }
}

fn failed(why: &str) -> PublishOutcome {
    PublishOutcome::Failed(HookError::Invalid(why.to_owned()))
}

async fn store_batches(host: Arc<Host>, batching: Batching, mut requests: mpsc::UnboundedReceiver<Pending>) {
    let in_flight = Arc::new(Semaphore::new(batching.in_flight.max(1)));
    loop {
        // A batch starts forming only when it could be stored at once: until then, messages queue.
        let permit = in_flight.clone().acquire_owned().await.expect("the semaphore is never closed");
        let Some(first) = requests.recv().await else { return };
        let closes = Instant::now() + batching.linger;
        let mut bytes = first.message.payload.len();
        let mut batch = vec![first];
        while batch.len() < batching.max_messages && bytes < batching.max_bytes {
            match requests.try_recv() {
                Ok(next) => {
                    bytes += next.message.payload.len();
                    batch.push(next)
                }
                // No linger: no timer either (tokio's wait at least a millisecond).
                Err(_) if batching.linger.is_zero() => break,
                Err(_) => match tokio::time::timeout_at(closes, requests.recv()).await {
                    Ok(Some(next)) => {
                        bytes += next.message.payload.len();
                        batch.push(next)
                    }
                    _ => break,
                },
            }
        }
        let host = host.clone();
        tokio::spawn(async move {
            store(&host, batch).await;
            drop(permit);
        });
    }
}

async fn store(host: &Host, batch: Vec<Pending>) {
    let (messages, replies): (Vec<Message>, Vec<_>) = batch.into_iter().map(|p| (p.message, p.outcome)).unzip();
    let started = std::time::Instant::now();
    let mut outcomes = call(host, &messages).await;
    tracing::debug!(messages = messages.len(), micros = started.elapsed().as_micros() as u64, "batch stored");
    if messages.len() > 1 && outcomes.is_err() {
        // The guest trapped on the batch (and lost its instance): nothing of it was stored. Each
        // message alone, so that the one that traps refuses only itself.
        let mut alone = Vec::with_capacity(messages.len());
        for message in &messages {
            alone.push(
                call(host, std::slice::from_ref(message)).await.map_or_else(|why| failed(&why), |mut o| o.remove(0)),
            );
        }
        outcomes = Ok(alone);
    }
    let outcomes = outcomes.unwrap_or_else(|why| messages.iter().map(|_| failed(&why)).collect());
    for (reply, outcome) in replies.into_iter().zip(outcomes) {
        // A publisher that went away no longer waits for its answer.
        let _ = reply.send(outcome);
    }
}

/// One `message-publish` call: an outcome per message, or why there is none (a trap).
async fn call(host: &Host, messages: &[Message]) -> Result<Vec<PublishOutcome>, String> {
    match host.call(async |i| i.message_publish(messages).await).await {
        Ok(outcomes) if outcomes.len() == messages.len() => Ok(outcomes),
        Ok(outcomes) => {
            let why = format!("message-publish returned {} outcomes for {} messages", outcomes.len(), messages.len());
            tracing::error!("{why}");
            Ok(messages.iter().map(|_| failed(&why)).collect())
        }
        Err(e) => Err(format!("the extension trapped: {e:#}")),
    }
}
