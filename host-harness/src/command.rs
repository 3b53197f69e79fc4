//! What the commands built on the host (`harness`, `broker`) share: logs go to stderr at the
//! level `RUST_LOG` sets (default `warn`, rustls `error`: it warns about every client that
//! connects by IP address, as `mosquitto_pub -h 127.0.0.1` does), and an error ends the process
//! with its causes.

use std::process::ExitCode;

/// Runs `run` as the body of the command `name`.
pub async fn main(name: &str, run: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,rustls=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
