//! Rules as an operator writes them (errors with their line, sql actions with hostile values,
//! atomic statements) and events as a broker sends them (binary payloads, malformed lines,
//! batches, a store that fails).

use host_harness::Host;
use host_harness::bindings::{Message, PublishOutcome};
use integration_tests::event::{connect, lines, publish, subscribe};
use integration_tests::{TestDb, deliveries, errors, guest_module, offline_rules, replay};
use serde_json::json;

const POOL: &str = "backend.pgsql.pool1.server = 127.0.0.1:5432\n";

async fn refused(rules: &str) -> String {
    match Host::with_rules(guest_module(), rules, "bad.conf", "node1@test").await {
        Ok(_) => panic!("rules accepted:\n{rules}"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_rule_is_refused_with_its_file_line_and_problem() {
    let hook = |rule: &str| format!("{POOL}## a comment\n\nbackend.pgsql.hook.{rule}\n");
    let cases = [
        (hook(r#"message.publish.1 = {"action": {"function": "on_message_publish"}, "pool": "pool1""#), "invalid JSON"),
        (
            hook(r#"session.connected.2 = {"action": {"function": "on_subscribe_lookup"}, "pool": "pool1"}"#),
            "unknown hookpoint `session.connected`",
        ),
        (
            hook(r#"message.publish.1 = {"action": {"function": "on_message_pub"}, "pool": "pool1"}"#),
            "unknown function `on_message_pub`",
        ),
        (
            hook(r#"message.publish.1 = {"action": {"function": "on_message_acked"}, "pool": "pool1"}"#),
            "belongs on hookpoint message.acked",
        ),
        (
            hook(r#"client.connected.1 = {"action": {"sql": ["insert into t values (${topic})"]}, "pool": "pool1"}"#),
            "${topic} is not available on client.connected",
        ),
        (
            hook(r#"message.acked.1 = {"action": {"sql": ["insert into t values (${mystery})"]}, "pool": "pool1"}"#),
            "unknown placeholder ${mystery}",
        ),
        (
            hook(
                r#"session.subscribed.1 = {"action": {"function": "on_message_fetch"}, "offline_opts": {"time_range": "two hours"}, "pool": "pool1"}"#,
            ),
            "bad duration",
        ),
        (
            hook(r#"message.acked.1 = {"action": {"function": "on_message_acked"}, "pool": "pool2"}"#),
            "pool `pool2` is not defined",
        ),
    ];
    for (rules, problem) in cases {
        let error = refused(&rules).await;
        assert!(error.starts_with("bad.conf: line 4, backend.pgsql.hook."), "{error}");
        assert!(error.contains(problem), "expected `{problem}` in: {error}");
    }
    // Host-side mistakes name their line too.
    let error = refused("backend.pgsql.pool1.server = 127.0.0.1:5432\nbackend.pgsql.pool1.pool_size = lots\n").await;
    assert!(error.starts_with("bad.conf: line 2, backend.pgsql.pool1.pool_size"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_rules_as_a_json_document_work() {
    let db = TestDb::create("json_rules").await;
    let document = json!({
        "backend.pgsql.pool1.server": format!("127.0.0.1:{}", integration_tests::port()),
        "backend.pgsql.pool1.username": "postgres",
        "backend.pgsql.pool1.database": db.name,
        "backend.pgsql.hook.session.subscribed.1": {"action": {"function": "on_message_fetch"}, "pool": "pool1"},
        "backend.pgsql.hook.message.publish.1": {"action": {"function": "on_message_publish"}, "pool": "pool1"},
    });
    let host = db.host(&document.to_string()).await;
    let output = replay(
        &host,
        &lines(&[
            connect("s"),
            subscribe("s", "t", 1),
            integration_tests::event::disconnect("s"),
            publish("p", "t", 1, "x"),
            connect("s"),
            subscribe("s", "t", 1),
        ]),
    )
    .await;
    assert_eq!(deliveries(&output), vec![("s".to_owned(), "x".to_owned())]);

    let bad = json!({"backend.pgsql.pool1.server": "h", "backend.pgsql.hook.message.publish.1": {"action": {"function": "nope"}, "pool": "pool1"}});
    let error = refused(&bad.to_string()).await;
    assert!(error.contains("backend.pgsql.hook.message.publish.1: unknown function `nope`"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_action_values_are_bound_never_pasted() {
    let db = TestDb::create("hostile_values").await;
    db.client()
        .await
        .batch_execute("CREATE TABLE audit (clientid text, topic text, payload bytea, qos int, retain int)")
        .await
        .unwrap();
    let rules = db.rules(&format!(
        "{}\nbackend.pgsql.hook.message.publish.2 = {{\"action\": {{\"sql\": [\"insert into audit (clientid, topic, payload, qos, retain) values (${{clientid}}, ${{topic}}, ${{payload}}, ${{qos}}, ${{retain}})\"]}}, \"pool\": \"pool1\"}}",
        offline_rules("")
    ));
    let host = db.host(&rules).await;
    let hostile_client = "'; drop table mqtt_msg; --";
    let hostile_topic = "t/'\"$1${clientid}\\";
    let hostile_payload = "'); delete from audit; --";
    replay(&host, &publish(hostile_client, hostile_topic, 1, hostile_payload)).await;

    let client = db.client().await;
    let row = client.query_one("SELECT clientid, topic, payload, qos, retain FROM audit", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), hostile_client);
    assert_eq!(row.get::<_, String>(1), hostile_topic);
    assert_eq!(row.get::<_, Vec<u8>>(2), hostile_payload.as_bytes());
    assert_eq!((row.get::<_, i32>(3), row.get::<_, i32>(4)), (1, 0));
    let stored: i64 = client.query_one("SELECT count(*) FROM mqtt_msg", &[]).await.unwrap().get(0);
    assert_eq!(stored, 1, "mqtt_msg is still there, with the message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rules_statements_are_all_or_nothing() {
    let db = TestDb::create("sql_rollback").await;
    db.client().await.batch_execute("CREATE TABLE seen (clientid text PRIMARY KEY)").await.unwrap();
    // The second statement fails (no such table): the first must leave no row.
    let rules = db.rules(
        r#"backend.pgsql.hook.client.connected.1 = {"action": {"sql": ["insert into seen values (${clientid})", "insert into missing values (${clientid})"]}, "pool": "pool1"}"#,
    );
    let host = db.host(&rules).await;
    let output = replay(&host, &connect("c1")).await;
    let error = errors(&output)[0]["message"].as_str().unwrap().to_owned();
    assert!(error.contains("backend.pgsql.hook.client.connected.1") && error.contains("42P01"), "{error}");
    let rows: i64 = db.client().await.query_one("SELECT count(*) FROM seen", &[]).await.unwrap().get(0);
    assert_eq!(rows, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_payloads_round_trip_unchanged() {
    let db = TestDb::create("binary_payload").await;
    let host = db.host(&db.rules(&offline_rules(""))).await;
    let bytes = "//79AAEC"; // base64 of ff fe fd 00 01 02: not UTF-8
    let publish_binary =
        json!({"event": "message.publish", "clientid": "p", "topic": "bin", "qos": 1, "payload_base64": bytes});
    let events = lines(&[
        connect("s"),
        subscribe("s", "bin", 1),
        integration_tests::event::disconnect("s"),
        publish_binary.to_string(),
        connect("s"),
        subscribe("s", "bin", 1),
    ]);
    let output = replay(&host, &events).await;
    let delivered = output.iter().find_map(|l| l.get("deliver")).expect("delivered");
    assert_eq!(delivered["payload_base64"], bytes);
    let stored: Vec<u8> = db.client().await.query_one("SELECT payload FROM mqtt_msg", &[]).await.unwrap().get(0);
    assert_eq!(stored, [0xff, 0xfe, 0xfd, 0x00, 0x01, 0x02]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_event_lines_are_error_lines_and_the_replay_goes_on() {
    let db = TestDb::create("malformed_events").await;
    let host = db.host(&db.rules(&offline_rules(""))).await;
    let events = [
        "{not json",
        r#"{"event":"client.exploded","clientid":"c"}"#,
        r#"{"event":"session.subscribed","clientid":"nobody","topic":"t","qos":1}"#,
        r#"{"event":"client.connected","clientid":"s","colour":"red"}"#,
        r#"{"event":"message.publish","clientid":"p","topic":"t/#","qos":1,"payload":"x"}"#,
        &connect("s"),
        r#"{"event":"session.subscribed","clientid":"s","topic":"a/#/b","qos":1}"#,
        &subscribe("s", "t", 1),
        &publish("p", "t", 1, "still working"),
    ]
    .join("\n");
    let output = replay(&host, &events).await;
    let error_lines: Vec<u64> = errors(&output).iter().map(|e| e["line"].as_u64().unwrap()).collect();
    assert_eq!(error_lines, [1, 2, 3, 4, 5, 7]);
    assert!(errors(&output)[2]["message"].as_str().unwrap().contains("not connected"));
    assert_eq!(deliveries(&output), vec![("s".to_owned(), "still working".to_owned())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_could_not_be_stored_is_not_accepted() {
    let db = TestDb::create("fail_closed").await;
    let host = db.host(&db.rules(&offline_rules(""))).await;
    replay(&host, &lines(&[connect("s"), subscribe("s", "t", 1)])).await;
    db.client().await.batch_execute("ALTER TABLE mqtt_msg RENAME TO mqtt_msg_gone").await.unwrap();
    let output = replay(&host, &lines(&[connect("s"), subscribe("s", "t", 0), publish("p", "t", 1, "lost?")])).await;
    let error = errors(&output).last().map(|e| e["message"].as_str().unwrap().to_owned()).unwrap_or_default();
    assert!(error.starts_with("message not stored: backend.pgsql.hook.message.publish.1"), "{output:?}");
    assert!(output.iter().all(|l| l.get("published").is_none() && l.get("deliver").is_none()), "{output:?}");
}

fn message(topic: &str, qos: u8, payload: &str) -> Message {
    Message {
        id: None,
        msgid: format!("m-{payload}"),
        sender: "p".into(),
        topic: topic.into(),
        payload: payload.as_bytes().to_vec(),
        qos,
        retain: false,
        timestamp: 1_700_000_000_000,
        properties: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_messages_is_stored_in_order_with_one_outcome_each() {
    let db = TestDb::create("publish_batch").await;
    let host = db.host(&db.rules(&offline_rules(""))).await;
    let batch = [message("a", 1, "1"), message("b", 0, "2"), message("a", 2, "3"), message("c", 1, "4")];
    let outcomes = host.call(async |i| i.message_publish(&batch).await).await.unwrap();
    let ids: Vec<Option<i64>> = outcomes
        .iter()
        .map(|o| match o {
            PublishOutcome::Stored(id) => Some(*id),
            PublishOutcome::NotStored => None,
            PublishOutcome::Failed(e) => panic!("{e:?}"),
        })
        .collect();
    assert_eq!(ids, [Some(1), None, Some(2), Some(3)]);
    let rows = db.client().await.query("SELECT id, payload FROM mqtt_msg ORDER BY id", &[]).await.unwrap();
    let stored: Vec<(i64, Vec<u8>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(stored, [(1, b"1".to_vec()), (2, b"3".to_vec()), (3, b"4".to_vec())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_goes_out_in_full_statements_and_a_padded_rest_and_ids_keep_message_order() {
    let db = TestDb::create("publish_large_batch").await;
    let host = db.host(&db.rules(&offline_rules(""))).await;
    // 1000 = one full statement of 512 rows, then 488 in a statement of 512 padded with NULL
    // rows, which must insert nothing.
    let batch: Vec<Message> = (0..1000).map(|i| message(&format!("t/{}", i % 7), 1, &i.to_string())).collect();
    let outcomes = host.call(async |i| i.message_publish(&batch).await).await.unwrap();
    let ids: Vec<i64> = outcomes
        .iter()
        .map(|o| match o {
            PublishOutcome::Stored(id) => *id,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ids, (1..=1000).collect::<Vec<i64>>(), "ids in message order");
    let rows = db.client().await.query("SELECT id, payload FROM mqtt_msg ORDER BY id", &[]).await.unwrap();
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(
            row.get::<_, Vec<u8>>(1),
            i.to_string().into_bytes(),
            "id {} holds message {i}",
            row.get::<_, i64>(0)
        );
    }
    assert_eq!(rows.len(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_properties_take_numbers_and_bytes_and_a_bad_one_is_named() {
    let db = TestDb::create("property_values").await;
    let host = db.host(&db.rules(&integration_tests::offline_rules(""))).await;
    let publish = |properties: serde_json::Value| {
        serde_json::json!({"event": "message.publish", "clientid": "p", "topic": "t", "qos": 1, "payload": "x",
                           "properties": properties})
        .to_string()
    };
    let events = [
        publish(serde_json::json!({"message-expiry-interval": 3600, "correlation-data": {"base64": "AAE="}})),
        publish(serde_json::json!({"k": [1]})),
    ];
    let output = integration_tests::replay(&host, &events.join("\n")).await;
    let errors = integration_tests::errors(&output);
    assert_eq!(errors.len(), 1, "{output:?}");
    assert_eq!(errors[0]["line"], 2);
    assert!(errors[0]["message"].as_str().unwrap().contains("properties.k"), "{output:?}");
    let row = db
        .client()
        .await
        .query_one("SELECT extract(epoch FROM expires_at - arrived)::int, properties::text FROM mqtt_msg", &[])
        .await
        .unwrap();
    let (seconds, properties): (i32, String) = (row.get(0), row.get(1));
    assert_eq!(seconds, 3600, "a number of seconds");
    assert!(properties.contains(r#"["correlation-data", {"hex": "0001"}]"#), "bytes: {properties}");
}
