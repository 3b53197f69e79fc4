//! Target 4 of the performance issue: 100 offline subscribers coming back to a 1000-message
//! backlog, against plain rmqtt fanning the same 1000 messages out live to 100 online subscribers,
//! in one run, with the CPU per delivered message of the clients, the broker and PostgreSQL.
//!
//! Every subscriber acks every message (QoS 1), and the extension writes those acks (the example
//! rules' `message.acked` rule), so a backlog delivery costs a fetched row, a forward and an ack.

use std::time::Instant;

use integration_tests::mqtt::{BrokerProcess, Mqtt};
use integration_tests::{TestDb, offline_rules};
use rumqttc::QoS;

use crate::broker::{launcher, peak_rss_mib};
use crate::{cpu, median};

const SUBSCRIBERS: usize = 100;
const BACKLOG: usize = 1000;

/// One timed delivery of `SUBSCRIBERS * BACKLOG` messages.
struct Delivery {
    seconds: f64,
    /// CPU microseconds per delivered message: the clients (this process), the broker, PostgreSQL.
    cpu_us: Vec<f64>,
}

impl Delivery {
    fn median_of(runs: &[Delivery]) -> (f64, Vec<f64>) {
        let columns = runs[0].cpu_us.len();
        let cpu = (0..columns).map(|i| median(runs.iter().map(|r| r.cpu_us[i]).collect())).collect();
        (median(runs.iter().map(|r| r.seconds).collect()), cpu)
    }
}

pub async fn run(runs: usize) -> anyhow::Result<()> {
    let launcher = launcher();
    println!(
        "\n## backlog: {SUBSCRIBERS} offline subscribers come back to a {BACKLOG}-message backlog, against the \
         same messages fanned out live by the broker without the extension"
    );
    println!("CPU: microseconds per delivered message of the clients (this process), the broker and PostgreSQL");
    println!(
        "| delivery | seconds until all have every message (median) | messages/s delivered | vs live | CPU clients | CPU broker | CPU PostgreSQL |"
    );
    println!("|---|---|---|---|---|---|---|");
    let (mut backlogs, mut lives) = (Vec::new(), Vec::new());
    let mut peak = 0.0f64;
    // Taking turns, so that both get the same share of the machine's drift.
    for _ in 0..runs {
        let db = TestDb::create("bench_backlog").await;
        let broker = launcher.start("bench-backlog", &db.rules(&offline_rules(""))).await;
        backlogs.push(backlog(&broker).await);
        peak = peak.max(peak_rss_mib(&broker));
        drop(broker);
        let broker = launcher.start_plain("bench-fanout").await;
        lives.push(fan_out(&broker).await);
    }
    let (backlog_seconds, backlog_cpu) = Delivery::median_of(&backlogs);
    let (live_seconds, live_cpu) = Delivery::median_of(&lives);
    let messages = (SUBSCRIBERS * BACKLOG) as f64;
    for (what, seconds, cpu) in [
        ("backlog, from the database (extension)", backlog_seconds, backlog_cpu),
        ("live, without the extension", live_seconds, live_cpu),
    ] {
        println!(
            "| {what} | {seconds:.2} | {:.0} | {:.0} % | {:.1} | {:.1} | {:.1} |",
            messages / seconds,
            100.0 * live_seconds / seconds,
            cpu[0],
            cpu[1],
            cpu[2]
        );
    }
    println!("\npeak RSS of the broker draining backlogs: {peak:.0} MiB");
    Ok(())
}

/// Times `deliver` and samples the CPU of this process, `broker` and PostgreSQL around it.
async fn measured(broker: &BrokerProcess, deliver: impl Future<Output = ()>) -> Delivery {
    let before = cpu::Sample::take(&[broker.pid()]);
    let started = Instant::now();
    deliver.await;
    let elapsed = started.elapsed();
    let cpu_us = before.per_message_until(&cpu::Sample::take(&[broker.pid()]), SUBSCRIBERS * BACKLOG);
    Delivery { seconds: elapsed.as_secs_f64(), cpu_us }
}

/// Plain rmqtt: the subscribers are online, and the publisher publishes the messages one after
/// the other; timed from the first PUBLISH until every subscriber has every message.
async fn fan_out(broker: &BrokerProcess) -> Delivery {
    let mut subscribers = Vec::new();
    for s in 0..SUBSCRIBERS {
        let mut subscriber = Mqtt::connect(broker.port, &format!("live-{s}"), false).await;
        subscriber.subscribe("backlog/#", QoS::AtLeastOnce).await;
        subscribers.push(subscriber);
    }
    let mut publisher = Mqtt::connect(broker.port, "publisher", false).await;
    let mut received = Vec::new();
    let delivery = measured(broker, async {
        let receiving: Vec<_> = subscribers
            .into_iter()
            .map(|mut subscriber| {
                tokio::spawn(async move {
                    assert_eq!(subscriber.receive(BACKLOG).await.len(), BACKLOG);
                    subscriber
                })
            })
            .collect();
        for i in 0..BACKLOG {
            publisher.publish("backlog/x", QoS::AtLeastOnce, &format!("{i:08}")).await;
        }
        for task in receiving {
            received.push(task.await.expect("subscriber"));
        }
    })
    .await;
    disconnect_all(received).await;
    delivery
}

/// With the extension: the subscribers subscribe once and leave, the backlog is published, and
/// all come back at once; timed from their return until every one has every message.
async fn backlog(broker: &BrokerProcess) -> Delivery {
    for s in 0..SUBSCRIBERS {
        let mut subscriber = Mqtt::connect(broker.port, &format!("sub-{s}"), false).await;
        subscriber.subscribe("backlog/#", QoS::AtLeastOnce).await;
        subscriber.disconnect().await;
    }
    let mut publisher = Mqtt::connect(broker.port, "publisher", false).await;
    for i in 0..BACKLOG {
        publisher.publish("backlog/x", QoS::AtLeastOnce, &format!("{i:08}")).await;
    }
    let mut received = Vec::new();
    let delivery = measured(broker, async {
        let tasks: Vec<_> = (0..SUBSCRIBERS)
            .map(|s| {
                let port = broker.port;
                tokio::spawn(async move {
                    let mut subscriber = Mqtt::connect(port, &format!("sub-{s}"), false).await;
                    subscriber.subscribe("backlog/#", QoS::AtLeastOnce).await;
                    assert_eq!(subscriber.receive(BACKLOG).await.len(), BACKLOG);
                    subscriber
                })
            })
            .collect();
        for task in tasks {
            received.push(task.await.expect("subscriber"));
        }
    })
    .await;
    disconnect_all(received).await;
    delivery
}

async fn disconnect_all(subscribers: Vec<Mqtt>) {
    for subscriber in subscribers {
        subscriber.disconnect().await;
    }
}
