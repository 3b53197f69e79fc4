//! `/metrics` and `/health` of the broker (`host_harness::http` serves them): the extensions'
//! metrics and the broker's own counters and gauges.

use std::fmt::Write as _;
use std::sync::Arc;

use host_harness::adapter;
use host_harness::metrics::family;
use rmqtt::context::ServerContext;

use crate::Extension;
use crate::stats::BrokerStats;

/// What `/metrics` and `/health` report on.
#[derive(Clone)]
pub struct Observed {
    pub scx: ServerContext,
    pub extensions: Arc<Vec<Arc<Extension>>>,
    pub stats: Arc<BrokerStats>,
}

impl host_harness::http::Observed for Observed {
    async fn health(&self) -> Result<(), String> {
        adapter::health(&self.extensions).await
    }

    fn metrics(&self) -> String {
        let mut out = adapter::metrics(&self.extensions);
        let stats = &self.stats;
        let gauges = [
            ("mqtt_broker_connections", "Client connections open.", self.scx.connections.count() as u64),
            ("mqtt_broker_sessions", "Sessions, connected or kept.", self.scx.sessions.count() as u64),
        ];
        for (name, help, value) in gauges {
            family(&mut out, name, help, "gauge");
            let _ = writeln!(out, "{name} {value}");
        }
        let counters = [
            ("mqtt_broker_messages_received_total", "PUBLISH packets received from clients.", &stats.received),
            ("mqtt_broker_messages_delivered_total", "Messages delivered to clients.", &stats.delivered),
            (
                "mqtt_broker_publishes_refused_total",
                "Publishes refused because they could not be stored.",
                &stats.refused,
            ),
        ];
        for (name, help, counter) in counters {
            family(&mut out, name, help, "counter");
            let _ = writeln!(out, "{name} {}", BrokerStats::read(counter));
        }
        out
    }
}
