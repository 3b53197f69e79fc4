//! No message skipped under concurrent publishers (defect 4 of the original): ids are drawn at
//! INSERT but visible at COMMIT, so without the commit-order lock a position can jump past a
//! message that commits late. Meanwhile partitions are created and dropped, as the tick does:
//! their locks must not fail a publish or reorder what a fetch sees.

use std::collections::BTreeMap;
use std::sync::Arc;

use host_harness::Host;
use host_harness::bindings::{Client, Message, PublishOutcome, Subscription};
use integration_tests::{TestDb, offline_rules};

const PUBLISHERS: usize = 6;
const BATCHES: usize = 150;

fn message(publisher: usize, sequence: usize) -> Message {
    Message {
        id: None,
        msgid: format!("{publisher}-{sequence}"),
        sender: format!("pub{publisher}"),
        topic: format!("load/{publisher}"),
        payload: format!("{publisher}:{sequence}").into_bytes(),
        qos: 1,
        retain: false,
        timestamp: 1_700_000_000_000,
        properties: vec![],
    }
}

/// Receives every message it can: one subscription's backlog, page by page. Acking a page's last
/// message moves the position as far as acking each would (a position is a maximum), faster.
async fn drain(host: &Host, client: &Client, subscription: &Subscription, got: &mut Vec<Vec<u8>>) {
    let mut page = host.call(async |i| i.session_subscribed(client, subscription).await).await.unwrap().unwrap();
    loop {
        got.extend(page.messages.iter().map(|m| m.payload.clone()));
        if let Some(last) = page.messages.last() {
            host.call(async |i| i.message_acked(client, last, std::slice::from_ref(&subscription.filter)).await)
                .await
                .unwrap()
                .unwrap();
        }
        let Some(cursor) = page.next.take() else { break };
        page = host.call(async |i| i.session_fetch_next(client, subscription, &cursor).await).await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishers_and_a_reconnecting_subscriber_lose_nothing_and_repeat_nothing() {
    let db = TestDb::create("concurrent_publishers").await;
    let rules = db.rules(&offline_rules(r#"{"max_returned_count": 25}"#));
    let client = Client { clientid: "sub".into(), username: None, peerhost: None };
    let subscription = Subscription { filter: "load/#".into(), qos: 1 };

    let subscriber = db.host(&rules).await;
    let mut got = Vec::new();
    drain(&subscriber, &client, &subscription, &mut got).await; // first subscription: starts here

    // Each publisher has its own instance and connections; batches of 1 to 4 messages, so that
    // single inserts and pipelined transactions interleave. All start at once.
    let start = Arc::new(tokio::sync::Barrier::new(PUBLISHERS + 1));
    let mut publishers = Vec::new();
    for publisher in 0..PUBLISHERS {
        let host = db.host(&rules).await;
        let start = start.clone();
        publishers.push(tokio::spawn(async move {
            start.wait().await;
            let mut sequence = 0;
            for batch in 0..BATCHES {
                let messages: Vec<Message> = (0..1 + (batch + publisher) % 4)
                    .map(|_| {
                        sequence += 1;
                        message(publisher, sequence)
                    })
                    .collect();
                for outcome in host.call(async |i| i.message_publish(&messages).await).await.unwrap() {
                    assert!(matches!(outcome, PublishOutcome::Stored(_)), "{outcome:?}");
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            sequence
        }));
    }
    // Partition upkeep as a tick runs it, in simulated time 10 s further on each call: from the
    // second minute each call creates a partition and drops one (all empty: the messages'
    // timestamps, of 2023, put them in mqtt_msg_default, which creating a partition locks and
    // reads, and dropping one locks with the whole table).
    let publishing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let upkeep = {
        let db_client = db.client().await;
        // Partitions from now on first, while the table is empty: with none, the first upkeep
        // would make the messages stored so far a partition of their own, which simulated time
        // then drops as past the retention.
        db_client.query_one("SELECT mqtt_msg_upkeep('40 seconds')", &[]).await.unwrap();
        let publishing = publishing.clone();
        tokio::spawn(async move {
            let (mut calls, mut dropped) = (0.0f64, 0);
            while calls < 30.0 || publishing.load(std::sync::atomic::Ordering::Relaxed) {
                let row = db_client
                    .query_one("SELECT mqtt_msg_upkeep('40 seconds', now() + $1 * interval '10 seconds')", &[&calls])
                    .await
                    .unwrap();
                dropped += row.get::<_, i32>(0);
                calls += 1.0;
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            dropped
        })
    };
    // Meanwhile the subscriber comes and goes, draining what it can each time.
    start.wait().await;
    let mut drains = 0;
    while !publishers.iter().all(|p| p.is_finished()) {
        drain(&subscriber, &client, &subscription, &mut got).await;
        drains += 1;
    }
    let mut sent = 0;
    for publisher in publishers {
        sent += publisher.await.unwrap();
    }
    publishing.store(false, std::sync::atomic::Ordering::Relaxed);
    drain(&subscriber, &client, &subscription, &mut got).await;
    assert!(drains > 10, "the subscriber came back only {drains} times while publishers ran");
    assert!(upkeep.await.unwrap() > 20, "partitions were dropped while publishers ran");

    // Exactly once each, and each publisher's messages in the order it sent them.
    let mut last: BTreeMap<usize, usize> = BTreeMap::new();
    for payload in &got {
        let text = String::from_utf8(payload.clone()).unwrap();
        let (publisher, sequence) = text.split_once(':').unwrap();
        let (publisher, sequence): (usize, usize) = (publisher.parse().unwrap(), sequence.parse().unwrap());
        let previous = last.insert(publisher, sequence).unwrap_or(0);
        assert_eq!(sequence, previous + 1, "publisher {publisher}: after {previous} came {sequence}");
    }
    assert_eq!(got.len(), sent, "every message exactly once");
}
