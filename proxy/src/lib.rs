//! An MQTT proxy that loads `broker:extension` guests in front of any MQTT 5 broker: clients
//! connect to the proxy, which connects each on to the broker with the client's own id and
//! credentials (the broker's authentication and ACLs apply), stores what they publish and
//! sends each subscriber what it has not read, through the host library's delivery protocol
//! (`host_harness::protocol`, the same as the rmqtt broker's).
//!
//! - [`config`]: the proxy's TOML file.
//! - [`session`]: one client connection and its upstream connection.
//! - [`translate`]: MQTT 3.1.1 and 5, both ways; [`packet_ids`]: ids on each connection.

pub mod config;
pub mod packet_ids;
pub mod session;
pub mod translate;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use host_harness::Runtime;
use host_harness::adapter::{self, LoadedExtension};
use host_harness::bindings::{Client, Subscription};
use host_harness::metrics::family;
use host_harness::protocol::delivery::{Connection, Refetch};
use rmqtt_net::{Builder, Listener};
use tokio::sync::mpsc;

use crate::config::ProxyConfig;
use crate::session::{Own, Routed};

/// An extension as the proxy runs it: live messages held back as the broker sent them.
pub type Extension = LoadedExtension<Routed>;

/// The proxy's shared state: its configuration, extensions, and who is connected.
pub struct Proxy {
    pub config: ProxyConfig,
    pub extensions: Arc<Vec<Arc<Extension>>>,
    /// The connection each client id has now.
    clients: Mutex<HashMap<String, Connected>>,
    /// Kept sessions with an expiry, by client id: the connection that left them.
    expiring: Mutex<HashMap<String, i64>>,
    next_connection: AtomicI64,
    connections: AtomicU64,
}

struct Connected {
    since: i64,
    client: Client,
    own: mpsc::UnboundedSender<Own>,
}

impl Proxy {
    /// A new connection of `clientid`: it takes over whatever the id had.
    fn register(&self, clientid: &str, own: mpsc::UnboundedSender<Own>, client: Client) -> Connection {
        let since = self.next_connection.fetch_add(1, Ordering::Relaxed);
        self.expiring.lock().unwrap().remove(clientid);
        self.clients.lock().unwrap().insert(clientid.to_owned(), Connected { since, client, own });
        self.connections.fetch_add(1, Ordering::Relaxed);
        Connection { clientid: clientid.to_owned(), since }
    }

    /// The connection ended; with `expiry` (seconds), the broker keeps its session that long.
    fn unregister(self: &Arc<Self>, connection: &Connection, client: &Client, expiry: Option<u32>) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
        {
            let mut clients = self.clients.lock().unwrap();
            if clients.get(&connection.clientid).is_some_and(|c| c.since == connection.since) {
                clients.remove(&connection.clientid);
            }
        }
        // The broker expires a kept session on its own and tells nobody: the proxy keeps the
        // same time, and ends the session's subscriptions with it. (3.1.1 sessions never expire.)
        let Some(seconds) = expiry.filter(|s| *s != translate::SESSION_NEVER_EXPIRES) else { return };
        if !self.config.upstream.expire_sessions {
            return;
        }
        self.expiring.lock().unwrap().insert(connection.clientid.clone(), connection.since);
        let (proxy, connection, client) = (self.clone(), connection.clone(), client.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(u64::from(seconds))).await;
            {
                let mut expiring = proxy.expiring.lock().unwrap();
                if expiring.get(&connection.clientid) != Some(&connection.since) {
                    return; // the client came back
                }
                expiring.remove(&connection.clientid);
            }
            for extension in proxy.extensions.iter() {
                extension.session_expired(&client).await;
            }
        });
    }

    /// Members of share groups fetch the group's backlog again (another member left messages
    /// unacked), each if it is still the client's connection.
    fn refetch(self: &Arc<Self>, extension: usize, members: Vec<Refetch>) {
        for (member, filter, qos) in members {
            let found = {
                let clients = self.clients.lock().unwrap();
                clients
                    .get(&member.clientid)
                    .filter(|c| c.since == member.since)
                    .map(|c| (c.client.clone(), c.own.clone()))
            };
            let Some((client, own)) = found else { continue };
            tracing::debug!(clientid = member.clientid, filter, "returned to the group");
            session::resume_backlog(self, extension, member, client, own, Subscription { filter, qos });
        }
    }
}

#[derive(Clone)]
struct Observed(Arc<Proxy>);

impl host_harness::http::Observed for Observed {
    async fn health(&self) -> Result<(), String> {
        adapter::health(&self.0.extensions).await
    }

