//! Offline messages, one-to-many, through the harness: the defects of the original it must not
//! have (positions moving back, repeats on reconnection, QoS rules, time_range, unsubscribe).
//! The seed's flow, wildcards, paging and at-least-once are conformance scenarios
//! (`tests/conformance`), run against every host.

use integration_tests::event::{
    ack, connect, disconnect, lines, publish, subscribe, subscribe_manual_ack, unsubscribe,
};
use integration_tests::{TestDb, deliveries, errors, offline_rules, replay};

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected.iter().map(|(c, p)| (c.to_string(), p.to_string())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_again_and_again_never_repeats_a_message() {
    let db = TestDb::create("reconnect_no_duplicates").await;
    let host = db.host(&db.rules(&offline_rules(""))).await;
    let mut events = vec![connect("s"), subscribe("s", "t", 1), disconnect("s")];
    for round in 0..3 {
        events.push(publish("p", "t", 1, &format!("m{round}")));
        for _ in 0..2 {
            events.extend([connect("s"), subscribe("s", "t", 2), disconnect("s")]);
        }
    }
    let output = replay(&host, &lines(&events)).await;
    assert_eq!(deliveries(&output), pairs(&[("s", "m0"), ("s", "m1"), ("s", "m2")]));
}

// In a fresh database stored ids are 1, 2, ...
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_ack_after_a_newer_one_leaves_the_position() {
    let db = TestDb::create("old_ack").await;
    let host = db.host(&db.rules(&offline_rules(""))).await;
    let events = lines(&[
        connect("s"),
        subscribe("s", "t", 1),
        disconnect("s"),
        publish("p", "t", 1, "one"),
        publish("p", "t", 1, "two"),
        connect("s"),
        subscribe_manual_ack("s", "t", 1),
        // Acks arrive newest first; the older one must not move the position back.
        ack("s", 2),
        ack("s", 1),
        disconnect("s"),
        connect("s"),
        subscribe("s", "t", 1),
    ]);
    let output = replay(&host, &events).await;
    assert!(errors(&output).is_empty(), "{output:?}");
    assert_eq!(deliveries(&output), pairs(&[("s", "one"), ("s", "two")]), "nothing comes twice");
    let position: i64 = db
        .client()
        .await
        .query_one("SELECT mid FROM mqtt_acked WHERE clientid = 's' AND topic = 't'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(position, 2);
}

/// The harness's ack gate is the host library's (`protocol::delivery`), as the broker's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_above_an_unacked_message_does_not_move_the_position_past_it() {
    let db = TestDb::create("ack_gate").await;
    let host = db.host(&db.rules(&offline_rules(""))).await;
    let events = lines(&[
        connect("s"),
        subscribe("s", "t", 1),
        disconnect("s"),
        publish("p", "t", 1, "one"),
        publish("p", "t", 1, "two"),
        publish("p", "t", 1, "three"),
        // Gets all three, acks only the last: the position may not pass one and two.
        connect("s"),
        subscribe_manual_ack("s", "t", 1),
        ack("s", 3),
        disconnect("s"),
        connect("s"),
        subscribe("s", "t", 1),
    ]);
    let output = replay(&host, &events).await;
    assert!(errors(&output).is_empty(), "{output:?}");
    let again = pairs(&[("s", "one"), ("s", "two"), ("s", "three"), ("s", "one"), ("s", "two"), ("s", "three")]);
    assert_eq!(deliveries(&output), again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_subscription_starts_at_the_newest_message() {
    let db = TestDb::create("first_subscription").await;
    let host = db.host(&db.rules(&offline_rules(""))).await;
    let events = lines(&[
        publish("p", "t", 1, "before"),
        connect("s"),
        subscribe("s", "t", 1),
        disconnect("s"),
        publish("p", "t", 1, "after"),
        connect("s"),
        subscribe("s", "t", 1),
    ]);
    let output = replay(&host, &events).await;
    assert_eq!(deliveries(&output), pairs(&[("s", "after")]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_is_not_stored_and_qos0_subscriptions_do_not_fetch() {
    let db = TestDb::create("qos_rules").await;
    let host = db.host(&db.rules(&offline_rules(""))).await;
    let events = lines(&[
        connect("s1"),
        subscribe("s1", "t", 1),
        connect("s0"),
        subscribe("s0", "t", 0),
        disconnect("s1"),
        disconnect("s0"),
        publish("p", "t", 0, "fire-and-forget"),
        publish("p", "t", 1, "kept"),
        connect("s1"),
        subscribe("s1", "t", 1),
        connect("s0"),
        subscribe("s0", "t", 0),
    ]);
    let output = replay(&host, &events).await;
    assert_eq!(deliveries(&output), pairs(&[("s1", "kept")]));
    let published: Vec<_> = output.iter().filter_map(|l| l.get("published")).map(|p| p["id"].clone()).collect();
    assert!(published[0].is_null() && published[1].is_i64(), "{published:?}");
    let stored: i64 = db.client().await.query_one("SELECT count(*) FROM mqtt_msg", &[]).await.unwrap().get(0);
    assert_eq!(stored, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_range_leaves_older_messages_out() {
    let db = TestDb::create("time_range").await;
    let host = db.host(&db.rules(&offline_rules(r#"{"time_range": "1h"}"#))).await;
    let setup = lines(&[
        connect("s"),
        subscribe("s", "t", 1),
        disconnect("s"),
        publish("p", "t", 1, "old"),
        publish("p", "t", 1, "recent"),
    ]);
    replay(&host, &setup).await;
    db.client()
        .await
        .execute("UPDATE mqtt_msg SET arrived = now() - interval '2 hours' WHERE payload = 'old'::bytea", &[])
        .await
        .unwrap();
    let output = replay(&host, &lines(&[connect("s"), subscribe("s", "t", 1)])).await;
    assert_eq!(deliveries(&output), pairs(&[("s", "recent")]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_rule_forgets_the_position() {
    let db = TestDb::create("unsubscribe_sql").await;
    let rules = format!(
        "{}\nbackend.pgsql.hook.session.unsubscribed.1 = {{\"topic\": \"#\", \"action\": {{\"sql\": [\"delete from mqtt_acked where clientid = ${{clientid}} and topic = ${{topic}}\"]}}, \"pool\": \"pool1\"}}",
        offline_rules("")
    );
    let host = db.host(&db.rules(&rules)).await;
    let events = lines(&[
        connect("s"),
        subscribe("s", "t", 1),
        publish("p", "t", 1, "while subscribed"),
        unsubscribe("s", "t"),
        disconnect("s"),
        publish("p", "t", 1, "after unsubscribe"),
        connect("s"),
        subscribe("s", "t", 1),
    ]);
    let output = replay(&host, &events).await;
    // After the position is forgotten, the next subscription is a first one again.
    assert_eq!(deliveries(&output), pairs(&[("s", "while subscribed")]));
    let positions: i64 = db.client().await.query_one("SELECT count(*) FROM mqtt_acked", &[]).await.unwrap().get(0);
    assert_eq!(positions, 1, "the re-subscription made a new one");
}

/// A share group's position: members ack out of order, the mark moves only over what is acked
/// without a gap (a message of another topic is no gap), and a fetch passes over what was acked
/// above the mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_groups_mark_moves_only_over_acks_without_a_gap() {
    let db = TestDb::create("share_group_mark").await;
    let host = db.host(&db.rules(&offline_rules(""))).await;
    let group = "$share/g/t/#";
    let position = async || -> (i64, Vec<i64>) {
        let row = db
            .client()
            .await
            .query_one(
                "SELECT mid, coalesce(acked, '{}') FROM mqtt_acked WHERE clientid = '$share/g' AND topic = 't/#'",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    let events = lines(&[
        connect("w1"),
        subscribe("w1", group, 1),
        disconnect("w1"),
        publish("p", "t/a", 1, "one"),
        publish("p", "x", 1, "other"),
        publish("p", "t/a", 1, "two"),
        publish("p", "t/a", 1, "three"),
        publish("p", "t/a", 1, "four"),
        // w1 gets the group's backlog and acks 4, then 3: 1 is not acked, the mark stays.
        connect("w1"),
        subscribe_manual_ack("w1", group, 1),
        ack("w1", 5),
        ack("w1", 4),
    ]);
    let output = replay(&host, &events).await;
    assert!(errors(&output).is_empty(), "{output:?}");
    assert_eq!(deliveries(&output), pairs(&[("w1", "one"), ("w1", "two"), ("w1", "three"), ("w1", "four")]));
    assert_eq!(position().await, (0, vec![5, 4]), "acked above the mark, the mark below 1");
    // Another member (w1's connection is gone) gets what the group has not acked: 1 and 3.
    let events = lines(&[connect("w2"), subscribe_manual_ack("w2", group, 1), ack("w2", 3)]);
    let output = replay(&host, &events).await;
    assert_eq!(deliveries(&output), pairs(&[("w2", "one"), ("w2", "two")]));
    assert_eq!(position().await, (0, vec![5, 4, 3]));
    let output = replay(&host, &lines(&[connect("w2"), subscribe_manual_ack("w2", group, 1), ack("w2", 1)])).await;
    assert_eq!(deliveries(&output), pairs(&[("w2", "one")]));
    assert_eq!(position().await, (5, vec![]), "over 1, the other topic's 2, and 3 to 5");
    // A client calling itself `$share/g` neither reads nor moves the group's position.
    publish_more_and_try_as_the_group(&host).await;
    assert_eq!(position().await, (5, vec![]));
}

async fn publish_more_and_try_as_the_group(host: &host_harness::Host) {
    let events = lines(&[
        publish("p", "t/a", 1, "five"),
        connect("$share/g"),
        subscribe("$share/g", "t/#", 1),
        disconnect("$share/g"),
        connect("$share/g"),
        subscribe("$share/g", "t/#", 1),
    ]);
    let output = replay(host, &events).await;
    assert_eq!(deliveries(&output), pairs(&[]), "{output:?}");
}
