//! An MQTT broker that loads `broker:extension` guests: rmqtt's sessions, routing and protocol,
//! with its hooks mapped onto the contract ([`hooks`]) through the host library. Nothing about
//! hooks or SQL is written here twice: the guest does the work, `host-harness` runs it.
//!
//! - [`config`]: the broker's TOML file.
//! - [`extension`]: one loaded extension: its host, publish queue and delivery state.
//! - [`group_commit`]: publishes from all clients stored in batches.
//! - [`ack_writer`]: acks written in the background, coalesced.
//! - [`delivery`]: backlogs before live messages, and the ack gate.
//! - [`message`]: rmqtt's types to the contract's and back.

pub mod ack_writer;
pub mod config;
pub mod delivery;
pub mod extension;
pub mod group_commit;
pub mod hooks;
pub mod message;

use std::sync::Arc;
use std::time::Duration;

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
            Extension::load(&runtime, extension, &config.node, config.publish_batch, config.sandbox.max_instances)
                .await?;
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

    // TCP_NODELAY: an ack is one small packet that must not wait for more.
    let listener = Builder::new().name("tcp").laddr(config.listen).nodelay(true).bind()?.tcp()?;
    println!("broker: node {} listening on {}", config.node, config.listen);
    MqttServer::new(scx).listener(listener).build().run().await?;
    Ok(())
}
