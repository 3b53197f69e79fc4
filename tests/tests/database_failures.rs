//! The database goes away and comes back: nothing a publisher was told was stored is lost, the
//! host recovers by itself, and operators choose what a failing rule does.

use std::time::{Duration, Instant};

use host_harness::bindings::{Message, PublishOutcome};
use integration_tests::event::{connect, disconnect, lines, publish, subscribe};
use integration_tests::{OwnCluster, TestDb, deliveries, errors, offline_rules, pg_script, replay};

fn message(sequence: usize) -> Message {
    Message {
        id: None,
        msgid: format!("m{sequence}"),
        sender: "p".into(),
        topic: "t".into(),
        payload: sequence.to_string().into_bytes(),
        qos: 1,
        retain: false,
        timestamp: 0,
        properties: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_stream_loses_no_acknowledged_message_and_the_host_recovers() {
    let cluster = OwnCluster::fresh(15498, "pg-failures");
    let rules = cluster.offline_rules();
    let host = host_harness::Host::with_rules(integration_tests::guest_module(), &rules, "t.conf", "n").await.unwrap();
    host.migrate().await.unwrap();
    replay(&host, &lines(&[connect("s"), subscribe("s", "t", 1), disconnect("s")])).await;

    // A steady stream of publishes; a third of the way in, the server restarts.
    let mut stored: Vec<i64> = Vec::new();
    let mut failed = 0;
    let mut restart = None;
    let started = Instant::now();
    let mut sequence = 0;
    while started.elapsed() < Duration::from_secs(6)
        || restart.as_ref().is_some_and(|r: &std::thread::JoinHandle<()>| !r.is_finished())
    {
        sequence += 1;
        if restart.is_none() && started.elapsed() > Duration::from_secs(2) {
            let (port, base) = (cluster.port, cluster.base.clone());
            restart = Some(std::thread::spawn(move || pg_script(port, &base, "restart")));
        }
        let messages = [message(sequence)];
        match host.call(async |instance| instance.message_publish(&messages).await).await {
            Ok(outcomes) => match &outcomes[0] {
                PublishOutcome::Stored(id) => stored.push(*id),
                PublishOutcome::Failed(_) => failed += 1,
                PublishOutcome::NotStored => panic!("a QoS 1 message must be stored or fail"),
            },
            Err(e) => panic!("the guest should not trap on a database outage: {e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    restart.unwrap().join().unwrap();
    eprintln!("during the restart: {} publishes stored, {failed} refused", stored.len());
    assert!(failed > 0, "the restart was not noticed: the test tested nothing");
    assert!(stored.len() > 100, "only {} stored", stored.len());

    // Recovered without a restart of the host: the stream ends with successes again.
    let messages = [message(0)];
    let outcome = host.call(async |instance| instance.message_publish(&messages).await).await.unwrap();
    assert!(matches!(outcome[0], PublishOutcome::Stored(_)), "{outcome:?}");

    // Everything reported stored is there, and the offline subscriber gets all of it, once, in order.
    let output = replay(&host, &lines(&[connect("s"), subscribe("s", "t", 1)])).await;
    let delivered: Vec<i64> =
        output.iter().filter_map(|l| l.get("deliver")).map(|d| d["id"].as_i64().unwrap()).collect();
    let mut sorted = delivered.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, delivered, "in order, once each");
    let missing: Vec<&i64> = stored.iter().filter(|id| !delivered.contains(id)).collect();
    assert!(missing.is_empty(), "acknowledged but not delivered: {missing:?}");
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_error_ignore_lets_the_message_through_and_reject_refuses_it() {
    for (policy, accepted) in [("ignore", true), ("reject", false)] {
        let db = TestDb::create(&format!("on_error_{policy}")).await;
        let audit = format!(
            r#"backend.pgsql.hook.message.publish.2 = {{"action": {{"sql": "insert into no_such_table values (${{topic}})"}}, "on_error": "{policy}", "pool": "pool1"}}"#
        );
        let host = db.host(&db.rules(&format!("{}\n{audit}", offline_rules("")))).await;
        let output = replay(&host, &publish("p", "t", 1, "x")).await;
        assert_eq!(output.iter().any(|l| l["published"]["id"].is_i64()), accepted, "{policy}: {output:?}");
        assert_eq!(errors(&output).is_empty(), accepted, "{policy}: {output:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_statement_is_cancelled_by_the_pool_statement_timeout() {
    let db = TestDb::create("statement_timeout").await;
    let rules = format!(
        "{}\nbackend.pgsql.pool1.statement_timeout = 1s\n\
         backend.pgsql.hook.client.connected.1 = {{\"action\": {{\"sql\": \"select pg_sleep(5)\"}}, \"pool\": \"pool1\"}}\n{}",
        db.pool_lines("pool1"),
        offline_rules("")
    );
    let host = db.host(&rules).await;
    let started = Instant::now();
    let output = replay(&host, &lines(&[connect("c"), subscribe("c", "t", 1), publish("p", "t", 1, "after")])).await;
    assert!(started.elapsed() < Duration::from_secs(4), "took {:?}", started.elapsed());
    let error = errors(&output)[0]["message"].as_str().unwrap().to_owned();
    assert!(error.contains("57014"), "cancelled by statement_timeout: {error}");
    // The failed rule is reported; the client is connected all the same and the host serves on.
    assert!(output.iter().any(|l| l["published"]["id"].is_i64()), "{output:?}");
    assert_eq!(deliveries(&output), vec![("c".to_owned(), "after".to_owned())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_past_the_size_cap_is_refused_not_loaded() {
    let db = TestDb::create("result_cap").await;
    let host = db.host(&db.rules(&offline_rules(r#"{"max_returned_count": 200000, "first_fetch": "earliest"}"#))).await;
    db.client()
        .await
        .batch_execute("INSERT INTO mqtt_msg (topic, qos, payload) SELECT 't', 1, '' FROM generate_series(1, 100001)")
        .await
        .unwrap();
    let output = replay(&host, &lines(&[connect("s"), subscribe("s", "t", 1)])).await;
    let error = errors(&output)[0]["message"].as_str().unwrap().to_owned();
    assert!(error.contains("result too large") && error.contains("100000 rows"), "{error}");
    assert!(deliveries(&output).is_empty());
}
