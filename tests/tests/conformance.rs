//! The conformance suite (`tests/conformance/*.jsonl`, run by `integration_tests::conformance`)
//! against every host through its real interface: the harness through its JSON lines, the broker
//! and the proxy (in front of Mosquitto) through MQTT 3.1.1 and MQTT 5 client connections. One
//! test per scenario and host.

use integration_tests::conformance::{self, Database, Harness, Mqtt, Scenario, Version};

async fn harness(name: &str) {
    let scenario = Scenario::load(name);
    if let Some(why) = scenario.not_supported_by("harness") {
        println!("{name}: not supported by the harness: {why}");
        return;
    }
    let id = format!("conformance_{name}_harness");
    let database = Database::for_scenario(&scenario, &id).await;
    let mut harness = Harness::start(&id, &database.rules(&scenario.rules));
    conformance::run(&scenario, &database, &mut harness).await.unwrap_or_else(|e| panic!("harness: {e}"));
}

async fn broker(name: &str, version: Version) {
    let scenario = Scenario::load(name);
    if let Some(why) = scenario.not_supported_by(version.host()) {
        println!("{name}: not supported by the broker over {}: {why}", version.host());
        return;
    }
    let id = format!("conformance_{name}_{}", version.host().replace(['-', '.'], "_"));
    let database = Database::for_scenario(&scenario, &id).await;
    let mut broker = Mqtt::broker(&id, &database.rules(&scenario.rules), version).await;
    let host = version.host();
    conformance::run(&scenario, &database, &mut broker).await.unwrap_or_else(|e| panic!("broker, {host}: {e}"));
}

async fn proxy(name: &str, version: Version) {
    let scenario = Scenario::load(name);
    let host = format!("proxy-{}", version.host());
    // What the broker cannot do over a version (MQTT 3.1.1 has no session expiry), the proxy cannot either.
    if let Some(why) = scenario.not_supported_by(&host).or(scenario.not_supported_by(version.host())) {
        println!("{name}: not supported by the proxy over {}: {why}", version.host());
        return;
    }
    let id = format!("conformance_{name}_{}", host.replace(['-', '.'], "_"));
    let database = Database::for_scenario(&scenario, &id).await;
    let mut proxy = Mqtt::proxy(&id, &database.rules(&scenario.rules), version).await;
    conformance::run(&scenario, &database, &mut proxy).await.unwrap_or_else(|e| panic!("{host}: {e}"));
}

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        mod harness {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::harness(stringify!($name)).await
            })*
        }
        mod broker_mqtt_3_1_1 {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::broker(stringify!($name), super::Version::V311).await
            })*
        }
        mod broker_mqtt_5 {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::broker(stringify!($name), super::Version::V5).await
            })*
        }
        mod proxy_mqtt_3_1_1 {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::proxy(stringify!($name), super::Version::V311).await
            })*
        }
        mod proxy_mqtt_5 {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::proxy(stringify!($name), super::Version::V5).await
            })*
        }
        const SCENARIOS: &[&str] = &[$(stringify!($name)),*];
    };
}

scenarios!(
    seed,
    wildcards,
    backlog_before_live,
    at_least_once,
    retained,
    qos0,
    qos0_subscriber,
    rules_on_some_topics,
    database_outage,
    reload,
    expiry,
    overlapping_backlogs,
    resubscribe_overlapping,
    position_idle,
    persistent_session,
    persistent_restart,
    session_expiry,
    shared_subscriptions,
    shared_members_leaving,
);

#[test]
fn every_scenario_file_runs() {
    let mut files: Vec<String> = std::fs::read_dir(conformance::directory())
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.strip_suffix(".jsonl").map(str::to_owned))
        .collect();
    files.sort();
    let mut listed: Vec<String> = SCENARIOS.iter().map(|s| s.to_string()).collect();
    listed.sort();
    assert_eq!(files, listed, "each file in tests/conformance is listed in scenarios!(...), and only those");
}
