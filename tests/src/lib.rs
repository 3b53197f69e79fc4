//! Support for the integration tests: each test gets its own database in the running
//! PostgreSQL (`make pg-up`; port from `PGPORT`), the real guest (`GUEST_WASM`, built by
//! `make guest`), and the real host.

pub mod cases;
pub mod conformance;
pub mod fake_sql;
pub mod http;
pub mod mqtt;
pub mod network;

use std::path::PathBuf;
use std::sync::OnceLock;

use host_harness::replay::Broker;
use host_harness::{ExtensionModule, Host, Runtime};
use serde_json::Value;
use tokio_postgres::{Client, NoTls};

pub fn port() -> u16 {
    std::env::var("PGPORT").ok().and_then(|p| p.parse().ok()).unwrap_or(15432)
}

/// The guest component under test.
pub fn guest_wasm() -> PathBuf {
    let path = std::env::var_os("GUEST_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip2/guest/guest.wasm"));
    assert!(path.exists(), "{} is missing: run `make guest` (or `make test`)", path.display());
    path
}

/// The compiled guest, compiled once per test process.
pub fn guest_module() -> &'static ExtensionModule {
    static MODULE: OnceLock<ExtensionModule> = OnceLock::new();
    MODULE.get_or_init(|| Runtime::new().and_then(|runtime| runtime.load(&guest_wasm())).expect("loading the guest"))
}

