//! `bench`: figures for BENCHMARKS.md. Every figure of a table is measured side by side in one
//! run on the same PostgreSQL, and the median of `--runs` runs is printed, so ratios hold on a
//! noisy machine. Needs `make pg-up` and the guest (`make guest`); `make bench` does both.

mod broker;
mod cpu;
mod fetch;
mod hook;
mod memory;
mod recording;
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

async fn suites() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runs =
        args.iter().position(|a| a == "--runs").and_then(|i| args.get(i + 1)).and_then(|n| n.parse().ok()).unwrap_or(3);
    let suites: Vec<&str> =
        args.iter().filter(|a| !a.starts_with("--") && a.parse::<u32>().is_err()).map(String::as_str).collect();
    let wanted = |suite: &str| suites.is_empty() || suites.contains(&suite);
    println!("# bench: medians of {runs} runs; PostgreSQL on 127.0.0.1:{}", integration_tests::port());
    if wanted("store") {
        store::run(runs).await?;
    }
    if wanted("fetch") {
        fetch::run(runs).await?;
    }
    if wanted("hook") {
        hook::run(runs).await?;
    }
    if wanted("broker") {
        broker::run(runs).await?;
    }
    if wanted("memory") {
        memory::run().await?;
    }
    // Run one suite per process to read this as the peak under that suite's load.
    println!("\npeak RSS of this run ({}): {} KiB", suites.join(" "), memory::status_kib("VmHWM"));
    Ok(())
}
