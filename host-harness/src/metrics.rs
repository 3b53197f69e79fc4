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

    pub fn snapshot(&self) -> Snapshot {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// The Prometheus text exposition format.
    pub fn prometheus(&self) -> String {
        let s = self.snapshot();
        let mut out = String::new();
        let function_counters: [(&str, &str, fn(&FunctionStats) -> u64); 3] = [
            ("mqtt_offline_function_calls_total", "Rule runs, by function.", |f| f.calls),
            ("mqtt_offline_function_errors_total", "Rule runs that failed, by function.", |f| f.errors),
            ("mqtt_offline_function_rows_total", "Rows handled by rule runs, by function.", |f| f.rows),
        ];
        for (name, help, value) in function_counters {
            counter(&mut out, name, help, "function", s.functions.iter().map(|(k, v)| (k.as_str(), value(v))));
        }
        let functions = s.functions.iter().map(|(k, v)| (k.as_str(), &v.latency));
        histograms(
            &mut out,
            "mqtt_offline_function_duration_seconds",
            "Rule run time, by function.",
            "function",
            functions,
        );
        let hook_counters: [(&str, &str, fn(&HookStats) -> u64); 2] = [
            ("mqtt_offline_hook_calls_total", "Hook calls.", |h| h.calls),
            ("mqtt_offline_hook_traps_total", "Hook calls that trapped.", |h| h.traps),
        ];
        for (name, help, value) in hook_counters {
            counter(&mut out, name, help, "hook", s.hooks.iter().map(|(k, v)| (k.as_str(), value(v))));
        }
        let hooks = s.hooks.iter().map(|(k, v)| (k.as_str(), &v.latency));
        histograms(&mut out, "mqtt_offline_hook_duration_seconds", "Hook call time.", "hook", hooks);
        let message_counters = [
            ("mqtt_offline_messages_delivered_total", "Messages delivered to subscribers.", s.messages_delivered),
            (
                "mqtt_offline_messages_skipped_total",
                "Stored messages a backlog skipped because they trap the extension even alone.",
                s.messages_skipped,
            ),
        ];
        for (name, help, value) in message_counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        }
        out
    }
}

fn counter<'a>(out: &mut String, name: &str, help: &str, label: &str, series: impl Iterator<Item = (&'a str, u64)>) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (key, value) in series {
        let _ = writeln!(out, "{name}{{{label}=\"{key}\"}} {value}");
    }
}

fn histograms<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    series: impl Iterator<Item = (&'a str, &'a Histogram)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (key, histogram) in series {
        let mut cumulative = 0;
        for (bound, count) in BUCKETS.iter().zip(&histogram.counts) {
            cumulative += count;
            let _ = writeln!(out, "{name}_bucket{{{label}=\"{key}\",le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{label}=\"{key}\",le=\"+Inf\"}} {}", histogram.count);
        let _ = writeln!(out, "{name}_sum{{{label}=\"{key}\"}} {}", histogram.sum_seconds);
        let _ = writeln!(out, "{name}_count{{{label}=\"{key}\"}} {}", histogram.count);
    }
}

/// The contract's `metrics` interface: the guest's reports land in its host's [`Metrics`].
impl Host for HostState {
    async fn observe(&mut self, function: String, ok: bool, rows: u64, elapsed_ns: u64) -> wasmtime::Result<()> {
        self.metrics.function(&function, ok, rows, Duration::from_nanos(elapsed_ns));
        Ok(())
    }
}
