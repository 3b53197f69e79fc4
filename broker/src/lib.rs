//! An MQTT broker that loads `broker:extension` guests: rmqtt's sessions, routing and protocol,
//! with its hooks mapped onto the contract ([`hooks`]) through the host library. Nothing about
//! hooks or SQL is written here twice: the guest does the work, `host-harness` runs it.
//!
//! - [`config`]: the broker's TOML file.
//! - [`auth`]: who may connect (a `mosquitto_passwd` file, anonymous access).
//! - [`http`]: `/metrics` and `/health`; [`stats`]: the broker's own counters.
//! - [`hooks`]: rmqtt's hooks driving the host library's delivery protocol (`host_harness::protocol`:
//!   backlogs before live messages, ack gates, group commit, the ack writer, QoS 2 resends).
//! - [`message`]: rmqtt's types to the contract's and back.

pub mod auth;
pub mod config;
pub mod hooks;
pub mod http;
pub mod message;
pub mod shared;
pub mod stats;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use host_harness::Runtime;
use host_harness::adapter;
use rmqtt::context::ServerContext;
use rmqtt::net::Builder;
use rmqtt::server::MqttServer;

use crate::auth::Authenticator;
use crate::config::{BrokerConfig, MqttConfig};
use crate::hooks::Hooks;
use crate::stats::BrokerStats;

/// An extension as the broker runs it (`host_harness::adapter`): live messages held back as
/// rmqtt routes them.
pub type Extension = host_harness::adapter::LoadedExtension<message::Routed>;

/// Loads the extensions (applying the schema first if `migrate`), then serves MQTT clients
/// until the process ends.
pub async fn serve(config: BrokerConfig, runtime: Runtime, migrate: bool) -> anyhow::Result<()> {
    let runtime = Arc::new(runtime);
    let (node, batch, sandbox) = (&config.node, config.publish_batch, &config.sandbox);
    let extensions = Arc::new(Extension::load_all(&runtime, &config.extensions, node, batch, sandbox, migrate).await?);

    let scx = ServerContext::new().build().await;
    *scx.extends.shared_subscription_mut().await = Box::new(shared::RoundRobin::default());
    let stats = Arc::new(BrokerStats::default());
    if !extensions.is_empty() {
        hooks::register(Hooks { extensions: extensions.clone(), scx: scx.clone(), stats: stats.clone() }).await;
    }
    let authenticator = Authenticator::load(&config.auth)?;
    let register = scx.extends.hook_mgr().register();
    register.add(auth::TYPE, Box::new(authenticator.clone())).await;
    register.start().await;
    if let Some(http) = &config.http {
        let observed = http::Observed { scx: scx.clone(), extensions: extensions.clone(), stats };
        host_harness::http::start("broker", http.listen, observed).await?;
    }

    let reload_scx = scx.clone();
    adapter::spawn_reloads(runtime, extensions.clone(), config.watch, move |why| {
        let (authenticator, scx) = (authenticator.clone(), reload_scx.clone());
        Box::pin(async move { authenticator.reload(&why, &scx).await })
    })?;
    adapter::spawn_ticks(extensions.clone(), Duration::from_secs(config.tick_seconds.max(1)));

    let mut server = MqttServer::new(scx.clone());
    if let Some(listen) = config.listen {
        let listener = listener("tcp", listen, &config.mqtt, config.auth.allow_anonymous)
            .bind()
            .and_then(|b| b.tcp())
            .with_context(|| format!("listening on {listen}"))?;
        println!("broker: node {} listening on {listen}", config.node);
        server = server.listener(listener);
    }
    if let Some(tls) = &config.tls {
        let path = |p: &std::path::Path| p.display().to_string();
        tls.check_files()?;
        let listener = listener("tls", tls.listen, &config.mqtt, config.auth.allow_anonymous)
            .tls_cert(Some(path(&tls.cert)))
            .tls_key(Some(path(&tls.key)))
            // With a CA, clients must present a certificate it signed.
            .tls_cross_certificate(tls.client_ca.is_some())
            .tls_client_ca_certs(tls.client_ca.as_deref().map(path))
            .bind()
            .and_then(|b| b.tls())
            .with_context(|| {
                let ca = tls.client_ca.as_ref().map(|ca| format!(", client_ca {}", ca.display())).unwrap_or_default();
                format!("[tls] on {}: cert {}, key {}{ca}", tls.listen, tls.cert.display(), tls.key.display())
            })?;
        println!("broker: node {} listening on {} (TLS)", config.node, tls.listen);
        server = server.listener(listener);
    }
    let server = server.build();
    tokio::select! {
        served = server.run() => served?,
        signal = adapter::shutdown_signal("broker") => shutdown(&scx, &extensions, signal?).await,
    }
    Ok(())
}

/// A listener's settings, TLS or not.
fn listener(name: &str, listen: std::net::SocketAddr, mqtt: &MqttConfig, allow_anonymous: bool) -> Builder {
    Builder::new()
        .name(name)
        .laddr(listen)
        // An ack is one small packet that must not wait for more.
        .nodelay(true)
        // A restart right after a stop or a crash binds although connections are in TIME_WAIT.
        .reuseaddr(Some(true))
        .max_inflight(mqtt.max_inflight)
        .max_packet_size(mqtt.max_packet_size)
        .max_mqueue_len(mqtt.max_queue)
        // No expiry for a message published without one (rmqtt would give it 5 minutes).
        .message_expiry_interval(Duration::ZERO)
        // Refused, a client without a username goes to the authenticator, which refuses it.
        .allow_anonymous(allow_anonymous)
}

/// Disconnects the connected clients that `which` picks (each is logged); returns how many.
pub(crate) async fn disconnect_clients(scx: &ServerContext, which: impl Fn(&rmqtt::types::Id) -> bool) -> usize {
    let ids: Vec<_> = scx
        .extends
        .shared()
        .await
        .iter()
        .filter_map(|entry| entry.session().map(|s| s.id.clone()))
        .filter(|id| which(id))
        .collect();
    for id in &ids {
        tracing::info!(clientid = %id.client_id, username = ?id.username, "disconnecting");
        let mut entry = scx.extends.shared().await.entry(id.clone());
        let _ = entry.kick(true, true, true).await;
    }
    ids.len()
}

/// How long a shutdown waits for publishes being stored.
const SHUTDOWN_PATIENCE: Duration = Duration::from_secs(10);

/// The listener is closed by now (its future was dropped). Finishes the publish batches in flight
/// (their publishers get their acks), writes pending acks, and closes the clients.
async fn shutdown(scx: &ServerContext, extensions: &[Arc<Extension>], signal: &str) {
    tracing::info!("{signal}: shutting down; no new connections");
    for extension in extensions {
        let done = extension.publish.drained(SHUTDOWN_PATIENCE).await;
        tracing::info!(extension = extension.name, done, "publishes being stored: finished");
    }
    let closed = disconnect_clients(scx, |_| true).await;
    tracing::info!(clients = closed, "clients closed");
    for extension in extensions {
        extension.acks.flush_all().await;
        tracing::info!(extension = extension.name, "pending acks written");
    }
    tracing::info!("stopped");
}
