//! `broker`: an MQTT broker that stores and delivers offline messages through the extensions
//! named in its configuration file. See README.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use broker::config::BrokerConfig;
use clap::Parser;
use host_harness::Runtime;

#[derive(Parser)]
#[command(version, about = "An MQTT broker that loads broker:extension guests")]
struct Cli {
    /// The configuration file (TOML): listener, node name, extensions (module and rules).
    #[arg(long, default_value = "examples/broker.toml")]
    config: PathBuf,
    /// Listen here (plain TCP) instead of the file's `listen`.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// This node's name instead of the file's `node`.
    #[arg(long)]
    node: Option<String>,
    /// Apply the schema (schema/schema.sql) to every pool's database before listening.
    #[arg(long)]
    migrate: bool,
    /// Where compiled extensions are cached (by digest); none: compile at every start.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    host_harness::command::main("broker", run(Cli::parse())).await
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = BrokerConfig::load(&cli.config)?;
    if let Some(listen) = cli.listen {
        config.listen = Some(listen);
    }
    if let Some(node) = cli.node {
        config.node = node;
    }
    let runtime = Runtime::with_limits(config.sandbox.limits(), cli.cache_dir)?;
    broker::serve(config, runtime, cli.migrate).await
}