async fn connect(database: &str) -> Client {
    let (client, connection) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(port())
        .user("postgres")
        .dbname(database)
        .connect(NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to PostgreSQL on 127.0.0.1:{} (run `make pg-up`): {e}", port()));
    tokio::spawn(connection);
    client
}

/// A database of one test, created afresh (dropped first if a previous run left it).
pub struct TestDb {
    pub name: String,
}

impl TestDb {
    pub async fn create(test: &str) -> TestDb {
        let name = format!("test_{test}");
        // PostgreSQL cuts longer names to 63 bytes: two tests whose names differ only after that
        // would share a database, and drop it under each other.
        assert!(name.len() <= 63, "database name `{name}` is longer than 63 bytes: shorten the test's name");
        let admin = connect("postgres").await;
        // Names come from test code, not from input; they are identifiers, which cannot be bound.
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await.unwrap();
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        TestDb { name }
    }

    /// Pool `pool1` on this database, followed by `hooks` (rule lines).
    pub fn rules(&self, hooks: &str) -> String {
        format!("{}\n{hooks}\n", self.pool_lines("pool1"))
    }

    pub fn pool_lines(&self, pool: &str) -> String {
        format!(
            "backend.pgsql.{pool}.server = 127.0.0.1:{}\n\
             backend.pgsql.{pool}.pool_size = 4\n\
             backend.pgsql.{pool}.username = postgres\n\
             backend.pgsql.{pool}.database = {}",
            port(),
            self.name
        )
    }

    /// A direct connection, for assertions and for setting up odd states.
    pub async fn client(&self) -> Client {
        connect(&self.name).await
    }

    /// A host running the guest with `rules`, with the schema applied.
    pub async fn host(&self, rules: &str) -> Host {
        let host = Host::with_rules(guest_module(), rules, "test.conf", "node1@test").await.expect("rules accepted");
        host.migrate().await.expect("migration");
        host
    }
}

/// The rules of the seed: fetch, publish, ack, with `offline_opts` given as JSON (or empty).
pub fn offline_rules(offline_opts: &str) -> String {
    let opts = if offline_opts.is_empty() { String::new() } else { format!(", \"offline_opts\": {offline_opts}") };
    format!(
        "backend.pgsql.hook.session.subscribed.1 = {{\"topic\": \"#\", \"action\": {{\"function\": \"on_message_fetch\"}}{opts}, \"pool\": \"pool1\"}}\n\
         backend.pgsql.hook.message.publish.1 = {{\"topic\": \"#\", \"action\": {{\"function\": \"on_message_publish\"}}, \"pool\": \"pool1\"}}\n\
         backend.pgsql.hook.message.acked.1 = {{\"topic\": \"#\", \"action\": {{\"function\": \"on_message_acked\"}}, \"pool\": \"pool1\"}}"
    )
}

/// Replays `events` (JSON lines) through `host` like `harness run`, and returns its output lines.
pub async fn replay(host: &Host, events: &str) -> Vec<Value> {
    let mut out = Vec::new();
    Broker::new(host, &mut out).replay(events.as_bytes(), None).await.expect("replay");
    String::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The `deliver` lines of an output, as (clientid, payload) pairs, in order.
pub fn deliveries(output: &[Value]) -> Vec<(String, String)> {
    output
        .iter()
        .filter_map(|line| line.get("deliver"))
        .map(|d| {
            let payload = d.get("payload").or_else(|| d.get("payload_base64")).and_then(Value::as_str).unwrap_or("");
            (d["clientid"].as_str().unwrap().to_owned(), payload.to_owned())
        })
        .collect()
}

/// The `error` lines of an output.
pub fn errors(output: &[Value]) -> Vec<&Value> {
    output.iter().filter_map(|line| line.get("error")).collect()
}

/// Builds JSON-lines events. `publish("p", "t/1", 1, "x")` and friends keep tests readable.
pub mod event {
    use serde_json::json;

    pub fn connect(clientid: &str) -> String {
        json!({"event": "client.connected", "clientid": clientid}).to_string()
    }
    pub fn disconnect(clientid: &str) -> String {
        json!({"event": "client.disconnected", "clientid": clientid}).to_string()
    }
    pub fn subscribe(clientid: &str, filter: &str, qos: u8) -> String {
        json!({"event": "session.subscribed", "clientid": clientid, "topic": filter, "qos": qos}).to_string()
    }
    pub fn subscribe_manual_ack(clientid: &str, filter: &str, qos: u8) -> String {
        json!({"event": "session.subscribed", "clientid": clientid, "topic": filter, "qos": qos, "auto_ack": false})
            .to_string()
    }
    pub fn unsubscribe(clientid: &str, filter: &str) -> String {
        json!({"event": "session.unsubscribed", "clientid": clientid, "topic": filter}).to_string()
    }
    pub fn publish(clientid: &str, topic: &str, qos: u8, payload: &str) -> String {
        json!({"event": "message.publish", "clientid": clientid, "topic": topic, "qos": qos, "payload": payload})
            .to_string()
    }
    pub fn ack(clientid: &str, id: i64) -> String {
        json!({"event": "message.acked", "clientid": clientid, "id": id}).to_string()
    }
    /// Joins events into JSON lines.
    pub fn lines(events: &[String]) -> String {
        events.join("\n")
    }
}

/// A PostgreSQL cluster of one test alone, under `target/<dir>` (stopping or restarting the
/// shared one would disturb the other tests). Stopped when dropped.
pub struct OwnCluster {
    pub port: u16,
    pub base: PathBuf,
}

impl OwnCluster {
    pub fn new(port: u16, dir: &str) -> OwnCluster {
        OwnCluster { port, base: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target").join(dir) }
    }

    /// Started, with a fresh `mqtt` database.
    pub fn fresh(port: u16, dir: &str) -> OwnCluster {
        let cluster = OwnCluster::new(port, dir);
        cluster.pg("up");
        cluster.pg("fresh");
        cluster
    }

    /// Pool `pool1` on this cluster's `mqtt` database, and the example offline rules.
    pub fn offline_rules(&self) -> String {
        format!("{}\n{}", self.pool_lines(), offline_rules(""))
    }

    /// Pool `pool1` on this cluster's `mqtt` database.
    pub fn pool_lines(&self) -> String {
        format!(
            "backend.pgsql.pool1.server = 127.0.0.1:{}\nbackend.pgsql.pool1.username = postgres\n\
             backend.pgsql.pool1.database = mqtt",
            self.port
        )
    }

    /// `scripts/pg.sh <command>` on this cluster: `up`, `down`, `fresh`, `restart`.
    pub fn pg(&self, command: &str) {
        pg_script(self.port, &self.base, command);
    }
}

/// `scripts/pg.sh <command>` on the cluster at `base`.
pub fn pg_script(port: u16, base: &std::path::Path, command: &str) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/pg.sh");
    let status = std::process::Command::new(script)
        .arg(command)
        .env("PGPORT", port.to_string())
        .env("PG_BASE", base)
        .status()
        .expect("running scripts/pg.sh");
    assert!(status.success(), "pg.sh {command} failed");
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        self.pg("down");
    }
}
