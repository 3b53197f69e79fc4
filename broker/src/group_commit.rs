//! Group commit: publishes from every client of the broker are handed to one extension's
//! `message-publish` in batches, so that one database round trip (and one commit) serves many
//! publishers. While one batch is being stored, the next fills up, so batches grow with the load
//! by themselves; a batch closes when it is full, or when nothing more is queued (after the
//! linger, if one is set: tokio's timers tick in milliseconds, so a linger costs at least one).
//! Up to `in_flight` batches are stored at once: one waits for the commit-order lock while the
//! one before it commits, which hides a round trip. Each publisher's messages stay in order, as
//! rmqtt hands a session's next publish over only once the previous one was answered.

use std::sync::Arc;

use host_harness::Host;
use host_harness::bindings::{HookError, Message, PublishOutcome};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use crate::config::BatchConfig;

/// One extension's publish queue.
#[derive(Clone)]
pub struct GroupCommit {
    queue: mpsc::UnboundedSender<Pending>,
}

struct Pending {
    message: Message,
    outcome: oneshot::Sender<PublishOutcome>,
}

impl GroupCommit {
    /// Starts the task that stores batches through `host`.
    pub fn start(host: Arc<Host>, config: BatchConfig) -> GroupCommit {
        let (queue, requests) = mpsc::unbounded_channel();
        tokio::spawn(store_batches(host, config, requests));
        GroupCommit { queue }
    }

    /// Stores `message` with the next batch and returns what became of it. A batch that could
    /// not be stored at all (the guest trapped) fails each of its messages.
    pub async fn store(&self, message: Message) -> PublishOutcome {
        let (outcome, receiver) = oneshot::channel();
        if self.queue.send(Pending { message, outcome }).is_err() {
            return failed("the publish queue is closed");
        }
        receiver.await.unwrap_or_else(|_| failed("the publish queue dropped the message"))
    }
}

fn failed(why: &str) -> PublishOutcome {
    PublishOutcome::Failed(HookError::Invalid(why.to_owned()))
}

async fn store_batches(host: Arc<Host>, config: BatchConfig, mut requests: mpsc::UnboundedReceiver<Pending>) {
    let in_flight = Arc::new(Semaphore::new(config.in_flight.max(1)));
    loop {
        // A batch starts forming only when it could be stored at once: until then, messages queue.
        let permit = in_flight.clone().acquire_owned().await.expect("the semaphore is never closed");
        let Some(first) = requests.recv().await else { return };
        let closes = Instant::now() + config.linger();
        let mut batch = vec![first];
        while batch.len() < config.max_messages {
            match requests.try_recv() {
                Ok(next) => batch.push(next),
                // No linger: no timer either (tokio's wait at least a millisecond).
                Err(_) if config.linger_us == 0 => break,
                Err(_) => match tokio::time::timeout_at(closes, requests.recv()).await {
                    Ok(Some(next)) => batch.push(next),
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
    let result = host.call("message-publish", async |i| i.message_publish(&messages).await).await;
    tracing::debug!(messages = messages.len(), micros = started.elapsed().as_micros() as u64, "batch stored");
    let outcomes = match result {
        Ok(outcomes) if outcomes.len() == messages.len() => outcomes,
        Ok(outcomes) => {
            let why = format!("message-publish returned {} outcomes for {} messages", outcomes.len(), messages.len());
            tracing::error!("{why}");
            messages.iter().map(|_| failed(&why)).collect()
        }
        Err(e) => messages.iter().map(|_| failed(&format!("the extension trapped: {e:#}"))).collect(),
    };
    for (reply, outcome) in replies.into_iter().zip(outcomes) {
        // A publisher that went away no longer waits for its answer.
        let _ = reply.send(outcome);
    }
}
