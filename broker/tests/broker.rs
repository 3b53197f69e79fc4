//! The broker as users run it: a real broker process with the real extension, a real
//! PostgreSQL, and real MQTT clients.

mod support;

use rumqttc::QoS;
use support::{BrokerProcess, Mqtt, database, payloads};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_flow_with_two_subscribers_gets_every_message_once() {
    let (_db, rules) = database("broker_seed", "").await;
    let broker = BrokerProcess::start("seed", &rules).await;

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
