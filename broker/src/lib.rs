//! An MQTT broker that loads `broker:extension` guests: rmqtt's sessions, routing and protocol,
//! with its hooks mapped onto the contract ([`hooks`]) through the host library. Nothing about
//! hooks or SQL is written here twice: the guest does the work, `host-harness` runs it.
//!
//! - [`config`]: the broker's TOML file.
//! - [`extension`]: one loaded extension: its host, publish queue and delivery state.
//! - [`group_commit`]: publishes from all clients stored in batches.
//! - [`ack_writer`]: acks written in the background, coalesced.
//! - [`delivery`]: backlogs before live messages, and the ack gates.
//! - [`exactly_once`]: a QoS 2 message resent after a reconnection is stored once.
//! - [`message`]: rmqtt's types to the contract's and back.

pub mod ack_writer;
pub mod config;
pub mod delivery;
pub mod exactly_once;
pub mod extension;
pub mod group_commit;
pub mod hooks;
pub mod message;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use host_harness::Runtime;
use host_harness::reload::{forward_sighup, watch_files};
use rmqtt::context::ServerContext;
use rmqtt::net::Builder;
use rmqtt::server::MqttServer;
use tokio::sync::mpsc;

use crate::config::BrokerConfig;
use crate::extension::Extension;
use crate::hooks::Hooks;

/// Housekeeping calls in a row at most, per extension and tick.
const TICK_ROUNDS: usize = 100;

/// Loads the extensions (applying the schema first if `migrate`), then serves MQTT clients
/// until the process ends.
pub async fn serve(config: BrokerConfig, runtime: Runtime, migrate: bool) -> anyhow::Result<()> {
    let runtime = Arc::new(runtime);
    let mut extensions = Vec::new();
    for extension in &config.extensions {
        let loaded =
            Extension::load(&runtime, extension, &config.node, config.publish_batch, &config.sandbox).await?;
        if migrate {
            loaded.host.migrate().await?;
        }
        extensions.push(Arc::new(loaded));
    }
    let extensions = Arc::new(extensions);

    let scx = ServerContext::new().build().await;
    if !extensions.is_empty() {
        hooks::register(Hooks { extensions: extensions.clone(), scx: scx.clone() }).await;
    }

    let (reload, mut reloads) = mpsc::unbounded_channel();
    forward_sighup(reload.clone())?;
    if config.watch {
        let sources: Vec<_> = extensions.iter().map(|e| e.sources.clone()).collect();
        watch_files(&sources, reload);
    }
    let (reloading, ticking) = (extensions.clone(), extensions.clone());
    tokio::spawn(async move {
        while let Some(why) = reloads.recv().await {
            for extension in reloading.iter() {
                extension.reload(&runtime, &why).await;
            }
        }
    });
    let period = Duration::from_secs(config.tick_seconds.max(1));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            for extension in ticking.iter() {
                extension.tick(TICK_ROUNDS).await;
            }
        }
    });

    let mqtt = config.mqtt;
    let listener = Builder::new()
        .name("tcp")
        .laddr(config.listen)
        // An ack is one small packet that must not wait for more.
        .nodelay(true)
        // A restart right after a stop or a crash binds although connections are in TIME_WAIT.
        .reuseaddr(Some(true))
        .max_inflight(mqtt.max_inflight)
        .max_packet_size(mqtt.max_packet_size)
        .max_mqueue_len(mqtt.max_queue)
        // No expiry for a message published without one (rmqtt would give it 5 minutes).
        .message_expiry_interval(Duration::ZERO)
        .bind()
        .and_then(|b| b.tcp())
        .with_context(|| format!("listening on {}", config.listen))?;
    println!("broker: node {} listening on {}", config.node, config.listen);
    let server = MqttServer::new(scx.clone()).listener(listener).build();
    tokio::select! {
        served = server.run() => served?,
        signal = shutdown_signal() => shutdown(&scx, &extensions, signal?).await,
    }
    Ok(())
}

/// Waits for SIGTERM or SIGINT and names it.
async fn shutdown_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    // A second signal ends the process at once.
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!("broker: second signal, exiting now");
        std::process::exit(1);
    });
    Ok(name)
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
    let ids: Vec<_> = scx.extends.shared().await.iter().filter_map(|entry| entry.session().map(|s| s.id.clone())).collect();
    tracing::info!(clients = ids.len(), "closing clients");
    for id in ids {
        let mut entry = scx.extends.shared().await.entry(id);
        let _ = entry.kick(true, true, true).await;
    }
    for extension in extensions {
        extension.acks.flush_all().await;
        tracing::info!(extension = extension.name, "pending acks written");
    }
    tracing::info!("stopped");
}
