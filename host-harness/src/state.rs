//! What a guest's store holds: its (minimal) WASI context, its resources, and the SQL backend.

use std::sync::Arc;

use wasmtime::StoreLimits;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::AsyncStdoutStream;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::metrics::Metrics;
use crate::sandbox::{GuestOutput, Limits};
use crate::sql::SqlBackend;

pub struct HostState {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) sql: Arc<dyn SqlBackend>,
    /// For log lines: which extension said it.
    pub(crate) extension_name: String,
    pub(crate) limits: StoreLimits,
    pub(crate) metrics: Arc<Metrics>,
}

/// How much guest output is buffered before a write waits.
const OUTPUT_BUDGET: usize = 4096;

impl HostState {
    pub fn new(sql: Arc<dyn SqlBackend>, metrics: Arc<Metrics>, extension_name: &str, limits: &Limits) -> HostState {
        // No preopened directories, no environment, no arguments, no network. Output goes to the
        // host's log (never to its stdout, which may carry a protocol of its own).
        let wasi = WasiCtx::builder()
            .stdout(AsyncStdoutStream::new(OUTPUT_BUDGET, GuestOutput::new(extension_name, "stdout")))
            .stderr(AsyncStdoutStream::new(OUTPUT_BUDGET, GuestOutput::new(extension_name, "stderr")))
            .build();
        HostState {
            wasi,
            table: ResourceTable::new(),
            sql,
            extension_name: extension_name.to_owned(),
            limits: limits.store_limits(),
            metrics,
        }
    }
}

/// `types` holds only records; there is nothing to implement.
impl crate::bindings::broker::extension::types::Host for HostState {}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}
