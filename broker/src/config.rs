//! The broker's configuration file (TOML). Paths in it are relative to the file's folder.
//!
//! ```toml
//! node = "broker1@127.0.0.1"
//! listen = "127.0.0.1:1883"
//!
//! [auth]
//! allow_anonymous = true
//!
//! [[extension]]
//! module = "../target/wasm32-wasip2/guest/guest.wasm"
//! rules = "rules.conf"
//! ```
//!
//! README's "Running in production" has a complete one, with TLS, passwords and metrics.

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::path::{Path, PathBuf};

use anyhow::Context;
pub use host_harness::adapter::{BatchConfig, ExtensionConfig, HttpConfig, SandboxConfig, TlsConfig};
use host_harness::adapter::{Served, address_or_off};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// This node's name: `mqtt_client.node` and `${node}` in the rules.
    #[serde(default = "default_node")]
    pub node: String,
    /// Where MQTT clients connect over plain TCP; `"off"` for no plain listener (TLS only).
    #[serde(default = "default_listen", deserialize_with = "address_or_off")]
    pub listen: Option<SocketAddr>,
    /// A TLS listener, beside the plain one or instead of it.
    pub tls: Option<TlsConfig>,
    /// Who may connect: nobody unless it says so.
    #[serde(default)]
    pub auth: AuthConfig,
    /// `/metrics` and `/health` over HTTP; off when absent.
    pub http: Option<HttpConfig>,
    /// The extensions, each a module with its rules. Every hook goes to each, in this order.
    /// `extension = []` makes a plain broker (for comparisons).
    #[serde(rename = "extension")]
    pub extensions: Vec<ExtensionConfig>,
    #[serde(default)]
    pub mqtt: MqttConfig,
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

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Clients that send no username may connect.
    #[serde(default)]
    pub allow_anonymous: bool,
    /// `username:hash` lines as Mosquitto's `mosquitto_passwd` writes them. A client that sends
    /// a username must send its password. Read again on SIGHUP.
    pub password_file: Option<PathBuf>,
}

/// The MQTT side of the listener: flow control and sizes.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// QoS 1/2 messages a client may have unacknowledged, each way: what it may send before the
    /// broker's PUBACK/PUBREC (advertised as Receive Maximum in an MQTT 5 CONNACK; rmqtt closes a
    /// client that sends more), and what the broker sends it before its acks (at most its own
    /// Receive Maximum). The default fits the usual client windows (paho 20, mosquitto 20,
    /// rumqttc 100) with room to spare.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: NonZeroU16,
    /// The largest MQTT packet accepted, in bytes.
    #[serde(default = "default_max_packet_size")]
    pub max_packet_size: u32,
    /// Messages queued per session on their way to a client; past that rmqtt lets the oldest
    /// go (stored ones are then fetched again from the database).
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
}

impl BrokerConfig {
    /// Reads and checks the file at `path`; relative paths in it become relative to its folder.
    pub fn load(path: &Path) -> anyhow::Result<BrokerConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut config: BrokerConfig = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
        let slices = 2 * host_harness::protocol::delivery::FORWARD_AT_ONCE;
        if config.mqtt.max_queue < slices {
            anyhow::bail!("{}: mqtt.max_queue must be at least {slices} (two slices of a backlog)", path.display());
        }
        Served {
            what: "broker",
            listen: config.listen,
            tls: &mut config.tls,
            extensions: &mut config.extensions,
            batch: config.publish_batch,
            sandbox: config.sandbox,
            max_packet_size: config.mqtt.max_packet_size,
        }
        .check_and_resolve(path)?;
        if !config.auth.allow_anonymous && config.auth.password_file.is_none() {
            anyhow::bail!(
                "{}: no client could connect: give [auth] a password_file (written by mosquitto_passwd), \
                 or set allow_anonymous = true",
                path.display()
            );
        }
        let folder = path.parent().unwrap_or(Path::new("."));
        config.auth.password_file = config.auth.password_file.as_ref().map(|file| folder.join(file));
        Ok(config)
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            max_inflight: default_max_inflight(),
            max_packet_size: default_max_packet_size(),
            max_queue: default_max_queue(),
        }
    }
}

fn default_node() -> String {
    "broker@127.0.0.1".into()
}
fn default_listen() -> Option<SocketAddr> {
    Some(([127, 0, 0, 1], 1883).into())
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
fn default_max_queue() -> usize {
    1000
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads `text` as a configuration file; the error, if refused.
    fn load(name: &str, text: &str) -> Result<BrokerConfig, String> {
        let dir = std::env::temp_dir().join(format!("broker-config-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("broker.toml");
        std::fs::write(&path, format!("extension = []\n{text}\n[auth]\nallow_anonymous = true\n")).unwrap();
        BrokerConfig::load(&path).map_err(|e| format!("{e:#}"))
    }

    #[test]
    fn a_guest_memory_that_cannot_hold_the_largest_packet_is_refused_naming_both_settings() {
        let error = load("memory", "[sandbox]\nmemory_mib = 4\n").unwrap_err();
        assert!(
            error.contains("sandbox.memory_mib = 4") && error.contains("mqtt.max_packet_size = 1048576"),
            "{error}"
        );
        assert!(error.contains("at least 8 MiB"), "{error}");
        assert!(load("memory-ok", "[sandbox]\nmemory_mib = 8\n").is_ok());
    }

    #[test]
    fn a_broker_no_client_could_reach_is_refused() {
        let error = load("off", "listen = \"off\"").unwrap_err();
        assert!(error.contains("no [tls]: no client could connect"), "{error}");
        let error = load("bad-listen", "listen = \"nowhere\"").unwrap_err();
        assert!(error.contains("`nowhere` is neither an address"), "{error}");
        let dir = std::env::temp_dir().join(format!("broker-config-{}-auth", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("broker.toml");
        for text in ["extension = []\n", "extension = []\n[auth]\nallow_anonymous = false\n"] {
            std::fs::write(&path, text).unwrap();
            let error = format!("{:#}", BrokerConfig::load(&path).unwrap_err());
            assert!(error.contains("give [auth] a password_file"), "{error}");
        }
    }

    #[test]
    fn a_session_queue_smaller_than_two_backlog_slices_or_no_inflight_window_is_refused() {
        let error = load("queue", "[mqtt]\nmax_queue = 50\n").unwrap_err();
        assert!(error.contains("mqtt.max_queue must be at least 200"), "{error}");
        assert!(load("inflight", "[mqtt]\nmax_inflight = 0\n").is_err());
        let config = load("defaults", "").unwrap();
        assert_eq!((config.mqtt.max_inflight.get(), config.mqtt.max_queue), (128, 1000));
    }
}
