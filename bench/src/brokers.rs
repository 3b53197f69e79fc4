//! Several brokers on one database: 4 broker processes with 25 publishers each against one
//! broker with 100 (and one with 10), all storing durably into the same PostgreSQL. Also what
//! the brokers' group commit formed (messages per `message-publish` call, from their /metrics)
//! and how much of the database's busy time went to waiting for the commit-order lock (every
//! storing transaction takes it), sampled from `pg_stat_activity`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use integration_tests::http::{get, sample};
use integration_tests::mqtt::{BrokerProcess, free_port};
use integration_tests::{TestDb, offline_rules};

use crate::broker::{Publishing, extra, launcher, publish_load};
use crate::median;

/// (brokers, publishers each, messages per publisher).
const SETUPS: [(usize, usize, usize); 3] = [(1, 10, 1000), (1, 100, 1000), (4, 25, 1000)];

/// How often the lock sampler looks at the server's backends.
const SAMPLE_EVERY: Duration = Duration::from_millis(5);

struct Run {
    publishing: Publishing,
    /// Messages per `message-publish` call, over all the brokers.
    batch: f64,
    /// Of the backends seen running a statement, the share waiting for an advisory lock.
    lock_wait: f64,
}

async fn function_total(http: u16, what: &str) -> f64 {
    let (_, metrics) = get(http, "/metrics").await;
    sample(
        &metrics,
        &format!("mqtt_offline_function_{what}_total{{extension=\"offline\",function=\"on_message_publish\"}}"),
    )
    .unwrap_or(0.0)
}

/// Counts, until stopped, backends of `database` that run a statement, and those of them that
/// wait for an advisory lock.
async fn sample_lock_waits(db: &TestDb, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(u64, u64)> {
    let (name, client) = (db.name.clone(), db.client().await);
    tokio::spawn(async move {
        let (mut waiting, mut active) = (0u64, 0u64);
        while !stop.load(Ordering::Relaxed) {
            let row = client
                .query_one(
                    "SELECT count(*) FILTER (WHERE wait_event = 'advisory'), count(*) FROM pg_stat_activity \
                     WHERE datname = $1 AND state = 'active' AND pid <> pg_backend_pid()",
                    &[&name],
                )
                .await
                .expect("pg_stat_activity");
            waiting += row.get::<_, i64>(0) as u64;
            active += row.get::<_, i64>(1) as u64;
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
        (waiting, active)
    })
}

async fn one_run(db: &TestDb, brokers: usize, publishers: usize, each: usize, tag: &str) -> anyhow::Result<Run> {
    let launcher = launcher();
    let mut started: Vec<(BrokerProcess, u16)> = Vec::new();
    for b in 0..brokers {
        let http = free_port();
        let config = format!("{}\n[http]\nlisten = \"127.0.0.1:{http}\"\n", extra());
        let broker = launcher.start_with(&format!("bench-{tag}-{b}"), &db.rules(&offline_rules("")), &config).await;
        started.push((broker, http));
    }
    let ports: Vec<u16> = started.iter().map(|(b, _)| b.port).collect();
    let pids: Vec<u32> = started.iter().map(|(b, _)| b.pid()).collect();
    let (mut calls, mut rows) = (0.0, 0.0);
    for (_, http) in &started {
        calls -= function_total(*http, "calls").await;
        rows -= function_total(*http, "rows").await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_lock_waits(db, stop.clone()).await;
    let publishing = publish_load(&ports, &pids, brokers * publishers, each, tag).await;
    stop.store(true, Ordering::Relaxed);
    let (waiting, active) = sampler.await?;
    for (_, http) in &started {
        calls += function_total(*http, "calls").await;
        rows += function_total(*http, "rows").await;
    }
    Ok(Run { publishing, batch: rows / calls.max(1.0), lock_wait: waiting as f64 / active.max(1) as f64 })
}

pub async fn run(runs: usize) -> anyhow::Result<()> {
    println!("\n## brokers: several brokers storing into one database, against one broker");
    println!(
        "Each publisher: QoS 1 messages one after the other, waiting for each PUBACK, on its broker; every message \
         stored durably. CPU in microseconds per message; batch: messages per message-publish call (all brokers); \
         lock wait: of the backends seen running a statement, the share waiting for the commit-order lock"
    );
    println!(
        "| brokers x publishers | msg/s | p50 ms | p99 ms | vs 1 x 100 | batch | CPU clients | CPU brokers | CPU PostgreSQL | lock wait |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut figures: Vec<Vec<Run>> = SETUPS.iter().map(|_| Vec::new()).collect();
    for run in 0..runs {
        for (i, &(brokers, publishers, each)) in SETUPS.iter().enumerate() {
            let db = TestDb::create("bench_brokers").await;
            let tag = format!("{run}-{i}");
            figures[i].push(one_run(&db, brokers, publishers, each, &tag).await?);
        }
    }
    let m = |v: &[Run], f: &dyn Fn(&Run) -> f64| median(v.iter().map(f).collect());
    let one_broker = m(&figures[1], &|r| r.publishing.rate);
    for (&(brokers, publishers, _), v) in SETUPS.iter().zip(&figures) {
        let last = |p: &Publishing| p.cpu_us.len() - 1;
        println!(
            "| {brokers} x {publishers} | {:.0} | {:.2} | {:.2} | {:.0} % | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} % |",
            m(v, &|r| r.publishing.rate),
            m(v, &|r| r.publishing.p50_ms),
            m(v, &|r| r.publishing.p99_ms),
            100.0 * m(v, &|r| r.publishing.rate) / one_broker,
            m(v, &|r| r.batch),
            m(v, &|r| r.publishing.cpu_us[0]),
            m(v, &|r| r.publishing.cpu_us[1..last(&r.publishing)].iter().sum()),
            m(v, &|r| r.publishing.cpu_us[last(&r.publishing)]),
            100.0 * m(v, &|r| r.lock_wait),
        );
    }
    Ok(())
}
