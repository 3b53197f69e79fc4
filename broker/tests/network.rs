//! The broker on a network: TLS with a test CA, passwords from a file written by Debian's
//! `mosquitto_passwd`, and the HTTP endpoint (`/metrics`, `/health`); real clients
//! (`mosquitto_pub`/`mosquitto_sub`, rumqttc 3.1.1 and 5) against the real broker.

use std::time::Duration;

use integration_tests::OwnCluster;
use integration_tests::http::{get, sample};
use integration_tests::mqtt::{Launcher, Mqtt, PATIENCE, database, free_port, scratch};
use integration_tests::network::{certificates, connect_v3, connect_v5, file, mosquitto_passwd, run};
use rumqttc::{ConnectReturnCode, MqttOptions, QoS};

fn broker() -> Launcher {
    Launcher::new(env!("CARGO_BIN_EXE_broker"))
}

/// `mosquitto_pub` one QoS 1 message over TLS; whether the broker took it.
fn tls_publish(port: u16, ca: &str, client: Option<(&str, &str)>, message: &str) -> Result<(), String> {
    let port = port.to_string();
    let mut args = vec!["-h", "127.0.0.1", "-p", &port, "--cafile", ca, "-q", "1", "-t", "tls/t", "-m", message];
    if let Some((cert, key)) = client {
        args.extend(["--cert", cert, "--key", key]);
    }
    let output = run("mosquitto_pub", &args);
    match output.status.success() {
        true => Ok(()),
        false => Err(String::from_utf8_lossy(&output.stderr).into_owned()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_clients_that_trust_the_ca_connect_and_untrusted_certificates_are_refused() {
    let certs = certificates("tls");
    let (_db, rules) = database("network_tls", "").await;
    let (tls_port, mutual_port) = (free_port(), free_port());
    let tls = format!(
        "[tls]\nlisten = \"127.0.0.1:{tls_port}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        file(&certs, "server.crt"),
        file(&certs, "server.key")
    );
    let plain = broker().start_with("tls", &rules, &tls).await;
    let (ca, rogue) = (file(&certs, "ca.crt"), file(&certs, "rogue.crt"));

    // A subscriber over TLS leaves; what is published over TLS while it is away comes back to it.
    let port = tls_port.to_string();
    let sub = ["-h", "127.0.0.1", "-p", &port, "--cafile", &ca, "-i", "tls-sub", "-c", "-q", "1", "-t", "tls/#"];
    let first = run("mosquitto_sub", &[&sub[..], &["-W", "1"]].concat());
    assert!(String::from_utf8_lossy(&first.stderr).contains("Timed out"), "{first:?}");
    tls_publish(tls_port, &ca, None, "over tls").expect("a client that trusts the CA connects");
    let back = run("mosquitto_sub", &[&sub[..], &["-C", "1", "-W", "5"]].concat());
    assert_eq!(String::from_utf8_lossy(&back.stdout), "over tls\n");
    // A client that does not trust the server's certificate does not connect.
    let refused = tls_publish(tls_port, &rogue, None, "never").unwrap_err();
    assert!(refused.to_lowercase().contains("certificate") || refused.contains("TLS"), "{refused}");
    // The plain listener stays beside it.
    Mqtt::connect(plain.port, "plain", false).await.disconnect().await;

    // With client_ca, a client must present a certificate that CA signed.
    let mutual = format!(
        "[tls]\nlisten = \"127.0.0.1:{mutual_port}\"\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{ca}\"\n",
        file(&certs, "server.crt"),
        file(&certs, "server.key")
    );
    let _mutual = broker().start_with("tls-mutual", &rules, &mutual).await;
    let (cert, key) = (file(&certs, "client.crt"), file(&certs, "client.key"));
    tls_publish(mutual_port, &ca, Some((&cert, &key)), "signed").expect("a client certificate the CA signed");
    let (rogue_cert, rogue_key) = (file(&certs, "rogue-client.crt"), file(&certs, "rogue-client.key"));
    assert!(tls_publish(mutual_port, &ca, Some((&rogue_cert, &rogue_key)), "rogue").is_err(), "an untrusted client");
    assert!(tls_publish(mutual_port, &ca, None, "none").is_err(), "no client certificate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_from_mosquitto_passwd_are_checked_anonymous_clients_refused_and_a_sighup_rereads_the_file() {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as V5;
    let passwords = scratch("auth").join("passwd");
    let path = passwords.to_str().unwrap();
    mosquitto_passwd(&["-c", "-b", path, "alice", "secret"]);
    let (_db, rules) = database("network_auth", "").await;
    let broker = broker().start_with("auth", &rules, &format!("[auth]\npassword_file = \"{path}\"\n")).await;

    assert_eq!(connect_v3(broker.port, Some(("alice", "secret"))).await, Ok(()));
    assert_eq!(connect_v3(broker.port, Some(("alice", "wrong"))).await, Err(ConnectReturnCode::BadUserNamePassword));
    assert_eq!(connect_v3(broker.port, Some(("mallory", "secret"))).await, Err(ConnectReturnCode::BadUserNamePassword));
    assert_eq!(connect_v3(broker.port, None).await, Err(ConnectReturnCode::NotAuthorized), "anonymous");
    assert_eq!(connect_v5(broker.port, Some(("alice", "secret"))).await, Ok(()));
    assert_eq!(connect_v5(broker.port, Some(("alice", "wrong"))).await, Err(V5::BadUserNamePassword));
    assert_eq!(connect_v5(broker.port, None).await, Err(V5::NotAuthorized), "anonymous");

    // An operator adds a user with mosquitto_passwd and sends SIGHUP.
    assert_eq!(connect_v3(broker.port, Some(("bob", "hunter2"))).await, Err(ConnectReturnCode::BadUserNamePassword));
    mosquitto_passwd(&["-b", path, "bob", "hunter2"]);
    broker.hangup();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while connect_v3(broker.port, Some(("bob", "hunter2"))).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "bob never got in after SIGHUP");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A user removed from the file is disconnected at the reload, not only refused afterwards.
    let mut options = MqttOptions::new("alice-online", "127.0.0.1", broker.port);
    options.set_credentials("alice", "secret");
    let (_alice, mut alice) = rumqttc::AsyncClient::new(options, 10);
    assert!(matches!(alice.poll().await, Ok(rumqttc::Event::Incoming(rumqttc::Incoming::ConnAck(_)))));
    mosquitto_passwd(&["-D", path, "alice"]);
    broker.hangup();
    let closed = tokio::time::timeout(PATIENCE, async {
        loop {
            if alice.poll().await.is_err() {
                return;
            }
        }
    });
    closed.await.expect("alice disconnected once her password was revoked");
    assert_eq!(connect_v3(broker.port, Some(("alice", "secret"))).await, Err(ConnectReturnCode::BadUserNamePassword));
    mosquitto_passwd(&["-b", path, "alice", "secret"]);
    broker.hangup();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while connect_v3(broker.port, Some(("alice", "secret"))).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "alice never got back in after SIGHUP");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A file that does not parse is refused and the running one stays.
    std::fs::write(&passwords, "alice:plaintext\n").unwrap();
    broker.hangup();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(connect_v3(broker.port, Some(("alice", "secret"))).await, Ok(()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_flows_and_health_follows_the_database() {
    // A cluster of this test alone: stopping the shared one would disturb the other tests.
    let cluster = OwnCluster::fresh(15497, "pg-broker-health");
    let rules = cluster.offline_rules();
    let http = free_port();
    let broker = broker().start_with("metrics", &rules, &format!("[http]\nlisten = \"127.0.0.1:{http}\"\n")).await;
    assert_eq!(get(http, "/health").await, (200, "ok\n".to_owned()));

    let (status, before) = get(http, "/metrics").await;
    assert_eq!(status, 200);
    Mqtt::subscribe_and_leave(broker.port, "s", "m/#").await;
    let mut publisher = Mqtt::connect(broker.port, "p", false).await;
    for i in 0..5 {
        publisher.publish(&format!("m/{i}"), QoS::AtLeastOnce, "x").await;
    }
    let mut subscriber = Mqtt::connect(broker.port, "s", false).await;
    subscriber.subscribe("m/#", QoS::AtLeastOnce).await;
    assert_eq!(subscriber.receive(5).await.len(), 5);
    let (_, after) = get(http, "/metrics").await;
    let moved = |series: &str| {
        let now = sample(&after, series).unwrap_or_else(|| panic!("no sample `{series}` in:\n{after}"));
        now - sample(&before, series).unwrap_or(0.0)
    };
    assert_eq!(moved("mqtt_broker_messages_received_total"), 5.0);
    assert!(moved("mqtt_broker_messages_delivered_total") >= 5.0);
    assert!(moved("mqtt_broker_backlog_pages_total{extension=\"offline\"}") >= 1.0);
    assert!(moved("mqtt_offline_messages_delivered_total{extension=\"offline\"}") >= 5.0);
    assert_eq!(moved("mqtt_offline_function_rows_total{extension=\"offline\",function=\"on_message_publish\"}"), 5.0);
    assert_eq!(sample(&after, "mqtt_broker_connections"), Some(2.0), "the publisher and the subscriber");
    assert_eq!(sample(&after, "mqtt_broker_publishes_refused_total"), Some(0.0));
    for family in ["mqtt_broker_held_messages", "mqtt_broker_pending_acks", "mqtt_offline_hook_calls_total"] {
        assert_eq!(after.matches(&format!("# TYPE {family} ")).count(), 1, "{family} declared once");
    }
    assert_eq!(get(http, "/nothing").await.0, 404);
    assert_eq!(get(http, "/metrics?module=mqtt").await.0, 200, "a query string, as Prometheus's `params` adds");

    cluster.pg("down");
    let (status, why) = get(http, "/health").await;
    assert_eq!(status, 503);
    assert!(why.contains("extension offline") && why.contains("pool pool1"), "{why}");
    cluster.pg("up");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while get(http, "/health").await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "/health never came back to 200");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The hooks no rule acts on are not called (`configure`'s interest): no publish call for a
/// topic no publish rule matches, no ack call for one no ack rule matches, no delivery call
/// without a delivery rule; a reload that adds a rule brings its calls in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_no_rule_acts_on_are_not_called_until_a_reload_adds_one() {
    let db = integration_tests::TestDb::create("broker_interest").await;
    let rule = |key: &str, topic: &str, function: &str| {
        format!(
            "backend.pgsql.hook.{key} = {{\"topic\": \"{topic}\", \"action\": {{\"function\": \"{function}\"}}, \"pool\": \"pool1\"}}\n"
        )
    };
    let hooks = rule("message.publish.1", "stored/#", "on_message_publish")
        + &rule("message.publish.2", "archive/#", "on_message_publish")
        + &rule("message.acked.1", "stored/#", "on_message_acked");
    let http = free_port();
    let broker =
        broker().start_with("interest", &db.rules(&hooks), &format!("[http]\nlisten = \"127.0.0.1:{http}\"\n")).await;
    let calls = async |hook: &str| {
        let (_, metrics) = get(http, "/metrics").await;
        sample(&metrics, &format!("mqtt_offline_hook_calls_total{{extension=\"offline\",hook=\"{hook}\"}}"))
            .unwrap_or(0.0)
    };

    let mut subscriber = Mqtt::connect(broker.port, "s", false).await;
    subscriber.subscribe("#", QoS::AtLeastOnce).await;
    let mut publisher = Mqtt::connect(broker.port, "p", false).await;
    // One at a time (each waits for its PUBACK): a batch each, when stored.
    for topic in ["other/1", "stored/1", "archive/1"] {
        publisher.publish(topic, QoS::AtLeastOnce, "x").await;
    }
    assert_eq!(subscriber.receive(3).await.len(), 3);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while calls("message-acked").await < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "the ack of stored/1 never reached the extension");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(calls("message-publish").await, 2.0, "other/1 matches no publish rule");
    assert_eq!(calls("message-acked").await, 1.0, "archive/1 matches no ack rule");
    assert_eq!(calls("message-delivered").await, 0.0, "no rule on message.delivered");
    assert_eq!(calls("client-connected").await, 0.0, "no rule on client.connected");

    std::fs::write(&broker.rules, db.rules(&(hooks + &rule("message.publish.3", "other/#", "on_message_publish"))))
        .unwrap();
    broker.hangup();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, metrics) = get(http, "/metrics").await;
        if sample(&metrics, "mqtt_offline_reloads_total{extension=\"offline\",outcome=\"applied\"}") == Some(1.0) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the reload never took effect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    publisher.publish("other/2", QoS::AtLeastOnce, "x").await;
    let rows = db.client().await.query("SELECT topic FROM mqtt_msg ORDER BY id", &[]).await.unwrap();
    let stored: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(stored, ["stored/1", "archive/1", "other/2"]);
}
