//! What a guest may do: which imports it may have, how long a call may run, how much memory an
//! instance may take, and where its output goes. Guests are untrusted.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::AsyncWrite;
use wasmtime::component::Component;
use wasmtime::{Engine, StoreLimits, StoreLimitsBuilder};

/// Limits of one instance, and of each call into it.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Wall-clock time one hook call may take, SQL waits included; past it the call traps.
    pub call_timeout: Duration,
    /// Linear memory one instance may grow to.
    pub memory_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { call_timeout: Duration::from_secs(10), memory_bytes: 64 << 20 }
    }
}

/// How often the engine's epoch advances: the granularity of `call_timeout`.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

impl Limits {
    /// `call_timeout` in epoch ticks (at least one).
    pub fn deadline_ticks(&self) -> u64 {
        (self.call_timeout.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64
    }

    pub fn store_limits(&self) -> StoreLimits {
        StoreLimitsBuilder::new().memory_size(self.memory_bytes).instances(16).tables(16).memories(4).build()
    }
}

/// Advances `engine`'s epoch every [`EPOCH_TICK`] until the engine is dropped.
pub fn start_epoch_ticker(engine: &Engine) {
    let engine = engine.weak();
    std::thread::Builder::new()
        .name("wasm-epoch".into())
        .spawn(move || {
            while let Some(engine) = engine.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })
        .expect("spawning the epoch thread");
}

/// The interfaces a guest may import: the contract, and the part of WASI that a Rust guest's
/// standard library imports even when it does no I/O. A guest gets no preopened directory, no
/// environment, no arguments, so what remains of `wasi:filesystem` and `wasi:cli` reaches nothing.
/// Sockets, HTTP and anything else are refused at load.
const ALLOWED_IMPORTS: [&str; 6] =
    ["broker:extension/", "wasi:cli/", "wasi:clocks/", "wasi:io/", "wasi:random/", "wasi:filesystem/"];

/// Refuses a component that imports anything beyond [`ALLOWED_IMPORTS`], naming the import.
pub fn check_imports(engine: &Engine, component: &Component) -> anyhow::Result<()> {
    for (name, _) in component.component_type().imports(engine) {
        if !ALLOWED_IMPORTS.iter().any(|prefix| name.starts_with(prefix)) {
            anyhow::bail!(
                "the component imports `{name}`, which extensions may not use (allowed: {})",
                ALLOWED_IMPORTS.join(", ")
            );
        }
    }
    Ok(())
}

/// A guest's stdout or stderr: each line becomes a log event of the host, attributed to the
/// extension. Lines are cut at 4 KiB so that a guest cannot make the host buffer without bound.
pub struct GuestOutput {
    extension: String,
    stream: &'static str,
    line: Vec<u8>,
}

const MAX_LINE: usize = 4096;

impl GuestOutput {
    pub fn new(extension: &str, stream: &'static str) -> GuestOutput {
        GuestOutput { extension: extension.to_owned(), stream, line: Vec::new() }
    }

    fn emit(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        tracing::info!(target: "guest", extension = self.extension.as_str(), stream = self.stream, "{}", text.trim_end());
        self.line.clear();
    }
}

impl AsyncWrite for GuestOutput {
    fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, bytes: &[u8]) -> Poll<std::io::Result<usize>> {
        for &byte in bytes {
            if byte == b'\n' || self.line.len() >= MAX_LINE {
                self.emit();
            }
            if byte != b'\n' {
                self.line.push(byte);
            }
        }
        Poll::Ready(Ok(bytes.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if !self.line.is_empty() {
            self.emit();
        }
        Poll::Ready(Ok(()))
    }
}
