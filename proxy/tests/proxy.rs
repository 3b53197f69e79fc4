//! The proxy in front of a real Mosquitto (Debian's `mosquitto`), on a real PostgreSQL, with
//! real clients (rumqttc 3.1.1 and 5, `mosquitto_pub`/`mosquitto_sub`): what the conformance
//! suite does not say because only a proxy has it (the broker's own authentication, packet ids on
//! two connections, the broker's restarts, several proxies on one broker).

use std::time::Duration;

use integration_tests::mqtt::{BrokerProcess, Launcher, Mosquitto, Mqtt, PATIENCE, database, free_port, payloads, v5};
use integration_tests::network::{certificates, connect_v3, connect_v5, file, mosquitto_passwd, run};
use integration_tests::{TestDb, mqtt::scratch};
use rumqttc::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Mosquitto (with `mosquitto` configuration lines) and a proxy in front of it (with `extra`
/// TOML lines).
struct Stack {
    proxy: BrokerProcess,
    mosquitto: Mosquitto,
}

impl Stack {
    async fn start(name: &str, rules: &str, mosquitto: &str, extra: &str) -> Stack {
        let mosquitto = Mosquitto::start(name, mosquitto).await;
        let proxy = Launcher::proxy(env!("CARGO_BIN_EXE_proxy"), mosquitto.port).start_with(name, rules, extra).await;
        Stack { proxy, mosquitto }
    }
}

async fn stored_count(db: &TestDb) -> i64 {
    db.client().await.query_one("select count(*) from mqtt_msg", &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brokers_passwords_apply_and_a_refusal_reaches_the_client_with_the_brokers_reason() {
    let passwords = scratch("proxy-auth").join("passwd");
    let path = passwords.to_str().unwrap();
    mosquitto_passwd(&["-c", "-b", path, "alice", "secret"]);
    let (_db, rules) = database("proxy_auth", "").await;
    let mosquitto = format!("allow_anonymous false\npassword_file {path}\n");
    let stack = Stack::start("proxy-auth", &rules, &mosquitto, "").await;
    let (proxy, direct) = (stack.proxy.port, stack.mosquitto.port);

    assert_eq!(connect_v3(proxy, Some(("alice", "secret"))).await, Ok(()));
    assert_eq!(connect_v5(proxy, Some(("alice", "secret"))).await, Ok(()));
    // Refused as Mosquitto refuses a client connected to it directly.
    for credentials in [Some(("alice", "wrong")), Some(("mallory", "secret")), None] {
        let refused = connect_v3(proxy, credentials).await;
        assert!(refused.is_err(), "{credentials:?}");
        assert_eq!(refused, connect_v3(direct, credentials).await, "3.1.1, {credentials:?}");
        let refused = connect_v5(proxy, credentials).await;
        assert!(refused.is_err(), "{credentials:?}");
        assert_eq!(refused, connect_v5(direct, credentials).await, "5, {credentials:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_clients_get_their_backlog_through_the_proxy() {
    let certs = certificates("proxy-tls");
    let (_db, rules) = database("proxy_tls", "").await;
    let tls_port = free_port();
    let tls = format!(
        "[tls]\nlisten = \"127.0.0.1:{tls_port}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        file(&certs, "server.crt"),
        file(&certs, "server.key")
    );
    let _stack = Stack::start("proxy-tls", &rules, "", &tls).await;
    let (ca, port) = (file(&certs, "ca.crt"), tls_port.to_string());
    let common = ["-h", "127.0.0.1", "-p", &port, "--cafile", &ca, "-q", "1"];
    let sub = [&common[..], &["-i", "tls-sub", "-c", "-t", "tls/#"]].concat();
    let first = run("mosquitto_sub", &[&sub[..], &["-W", "1"]].concat());
    assert!(String::from_utf8_lossy(&first.stderr).contains("Timed out"), "{first:?}");
    let published = run("mosquitto_pub", &[&common[..], &["-t", "tls/t", "-m", "over tls"]].concat());
    assert!(published.status.success(), "{published:?}");
    let back = run("mosquitto_sub", &[&sub[..], &["-C", "1", "-W", "10"]].concat());
    assert_eq!(String::from_utf8_lossy(&back.stdout), "over tls\n", "{back:?}");
    let rogue = file(&certs, "rogue.crt");
    let untrusted = run("mosquitto_pub", &["-h", "127.0.0.1", "-p", &port, "--cafile", &rogue, "-t", "t", "-m", "x"]);
    assert!(!untrusted.status.success(), "a client that does not trust the proxy's certificate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_cannot_forge_a_stored_id() {
    let (db, rules) = database("proxy_forged", "").await;
    let stack = Stack::start("proxy-forged", &rules, "", "").await;
    let (subscriber, mut events) = v5::connect(stack.proxy.port, "s5").await;
    subscriber.subscribe("t", v5::QoS::AtLeastOnce).await.unwrap();
    v5::until(&mut events, |p| matches!(p, v5::Packet::SubAck(_))).await;
    let (publisher, mut acks) = v5::connect(stack.proxy.port, "p5").await;
    let forged = v5::PublishProperties {
        user_properties: vec![("x-offline-id".into(), "offline:999999".into()), ("a".into(), "b".into())],
        ..Default::default()
    };
    publisher.publish_with_properties("t", v5::QoS::AtLeastOnce, false, "hello", forged).await.unwrap();
    v5::until(&mut acks, |p| matches!(p, v5::Packet::PubAck(_))).await;
    let v5::Packet::Publish(message) = v5::until(&mut events, |p| matches!(p, v5::Packet::Publish(_))).await else {
        unreachable!()
    };
    let stored: i64 = db.client().await.query_one("select max(id) from mqtt_msg", &[]).await.unwrap().get(0);
    let properties = message.properties.expect("properties").user_properties;
    assert_eq!(properties.len(), 2, "{properties:?}");
    assert_eq!(properties[0], ("a".to_owned(), "b".to_owned()));
    assert!(properties[1].0 == "x-offline-id" && properties[1].1.starts_with(&format!("offline:{stored}:")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_the_broker_itself_cannot_forge_a_stored_id_either() {
    let (_db, rules) = database("proxy_forged_direct", "").await;
    let stack = Stack::start("proxy-forged-direct", &rules, "", "").await;
    let port = stack.proxy.port;
    let mut subscriber = Mqtt::connect(port, "fd-sub", false).await;
    subscriber.subscribe("fd/#", QoS::AtLeastOnce).await;
    // Connected to Mosquitto directly, past the proxy: an id far ahead, with a made-up tag.
    let (direct, mut acks) = v5::connect(stack.mosquitto.port, "fd-direct").await;
    let forged = v5::PublishProperties {
        user_properties: vec![("x-offline-id".into(), "offline:999999999:0123456789abcdef".into())],
        ..Default::default()
    };
    direct.publish_with_properties("fd/t", v5::QoS::AtLeastOnce, false, "forged", forged).await.unwrap();
    v5::until(&mut acks, |p| matches!(p, v5::Packet::PubAck(_))).await;
    assert_eq!(payloads(&subscriber.receive(1).await), ["forged"], "delivered as any message");
    subscriber.disconnect().await;
    // Its ack moved no read position: what is stored next comes back.
    let mut publisher = Mqtt::connect(port, "fd-pub", false).await;
    publisher.publish("fd/t", QoS::AtLeastOnce, "real").await;
    let mut subscriber = Mqtt::connect(port, "fd-sub", false).await;
    subscriber.subscribe("fd/#", QoS::AtLeastOnce).await;
    assert_eq!(payloads(&subscriber.receive(1).await), ["real"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_2_goes_through_both_ways_once_from_the_backlog_and_live() {
    let (_db, rules) = database("proxy_qos2", "").await;
    let stack = Stack::start("proxy-qos2", &rules, "", "").await;
    let port = stack.proxy.port;
    let mut subscriber = Mqtt::connect(port, "q2-sub", false).await;
    subscriber.subscribe("q2/#", QoS::ExactlyOnce).await;
    subscriber.disconnect().await;
    let mut publisher = Mqtt::connect(port, "q2-pub", false).await;
    for i in 0..20 {
        publisher.client.publish("q2/t", QoS::ExactlyOnce, false, format!("b{i}")).await.unwrap();
        publisher.until(|i| matches!(i, rumqttc::Incoming::PubComp(_))).await.expect("PUBCOMP");
    }
    let mut subscriber = Mqtt::connect(port, "q2-sub", false).await;
    subscriber.subscribe("q2/#", QoS::ExactlyOnce).await;
    for i in 0..10 {
        publisher.client.publish("q2/t", QoS::ExactlyOnce, false, format!("l{i}")).await.unwrap();
    }
    let got = payloads(&subscriber.receive(30).await);
    let expected: Vec<String> = (0..20).map(|i| format!("b{i}")).chain((0..10).map(|i| format!("l{i}"))).collect();
    assert_eq!(got, expected);
    assert_eq!(payloads(&subscriber.quiet().await), Vec::<String>::new(), "nothing twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brokers_deliveries_and_the_backlog_share_the_clients_receive_maximum() {
    let (_db, rules) = database("proxy_window", "").await;
    let stack = Stack::start("proxy-window", &rules, "", "").await;
    let port = stack.proxy.port;
    Mqtt::subscribe_and_leave(port, "w", "w/#").await;
    let mut publisher = Mqtt::connect(port, "w-pub", false).await;
    for i in 0..15 {
        publisher.publish("w/t", QoS::AtLeastOnce, &format!("b{i}")).await;
    }
    // Receive Maximum 1: one message at a time, whoever sends it.
    let (client, mut events) = v5::connect_with(port, "w", |o| {
        o.set_receive_maximum(Some(1)).set_manual_acks(true);
    })
    .await;
    client.subscribe("w/#", v5::QoS::AtLeastOnce).await.unwrap();
    let live = tokio::spawn(async move {
        for i in 0..15 {
            publisher.publish("w/t", QoS::AtLeastOnce, &format!("l{i}")).await;
        }
    });
    let mut got = Vec::new();
    while got.len() < 30 {
        let v5::Packet::Publish(message) = v5::until(&mut events, |p| matches!(p, v5::Packet::Publish(_))).await else {
            unreachable!()
        };
        got.push(String::from_utf8_lossy(&message.payload).into_owned());
        // Nothing else comes before this one is acked.
        let early = tokio::time::timeout(Duration::from_millis(60), async {
            loop {
                if let Some(v5::Packet::Publish(p)) = events.recv().await {
                    return p;
                }
            }
        });
        if let Ok(extra) = early.await {
            panic!("{:?} came while {:?} was unacked", extra.payload, got.last());
        }
        client.ack(&message).await.unwrap();
    }
    live.await.unwrap();
    let mut sorted = got.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 30, "each once: {got:?}");
    let backlog: Vec<_> = got.iter().filter(|p| p.starts_with('b')).cloned().collect();
    assert_eq!(backlog, (0..15).map(|i| format!("b{i}")).collect::<Vec<_>>(), "the backlog in order");
}

/// A 3.1.1 CONNECT for `clientid` (clean session, keep-alive 60 s).
fn connect_packet(clientid: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, clientid.len() as u8];
    body.extend_from_slice(clientid.as_bytes());
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    packet
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_packet_closes_that_client_only() {
    let (_db, rules) = database("proxy_malformed", "").await;
    let stack = Stack::start("proxy-malformed", &rules, "", "").await;
    let port = stack.proxy.port;
    let mut bystander = Mqtt::connect(port, "bystander", false).await;
    bystander.subscribe("m/#", QoS::AtLeastOnce).await;
    for garbage in [&[0xF0u8, 0x00][..], &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F], &connect_packet("again")] {
        let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        socket.write_all(&connect_packet("bad")).await.unwrap();
        let mut connack = [0u8; 4];
        socket.read_exact(&mut connack).await.unwrap();
        assert_eq!(connack, [0x20, 2, 0, 0], "accepted");
        socket.write_all(garbage).await.unwrap();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(PATIENCE, socket.read_to_end(&mut rest)).await;
        assert!(matches!(closed, Ok(Ok(_)) | Ok(Err(_))), "{garbage:?}: the proxy closes the connection");
    }
    let mut publisher = Mqtt::connect(port, "m-pub", false).await;
    publisher.publish("m/t", QoS::AtLeastOnce, "still here").await;
    assert_eq!(payloads(&bystander.receive(1).await), ["still here"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_in_front_of_one_broker_share_the_database() {
    let (_db, rules) = database("proxy_two", "").await;
    let mosquitto = Mosquitto::start("proxy-two", "").await;
    let launcher = Launcher::proxy(env!("CARGO_BIN_EXE_proxy"), mosquitto.port);
    // One key for both: each reads the ids the other tags.
    let key = "id_key = \"shared secret\"\n";
    let (a, b) =
        (launcher.start_with("proxy-two-a", &rules, key).await, launcher.start_with("proxy-two-b", &rules, key).await);
    // Offline messages: published through one proxy, read back through the other.
    Mqtt::subscribe_and_leave(a.port, "roamer", "two/#").await;
    let mut publisher = Mqtt::connect(b.port, "two-pub", false).await;
    for i in 0..5 {
        publisher.publish("two/t", QoS::AtLeastOnce, &format!("o{i}")).await;
    }
    let mut roamer = Mqtt::connect(b.port, "roamer", false).await;
    roamer.subscribe("two/#", QoS::AtLeastOnce).await;
    assert_eq!(payloads(&roamer.receive(5).await), ["o0", "o1", "o2", "o3", "o4"]);
    // Live messages: the broker routes them between the proxies' clients.
    let mut online = Mqtt::connect(a.port, "online", false).await;
    online.subscribe("two/#", QoS::AtLeastOnce).await;
    publisher.publish("two/t", QoS::AtLeastOnce, "live").await;
    assert_eq!(payloads(&online.receive(1).await), ["live"]);
    assert_eq!(payloads(&roamer.receive(1).await), ["live"]);
    assert_eq!(payloads(&roamer.quiet().await), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_proxy_loses_no_publish_it_acknowledged() {
    let (db, rules) = database("proxy_killed", "").await;
    let mut stack = Stack::start("proxy-killed", &rules, "", "").await;
    let port = stack.proxy.port;
    Mqtt::subscribe_and_leave(port, "k-sub", "k/#").await;
    let mut publisher = Mqtt::connect(port, "k-pub", false).await;
    let acked = tokio::spawn(async move {
        let mut acked = Vec::new();
        for i in 0..100_000 {
            if publisher.try_publish("k/t", QoS::AtLeastOnce, false, &format!("{i}")).await.is_err() {
                break;
            }
            acked.push(i);
        }
        acked
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    stack.proxy.signal("KILL");
    let acked = acked.await.unwrap();
    assert!(acked.len() > 10, "the stream was running: {} acked", acked.len());
    let rows = db.client().await.query("select payload from mqtt_msg", &[]).await.unwrap();
    let stored: std::collections::HashSet<String> =
        rows.iter().map(|r| String::from_utf8_lossy(r.get::<_, &[u8]>(0)).into_owned()).collect();
    let lost: Vec<_> = acked.iter().filter(|i| !stored.contains(&i.to_string())).collect();
    assert!(lost.is_empty(), "acknowledged and not stored: {lost:?}");
    // Back up, the subscriber gets every acknowledged one.
    stack.proxy = Launcher::proxy(env!("CARGO_BIN_EXE_proxy"), stack.mosquitto.port)
        .start_on(port, "proxy-killed", &std::fs::read_to_string(&stack.proxy.rules).unwrap(), "")
        .await;
    let mut subscriber = Mqtt::connect(port, "k-sub", false).await;
    subscriber.subscribe("k/#", QoS::AtLeastOnce).await;
    let got = payloads(&subscriber.receive(stored.len()).await);
    assert!(acked.iter().all(|i| got.contains(&i.to_string())));
    assert_eq!(stored_count(&db).await as usize, stored.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_broker_disconnects_the_clients_and_they_recover_with_nothing_acknowledged_lost() {
    let (_db, rules) = database("proxy_broker_restart", "").await;
    let mut stack = Stack::start("proxy-broker-restart", &rules, "", "").await;
    let port = stack.proxy.port;
    Mqtt::subscribe_and_leave(port, "r-sub", "r/#").await;
    let mut publisher = Mqtt::connect(port, "r-pub", false).await;
    publisher.publish("r/t", QoS::AtLeastOnce, "before").await;
    stack.mosquitto.restart().await;
    publisher.until(|_| false).await.expect_err("the publisher is disconnected");
    let mut publisher = Mqtt::connect(port, "r-pub", false).await;
    publisher.publish("r/t", QoS::AtLeastOnce, "after").await;
    let mut subscriber = Mqtt::connect(port, "r-sub", false).await;
    subscriber.subscribe("r/#", QoS::AtLeastOnce).await;
    assert_eq!(payloads(&subscriber.receive(2).await), ["before", "after"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_reproduce_the_seed_flow_through_the_proxy() {
    let (_db, rules) = database("proxy_seed", "").await;
    let stack = Stack::start("proxy-seed", &rules, "", "").await;
    let port = stack.proxy.port.to_string();
    let sub = ["-h", "127.0.0.1", "-p", &port, "-V", "mqttv311", "-i", "seed-sub", "-c", "-q", "1", "-t", "seed/#"];
    let first = run("mosquitto_sub", &[&sub[..], &["-W", "1"]].concat());
    assert!(String::from_utf8_lossy(&first.stderr).contains("Timed out"), "{first:?}");
    for (version, message) in [("mqttv311", "one"), ("mqttv5", "two"), ("mqttv311", "three")] {
        let args = ["-h", "127.0.0.1", "-p", &port, "-V", version, "-q", "1", "-t", "seed/a", "-m", message];
        assert!(run("mosquitto_pub", &args).status.success());
    }
    let back = run("mosquitto_sub", &[&sub[..], &["-C", "3", "-W", "10"]].concat());
    assert_eq!(String::from_utf8_lossy(&back.stdout), "one\ntwo\nthree\n", "{back:?}");
    let again = run("mosquitto_sub", &[&sub[..], &["-W", "1"]].concat());
    assert_eq!(String::from_utf8_lossy(&again.stdout), "", "read once");
}

/// A 3.1.1 client written out by hand: it sends exactly what a test says, and nothing on its
/// own (rumqttc and libmosquitto send PINGREQs on their own schedules, and never a malformed or
/// half-finished exchange).
struct RawClient(tokio::net::TcpStream);

impl RawClient {
    /// Connects with a clean session.
    async fn connect(port: u16, clientid: &str, keep_alive: u8) -> RawClient {
        RawClient::connect_with(port, clientid, keep_alive, true).await.0
    }

    /// Connects; whether the broker had a session for it.
    async fn connect_with(port: u16, clientid: &str, keep_alive: u8, clean: bool) -> (RawClient, bool) {
        let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut packet = connect_packet(clientid);
        packet[11] = keep_alive;
        packet[9] = if clean { 0x02 } else { 0x00 };
        socket.write_all(&packet).await.unwrap();
        let mut connack = [0u8; 4];
        socket.read_exact(&mut connack).await.unwrap();
        assert_eq!((connack[0], connack[3]), (0x20, 0), "accepted");
        (RawClient(socket), connack[2] == 1)
    }

    async fn send(&mut self, packet: &[u8]) {
        self.0.write_all(packet).await.unwrap();
    }

    async fn subscribe(&mut self, filter: &str) {
        let mut packet = vec![0x82, (5 + filter.len()) as u8, 0, 1, 0, filter.len() as u8];
        packet.extend_from_slice(filter.as_bytes());
        packet.push(1);
        self.send(&packet).await;
    }

    /// The next packet: its first byte and its body; None when the connection closed.
    async fn packet(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut kind = [0u8; 1];
        self.0.read_exact(&mut kind).await.ok()?;
        let (mut length, mut shift) = (0usize, 0);
        loop {
            let mut byte = [0u8; 1];
            self.0.read_exact(&mut byte).await.ok()?;
            length += usize::from(byte[0] & 0x7F) << shift;
            shift += 7;
            if byte[0] & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; length];
        self.0.read_exact(&mut body).await.ok()?;
        Some((kind[0], body))
    }

    /// The next PUBLISH (QoS 1): its packet id and payload; None when the connection closed.
    async fn publish(&mut self) -> Option<(u16, String)> {
        loop {
            let (kind, body) = self.packet().await?;
            if kind >> 4 != 3 {
                continue; // SUBACK, PINGRESP
            }
            let topic = usize::from(u16::from_be_bytes([body[0], body[1]]));
            let id = u16::from_be_bytes([body[2 + topic], body[3 + topic]]);
            return Some((id, String::from_utf8_lossy(&body[4 + topic..]).into_owned()));
        }
    }

    async fn puback(&mut self, id: u16) {
        let [high, low] = id.to_be_bytes();
        self.send(&[0x40, 2, high, low]).await;
    }
}

/// A PUBLISH packet: QoS 0 without an id, else with `id`.
fn publish_packet(topic: &str, qos: u8, id: u16, payload: &str) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&id.to_be_bytes());
    }
    body.extend_from_slice(payload.as_bytes());
    let mut packet = vec![0x30 | (qos << 1), body.len() as u8];
    packet.extend(body);
    packet
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos_2_publish_released_after_a_reconnection_reaches_its_subscribers() {
    let (_db, rules) = database("proxy_qos2_resume", "").await;
    let stack = Stack::start("proxy-qos2-resume", &rules, "", "").await;
    let port = stack.proxy.port;
    let mut subscriber = Mqtt::connect(port, "rel-sub", false).await;
    subscriber.subscribe("rel/#", QoS::ExactlyOnce).await;
    // PUBLISH, PUBREC, and the connection drops before the PUBREL.
    let (mut publisher, _) = RawClient::connect_with(port, "rel-pub", 60, false).await;
    publisher.send(&publish_packet("rel/t", 2, 1, "msg-A")).await;
    assert_eq!(publisher.packet().await, Some((0x50, vec![0, 1])), "PUBREC");
    drop(publisher);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The session resumes: the PUBREL completes the exchange the broker kept.
    let (mut publisher, resumed) = RawClient::connect_with(port, "rel-pub", 60, false).await;
    assert!(resumed, "the broker kept the session");
    publisher.send(&[0x62, 2, 0, 1]).await;
    assert_eq!(publisher.packet().await, Some((0x70, vec![0, 1])), "PUBCOMP");
    publisher.send(&publish_packet("rel/t", 2, 1, "msg-B")).await;
    assert_eq!(publisher.packet().await, Some((0x50, vec![0, 1])), "PUBREC");
    publisher.send(&[0x62, 2, 0, 1]).await;
    assert_eq!(publisher.packet().await, Some((0x70, vec![0, 1])), "PUBCOMP");
    assert_eq!(payloads(&subscriber.receive(2).await), ["msg-A", "msg-B"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_client_published_right_before_it_left_is_stored_and_routed() {
    let (db, rules) = database("proxy_left", "").await;
    let stack = Stack::start("proxy-left", &rules, "", "").await;
    let port = stack.proxy.port;
    let mut subscriber = Mqtt::connect(port, "left-sub", false).await;
    subscriber.subscribe("left/#", QoS::AtLeastOnce).await;
    for (qos, payload, end) in [(1, "then DISCONNECT", true), (0, "qos 0", true), (1, "then gone", false)] {
        let mut publisher = RawClient::connect(port, "left-pub", 60).await;
        let mut packets = publish_packet("left/t", qos, 1, payload);
        if end {
            packets.extend([0xE0, 0]);
        }
        publisher.send(&packets).await;
        drop(publisher);
        assert_eq!(payloads(&subscriber.receive(1).await), [payload]);
    }
    assert_eq!(stored_count(&db).await, 2, "the QoS 1 messages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_to_a_wildcard_or_an_alias_is_refused_before_it_is_stored() {
    let (db, rules) = database("proxy_bad_topic", "").await;
    let stack = Stack::start("proxy-bad-topic", &rules, "", "").await;
    for topic in ["bad/#", "bad/+/x", ""] {
        let mut publisher = RawClient::connect(stack.proxy.port, "bad-pub", 60).await;
        publisher.send(&publish_packet(topic, 1, 1, "x")).await;
        assert_eq!(publisher.packet().await, None, "{topic:?}: the connection closes without a PUBACK");
    }
    assert_eq!(stored_count(&db).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_busy_acking_a_long_backlog_keeps_its_broker_connection() {
    let (_db, rules) = database("proxy_keepalive", "").await;
    let stack = Stack::start("proxy-keepalive", &rules, "", "").await;
    let port = stack.proxy.port;
    Mqtt::subscribe_and_leave(port, "slow", "ka/#").await;
    let mut publisher = Mqtt::connect(port, "ka-pub", false).await;
    for i in 0..100 {
        publisher.publish("ka/t", QoS::AtLeastOnce, &format!("b{i}")).await;
    }
    // Keep-alive 1 s: Mosquitto closes a connection it hears nothing on for 1.5 s (it looks
    // every few seconds: a client silent for 5.4 s was closed at keep-alive 2). The client sends
    // only PUBACKs for 10 s, which the proxy does not pass on (the backlog is its own).
    let mut slow = RawClient::connect(port, "slow", 1).await;
    slow.subscribe("ka/#").await;
    for i in 0..100 {
        let (id, payload) = slow.publish().await.expect("connected");
        assert_eq!(payload, format!("b{i}"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        slow.puback(id).await;
    }
    publisher.publish("ka/t", QoS::AtLeastOnce, "live").await;
    let live = tokio::time::timeout(PATIENCE, slow.publish()).await.expect("in time");
    assert_eq!(live.map(|(_, payload)| payload).as_deref(), Some("live"), "the broker still routes to it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_come_from_the_brokers_store_by_default_once() {
    let (_db, rules) = database("proxy_retained", "").await;
    let stack = Stack::start("proxy-retained", &rules, "", "retained = \"broker\"\n").await;
    let mut publisher = Mqtt::connect(stack.proxy.port, "ret-pub", false).await;
    publisher.try_publish("ret/t", QoS::AtLeastOnce, true, "kept").await.unwrap();
    let mut newcomer = Mqtt::connect(stack.proxy.port, "ret-new", false).await;
    newcomer.subscribe("ret/#", QoS::AtLeastOnce).await;
    let got = newcomer.receive(1).await;
    assert_eq!((payloads(&got), got[0].retain), (vec!["kept".to_owned()], true));
    assert_eq!(payloads(&newcomer.quiet().await), Vec::<String>::new());
}

/// A v5 client "brief" with a 1 s session subscribes to `brief/#` and leaves; the session
/// expires; `m1` is published; it comes back: what it gets.
async fn after_session_expiry(name: &str, extra: &str) -> Vec<String> {
    // As the example rules: an ended subscription's read position goes.
    let unsubscribed = "backend.pgsql.hook.session.unsubscribed.1 = {\"topic\": \"#\", \"action\": {\"sql\": \
        [\"delete from mqtt_acked where clientid = ${clientid} and topic = ${topic}\"]}, \"pool\": \"pool1\"}";
    let (_db, rules) = database(name, unsubscribed).await;
    let stack = Stack::start(name, &rules, "", extra).await;
    let port = stack.proxy.port;
    let session = |o: &mut rumqttc::v5::MqttOptions| {
        o.set_clean_start(false).set_session_expiry_interval(Some(1));
    };
    let (client, mut events) = v5::connect_with(port, "brief", session).await;
    client.subscribe("brief/#", v5::QoS::AtLeastOnce).await.unwrap();
    v5::until(&mut events, |p| matches!(p, v5::Packet::SubAck(_))).await;
    client.disconnect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut publisher = Mqtt::connect(port, "brief-pub", false).await;
    publisher.publish("brief/t", QoS::AtLeastOnce, "m1").await;
    let mut back = Mqtt::connect(port, "brief", false).await;
    back.subscribe("brief/#", QoS::AtLeastOnce).await;
    payloads(&back.quiet().await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_ends_its_positions_unless_the_proxy_is_told_not_to() {
    // The example rules delete the position: back, the client starts as a new subscriber.
    assert_eq!(after_session_expiry("proxy_expiry_on", "").await, Vec::<String>::new());
    // Several proxies: positions stay for position_idle to clean up.
    assert_eq!(after_session_expiry("proxy_expiry_off", "expire_sessions = false\n").await, ["m1"]);
}

/// Resident memory of process `pid`, in MiB.
fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_publishing_faster_than_the_store_is_held_back_not_buffered() {
    let (_db, rules) = database("proxy_flood", "").await;
    let stack = Stack::start("proxy-flood", &rules, "", "").await;
    let mut flood = RawClient::connect(stack.proxy.port, "flood", 60).await;
    let burst: Vec<u8> = (0..64).flat_map(|_| publish_packet("flood/t", 0, 0, &"x".repeat(100))).collect();
    // QoS 0 has no flow control: two seconds of as fast as the socket takes it.
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut sent = 0usize;
    while tokio::time::Instant::now() < until {
        if tokio::time::timeout(Duration::from_millis(100), flood.0.write_all(&burst)).await.is_ok() {
            sent += burst.len();
        }
    }
    let rss = rss_mib(stack.proxy.pid());
    assert!(sent > 20 << 20, "the flood ran: {} MiB sent", sent >> 20);
    // The queue of publishes waiting for the store is bounded (16 MiB of payload): the rest
    // waits in the client's socket.
    assert!(rss < 200, "{rss} MiB resident after {} MiB of publishes", sent >> 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_message_over_the_clients_maximum_packet_size_is_discarded_and_counts_as_read() {
    let (_db, rules) = database("proxy_max_packet", "").await;
    let stack = Stack::start("proxy-max-packet", &rules, "", "").await;
    let port = stack.proxy.port;
    Mqtt::subscribe_and_leave(port, "small", "mp/#").await;
    let mut publisher = Mqtt::connect(port, "mp-pub", false).await;
    for payload in ["small1".to_owned(), "x".repeat(1000), "small2".to_owned()] {
        publisher.publish("mp/t", QoS::AtLeastOnce, &payload).await;
    }
    // Maximum Packet Size 300: the 1000-byte message cannot go (MQTT: the server discards it).
    for expected in [&["small1", "small2"][..], &[]] {
        let (client, mut events) = v5::connect_with(port, "small", |o| {
            o.set_max_packet_size(Some(300));
        })
        .await;
        client.subscribe("mp/#", v5::QoS::AtLeastOnce).await.unwrap();
        let mut got = Vec::new();
        while let Ok(Some(packet)) = tokio::time::timeout(Duration::from_millis(700), events.recv()).await {
            if let v5::Packet::Publish(p) = packet {
                got.push(String::from_utf8_lossy(&p.payload).into_owned());
            }
        }
        assert_eq!(got, expected, "the second time: nothing, all of it read");
        client.disconnect().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
