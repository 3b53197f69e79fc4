//! The conformance suite: scenarios written once, as data (`tests/conformance/*.jsonl`), and run
//! against every host through that host's real interface: the harness through its JSON lines
//! ([`Harness`]), the broker through real MQTT 3.1.1 and 5 client connections ([`Mqtt`]). A
//! scenario says what goes in (broker events, as the harness reads them) and what must come out
//! (each client's deliveries, in order; refused publishes); `tests/conformance/README.md` has the
//! format. A host that cannot run a scenario says why in the scenario's header, and the runner
//! prints that instead of passing silently.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

use crate::mqtt::{BrokerProcess, Launcher, Mosquitto, PATIENCE, QUIET, free_port};
use crate::{OwnCluster, TestDb, guest_wasm};

/// One scenario file.
pub struct Scenario {
    pub name: String,
    /// The rules (hook lines; the runner adds the pool).
    pub rules: Vec<String>,
    /// The scenario stops and starts its database: it gets a PostgreSQL cluster of its own.
    own_cluster: bool,
    /// Hosts that cannot run it, and why.
    not_supported: BTreeMap<String, String>,
    steps: Vec<(usize, Step)>,
}

/// A message as a client received it: `"topic payload"`, `" [retained]"` appended when RETAIN
/// was set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery(pub String);

impl Delivery {
    fn new(topic: &str, payload: &[u8], retain: bool) -> Delivery {
        let payload = String::from_utf8_lossy(payload);
        Delivery(if retain { format!("{topic} {payload} [retained]") } else { format!("{topic} {payload}") })
    }
}

enum Step {
    /// A broker event, as the harness reads it (runner-only keys removed).
    Event {
        event: Value,
        leaving_unread: bool,
    },
    /// The client acks the last delivery it took with this `"topic payload"`.
    Ack {
        clientid: String,
        delivery: Delivery,
    },
    /// The client's next deliveries are exactly these, in this order.
    Receives {
        clientid: String,
        deliveries: Vec<Delivery>,
        ack: bool,
    },
    /// The client takes its next `count` deliveries (all that come, for none), whatever they are.
    Takes {
        clientid: String,
        count: Option<usize>,
        ack: bool,
    },
    /// Over the whole scenario, the clients together (the members of a share group, or one
    /// client) got each of `all` at least once, and each of `at_most_once` at most once.
    Got {
        clients: Vec<String>,
        all: Vec<Delivery>,
        at_most_once: Vec<Delivery>,
    },
    /// The publish before this line was refused.
    Refused,
    Sleep(Duration),
    /// Replace the rules (hook lines) and reload them; `applied`: whether the reload must take
    /// effect (else it must be refused, and the running rules stay).
    Reload {
        hooks: Vec<String>,
        applied: bool,
    },
    /// Stop (false) or start (true) the scenario's own PostgreSQL cluster.
    Database(bool),
    /// The host's process restarts (every client has left): it keeps nothing but the database.
    Restart,
}

/// Where the scenarios are.
pub fn directory() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("conformance")
}

