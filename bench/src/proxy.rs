//! The proxy in front of Mosquitto, with real MQTT connections (rumqttc), as processes: QoS 1
//! publish throughput, latency and CPU per message of clients connected to Mosquitto directly,
//! through the proxy storing nothing (its own cost: two connections per client, every packet
//! decoded and encoded twice), through the proxy with the extension loaded and no rule storing
//! (the hook path), and through the proxy storing every message. Each publisher waits for each
//! PUBACK, as in the broker suite (`broker.rs`), which measures our own broker the same way.

use std::path::PathBuf;

use integration_tests::mqtt::{BrokerProcess, Launcher, Mosquitto};
use integration_tests::{TestDb, offline_rules};

use crate::broker::{LOADS, NO_RULE_STORES, Publishing, extra, publish_load};
use crate::median;

/// What each load is run against, in this order in every run.
#[derive(Clone, Copy, PartialEq)]
enum Setup {
    /// Clients connected to Mosquitto itself.
    Direct,
    /// Through the proxy with `extension = []`.
    ProxyOnly,
    /// Through the proxy, the extension loaded, no rule storing.
    HookPathOnly,
    /// Through the proxy, every message stored durably.
    Storing,
}

impl Setup {
    const ALL: [Setup; 4] = [Setup::Direct, Setup::ProxyOnly, Setup::HookPathOnly, Setup::Storing];

    fn describe(self) -> &'static str {
        match self {
            Setup::Direct => "Mosquitto directly",
            Setup::ProxyOnly => "proxy, no extension",
            Setup::HookPathOnly => "proxy, extension, no rule stores",
            Setup::Storing => "proxy, extension storing every message",
        }
    }

    /// The proxy for this setup (none for `Direct`) in front of `mosquitto`.
    async fn start(self, mosquitto: &Mosquitto, db: &TestDb) -> Option<BrokerProcess> {
        let launcher = Launcher::proxy(binary(), mosquitto.port);
        let rules = match self {
            Setup::Direct => return None,
            Setup::ProxyOnly => return Some(launcher.start_plain("bench-proxy-plain").await),
            Setup::HookPathOnly => NO_RULE_STORES.to_owned(),
            Setup::Storing => offline_rules(""),
        };
        Some(launcher.start_with("bench-proxy", &db.rules(&rules), &extra()).await)
    }
}

fn binary() -> PathBuf {
    let binary = std::env::var_os("PROXY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/proxy"));
    assert!(binary.exists(), "{} is missing: `cargo build --release -p proxy`", binary.display());
    binary
}

pub async fn run(runs: usize) -> anyhow::Result<()> {
    println!("\n## proxy: QoS 1 publish through the proxy in front of Mosquitto, against Mosquitto directly");
    println!("CPU: microseconds per message of the clients (this process), the proxy, Mosquitto and PostgreSQL");
    println!(
        "| publishers x messages | path | msg/s | p50 ms | p99 ms | vs Mosquitto | vs proxy alone | CPU clients \
         | CPU proxy | CPU Mosquitto | CPU PostgreSQL |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (publishers, each) in LOADS {
        let mut figures: [Vec<Publishing>; Setup::ALL.len()] = Default::default();
        for run in 0..runs {
            let db = TestDb::create("bench_proxy").await;
            for (i, setup) in Setup::ALL.into_iter().enumerate() {
                let mosquitto = Mosquitto::start("bench", "").await;
                let proxy = setup.start(&mosquitto, &db).await;
                let tag = format!("proxy-{run}-{i}");
                let published = match &proxy {
                    Some(proxy) => {
                        publish_load(&[proxy.port], &[proxy.pid(), mosquitto.pid()], publishers, each, &tag).await
                    }
                    None => {
                        let mut direct =
                            publish_load(&[mosquitto.port], &[mosquitto.pid()], publishers, each, &tag).await;
                        // No proxy: its column reads zero.
                        direct.cpu_us.insert(1, 0.0);
                        direct
                    }
                };
                figures[i].push(published);
            }
        }
        let m = |v: &[Publishing], f: &dyn Fn(&Publishing) -> f64| median(v.iter().map(f).collect());
        let direct = m(&figures[0], &|p| p.rate);
        let proxy_only = m(&figures[1], &|p| p.rate);
        for (setup, v) in Setup::ALL.into_iter().zip(&figures) {
            let rate = m(v, &|p| p.rate);
            let cpu = |i: usize| m(v, &|p| p.cpu_us[i]);
            println!(
                "| {publishers} x {each} | {} | {rate:.0} | {:.2} | {:.2} | {:.0} % | {:.0} % | {:.1} | {:.1} | {:.1} | {:.1} |",
                setup.describe(),
                m(v, &|p| p.p50_ms),
                m(v, &|p| p.p99_ms),
                100.0 * rate / direct,
                100.0 * rate / proxy_only,
                cpu(0),
                cpu(1),
                cpu(2),
                cpu(3),
            );
        }
    }
    Ok(())
}
