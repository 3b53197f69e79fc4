//! Group commit: publishes from every client of the broker are handed to one extension's
//! `message-publish` in batches, so that one database round trip (and one commit) serves many
//! publishers. A batch closes when it is full or when its first message has waited the linger;
//! while one batch is being stored, the next fills up, so batches grow with the load by
//! themselves.

use std::sync::Arc;

use host_harness::Host;
use host_harness::bindings::{HookError, Message, PublishOutcome};
use tokio::sync::{mpsc, oneshot};
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
    while let Some(first) = requests.recv().await {
        let closes = Instant::now() + config.linger();
        let mut batch = vec![first];
        while batch.len() < config.max_messages {
            match requests.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => match tokio::time::timeout_at(closes, requests.recv()).await {
                    Ok(Some(next)) => batch.push(next),
                    _ => break,
                },
            }
        }
        let (messages, replies): (Vec<Message>, Vec<_>) = batch.into_iter().map(|p| (p.message, p.outcome)).unzip();
        let outcomes = match host.call("message-publish", async |i| i.message_publish(&messages).await).await {
            Ok(outcomes) if outcomes.len() == messages.len() => outcomes,
            Ok(outcomes) => {
                let why =
                    format!("message-publish returned {} outcomes for {} messages", outcomes.len(), messages.len());
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
}
