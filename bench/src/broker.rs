//! The broker with real MQTT connections (rumqttc), as processes: QoS 1 publish throughput and
//! latency through the broker with the extension against the same broker without it, and the
//! time for 100 offline subscribers to receive a 1000-message backlog.
//!
//! Each publisher publishes QoS 1 messages one after the other, waiting for each PUBACK (what a
//! device does); the latency of a message is from PUBLISH to PUBACK. No subscribers are online:
//! this is the publish path alone. The database commits synchronously (the server's default).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use integration_tests::mqtt::{BrokerProcess, Launcher, Mqtt};
use integration_tests::{TestDb, offline_rules};
use rumqttc::QoS;

use crate::memory::process_status_kib;
use crate::{cpu, median, per_second};

/// (publishers, messages each)
/// (publishers, messages each). Long enough for a steady state: with 100 x 100 the plain broker
/// spent most of the run warming up and reached half its rate.
const LOADS: [(usize, usize); 2] = [(10, 1000), (100, 1000)];
const SUBSCRIBERS: usize = 100;
const BACKLOG: usize = 1000;

fn launcher() -> Launcher {
    let binary = std::env::var_os("BROKER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/broker"));
    assert!(binary.exists(), "{} is missing: `cargo build --release -p broker`", binary.display());
    Launcher::new(binary)
}

/// More broker configuration (TOML) for the runs with the extension, from `BENCH_BROKER_CONFIG`
/// (e.g. `[publish_batch]` settings), to compare settings.
fn extra() -> String {
    std::env::var("BENCH_BROKER_CONFIG").unwrap_or_default().replace("\\n", "\n")
}

struct Publishing {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// CPU microseconds per message: the clients (this process), the broker, PostgreSQL.
    cpu_us: [f64; 3],
    /// CPU time of all three over the wall time of the cores: how close the machine was to full.
    busy: f64,
}

/// `publishers` connections at once, each publishing `each` QoS 1 messages in turn.
async fn publish_load(broker: &BrokerProcess, publishers: usize, each: usize, tag: &str) -> Publishing {
    let mut clients = Vec::new();
    for p in 0..publishers {
        clients.push(Mqtt::connect(broker.port, &format!("{tag}-pub-{p}"), false).await);
    }
    let cpu_before = cpu::Sample::take(broker.pid());
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(p, mut client)| {
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(each);
                for i in 0..each {
                    let sent = Instant::now();
                    client.publish(&format!("bench/{p}"), QoS::AtLeastOnce, &format!("{i:08}")).await;
                    latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                }
                client.disconnect().await;
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("publisher"));
    }
    let elapsed = started.elapsed();
    let messages = publishers * each;
    let cpu_us = cpu_before.per_message_until(&cpu::Sample::take(broker.pid()), messages);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let busy = cpu_us.iter().sum::<f64>() * messages as f64 / 1e6 / (elapsed.as_secs_f64() * cores);
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Publishing { rate: per_second(messages, elapsed), p50_ms: at(0.50), p99_ms: at(0.99), cpu_us, busy }
}

fn peak_rss_mib(broker: &BrokerProcess) -> f64 {
    process_status_kib(&broker.pid().to_string(), "VmHWM") as f64 / 1024.0
}

