//! The broker as users run it: a real broker process with the real extension, a real
//! PostgreSQL, and real MQTT clients.

use std::collections::BTreeSet;

use integration_tests::TestDb;
use integration_tests::mqtt::{Launcher, Mqtt, PATIENCE, database, payloads, v5};
use rumqttc::{Incoming, QoS};

fn broker() -> Launcher {
    Launcher::new(env!("CARGO_BIN_EXE_broker"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_0_is_stored_only_by_on_message_store() {
    let archive = "backend.pgsql.hook.message.publish.2 = {\"topic\": \"log/#\", \"action\": {\"function\": \"on_message_store\"}, \"pool\": \"pool1\"}";
    let (db, rules) = database("broker_qos0", archive).await;
    let broker = broker().start("qos0", &rules).await;
    Mqtt::subscribe_and_leave(broker.port, "s", "#").await;

    let mut publisher = Mqtt::connect(broker.port, "p", false).await;
    publisher.publish("news/a", QoS::AtMostOnce, "qos 0, not stored").await;
    publisher.publish("log/a", QoS::AtMostOnce, "qos 0, archived").await;
    publisher.publish("news/a", QoS::AtLeastOnce, "qos 1, stored").await;
    let rows = db.client().await.query("SELECT topic, qos FROM mqtt_msg ORDER BY id", &[]).await.unwrap();
    let stored: Vec<(String, i16)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(stored, [("log/a".to_owned(), 0), ("news/a".to_owned(), 1)]);

    let mut subscriber = Mqtt::connect(broker.port, "s", false).await;
    subscriber.subscribe("#", QoS::AtLeastOnce).await;
    let got = subscriber.receive(2).await;
    assert_eq!(payloads(&got), ["qos 0, archived", "qos 1, stored"]);
    assert_eq!(got[0].qos, QoS::AtMostOnce, "at the lower of the message's and the subscription's QoS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_brokers_share_one_database_publish_on_one_and_come_back_on_the_other() {
    let (_db, rules) = database("broker_two_nodes", "").await;
    let first = broker().start("node-a", &rules).await;
    let second = broker().start("node-b", &rules).await;
    Mqtt::subscribe_and_leave(first.port, "roamer", "fleet/#").await;

    let mut publisher = Mqtt::connect(first.port, "p", false).await;
    for i in 1..=4 {
        publisher.publish(&format!("fleet/{i}"), QoS::AtLeastOnce, &i.to_string()).await;
    }
    let mut subscriber = Mqtt::connect(second.port, "roamer", false).await;
    subscriber.subscribe("fleet/#", QoS::AtLeastOnce).await;
    assert_eq!(payloads(&subscriber.receive(4).await), ["1", "2", "3", "4"]);
    assert_eq!(payloads(&subscriber.quiet().await), Vec::<String>::new());
    subscriber.disconnect().await;

    let mut subscriber = Mqtt::connect(first.port, "roamer", false).await;
    subscriber.subscribe("fleet/#", QoS::AtLeastOnce).await;
    assert_eq!(payloads(&subscriber.quiet().await), Vec::<String>::new(), "read on one node is read on all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_share_batches_and_every_message_is_stored_once() {
    let (db, rules) = database("broker_group_commit", "").await;
    let broker =
        broker().start_with("group-commit", &rules, "[publish_batch]\nmax_messages = 64\nlinger_us = 2000\n").await;
    Mqtt::subscribe_and_leave(broker.port, "s", "load/#").await;

    let publishers = Mqtt::publishers(broker.port, "load", 20, 20).await;
    for publisher in publishers {
        publisher.await.unwrap();
    }
    // Rows inserted by one transaction share its xmin: fewer transactions than messages.
    let client = db.client().await;
    let row = client.query_one("SELECT count(*), count(DISTINCT xmin::text) FROM mqtt_msg", &[]).await.unwrap();
    let (stored, transactions): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(stored, 400);
    assert!(transactions <= 200, "{transactions} transactions for 400 messages from 20 publishers at once");

    let mut subscriber = Mqtt::connect(broker.port, "s", false).await;
    subscriber.subscribe("load/#", QoS::AtLeastOnce).await;
    let got = payloads(&subscriber.receive(400).await);
    assert_eq!(payloads(&subscriber.quiet().await), Vec::<String>::new());
    for p in 0..20 {
        let own: Vec<&String> = got.iter().filter(|m| m.starts_with(&format!("{p}:"))).collect();
        let expected: Vec<String> = (0..20).map(|i| format!("{p}:{i}")).collect();
        assert_eq!(own, expected.iter().collect::<Vec<_>>(), "publisher {p}: each once, in its order");
    }
}

/// Four brokers store into one database at once while subscribers on a fifth keep coming back
/// for their backlogs. Ids are drawn at INSERT and become visible at COMMIT: without the
/// commit-order lock a fetch can see a message before one with a lower id has committed, and its
/// ack moves the position past that one, which is then never delivered. Nobody publishes on the
/// fifth broker, so everything the subscribers get comes from the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_brokers_storing_at_once_skip_nothing_for_subscribers_that_keep_coming_back() {
    const PUBLISHERS: usize = 5;
    const MESSAGES: usize = 300;
    const READERS: usize = 8;
    let (_db, rules) = database("broker_four_brokers", "").await;
    let reader = broker().start("four-reader", &rules).await;
    for r in 0..READERS {
        Mqtt::subscribe_and_leave(reader.port, &format!("s{r}"), "load/#").await;
    }
    let mut brokers = Vec::new();
    for b in 0..4 {
        brokers.push(broker().start(&format!("four-{b}"), &rules).await);
    }
    // Paced, so that the subscribers stay at the head of the table, where commits are in flight.
    let mut publishers = Vec::new();
    for (b, broker) in brokers.iter().enumerate() {
        for p in 0..PUBLISHERS {
            let mut publisher = Mqtt::connect(broker.port, &format!("p{b}-{p}"), false).await;
            publishers.push(tokio::spawn(async move {
                for i in 0..MESSAGES {
                    publisher.publish(&format!("load/{b}/{p}"), QoS::AtLeastOnce, &format!("{p}:{i}")).await;
                    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
                }
            }));
        }
    }
    let expected: BTreeSet<String> = (0..4)
        .flat_map(|b| (0..PUBLISHERS).flat_map(move |p| (0..MESSAGES).map(move |i| format!("{b}/{p}:{i}"))))
        .collect();
    let expected = std::sync::Arc::new(expected);
    let readers: Vec<_> = (0..READERS)
        .map(|r| {
            let (expected, port) = (expected.clone(), reader.port);
            tokio::spawn(async move {
                // Payloads are `{p}:{i}` on topic `load/{b}/{p}`: named by broker, publisher and
                // sequence.
                let name = |p: &rumqttc::Publish| {
                    let sequence = String::from_utf8_lossy(&p.payload).split(':').nth(1).unwrap().to_owned();
                    format!("{}:{sequence}", &p.topic["load/".len()..])
                };
                let mut got = BTreeSet::new();
                let deadline = tokio::time::Instant::now() + 2 * PATIENCE;
                let mut visits = 0;
                while got.len() < expected.len() {
                    let missing: Vec<_> = expected.difference(&got).take(10).collect();
                    assert!(tokio::time::Instant::now() < deadline, "s{r} after {visits} visits misses {missing:?}...");
                    let mut subscriber = Mqtt::connect(port, &format!("s{r}"), false).await;
                    subscriber.subscribe("load/#", QoS::AtLeastOnce).await;
                    let publish = |i: &Incoming| matches!(i, Incoming::Publish(_));
                    let window = tokio::time::Instant::now() + std::time::Duration::from_millis(30);
                    while let Ok(Ok(Incoming::Publish(p))) =
                        tokio::time::timeout_at(window, subscriber.until(publish)).await
                    {
                        got.insert(name(&p));
                    }
                    // The client acks what it receives as it comes: each message up to the end
                    // of the connection counts.
                    let _ = subscriber.client.disconnect().await;
                    while let Ok(Incoming::Publish(p)) = subscriber.until(publish).await {
                        got.insert(name(&p));
                    }
                    // The broker removes the session right after it closed the connection.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    visits += 1;
                }
                assert_eq!(&got, &*expected);
                visits
            })
        })
        .collect();
    for publisher in publishers {
        publisher.await.unwrap();
    }
    let mut visits = 0;
    for reader in readers {
        visits += reader.await.unwrap();
    }
    assert!(visits > 10 * READERS, "the subscribers came back only {visits} times");
}

/// Rules whose pool points at a port where no PostgreSQL listens.
fn unreachable_database(rules: &str, db: &TestDb) -> String {
    rules.replace(&format!("127.0.0.1:{}", integration_tests::port()), "127.0.0.1:1").replace(&db.name, "nowhere")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_database_unavailable_a_publisher_gets_no_success_ack_and_nobody_gets_the_message() {
    let (db, rules) = database("broker_database_down", "").await;
    let broker = broker().start_unmigrated("database-down", &unreachable_database(&rules, &db)).await;
    let mut online = Mqtt::connect(broker.port, "online", false).await;
    online.subscribe("t", QoS::AtLeastOnce).await;

    // MQTT 3.1.1 has no negative PUBACK: the connection closes without one.
    let mut publisher = Mqtt::connect(broker.port, "p3", false).await;
    let outcome = publisher.try_publish("t", QoS::AtLeastOnce, false, "not stored").await;
    assert!(outcome.is_err(), "no PUBACK for a message that was not stored");

    // MQTT 5: a PUBACK with an error reason code.
    let (client, mut events) = v5::connect(broker.port, "p5").await;
    client.publish("t", v5::QoS::AtLeastOnce, false, "not stored either").await.unwrap();
    let ack = v5::until(&mut events, |p| matches!(p, v5::Packet::PubAck(_))).await;
    let v5::Packet::PubAck(ack) = ack else { unreachable!() };
    assert_eq!(ack.reason, v5::PubAckReason::ImplementationSpecificError);

    assert_eq!(payloads(&online.quiet().await), Vec::<String>::new(), "a refused message is not routed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_5_subscribers_see_the_stored_id_as_a_user_property() {
    let (_db, rules) = database("broker_v5_id", "").await;
    let broker = broker().start("v5-id", &rules).await;
    let (subscriber, mut events) = v5::connect(broker.port, "s5").await;
    subscriber.subscribe("t", v5::QoS::AtLeastOnce).await.unwrap();
    v5::until(&mut events, |p| matches!(p, v5::Packet::SubAck(_))).await;
    let mut publisher = Mqtt::connect(broker.port, "p", false).await;
    publisher.publish("t", QoS::AtLeastOnce, "hello").await;
    let v5::Packet::Publish(message) = v5::until(&mut events, |p| matches!(p, v5::Packet::Publish(_))).await else {
        unreachable!()
    };
    let properties = message.properties.expect("properties").user_properties;
    let [(key, value)] = properties.as_slice() else { panic!("{properties:?}") };
    assert_eq!(key, "x-offline-id");
    assert!(value.starts_with("offline:1:"), "<extension>:<id>:<tag>: {value}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_subscriptions_are_applied_on_connect_and_bring_their_backlog() {
    let lookup = "backend.pgsql.hook.client.connected.1 = {\"action\": {\"function\": \"on_subscribe_lookup\"}, \"pool\": \"pool1\"}\n\
                  backend.pgsql.hook.session.subscribed.2 = {\"topic\": \"#\", \"action\": {\"sql\": [\"insert into mqtt_sub (clientid, topic, qos) values (${clientid}, ${topic}, ${qos}) on conflict (clientid, topic) do nothing\"]}, \"pool\": \"pool1\"}";
    let (_db, rules) = database("broker_stored_subscriptions", lookup).await;
    let broker = broker().start("stored-subscriptions", &rules).await;
    Mqtt::subscribe_and_leave(broker.port, "s", "news/#").await;
    let mut publisher = Mqtt::connect(broker.port, "p", false).await;
    publisher.publish("news/a", QoS::AtLeastOnce, "while away").await;

    // Back without subscribing: the stored subscription brings the backlog, then live messages.
    let mut subscriber = Mqtt::connect(broker.port, "s", false).await;
    assert_eq!(payloads(&subscriber.receive(1).await), ["while away"]);
    publisher.publish("news/b", QoS::AtLeastOnce, "live").await;
    assert_eq!(payloads(&subscriber.receive(1).await), ["live"]);
}
