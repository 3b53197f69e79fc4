//! Group commit: publishes from every client of the broker are handed to one extension's
//! `message-publish` in batches, so that one database round trip (and one commit) serves many
//! publishers. While one batch is being stored, the next fills up, so batches grow with the load
//! by themselves; a batch closes when it is full, or when nothing more is queued (after the
//! linger, if one is set: tokio's timers tick in milliseconds, so a linger costs at least one).
//! Up to `in_flight` batches are stored at once: one waits for the commit-order lock while the
//! one before it commits, which hides a round trip. A batch formed while another is being stored
//! fills until it is as large as that one, or that one is stored. Each publisher's messages stay
//! in order, as rmqtt hands a session's next publish over only once the previous one was answered.
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
use tokio::task::JoinHandle;
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
        let store = move |batch| {
            let host = host.clone();
            async move { store(&host, batch).await }
        };
        tokio::spawn(store_batches(batching, requests, store));
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

/// Forms batches of what `requests` brings, and has `store` store each on a task of its own.
async fn store_batches<S, F>(batching: Batching, mut requests: mpsc::UnboundedReceiver<Pending>, store: S)
where
    S: Fn(Vec<Pending>) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let in_flight = Arc::new(Semaphore::new(batching.in_flight.max(1)));
    // The batch sent last, while it is being stored: its size, and its end.
    let mut ahead: Option<(usize, JoinHandle<()>)> = None;
    loop {
        // A batch starts forming only when it could be stored at once: until then, messages queue.
        let permit = in_flight.clone().acquire_owned().await.expect("the semaphore is never closed");
        let Some(first) = requests.recv().await else { return };
        if ahead.as_ref().is_some_and(|(_, end)| end.is_finished()) {
            ahead = None;
        }
        let closes = Instant::now() + batching.linger;
        let mut bytes = first.message.payload.len();
        let mut batch = vec![first];
        while batch.len() < batching.max_messages && bytes < batching.max_bytes {
            let next = match requests.try_recv() {
                Ok(next) => next,
                // Behind a batch still being stored, this one would only wait for the
                // commit-order lock: it goes on filling until it is as large as that one, or
                // that one is stored. Sent at once, it split the queue into small batches, each
                // costing a transaction (BENCHMARKS.md section 4); sent only once that one is
                // stored (`in_flight = 1`), it waits a round trip more.
                Err(_) if ahead.as_ref().is_some_and(|(size, _)| batch.len() < *size) => {
                    let (_, end) = ahead.as_mut().expect("a batch ahead");
                    tokio::select! {
                        next = requests.recv() => match next {
                            Some(next) => next,
                            None => break,
                        },
                        _ = end => {
                            ahead = None;
                            continue;
                        }
                    }
                }
                // No linger: no timer either (tokio's wait at least a millisecond).
                Err(_) if batching.linger.is_zero() => break,
                Err(_) => match tokio::time::timeout_at(closes, requests.recv()).await {
                    Ok(Some(next)) => next,
                    _ => break,
                },
            };
            bytes += next.message.payload.len();
            batch.push(next);
        }
        let size = batch.len();
        let stored = store(batch);
        let end = tokio::spawn(async move {
            stored.await;
            drop(permit);
        });
        ahead = Some((size, end));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn message(n: usize) -> Pending {
        let message = Message {
            id: None,
            msgid: format!("m{n}"),
            sender: "s".into(),
            topic: "t".into(),
            payload: vec![1],
            qos: 1,
            retain: false,
            timestamp: 0,
            properties: vec![],
        };
        Pending { message, outcome: oneshot::channel().0 }
    }

    /// A store that records each batch (the numbers of its messages) and finishes only when the
    /// test lets it, batch by batch.
    struct Stores {
        batches: mpsc::UnboundedReceiver<Vec<String>>,
        finish: Vec<oneshot::Sender<()>>,
        finishers: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
        queue: mpsc::UnboundedSender<Pending>,
    }

    impl Stores {
        fn start(in_flight: usize) -> Stores {
            let batching = Batching { max_messages: 100, max_bytes: 1 << 20, linger: Duration::ZERO, in_flight };
            let (queue, requests) = mpsc::unbounded_channel();
            let (batches_to, batches) = mpsc::unbounded_channel();
            let (finishers_to, finishers) = mpsc::unbounded_channel();
            let store = move |batch: Vec<Pending>| {
                let (finish, finished) = oneshot::channel();
                batches_to.send(batch.iter().map(|p| p.message.msgid.clone()).collect()).unwrap();
                finishers_to.send(finish).unwrap();
                async move {
                    let _ = finished.await;
                }
            };
            tokio::spawn(store_batches(batching, requests, store));
            Stores { batches, finish: Vec::new(), finishers, queue }
        }

        async fn publish(&self, numbers: std::ops::RangeInclusive<usize>) {
            for n in numbers {
                self.queue.send(message(n)).unwrap();
            }
            settle().await;
        }

        /// The batches sent to be stored since the last call.
        async fn sent(&mut self) -> Vec<Vec<String>> {
            settle().await;
            let mut sent = Vec::new();
            while let Ok(batch) = self.batches.try_recv() {
                sent.push(batch);
                self.finish.push(self.finishers.try_recv().unwrap());
            }
            sent
        }

        /// Lets the oldest batch not yet finished finish.
        async fn finish_oldest(&mut self) {
            self.finish.remove(0).send(()).unwrap();
            settle().await;
        }
    }

    /// Lets every task run until it waits.
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    fn batch(numbers: &[usize]) -> Vec<String> {
        numbers.iter().map(|n| format!("m{n}")).collect()
    }

    #[tokio::test]
    async fn a_batch_behind_one_being_stored_fills_until_it_is_as_large_or_that_one_is_stored() {
        let mut stores = Stores::start(2);
        stores.publish(1..=1).await;
        stores.publish(2..=2).await;
        assert_eq!(stores.sent().await, [batch(&[1]), batch(&[2])], "nothing ahead, then one of one ahead");
        stores.publish(3..=5).await;
        assert_eq!(stores.sent().await, Vec::<Vec<String>>::new(), "both batches in flight: the rest queue");
        stores.finish_oldest().await;
        assert_eq!(stores.sent().await, [batch(&[3, 4, 5])]);
        stores.finish_oldest().await;

        // Three are being stored: the next batch waits for as many.
        stores.publish(6..=7).await;
        assert_eq!(stores.sent().await, Vec::<Vec<String>>::new(), "two behind three: it fills");
        stores.publish(8..=8).await;
        assert_eq!(stores.sent().await, [batch(&[6, 7, 8])], "as large as the one ahead");

        // The one ahead is stored before this one is as large: it goes as it is.
        stores.finish_oldest().await;
        stores.publish(9..=9).await;
        assert_eq!(stores.sent().await, Vec::<Vec<String>>::new());
        stores.finish_oldest().await;
        assert_eq!(stores.sent().await, [batch(&[9])], "nothing ahead any more");
    }

    #[tokio::test]
    async fn with_one_batch_in_flight_a_batch_goes_as_soon_as_the_one_before_is_stored() {
        let mut stores = Stores::start(1);
        stores.publish(1..=3).await;
        assert_eq!(stores.sent().await, [batch(&[1, 2, 3])]);
        stores.publish(4..=4).await;
        assert_eq!(stores.sent().await, Vec::<Vec<String>>::new(), "one batch in flight: the next queues");
        stores.finish_oldest().await;
        assert_eq!(stores.sent().await, [batch(&[4])]);
    }
}
