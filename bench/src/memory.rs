//! Memory: the process's peak RSS after the other suites, and what one more guest instance costs.

use std::sync::Arc;

use host_harness::metrics::Metrics;
use integration_tests::guest_module;

use crate::hook::Stub;

/// A `/proc/self/status` field in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(field: &str) -> u64 {
    process_status_kib("self", field)
}

/// A `/proc/<process>/status` field in KiB.
pub fn process_status_kib(process: &str, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{process}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.trim_start_matches(':').split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

const INSTANCES: usize = 200;

pub async fn run() -> anyhow::Result<()> {
    let module = guest_module();
    let before = status_kib("VmRSS");
    let mut instances = Vec::with_capacity(INSTANCES);
    for _ in 0..INSTANCES {
        instances.push(module.instantiate(Arc::new(Stub), Arc::new(Metrics::default())).await?);
    }
    let per_instance = (status_kib("VmRSS").saturating_sub(before)) as f64 / INSTANCES as f64;
    println!("\n## memory");
    println!("| what | KiB |\n|---|---|");
    println!("| RSS of one more guest instance (mean over {INSTANCES}) | {per_instance:.0} |");
    println!("| peak RSS of the bench process (after the suites run before this one) | {} |", status_kib("VmHWM"));
    drop(instances);
    Ok(())
}
