//! The broker as users run it: a real broker process with the real extension, a real
//! PostgreSQL, and real MQTT clients.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use integration_tests::mqtt::{Launcher, Mqtt, database, payloads, v5};
use integration_tests::{TestDb, offline_rules};
use rumqttc::QoS;

fn broker() -> Launcher {
    Launcher::new(env!("CARGO_BIN_EXE_broker"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_flow_with_two_subscribers_gets_every_message_once() {
    let (_db, rules) = database("broker_seed", "").await;
    let broker = broker().start("seed", &rules).await;

    // Both subscribers online: live delivery.
    let mut alice = Mqtt::connect(broker.port, "alice", false).await;
    let mut bob = Mqtt::connect(broker.port, "bob", false).await;
    alice.subscribe("news/#", QoS::AtLeastOnce).await;
    bob.subscribe("news/#", QoS::AtLeastOnce).await;
    let mut publisher = Mqtt::connect(broker.port, "publisher", false).await;
    publisher.publish("news/1", QoS::AtLeastOnce, "live").await;
    assert_eq!(payloads(&alice.receive(1).await), ["live"]);
    assert_eq!(payloads(&bob.receive(1).await), ["live"]);
    alice.disconnect().await;
    bob.disconnect().await;

    // Both offline: stored.
    for i in 1..=3 {
        publisher.publish(&format!("news/{i}"), QoS::AtLeastOnce, &format!("offline {i}")).await;
    }

    // Each comes back and gets them once, in order; then nothing more.
    for name in ["alice", "bob"] {
        let mut subscriber = Mqtt::connect(broker.port, name, false).await;
        subscriber.subscribe("news/#", QoS::AtLeastOnce).await;
        assert_eq!(payloads(&subscriber.receive(3).await), ["offline 1", "offline 2", "offline 3"], "{name}");
        assert_eq!(payloads(&subscriber.quiet().await), Vec::<String>::new(), "{name}: no repeats");
        subscriber.disconnect().await;
    }
    let mut alice = Mqtt::connect(broker.port, "alice", false).await;
    alice.subscribe("news/#", QoS::AtLeastOnce).await;
    assert_eq!(payloads(&alice.quiet().await), Vec::<String>::new(), "a reconnection repeats nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_subscriber_gets_what_its_filter_matches_and_nothing_else() {
    let (_db, rules) = database("broker_wildcard", "").await;
    let broker = broker().start("wildcard", &rules).await;
    Mqtt::subscribe_and_leave(broker.port, "s", "sensors/+/temp").await;

    let mut publisher = Mqtt::connect(broker.port, "p", false).await;
    for (topic, payload) in [
        ("sensors/hall/temp", "hall"),
        ("sensors/hall/humidity", "no: other leaf"),
        ("sensors/kitchen/temp", "kitchen"),
        ("sensors/temp", "no: one level short"),
        ("other/hall/temp", "no: other root"),
    ] {
        publisher.publish(topic, QoS::AtLeastOnce, payload).await;
    }
    let mut subscriber = Mqtt::connect(broker.port, "s", false).await;
    subscriber.subscribe("sensors/+/temp", QoS::AtLeastOnce).await;
    let got = subscriber.receive(2).await;
    assert_eq!(payloads(&got), ["hall", "kitchen"]);
    assert_eq!(payloads(&subscriber.quiet().await), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_subscriber_gets_the_retained_message_from_the_database() {
    let retain = "backend.pgsql.hook.message.publish.2 = {\"topic\": \"#\", \"action\": {\"function\": \"on_message_retain\"}, \"pool\": \"pool1\"}\n\
                  backend.pgsql.hook.session.subscribed.2 = {\"topic\": \"#\", \"action\": {\"function\": \"on_retain_lookup\"}, \"pool\": \"pool1\"}";
    let (db, rules) = database("broker_retain", retain).await;
    let broker = broker().start("retain", &rules).await;
    let mut publisher = Mqtt::connect(broker.port, "p", false).await;
    publisher.try_publish("home/hall/temp", QoS::AtLeastOnce, true, "21").await.unwrap();
    publisher.try_publish("home/hall/temp", QoS::AtLeastOnce, true, "22").await.unwrap();
    let rows = db.client().await.query("SELECT payload FROM mqtt_retain", &[]).await.unwrap();
    assert_eq!(rows.len(), 1, "one retained message per topic");

    // rmqtt keeps no retained messages of its own here: what comes is the database's.
    let mut subscriber = Mqtt::connect(broker.port, "newcomer", false).await;
    subscriber.subscribe("home/#", QoS::AtLeastOnce).await;
    let got = subscriber.receive(1).await;
    assert_eq!(payloads(&got), ["22"]);
    assert!(got[0].retain, "delivered with RETAIN");
    assert_eq!(payloads(&subscriber.quiet().await), Vec::<String>::new());
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
async fn a_client_that_leaves_before_acking_gets_the_unacked_messages_again_and_never_an_acked_one() {
    let (_db, rules) = database("broker_at_least_once", "").await;
    let broker = broker().start("at-least-once", &rules).await;
    let mut subscriber = Mqtt::connect(broker.port, "s", true).await;
    subscriber.subscribe("t", QoS::AtLeastOnce).await;
    let mut publisher = Mqtt::connect(broker.port, "p", false).await;
    for i in 1..=5 {
        publisher.publish("t", QoS::AtLeastOnce, &i.to_string()).await;
    }
    let got = subscriber.receive(5).await;
    assert_eq!(payloads(&got), ["1", "2", "3", "4", "5"]);
    subscriber.ack(&got[0]).await;
    subscriber.ack(&got[1]).await;
    subscriber.disconnect().await;

    let mut subscriber = Mqtt::connect(broker.port, "s", false).await;
    subscriber.subscribe("t", QoS::AtLeastOnce).await;
    assert_eq!(payloads(&subscriber.receive(3).await), ["3", "4", "5"]);
    assert_eq!(payloads(&subscriber.quiet().await), Vec::<String>::new());
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
async fn a_backlog_of_several_pages_comes_before_live_messages_once_each_in_order() {
    let db = TestDb::create("broker_backlog_then_live").await;
    let rules = db.rules(&offline_rules(r#"{"max_returned_count": 50}"#));
    let broker = broker().start("backlog-then-live", &rules).await;
    Mqtt::subscribe_and_leave(broker.port, "s", "feed").await;

    // 1000 stored while away (20 pages of 50), then more published while the backlog goes out.
    let mut publisher = Mqtt::connect(broker.port, "p", false).await;
    for i in 0..1000 {
        publisher.publish("feed", QoS::AtLeastOnce, &i.to_string()).await;
    }
    // The publisher keeps going until the subscriber has had the backlog.
    let stop = Arc::new(AtomicBool::new(false));
    let live = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut next = 1000;
            while !stop.load(Ordering::Relaxed) {
                publisher.publish("feed", QoS::AtLeastOnce, &next.to_string()).await;
                next += 1;
            }
            next
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let mut subscriber = Mqtt::connect(broker.port, "s", false).await;
    subscriber.subscribe("feed", QoS::AtLeastOnce).await;
    let mut got = payloads(&subscriber.receive(1050).await);
    stop.store(true, Ordering::Relaxed);
    let published = live.await.unwrap();
    got.extend(payloads(&subscriber.receive(published - 1050).await));
    got.extend(payloads(&subscriber.quiet().await));
    let expected: Vec<String> = (0..published).map(|i| i.to_string()).collect();
    assert_eq!(got, expected, "the backlog, then live messages: each once, in order");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_reload_on_sighup_while_clients_stay_connected_and_a_bad_file_changes_nothing() {
    let (_db, rules) = database("broker_reload", "").await;
    let without_store: String =
        rules.lines().filter(|l| !l.contains("message.publish")).map(|l| format!("{l}\n")).collect();
    let broker = broker().start("reload", &without_store).await;
    Mqtt::subscribe_and_leave(broker.port, "s", "t").await;
    let mut publisher = Mqtt::connect(broker.port, "p", false).await;
    publisher.publish("t", QoS::AtLeastOnce, "before: not stored").await;

    // The full rules, while the publisher stays connected.
    std::fs::write(&broker.rules, &rules).unwrap();
    broker.hangup();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    publisher.publish("t", QoS::AtLeastOnce, "after: stored").await;

    // A broken file is refused: the running rules stay.
    std::fs::write(&broker.rules, format!("{rules}\nbackend.pgsql.hook.message.publish.9 = {{not json\n")).unwrap();
    broker.hangup();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    publisher.publish("t", QoS::AtLeastOnce, "after the bad file: stored").await;

    let mut subscriber = Mqtt::connect(broker.port, "s", false).await;
    subscriber.subscribe("t", QoS::AtLeastOnce).await;
    assert_eq!(payloads(&subscriber.receive(2).await), ["after: stored", "after the bad file: stored"]);
    assert_eq!(payloads(&subscriber.quiet().await), Vec::<String>::new());
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
    assert_eq!(properties, [("x-offline-id".to_owned(), "offline:1".to_owned())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_refuses_publishes_until_it_is_back_and_loses_no_acknowledged_message() {
    // A cluster of this test alone: stopping the shared one would disturb the other tests.
    let cluster = integration_tests::OwnCluster::fresh(15499, "pg-broker-outage");
    let rules = cluster.offline_rules();
    let broker = broker().start("outage", &rules).await;
    Mqtt::subscribe_and_leave(broker.port, "s", "t").await;

    let (publisher, mut events) = v5::connect(broker.port, "p").await;
    let mut publish = async |payload: &str| {
        publisher.publish("t", v5::QoS::AtLeastOnce, false, payload.to_owned()).await.unwrap();
        let v5::Packet::PubAck(ack) = v5::until(&mut events, |p| matches!(p, v5::Packet::PubAck(_))).await else {
            unreachable!()
        };
        ack.reason
    };
    assert_eq!(publish("before").await, v5::PubAckReason::Success);
    cluster.pg("down");
    assert_eq!(publish("during").await, v5::PubAckReason::ImplementationSpecificError);
    cluster.pg("up");
    // The pool reconnects by itself; until it has, publishes are refused, never lost.
    let mut after = None;
    for attempt in 0..50 {
        if publish(&format!("after {attempt}")).await == v5::PubAckReason::Success {
            after = Some(format!("after {attempt}"));
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let after = after.expect("publishes succeed again once the database is back");

    let mut subscriber = Mqtt::connect(broker.port, "s", false).await;
    subscriber.subscribe("t", QoS::AtLeastOnce).await;
    assert_eq!(payloads(&subscriber.receive(2).await), ["before".to_owned(), after]);
    assert_eq!(payloads(&subscriber.quiet().await), Vec::<String>::new(), "what was refused is nowhere");
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
