//! What every MQTT adapter (the rmqtt broker, the proxy) runs the same way: the extensions named
//! in its configuration file ([`ExtensionConfig`], [`BatchConfig`], [`SandboxConfig`]), each
//! loaded with its publish queue and delivery state ([`LoadedExtension`]), and the loops that
//! send a subscription's backlog and release what was held behind it ([`send_backlog`],
//! [`release_held`]). An adapter says only how a message reaches its client ([`Outbox`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use std::fmt::Write as _;

use serde::Deserialize;

use crate::bindings::{Client, FetchPage, HookError, Hookpoint, Message, PublishOutcome, Subscription};
use crate::host::{DEFAULT_MAX_INSTANCES, Sources};
use crate::metrics::{Metrics, family, label, prometheus};
use crate::protocol::ack_writer::AckWriter;
use crate::protocol::delivery::{Connection, Deliveries, FORWARD_AT_ONCE, FetchEnd, Held, PassedAck};
use crate::protocol::exactly_once::{self, Sent, StoredQos2};
use crate::protocol::group_commit::{Batching, GroupCommit};
use crate::sandbox::Limits;
use crate::{Host, Instance, Runtime};

/// `[[extension]]`: a module and its rules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtensionConfig {
    /// Names the extension in logs and in the stored-id property; the module's file stem when
    /// absent.
    pub name: Option<String>,
    pub module: PathBuf,
    pub rules: PathBuf,
}

/// `[publish_batch]`, group commit: publishes from all clients are handed to `message-publish`
/// in batches.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// A batch closes when it holds this many messages...
    #[serde(default = "default_max_messages")]
    pub max_messages: usize,
    /// ...or when nothing more is queued; with a linger, this many microseconds after its first
    /// message arrived. While batches are being stored the next one fills up, so under load
    /// batches grow by themselves without a linger. tokio's timers tick in milliseconds: any
    /// linger costs at least one.
    #[serde(default)]
    pub linger_us: u64,
    /// Batches being stored at once.
    #[serde(default = "default_in_flight")]
    pub in_flight: usize,
}

/// `[sandbox]`: what one extension may use.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {
    /// Time one hook call may take, SQL waits included, in milliseconds.
    #[serde(default = "default_call_timeout_ms")]
    pub call_timeout_ms: u64,
    /// Memory one extension instance may use, in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: usize,
    /// Instances of each extension that may run calls at once.
    #[serde(default = "default_max_instances")]
    pub max_instances: usize,
}

/// MQTT over TLS (rustls).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub listen: SocketAddr,
    /// The server's certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// With it, a client must present a certificate this CA (PEM) signed; without, clients
    /// present none.
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Where `/metrics` (Prometheus text) and `/health` are served.
    pub listen: SocketAddr,
}

/// An address, or `"off"`.
pub fn address_or_off<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(deserializer)?;
    if text == "off" {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|_| serde::de::Error::custom(format!("`{text}` is neither an address (host:port) nor \"off\"")))
}
/// What an adapter's configuration file (`path`) says that both adapters check and resolve the
/// same way: someone can connect, the batches and the guest's memory make sense, and the
/// extensions' and TLS files are relative to the file's folder. `what` names the adapter.
pub struct Served<'a> {
    pub what: &'a str,
    pub listen: Option<SocketAddr>,
    pub tls: &'a mut Option<TlsConfig>,
    pub extensions: &'a mut [ExtensionConfig],
    pub batch: BatchConfig,
    pub sandbox: SandboxConfig,
    /// The largest packet a client may send (`mqtt.max_packet_size`).
    pub max_packet_size: u32,
}

impl Served<'_> {
    pub fn check_and_resolve(self, path: &std::path::Path) -> anyhow::Result<()> {
        use anyhow::Context;
        let file = path.display();
        if self.extensions.is_empty() {
            tracing::warn!("{file}: no [[extension]]: a plain MQTT {}, nothing is stored", self.what);
        }
        if self.batch.max_messages == 0 {
            anyhow::bail!("{file}: publish_batch.max_messages must be at least 1");
        }
        // A guest holds a batch of publishes, or a backlog page, in its memory.
        self.sandbox.check_holds(self.max_packet_size, "mqtt.max_packet_size").with_context(|| format!("{file}"))?;
        if self.listen.is_none() && self.tls.is_none() {
            anyhow::bail!("{file}: `listen = \"off\"` and no [tls]: no client could connect");
        }
        let folder = path.parent().unwrap_or(std::path::Path::new("."));
        for extension in self.extensions.iter_mut() {
            extension.module = folder.join(&extension.module);
            extension.rules = folder.join(&extension.rules);
        }
        if let Some(tls) = self.tls {
            tls.cert = folder.join(&tls.cert);
            tls.key = folder.join(&tls.key);
            tls.client_ca = tls.client_ca.as_ref().map(|ca| folder.join(ca));
        }
        Ok(())
    }
}

