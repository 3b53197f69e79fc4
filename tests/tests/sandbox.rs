//! The host survives its guests: a call that loops, allocates without bound or panics fails
//! alone and the host keeps serving; a guest that imports more than the contract is refused;
//! rules and modules are swapped only once they are known good.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use host_harness::bindings::{Message, PublishOutcome};
use host_harness::host::Sources;
use host_harness::replay::Broker;
use host_harness::sandbox::Limits;
use host_harness::{ExtensionModule, Host, Runtime};
use integration_tests::event::{connect, disconnect, lines, publish, subscribe};
use integration_tests::{TestDb, deliveries, errors, guest_wasm, offline_rules, replay};

fn hostile_wasm() -> PathBuf {
    let path = std::env::var_os("HOSTILE_WASM").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip2/guest/hostile_guest.wasm")
    });
    assert!(path.exists(), "{} is missing: run `make test-guests`", path.display());
    path
}

fn message(topic: &str) -> Message {
    Message {
        id: None,
        msgid: "m".into(),
        sender: "p".into(),
        topic: topic.into(),
        payload: vec![],
        qos: 1,
        retain: false,
        timestamp: 0,
        properties: vec![],
    }
}

async fn hostile_host(limits: Limits) -> (Runtime, Host) {
    let runtime = Runtime::with_limits(limits, None).unwrap();
    let module = runtime.load(&hostile_wasm()).unwrap();
    let host = Host::with_rules(&module, "", "hostile.conf", "n").await.unwrap();
    (runtime, host)
}

