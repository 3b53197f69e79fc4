//! The `log` interface of the contract: guest log lines become `tracing` events of the host,
//! attributed to the extension.

use crate::bindings::broker::extension::log::{Host, Level};
use crate::state::HostState;

impl Host for HostState {
    async fn write(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        let extension = self.extension_name.as_str();
        match level {
            Level::Trace => tracing::trace!(target: "guest", extension, "{message}"),
            Level::Debug => tracing::debug!(target: "guest", extension, "{message}"),
            Level::Info => tracing::info!(target: "guest", extension, "{message}"),
            Level::Warn => tracing::warn!(target: "guest", extension, "{message}"),
            Level::Error => tracing::error!(target: "guest", extension, "{message}"),
        }
        Ok(())
    }
}
