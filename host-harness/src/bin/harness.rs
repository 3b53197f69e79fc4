//! `harness`: load a guest with a rules file, check it, migrate its databases, or replay broker
//! events through it. See README.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use host_harness::host::Sources;
use host_harness::reload::{forward_sighup, watch_files};
use host_harness::replay::Broker;
use host_harness::{Host, Runtime};
use std::time::Duration;

use host_harness::sandbox::Limits;
use tokio::io::BufReader;
use tokio::sync::mpsc;

#[derive(Parser)]
#[command(
    name = "harness",
    version = concat!(env!("CARGO_PKG_VERSION"), " (contract broker:extension@", host_harness::contract_version!(), ")"),
    about = "Load a broker:extension guest and drive it like a broker"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// This broker node's name, for `mqtt_client.node` and `${node}`.
    #[arg(long, global = true, default_value = host_harness::host::DEFAULT_NODE)]
    node: String,
    /// Time one hook call may take (SQL waits included) before it is stopped, in milliseconds.
    #[arg(long, global = true, default_value_t = 10_000)]
    call_timeout_ms: u64,
    /// Memory one extension instance may use, in MiB.
    #[arg(long, global = true, default_value_t = 64)]
    memory_mib: usize,
    /// Where compiled extensions are cached (by digest); none: compile at every start.
    #[arg(long, global = true)]
    cache_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
struct Load {
    /// The guest component (.wasm).
    #[arg(long)]
    module: PathBuf,
    /// The rules file: EMQX conf lines or a JSON document.
    #[arg(long)]
    rules: PathBuf,
}

impl Load {
    fn sources(&self) -> Sources {
        Sources { module: self.module.clone(), rules: self.rules.clone() }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Load and configure the guest; exit non-zero with the error if the rules are refused. The
    /// databases are not contacted.
    Check(Load),
    /// Apply the schema (schema/schema.sql) to every pool's database. Idempotent.
    Migrate {
        #[command(flatten)]
        load: Load,
        /// Instead, convert each pool's EMQX 4 tables, keeping every row (schema/from-emqx4.sql).
        #[arg(long)]
        from_emqx: bool,
    },
    /// Replay broker events (JSON lines) and print what the broker does (JSON lines).
    Run {
        #[command(flatten)]
        load: Load,
        /// Events file; standard input when absent.
        #[arg(long)]
        scenario: Option<PathBuf>,
        /// Reload module and rules when either file changes (SIGHUP and `{"control":"reload"}`
        /// always do).
        #[arg(long)]
        watch: bool,
        /// At the end, print the metrics as a last JSON line: `{"stats": {...}}`.
        #[arg(long)]
        stats: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    host_harness::command::main("harness", run(Cli::parse())).await
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let limits =
        Limits { call_timeout: Duration::from_millis(cli.call_timeout_ms), memory_bytes: cli.memory_mib << 20 };
    let runtime = Runtime::with_limits(limits, cli.cache_dir)?;
    let node = cli.node;
    match cli.command {
        Command::Check(load) => {
            Host::load(&runtime, &load.sources(), &node).await?;
            println!("{}: ok (the databases were not contacted)", load.rules.display());
        }
        Command::Migrate { load, from_emqx } => {
            let host = Host::load(&runtime, &load.sources(), &node).await?;
            if from_emqx {
                for pool in host.pool_names() {
                    host.migrate_from_emqx4(&pool).await?;
                    println!("pool {pool}: converted from EMQX 4; the original tables are in schema emqx4");
                }
            } else {
                host.migrate().await?;
                for pool in host.pool_names() {
                    println!("pool {pool}: schema applied (schema/schema.sql)");
                }
            }
        }
        Command::Run { load, scenario, watch, stats } => {
            let sources = load.sources();
            let host = Host::load(&runtime, &sources, &node).await?;
            let (reload, reloads) = mpsc::unbounded_channel();
            forward_sighup(reload.clone())?;
            if watch {
                watch_files(std::slice::from_ref(&sources), reload);
            }
            let mut broker = Broker::new(&host, tokio::io::stdout()).reloading_from(&runtime, sources);
            match scenario {
                Some(path) => {
                    let file = tokio::fs::File::open(&path)
                        .await
                        .with_context(|| format!("reading the scenario {}", path.display()))?;
                    broker.replay(BufReader::new(file), Some(reloads)).await?
                }
                None => broker.replay(BufReader::new(tokio::io::stdin()), Some(reloads)).await?,
            }
            if stats {
                println!("{}", serde_json::json!({ "stats": host.metrics().snapshot() }));
            }
        }
    }
    Ok(())
}