async fn publish_to(host: &Host, topic: &str) -> anyhow::Result<Vec<PublishOutcome>> {
    let messages = [message(topic)];
    host.call(async |instance| instance.message_publish(&messages).await).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_call_is_stopped_at_its_deadline_and_the_host_goes_on() {
    let limits = Limits { call_timeout: Duration::from_millis(300), ..Limits::default() };
    let (_runtime, host) = hostile_host(limits).await;
    let started = Instant::now();
    let error = publish_to(&host, "loop").await.unwrap_err();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(250) && took < Duration::from_secs(5), "stopped after {took:?}");
    assert!(format!("{error:#}").contains("interrupt"), "{error:#}");
    assert!(publish_to(&host, "fine").await.is_ok(), "a fresh instance serves the next call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_hits_the_cap_and_the_host_goes_on() {
    let limits = Limits { memory_bytes: 32 << 20, ..Limits::default() };
    let (_runtime, host) = hostile_host(limits).await;
    assert!(publish_to(&host, "bomb").await.is_err());
    assert!(publish_to(&host, "fine").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_guest_fails_that_call_only() {
    let (_runtime, host) = hostile_host(Limits::default()).await;
    assert!(publish_to(&host, "panic").await.is_err());
    assert!(publish_to(&host, "print").await.is_ok(), "its output goes to the log, not to stdout");
    assert!(publish_to(&host, "fine").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_importing_sockets_is_refused_at_load_with_the_import_named() {
    let runtime = Runtime::new().unwrap();
    let component = wat::parse_str(r#"(component (import "wasi:sockets/tcp@0.2.0" (instance)))"#).unwrap();
    let error = runtime.load_bytes("sneaky", &component).err().expect("refused");
    assert!(format!("{error:#}").contains("`wasi:sockets/tcp@0.2.0`"), "{error:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_built_for_another_contract_version_is_refused_naming_both_versions() {
    let runtime = Runtime::new().unwrap();
    let component = wat::parse_str(r#"(component (import "broker:extension/log@0.2.0" (instance)))"#).unwrap();
    let error = format!("{:#}", runtime.load_bytes("old", &component).err().expect("refused"));
    let this = concat!("broker:extension@", host_harness::contract_version!());
    assert!(error.contains("built for the contract broker:extension@0.2.0") && error.contains(this), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiled_modules_are_cached_by_digest() {
    let dir = std::env::temp_dir().join(format!("mqtt-offline-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let runtime = Runtime::with_limits(Limits::default(), Some(dir.clone())).unwrap();
    runtime.load(&guest_wasm()).unwrap();
    let cached: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    assert!(cached[0].extension().is_some_and(|e| e == "cwasm"));
    // A second load reads that file: a recompilation would have written a new one (a new inode).
    let inode = || std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&cached[0]).unwrap());
    let before = inode();
    let module: ExtensionModule = runtime.load(&guest_wasm()).unwrap();
    assert_eq!(inode(), before, "the cached compilation was used, not replaced");
    let host = Host::with_rules(&module, "", "empty.conf", "n").await;
    assert!(host.is_ok(), "a cached module works");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_rules_file_never_replaces_a_good_one() {
    let db = TestDb::create("reload_rules").await;
    let good = db.rules(&offline_rules(""));
    let host = db.host(&good).await;
    replay(&host, &publish("p", "t", 1, "warm up the pool")).await;
    assert_eq!(open_connections(&host), 1);

    let bad = format!(
        "{good}\nbackend.pgsql.hook.message.publish.9 = {{\"action\": {{\"function\": \"on_mesage_publish\"}}, \"pool\": \"pool1\"}}\n"
    );
    let error = host.reload_rules(&bad, "rules.conf").await.unwrap_err();
    assert!(
        format!("{error:#}").contains("rules.conf: line 9, backend.pgsql.hook.message.publish.9: unknown function"),
        "{error:#}"
    );
    let output = replay(&host, &publish("p", "t", 1, "still stored")).await;
    assert!(output[0]["published"]["id"].is_i64(), "the old rules still run: {output:?}");

    // A good new file is swapped in; the unchanged pool keeps its open connection.
    let without_publish: String =
        good.lines().filter(|l| !l.contains("message.publish")).collect::<Vec<_>>().join("\n");
    host.reload_rules(&without_publish, "rules.conf").await.unwrap();
    assert_eq!(open_connections(&host), 1, "pool1 was not rebuilt");
    let output = replay(&host, &publish("p", "t", 1, "no longer stored")).await;
    assert!(output[0]["published"]["id"].is_null(), "{output:?}");

    // A changed pool is rebuilt.
    host.reload_rules(&without_publish.replace("pool_size = 4", "pool_size = 2"), "rules.conf").await.unwrap();
    assert_eq!(open_connections(&host), 0, "pool1 was rebuilt with its new size");
}

/// Connections pool1 holds open.
fn open_connections(host: &Host) -> usize {
    host.backend().pool("pool1").unwrap().status().size
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_line_reloads_from_the_files_and_a_bad_file_is_reported_not_used() {
    let db = TestDb::create("reload_control").await;
    let dir = std::env::temp_dir().join(format!("mqtt-offline-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rules_path = dir.join("rules.conf");
    let sources = Sources { module: guest_wasm(), rules: rules_path.clone() };
    std::fs::write(&rules_path, db.rules(&offline_rules(""))).unwrap();
    let runtime = Runtime::new().unwrap();
    let host = Host::load(&runtime, &sources, "n").await.unwrap();
    host.migrate().await.unwrap();

    // The operator breaks the file: the reload is refused, with the line, and nothing changes.
    std::fs::write(
        &rules_path,
        format!("{}\nbackend.pgsql.hook.message.acked.1 = {{\"pool\": \"pool1\"", db.rules("")),
    )
    .unwrap();
    let reload = r#"{"control":"reload"}"#.to_owned();
    let events =
        lines(&[connect("s"), subscribe("s", "t", 1), disconnect("s"), reload.clone(), publish("p", "t", 1, "one")]);
    let output = replay_reloading(&host, &runtime, &sources, &events).await;
    let error = errors(&output)[0]["message"].as_str().unwrap().to_owned();
    assert!(
        error.starts_with("reload refused, the running configuration stays")
            && error.contains("line 7, backend.pgsql.hook.message.acked.1: invalid JSON"),
        "{error}"
    );
    assert!(output.iter().any(|l| l["published"]["id"].is_i64()), "still stored with the old rules: {output:?}");

    // Fixed, with a page size of 1: the reload takes, and the backlog still arrives whole.
    std::fs::write(&rules_path, db.rules(&offline_rules(r#"{"max_returned_count": 1}"#))).unwrap();
    let events = lines(&[publish("p", "t", 1, "two"), reload, connect("s"), subscribe("s", "t", 1)]);
    let output = replay_reloading(&host, &runtime, &sources, &events).await;
    assert!(output.iter().any(|l| l.get("reloaded").is_some()), "{output:?}");
    assert_eq!(deliveries(&output), vec![("s".to_owned(), "one".to_owned()), ("s".to_owned(), "two".to_owned())]);
    std::fs::remove_dir_all(&dir).unwrap();
}

async fn replay_reloading(host: &Host, runtime: &Runtime, sources: &Sources, events: &str) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    Broker::new(host, &mut out).reloading_from(runtime, sources.clone()).replay(events.as_bytes(), None).await.unwrap();
    String::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}
