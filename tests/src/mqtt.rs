//! A real broker (or proxy) process on a real PostgreSQL database, a real Mosquitto behind the
//! proxy, and real MQTT clients (rumqttc): for the broker's and the proxy's tests and benchmarks.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{TestDb, guest_wasm};
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, Outgoing, Publish, QoS};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

/// Long enough for a slow CI machine; a test that waits this long has failed anyway.
pub const PATIENCE: Duration = Duration::from_secs(20);
/// How long to watch for messages that should not come.
pub const QUIET: Duration = Duration::from_millis(700);

/// Starts broker processes from one binary (`env!("CARGO_BIN_EXE_broker")` in the broker's
/// tests), or proxy processes in front of a Mosquitto ([`Launcher::proxy`]).
pub struct Launcher {
    binary: PathBuf,
    /// A proxy's: the port of the broker it connects its clients on to.
    upstream: Option<u16>,
}

/// A broker process; killed when dropped.
pub struct BrokerProcess {
    child: Child,
    pub port: u16,
    pub rules: PathBuf,
}

/// A port free now for a process about to be started. Not from the kernel's ephemeral range
/// (32768 and up), where the clients' own connections take their local ports, and never twice
/// in one test process: a port handed out is bound only by a process started a moment later,
/// and another test picking it meanwhile would collide ("Address already in use").
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const FIRST: u16 = 20_000;
    const PORTS: u16 = 12_000;
    // Test binaries run one after another; the process id spreads them anyway.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let offset = (std::process::id() % u32::from(PORTS)) as u16;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < PORTS, "no free port left in {FIRST}..{}", FIRST + PORTS);
        let port = FIRST + (offset + n) % PORTS;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/tmp/broker-tests").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Launcher {
    pub fn new(binary: impl AsRef<Path>) -> Launcher {
        Launcher { binary: binary.as_ref().to_owned(), upstream: None }
    }

    /// Proxies (`binary`) in front of the broker listening on `upstream`.
    pub fn proxy(binary: impl AsRef<Path>, upstream: u16) -> Launcher {
        Launcher { binary: binary.as_ref().to_owned(), upstream: Some(upstream) }
    }

    /// Starts a broker named `node` with `rules` (written to its own rules file).
    pub async fn start(&self, node: &str, rules: &str) -> BrokerProcess {
        self.start_with(node, rules, "").await
    }

    /// Like [`Launcher::start`], with more TOML lines (`[publish_batch]`, ...). Anonymous clients
    /// may connect unless they have an `[auth]` of their own.
    pub async fn start_with(&self, node: &str, rules: &str, extra: &str) -> BrokerProcess {
        self.spawn(node, Some(rules), extra, true).await
    }

    /// Like [`Launcher::start`], without applying the schema (for a database that is not there).
    pub async fn start_unmigrated(&self, node: &str, rules: &str) -> BrokerProcess {
        self.spawn(node, Some(rules), "", false).await
    }

    /// A broker without any extension: plain rmqtt, for comparison.
    pub async fn start_plain(&self, node: &str) -> BrokerProcess {
        self.spawn(node, None, "", false).await
    }

    /// Like [`Launcher::start_with`], on `port` (a restart on the port of a broker that ended).
    pub async fn start_on(&self, port: u16, node: &str, rules: &str, extra: &str) -> BrokerProcess {
        self.spawn_on(port, node, Some(rules), extra, true).await
    }

    async fn spawn(&self, node: &str, rules: Option<&str>, extra: &str, migrate: bool) -> BrokerProcess {
        self.spawn_on(free_port(), node, rules, extra, migrate).await
    }

    async fn spawn_on(&self, port: u16, node: &str, rules: Option<&str>, extra: &str, migrate: bool) -> BrokerProcess {
        let dir = scratch(node);
        let rules_path = dir.join("rules.conf");
        let mut config = format!("node = \"{node}@127.0.0.1\"\nlisten = \"127.0.0.1:{port}\"\ntick_seconds = 1\n");
        match rules {
            Some(rules) => {
                std::fs::write(&rules_path, rules).unwrap();
                config += &format!(
                    "[[extension]]\nname = \"offline\"\nmodule = \"{}\"\nrules = \"rules.conf\"\n",
                    guest_wasm().display()
                );
            }
            None => config += "extension = []\n",
        }
        match self.upstream {
            // Who may connect is the upstream broker's to say.
            // Retained messages from the database, as with our broker (the rules say), unless
            // `extra` (whose first lines are still in [upstream]) says otherwise.
            Some(upstream) => {
                config += &format!("[upstream]\naddress = \"127.0.0.1:{upstream}\"\n");
                if !extra.contains("retained =") {
                    config += "retained = \"database\"\n";
                }
            }
            // Anonymous clients, unless the test says who may connect.
            None if !extra.contains("[auth]") => config += "[auth]\nallow_anonymous = true\n",
            None => {}
        }
        config += extra;
        let config_path = dir.join("broker.toml");
        std::fs::write(&config_path, config).unwrap();
        let child = Command::new(&self.binary)
            .arg("--config")
            .arg(&config_path)
            .args(migrate.then_some("--migrate"))
            .arg("--cache-dir")
            .arg(scratch("compiled"))
            .stdout(Stdio::null())
            .stderr(match std::env::var_os("BROKER_STDERR") {
                Some(path) => Stdio::from(std::fs::File::create(dir.join(path)).unwrap()),
                None => Stdio::inherit(),
            })
            .env(
                "RUST_LOG",
                std::env::var("BROKER_LOG").unwrap_or_else(|_| "warn,broker=info,host_harness=info".into()),
            )
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.binary.display()));
        let broker = BrokerProcess { child, port, rules: rules_path };
        let ready = Instant::now() + PATIENCE;
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(Instant::now() < ready, "the broker did not start listening on {port}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        broker
    }
}

