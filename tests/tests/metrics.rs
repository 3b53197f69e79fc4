//! Metrics: per function (from the guest), per hook (from the host), deliveries; as JSON and as
//! Prometheus text.

use integration_tests::{TestDb, deliveries, offline_rules, replay};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_flow_is_counted_per_function_and_per_hook() {
    let db = TestDb::create("metrics").await;
    let host = db.host(&db.rules(&offline_rules(""))).await;
    let output = replay(&host, include_str!("../../examples/seed.jsonl")).await;
    let snapshot = host.metrics().snapshot();

    let publish = &snapshot.functions["on_message_publish"];
    assert_eq!((publish.calls, publish.errors, publish.rows), (5, 0, 5), "five messages stored");
    let fetch = &snapshot.functions["on_message_fetch"];
    assert_eq!((fetch.calls, fetch.rows), (6, 7), "six subscriptions fetched seven messages between them");
    let acked = &snapshot.functions["on_message_acked"];
    assert_eq!(acked.calls, 9, "each of the nine deliveries acked");
    assert_eq!(snapshot.messages_delivered, deliveries(&output).len() as u64);
    let publish_hook = &snapshot.hooks["message-publish"];
    assert_eq!((publish_hook.calls, publish_hook.traps, publish_hook.latency.count), (5, 0, 5));
    assert!(publish_hook.latency.sum_seconds > 0.0);

    let text = host_harness::metrics::prometheus(&[("guest", host.metrics())]);
    for line in [
        "# TYPE mqtt_offline_function_calls_total counter",
        "mqtt_offline_function_calls_total{extension=\"guest\",function=\"on_message_publish\"} 5",
        "mqtt_offline_function_rows_total{extension=\"guest\",function=\"on_message_fetch\"} 7",
        "mqtt_offline_hook_duration_seconds_count{extension=\"guest\",hook=\"message-publish\"} 5",
        "mqtt_offline_hook_duration_seconds_bucket{extension=\"guest\",hook=\"message-publish\",le=\"+Inf\"} 5",
        "mqtt_offline_messages_delivered_total{extension=\"guest\"} 9",
    ] {
        assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
    }
}
