//! What network tests of the broker and the proxy share: a test CA and certificates
//! (`scripts/certs.sh`), password files (`mosquitto_passwd`), the Debian command-line clients,
//! and how a CONNECT with given credentials ends.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rumqttc::{ConnectReturnCode, ConnectionError, MqttOptions};

use crate::mqtt::{PATIENCE, scratch};

pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (scripts/prerequisites.sh installs it)"))
}

pub fn script(args: &[&str]) {
    let certs = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/certs.sh");
    let output = run(certs, args);
    assert!(output.status.success(), "certs.sh {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// A test CA with a server and a client certificate, and a second CA (`rogue`) that nobody
/// trusts, with a client certificate of its own.
pub fn certificates(name: &str) -> PathBuf {
    let dir = scratch(&format!("certs-{name}"));
    let d = dir.to_str().unwrap();
    script(&["ca", d, "ca"]);
    script(&["cert", d, "ca", "server"]);
    script(&["cert", d, "ca", "client"]);
    script(&["ca", d, "rogue"]);
    script(&["cert", d, "rogue", "rogue-client"]);
    dir
}

pub fn file(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

/// How a 3.1.1 CONNECT with these credentials ends.
pub async fn connect_v3(port: u16, credentials: Option<(&str, &str)>) -> Result<(), ConnectReturnCode> {
    let mut options = MqttOptions::new("auth-v3", "127.0.0.1", port);
    if let Some((user, password)) = credentials {
        options.set_credentials(user, password);
    }
    let (_client, mut event_loop) = rumqttc::AsyncClient::new(options, 10);
    match tokio::time::timeout(PATIENCE, event_loop.poll()).await.expect("an answer in time") {
        Ok(rumqttc::Event::Incoming(rumqttc::Incoming::ConnAck(_))) => Ok(()),
        Err(ConnectionError::ConnectionRefused(code)) => Err(code),
        other => panic!("{other:?}"),
    }
}

/// How an MQTT 5 CONNECT with these credentials ends.
pub async fn connect_v5(
    port: u16,
    credentials: Option<(&str, &str)>,
) -> Result<(), rumqttc::v5::mqttbytes::v5::ConnectReturnCode> {
    let mut options = rumqttc::v5::MqttOptions::new("auth-v5", "127.0.0.1", port);
    if let Some((user, password)) = credentials {
        options.set_credentials(user, password);
    }
    let (_client, mut event_loop) = rumqttc::v5::AsyncClient::new(options, 10);
    match tokio::time::timeout(PATIENCE, event_loop.poll()).await.expect("an answer in time") {
        Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::ConnAck(_))) => Ok(()),
        Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => Err(code),
        other => panic!("{other:?}"),
    }
}

pub fn mosquitto_passwd(args: &[&str]) {
    let output = run("mosquitto_passwd", args);
    assert!(output.status.success(), "mosquitto_passwd {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}
