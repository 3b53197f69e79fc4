//! `bench`: figures for BENCHMARKS.md. Every figure of a table is measured side by side in one
//! run on the same PostgreSQL, and the median of `--runs` runs is printed, so ratios hold on a
//! noisy machine. Needs `make pg-up` and the guest (`make guest`); `make bench` does both.

mod backlog;
mod broker;
mod brokers;
mod commit;
mod cpu;
mod fetch;
mod hook;
mod memory;
mod proxy;
mod recording;
mod retention;
mod store;

use std::time::Duration;

/// Median of measurements (the middle one; the upper middle of an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub fn per_second(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    // The suites run in a task of the runtime, as a broker's hooks do: a future blocked on by the
    // main thread pays a wake-up of that thread per database round trip (durable single-row
    // stores measured 3 190/s there against 4 641/s in a task).
    tokio::spawn(suites()).await?
}

/// The suites, in the order they run.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Suite {
    /// Storing through the guest against native multi-row INSERTs.
    Store,
    /// Fetching a backlog through the guest against the same query natively.
    Fetch,
    /// What crossing into the guest costs: a hook with no rule, and one host `sql` call to a stub.
    Hook,
    /// The broker with and without the extension, over real MQTT connections.
    Broker,
    /// 100 offline subscribers draining a backlog against the same messages fanned out live.
    Backlog,
    /// Four brokers storing into one database against one broker, and the commit-order lock's share.
    Brokers,
    /// Retention under 10 000 messages/s of ingest: does the sweep keep up, does the table bloat.
    Retention,
    /// The proxy in front of Mosquitto against Mosquitto directly, over real MQTT connections.
    Proxy,
    /// The process's peak RSS, and what one more guest instance costs.
    Memory,
}

#[derive(clap::Parser)]
#[command(
    name = "bench",
    about = "Figures for BENCHMARKS.md, measured side by side in one run (needs `make pg-up` and `make guest`)"
)]
struct Cli {
    /// The suites to run; all when none is named.
    #[arg(value_enum)]
    suites: Vec<Suite>,
    /// Runs per figure; the median is printed.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

async fn suites() -> anyhow::Result<()> {
    use clap::{Parser, ValueEnum};
    let cli = Cli::parse();
    let runs = cli.runs;
    let wanted = |suite: Suite| cli.suites.is_empty() || cli.suites.contains(&suite);
    let names: Vec<String> =
        cli.suites.iter().filter_map(|s| s.to_possible_value()).map(|v| v.get_name().to_owned()).collect();
    println!("# bench: medians of {runs} runs; PostgreSQL on 127.0.0.1:{}", integration_tests::port());
    if wanted(Suite::Store) {
        store::run(runs).await?;
    }
    if wanted(Suite::Fetch) {
        fetch::run(runs).await?;
    }
    if wanted(Suite::Hook) {
        hook::run(runs).await?;
    }
    if wanted(Suite::Broker) {
        broker::run(runs).await?;
    }
    if wanted(Suite::Backlog) {
        backlog::run(runs).await?;
    }
    if wanted(Suite::Brokers) {
        brokers::run(runs).await?;
    }
    if wanted(Suite::Retention) {
        retention::run().await?;
    }
    if wanted(Suite::Proxy) {
        proxy::run(runs).await?;
    }
    if wanted(Suite::Memory) {
        memory::run().await?;
    }
    // Run one suite per process to read this as the peak under that suite's load.
    println!("\npeak RSS of this run ({}): {} KiB", names.join(" "), memory::status_kib("VmHWM"));
    Ok(())
}