impl Scenario {
    pub fn load(name: &str) -> Scenario {
        let path = directory().join(format!("{name}.jsonl"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Scenario::parse(name, &text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn parse(name: &str, text: &str) -> Result<Scenario, String> {
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, line)| (i + 1, line.trim()))
            .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'));
        let (_, header) = lines.next().ok_or("empty")?;
        let header: Value = serde_json::from_str(header).map_err(|e| format!("header: {e}"))?;
        let header = header.as_object().ok_or("the header is not an object")?;
        let mut rules = Vec::new();
        for rule in header.get("rules").and_then(Value::as_array).ok_or("header: no \"rules\"")? {
            rules.extend(rule_lines(rule.as_str().ok_or("header: a rule that is not a string")?));
        }
        let not_supported = match header.get("not_supported") {
            Some(Value::Object(map)) => {
                map.iter().map(|(host, why)| (host.clone(), why.as_str().unwrap_or_default().to_owned())).collect()
            }
            _ => BTreeMap::new(),
        };
        let own_cluster = header.get("database").and_then(Value::as_str) == Some("own");
        let mut steps = Vec::new();
        for (number, line) in lines {
            let repeated = if line.contains("\"event\"") { expand(line) } else { vec![line.to_owned()] };
            for line in repeated {
                let value: Value = serde_json::from_str(&line).map_err(|e| format!("line {number}: {e}"))?;
                let step = step(value).map_err(|e| format!("line {number}: {e}"))?;
                steps.push((number, step));
            }
        }
        Ok(Scenario { name: name.to_owned(), rules, own_cluster, not_supported, steps })
    }

    /// Why `host` cannot run this scenario, if it cannot.
    pub fn not_supported_by(&self, host: &str) -> Option<&str> {
        self.not_supported.get(host).map(String::as_str)
    }
}

/// `"example"` stands for the hook lines of `examples/rules.conf`, what users start from.
fn rule_lines(rule: &str) -> Vec<String> {
    if rule != "example" {
        return vec![rule.to_owned()];
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/rules.conf");
    let text = std::fs::read_to_string(path).expect("examples/rules.conf");
    text.lines().filter(|l| l.starts_with("backend.pgsql.hook.")).map(str::to_owned).collect()
}

/// `{1..3}` in an event line, or in a delivery of an expectation, stands for three, with 1, 2
/// and 3 in its place (one range each).
fn expand(text: &str) -> Vec<String> {
    let range = text.match_indices('{').find_map(|(open, _)| {
        let close = open + text[open..].find('}')?;
        let (low, high) = text[open + 1..close].split_once("..")?;
        Some((open, close, low.parse::<u64>().ok()?, high.parse::<u64>().ok()?))
    });
    match range {
        Some((open, close, low, high)) => {
            (low..=high).map(|n| format!("{}{n}{}", &text[..open], &text[close + 1..])).collect()
        }
        None => vec![text.to_owned()],
    }
}

fn deliveries(value: &Value) -> Result<Vec<Delivery>, String> {
    let mut out = Vec::new();
    for item in value.as_array().ok_or("expected a list of \"topic payload\" strings")? {
        out.extend(expand(item.as_str().ok_or("expected \"topic payload\"")?).into_iter().map(Delivery));
    }
    Ok(out)
}

fn step(mut value: Value) -> Result<Step, String> {
    let text = |v: &Value, key: &str| v[key].as_str().map(str::to_owned).ok_or(format!("no \"{key}\""));
    if value.get("event").is_some() {
        let leaving_unread = value.as_object_mut().and_then(|o| o.remove("leaving_unread")).is_some();
        return Ok(Step::Event { event: value, leaving_unread });
    }
    if let Some(ack) = value.get("ack") {
        return Ok(Step::Ack { clientid: text(ack, "clientid")?, delivery: Delivery(text(ack, "delivery")?) });
    }
    if let Some(ms) = value.get("sleep_ms").and_then(Value::as_u64) {
        return Ok(Step::Sleep(Duration::from_millis(ms)));
    }
    for (key, applied) in [("reload", true), ("reload_refused", false)] {
        if let Some(rules) = value.get(key).and_then(Value::as_array) {
            let hooks = rules.iter().filter_map(Value::as_str).flat_map(rule_lines).collect();
            return Ok(Step::Reload { hooks, applied });
        }
    }
    match value.get("database").and_then(Value::as_str) {
        Some("down") => return Ok(Step::Database(false)),
        Some("up") => return Ok(Step::Database(true)),
        Some(other) => return Err(format!("database: {other}? (down or up)")),
        None => {}
    }
    match value.get("host").and_then(Value::as_str) {
        Some("restart") => return Ok(Step::Restart),
        Some(other) => return Err(format!("host: {other}? (restart)")),
        None => {}
    }
    let expect = value.get("expect").ok_or("not an event, ack, expect, sleep_ms, reload, database or host line")?;
    if expect.get("refused").is_some() {
        return Ok(Step::Refused);
    }
    let clientid = text(expect, "clientid")?;
    let ack = expect.get("ack").and_then(Value::as_bool).unwrap_or(false);
    if let Some(list) = expect.get("receives") {
        return Ok(Step::Receives { clientid, deliveries: deliveries(list)?, ack });
    }
    match expect.get("takes") {
        Some(Value::String(rest)) if rest == "rest" => return Ok(Step::Takes { clientid, count: None, ack }),
        Some(n) => {
            let count = n.as_u64().ok_or("takes: a number or \"rest\"")? as usize;
            return Ok(Step::Takes { clientid, count: Some(count), ack });
        }
        None => {}
    }
    if let Some(got) = expect.get("got") {
        let list = |key: &str| got.get(key).map(deliveries).unwrap_or(Ok(Vec::new()));
        let clients = clientid.split(',').map(str::to_owned).collect();
        return Ok(Step::Got { clients, all: list("all")?, at_most_once: list("at_most_once")? });
    }
    Err("expect: receives, takes, got or refused".into())
}

/// What became of an event.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Done,
    /// A publish the host accepted (and, for QoS 1 and 2, stored when a rule stores it).
    Published,
    /// A publish the host refused, and why.
    Refused(String),
}

/// How many deliveries to wait for.
#[derive(Clone, Copy)]
pub enum Count {
    Exactly(usize),
    /// All that come until nothing more does.
    Rest,
}

/// A delivery and what acking it takes.
pub struct Received<H> {
    pub delivery: Delivery,
    pub handle: H,
}

/// A host under test, driven through its real interface. (Its futures need not be `Send`: a test
/// runs them on its own task.)
#[allow(async_fn_in_trait)]
pub trait Target {
    /// What it needs to ack a delivery.
    type Handle;
    /// Where its rules file is (the runner rewrites it for a reload).
    fn rules_file(&self) -> PathBuf;
    async fn event(&mut self, event: &Value) -> Result<Outcome, String>;
    /// The client's next deliveries.
    async fn deliveries(&mut self, clientid: &str, count: Count) -> Result<Vec<Received<Self::Handle>>, String>;
    /// What the client received and no step took (taken away).
    async fn unread(&mut self, clientid: &str) -> Vec<Received<Self::Handle>>;
    async fn ack(&mut self, clientid: &str, handle: &Self::Handle) -> Result<(), String>;
    /// Reload the rules from the file; an error if the reload did not take effect.
    async fn reload(&mut self) -> Result<(), String>;
    /// Restart the host's process, with the rules of its file.
    async fn restart(&mut self) -> Result<(), String>;
    /// The clients still connected.
    fn clients(&self) -> Vec<String>;
}

/// The database a scenario runs on: a database of the shared server, or a cluster of its own.
pub enum Database {
    Shared(TestDb),
    Own(OwnCluster),
}

impl Database {
    /// `name` is unique per scenario and host.
    pub async fn for_scenario(scenario: &Scenario, name: &str) -> Database {
        if scenario.own_cluster {
            Database::Own(OwnCluster::fresh(free_port(), &format!("pg-{name}")))
        } else {
            Database::Shared(TestDb::create(name).await)
        }
    }

    fn pool_lines(&self) -> String {
        match self {
            Database::Shared(db) => db.pool_lines("pool1"),
            Database::Own(cluster) => cluster.pool_lines(),
        }
    }

    pub fn rules(&self, hooks: &[String]) -> String {
        format!("{}\n{}\n", self.pool_lines(), hooks.join("\n"))
    }
}

/// Runs `scenario` against `target`; the error names the line of the scenario that failed.
pub async fn run<T: Target>(scenario: &Scenario, database: &Database, target: &mut T) -> Result<(), String> {
    let mut taken: HashMap<String, Vec<Received<T::Handle>>> = HashMap::new();
    for (i, (line, step)) in scenario.steps.iter().enumerate() {
        let at = |e: String| format!("{}.jsonl line {line}: {e}", scenario.name);
        match step {
            Step::Event { event, leaving_unread } => {
                let kind = event["event"].as_str().unwrap_or_default();
                let clientid = event["clientid"].as_str().unwrap_or_default().to_owned();
                if kind == "client.disconnected" {
                    let unread = target.unread(&clientid).await;
                    if !unread.is_empty() && !leaving_unread {
                        return Err(at(format!("{clientid} leaves with unexpected deliveries: {:?}", list(&unread))));
                    }
                }
                let outcome = target.event(event).await.map_err(at)?;
                if kind == "message.publish" {
                    let refused_expected = matches!(scenario.steps.get(i + 1), Some((_, Step::Refused)));
                    match (&outcome, refused_expected) {
                        (Outcome::Published, false) | (Outcome::Refused(_), true) => {}
                        (Outcome::Refused(why), false) => return Err(at(format!("publish refused: {why}"))),
                        _ => return Err(at(format!("publish not refused: {outcome:?}"))),
                    }
                }
            }
            Step::Refused => {}
            Step::Ack { clientid, delivery } => {
                let got = taken.get(clientid).map(Vec::as_slice).unwrap_or_default();
                let received = got
                    .iter()
                    .rev()
                    .find(|r| &r.delivery == delivery)
                    .ok_or_else(|| at(format!("{clientid} took no {}", delivery.0)))?;
                target.ack(clientid, &received.handle).await.map_err(at)?;
            }
            Step::Receives { clientid, deliveries, ack } => {
                let got = target.deliveries(clientid, Count::Exactly(deliveries.len())).await;
                let got = got.map_err(|e| at(format!("{clientid}: {e}; expected {:?}", strings(deliveries))))?;
                if got.iter().map(|r| &r.delivery).ne(deliveries) {
                    let (got, expected) = (list(&got), strings(deliveries));
                    return Err(at(format!("{clientid} received {got:?}, expected {expected:?}")));
                }
                take(target, clientid, got, *ack, &mut taken).await.map_err(at)?;
            }
            // A client that acks acks each delivery as it comes: a broker sends only so much
            // before acks come back (its in-flight window).
            Step::Takes { clientid, count: Some(n), ack: true } => {
                for _ in 0..*n {
                    let got = target.deliveries(clientid, Count::Exactly(1)).await;
                    let got = got.map_err(|e| at(format!("{clientid}: {e}")))?;
                    take(target, clientid, got, true, &mut taken).await.map_err(at)?;
                }
            }
            Step::Takes { clientid, count: None, ack: true } => loop {
                let got = target.deliveries(clientid, Count::Rest).await.map_err(|e| at(format!("{clientid}: {e}")))?;
                if got.is_empty() {
                    break;
                }
                take(target, clientid, got, true, &mut taken).await.map_err(at)?;
            },
            Step::Takes { clientid, count, ack: false } => {
                let count = count.map(Count::Exactly).unwrap_or(Count::Rest);
                let got = target.deliveries(clientid, count).await.map_err(|e| at(format!("{clientid}: {e}")))?;
                take(target, clientid, got, false, &mut taken).await.map_err(at)?;
            }
            Step::Got { clients, all, at_most_once } => {
                let clientid = clients.join(",");
                let got: Vec<&Delivery> =
                    clients.iter().flat_map(|c| taken.get(c).into_iter().flatten()).map(|r| &r.delivery).collect();
                let missing: Vec<&str> = all.iter().filter(|d| !got.contains(d)).map(|d| d.0.as_str()).collect();
                if !missing.is_empty() {
                    return Err(at(format!("{clientid} never got {missing:?}")));
                }
                let twice: Vec<&str> = at_most_once
                    .iter()
                    .filter(|d| got.iter().filter(|g| **g == *d).count() > 1)
                    .map(|d| d.0.as_str())
                    .collect();
                if !twice.is_empty() {
                    return Err(at(format!("{clientid} got these more than once: {twice:?}")));
                }
            }
            Step::Sleep(pause) => tokio::time::sleep(*pause).await,
            Step::Reload { hooks, applied } => {
                std::fs::write(target.rules_file(), database.rules(hooks)).map_err(|e| at(e.to_string()))?;
                match (target.reload().await, applied) {
                    (Ok(()), true) | (Err(_), false) => {}
                    (Ok(()), false) => return Err(at("the reload took effect; it should have been refused".into())),
                    (Err(e), true) => return Err(at(e)),
                }
            }
            Step::Database(up) => {
                let Database::Own(cluster) = database else {
                    return Err(at("database lines need \"database\": \"own\" in the header".into()));
                };
                cluster.pg(if *up { "up" } else { "down" });
            }
            Step::Restart => {
                let connected = target.clients();
                if !connected.is_empty() {
                    return Err(at(format!("a restart with clients connected: {connected:?}")));
                }
                target.restart().await.map_err(at)?;
            }
        }
    }
    // Nothing more may come to anyone.
    for clientid in target.clients() {
        let rest = target.deliveries(&clientid, Count::Rest).await.unwrap_or_default();
        if !rest.is_empty() {
            return Err(format!("{}: at the end, {clientid} got unexpected {:?}", scenario.name, list(&rest)));
        }
    }
    Ok(())
}

async fn take<T: Target>(
    target: &mut T,
    clientid: &str,
    got: Vec<Received<T::Handle>>,
    ack: bool,
    taken: &mut HashMap<String, Vec<Received<T::Handle>>>,
) -> Result<(), String> {
    if ack {
        for received in &got {
            target.ack(clientid, &received.handle).await?;
        }
    }
    taken.entry(clientid.to_owned()).or_default().extend(got);
    Ok(())
}

fn list<H>(received: &[Received<H>]) -> Vec<&str> {
    received.iter().map(|r| r.delivery.0.as_str()).collect()
}

fn strings(deliveries: &[Delivery]) -> Vec<&str> {
    deliveries.iter().map(|d| d.0.as_str()).collect()
}

/// A binary of this workspace's build, beside the test binary's directory (`target/release`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let path = exe.parent().and_then(Path::parent).expect("target/<profile>/deps").join(name);
    assert!(path.exists(), "{} is missing: build the workspace (`make test` does)", path.display());
    path
}

/// The harness, `harness run`, fed one line at a time: after each event a `{"control":"mark"}`
/// line, and its output is read up to the mark.
pub struct Harness {
    child: Child,
    stdin: ChildStdin,
    out: mpsc::UnboundedReceiver<String>,
    rules: PathBuf,
    connected: Vec<String>,
    queues: HashMap<String, VecDeque<Received<i64>>>,
}

impl Harness {
    pub fn start(name: &str, rules: &str) -> Harness {
        let dir = crate::mqtt::scratch(name);
        let rules_path = dir.join("rules.conf");
        std::fs::write(&rules_path, rules).unwrap();
        let (harness, module) = (binary("harness"), guest_wasm());
        let load = |command: &mut Command| {
            command.arg("--module").arg(&module).arg("--rules").arg(&rules_path);
        };
        let mut migrate = Command::new(&harness);
        migrate.arg("migrate");
        load(&mut migrate);
        let status = migrate.stdout(Stdio::null()).status().expect("harness migrate");
        assert!(status.success(), "harness migrate failed");
        let mut run = Command::new(&harness);
        run.arg("run");
        load(&mut run);
        let mut child = run
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .env("RUST_LOG", "error")
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", harness.display()));
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, out) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Harness { child, stdin, out, rules: rules_path, connected: Vec::new(), queues: HashMap::new() }
    }

