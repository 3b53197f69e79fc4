//! The broker with real MQTT connections (rumqttc), as processes: QoS 1 publish throughput,
//! latency and CPU per message through the broker with the extension against the same broker
//! without it (and with the extension's hook path alone, to tell its cost from the database's).
//! The backlog drain is `backlog.rs`.
//!
//! Each publisher publishes QoS 1 messages one after the other, waiting for each PUBACK (what a
//! device does); the latency of a message is from PUBLISH to PUBACK. No subscribers are online:
//! this is the publish path alone. The database commits synchronously (the server's default).

use std::path::PathBuf;
use std::time::Instant;

use integration_tests::mqtt::{BrokerProcess, Launcher, Mqtt};
use integration_tests::{TestDb, offline_rules};
use rumqttc::QoS;

use crate::commit::DurableCommit;
use crate::memory::process_status_kib;
use crate::{cpu, median, per_second};

/// (publishers, messages each). Long enough for a steady state: with 100 x 100 the plain broker
/// spent most of the run warming up and reached half its rate.
pub const LOADS: [(usize, usize); 2] = [(10, 1000), (100, 1000)];

pub fn launcher() -> Launcher {
    let binary = std::env::var_os("BROKER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/broker"));
    assert!(binary.exists(), "{} is missing: `cargo build --release -p broker`", binary.display());
    Launcher::new(binary)
}

/// More broker configuration (TOML) for the runs with the extension, from `BENCH_BROKER_CONFIG`
/// (e.g. `[publish_batch]` settings), to compare settings.
pub fn extra() -> String {
    std::env::var("BENCH_BROKER_CONFIG").unwrap_or_default().replace("\\n", "\n")
}

pub struct Publishing {
    pub rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// CPU microseconds per message: the clients (this process), each server, PostgreSQL.
    pub cpu_us: Vec<f64>,
    /// CPU time of all three over the wall time of the cores: how close the machine was to full.
    pub busy: f64,
}

/// `publishers` connections at once, spread over the servers listening on `ports` in turn, each
/// publishing `each` QoS 1 messages one after the other; the CPU of the `servers` (process ids)
/// is measured.
pub async fn publish_load(ports: &[u16], servers: &[u32], publishers: usize, each: usize, tag: &str) -> Publishing {
    let mut clients = Vec::new();
    for p in 0..publishers {
        clients.push(Mqtt::connect(ports[p % ports.len()], &format!("{tag}-pub-{p}"), false).await);
    }
    let cpu_before = cpu::Sample::take(servers);
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
    let cpu_us = cpu_before.per_message_until(&cpu::Sample::take(servers), messages);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let busy = cpu_us.iter().sum::<f64>() * messages as f64 / 1e6 / (elapsed.as_secs_f64() * cores);
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Publishing { rate: per_second(messages, elapsed), p50_ms: at(0.50), p99_ms: at(0.99), cpu_us, busy }
}

pub fn peak_rss_mib(broker: &BrokerProcess) -> f64 {
    process_status_kib(&broker.pid().to_string(), "VmHWM") as f64 / 1024.0
}

/// The brokers each load is run against, in this order in every run.
#[derive(Clone, Copy, PartialEq)]
enum Setup {
    /// `extension = []`: plain rmqtt.
    Plain,
    /// The extension loaded, but its publish rule matches no topic: the hook path (rmqtt's
    /// hooks, the publish queue, the wasm call) without any SQL.
    HookPathOnly,
    /// The example rules: every message stored, durably.
    Storing,
    /// The same on a database with `synchronous_commit = off`: how much of the cost is the WAL flush.
    StoringAsync,
}

impl Setup {
    const ALL: [Setup; 4] = [Setup::Plain, Setup::HookPathOnly, Setup::Storing, Setup::StoringAsync];

    fn describe(self) -> &'static str {
        match self {
            Setup::Plain => "without the extension",
            Setup::HookPathOnly => "extension, no rule stores (hook path only)",
            Setup::Storing => "extension storing every message",
            Setup::StoringAsync => "the same, synchronous_commit off",
        }
    }

    async fn start(self, launcher: &Launcher, db: &TestDb) -> anyhow::Result<BrokerProcess> {
        let rules = match self {
            Setup::Plain => return Ok(launcher.start_plain("bench-plain").await),
            Setup::HookPathOnly => NO_RULE_STORES.to_owned(),
            Setup::Storing | Setup::StoringAsync => offline_rules(""),
        };
        if self == Setup::StoringAsync {
            let admin = db.client().await;
            admin.batch_execute(&format!("ALTER DATABASE {} SET synchronous_commit = off", db.name)).await?;
        }
        Ok(launcher.start_with("bench-extension", &db.rules(&rules), &extra()).await)
    }
}

