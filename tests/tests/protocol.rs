//! The fast protocol tier: the real guest in the real host, driven through the harness's broker
//! (the protocol of `host_harness::protocol`), over a fake database (`FakeSql`) instead of
//! PostgreSQL. Edge cases of delivery and acking, in milliseconds.

use std::sync::Arc;

use host_harness::Host;
use host_harness::bindings::{Client, Subscription};
use integration_tests::event::{ack, connect, disconnect, lines, subscribe, subscribe_manual_ack};
use integration_tests::fake_sql::FakeSql;
use integration_tests::{deliveries, errors, guest_module, offline_rules, replay};

/// The example's fetch and ack rules, with `offline_opts`, on a pool that is never connected.
fn rules(offline_opts: &str) -> String {
    format!("backend.pgsql.pool1.server = 127.0.0.1:1\n{}\n", offline_rules(offline_opts))
}

async fn host(fake: &Arc<FakeSql>, offline_opts: &str) -> Host {
    Host::with_sql(guest_module(), &rules(offline_opts), "fake.conf", "node1@test", fake.clone())
        .await
        .expect("rules accepted")
}

fn payloads(output: &[serde_json::Value]) -> Vec<String> {
    deliveries(output).into_iter().map(|(_, payload)| payload).collect()
}

#[tokio::test]
async fn acks_out_of_order_move_the_position_only_over_what_is_acked_below() {
    let fake = Arc::new(FakeSql::default());
    let host = host(&fake, r#"{"first_fetch": "earliest"}"#).await;
    fake.store_many("t", 3);
    let output = replay(
        &host,
        &lines(&[connect("s"), subscribe_manual_ack("s", "t", 1), ack("s", 3), ack("s", 1), ack("s", 2)]),
    )
    .await;
    assert_eq!(payloads(&output), ["1", "2", "3"]);
    // The ack of 3 waits for 1 and 2; the ack of 1 moves the position to 1, that of 2 to 3.
    let filters = vec!["t".to_owned()];
    assert_eq!(fake.acks(), [("s".to_owned(), 1, filters.clone()), ("s".to_owned(), 3, filters)]);
    assert_eq!(fake.position("s", "t"), Some(3));
}

#[tokio::test]
async fn a_page_failing_midway_keeps_what_was_acked_and_the_next_visit_gets_the_rest() {
    let fake = Arc::new(FakeSql::default());
    let host = host(&fake, r#"{"first_fetch": "earliest", "max_returned_count": 2}"#).await;
    fake.store_many("t", 5);
    // The second page fails: the first page's two messages arrive and are acked (the position
    // moves to 2: delivered and acked, all of them), the subscription reports the error, and
    // nothing after it moves the position.
    fake.fail_page(Some(1));
    let output = replay(&host, &lines(&[connect("s"), subscribe("s", "t", 1), disconnect("s")])).await;
    assert_eq!(payloads(&output), ["1", "2"]);
    assert_eq!(errors(&output).len(), 1, "{output:?}");
    assert_eq!(fake.position("s", "t"), Some(2));

    // Next visit: the rest, nothing skipped, nothing again.
    fake.fail_page(None);
    let output = replay(&host, &lines(&[connect("s"), subscribe("s", "t", 1)])).await;
    assert_eq!(payloads(&output), ["3", "4", "5"]);
    assert_eq!(fake.position("s", "t"), Some(5));
}

#[tokio::test]
async fn a_reload_between_pages_serves_the_next_page_with_the_rule_now_in_force() {
    let fake = Arc::new(FakeSql::default());
    let host = host(&fake, r#"{"first_fetch": "earliest", "max_returned_count": 2}"#).await;
    fake.store_many("t", 6);
    let client = Client { clientid: "s".into(), username: None, peerhost: None };
    let subscription = Subscription { filter: "t".into(), qos: 1 };
    let first = async |i: &mut host_harness::Instance| i.session_subscribed(&client, &subscription).await;
    let page = host.fetch(&client, &subscription, None, first).await.unwrap().unwrap();
    let cursor = page.next.expect("more to come");

    host.reload_rules(&rules(r#"{"first_fetch": "earliest", "max_returned_count": 3}"#), "fake.conf").await.unwrap();
    let next = async |i: &mut host_harness::Instance| i.session_fetch_next(&client, &subscription, &cursor).await;
    let page2 = host.fetch(&client, &subscription, Some(&cursor), next).await.unwrap().unwrap();
    let got: Vec<String> =
        page.messages.iter().chain(&page2.messages).map(|m| String::from_utf8_lossy(&m.payload).into_owned()).collect();
    assert_eq!(got, ["1", "2", "3", "4", "5"], "the backlog goes on where it was");
    assert_eq!(fake.page_limits(), [2, 3], "the second page by the reloaded rule's page size");
}