pub async fn run(runs: usize) -> anyhow::Result<()> {
    let launcher = launcher();
    println!("\n## broker: QoS 1 publish through the broker, with the extension and without");
    println!(
        "| publishers x messages | without: msg/s | p50 ms | p99 ms | with: msg/s | p50 ms | p99 ms | with / without \
         | with, synchronous_commit off: msg/s | p50 ms | p99 ms | that / without |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut peaks = (0.0f64, 0.0f64);
    let mut cpu_rows = Vec::new();
    for (publishers, each) in LOADS {
        let (mut without, mut with, mut with_async) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..runs {
            let db = TestDb::create("bench_broker").await;
            let plain = launcher.start_plain("bench-plain").await;
            without.push(publish_load(&plain, publishers, each, &format!("plain{run}")).await);
            let extended = launcher.start_with("bench-extension", &db.rules(&offline_rules("")), &extra()).await;
            with.push(publish_load(&extended, publishers, each, &format!("ext{run}")).await);
            peaks = (peaks.0.max(peak_rss_mib(&plain)), peaks.1.max(peak_rss_mib(&extended)));
            drop(extended);
            // The same without waiting for the WAL flush: how much of the gap is durability.
            let admin = db.client().await;
            admin.batch_execute(&format!("ALTER DATABASE {} SET synchronous_commit = off", db.name)).await?;
            let extended = launcher.start_with("bench-extension", &db.rules(&offline_rules("")), &extra()).await;
            with_async.push(publish_load(&extended, publishers, each, &format!("async{run}")).await);
        }
        let m = |v: &[Publishing], f: fn(&Publishing) -> f64| median(v.iter().map(f).collect());
        let rate_without = m(&without, |p| p.rate);
        let row = |v: &[Publishing]| {
            let rate = m(v, |p| p.rate);
            format!(
                "{rate:.0} | {:.2} | {:.2} | {:.0} %",
                m(v, |p| p.p50_ms),
                m(v, |p| p.p99_ms),
                100.0 * rate / rate_without
            )
        };
        println!(
            "| {publishers} x {each} | {rate_without:.0} | {:.2} | {:.2} | {} | {} |",
            m(&without, |p| p.p50_ms),
            m(&without, |p| p.p99_ms),
            row(&with),
            row(&with_async)
        );
        for (what, v) in [("without", &without), ("with", &with), ("with, synchronous_commit off", &with_async)] {
            let cpu = |i: usize| median(v.iter().map(|p| p.cpu_us[i]).collect());
            cpu_rows.push(format!(
                "| {publishers} x {each} | {what} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} % |",
                cpu(0),
                cpu(1),
                cpu(2),
                m(v, |p| p.cpu_us.iter().sum()),
                100.0 * m(v, |p| p.busy)
            ));
        }
    }
    println!("\nCPU per message in the same runs (medians), microseconds; busy: CPU time of the three over the cores' wall time");
    println!("| publishers x messages | extension | clients | broker | PostgreSQL | total | busy |");
    println!("|---|---|---|---|---|---|---|");
    for row in cpu_rows {
        println!("{row}");
    }

    println!("\n## broker: {SUBSCRIBERS} offline subscribers come back to a {BACKLOG}-message backlog");
    println!("| seconds until all have every message (median) | messages/s delivered | peak RSS of the broker, MiB |");
    println!("|---|---|---|");
    let mut times = Vec::new();
    let mut peak = 0.0f64;
    for _ in 0..runs {
        let db = TestDb::create("bench_broker_backlog").await;
        let broker = launcher.start("bench-backlog", &db.rules(&offline_rules(""))).await;
        times.push(backlog(&broker).await.as_secs_f64());
        peak = peak.max(peak_rss_mib(&broker));
    }
    let seconds = median(times);
    println!("| {seconds:.2} | {:.0} | {peak:.0} |", (SUBSCRIBERS * BACKLOG) as f64 / seconds);
    println!("\npeak RSS during the publish runs, MiB: without the extension {:.0}, with it {:.0}", peaks.0, peaks.1);
    Ok(())
}

/// Subscribers subscribe once and leave; the backlog is published; all come back at once.
async fn backlog(broker: &BrokerProcess) -> Duration {
    for s in 0..SUBSCRIBERS {
        let mut subscriber = Mqtt::connect(broker.port, &format!("sub-{s}"), false).await;
        subscriber.subscribe("backlog/#", QoS::AtLeastOnce).await;
        subscriber.disconnect().await;
    }
    let mut publisher = Mqtt::connect(broker.port, "publisher", false).await;
    for i in 0..BACKLOG {
        publisher.publish("backlog/x", QoS::AtLeastOnce, &format!("{i:08}")).await;
    }
    let started = Instant::now();
    let tasks: Vec<_> = (0..SUBSCRIBERS)
        .map(|s| {
            let port = broker.port;
            tokio::spawn(async move {
                let mut subscriber = Mqtt::connect(port, &format!("sub-{s}"), false).await;
                subscriber.subscribe("backlog/#", QoS::AtLeastOnce).await;
                let got = subscriber.receive(BACKLOG).await;
                assert_eq!(got.len(), BACKLOG);
                subscriber
            })
        })
        .collect();
    let mut subscribers = Vec::new();
    for task in tasks {
        subscribers.push(task.await.expect("subscriber"));
    }
    let elapsed = started.elapsed();
    for subscriber in subscribers {
        subscriber.disconnect().await;
    }
    elapsed
}
