//! `proxy`: an MQTT proxy in front of any MQTT 5 broker that stores and delivers offline
//! messages through the extensions named in its configuration file. See README.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use host_harness::Runtime;
use proxy::config::ProxyConfig;

#[derive(Parser)]
#[command(version, about = "An MQTT proxy that loads broker:extension guests in front of an MQTT 5 broker")]
struct Cli {
    /// The configuration file (TOML): listener, upstream broker, extensions (module and rules).
    #[arg(long, default_value = "examples/proxy.toml")]
    config: PathBuf,
    /// Listen here (plain TCP) instead of the file's `listen`.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// The upstream broker (`host:port`) instead of the file's `[upstream] address`.
    #[arg(long)]
    upstream: Option<String>,
    /// Apply the schema (schema/schema.sql) to every pool's database before listening.
    #[arg(long)]
    migrate: bool,
    /// Where compiled extensions are cached (by digest); none: compile at every start.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    host_harness::command::main("proxy", run(Cli::parse())).await
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = ProxyConfig::load(&cli.config)?;
    if let Some(listen) = cli.listen {
        config.listen = Some(listen);
    }
    if let Some(upstream) = cli.upstream {
        config.upstream.address = upstream;
    }
    let runtime = Runtime::with_limits(config.sandbox.limits(), cli.cache_dir)?;
    proxy::serve(config, runtime, cli.migrate).await
}
