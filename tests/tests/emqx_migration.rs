//! Converting an EMQX 4 database: the original tables, with data, become ours without losing a
//! row, and subscribers carry on from their old positions.

use integration_tests::event::{connect, lines, publish, subscribe};
use integration_tests::{TestDb, deliveries, guest_module, offline_rules, replay};

/// The original plugin's tables, as its documentation creates them, with a little history.
const EMQX4: &str = "
CREATE TABLE mqtt_client(id SERIAL primary key, clientid varchar(100), state integer,
  node varchar(100), online_at timestamp, offline_at timestamp, created timestamp, UNIQUE (clientid));
CREATE TABLE mqtt_sub(id SERIAL primary key, clientid varchar(100), topic varchar(200), qos integer,
  created timestamp, UNIQUE (clientid, topic));
CREATE TABLE mqtt_msg(id SERIAL8 primary key, msgid varchar(64), sender varchar(64), topic varchar(255),
  qos integer, retain integer, payload text, arrived timestamp);
CREATE TABLE mqtt_retain(id SERIAL primary key, topic varchar(200), msgid varchar(60), sender varchar(100),
  qos integer, payload text, arrived timestamp, UNIQUE (topic));
CREATE TABLE mqtt_acked(id SERIAL8 primary key, clientid varchar(64), topic varchar(64), mid integer,
  created timestamp, UNIQUE (clientid, topic));
INSERT INTO mqtt_msg (msgid, sender, topic, qos, retain, payload, arrived) VALUES
  ('m1', 'pub', 'room/1', 1, 0, 'read already', now()),
  ('m2', 'pub', 'room/1', 1, 0, 'read already too', now()),
  ('m3', 'pub', 'room/1', 1, 0, 'unread: ünïcödé', now()),
  ('m4', 'pub', 'room/2', 2, 1, 'other room', now());
INSERT INTO mqtt_acked (clientid, topic, mid, created) VALUES ('sub', 'room/1', 2, now());
INSERT INTO mqtt_client (clientid, state, node, online_at, created) VALUES ('sub', 0, 'emqx@old', now(), now());
INSERT INTO mqtt_sub (clientid, topic, qos, created) VALUES ('sub', 'room/1', 1, now());
INSERT INTO mqtt_retain (topic, msgid, sender, qos, payload, arrived) VALUES ('room/1', 'r1', 'pub', 1, 'retained', now());
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emqx4_database_converts_without_losing_rows_or_positions() {
    let db = TestDb::create("from_emqx4").await;
    db.client().await.batch_execute(EMQX4).await.unwrap();
    let rules = db.rules(&offline_rules(""));
    let host = host_harness::Host::with_rules(guest_module(), &rules, "test.conf", "node1@test").await.unwrap();
    host.migrate_from_emqx4("pool1").await.unwrap();

    let client = db.client().await;
    let count = |table: &'static str| {
        let client = &client;
        async move { client.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(
        (
            count("mqtt_msg").await,
            count("mqtt_acked").await,
            count("mqtt_client").await,
            count("mqtt_sub").await,
            count("mqtt_retain").await
        ),
        (4, 1, 1, 1, 1)
    );
    assert_eq!(count("emqx4.mqtt_msg").await, 4, "the originals are kept aside");
    let payload: Vec<u8> =
        client.query_one("SELECT payload FROM mqtt_msg WHERE msgid = 'm3'", &[]).await.unwrap().get(0);
    assert_eq!(payload, "unread: ünïcödé".as_bytes());

    // The subscriber resumes after its old position; new ids continue after the old ones.
    let output =
        replay(&host, &lines(&[publish("pub", "room/1", 1, "new"), connect("sub"), subscribe("sub", "room/1", 1)]))
            .await;
    assert_eq!(output[0]["published"]["id"], 5);
    let got: Vec<String> = deliveries(&output).into_iter().map(|(_, p)| p).collect();
    assert_eq!(got, ["unread: ünïcödé", "new"]);

    // A second run refuses: there is nothing of EMQX 4 left to convert.
    let again = host.migrate_from_emqx4("pool1").await.unwrap_err();
    assert!(format!("{again:#}").contains("no EMQX 4 tables here"), "{again:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plain_migration_refuses_an_emqx4_database_and_changes_nothing() {
    let db = TestDb::create("emqx4_refused").await;
    db.client().await.batch_execute(EMQX4).await.unwrap();
    let rules = db.rules(&offline_rules(""));
    let host = host_harness::Host::with_rules(guest_module(), &rules, "test.conf", "node1@test").await.unwrap();
    let error = format!("{:#}", host.migrate().await.unwrap_err());
    assert!(error.contains("EMQX 4") && error.contains("migrate --from-emqx"), "{error}");
    let client = db.client().await;
    let converted = client
        .query_one(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'mqtt_acked' AND column_name = 'topic_re'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(converted, 0, "the EMQX 4 tables are as they were");
    // Converted, the same database migrates as usual.
    host.migrate_from_emqx4("pool1").await.unwrap();
    host.migrate().await.unwrap();
}
