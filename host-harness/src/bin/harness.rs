//! `harness`: load a guest with a rules file, check it, migrate its databases, or replay broker
//! events through it. See README.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use host_harness::replay::Broker;
use host_harness::{Host, Runtime};
use tokio::io::BufReader;

#[derive(Parser)]
#[command(version, about = "Load a broker:extension guest and drive it like a broker")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Load {
    /// The guest component (.wasm).
    #[arg(long)]
    module: PathBuf,
    /// The rules file: EMQX conf lines or a JSON document.
    #[arg(long)]
    rules: PathBuf,
    /// This broker node's name, for `mqtt_client.node` and `${node}`.
    #[arg(long, default_value = host_harness::host::DEFAULT_NODE)]
    node: String,
}

#[derive(Subcommand)]
enum Command {
    /// Load and configure the guest; exit non-zero with the error if the rules are refused.
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
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse().command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("harness: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    let runtime = Runtime::new()?;
    match command {
        Command::Check(load) => {
            Host::load(&runtime, &load.module, &load.rules, &load.node).await?;
            println!("{}: ok", load.rules.display());
        }
        Command::Migrate { load, from_emqx } => {
            let host = Host::load(&runtime, &load.module, &load.rules, &load.node).await?;
            if from_emqx {
                for pool in host.pool_names() {
                    host.migrate_from_emqx4(&pool).await?;
                    println!("pool {pool}: converted from EMQX 4; the original tables are in schema emqx4");
                }
            } else {
                host.migrate().await?;
            }
        }
        Command::Run { load, scenario } => {
            let mut host = Host::load(&runtime, &load.module, &load.rules, &load.node).await?;
            let mut broker = Broker::new(&mut host.instance, tokio::io::stdout());
            match scenario {
                Some(path) => broker.replay(BufReader::new(tokio::fs::File::open(&path).await?)).await?,
                None => broker.replay(BufReader::new(tokio::io::stdin())).await?,
            }
        }
    }
    Ok(())
}