    /// Writes `line` and a mark; returns the output lines before the mark, deliveries queued.
    async fn send(&mut self, line: &str) -> Result<Vec<Value>, String> {
        writeln!(self.stdin, "{line}\n{{\"control\":\"mark\"}}").map_err(|e| format!("harness stdin: {e}"))?;
        self.stdin.flush().map_err(|e| format!("harness stdin: {e}"))?;
        let mut lines = Vec::new();
        loop {
            let line = timeout(PATIENCE, self.out.recv())
                .await
                .map_err(|_| "the harness did not answer in time".to_owned())?
                .ok_or("the harness ended")?;
            let value: Value = serde_json::from_str(&line).map_err(|e| format!("harness output {line}: {e}"))?;
            if value.get("mark").is_some() {
                return Ok(lines);
            }
            if let Some(deliver) = value.get("deliver") {
                let payload = deliver["payload"].as_str().unwrap_or_default();
                let delivery = Delivery::new(
                    deliver["topic"].as_str().unwrap_or_default(),
                    payload.as_bytes(),
                    deliver["retain"] == true,
                );
                let handle = deliver["id"].as_i64().unwrap_or(-1);
                let clientid = deliver["clientid"].as_str().unwrap_or_default().to_owned();
                self.queues.entry(clientid).or_default().push_back(Received { delivery, handle });
            }
            lines.push(value);
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Target for Harness {
    type Handle = i64;

    fn rules_file(&self) -> PathBuf {
        self.rules.clone()
    }

    async fn event(&mut self, event: &Value) -> Result<Outcome, String> {
        // A crash is a disconnect to the harness; a resumed subscription acks as it did.
        let mut line = event.clone();
        if let Some(o) = line.as_object_mut() {
            o.remove("abrupt");
            o.remove("manual_acks");
        }
        let output = self.send(&line.to_string()).await?;
        let clientid = event["clientid"].as_str().unwrap_or_default().to_owned();
        match event["event"].as_str() {
            Some("client.connected") if !self.connected.contains(&clientid) => self.connected.push(clientid),
            Some("client.disconnected") => self.connected.retain(|c| *c != clientid),
            _ => {}
        }
        let error = output.iter().find_map(|line| line.get("error")).map(|e| e["message"].to_string());
        match (event["event"].as_str(), error) {
            (Some("message.publish"), Some(why)) => Ok(Outcome::Refused(why)),
            (Some("message.publish"), None) => Ok(Outcome::Published),
            (_, Some(why)) => Err(format!("the harness reported an error: {why}")),
            (_, None) => Ok(Outcome::Done),
        }
    }

    async fn deliveries(&mut self, clientid: &str, count: Count) -> Result<Vec<Received<i64>>, String> {
        let queue = self.queues.entry(clientid.to_owned()).or_default();
        let n = match count {
            Count::Exactly(n) if n > queue.len() => {
                let got: Vec<&str> = queue.iter().map(|r| r.delivery.0.as_str()).collect();
                return Err(format!("{n} deliveries expected, {} came: {got:?}", got.len()));
            }
            Count::Exactly(n) => n,
            Count::Rest => queue.len(),
        };
        Ok(queue.drain(..n).collect())
    }

    async fn unread(&mut self, clientid: &str) -> Vec<Received<i64>> {
        self.queues.remove(clientid).map(Vec::from).unwrap_or_default()
    }

    async fn ack(&mut self, clientid: &str, id: &i64) -> Result<(), String> {
        let output = self.send(&json!({"event": "message.acked", "clientid": clientid, "id": id}).to_string()).await?;
        match output.iter().find_map(|line| line.get("error")) {
            Some(e) => Err(format!("ack of {id}: {e}")),
            None => Ok(()),
        }
    }

    async fn reload(&mut self) -> Result<(), String> {
        let output = self.send(r#"{"control":"reload"}"#).await?;
        match output.iter().any(|line| line.get("reloaded").is_some()) {
            true => Ok(()),
            false => Err(format!("reload did not take effect: {output:?}")),
        }
    }

    async fn restart(&mut self) -> Result<(), String> {
        self.send(r#"{"control":"restart"}"#).await.map(drop)
    }

    fn clients(&self) -> Vec<String> {
        self.connected.clone()
    }
}

/// MQTT protocol versions the broker is driven with.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

impl Version {
    /// The host's name in a scenario's `not_supported`.
    pub fn host(self) -> &'static str {
        match self {
            Version::V311 => "mqtt-3.1.1",
            Version::V5 => "mqtt-5",
        }
    }
}

/// What acking a delivery takes: the packet as the client library got it.
pub enum Packet {
    V311(rumqttc::Publish),
    V5(rumqttc::v5::mqttbytes::v5::Publish),
}

/// A packet from the broker, the same for both versions.
enum Incoming {
    ConnAck {
        refused: Option<String>,
    },
    /// Boxed: a packet is far larger than the other variants.
    Publish(Box<Received<Packet>>),
    /// PUBACK or, for QoS 2, PUBREC: `refused` carries an error reason code (MQTT 5).
    Ack {
        refused: Option<String>,
    },
    PubComp,
    SubAck,
    UnsubAck,
    Closed(String),
}

enum MqttClient {
    V311(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

struct Connection {
    client: MqttClient,
    /// The task that runs the client's event loop (and owns its socket).
    events: tokio::task::JoinHandle<()>,
    incoming: mpsc::UnboundedReceiver<Incoming>,
    /// Received and not taken yet.
    queue: VecDeque<Received<Packet>>,
    /// Deliveries are acked by the scenario (a subscription said `"auto_ack": false`), not
    /// as they come.
    manual: Arc<AtomicBool>,
    closed: bool,
}

/// A broker (or proxy) process, driven by real MQTT clients (rumqttc), one per client id.
pub struct Mqtt {
    broker: BrokerProcess,
    /// The Mosquitto a proxy is in front of (dropped after the proxy).
    upstream: Option<Mosquitto>,
    /// How it was started, for a restart: its node name and extra configuration.
    node: String,
    extra: String,
    /// Its HTTP endpoint, for the reload counter.
    http: u16,
    version: Version,
    clients: HashMap<String, Connection>,
}

impl Mqtt {
    /// Our broker (`target/release/broker`) with `rules`.
    pub async fn broker(name: &str, rules: &str, version: Version) -> Mqtt {
        let http = free_port();
        let extra = format!("[http]\nlisten = \"127.0.0.1:{http}\"\n");
        let broker = Launcher::new(binary("broker")).start_with(name, rules, &extra).await;
        Mqtt { broker, upstream: None, node: name.to_owned(), extra, http, version, clients: HashMap::new() }
    }

    /// The proxy (`target/release/proxy`) with `rules`, in front of a Mosquitto of its own.
    pub async fn proxy(name: &str, rules: &str, version: Version) -> Mqtt {
        let http = free_port();
        let extra = format!("[http]\nlisten = \"127.0.0.1:{http}\"\n");
        let mosquitto = Mosquitto::start(name, "").await;
        let broker = Launcher::proxy(binary("proxy"), mosquitto.port).start_with(name, rules, &extra).await;
        let upstream = Some(mosquitto);
        Mqtt { broker, upstream, node: name.to_owned(), extra, http, version, clients: HashMap::new() }
    }

    fn connection(&mut self, clientid: &str) -> Result<&mut Connection, String> {
        self.clients.get_mut(clientid).ok_or_else(|| format!("{clientid} is not connected"))
    }

    /// Connects `clientid` as `event` (a `client.connected` line) says: `clean_start` (default
    /// true; MQTT 3.1.1's `clean_session`) and, for MQTT 5, `session_expiry` in seconds (without
    /// it, a client that does not start clean keeps its session for an hour, as 3.1.1's
    /// `clean_session = false` does).
    async fn connect(&mut self, clientid: &str, event: &Value) -> Result<(), String> {
        let username = event["username"].as_str();
        let clean_start = event["clean_start"].as_bool().unwrap_or(true);
        let session_expiry = event["session_expiry"].as_u64().map(|s| s as u32).or((!clean_start).then_some(3600));
        let manual = Arc::new(AtomicBool::new(event["manual_acks"] == true));
        let (tx, incoming) = mpsc::unbounded_channel();
        let port = self.broker.port;
        let (client, events) = match self.version {
            Version::V311 => {
                let mut options = rumqttc::MqttOptions::new(clientid, "127.0.0.1", port);
                options.set_clean_session(clean_start).set_manual_acks(true).set_keep_alive(Duration::from_secs(30));
                if let Some(user) = username {
                    options.set_credentials(user, "");
                }
                let (client, event_loop) = rumqttc::AsyncClient::new(options, 1000);
                let events = tokio::spawn(v311_events(event_loop, client.clone(), manual.clone(), tx));
                (MqttClient::V311(client), events)
            }
            Version::V5 => {
                let mut options = rumqttc::v5::MqttOptions::new(clientid, "127.0.0.1", port);
                options.set_clean_start(clean_start).set_manual_acks(true).set_keep_alive(Duration::from_secs(30));
                options.set_session_expiry_interval(session_expiry);
                if let Some(user) = username {
                    options.set_credentials(user, "");
                }
                let (client, event_loop) = rumqttc::v5::AsyncClient::new(options, 1000);
                let events = tokio::spawn(v5_events(event_loop, client.clone(), manual.clone(), tx));
                (MqttClient::V5(client), events)
            }
        };
        let mut connection = Connection { client, events, incoming, queue: VecDeque::new(), manual, closed: false };
        if let Incoming::ConnAck { refused: Some(why) } =
            connection.until(|i| matches!(i, Incoming::ConnAck { .. })).await?
        {
            return Err(format!("CONNACK refused: {why}"));
        }
        self.clients.insert(clientid.to_owned(), connection);
        Ok(())
    }

    async fn publish(&mut self, event: &Value) -> Result<Outcome, String> {
        let clientid = event["clientid"].as_str().unwrap_or_default();
        let version = self.version;
        let connection = self.connection(clientid)?;
        let topic = event["topic"].as_str().ok_or("publish: no topic")?.to_owned();
        let qos = event["qos"].as_u64().unwrap_or(0) as u8;
        let retain = event["retain"] == true;
        let payload = event["payload"].as_str().unwrap_or_default().as_bytes().to_vec();
        let properties = event.get("properties").and_then(Value::as_object);
        let sent = match &connection.client {
            MqttClient::V311(client) => {
                if properties.is_some_and(|p| !p.is_empty()) {
                    return Err("MQTT 3.1.1 has no properties: list the scenario as not supported".into());
                }
                client.publish(topic, v311_qos(qos), retain, payload).await.map_err(|e| e.to_string())
            }
            MqttClient::V5(client) => {
                let mut props = rumqttc::v5::mqttbytes::v5::PublishProperties::default();
                for (key, value) in properties.into_iter().flatten() {
                    match key.as_str() {
                        "message-expiry-interval" => props.message_expiry_interval = value.as_u64().map(|s| s as u32),
                        "content-type" => props.content_type = value.as_str().map(str::to_owned),
                        other => {
                            props.user_properties.push((other.to_owned(), value.as_str().unwrap_or("").to_owned()))
                        }
                    }
                }
                client
                    .publish_with_properties(topic, v5_qos(qos), retain, payload, props)
                    .await
                    .map_err(|e| e.to_string())
            }
        };
        sent?;
        let answer = match qos {
            // No answer to wait for: a round trip makes sure the broker has handled it.
            0 => return connection.round_trip().await.map(|()| Outcome::Published),
            _ => connection.until(|i| matches!(i, Incoming::Ack { .. } | Incoming::Closed(_))).await?,
        };
        match answer {
            Incoming::Ack { refused: Some(why) } => Ok(Outcome::Refused(why)),
            // MQTT 3.1.1 has no negative PUBACK: the broker closes the connection.
            Incoming::Closed(why) if version == Version::V311 => {
                connection.closed = true;
                Ok(Outcome::Refused(format!("connection closed: {why}")))
            }
            Incoming::Closed(why) => Err(format!("connection closed: {why}")),
            _ if qos == 2 => connection.until(|i| matches!(i, Incoming::PubComp)).await.map(|_| Outcome::Published),
            _ => Ok(Outcome::Published),
        }
    }
}

impl Connection {
    /// Waits for a packet that `wanted` accepts; deliveries that come meanwhile are queued.
    async fn until(&mut self, wanted: impl Fn(&Incoming) -> bool) -> Result<Incoming, String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let incoming = tokio::time::timeout_at(deadline, self.incoming.recv())
                .await
                .map_err(|_| "no answer in time".to_owned())?
                .unwrap_or(Incoming::Closed("the client's event loop ended".into()));
            if wanted(&incoming) {
                return Ok(incoming);
            }
            match incoming {
                Incoming::Publish(received) => self.queue.push_back(*received),
                Incoming::Closed(why) => return Err(format!("connection closed: {why}")),
                _ => {}
            }
        }
    }

    /// UNSUBSCRIBE from nothing, and its UNSUBACK: the broker handles a connection's packets in
    /// order, so what the client sent before (acks included) has arrived.
    async fn round_trip(&mut self) -> Result<(), String> {
        let filter = "conformance/round-trip";
        match &self.client {
            MqttClient::V311(client) => client.unsubscribe(filter).await.map_err(|e| e.to_string())?,
            MqttClient::V5(client) => client.unsubscribe(filter).await.map_err(|e| e.to_string())?,
        }
        self.until(|i| matches!(i, Incoming::UnsubAck)).await.map(|_| ())
    }

    async fn ack(&self, packet: &Packet) -> Result<(), String> {
        match (&self.client, packet) {
            (MqttClient::V311(client), Packet::V311(publish)) => client.ack(publish).await.map_err(|e| e.to_string()),
            (MqttClient::V5(client), Packet::V5(publish)) => client.ack(publish).await.map_err(|e| e.to_string()),
            _ => Err("a packet of the other MQTT version".into()),
        }
    }
}

fn v311_qos(qos: u8) -> rumqttc::QoS {
    match qos {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

fn v5_qos(qos: u8) -> rumqttc::v5::mqttbytes::QoS {
    match qos {
        0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

/// Hands a packet to the connection; false when the loop should end (closed, or nobody listens).
fn pass_on(tx: &mpsc::UnboundedSender<Incoming>, incoming: Incoming) -> bool {
    let end = matches!(incoming, Incoming::Closed(_));
    tx.send(incoming).is_ok() && !end
}

async fn v311_events(
    mut event_loop: rumqttc::EventLoop,
    client: rumqttc::AsyncClient,
    manual: Arc<AtomicBool>,
    tx: mpsc::UnboundedSender<Incoming>,
) {
    use rumqttc::{ConnectReturnCode, Event, Outgoing, Packet as P};
    loop {
        let incoming = match event_loop.poll().await {
            Ok(Event::Incoming(P::ConnAck(ack))) => Incoming::ConnAck {
                refused: (ack.code != ConnectReturnCode::Success).then(|| format!("{:?}", ack.code)),
            },
            Ok(Event::Incoming(P::Publish(publish))) => {
                if !manual.load(Ordering::SeqCst) && publish.qos != rumqttc::QoS::AtMostOnce {
                    let _ = client.ack(&publish).await;
                }
                let delivery = Delivery::new(&publish.topic, &publish.payload, publish.retain);
                Incoming::Publish(Box::new(Received { delivery, handle: Packet::V311(publish) }))
            }
            Ok(Event::Incoming(P::PubAck(_) | P::PubRec(_))) => Incoming::Ack { refused: None },
            Ok(Event::Incoming(P::PubComp(_))) => Incoming::PubComp,
            Ok(Event::Incoming(P::SubAck(_))) => Incoming::SubAck,
            Ok(Event::Incoming(P::UnsubAck(_))) => Incoming::UnsubAck,
            Ok(Event::Incoming(_)) => continue,
            // After DISCONNECT the client is done: polling on would connect it again.
            Ok(Event::Outgoing(Outgoing::Disconnect)) => Incoming::Closed("disconnected".into()),
            Ok(Event::Outgoing(_)) => continue,
            Err(e) => Incoming::Closed(e.to_string()),
        };
        if !pass_on(&tx, incoming) {
            return;
        }
    }
}

async fn v5_events(
    mut event_loop: rumqttc::v5::EventLoop,
    client: rumqttc::v5::AsyncClient,
    manual: Arc<AtomicBool>,
    tx: mpsc::UnboundedSender<Incoming>,
) {
    use rumqttc::Outgoing;
    use rumqttc::v5::Event;
    use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet as P, PubAckReason, PubRecReason};
    loop {
        let incoming = match event_loop.poll().await {
            Ok(Event::Incoming(P::ConnAck(ack))) => Incoming::ConnAck {
                refused: (ack.code != ConnectReturnCode::Success).then(|| format!("{:?}", ack.code)),
            },
            Ok(Event::Incoming(P::Publish(publish))) => {
                if !manual.load(Ordering::SeqCst) && publish.qos != rumqttc::v5::mqttbytes::QoS::AtMostOnce {
                    let _ = client.ack(&publish).await;
                }
                let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                let delivery = Delivery::new(&topic, &publish.payload, publish.retain);
                Incoming::Publish(Box::new(Received { delivery, handle: Packet::V5(publish) }))
            }
            Ok(Event::Incoming(P::PubAck(ack))) => Incoming::Ack {
                refused: (!matches!(ack.reason, PubAckReason::Success | PubAckReason::NoMatchingSubscribers))
                    .then(|| format!("PUBACK {:?}", ack.reason)),
            },
            Ok(Event::Incoming(P::PubRec(rec))) => Incoming::Ack {
                refused: (!matches!(rec.reason, PubRecReason::Success | PubRecReason::NoMatchingSubscribers))
                    .then(|| format!("PUBREC {:?}", rec.reason)),
            },
            Ok(Event::Incoming(P::PubComp(_))) => Incoming::PubComp,
            Ok(Event::Incoming(P::SubAck(_))) => Incoming::SubAck,
            Ok(Event::Incoming(P::UnsubAck(_))) => Incoming::UnsubAck,
            Ok(Event::Incoming(P::Disconnect(d))) => Incoming::Closed(format!("DISCONNECT {:?}", d.reason_code)),
            Ok(Event::Incoming(_)) => continue,
            Ok(Event::Outgoing(Outgoing::Disconnect)) => Incoming::Closed("disconnected".into()),
            Ok(Event::Outgoing(_)) => continue,
            Err(e) => Incoming::Closed(e.to_string()),
        };
        if !pass_on(&tx, incoming) {
            return;
        }
    }
}

impl Target for Mqtt {
    type Handle = Packet;

    fn rules_file(&self) -> PathBuf {
        self.broker.rules.clone()
    }

    async fn event(&mut self, event: &Value) -> Result<Outcome, String> {
        let clientid = event["clientid"].as_str().unwrap_or_default().to_owned();
        match event["event"].as_str().unwrap_or_default() {
            "client.connected" => {
                // A new connection takes over the old one, as in MQTT.
                self.clients.remove(&clientid);
                self.connect(&clientid, event).await?;
            }
            "client.disconnected" => {
                let mut connection = self.clients.remove(&clientid).ok_or(format!("{clientid} is not connected"))?;
                if event["abrupt"] == true {
                    // The connection drops without DISCONNECT: the client crashed.
                    connection.events.abort();
                    tokio::time::sleep(Duration::from_millis(300)).await;
                } else if !connection.closed {
                    connection.round_trip().await?;
                    let _ = match &connection.client {
                        MqttClient::V311(client) => client.disconnect().await.map_err(|e| e.to_string()),
                        MqttClient::V5(client) => client.disconnect().await.map_err(|e| e.to_string()),
                    };
                    let _ = connection.until(|i| matches!(i, Incoming::Closed(_))).await;
                    // The broker removes the session right after it closed the connection.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            "session.subscribed" => {
                let filter = event["topic"].as_str().ok_or("no topic")?.to_owned();
                let qos = event["qos"].as_u64().unwrap_or(0) as u8;
                let connection = self.connection(&clientid)?;
                if event["auto_ack"] == false {
                    connection.manual.store(true, Ordering::SeqCst);
                }
                match &connection.client {
                    MqttClient::V311(client) => {
                        client.subscribe(filter, v311_qos(qos)).await.map_err(|e| e.to_string())?
                    }
                    MqttClient::V5(client) => client.subscribe(filter, v5_qos(qos)).await.map_err(|e| e.to_string())?,
                }
                connection.until(|i| matches!(i, Incoming::SubAck)).await?;
            }
            "session.unsubscribed" => {
                let filter = event["topic"].as_str().ok_or("no topic")?.to_owned();
                let connection = self.connection(&clientid)?;
                match &connection.client {
                    MqttClient::V311(client) => client.unsubscribe(filter).await.map_err(|e| e.to_string())?,
                    MqttClient::V5(client) => client.unsubscribe(filter).await.map_err(|e| e.to_string())?,
                }
                connection.until(|i| matches!(i, Incoming::UnsubAck)).await?;
            }
            "message.publish" => return self.publish(event).await,
            // Housekeeping is the broker's own, every `tick_seconds` (1 s here): wait for two.
            "tick" => tokio::time::sleep(Duration::from_millis(2500)).await,
            // The broker ends a session when its expiry interval (1 s in the scenarios) is over.
            "session.expired" => tokio::time::sleep(Duration::from_millis(2500)).await,
            other => return Err(format!("{other}: not something an MQTT client does")),
        }
        Ok(Outcome::Done)
    }

    async fn deliveries(&mut self, clientid: &str, count: Count) -> Result<Vec<Received<Packet>>, String> {
        let connection = self.connection(clientid)?;
        match count {
            Count::Exactly(n) => {
                while connection.queue.len() < n {
                    match connection.until(|i| matches!(i, Incoming::Publish(_))).await {
                        Ok(Incoming::Publish(received)) => connection.queue.push_back(*received),
                        Ok(_) => unreachable!("until returns what it waited for"),
                        Err(e) => {
                            let got: Vec<&str> = connection.queue.iter().map(|r| r.delivery.0.as_str()).collect();
                            return Err(format!("{n} deliveries expected, {} came ({e}): {got:?}", got.len()));
                        }
                    }
                }
                Ok(connection.queue.drain(..n).collect())
            }
            Count::Rest => {
                while let Ok(Some(incoming)) = timeout(QUIET, connection.incoming.recv()).await {
                    if let Incoming::Publish(received) = incoming {
                        connection.queue.push_back(*received);
                    }
                }
                Ok(connection.queue.drain(..).collect())
            }
        }
    }

    async fn unread(&mut self, clientid: &str) -> Vec<Received<Packet>> {
        match self.clients.get_mut(clientid) {
            Some(connection) => {
                while let Ok(incoming) = connection.incoming.try_recv() {
                    if let Incoming::Publish(received) = incoming {
                        connection.queue.push_back(*received);
                    }
                }
                connection.queue.drain(..).collect()
            }
            None => Vec::new(),
        }
    }

    async fn ack(&mut self, clientid: &str, packet: &Packet) -> Result<(), String> {
        self.connection(clientid)?.ack(packet).await
    }

    async fn reload(&mut self) -> Result<(), String> {
        let series =
            |outcome: &str| format!("mqtt_offline_reloads_total{{extension=\"offline\",outcome=\"{outcome}\"}}");
        let count = async |outcome: &str| {
            let (_, body) = crate::http::get(self.http, "/metrics").await;
            crate::http::sample(&body, &series(outcome)).unwrap_or(0.0)
        };
        let (applied, refused) = (count("applied").await, count("refused").await);
        self.broker.hangup();
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if count("refused").await > refused {
                return Err("the broker refused the reload".into());
            }
            if count("applied").await > applied {
                return Ok(());
            }
        }
        Err("the broker did not reload in time".into())
    }

    /// SIGTERM, then the same broker again on the same port. A proxy's Mosquitto restarts with
    /// it: the broker behind it forgets its sessions as ours does.
    async fn restart(&mut self) -> Result<(), String> {
        self.clients.clear();
        self.broker.signal("TERM");
        self.broker.exit_code().await;
        let rules = std::fs::read_to_string(&self.broker.rules).map_err(|e| e.to_string())?;
        let launcher = match &mut self.upstream {
            Some(mosquitto) => {
                mosquitto.restart().await;
                Launcher::proxy(binary("proxy"), mosquitto.port)
            }
            None => Launcher::new(binary("broker")),
        };
        self.broker = launcher.start_on(self.broker.port, &self.node, &rules, &self.extra).await;
        Ok(())
    }

    fn clients(&self) -> Vec<String> {
        self.clients.iter().filter(|(_, c)| !c.closed).map(|(id, _)| id.clone()).collect()
    }
}
