//! "Every message once, nothing skipped" off the easy path (issues 17 and 19): overlapping
//! subscriptions, unsubscribe, slow consumers, QoS 2 bursts, one client's bad or huge message,
//! retained messages, restarts. A real broker process, a real PostgreSQL, real MQTT clients.

use std::collections::BTreeSet;
use std::time::Duration;

use integration_tests::cases::Cases;
use integration_tests::http::{get, sample};
use integration_tests::mqtt::{Launcher, Mqtt, database, free_port, payloads, v5};
use integration_tests::{TestDb, offline_rules};
use rumqttc::QoS;

fn broker() -> Launcher {
    Launcher::new(env!("CARGO_BIN_EXE_broker"))
}

fn set(items: impl IntoIterator<Item = String>) -> BTreeSet<String> {
    items.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_never_moves_the_position_of_a_filter_the_client_is_not_subscribed_to() {
    let (_db, rules) = database("guarantee_other_filter", "").await;
    let broker = broker().start("other-filter", &rules).await;
    Mqtt::subscribe_and_leave(broker.port, "s", "a/#").await;
    let mut publisher = Mqtt::connect(broker.port, "p", false).await;
    for i in 0..100 {
        publisher.publish("a/y", QoS::AtLeastOnce, &i.to_string()).await;
    }
    // Back on a/x/c only: one live message, received and acked.
    let mut subscriber = Mqtt::connect(broker.port, "s", false).await;
    subscriber.subscribe("a/x/c", QoS::AtLeastOnce).await;
    publisher.publish("a/x/c", QoS::AtLeastOnce, "live").await;
    assert_eq!(payloads(&subscriber.receive(1).await), ["live"]);
    subscriber.disconnect().await;
    // Back on a/#: the 100 it missed. Not the a/x/c message: the client had it, and a/x/c's
    // position says so (a backlog passes over what the client had through its other filters).
    let mut subscriber = Mqtt::connect(broker.port, "s", false).await;
    subscriber.subscribe("a/#", QoS::AtLeastOnce).await;
    let mut got = subscriber.receive(100).await;
    got.extend(subscriber.until_quiet().await);
    let expected: Vec<String> = (0..100).map(|i| i.to_string()).collect();
    assert_eq!(payloads(&got), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribing_one_of_two_overlapping_filters_keeps_what_the_other_still_matches() {
    let db = TestDb::create("guarantee_unsubscribe").await;
    let rules = db.rules(&offline_rules(r#"{"max_returned_count": 20}"#));
    let broker = broker().start("unsubscribe", &rules).await;
    Mqtt::subscribe_and_leave(broker.port, "s", "a/+/c").await;
    let mut publisher = Mqtt::connect(broker.port, "p", false).await;
    for i in 0..1000 {
        publisher.publish("a/b/c", QoS::AtLeastOnce, &format!("backlog {i}")).await;
    }
    // a/# first (caught up), then a/+/c with its backlog going out.
    let mut subscriber = Mqtt::connect(broker.port, "s", false).await;
    subscriber.subscribe("a/#", QoS::AtLeastOnce).await;
    subscriber.subscribe("a/+/c", QoS::AtLeastOnce).await;
    for i in 0..10 {
        publisher.publish("a/x/c", QoS::AtLeastOnce, &format!("held {i}")).await;
    }
    subscriber.client.unsubscribe("a/+/c").await.unwrap();
    for i in 0..10 {
        publisher.publish("a/y", QoS::AtLeastOnce, &format!("after {i}")).await;
    }
    let mut got = subscriber.quiet().await;
    got.extend(subscriber.until_quiet().await);
    subscriber.disconnect().await;
    let mut subscriber = Mqtt::connect(broker.port, "s", false).await;
    subscriber.subscribe("a/#", QoS::AtLeastOnce).await;
    got.extend(subscriber.quiet().await);
    let seen = set(payloads(&got));
    for i in 0..10 {
        assert!(seen.contains(&format!("held {i}")), "held {i} never arrived");
        assert!(seen.contains(&format!("after {i}")), "after {i} never arrived");
    }
}

/// MQTT 3.1.1: rmqtt sends a client a copy of each message per subscription that matches it.
/// With an in-flight window of 1, the second copy leaves the session's queue only after the
/// first is acked; it must not reach the client. Live and from the backlog, every message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_subscriptions_get_each_message_once_with_an_in_flight_window_of_1() {
    let (_db, rules) = database("guarantee_overlap_window_1", "").await;
    let broker = broker().start_with("overlap-window-1", &rules, "[mqtt]\nmax_inflight = 1\n").await;
    let mut subscriber = Mqtt::connect(broker.port, "s", false).await;
    subscriber.subscribe("a/#", QoS::AtLeastOnce).await;
    subscriber.subscribe("a/+/c", QoS::AtLeastOnce).await;
    subscriber.disconnect().await;
    let mut publisher = Mqtt::connect(broker.port, "p", false).await;
    for i in 0..20 {
        publisher.publish("a/x/c", QoS::AtLeastOnce, &format!("backlog {i}")).await;
    }
    let mut subscriber = Mqtt::connect(broker.port, "s", false).await;
    subscriber.subscribe("a/#", QoS::AtLeastOnce).await;
    subscriber.subscribe("a/+/c", QoS::AtLeastOnce).await;
    let mut got = subscriber.receive(20).await;
    for i in 0..20 {
        publisher.publish("a/x/c", QoS::AtLeastOnce, &format!("live {i}")).await;
    }
    got.extend(subscriber.until_quiet().await);
    let expected: Vec<String> =
        (0..20).map(|i| format!("backlog {i}")).chain((0..20).map(|i| format!("live {i}"))).collect();
    assert_eq!(payloads(&got), expected, "each once, in order");
}

/// Options of a kept session (MQTT 3.1.1 `clean_session` false).
fn kept(options: &mut rumqttc::MqttOptions) {
    options.set_clean_session(false);
}

/// Client "s" subscribes to `t/#` in a kept session and leaves; then `count` messages, `a0`
/// onwards, are published to `t/a` while it is away. Returns their publisher.
async fn kept_session_away_for(port: u16, count: usize) -> Mqtt {
    let mut subscriber = Mqtt::connect_with(port, "s", false, kept).await;
    subscriber.subscribe("t/#", QoS::AtLeastOnce).await;
    subscriber.disconnect().await;
    let mut publisher = Mqtt::connect(port, "p", false).await;
    for i in 0..count {
        publisher.publish("t/a", QoS::AtLeastOnce, &format!("a{i}")).await;
    }
    publisher
}

/// A kept session comes back after 300 messages: rmqtt's own queue replays them while the
/// backlog's pages send them too, and messages published live while the backlog goes out are
/// held behind those duplicates. Every one must come. (The first slice of held messages, all
/// duplicates, was once read as "nothing left", and the live ones behind it never went, while
/// acks of later ones moved the position past them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_messages_held_while_a_kept_sessions_backlog_goes_out_all_arrive() {
    let (_db, rules) = database("guarantee_kept_session_live", "").await;
    let broker = broker().start("kept-session-live", &rules).await;
    let mut publisher = kept_session_away_for(broker.port, 300).await;
    let live = tokio::spawn(async move {
        for i in 0..40 {
            publisher.publish("t/b", QoS::AtLeastOnce, &format!("b{i}")).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let mut subscriber = Mqtt::connect_with(broker.port, "s", false, kept).await;
    subscriber.subscribe("t/#", QoS::AtLeastOnce).await;
    live.await.unwrap();
    let seen = set(payloads(&subscriber.until_quiet().await));
    let missing: Vec<String> = (0..300)
        .map(|i| format!("a{i}"))
        .chain((0..40).map(|i| format!("b{i}")))
        .filter(|p| !seen.contains(p))
        .collect();
    assert!(missing.is_empty(), "never arrived: {missing:?}");
}

/// A kept session leaves with its backlog partly in the broker's session queue (the client read
/// a few messages and acked fewer). rmqtt hands that queue, our forwards in it included, to the
/// connection that resumes the session, whose backlog sends the same messages from the
/// database: each must arrive once (besides the DUP resends of what was in flight).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_left_in_the_broker_queue_by_a_kept_session_goes_once_on_resumption() {
    let (_db, rules) = database("guarantee_kept_queue", "").await;
    let broker = broker().start("kept-queue", &rules).await;
    kept_session_away_for(broker.port, 300).await;
    // Back for a moment: the backlog fills the broker's in-flight window, and the rest of its
    // first slice waits in the session queue. Five are acked.
    let mut subscriber = Mqtt::connect_with(broker.port, "s", true, kept).await;
    let first = subscriber.receive(10).await;
    for message in &first[..5] {
        subscriber.ack(message).await;
    }
    subscriber.disconnect().await;
    let mut subscriber = Mqtt::connect_with(broker.port, "s", false, kept).await;
    let arrived = subscriber.until_quiet().await;
    let fresh = payloads(&arrived.iter().filter(|p| !p.dup).cloned().collect::<Vec<_>>());
    let twice: Vec<&String> =
        fresh.iter().enumerate().filter(|(i, p)| fresh[..*i].contains(p)).map(|(_, p)| p).collect();
    assert!(twice.is_empty(), "sent twice (not as a resend): {twice:?}");
    let (seen, acked) = (set(payloads(&arrived)), set(payloads(&first[..5])));
    let missing: Vec<String> =
        (0..300).map(|i| format!("a{i}")).filter(|p| !seen.contains(p) && !acked.contains(p)).collect();
    assert!(missing.is_empty(), "never arrived: {missing:?}");
}

/// An MQTT 5 client leaves once its acks have arrived (the SUBACK of a round trip comes after
/// them), and its connection is closed.
async fn leave_once_acks_arrived(
    subscriber: &rumqttc::v5::AsyncClient,
    events: &mut tokio::sync::mpsc::UnboundedReceiver<v5::Packet>,
) {
    subscriber.subscribe("round/trip", v5::QoS::AtLeastOnce).await.unwrap();
    v5::until(events, |p| matches!(p, v5::Packet::SubAck(_))).await;
    subscriber.disconnect().await.unwrap();
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(5), events.recv()).await {}
}

/// A subscriber with Receive Maximum `receive_maximum` acking each message `delay` after it came,
/// while more is published than the session queue holds: each message once, across a reconnect.
async fn slow_consumer(name: &str, receive_maximum: u16) {
    let (db, rules) = database(name, "").await;
    let broker = broker().start_with(name, &rules, "[mqtt]\nmax_queue = 200\n").await;
    let (subscriber, mut events) = v5::connect_with(broker.port, "slow", |o| {
        o.set_receive_maximum(Some(receive_maximum)).set_manual_acks(true);
    })
    .await;
    subscriber.subscribe("t", v5::QoS::AtLeastOnce).await.unwrap();
    v5::until(&mut events, |p| matches!(p, v5::Packet::SubAck(_))).await;
    let publishing = tokio::spawn({
        let port = broker.port;
        async move {
            let mut publisher = Mqtt::connect(port, "p", false).await;
            for i in 0..600 {
                publisher.publish("t", QoS::AtLeastOnce, &i.to_string()).await;
            }
        }
    });
    let mut first = Vec::new();
    while first.len() < 300 {
        if let v5::Packet::Publish(p) = v5::until(&mut events, |p| matches!(p, v5::Packet::Publish(_))).await {
            tokio::time::sleep(Duration::from_millis(2)).await;
            subscriber.ack(&p).await.unwrap();
            first.push(String::from_utf8_lossy(&p.payload).into_owned());
        }
    }
    publishing.await.unwrap();
    leave_once_acks_arrived(&subscriber, &mut events).await;
    let stored: i64 = db.client().await.query_one("SELECT count(*) FROM mqtt_msg", &[]).await.unwrap().get(0);
    assert_eq!(stored, 600);

    let mut again = Mqtt::connect(broker.port, "slow", false).await;
    again.subscribe("t", QoS::AtLeastOnce).await;
    let second = payloads(&again.until_quiet().await);
    let repeated: Vec<&String> = second.iter().filter(|p| first.contains(p)).collect();
    assert!(
        repeated.is_empty(),
        "acked, then delivered again: {} of them, e.g. {:?}",
        repeated.len(),
        &repeated[..repeated.len().min(5)]
    );
    let seen = set(first.iter().chain(&second).cloned());
    assert_eq!(seen.len(), 600, "every message at least once");
}

/// MQTT 5 message expiry: messages that expire in the session's queue behind an unacked one
/// are dropped by the broker and never acked. The position must still move past them, or every
/// message acked after them comes again on the next connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_that_expire_on_the_way_do_not_hold_back_the_position() {
    let (_db, rules) = database("guarantee_expired_on_the_way", "").await;
    let broker = broker().start("expired-on-the-way", &rules).await;
    let (subscriber, mut events) = v5::connect_with(broker.port, "s", |o| {
        o.set_receive_maximum(Some(1)).set_manual_acks(true);
    })
    .await;
    subscriber.subscribe("t", v5::QoS::AtLeastOnce).await.unwrap();
    v5::until(&mut events, |p| matches!(p, v5::Packet::SubAck(_))).await;
    let (publisher, mut acks) = v5::connect(broker.port, "p").await;
    let expiring = v5::PublishProperties { message_expiry_interval: Some(1), ..Default::default() };
    for (payload, properties) in [("first", None), ("e0", Some(&expiring)), ("e1", Some(&expiring)), ("after", None)] {
        let publishing = match properties {
            Some(properties) => {
                publisher.publish_with_properties("t", v5::QoS::AtLeastOnce, false, payload, properties.clone()).await
            }
            None => publisher.publish("t", v5::QoS::AtLeastOnce, false, payload).await,
        };
        publishing.unwrap();
        v5::until(&mut acks, |p| matches!(p, v5::Packet::PubAck(_))).await;
    }
    // "first" stays unacked while the two behind it expire in the queue (a window of 1).
    let v5::Packet::Publish(first) = v5::until(&mut events, |p| matches!(p, v5::Packet::Publish(_))).await else {
        unreachable!()
    };
    assert_eq!(first.payload, "first");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    subscriber.ack(&first).await.unwrap();
    let v5::Packet::Publish(after) = v5::until(&mut events, |p| matches!(p, v5::Packet::Publish(_))).await else {
        unreachable!()
    };
    assert_eq!(after.payload, "after", "the expired ones were dropped");
    subscriber.ack(&after).await.unwrap();
    leave_once_acks_arrived(&subscriber, &mut events).await;

    let mut again = Mqtt::connect(broker.port, "s", false).await;
    again.subscribe("t", QoS::AtLeastOnce).await;
    assert_eq!(payloads(&again.until_quiet().await), Vec::<String>::new(), "acked, or expired: nothing comes again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_with_receive_maximum_1_gets_each_message_once() {
    slow_consumer("guarantee_slow_1", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_with_receive_maximum_10_gets_each_message_once() {
    slow_consumer("guarantee_slow_10", 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_of_20_qos_2_publishes_completes_and_each_is_stored_once() {
    let (db, rules) = database("guarantee_qos2_window", "").await;
    let broker = broker().start("qos2-window", &rules).await;
    // paho's default in-flight window; rumqttc sends them back to back.
    let mut publisher = Mqtt::connect_with(broker.port, "p", false, |o| {
        o.set_inflight(20);
    })
    .await;
    for i in 0..20 {
        publisher.client.publish("t", QoS::ExactlyOnce, false, i.to_string()).await.unwrap();
    }
    for _ in 0..20 {
        publisher.until(|i| matches!(i, rumqttc::Incoming::PubComp(_))).await.expect("PUBCOMP, still connected");
    }
    let stored: i64 = db.client().await.query_one("SELECT count(*) FROM mqtt_msg", &[]).await.unwrap().get(0);
    assert_eq!(stored, 20);
}

/// An MQTT 3.1.1 connection driven packet by packet (rumqttc's codec): for what a client library
/// does only on its own schedule, like resending a QoS 2 PUBLISH after a reconnection.
struct Packets {
    stream: tokio::net::TcpStream,
    buffer: bytes::BytesMut,
}

impl Packets {
    async fn connect(port: u16, clientid: &str) -> Packets {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut packets = Packets { stream, buffer: bytes::BytesMut::new() };
        let mut connect = rumqttc::Connect::new(clientid);
        connect.clean_session = false;
        packets.send(|b| connect.write(b)).await;
        assert!(matches!(packets.next().await, rumqttc::Packet::ConnAck(_)));
        packets
    }

    async fn send(&mut self, write: impl FnOnce(&mut bytes::BytesMut) -> Result<usize, rumqttc::Error>) {
        use tokio::io::AsyncWriteExt;
        let mut out = bytes::BytesMut::new();
        write(&mut out).unwrap();
        self.stream.write_all(&out).await.unwrap();
    }

    async fn next(&mut self) -> rumqttc::Packet {
        use tokio::io::AsyncReadExt;
        loop {
            match rumqttc::Packet::read(&mut self.buffer, 1 << 20) {
                Ok(packet) => return packet,
                Err(rumqttc::Error::InsufficientBytes(_)) => {
                    let read =
                        tokio::time::timeout(integration_tests::mqtt::PATIENCE, self.stream.read_buf(&mut self.buffer));
                    assert!(read.await.expect("in time").unwrap() > 0, "connection closed");
                }
                Err(e) => panic!("{e:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos_2_publish_resent_after_a_reconnection_is_stored_once() {
    let (db, rules) = database("guarantee_qos2_resend", "").await;
    let broker = broker().start("qos2-resend", &rules).await;
    Mqtt::subscribe_and_leave(broker.port, "s", "t").await;
    // PUBLISH, PUBREC, and the connection breaks before the PUBREL.
    let mut publisher = Packets::connect(broker.port, "p").await;
    let mut publish = rumqttc::Publish::new("t", QoS::ExactlyOnce, "once");
    publish.pkid = 7;
    publisher.send(|b| publish.write(b)).await;
    assert!(matches!(publisher.next().await, rumqttc::Packet::PubRec(_)));
    drop(publisher);
    // Back: the same PUBLISH with DUP set, then the exchange completes.
    let mut publisher = Packets::connect(broker.port, "p").await;
    publish.dup = true;
    publisher.send(|b| publish.write(b)).await;
    assert!(matches!(publisher.next().await, rumqttc::Packet::PubRec(_)));
    publisher.send(|b| rumqttc::PubRel::new(7).write(b)).await;
    assert!(matches!(publisher.next().await, rumqttc::Packet::PubComp(_)));

    let stored: i64 = db.client().await.query_one("SELECT count(*) FROM mqtt_msg", &[]).await.unwrap().get(0);
    assert_eq!(stored, 1, "stored once");
    let mut subscriber = Mqtt::connect(broker.port, "s", false).await;
    subscriber.subscribe("t", QoS::AtLeastOnce).await;
    assert_eq!(payloads(&subscriber.receive(1).await), ["once"]);
    assert_eq!(payloads(&subscriber.quiet().await), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_restarts_on_its_port_after_a_kill_and_stops_cleanly_on_sigterm() {
    let (_db, rules) = database("guarantee_restart", "").await;
    let launcher = broker();
    let first = launcher.start("restart", &rules).await;
    let port = first.port;
    let mut clients = Vec::new();
    for i in 0..5 {
        let mut client = Mqtt::connect(port, &format!("c{i}"), false).await;
        client.publish("t", QoS::AtLeastOnce, "x").await;
        clients.push(client);
    }
    first.signal("KILL");
    drop(first);
    drop(clients);
    // At once, on the same port: connections of the old process are in TIME_WAIT.
    let mut second = launcher.start_on(port, "restart", &rules, "").await;
    let mut client = Mqtt::connect(port, "after", false).await;
    client.publish("t", QoS::AtLeastOnce, "y").await;
    second.signal("TERM");
    assert_eq!(second.exit_code().await, Some(0), "SIGTERM: a clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_clients_bad_messages_refuse_only_themselves_and_are_delivered_to_nobody() {
    // An audit of every publish into a text column: binary payloads fail it.
    let audit = "backend.pgsql.hook.message.publish.2 = {\"topic\": \"#\", \"action\": {\"sql\": [\"insert into audit (payload) values (${payload})\"]}, \"pool\": \"pool1\"}";
    let (db, rules) = database("guarantee_bad_message", audit).await;
    let broker = broker().start_with("bad-message", &rules, "[publish_batch]\nlinger_us = 3000\n").await;
    db.client().await.batch_execute("CREATE TABLE audit (payload text)").await.unwrap();
    Mqtt::subscribe_and_leave(broker.port, "s", "#").await;

    // Ten good publishers (MQTT 3.1.1: a refusal would close them), and a bad one (MQTT 5), at once.
    let good = Mqtt::publishers(broker.port, "good", 10, 10).await;
    let (bad, mut events) = v5::connect(broker.port, "bad").await;
    let mut refused = 0;
    for i in 0..10u8 {
        bad.publish("bad", v5::QoS::AtLeastOnce, false, vec![0xff, 0xfe, i]).await.unwrap();
        if let v5::Packet::PubAck(ack) = v5::until(&mut events, |p| matches!(p, v5::Packet::PubAck(_))).await
            && ack.reason != v5::PubAckReason::Success
        {
            refused += 1;
        }
    }
    for publisher in good {
        publisher.await.expect("every good publish acknowledged, no connection closed");
    }
    assert_eq!(refused, 10, "each bad message refused");
    let rows: i64 = db.client().await.query_one("SELECT count(*) FROM mqtt_msg", &[]).await.unwrap().get(0);
    assert_eq!(rows, 100, "only the good ones stored (all or nothing per message)");

    let mut subscriber = Mqtt::connect(broker.port, "s", false).await;
    subscriber.subscribe("#", QoS::AtLeastOnce).await;
    let got = payloads(&subscriber.receive(100).await);
    assert!(got.iter().all(|p| !p.starts_with('\u{fffd}')), "no refused message delivered");
    assert_eq!(set(got).len(), 100);
    assert_eq!(payloads(&subscriber.quiet().await), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_5_properties_binary_ones_included_come_back_as_they_were_published() {
    let (_db, rules) = database("guarantee_properties", "").await;
    let broker = broker().start("properties", &rules).await;
    let (subscriber, mut events) = v5::connect(broker.port, "s").await;
    subscriber.subscribe("t", v5::QoS::AtLeastOnce).await.unwrap();
    v5::until(&mut events, |p| matches!(p, v5::Packet::SubAck(_))).await;
    subscriber.disconnect().await.unwrap();
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(5), events.recv()).await {}
    tokio::time::sleep(Duration::from_millis(100)).await;

    let (publisher, mut acks) = v5::connect(broker.port, "p").await;
    let properties = v5::PublishProperties {
        payload_format_indicator: None,
        message_expiry_interval: None,
        topic_alias: None,
        response_topic: Some("reply/to/ü".into()),
        correlation_data: Some(vec![0u8, 1, 0, 255, 0].into()),
        user_properties: vec![("k".into(), "v1".into()), ("k".into(), "v2 ☃".into()), ("empty".into(), String::new())],
        subscription_identifiers: vec![],
        content_type: Some("application/octet-stream".into()),
    };
    publisher
        .publish_with_properties("t", v5::QoS::AtLeastOnce, false, vec![0u8, 1, 2], properties.clone())
        .await
        .unwrap();
    let v5::Packet::PubAck(ack) = v5::until(&mut acks, |p| matches!(p, v5::Packet::PubAck(_))).await else {
        unreachable!()
    };
    assert_eq!(ack.reason, v5::PubAckReason::Success, "a legal message is stored");

    let (subscriber, mut events) = v5::connect(broker.port, "s").await;
    subscriber.subscribe("t", v5::QoS::AtLeastOnce).await.unwrap();
    let v5::Packet::Publish(message) = v5::until(&mut events, |p| matches!(p, v5::Packet::Publish(_))).await else {
        unreachable!()
    };
    let got = message.properties.expect("properties");
    assert_eq!(got.correlation_data, properties.correlation_data);
    assert_eq!(got.response_topic, properties.response_topic);
    assert_eq!(got.content_type, properties.content_type);
    assert_eq!(got.message_expiry_interval, None, "no expiry added to a message that had none");
    let own: Vec<(String, String)> = got.user_properties.into_iter().filter(|(k, _)| k != "x-offline-id").collect();
    assert_eq!(own, properties.user_properties);
    assert_eq!(&message.payload[..], &[0u8, 1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_mqtt_5_properties_come_back_from_the_database_as_they_were_published() {
    let (_db, rules) = database("guarantee_generated_properties", "").await;
    let broker = broker().start("generated-properties", &rules).await;
    Mqtt::subscribe_and_leave(broker.port, "s", "t/#").await;

    let mut cases = Cases(0x9E37_79B9_7F4A_7C15);
    let mut sent = Vec::new();
    let (publisher, mut acks) = v5::connect(broker.port, "p").await;
    for case in 0..60 {
        let text = |cases: &mut Cases| {
            let len = cases.length().min(16_000);
            cases.text(len)
        };
        let properties = v5::PublishProperties {
            payload_format_indicator: (cases.below(2) == 0).then_some(1),
            message_expiry_interval: (cases.below(3) == 0).then(|| 3600 + cases.below(100_000) as u32),
            topic_alias: None,
            response_topic: (cases.below(2) == 0)
                .then(|| format!("reply/{}", text(&mut cases).replace(['+', '#'], "x"))),
            correlation_data: (cases.below(2) == 0).then(|| {
                let len = cases.length();
                cases.bytes(len).into()
            }),
            user_properties: (0..cases.below(5)).map(|_| (text(&mut cases), text(&mut cases))).collect(),
            subscription_identifiers: vec![],
            content_type: (cases.below(2) == 0).then(|| text(&mut cases)),
        };
        let mut properties = properties;
        if case == 0 {
            // The largest string and binary fields MQTT allows.
            properties.user_properties.push(("max".into(), "m".repeat(65_535)));
            properties.correlation_data = Some(cases.bytes(65_535).into());
        }
        let payload_len = cases.below(64) as usize;
        let payload = cases.bytes(payload_len);
        publisher
            .publish_with_properties(
                format!("t/{case}"),
                v5::QoS::AtLeastOnce,
                false,
                payload.clone(),
                properties.clone(),
            )
            .await
            .unwrap();
        let v5::Packet::PubAck(ack) = v5::until(&mut acks, |p| matches!(p, v5::Packet::PubAck(_))).await else {
            unreachable!()
        };
        assert_eq!(ack.reason, v5::PubAckReason::Success, "case {case}: a legal message is stored");
        sent.push((payload, properties));
    }

    let (subscriber, mut events) = v5::connect_with(broker.port, "s", |o| {
        o.set_max_packet_size(Some(4 << 20));
    })
    .await;
    subscriber.subscribe("t/#", v5::QoS::AtLeastOnce).await.unwrap();
    for (case, (payload, properties)) in sent.into_iter().enumerate() {
        let v5::Packet::Publish(message) = v5::until(&mut events, |p| matches!(p, v5::Packet::Publish(_))).await else {
            unreachable!()
        };
        assert_eq!(message.topic, format!("t/{case}").as_bytes());
        assert_eq!(message.payload.to_vec(), payload, "case {case}");
        let got = message.properties.expect("properties");
        assert_eq!(got.payload_format_indicator, properties.payload_format_indicator, "case {case}");
        assert_eq!(got.response_topic, properties.response_topic, "case {case}");
        assert_eq!(got.correlation_data, properties.correlation_data, "case {case}");
        assert_eq!(got.content_type, properties.content_type, "case {case}");
        let own: Vec<(String, String)> = got.user_properties.into_iter().filter(|(k, _)| k != "x-offline-id").collect();
        assert_eq!(own, properties.user_properties, "case {case}");
        // What is left of the interval, counted down while it was stored.
        match (properties.message_expiry_interval, got.message_expiry_interval) {
            (None, None) => {}
            (Some(sent), Some(left)) => {
                assert!(left <= sent && left + 30 >= sent, "case {case}: {sent} s sent, {left} s left")
            }
            other => panic!("case {case}: expiry (sent, left) {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_do_not_block_a_backlog_pages_are_bounded_in_bytes() {
    let (_db, rules) = database("guarantee_large", "").await;
    let broker = broker().start_with("large", &rules, "[mqtt]\nmax_packet_size = 4194304\n").await;
    Mqtt::subscribe_and_leave(broker.port, "s", "#").await;
    let mut publisher = Mqtt::connect_with(broker.port, "p", false, |o| {
        o.set_max_packet_size(8 << 20, 8 << 20);
    })
    .await;
    let big = "x".repeat(900 << 10);
    for i in 0..80 {
        publisher.publish("big/x", QoS::AtLeastOnce, &format!("{i}{big}")).await;
    }
    publisher.publish("small/a", QoS::AtLeastOnce, "small before").await;
    publisher.publish("big/y", QoS::AtLeastOnce, &"y".repeat(2 << 20)).await;
    for i in 0..10 {
        publisher.publish(&format!("small/{i}"), QoS::AtLeastOnce, &format!("small {i}")).await;
    }
    let mut subscriber = Mqtt::connect_with(broker.port, "s", false, |o| {
        o.set_max_packet_size(8 << 20, 8 << 20);
    })
    .await;
    subscriber.subscribe("#", QoS::AtLeastOnce).await;
    let got = subscriber.receive(92).await;
    assert_eq!(got.iter().filter(|p| p.topic == "big/x").count(), 80);
    assert_eq!(got.iter().filter(|p| p.topic == "big/y").map(|p| p.payload.len()).collect::<Vec<_>>(), [2 << 20]);
    assert_eq!(got.iter().filter(|p| p.topic.starts_with("small/")).count(), 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_message_that_traps_the_guest_is_skipped_and_the_rest_of_the_backlog_arrives() {
    // 8 MiB of guest memory holds the largest packet this broker accepts (1 MiB) eight times;
    // a row stored by other means (another broker with a larger limit) can hold more.
    let (db, rules) = database("guarantee_poison", "").await;
    let http = free_port();
    let config = format!("[sandbox]\nmemory_mib = 8\n[http]\nlisten = \"127.0.0.1:{http}\"\n");
    let broker = broker().start_with("poison", &rules, &config).await;
    Mqtt::subscribe_and_leave(broker.port, "s", "#").await;
    let mut publisher = Mqtt::connect(broker.port, "p", false).await;
    publisher.publish("a/1", QoS::AtLeastOnce, "before 1").await;
    publisher.publish("a/2", QoS::AtLeastOnce, "before 2").await;
    db.client()
        .await
        .execute(
            "INSERT INTO mqtt_msg (topic, qos, payload) VALUES ('big/x', 1, decode(repeat('ab', 12 << 20), 'hex'))",
            &[],
        )
        .await
        .unwrap();
    publisher.publish("a/3", QoS::AtLeastOnce, "after 1").await;
    publisher.publish("a/4", QoS::AtLeastOnce, "after 2").await;

    let mut subscriber = Mqtt::connect(broker.port, "s", false).await;
    subscriber.subscribe("#", QoS::AtLeastOnce).await;
    let got = subscriber.receive(4).await;
    assert_eq!(payloads(&got), ["before 1", "before 2", "after 1", "after 2"]);
    assert!(subscriber.quiet().await.is_empty());
    subscriber.disconnect().await;
    // Skipped for good: the acks after it moved the position past it.
    let mut subscriber = Mqtt::connect(broker.port, "s", false).await;
    subscriber.subscribe("#", QoS::AtLeastOnce).await;
    assert!(subscriber.quiet().await.is_empty());
    let (_, metrics) = get(http, "/metrics").await;
    assert_eq!(sample(&metrics, "mqtt_offline_messages_skipped_total{extension=\"offline\"}"), Some(1.0), "counted");
}