impl BrokerProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGHUP: reload the module and the rules.
    pub fn hangup(&self) {
        self.signal("HUP");
    }

    /// Sends `signal` (`TERM`, `INT`, `KILL`, ...) to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(status.success());
    }

    /// Waits for the process to end (at most [`PATIENCE`]) and returns its exit code.
    pub async fn exit_code(&mut self) -> Option<i32> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "the broker did not exit");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A Mosquitto broker (Debian's `mosquitto`) on a local port, with its own configuration file:
/// what the proxy's tests put behind it. Killed when dropped.
pub struct Mosquitto {
    child: Child,
    pub port: u16,
    /// Its configuration, for a restart.
    config: PathBuf,
}

impl Mosquitto {
    /// Starts one named `name`, anonymous clients allowed unless `extra` (configuration lines)
    /// says otherwise.
    pub async fn start(name: &str, extra: &str) -> Mosquitto {
        let dir = scratch(&format!("mosquitto-{name}"));
        let port = free_port();
        let anonymous = if extra.contains("allow_anonymous") { "" } else { "allow_anonymous true\n" };
        // No persistence: a restart forgets every session, as a broker restart does. No limit on
        // queued messages: at the default 1000 Mosquitto drops QoS 1/2 messages silently.
        let config = dir.join("mosquitto.conf");
        let text = format!(
            "listener {port} 127.0.0.1\n{anonymous}persistence false\nmax_queued_messages 0\n\
             set_tcp_nodelay true\nlog_dest stderr\nlog_type error\nlog_type warning\n{extra}\n"
        );
        std::fs::write(&config, text).unwrap();
        Mosquitto::spawn(port, config).await
    }

    async fn spawn(port: u16, config: PathBuf) -> Mosquitto {
        // Debian puts it in /usr/sbin, which a user's PATH may not have.
        let binary = ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
            .into_iter()
            .find(|path| Path::new(path).exists())
            .unwrap_or("mosquitto");
        let child = Command::new(binary)
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {binary} (Debian package mosquitto; `make prerequisites`): {e}"));
        let ready = Instant::now() + PATIENCE;
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(Instant::now() < ready, "mosquitto did not start listening on {port}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Mosquitto { child, port, config }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops it (SIGTERM) and starts it again on the same port: its sessions are gone.
    pub async fn restart(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
        let restarted = Mosquitto::spawn(self.port, self.config.clone()).await;
        *self = restarted;
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test database with the example rules and `more` rule lines.
pub async fn database(name: &str, more: &str) -> (TestDb, String) {
    let db = TestDb::create(name).await;
    let rules = format!("{}\n{more}\n", db.rules(&crate::offline_rules("")));
    (db, rules)
}

/// An MQTT 3.1.1 client with its event loop running in a task.
pub struct Mqtt {
    pub client: AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Incoming, String>>,
    /// Messages received while waiting for something else.
    received: Vec<Publish>,
}

impl Mqtt {
    /// Connects with a clean session; with `manual_acks`, received QoS 1/2 messages are acked
    /// only by [`Mqtt::ack`].
    pub async fn connect(port: u16, clientid: &str, manual_acks: bool) -> Mqtt {
        Mqtt::connect_with(port, clientid, manual_acks, |_| {}).await
    }

    /// Like [`Mqtt::connect`], after `more` set what the test needs (the in-flight window, ...).
    pub async fn connect_with(
        port: u16,
        clientid: &str,
        manual_acks: bool,
        more: impl FnOnce(&mut MqttOptions),
    ) -> Mqtt {
        let mut options = MqttOptions::new(clientid, "127.0.0.1", port);
        options.set_clean_session(true).set_manual_acks(manual_acks).set_keep_alive(Duration::from_secs(30));
        more(&mut options);
        let (client, event_loop) = AsyncClient::new(options, 1000);
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(run(event_loop, tx));
        let mut mqtt = Mqtt { client, events, received: Vec::new() };
        mqtt.until(|i| matches!(i, Incoming::ConnAck(_))).await.expect("CONNACK");
        mqtt
    }

    /// A client that subscribes to `filter` (QoS 1) once and leaves: its read position starts
    /// now, and what is published from here on is offline for it.
    pub async fn subscribe_and_leave(port: u16, clientid: &str, filter: &str) {
        let mut client = Mqtt::connect(port, clientid, false).await;
        client.subscribe(filter, QoS::AtLeastOnce).await;
        client.disconnect().await;
    }

    /// `count` publishers publishing at once, each `messages` QoS 1 messages: client `{name}{p}`
    /// to topic `{name}/{p}`, payloads `{p}:0`, `{p}:1`, ... Each task ends when its messages
    /// are all acknowledged.
    pub async fn publishers(port: u16, name: &str, count: usize, messages: usize) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        for p in 0..count {
            let mut publisher = Mqtt::connect(port, &format!("{name}{p}"), false).await;
            let topic = format!("{name}/{p}");
            tasks.push(tokio::spawn(async move {
                for i in 0..messages {
                    publisher.publish(&topic, QoS::AtLeastOnce, &format!("{p}:{i}")).await;
                }
            }));
        }
        tasks
    }

    /// Waits for an incoming packet that `wanted` accepts, keeping messages that arrive
    /// meanwhile. An error when the connection ends or nothing comes in time.
    pub async fn until(&mut self, wanted: impl Fn(&Incoming) -> bool) -> Result<Incoming, String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match timeout(deadline - Instant::now(), self.events.recv()).await {
                Err(_) => return Err("timed out".into()),
                Ok(None) => return Err("event loop ended".into()),
                Ok(Some(Err(e))) => return Err(e),
                Ok(Some(Ok(incoming))) if wanted(&incoming) => return Ok(incoming),
                Ok(Some(Ok(Incoming::Publish(p)))) => self.received.push(p),
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    pub async fn subscribe(&mut self, filter: &str, qos: QoS) {
        self.client.subscribe(filter, qos).await.unwrap();
        self.until(|i| matches!(i, Incoming::SubAck(_))).await.expect("SUBACK");
    }

    /// Publishes and, for QoS 1, waits for the PUBACK.
    pub async fn publish(&mut self, topic: &str, qos: QoS, payload: &str) {
        self.try_publish(topic, qos, false, payload).await.expect("PUBACK");
    }

    /// Publishes; for QoS 1, the PUBACK or why none came.
    pub async fn try_publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: &str) -> Result<(), String> {
        self.client.publish(topic, qos, retain, payload.as_bytes().to_vec()).await.unwrap();
        if qos == QoS::AtLeastOnce {
            self.until(|i| matches!(i, Incoming::PubAck(_))).await?;
        }
        Ok(())
    }

    /// The next `n` messages (those already received first).
    pub async fn receive(&mut self, n: usize) -> Vec<Publish> {
        while self.received.len() < n {
            match self.until(|i| matches!(i, Incoming::Publish(_))).await {
                Ok(Incoming::Publish(p)) => self.received.push(p),
                Ok(_) => unreachable!(),
                Err(e) => panic!("waiting for {n} messages: {e}; got {:?}", payloads(&self.received)),
            }
        }
        self.received.drain(..n).collect()
    }

    /// Whatever arrives within `QUIET`.
    pub async fn quiet(&mut self) -> Vec<Publish> {
        let deadline = Instant::now() + QUIET;
        while let Ok(Some(Ok(incoming))) = timeout(deadline - Instant::now(), self.events.recv()).await {
            if let Incoming::Publish(p) = incoming {
                self.received.push(p);
            }
        }
        std::mem::take(&mut self.received)
    }

    /// Whatever arrives until a `QUIET` window passes with nothing.
    pub async fn until_quiet(&mut self) -> Vec<Publish> {
        let mut all = Vec::new();
        loop {
            let more = self.quiet().await;
            if more.is_empty() {
                return all;
            }
            all.extend(more);
        }
    }

    pub async fn ack(&self, publish: &Publish) {
        self.client.ack(publish).await.unwrap();
    }

    /// Sends DISCONNECT and waits until the broker has closed the connection.
    pub async fn disconnect(mut self) {
        let _ = self.client.disconnect().await;
        let _ = timeout(PATIENCE, async { while let Some(Ok(_)) = self.events.recv().await {} }).await;
        // The broker removes the session right after it closed the connection.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn run(mut event_loop: EventLoop, tx: mpsc::UnboundedSender<Result<Incoming, String>>) {
    loop {
        let event = match event_loop.poll().await {
            Ok(Event::Incoming(incoming)) => Ok(incoming),
            // MQTT: after DISCONNECT the client closes the connection; rumqttc leaves that
            // to whoever drops its event loop.
            Ok(Event::Outgoing(Outgoing::Disconnect)) => Err("disconnected".into()),
            Ok(Event::Outgoing(_)) => continue,
            Err(e) => Err(e.to_string()),
        };
        let end = event.is_err();
        if tx.send(event).is_err() || end {
            return;
        }
    }
}

pub fn payloads(messages: &[Publish]) -> Vec<String> {
    messages.iter().map(|p| String::from_utf8_lossy(&p.payload).into_owned()).collect()
}

/// The MQTT 5 steps the tests need (rumqttc's v5 client).
pub mod v5 {
    use rumqttc::Outgoing;
    pub use rumqttc::v5::mqttbytes::QoS;
    pub use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, Publish, PublishProperties};
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    use tokio::sync::mpsc;

    pub async fn connect(port: u16, clientid: &str) -> (AsyncClient, mpsc::UnboundedReceiver<Packet>) {
        connect_with(port, clientid, |_| {}).await
    }

    /// Connects with a clean start, after `options` set what the test needs.
    pub async fn connect_with(
        port: u16,
        clientid: &str,
        options: impl FnOnce(&mut MqttOptions),
    ) -> (AsyncClient, mpsc::UnboundedReceiver<Packet>) {
        let mut mqtt_options = MqttOptions::new(clientid, "127.0.0.1", port);
        mqtt_options.set_clean_start(true);
        options(&mut mqtt_options);
        let (client, mut event_loop) = AsyncClient::new(mqtt_options, 1000);
        let (tx, mut events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match event_loop.poll().await {
                    Ok(Event::Incoming(packet)) => {
                        if tx.send(packet).is_err() {
                            return;
                        }
                    }
                    // After DISCONNECT the client is done: polling on would connect it again.
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                    Ok(Event::Outgoing(_)) => {}
                }
            }
        });
        until(&mut events, |p| matches!(p, Packet::ConnAck(_))).await;
        (client, events)
    }

    pub async fn until(events: &mut mpsc::UnboundedReceiver<Packet>, wanted: impl Fn(&Packet) -> bool) -> Packet {
        let deadline = tokio::time::Instant::now() + super::PATIENCE;
        loop {
            let packet = tokio::time::timeout_at(deadline, events.recv()).await.expect("in time").expect("connected");
            if wanted(&packet) {
                return packet;
            }
        }
    }
}