/// Guest memory per byte of the largest packet: a backlog page (`max_returned_bytes`, 4 MiB by
/// default, plus one message past it) and its copy on the way out, with room to spare.
pub const GUEST_MEMORY_PER_PACKET: u64 = 8;

impl TlsConfig {
    /// Reads each file once, so that one that cannot be read is named (rustls's errors, as the
    /// listeners report them, name none).
    pub fn check_files(&self) -> anyhow::Result<()> {
        use anyhow::Context;
        let files = [("cert", Some(&self.cert)), ("key", Some(&self.key)), ("client_ca", self.client_ca.as_ref())];
        for (key, file) in files.into_iter().filter_map(|(key, file)| Some((key, file?))) {
            std::fs::read(file).with_context(|| format!("[tls] {key} = {}", file.display()))?;
        }
        Ok(())
    }
}

impl ExtensionConfig {
    pub fn sources(&self) -> Sources {
        Sources { module: self.module.clone(), rules: self.rules.clone() }
    }
}

impl BatchConfig {
    /// How the group commit forms batches of at most `max_bytes` of payload.
    pub fn batching(&self, max_bytes: usize) -> Batching {
        Batching {
            max_messages: self.max_messages,
            max_bytes,
            linger: Duration::from_micros(self.linger_us),
            in_flight: self.in_flight,
        }
    }
}

impl SandboxConfig {
    pub fn limits(&self) -> Limits {
        Limits { call_timeout: Duration::from_millis(self.call_timeout_ms), memory_bytes: self.memory_mib << 20 }
    }

    /// The payload bytes a publish batch may hold: an eighth of the guest's memory.
    pub fn batch_bytes(&self) -> usize {
        (self.memory_mib << 20) / 8
    }

    /// Refuses a guest memory that cannot hold a message of `max_packet_size` bytes: it would
    /// be accepted and then trap every fetch. `packet_setting` names where that size is set.
    pub fn check_holds(&self, max_packet_size: u32, packet_setting: &str) -> anyhow::Result<()> {
        let memory = (self.memory_mib as u64) << 20;
        let largest = u64::from(max_packet_size);
        if memory < GUEST_MEMORY_PER_PACKET * largest {
            anyhow::bail!(
                "sandbox.memory_mib = {} cannot hold the largest message {packet_setting} = {largest} allows: \
                 give the guest at least {} MiB, or accept smaller packets",
                self.memory_mib,
                (GUEST_MEMORY_PER_PACKET * largest).div_ceil(1 << 20)
            );
        }
        Ok(())
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig { max_messages: default_max_messages(), linger_us: 0, in_flight: default_in_flight() }
    }
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            call_timeout_ms: default_call_timeout_ms(),
            memory_mib: default_memory_mib(),
            max_instances: default_max_instances(),
        }
    }
}

fn default_max_messages() -> usize {
    256
}
fn default_in_flight() -> usize {
    2
}
fn default_call_timeout_ms() -> u64 {
    10_000
}
fn default_memory_mib() -> usize {
    64
}
fn default_max_instances() -> usize {
    DEFAULT_MAX_INSTANCES
}

/// One loaded extension as an adapter runs it: its host (instances, pools, reloads), its publish
/// queue and its per-client delivery state. `P` is the adapter's live message (see
/// [`crate::protocol::delivery::Held`]).
pub struct LoadedExtension<P> {
    /// Names it in logs and in the stored-id property.
    pub name: String,
    pub host: Arc<Host>,
    pub sources: Sources,
    pub publish: GroupCommit,
    pub acks: Arc<AckWriter>,
    pub deliveries: Deliveries<P>,
    /// The QoS 2 messages it stored, for resends after a reconnection.
    pub stored_qos2: StoredQos2,
    /// Backlog pages it sent (`/metrics`).
    pub backlog_pages: AtomicU64,
}