/// A publish rule whose filter no benchmark topic matches.
pub const NO_RULE_STORES: &str = "backend.pgsql.hook.message.publish.1 = \
    {\"topic\": \"nothing/#\", \"action\": {\"function\": \"on_message_publish\"}, \"pool\": \"pool1\"}";

pub async fn run(runs: usize) -> anyhow::Result<()> {
    let launcher = launcher();
    println!("\n## broker: QoS 1 publish through the broker, with the extension and without");
    println!(
        "CPU: microseconds per message of the clients (this process), the broker and PostgreSQL; \
         busy: their CPU time over the cores' wall time"
    );
    println!(
        "| publishers x messages | broker | msg/s | p50 ms | p99 ms | vs without | CPU clients | CPU broker \
         | CPU PostgreSQL | CPU total | busy |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut peaks = [0.0f64; Setup::ALL.len()];
    let mut target_2_line = None;
    for (publishers, each) in LOADS {
        let mut figures: [Vec<Publishing>; Setup::ALL.len()] = Default::default();
        let mut commits = Vec::new();
        for run in 0..runs {
            let db = TestDb::create("bench_broker").await;
            // Before the run with `synchronous_commit = off` changes the database.
            commits.push(DurableCommit::measure(&db).await);
            for (i, setup) in Setup::ALL.into_iter().enumerate() {
                let broker = setup.start(&launcher, &db).await?;
                let tag = format!("{run}-{i}");
                figures[i].push(publish_load(&[broker.port], &[broker.pid()], publishers, each, &tag).await);
                peaks[i] = peaks[i].max(peak_rss_mib(&broker));
            }
        }
        let m = |v: &[Publishing], f: &dyn Fn(&Publishing) -> f64| median(v.iter().map(f).collect());
        let rate_without = m(&figures[0], &|p| p.rate);
        for (setup, v) in Setup::ALL.into_iter().zip(&figures) {
            let rate = m(v, &|p| p.rate);
            let cpu = |i: usize| m(v, &|p| p.cpu_us[i]);
            println!(
                "| {publishers} x {each} | {} | {rate:.0} | {:.2} | {:.2} | {:.0} % | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} % |",
                setup.describe(),
                m(v, &|p| p.p50_ms),
                m(v, &|p| p.p99_ms),
                100.0 * rate / rate_without,
                cpu(0),
                cpu(1),
                cpu(2),
                m(v, &|p| p.cpu_us.iter().sum()),
                100.0 * m(v, &|p| p.busy)
            );
        }
        // Target 2 is set at 10 publishers: p50 within two durable commits of the plain broker's.
        if publishers == LOADS[0].0 {
            target_2_line = Some(target_2(m(&figures[0], &|p| p.p50_ms), m(&figures[2], &|p| p.p50_ms), &commits));
        }
    }
    if let Some(line) = target_2_line {
        println!("\n{line}");
    }

    println!(
        "\npeak RSS during the publish runs, MiB: without the extension {:.0}, storing with it {:.0}",
        peaks[0], peaks[2]
    );
    Ok(())
}

/// The storing broker's p50 against the plain broker's plus two durable commits, with the
/// durable commit's parts as measured in the same runs.
fn target_2(plain_p50_ms: f64, storing_p50_ms: f64, commits: &[DurableCommit]) -> String {
    let c = |f: &dyn Fn(&DurableCommit) -> f64| median(commits.iter().map(f).collect());
    let bound = plain_p50_ms + 2.0 * c(&DurableCommit::floor) / 1000.0;
    let fdatasync = if commits.iter().all(|d| d.fdatasync.is_some()) {
        format!("{:.0} µs", c(&|d| d.fdatasync.unwrap_or(0.0)))
    } else {
        "not measured (the data directory is not writable here: the INSERT counts instead)".to_owned()
    };
    format!(
        "{} publishers, target 2: storing p50 {storing_p50_ms:.2} ms against the plain broker's p50 plus two durable \
         commits, {bound:.2} ms ({:.2}x). Measured in the same runs: `SELECT 1` {:.0} µs, an 8 kB fdatasync {fdatasync}, \
         a durable one-row INSERT {:.0} µs.",
        LOADS[0].0,
        storing_p50_ms / bound,
        c(&|d| d.select_1),
        c(&|d| d.insert),
    )
}
