//! Metrics: what each function of the extension did (reported by the guest through the
//! contract's `metrics` interface), how each hook call went (measured by the host), and how many
//! messages were delivered. Exposed as Prometheus text and as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use crate::bindings::broker::extension::metrics::Host;
use crate::state::HostState;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0, 10.0];

#[derive(Debug, Default, Clone, Serialize)]
pub struct Histogram {
    /// `counts[i]`: observations at most `BUCKETS[i]` (not cumulative); the last, above all.
    /// Shown as `{"le_0.0001": n, ..., "le_inf": n}`: each count with its bucket's bound.
    #[serde(rename = "buckets_seconds", serialize_with = "with_bounds")]
    counts: [u64; BUCKETS.len() + 1],
    pub sum_seconds: f64,
    pub count: u64,
}

impl Histogram {
    fn observe(&mut self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = BUCKETS.iter().position(|&bound| seconds <= bound).unwrap_or(BUCKETS.len());
        self.counts[bucket] += 1;
        self.sum_seconds += seconds;
        self.count += 1;
    }
}

/// One function's runs (`on_message_publish`, ..., `sql`).
fn with_bounds<S: serde::Serializer>(counts: &[u64; BUCKETS.len() + 1], serializer: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = serializer.serialize_map(Some(counts.len()))?;
    for (i, count) in counts.iter().enumerate() {
        match BUCKETS.get(i) {
            Some(bound) => map.serialize_entry(&format!("le_{bound}"), count)?,
            None => map.serialize_entry("le_inf", count)?,
        }
    }
    map.end()
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct FunctionStats {
    pub calls: u64,
    pub errors: u64,
    /// What the runs handled: messages stored or fetched, subscriptions found, statements run.
    pub rows: u64,
    pub latency: Histogram,
}

/// One hook's calls (`message-publish`, ...).
#[derive(Debug, Default, Clone, Serialize)]
pub struct HookStats {
    pub calls: u64,
    /// Calls that trapped (their instance was replaced).
    pub traps: u64,
    pub latency: Histogram,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Snapshot {
    pub functions: BTreeMap<String, FunctionStats>,
    pub hooks: BTreeMap<String, HookStats>,
    pub messages_delivered: u64,
    /// Stored messages a backlog passed over because they trap the guest even alone.
    pub messages_skipped: u64,
    /// Reloads from the files (SIGHUP, `--watch`, a control line) that took effect.
    pub reloads: u64,
    /// Reloads refused (the running configuration stayed).
    pub reloads_refused: u64,
}

/// Shared by every instance of one host (reloads included).
#[derive(Debug, Default)]
pub struct Metrics(Mutex<Snapshot>);

impl Metrics {
    fn update(&self, change: impl FnOnce(&mut Snapshot)) {
        change(&mut self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
    }

    pub fn function(&self, function: &str, ok: bool, rows: u64, elapsed: Duration) {
        self.update(|s| {
            let stats = s.functions.entry(function.to_owned()).or_default();
            stats.calls += 1;
            stats.errors += u64::from(!ok);
            stats.rows += rows;
            stats.latency.observe(elapsed);
        });
    }

    pub fn hook(&self, hook: &str, trapped: bool, elapsed: Duration) {
        self.update(|s| {
            let stats = s.hooks.entry(hook.to_owned()).or_default();
            stats.calls += 1;
            stats.traps += u64::from(trapped);
            stats.latency.observe(elapsed);
        });
    }

    pub fn delivered(&self, messages: u64) {
        self.update(|s| s.messages_delivered += messages);
    }

    pub fn skipped(&self) {
        self.update(|s| s.messages_skipped += 1);
    }

    pub fn reloaded(&self, applied: bool) {
        self.update(|s| if applied { s.reloads += 1 } else { s.reloads_refused += 1 });
    }

    pub fn snapshot(&self) -> Snapshot {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }
}

/// The Prometheus text exposition format of several extensions' metrics (a broker may load more
/// than one): each family once, each series labelled with its extension's name.
pub fn prometheus(extensions: &[(&str, &Metrics)]) -> String {
    let snapshots: Vec<(String, Snapshot)> = extensions.iter().map(|(name, m)| (label(name), m.snapshot())).collect();
    let mut out = String::new();
    let function_counters: [Family<FunctionStats>; 3] = [
        ("mqtt_offline_function_calls_total", "Rule runs, by function.", |f| f.calls),
        ("mqtt_offline_function_errors_total", "Rule runs that failed, by function.", |f| f.errors),
        ("mqtt_offline_function_rows_total", "Rows handled by rule runs, by function.", |f| f.rows),
    ];
    for (name, help, value) in function_counters {
        family(&mut out, name, help, "counter");
        for (extension, s) in &snapshots {
            for (function, stats) in &s.functions {
                let _ = writeln!(out, "{name}{{extension=\"{extension}\",function=\"{function}\"}} {}", value(stats));
            }
        }
    }
    family(&mut out, "mqtt_offline_function_duration_seconds", "Rule run time, by function.", "histogram");
    for (extension, s) in &snapshots {
        for (function, stats) in &s.functions {
            let labels = format!("extension=\"{extension}\",function=\"{function}\"");
            histogram(&mut out, "mqtt_offline_function_duration_seconds", &labels, &stats.latency);
        }
    }
    let hook_counters: [Family<HookStats>; 2] = [
        ("mqtt_offline_hook_calls_total", "Hook calls.", |h| h.calls),
        ("mqtt_offline_hook_traps_total", "Hook calls that trapped.", |h| h.traps),
    ];
    for (name, help, value) in hook_counters {
        family(&mut out, name, help, "counter");
        for (extension, s) in &snapshots {
            for (hook, stats) in &s.hooks {
                let _ = writeln!(out, "{name}{{extension=\"{extension}\",hook=\"{hook}\"}} {}", value(stats));
            }
        }
    }
    family(&mut out, "mqtt_offline_hook_duration_seconds", "Hook call time.", "histogram");
    for (extension, s) in &snapshots {
        for (hook, stats) in &s.hooks {
            let labels = format!("extension=\"{extension}\",hook=\"{hook}\"");
            histogram(&mut out, "mqtt_offline_hook_duration_seconds", &labels, &stats.latency);
        }
    }
    let message_counters: [Family<Snapshot>; 2] = [
        ("mqtt_offline_messages_delivered_total", "Messages delivered to subscribers.", |s| s.messages_delivered),
        (
            "mqtt_offline_messages_skipped_total",
            "Stored messages a backlog skipped because they trap the extension even alone.",
            |s| s.messages_skipped,
        ),
    ];
    for (name, help, value) in message_counters {
        family(&mut out, name, help, "counter");
        for (extension, s) in &snapshots {
            let _ = writeln!(out, "{name}{{extension=\"{extension}\"}} {}", value(s));
        }
    }
    family(
        &mut out,
        "mqtt_offline_reloads_total",
        "Reloads of module and rules from their files, by outcome.",
        "counter",
    );
    for (extension, s) in &snapshots {
        for (outcome, count) in [("applied", s.reloads), ("refused", s.reloads_refused)] {
            let _ =
                writeln!(out, "mqtt_offline_reloads_total{{extension=\"{extension}\",outcome=\"{outcome}\"}} {count}");
        }
    }
    out
}

/// A label value as Prometheus text needs it: backslashes, double quotes and newlines escaped.
pub fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// A metric family read off `T`: its name, its help text, its value.
type Family<T> = (&'static str, &'static str, fn(&T) -> u64);

/// The `# HELP` and `# TYPE` lines of a metric family.
pub fn family(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, labels: &str, histogram: &Histogram) {
    let mut cumulative = 0;
    for (bound, count) in BUCKETS.iter().zip(&histogram.counts) {
        cumulative += count;
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", histogram.count);
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", histogram.sum_seconds);
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", histogram.count);
}

/// The contract's `metrics` interface: the guest's reports land in its host's [`Metrics`].
impl Host for HostState {
    async fn observe(&mut self, function: String, ok: bool, rows: u64, elapsed_ns: u64) -> wasmtime::Result<()> {
        self.metrics.function(&function, ok, rows, Duration::from_nanos(elapsed_ns));
        Ok(())
    }
}
