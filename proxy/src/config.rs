//! The proxy's configuration file (TOML). Paths in it are relative to the file's folder. The
//! keys it shares with the broker's file mean the same (`host_harness::adapter`).
//!
//! ```toml
//! node = "proxy1@127.0.0.1"
//! listen = "127.0.0.1:1884"
//!
//! [upstream]
//! address = "127.0.0.1:1883"
//!
//! [[extension]]
//! module = "../target/wasm32-wasip2/guest/guest.wasm"
//! rules = "rules.conf"
//! ```

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::path::Path;

use anyhow::Context;
pub use host_harness::adapter::{BatchConfig, ExtensionConfig, HttpConfig, SandboxConfig, TlsConfig};
use host_harness::adapter::{Served, address_or_off};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// This node's name: `${node}` in the rules.
    #[serde(default = "default_node")]
    pub node: String,
    /// Where MQTT clients connect over plain TCP; `"off"` for no plain listener (TLS only).
    #[serde(default = "default_listen", deserialize_with = "address_or_off")]
    pub listen: Option<SocketAddr>,
    /// A TLS listener, beside the plain one or instead of it.
    pub tls: Option<TlsConfig>,
    /// The broker every client is connected on to.
    pub upstream: UpstreamConfig,
    /// `/metrics` and `/health` over HTTP; off when absent.
    pub http: Option<HttpConfig>,
    /// The extensions, each a module with its rules, in order. `extension = []` makes a proxy
    /// that stores nothing (for comparisons).
    #[serde(rename = "extension")]
    pub extensions: Vec<ExtensionConfig>,
    #[serde(default)]
    pub mqtt: ProxyMqttConfig,
    #[serde(default)]
    pub publish_batch: BatchConfig,
    #[serde(default)]
    pub sandbox: SandboxConfig,
    /// Seconds between housekeeping calls (`tick`: expiry and retention).
    #[serde(default = "default_tick_seconds")]
    pub tick_seconds: u64,
    /// Reload when a module or rules file changes (SIGHUP always reloads).
    #[serde(default)]
    pub watch: bool,
}

/// `[upstream]`: the MQTT 5 broker behind the proxy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `host:port` of its plain MQTT listener.
    pub address: String,
    /// Where a new subscription's retained messages come from.
    #[serde(default)]
    pub retained: RetainedFrom,
    /// End a kept MQTT 5 session's subscriptions (`session-unsubscribed`: the example rules
    /// delete their read positions) when its expiry interval passes and the client has not come
    /// back to this proxy, as the broker ends the session. With several proxies a client may
    /// come back through another one, which this proxy cannot see: set false there, and let
    /// `position_idle` clean up.
    #[serde(default = "default_true")]
    pub expire_sessions: bool,
    /// The secret that tags stored ids (`host_harness::wire`), so that no client of the broker
    /// can forge one. Proxies in front of one broker share it; absent, each proxy makes a
    /// random one (enough for a single proxy).
    pub id_key: Option<String>,
}

fn default_true() -> bool {
    true
}

/// Where a new subscription's retained messages come from: one place, or each would come twice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetainedFrom {
    /// The broker's own store, as for its other clients (rules without `on_retain_lookup`).
    #[default]
    Broker,
    /// The database (`on_message_retain` and `on_retain_lookup` in the rules, as with our
    /// broker): the proxy subscribes upstream with Retain Handling 2 (send none).
    Database,
}

/// `[mqtt]`: flow control and sizes towards clients.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyMqttConfig {
    /// QoS 1/2 messages the proxy has unacknowledged towards an MQTT 3.1.1 client (which has no
    /// Receive Maximum of its own); an MQTT 5 client's Receive Maximum, if lower, wins. The
    /// broker's deliveries and the proxy's own (backlogs) share it.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: NonZeroU16,
    /// The largest MQTT packet accepted from a client, in bytes.
    #[serde(default = "default_max_packet_size")]
    pub max_packet_size: u32,
}

impl Default for ProxyMqttConfig {
    fn default() -> Self {
        ProxyMqttConfig { max_inflight: default_max_inflight(), max_packet_size: default_max_packet_size() }
    }
}

impl ProxyConfig {
    /// Reads and checks the file at `path`; relative paths in it become relative to its folder.
    pub fn load(path: &Path) -> anyhow::Result<ProxyConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut config: ProxyConfig = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
        Served {
            what: "proxy",
            listen: config.listen,
            tls: &mut config.tls,
            extensions: &mut config.extensions,
            batch: config.publish_batch,
            sandbox: config.sandbox,
            max_packet_size: config.mqtt.max_packet_size,
        }
        .check_and_resolve(path)?;
        Ok(config)
    }
}

fn default_node() -> String {
    "proxy@127.0.0.1".into()
}
fn default_listen() -> Option<SocketAddr> {
    Some(([127, 0, 0, 1], 1884).into())
}
fn default_tick_seconds() -> u64 {
    5
}
fn default_max_inflight() -> NonZeroU16 {
    NonZeroU16::new(128).expect("not zero")
}
fn default_max_packet_size() -> u32 {
    1 << 20
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(name: &str, text: &str) -> Result<ProxyConfig, String> {
        let dir = std::env::temp_dir().join(format!("proxy-config-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("proxy.toml");
        std::fs::write(&path, text).unwrap();
        ProxyConfig::load(&path).map_err(|e| format!("{e:#}"))
    }

    #[test]
    fn a_proxy_without_an_upstream_or_a_listener_is_refused_naming_what_is_missing() {
        let error = load("no-upstream", "extension = []\n").unwrap_err();
        assert!(error.contains("missing field `upstream`"), "{error}");
        let error = load("off", "extension = []\nlisten = \"off\"\n[upstream]\naddress = \"127.0.0.1:1883\"\n");
        assert!(error.unwrap_err().contains("no client could connect"));
        let config = load("ok", "extension = []\n[upstream]\naddress = \"127.0.0.1:1883\"\n").unwrap();
        assert_eq!((config.mqtt.max_inflight.get(), config.upstream.retained), (128, RetainedFrom::Broker));
        let error = load("retained", "extension = []\n[upstream]\naddress = \"h:1\"\nretained = \"both\"\n");
        assert!(error.unwrap_err().contains("unknown variant `both`"));
    }
}
