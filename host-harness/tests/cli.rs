//! The `harness` command as an operator runs it: exit codes of `check`, and `run` reloading on
//! a file change (`--watch`) and on SIGHUP while it serves a long-lived input.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn guest_wasm() -> PathBuf {
    let path = std::env::var_os("GUEST_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip2/guest/guest.wasm"));
    assert!(path.exists(), "{} is missing: run `make guest`", path.display());
    path
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("harness-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const GOOD: &str = "backend.pgsql.pool1.server = 127.0.0.1:1\n\
    backend.pgsql.hook.message.acked.1 = {\"action\": {\"function\": \"on_message_acked\"}, \"pool\": \"pool1\"}\n";
const BAD: &str = "backend.pgsql.pool1.server = 127.0.0.1:1\n\n\
    backend.pgsql.hook.message.acked.1 = {\"action\": {\"function\": \"on_message_ackd\"}, \"pool\": \"pool1\"}\n";

fn check(rules: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_harness"))
        .args(["check", "--module"])
        .arg(guest_wasm())
        .arg("--rules")
        .arg(rules)
        .output()
        .unwrap()
}

#[test]
fn check_exits_zero_for_good_rules_and_names_the_line_of_bad_ones() {
    let dir = scratch("check");
    let rules = dir.join("rules.conf");
    std::fs::write(&rules, GOOD).unwrap();
    let output = check(&rules);
    assert!(output.status.success(), "{output:?}");

    std::fs::write(&rules, BAD).unwrap();
    let output = check(&rules);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("rules.conf: line 3, backend.pgsql.hook.message.acked.1: unknown function `on_message_ackd`"),
        "{stderr}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn run_reloads_on_a_file_change_and_on_sighup_and_keeps_good_rules_over_bad_ones() {
    let dir = scratch("watch");
    let rules = dir.join("rules.conf");
    std::fs::write(&rules, GOOD).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_harness"))
        .args(["run", "--watch", "--module"])
        .arg(guest_wasm())
        .arg("--rules")
        .arg(&rules)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let (lines, output) = mpsc::channel::<String>();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    std::thread::spawn(move || stdout.lines().map_while(Result::ok).try_for_each(|line| lines.send(line)));
    let next = || output.recv_timeout(Duration::from_secs(10)).expect("a line of output within 10 s");

    // A live event first, so that the harness is surely running.
    writeln!(stdin, "{{\"event\":\"client.connected\",\"clientid\":\"c\"}}").unwrap();
    writeln!(stdin, "{{\"event\":\"session.unsubscribed\",\"clientid\":\"c\",\"topic\":\"x\"}}").unwrap();
    assert!(next().contains("is not subscribed"));

    // The watched file breaks: refused with its line, the running rules stay.
    std::thread::sleep(Duration::from_millis(1100)); // a new modification time
    std::fs::write(&rules, BAD).unwrap();
    let refused = next();
    assert!(
        refused.contains("reload refused, the running configuration stays") && refused.contains("line 3"),
        "{refused}"
    );

    // Fixed: taken.
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::write(&rules, GOOD).unwrap();
    let reloaded = next();
    assert!(reloaded.contains("\"reloaded\"") && reloaded.contains("file changed"), "{reloaded}");

    // SIGHUP reloads too.
    let status = Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let reloaded = next();
    assert!(reloaded.contains("\"reloaded\"") && reloaded.contains("SIGHUP"), "{reloaded}");

    drop(stdin);
    assert!(child.wait().unwrap().success(), "the end of the input ends the harness cleanly");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `make run` and `make broker` point the example rules at their server through `PGPORT`: a
/// pool that sets no server takes libpq's `PGHOST` and `PGPORT`.
#[test]
fn a_pool_without_a_server_reaches_the_one_pghost_and_pgport_name() {
    let dir = scratch("pgport");
    let rules = dir.join("rules.conf");
    std::fs::write(
        &rules,
        "backend.pgsql.pool1.pool_size = 1\n\
         backend.pgsql.hook.message.acked.1 = {\"action\": {\"function\": \"on_message_acked\"}, \"pool\": \"pool1\"}\n",
    )
    .unwrap();
    let migrate = |port: &str| {
        Command::new(env!("CARGO_BIN_EXE_harness"))
            .args(["migrate", "--module"])
            .arg(guest_wasm())
            .arg("--rules")
            .arg(&rules)
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", port)
            .env("PGUSER", "postgres")
            .env("PGDATABASE", "mqtt")
            .output()
            .unwrap()
    };
    let port = std::env::var("PGPORT").unwrap_or_else(|_| "15432".into());
    let output = migrate(&port);
    assert!(output.status.success(), "the test server on {port}: {output:?}");
    let output = migrate("1");
    assert!(!output.status.success(), "nothing listens on port 1");
    // Which pool, which address, what failed: once.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("pool pool1 (postgres@127.0.0.1:1/mqtt): Connection refused"), "{stderr}");
    assert!(!stderr.contains("error connecting to server"), "said once, without the layers that repeat it: {stderr}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn shared_options_go_anywhere_and_bad_input_is_named() {
    let dir = scratch("options");
    let rules = dir.join("rules.conf");
    std::fs::write(&rules, GOOD).unwrap();
    let harness = |args: &[&str], input: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_harness"))
            .args(args)
            .arg("--module")
            .arg(guest_wasm())
            .arg("--rules")
            .arg(&rules)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let output = child.wait_with_output().unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (ok, stdout, _) = harness(&["--node", "n1@here", "check"], "");
    assert!(ok && stdout.contains("the databases were not contacted"), "{stdout}");
    let (ok, _, stderr) = harness(&["run", "--scenario", "/nonexistent/scenario.jsonl"], "");
    assert!(!ok && stderr.contains("/nonexistent/scenario.jsonl"), "{stderr}");
    let (_, stdout, _) = harness(&["run"], "# a comment\n{\"control\":\"bogus\"}\n");
    assert_eq!(
        stdout.trim(),
        r#"{"error":{"line":2,"message":"malformed control line: unknown variant `bogus`, expected one of `reload`, `mark`, `restart`"}}"#
    );
    std::fs::remove_dir_all(dir).unwrap();
}
