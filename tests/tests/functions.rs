//! The rest of emqx_backend_pgsql's functions (client state, stored subscriptions, retained
//! messages, archive store), the placeholder set, several pools, first-fetch policies, expiry and
//! retention.

use integration_tests::event::{connect, disconnect, lines, publish, subscribe};
use integration_tests::{TestDb, deliveries, errors, offline_rules, replay};
use serde_json::{Value, json};

fn rule(hook: &str, body: &str) -> String {
    format!("backend.pgsql.hook.{hook} = {body}")
}

fn function(hook: &str, name: &str) -> String {
    rule(hook, &format!(r#"{{"action": {{"function": "{name}"}}, "pool": "pool1"}}"#))
}

fn publish_retained(topic: &str, payload: &str) -> String {
    json!({"event": "message.publish", "clientid": "p", "topic": topic, "qos": 1, "retain": true, "payload": payload})
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_state_is_kept_in_mqtt_client() {
    let db = TestDb::create("client_state").await;
    let rules = [
        function("client.connected.1", "on_client_connected"),
        function("client.disconnected.1", "on_client_disconnected"),
    ];
    let host = db.host(&db.rules(&rules.join("\n"))).await;
    let client = db.client().await;
    let state = || async {
        let row = client
            .query_one("SELECT state, node, online_at IS NOT NULL, offline_at IS NOT NULL FROM mqtt_client WHERE clientid = 'c1'", &[])
            .await
            .unwrap();
        (row.get::<_, i16>(0), row.get::<_, String>(1), row.get::<_, bool>(2), row.get::<_, bool>(3))
    };
    replay(&host, &connect("c1")).await;
    assert_eq!(state().await, (1, "node1@test".into(), true, false));
    replay(&host, &lines(&[connect("c1"), disconnect("c1")])).await;
    assert_eq!(state().await, (0, "node1@test".into(), true, true));
    replay(&host, &connect("c1")).await;
    assert_eq!(state().await, (1, "node1@test".into(), true, false), "back online clears offline_at");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_subscriptions_are_applied_at_connect_and_fetch_their_backlog() {
    let db = TestDb::create("subscribe_lookup").await;
    let rules = format!("{}\n{}", offline_rules(""), function("client.connected.1", "on_subscribe_lookup"));
    let host = db.host(&db.rules(&rules)).await;
    replay(&host, &lines(&[connect("c1"), subscribe("c1", "news/#", 1), disconnect("c1")])).await;
    db.client()
        .await
        .batch_execute("INSERT INTO mqtt_sub (clientid, topic, qos) VALUES ('c1', 'news/#', 1), ('c1', 'bad/#/x', 1)")
        .await
        .unwrap();
    // The client connects without subscribing: the stored subscription does it, as a broker would.
    let output = replay(&host, &lines(&[publish("p", "news/today", 1, "headline"), connect("c1")])).await;
    assert_eq!(deliveries(&output), vec![("c1".to_owned(), "headline".to_owned())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_reach_wildcard_subscriptions_and_an_empty_payload_deletes() {
    let db = TestDb::create("retained").await;
    let rules = [
        function("session.subscribed.1", "on_retain_lookup"),
        function("message.publish.1", "on_message_retain"),
        function("message.publish.2", "on_retain_delete"),
    ];
    let host = db.host(&db.rules(&rules.join("\n"))).await;
    let output = replay(
        &host,
        &lines(&[
            publish_retained("home/kitchen/temp", "20"),
            publish_retained("home/kitchen/temp", "21"),
            publish_retained("home/hall/temp", "18"),
            publish_retained("office/temp", "23"),
            publish("p", "home/garage/temp", 1, "not retained"),
            connect("c"),
            subscribe("c", "home/+/temp", 0),
        ]),
    )
    .await;
    let retained: Vec<(String, bool, u64)> = output
        .iter()
        .filter_map(|l| l.get("deliver"))
        .map(|d| {
            (d["payload"].as_str().unwrap().to_owned(), d["retain"].as_bool().unwrap(), d["qos"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(
        retained,
        [("18".to_owned(), true, 0), ("21".to_owned(), true, 0)],
        "the latest per topic, to a QoS 0 subscription too"
    );

    let output =
        replay(&host, &lines(&[publish_retained("home/hall/temp", ""), connect("c"), subscribe("c", "home/#", 1)]))
            .await;
    assert_eq!(deliveries(&output), vec![("c".to_owned(), "21".to_owned())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_message_store_keeps_every_qos_without_giving_out_ids() {
    let db = TestDb::create("message_store").await;
    let host = db.host(&db.rules(&function("message.publish.1", "on_message_store"))).await;
    let output = replay(&host, &lines(&[publish("p", "log/a", 0, "zero"), publish("p", "log/a", 2, "two")])).await;
    let ids: Vec<&Value> = output.iter().filter_map(|l| l.get("published")).map(|p| &p["id"]).collect();
    assert!(ids.iter().all(|id| id.is_null()), "no id travels: {ids:?}");
    let rows = db.client().await.query("SELECT qos, payload FROM mqtt_msg ORDER BY id", &[]).await.unwrap();
    let stored: Vec<(i16, Vec<u8>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(stored, [(0, b"zero".to_vec()), (2, b"two".to_vec())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_placeholder_binds_its_value() {
    let db = TestDb::create("placeholders").await;
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE seen (hook text, clientid text, username text, peerhost text, topic text, qos int, \
             msgid text, payload bytea, retain boolean, ts bigint, id bigint, node text)",
        )
        .await
        .unwrap();
    let insert = |hook: &str, columns: &str, values: &str| {
        rule(
            hook,
            &format!(
                r#"{{"action": {{"sql": ["insert into seen (hook, {columns}) values ('{hook}', {values})"]}}, "pool": "pool1"}}"#
            ),
        )
    };
    let client = "clientid, username, peerhost, node";
    let client_values = "${clientid}, ${username}, ${peerhost}, ${node}";
    let message = "msgid, topic, payload, qos, retain, ts, id";
    let message_values = "${msgid}, ${topic}, ${payload}, ${qos}, ${retain}, ${timestamp}, ${id}";
    let rules = [
        offline_rules(""),
        insert("client.connected.1", client, client_values),
        insert("client.disconnected.1", client, client_values),
        insert(
            "session.subscribed.2",
            &format!("{client}, topic, qos"),
            &format!("{client_values}, ${{topic}}, ${{qos}}"),
        ),
        insert("session.unsubscribed.1", &format!("{client}, topic"), &format!("{client_values}, ${{topic}}")),
        insert(
            "message.publish.2",
            &format!("clientid, node, {message}"),
            &format!("${{clientid}}, ${{node}}, {message_values}"),
        ),
        insert("message.delivered.1", &format!("{client}, {message}"), &format!("{client_values}, {message_values}")),
        insert("message.acked.2", &format!("{client}, {message}"), &format!("{client_values}, {message_values}")),
    ];
    let host = db.host(&db.rules(&rules.join("\n"))).await;
    let connect_u =
        json!({"event": "client.connected", "clientid": "c", "username": "u", "peerhost": "10.0.0.7"}).to_string();
    let output = replay(
        &host,
        &lines(&[
            connect_u,
            subscribe("c", "t/+", 2),
            publish("p", "t/1", 1, "hi"),
            integration_tests::event::unsubscribe("c", "t/+"),
            disconnect("c"),
        ]),
    )
    .await;
    assert!(errors(&output).is_empty(), "{output:?}");

    let rows = db
        .client()
        .await
        .query(
            "SELECT hook, clientid, username, peerhost, topic, qos, payload, retain, ts > 0, id, node, msgid IS NOT NULL FROM seen ORDER BY hook",
            &[],
        )
        .await
        .unwrap();
    let seen: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {}",
                r.get::<_, String>(0),
                r.get::<_, Option<String>>(1),
                r.get::<_, Option<String>>(2),
                r.get::<_, Option<String>>(3),
                r.get::<_, Option<String>>(4),
                r.get::<_, Option<i32>>(5),
                r.get::<_, Option<Vec<u8>>>(6).map(|p| String::from_utf8(p).unwrap()),
                r.get::<_, Option<bool>>(7),
                r.get::<_, Option<bool>>(8),
                r.get::<_, Option<i64>>(9),
                r.get::<_, Option<String>>(10),
                r.get::<_, bool>(11),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            r#"client.connected.1 Some("c") Some("u") Some("10.0.0.7") None None None None None None Some("node1@test") false"#,
            r#"client.disconnected.1 Some("c") Some("u") Some("10.0.0.7") None None None None None None Some("node1@test") false"#,
            r#"message.acked.2 Some("c") Some("u") Some("10.0.0.7") Some("t/1") Some(1) Some("hi") Some(false) Some(true) Some(1) Some("node1@test") true"#,
            r#"message.delivered.1 Some("c") Some("u") Some("10.0.0.7") Some("t/1") Some(1) Some("hi") Some(false) Some(true) Some(1) Some("node1@test") true"#,
            r#"message.publish.2 Some("p") None None Some("t/1") Some(1) Some("hi") Some(false) Some(true) Some(1) Some("node1@test") true"#,
            r#"session.subscribed.2 Some("c") Some("u") Some("10.0.0.7") Some("t/+") Some(2) None None None None Some("node1@test") false"#,
            r#"session.unsubscribed.1 Some("c") Some("u") Some("10.0.0.7") Some("t/+") None None None None None Some("node1@test") false"#,
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_on_two_pools_write_to_two_databases() {
    let db1 = TestDb::create("two_pools_a").await;
    let db2 = TestDb::create("two_pools_b").await;
    db2.client().await.batch_execute("CREATE TABLE audit (topic text)").await.unwrap();
    db2.host(&db2.rules("")).await; // its schema, so that the host can migrate both the same way
    let rules = format!(
        "{}\n{}\n{}\nbackend.pgsql.hook.message.publish.2 = {{\"action\": {{\"sql\": \"insert into audit values (${{topic}})\"}}, \"pool\": \"pool2\"}}",
        db1.pool_lines("pool1"),
        db2.pool_lines("pool2"),
        offline_rules("")
    );
    let host = db1.host(&rules).await;
    let output = replay(&host, &publish("p", "t", 1, "x")).await;
    assert!(errors(&output).is_empty(), "{output:?}");
    let in_db1: i64 = db1.client().await.query_one("SELECT count(*) FROM mqtt_msg", &[]).await.unwrap().get(0);
    let in_db2: i64 = db2.client().await.query_one("SELECT count(*) FROM audit", &[]).await.unwrap().get(0);
    let msgs_in_db2: i64 = db2.client().await.query_one("SELECT count(*) FROM mqtt_msg", &[]).await.unwrap().get(0);
    assert_eq!((in_db1, in_db2, msgs_in_db2), (1, 1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_fetch_latest_or_earliest() {
    for (policy, expected) in [("latest", vec![]), ("earliest", vec!["old1", "old2"])] {
        let db = TestDb::create(&format!("first_fetch_{policy}")).await;
        let host = db.host(&db.rules(&offline_rules(&format!(r#"{{"first_fetch": "{policy}"}}"#)))).await;
        let output = replay(
            &host,
            &lines(&[publish("p", "t", 1, "old1"), publish("p", "t", 1, "old2"), connect("s"), subscribe("s", "t", 1)]),
        )
        .await;
        let got: Vec<String> = deliveries(&output).into_iter().map(|(_, p)| p).collect();
        assert_eq!(got, expected, "first_fetch {policy}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_are_never_delivered_and_the_rest_carry_what_is_left() {
    let db = TestDb::create("expiry").await;
    let host = db.host(&db.rules(&offline_rules(""))).await;
    let with_expiry = |payload: &str, secs: u32| {
        json!({"event": "message.publish", "clientid": "p", "topic": "t", "qos": 1, "payload": payload,
               "properties": {"message-expiry-interval": secs.to_string(), "content-type": "text/plain"}})
        .to_string()
    };
    replay(
        &host,
        &lines(&[
            connect("s"),
            subscribe("s", "t", 1),
            disconnect("s"),
            with_expiry("short", 60),
            with_expiry("long", 3600),
        ]),
    )
    .await;
    // The short one's minute passes.
    db.client()
        .await
        .execute("UPDATE mqtt_msg SET expires_at = now() - interval '1 second' WHERE payload = 'short'::bytea", &[])
        .await
        .unwrap();
    let output = replay(&host, &lines(&[connect("s"), subscribe("s", "t", 1)])).await;
    assert_eq!(deliveries(&output), vec![("s".to_owned(), "long".to_owned())]);
    // What is left of the hour is handed on, so the broker can pass it to the subscriber.
    let host_direct = db.host(&db.rules(&offline_rules(r#"{"first_fetch": "earliest"}"#))).await;
    let client = host_harness::bindings::Client { clientid: "fresh".into(), username: None, peerhost: None };
    let subscription = host_harness::bindings::Subscription { filter: "t".into(), qos: 1 };
    let page = host_direct.call(async |i| i.session_subscribed(&client, &subscription).await).await.unwrap().unwrap();
    let properties: Vec<(String, String)> = page.messages[0]
        .properties
        .iter()
        .filter_map(|p| match &p.value {
            host_harness::bindings::PropertyValue::Text(text) => Some((p.key.clone(), text.clone())),
            host_harness::bindings::PropertyValue::Bytes(_) => None,
        })
        .collect();
    let left: u32 = properties.iter().find(|(k, _)| k == "message-expiry-interval").unwrap().1.parse().unwrap();
    assert!((3590..=3600).contains(&left), "{properties:?}");
    assert!(properties.contains(&("content-type".into(), "text/plain".into())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tick_deletes_expired_and_too_old_messages_in_bounded_batches() {
    let db = TestDb::create("retention").await;
    let rules = rule(
        "message.publish.1",
        r#"{"action": {"function": "on_message_publish"}, "retention": "1d", "pool": "pool1"}"#,
    );
    let host = db.host(&db.rules(&rules)).await;
    db.client()
        .await
        .batch_execute(
            "INSERT INTO mqtt_msg (topic, qos, payload, arrived) \
               SELECT 'old', 1, '', now() - interval '2 days' FROM generate_series(1, 2500); \
             INSERT INTO mqtt_msg (topic, qos, payload, expires_at) VALUES ('expired', 1, '', now() - interval '1 minute'); \
             INSERT INTO mqtt_msg (topic, qos, payload) VALUES ('fresh', 1, '')",
        )
        .await
        .unwrap();
    let tick = json!({"event": "tick"}).to_string();
    let output = replay(&host, &lines(&[tick.clone(), tick.clone(), tick.clone(), tick])).await;
    let deleted: Vec<u64> =
        output.iter().filter_map(|l| l.get("tick")).map(|t| t["deleted"].as_u64().unwrap()).collect();
    assert_eq!(deleted, [1001, 1000, 500, 0], "a batch is at most 1000 rows per kind");
    let left: Vec<String> =
        db.client().await.query("SELECT topic FROM mqtt_msg", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(left, ["fresh"]);
}

/// The space `mqtt_msg` takes: its partitions' tables and indexes.
async fn stored_bytes(client: &tokio_postgres::Client) -> i64 {
    let sql = "SELECT sum(pg_total_relation_size(relid))::bigint FROM pg_partition_tree('mqtt_msg')";
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// Retention drops whole partitions, which gives their space back at once (rows deleted one by
/// one leave theirs until vacuum), and the tick makes the partitions new messages go to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tick_drops_partitions_past_retention_and_their_space_comes_back() {
    let db = TestDb::create("partitions_retention").await;
    let rules = rule(
        "message.publish.1",
        r#"{"action": {"function": "on_message_publish"}, "retention": "1h", "pool": "pool1"}"#,
    );
    let host = db.host(&db.rules(&rules)).await;
    let client = db.client().await;
    // Three hours ago, that hour's partitions were made and two megabytes of messages came.
    client
        .batch_execute(
            "SELECT mqtt_msg_upkeep('1 hour', now() - interval '3 hours'); \
             INSERT INTO mqtt_msg (topic, qos, payload, arrived) \
               SELECT 'old', 1, convert_to(repeat('x', 1000), 'UTF8'), now() - interval '3 hours' + g * interval '300 milliseconds' \
               FROM generate_series(1, 2000) g",
        )
        .await
        .unwrap();
    let before = stored_bytes(&client).await;
    assert!(before > 2_000_000, "{before}");
    let tick = json!({"event": "tick"}).to_string();
    replay(&host, &lines(&[publish("p", "t", 1, "fresh"), tick.clone(), publish("p", "t", 1, "fresh2")])).await;
    let after = stored_bytes(&client).await;
    // What is left is the new partitions, empty but for their pages and indexes' first pages.
    assert!(after * 4 < before, "the old partitions' space is back: {before} bytes before the tick, {after} after");
    let rows = client.query("SELECT payload, tableoid::regclass::text FROM mqtt_msg ORDER BY id", &[]).await.unwrap();
    let rows: Vec<(Vec<u8>, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!((&rows[0].0[..], &rows[0].1[..]), (&b"fresh"[..], "mqtt_msg_default"), "before the first tick");
    assert_eq!(&rows[1].0[..], b"fresh2");
    assert!(rows[1].1.starts_with("mqtt_msg_2"), "after it, a partition of its time: {rows:?}");
}

/// A retention added to a pool that had none: its messages, all in the default partition, become
/// a partition of their own at the first tick, dropped whole once they are all past it. One
/// stamped a year ahead (a clock ahead) stays in the default partition, and holds nothing up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retention_added_later_drops_the_messages_from_before_it_whole() {
    let db = TestDb::create("partitions_retention_added").await;
    let client = db.client().await;
    let keeping = db.host(&db.rules(&function("message.publish.1", "on_message_publish"))).await;
    replay(&keeping, &json!({"event": "tick"}).to_string()).await;
    client
        .batch_execute(
            "INSERT INTO mqtt_msg (topic, qos, payload, arrived) \
               SELECT 'kept', 1, convert_to(repeat('x', 1000), 'UTF8'), now() - interval '30 minutes' \
               FROM generate_series(1, 2000); \
             INSERT INTO mqtt_msg (topic, qos, payload, arrived) VALUES ('ahead', 1, '', now() + interval '1 year')",
        )
        .await
        .unwrap();
    let where_they_are = async |topic: &str| -> Vec<String> {
        let sql = "SELECT DISTINCT tableoid::regclass::text FROM mqtt_msg WHERE topic = $1";
        client.query(sql, &[&topic]).await.unwrap().iter().map(|r| r.get(0)).collect()
    };
    assert_eq!(where_they_are("kept").await, ["mqtt_msg_default"], "without a retention, no partitions are made");
    let rules = rule(
        "message.publish.1",
        r#"{"action": {"function": "on_message_publish"}, "retention": "1h", "pool": "pool1"}"#,
    );
    let retaining = db.host(&db.rules(&rules)).await;
    let tick = json!({"event": "tick"}).to_string();
    replay(&retaining, &lines(&[tick, publish("p", "fresh", 1, "x")])).await;
    let places = where_they_are("kept").await;
    assert!(places.len() == 1 && places[0].starts_with("mqtt_msg_until_"), "{places:?}");
    assert_eq!(where_they_are("ahead").await, ["mqtt_msg_default"]);
    let places = where_they_are("fresh").await;
    assert!(places.len() == 1 && places[0].starts_with("mqtt_msg_2"), "partitions were made after it: {places:?}");
    let before = stored_bytes(&client).await;
    // Two hours on, every one of them is past the retention.
    client.batch_execute("SELECT mqtt_msg_upkeep('1 hour', now() + interval '2 hours')").await.unwrap();
    let left: i64 = client.query_one("SELECT count(*) FROM mqtt_msg WHERE topic = 'kept'", &[]).await.unwrap().get(0);
    let after = stored_bytes(&client).await;
    assert_eq!(left, 0);
    assert!(after * 4 < before, "their space is back: {before} bytes before, {after} after");
}

/// A pool user that may write the tables but does not own them cannot keep partitions: the tick
/// says so in the log and goes on deleting row by row, at the full rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_user_that_does_not_own_mqtt_msg_still_gets_retention() {
    let db = TestDb::create("partitions_not_owner").await;
    let owner = db.host(&db.rules("")).await;
    drop(owner);
    let client = db.client().await;
    let role = "partitions_not_owner";
    client
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}; \
             GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}; \
             INSERT INTO mqtt_msg (topic, qos, payload, arrived) \
               SELECT 'old', 1, '', now() - interval '2 days' FROM generate_series(1, 2500)"
        ))
        .await
        .unwrap();
    let rules = db.rules(&rule(
        "message.publish.1",
        r#"{"action": {"function": "on_message_publish"}, "retention": "1d", "pool": "pool1"}"#,
    ));
    let rules = rules.replace("pool1.username = postgres", &format!("pool1.username = {role}"));
    let host = host_harness::Host::with_rules(integration_tests::guest_module(), &rules, "t.conf", "n").await.unwrap();
    let tick = json!({"event": "tick"}).to_string();
    let output = replay(&host, &lines(&[tick.clone(), tick.clone(), tick.clone(), tick])).await;
    assert!(errors(&output).is_empty(), "{output:?}");
    let deleted: Vec<u64> =
        output.iter().filter_map(|l| l.get("tick")).map(|t| t["deleted"].as_u64().unwrap()).collect();
    assert_eq!(deleted, [1000, 1000, 500, 0]);
}

/// Messages whose ids interleave across partitions (brokers' clocks differ by a little) still
/// come in id order, a page at a time, none skipped: a fetch merges the partitions by id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_across_partitions_comes_in_id_order_and_skips_nothing() {
    let db = TestDb::create("partitions_fetch").await;
    let host = db.host(&db.rules(&offline_rules(r#"{"first_fetch": "earliest", "max_returned_count": 3}"#))).await;
    let client = db.client().await;
    // Partitions of 10 s, ten minutes ago.
    client.batch_execute("SELECT mqtt_msg_upkeep('40 seconds', now() - interval '10 minutes')").await.unwrap();
    let payloads: Vec<String> = (1..=10).map(|i| format!("m{i}")).collect();
    let publishes: Vec<String> = payloads.iter().map(|p| publish("p", "t", 1, p)).collect();
    replay(&host, &lines(&publishes)).await;
    client
        .batch_execute(
            "UPDATE mqtt_msg SET arrived = now() - interval '10 minutes' + (id % 4) * interval '10 seconds' + interval '1 second'",
        )
        .await
        .unwrap();
    let spread: i64 = client.query_one("SELECT count(DISTINCT tableoid) FROM mqtt_msg", &[]).await.unwrap().get(0);
    assert_eq!(spread, 4, "the messages are in four partitions, their ids interleaved");
    let output = replay(&host, &lines(&[connect("s"), subscribe("s", "t", 1)])).await;
    let expected: Vec<(String, String)> = payloads.iter().map(|p| ("s".to_owned(), p.clone())).collect();
    assert_eq!(deliveries(&output), expected);
}

/// A database made before partitioning, with a plain `mqtt_msg`: the schema makes it the first
/// partition, every row and id kept, and ids go on from where they were (else new messages
/// would sit below read positions, never delivered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_mqtt_msg_of_before_becomes_a_partition_keeping_rows_and_ids() {
    let db = TestDb::create("partitions_upgrade").await;
    // An early version's table: no expires_at yet.
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE mqtt_msg (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, msgid text, sender text, \
               topic text COLLATE \"C\" NOT NULL, qos smallint NOT NULL, retain boolean NOT NULL DEFAULT false, \
               payload bytea NOT NULL, properties jsonb, arrived timestamptz NOT NULL DEFAULT now()); \
             CREATE INDEX mqtt_msg_topic_id ON mqtt_msg (topic, id); \
             CREATE INDEX mqtt_msg_arrived ON mqtt_msg (arrived); \
             INSERT INTO mqtt_msg (topic, qos, payload) VALUES ('t', 1, 'a'), ('t', 1, 'b'), ('t', 1, 'c'); \
             DELETE FROM mqtt_msg WHERE payload = 'c'; \
             INSERT INTO mqtt_msg (topic, qos, payload, arrived) VALUES ('t', 1, 'ahead', now() + interval '1 year')",
        )
        .await
        .unwrap();
    let host = db.host(&db.rules(&offline_rules(r#"{"first_fetch": "earliest"}"#))).await;
    host.migrate().await.expect("applying the schema again changes nothing");
    let output = replay(&host, &lines(&[publish("p", "t", 1, "d"), connect("s"), subscribe("s", "t", 1)])).await;
    let delivered: Vec<String> = deliveries(&output).into_iter().map(|(_, payload)| payload).collect();
    assert_eq!(delivered, ["a", "b", "ahead", "d"]);
    let client = db.client().await;
    let rows = client.query("SELECT id, tableoid::regclass::text FROM mqtt_msg ORDER BY id", &[]).await.unwrap();
    let rows: Vec<(i64, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    // A row stamped a year ahead (a clock ahead) goes to the default partition: in the old rows'
    // partition it would keep that partition, and all that comes for a year, from being dropped.
    assert_eq!(rows[..3], [(1, "mqtt_msg_older".into()), (2, "mqtt_msg_older".into()), (4, "mqtt_msg_default".into())]);
    assert_eq!(rows[3].0, 5, "the id after the last one drawn, deleted or not");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tick_deletes_read_positions_idle_past_position_idle_a_bounded_step_at_a_time() {
    let db = TestDb::create("position_idle").await;
    // By default positions are kept, as EMQX keeps them.
    let keeping = db.host(&db.rules(&offline_rules(""))).await;
    db.client()
        .await
        .batch_execute(
            "INSERT INTO mqtt_acked (clientid, topic, topic_re, mid, updated) \
               SELECT 'idle' || i, 't', '^t$', 0, now() - interval '2 hours' FROM generate_series(1, 1500) i",
        )
        .await
        .unwrap();
    let tick = json!({"event": "tick"}).to_string();
    let ticks = async |host: &host_harness::Host| -> Vec<u64> {
        let output = replay(host, &lines(&[tick.clone(), tick.clone(), tick.clone(), tick.clone()])).await;
        output.iter().filter_map(|l| l.get("tick")).map(|t| t["deleted"].as_u64().unwrap()).collect()
    };
    let count =
        async || -> i64 { db.client().await.query_one("SELECT count(*) FROM mqtt_acked", &[]).await.unwrap().get(0) };

    replay(&keeping, &lines(&[connect("s"), subscribe("s", "t", 1), disconnect("s")])).await;
    assert_eq!(ticks(&keeping).await, [0, 0, 0, 0]);
    assert_eq!(count().await, 1501);

    // With position_idle: 1000 positions looked at per tick, from where the last one stopped;
    // the subscriber that was just here keeps its position.
    let sweeping = db.host(&db.rules(&offline_rules(r#"{"position_idle": "1h"}"#))).await;
    assert_eq!(ticks(&sweeping).await, [1000, 500, 0, 0]);
    let left: Vec<String> = db
        .client()
        .await
        .query("SELECT clientid FROM mqtt_acked", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, ["s"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_pools_check_the_server_certificate() {
    let db = TestDb::create("tls_pool").await;
    db.client().await.batch_execute("CREATE TABLE conn (ssl boolean)").await.unwrap();
    let ca = std::env::var("PG_TLS_CA")
        .unwrap_or_else(|_| format!("{}/../target/pg/tls/ca.crt", env!("CARGO_MANIFEST_DIR")));
    assert!(std::path::Path::new(&ca).exists(), "{ca} is missing: `make pg-up` makes it (needs the openssl command)");
    let record_ssl = rule(
        "client.connected.1",
        r#"{"action": {"sql": "insert into conn select ssl from pg_stat_ssl where pid = pg_backend_pid()"}, "pool": "pool1"}"#,
    );
    let tls_pool = format!("{}\nbackend.pgsql.pool1.ssl = true\n", db.pool_lines("pool1"));

    let host = db.host(&format!("{tls_pool}backend.pgsql.pool1.ssl_opts.cacertfile = {ca}\n{record_ssl}")).await;
    let output = replay(&host, &connect("c")).await;
    assert!(errors(&output).is_empty(), "{output:?}");
    let ssl: bool = db.client().await.query_one("SELECT ssl FROM conn", &[]).await.unwrap().get(0);
    assert!(ssl, "the pool's connection is encrypted");

    // Without the CA file only public roots are trusted: the test CA's certificate is refused.
    let untrusting = host_harness::Host::with_rules(
        integration_tests::guest_module(),
        &format!("{tls_pool}{record_ssl}"),
        "t.conf",
        "n",
    )
    .await
    .unwrap();
    let output = replay(&untrusting, &connect("c")).await;
    let error = errors(&output).first().map(|e| e["message"].to_string()).unwrap_or_default();
    assert!(error.contains("certificate"), "{output:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_every_function_example_runs_as_documented() {
    let db = TestDb::create("example_all_functions").await;
    let example = include_str!("../../examples/all-functions.conf");
    let rules: Vec<&str> = example.lines().filter(|l| !l.starts_with("backend.pgsql.pool1.")).collect();
    let host = db.host(&db.rules(&rules.join("\n"))).await;
    let output = replay(&host, include_str!("../../examples/all-functions.jsonl")).await;
    assert!(errors(&output).is_empty(), "{output:?}");
    let delivered: Vec<(String, bool)> = output
        .iter()
        .filter_map(|l| l.get("deliver"))
        .map(|d| (d["payload"].as_str().unwrap().to_owned(), d["retain"].as_bool().unwrap()))
        .collect();
    // Live while online; then, at the reconnect, the retained status and the missed reading; then
    // the empty retained message, live.
    assert_eq!(
        delivered,
        [("online".into(), false), ("online".into(), true), ("21.5".into(), false), ("".into(), false)]
    );
    let client = db.client().await;
    let archived: i64 =
        client.query_one("SELECT count(*) FROM mqtt_msg WHERE topic = 'log/gw'", &[]).await.unwrap().get(0);
    let retained: i64 = client.query_one("SELECT count(*) FROM mqtt_retain", &[]).await.unwrap().get(0);
    let state: i16 =
        client.query_one("SELECT state FROM mqtt_client WHERE clientid = 'dash'", &[]).await.unwrap().get(0);
    assert_eq!((archived, retained, state), (1, 0, 1));
}
