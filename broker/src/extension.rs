//! One loaded extension as the broker runs it: its host (instances, pools, reloads), its
//! publish queue and its per-client delivery state.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use host_harness::bindings::{Client, FetchPage, HookError, Message, PublishOutcome, Subscription};
use host_harness::host::Sources;
use host_harness::{Host, Runtime};

use crate::config::{BatchConfig, ExtensionConfig, SandboxConfig};
use host_harness::protocol::ack_writer::AckWriter;
use host_harness::protocol::delivery::Deliveries;
use host_harness::protocol::exactly_once::{self, Sent, StoredQos2};
use host_harness::protocol::group_commit::GroupCommit;

use crate::message::Routed;

pub struct Extension {
    /// Names it in logs and in the stored-id property.
    pub name: String,
    pub host: Arc<Host>,
    pub sources: Sources,
    pub publish: GroupCommit,
    pub acks: Arc<AckWriter>,
    pub deliveries: Deliveries<Routed>,
    /// The QoS 2 messages it stored, for resends after a reconnection.
    pub stored_qos2: StoredQos2,
    /// Backlog pages it sent (`/metrics`).
    pub backlog_pages: AtomicU64,
}

impl Extension {
    pub async fn load(
        runtime: &Runtime,
        config: &ExtensionConfig,
        node: &str,
        batch: BatchConfig,
        sandbox: &SandboxConfig,
    ) -> anyhow::Result<Extension> {
        let sources = config.sources();
        let host = Arc::new(Host::load(runtime, &sources, node).await?.with_max_instances(sandbox.max_instances));
        // Unnamed, it goes by its module's name (the file stem), as in the host's logs.
        let name = config.name.clone().unwrap_or_else(|| host.name());
        Ok(Extension {
            publish: GroupCommit::start(host.clone(), batch.batching(sandbox.batch_bytes())),
            acks: AckWriter::start(host.clone()),
            name,
            host,
            sources,
            deliveries: Deliveries::default(),
            stored_qos2: StoredQos2::default(),
            backlog_pages: AtomicU64::new(0),
        })
    }

    /// Calls a backlog fetch (see `Host::fetch`: a trapping message is skipped); a trap or an
    /// error is logged and becomes `None`.
    pub async fn fetch(
        &self,
        client: &Client,
        subscription: &Subscription,
        from: Option<&str>,
        call: impl AsyncFnOnce(&mut host_harness::Instance) -> anyhow::Result<Result<FetchPage, HookError>>,
    ) -> Option<FetchPage> {
        self.host.answered(self.host.fetch(client, subscription, from, call).await)
    }

    pub async fn client_connected(&self, client: &Client) -> Vec<Subscription> {
        self.host.call_or_log(async |i| i.client_connected(client).await).await.unwrap_or_default()
    }

    pub async fn client_disconnected(&self, client: &Client, reason: &str) {
        self.host.call_or_log(async |i| i.client_disconnected(client, reason).await).await;
    }

    pub async fn session_unsubscribed(&self, client: &Client, filter: &str) {
        self.host.call_or_log(async |i| i.session_unsubscribed(client, filter).await).await;
    }

    pub async fn message_delivered(&self, client: &Client, message: &Message) {
        self.host.call_or_log(async |i| i.message_delivered(client, message).await).await;
    }

    /// Stores `message` with the next batch. A QoS 2 message is `sent` under a packet id: a
    /// resend (`dup`) of one already stored gets its id again instead of a second row.
    pub async fn message_publish(&self, message: Message, sent: Option<Sent>, dup: bool) -> PublishOutcome {
        let Some(sent) = sent else { return self.publish.store(message).await };
        let digest = exactly_once::digest(&message);
        if dup && let Some(id) = self.stored_qos2.stored(&sent, digest) {
            return PublishOutcome::Stored(id);
        }
        let outcome = self.publish.store(message).await;
        if let PublishOutcome::Stored(id) = outcome {
            self.stored_qos2.remember(sent, digest, id);
        }
        outcome
    }

    /// Housekeeping until a call deletes nothing (at most `rounds` calls).
    pub async fn tick(&self, rounds: usize) {
        for _ in 0..rounds {
            match self.host.call_or_log(async |i| i.tick().await).await {
                Some(deleted) if deleted > 0 => continue,
                _ => return,
            }
        }
    }

    pub async fn reload(&self, runtime: &Runtime, why: &str) {
        match self.host.reload(runtime, &self.sources).await {
            Ok(()) => tracing::info!(extension = self.name, "reloaded ({why})"),
            Err(e) => tracing::error!(extension = self.name, "reload ({why}) refused, the running rules stay: {e:#}"),
        }
    }
}