    fn metrics(&self) -> String {
        let mut out = adapter::metrics(&self.0.extensions);
        family(&mut out, "mqtt_proxy_connections", "Client connections open.", "gauge");
        let _ = writeln!(out, "mqtt_proxy_connections {}", self.0.connections.load(Ordering::Relaxed));
        out
    }
}

/// Loads the extensions (applying the schema first if `migrate`), then serves MQTT clients
/// until the process ends.
pub async fn serve(config: ProxyConfig, runtime: Runtime, migrate: bool) -> anyhow::Result<()> {
    if let Some(key) = &config.upstream.id_key {
        host_harness::wire::set_key(key);
    }
    let runtime = Arc::new(runtime);
    let (node, batch, sandbox) = (&config.node, config.publish_batch, &config.sandbox);
    let extensions = Arc::new(Extension::load_all(&runtime, &config.extensions, node, batch, sandbox, migrate).await?);
    let proxy = Arc::new(Proxy {
        config: config.clone(),
        extensions: extensions.clone(),
        clients: Mutex::new(HashMap::new()),
        expiring: Mutex::new(HashMap::new()),
        next_connection: AtomicI64::new(1),
        connections: AtomicU64::new(0),
    });
    if let Some(http) = &config.http {
        host_harness::http::start("proxy", http.listen, Observed(proxy.clone())).await?;
    }
    adapter::spawn_reloads(runtime, extensions.clone(), config.watch, |_| Box::pin(async {}))?;
    adapter::spawn_ticks(extensions.clone(), Duration::from_secs(config.tick_seconds.max(1)));

    let upstream = &config.upstream.address;
    if let Some(listen) = config.listen {
        let listener = listener("tcp", listen, &config)
            .bind()
            .and_then(|b| b.tcp())
            .with_context(|| format!("listening on {listen}"))?;
        println!("proxy: node {} listening on {listen}, in front of {upstream}", config.node);
        tokio::spawn(accept(proxy.clone(), listener, false));
    }
    if let Some(tls) = &config.tls {
        let path = |p: &std::path::Path| p.display().to_string();
        tls.check_files()?;
        let listener = listener("tls", tls.listen, &config)
            .tls_cert(Some(path(&tls.cert)))
            .tls_key(Some(path(&tls.key)))
            .tls_cross_certificate(tls.client_ca.is_some())
            .tls_client_ca_certs(tls.client_ca.as_deref().map(path))
            .bind()
            .and_then(|b| b.tls())
            .with_context(|| {
                format!("[tls] on {}: cert {}, key {}", tls.listen, tls.cert.display(), tls.key.display())
            })?;
        println!("proxy: node {} listening on {} (TLS), in front of {upstream}", config.node, tls.listen);
        tokio::spawn(accept(proxy.clone(), listener, true));
    }
    let signal = adapter::shutdown_signal("proxy").await?;
    shutdown(&extensions, signal).await;
    Ok(())
}

fn listener(name: &str, listen: std::net::SocketAddr, config: &ProxyConfig) -> Builder {
    Builder::new()
        .name(name)
        .laddr(listen)
        .nodelay(true)
        .reuseaddr(Some(true))
        .max_packet_size(config.mqtt.max_packet_size)
}

/// Accepts connections, each served by a task of its own.
async fn accept(proxy: Arc<Proxy>, listener: Listener, tls: bool) {
    loop {
        let acceptor = match listener.accept().await {
            Ok(acceptor) => acceptor,
            Err(e) => {
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let peer = acceptor.remote_addr;
            let served = async {
                if tls {
                    let stream = acceptor.tls().await?.mqtt().await?;
                    session::serve(proxy, stream, peer).await
                } else {
                    let stream = acceptor.tcp()?.mqtt().await?;
                    session::serve(proxy, stream, peer).await
                }
            };
            if let Err(e) = served.await {
                tracing::debug!(%peer, "connection: {e:#}");
            }
        });
    }
}

/// How long a shutdown waits for publishes being stored.
const SHUTDOWN_PATIENCE: Duration = Duration::from_secs(10);

/// Finishes the publish batches in flight and writes pending acks. The clients' connections
/// close with the process; the broker sees each go.
async fn shutdown(extensions: &[Arc<Extension>], signal: &str) {
    tracing::info!("{signal}: shutting down");
    for extension in extensions {
        let done = extension.publish.drained(SHUTDOWN_PATIENCE).await;
        tracing::info!(extension = extension.name, done, "publishes being stored: finished");
    }
    for extension in extensions {
        extension.acks.flush_all().await;
        tracing::info!(extension = extension.name, "pending acks written");
    }
    tracing::info!("stopped");
}