impl<P> LoadedExtension<P> {
    pub async fn load(
        runtime: &Runtime,
        config: &ExtensionConfig,
        node: &str,
        batch: BatchConfig,
        sandbox: &SandboxConfig,
    ) -> anyhow::Result<LoadedExtension<P>> {
        let sources = config.sources();
        let host = Arc::new(Host::load(runtime, &sources, node).await?.with_max_instances(sandbox.max_instances));
        // Unnamed, it goes by its module's name (the file stem), as in the host's logs.
        let name = config.name.clone().unwrap_or_else(|| host.name());
        Ok(LoadedExtension {
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

    /// Loads every configured extension, in order (applying the schema first if `migrate`).
    pub async fn load_all(
        runtime: &Runtime,
        configs: &[ExtensionConfig],
        node: &str,
        batch: BatchConfig,
        sandbox: &SandboxConfig,
        migrate: bool,
    ) -> anyhow::Result<Vec<Arc<LoadedExtension<P>>>> {
        let mut extensions = Vec::new();
        for config in configs {
            let loaded = LoadedExtension::load(runtime, config, node, batch, sandbox).await?;
            if migrate {
                loaded.host.migrate().await?;
            }
            extensions.push(Arc::new(loaded));
        }
        Ok(extensions)
    }

    /// Calls a backlog fetch (see `Host::fetch`: a trapping message is skipped); a trap or an
    /// error is logged and becomes `None`.
    pub async fn fetch(
        &self,
        client: &Client,
        subscription: &Subscription,
        from: Option<&str>,
        call: impl AsyncFnOnce(&mut Instance) -> anyhow::Result<Result<FetchPage, HookError>>,
    ) -> Option<FetchPage> {
        self.host.answered(self.host.fetch(client, subscription, from, call).await)
    }

    pub async fn client_connected(&self, client: &Client) -> Vec<Subscription> {
        if !self.host.acts_on(Hookpoint::ClientConnected, None) {
            return Vec::new();
        }
        self.host.call_or_log(async |i| i.client_connected(client).await).await.unwrap_or_default()
    }

    pub async fn client_disconnected(&self, client: &Client, reason: &str) {
        if !self.host.acts_on(Hookpoint::ClientDisconnected, None) {
            return;
        }
        self.host.call_or_log(async |i| i.client_disconnected(client, reason).await).await;
    }

    pub async fn session_unsubscribed(&self, client: &Client, filter: &str) {
        if !self.host.acts_on(Hookpoint::SessionUnsubscribed, None) {
            return;
        }
        self.host.call_or_log(async |i| i.session_unsubscribed(client, filter).await).await;
    }

    /// A kept session of `client` expired: its subscriptions end with it, as if the client had
    /// unsubscribed (the rules say what that does to their read positions).
    pub async fn session_expired(&self, client: &Client)
    where
        P: Held,
    {
        for filter in self.deliveries.session_ended(&client.clientid) {
            tracing::debug!(extension = self.name, clientid = client.clientid, filter, "session expired");
            self.session_unsubscribed(client, &filter).await;
        }
    }

    /// The client acked the delivery of `message`, stored as `id` (or has it for good): what
    /// passes the ack gates goes to the ack writer, if a rule acts on its topic. `client` makes
    /// the contract's client, only for an ack that goes on (this runs for every ack).
    pub fn acked(&self, connection: &Connection, client: impl Fn() -> Client, id: i64, message: Message)
    where
        P: Held,
    {
        self.pass_acks(connection, client, self.deliveries.acked(connection, id, message));
    }

    /// The message stored as `id` expired on its way to the client (the broker dropped it): the
    /// acks that waited for it go to the ack writer.
    pub fn expired(&self, connection: &Connection, client: impl Fn() -> Client, id: i64)
    where
        P: Held,
    {
        self.pass_acks(connection, client, self.deliveries.expired(connection, id));
    }

    fn pass_acks(&self, connection: &Connection, client: impl Fn() -> Client, passed: Vec<PassedAck>) {
        for (message, filters) in passed {
            if !self.host.acts_on(Hookpoint::MessageAcked, Some(&message.topic)) {
                continue;
            }
            tracing::debug!(clientid = connection.clientid, id = message.id, ?filters, "ack passed");
            self.acks.push(client(), message, filters);
        }
    }

    /// A message about `topic` was delivered: `client` and `message` make the contract's client
    /// and message, only if a rule acts on that topic (this runs for every delivery).
    pub async fn message_delivered(
        &self,
        client: impl FnOnce() -> Client,
        topic: &str,
        message: impl FnOnce() -> Message,
    ) {
        if !self.host.acts_on(Hookpoint::MessageDelivered, Some(topic)) {
            return;
        }
        let (client, message) = (client(), message());
        self.host.call_or_log(async |i| i.message_delivered(&client, &message).await).await;
    }

    /// Whether a rule may store or act on a publish to `topic`: an adapter makes the contract's
    /// message for the extensions that do, and calls [`LoadedExtension::message_publish`] for those.
    pub fn publishes(&self, topic: &str) -> bool {
        self.host.acts_on(Hookpoint::MessagePublish, Some(topic))
    }

    /// Stores `message` with the next batch. A QoS 2 message is `sent` under a packet id: a
    /// resend (`dup`) of one already stored gets its id again instead of a second row.
    pub async fn message_publish(&self, message: Message, sent: Option<Sent>, dup: bool) -> PublishOutcome {
        if !self.publishes(&message.topic) {
            return PublishOutcome::NotStored;
        }
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

/// How an adapter hands messages to one client connection. Each message sent must later be
/// reported to [`Deliveries::forwarded_gone`] once it left the adapter (written to the client,
/// or dropped): [`Deliveries::sent`] waits for that.
pub trait Outbox<P>: Send + Sync {
    /// Sends a stored message (a backlog's) at `qos`: the message is moved into the packet, its
    /// payload not copied. False: the client went away.
    fn send_stored(&self, message: Message, qos: u8, extension: &str) -> bool;
    /// Sends a live message held back behind a backlog, as it came. False: the client went away.
    fn send_held(&self, held: P) -> bool;
}

/// Sends one subscription's backlog to the client, page by page, each slice once the previous
/// one has left the adapter (a client's queue is bounded). With `first`, the pages start there (a
/// SUBSCRIBE); without, or when the subscription let messages go meanwhile, they start again from
/// the stored position once what it delivered is acked and written. Then the subscription is
/// live, and the messages held back for the client meanwhile are released.
pub async fn send_backlog<P: Held>(
    extension: &LoadedExtension<P>,
    connection: &Connection,
    client: &Client,
    subscription: &Subscription,
    first: Option<FetchPage>,
    outbox: &impl Outbox<P>,
) {
    let deliveries = &extension.deliveries;
    let filter = &subscription.filter;
    let mut first = first;
    'fetch: loop {
        let mut page = match first.take() {
            Some(page) => page,
            None => {
                if !deliveries.settled(connection, filter).await {
                    return;
                }
                extension.acks.flush(&client.clientid, filter).await;
                deliveries.refetching(connection, filter);
                let call = async |i: &mut Instance| i.session_resume(client, subscription).await;
                match extension.fetch(client, subscription, None, call).await {
                    Some(page) => page,
                    None => return fetch_failed(extension, connection, filter, outbox).await,
                }
            }
        };
        loop {
            tracing::debug!(clientid = client.clientid, filter, messages = page.messages.len(), "backlog page");
            extension.backlog_pages.fetch_add(1, Ordering::Relaxed);
            // In slices: a page may be bigger than the client's queue (`max_returned_count`).
            let mut messages = std::mem::take(&mut page.messages).into_iter();
            loop {
                let slice: Vec<Message> = messages.by_ref().take(FORWARD_AT_ONCE).collect();
                if slice.is_empty() {
                    break;
                }
                let Some(decisions) = deliveries.forward_page(connection, filter, &slice) else { return };
                for (message, _) in slice.into_iter().zip(decisions).filter(|(_, go)| *go) {
                    let qos = message.qos.min(subscription.qos);
                    if !outbox.send_stored(message, qos, &extension.name) {
                        return;
                    }
                }
                extension.pass_acks(connection, || client.clone(), deliveries.credited(connection, filter));
                if !deliveries.sent(connection).await {
                    return;
                }
                // Something it delivered was let go: fetch again from the position now, so
                // that what it acks meanwhile is not held behind the loss for long.
                if deliveries.refetch_wanted(connection, filter) {
                    continue 'fetch;
                }
            }
            let Some(cursor) = page.next.take() else { break };
            let next = async |i: &mut Instance| i.session_fetch_next(client, subscription, &cursor).await;
            match extension.fetch(client, subscription, Some(&cursor), next).await {
                Some(next) => page = next,
                None => return fetch_failed(extension, connection, filter, outbox).await,
            }
        }
        match deliveries.fetch_end(connection, filter) {
            FetchEnd::Refetch => continue,
            FetchEnd::Live => break,
            FetchEnd::Gone => return,
        }
    }
    tracing::debug!(clientid = client.clientid, filter, "backlog sent");
    release_held(extension, connection, outbox).await;
}

/// A fetch failed (logged where it did): the subscription goes live without its backlog, which
/// stays in the database for its next SUBSCRIBE.
pub async fn fetch_failed<P: Held>(
    extension: &LoadedExtension<P>,
    connection: &Connection,
    filter: &str,
    outbox: &impl Outbox<P>,
) {
    extension.deliveries.fetch_failed(connection, filter);
    release_held(extension, connection, outbox).await;
}

/// Sends the held-back messages that may go now, slice by slice.
pub async fn release_held<P: Held>(extension: &LoadedExtension<P>, connection: &Connection, outbox: &impl Outbox<P>) {
    loop {
        let held = extension.deliveries.release(connection);
        if held.is_empty() {
            return;
        }
        tracing::debug!(clientid = connection.clientid, held = held.len(), "release");
        for message in held {
            if !outbox.send_held(message) {
                return;
            }
        }
        if !extension.deliveries.sent(connection).await {
            return;
        }
    }
}

/// `/health` waits this long for each pool's `SELECT 1`.
const HEALTH_PATIENCE: Duration = Duration::from_secs(2);

/// `/health`: every extension's pools reach their databases, or which does not.
pub async fn health<P>(extensions: &[Arc<LoadedExtension<P>>]) -> Result<(), String> {
    for extension in extensions {
        extension
            .host
            .check_pools(HEALTH_PATIENCE)
            .await
            .map_err(|why| format!("extension {}: {why}", extension.name))?;
    }
    Ok(())
}

/// `/metrics`: the extensions' own metrics, and what the adapter does for each.
pub fn metrics<P: Held>(extensions: &[Arc<LoadedExtension<P>>]) -> String {
    let named: Vec<(&str, &Metrics)> = extensions.iter().map(|e| (e.name.as_str(), e.host.metrics())).collect();
    let mut out = prometheus(&named);
    type PerExtension<P> = (&'static str, &'static str, &'static str, fn(&LoadedExtension<P>) -> u64);
    let per_extension: [PerExtension<P>; 3] = [
        ("mqtt_broker_backlog_pages_total", "Backlog pages sent to subscribers.", "counter", |e| {
            e.backlog_pages.load(Ordering::Relaxed)
        }),
        ("mqtt_broker_held_messages", "Live stored messages held back behind backlogs.", "gauge", |e| {
            e.deliveries.held() as u64
        }),
        ("mqtt_broker_pending_acks", "Acks waiting to be written.", "gauge", |e| e.acks.pending() as u64),
    ];
    for (name, help, kind, value) in per_extension {
        family(&mut out, name, help, kind);
        for extension in extensions {
            let _ = writeln!(out, "{name}{{extension=\"{}\"}} {}", label(&extension.name), value(extension));
        }
    }
    out
}

/// Housekeeping calls in a row at most, per extension and tick.
const TICK_ROUNDS: usize = 100;

/// Calls every extension's `tick` every `period`, in a task of its own.
pub fn spawn_ticks<P: Send + Sync + 'static>(extensions: Arc<Vec<Arc<LoadedExtension<P>>>>, period: Duration) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            for extension in extensions.iter() {
                extension.tick(TICK_ROUNDS).await;
            }
        }
    });
}

/// Reloads every extension on each request (SIGHUP, and file changes with `watch`), one request
/// at a time, in a task of its own; `also` runs after each (the adapter's own files).
pub fn spawn_reloads<P: Send + Sync + 'static>(
    runtime: Arc<Runtime>,
    extensions: Arc<Vec<Arc<LoadedExtension<P>>>>,
    watch: bool,
    also: impl Fn(String) -> futures::future::BoxFuture<'static, ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let (reload, mut reloads) = tokio::sync::mpsc::unbounded_channel();
    crate::reload::forward_sighup(reload.clone())?;
    if watch {
        let sources: Vec<_> = extensions.iter().map(|e| e.sources.clone()).collect();
        crate::reload::watch_files(&sources, reload);
    }
    tokio::spawn(async move {
        while let Some(why) = reloads.recv().await {
            for extension in extensions.iter() {
                extension.reload(&runtime, &why).await;
            }
            also(why).await;
        }
    });
    Ok(())
}

/// Waits for SIGTERM or SIGINT and names it; a second one ends the process at once.
pub async fn shutdown_signal(name: &'static str) -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
    let signal = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!("{name}: second signal, exiting now");
        std::process::exit(1);
    });
    Ok(signal)
}
