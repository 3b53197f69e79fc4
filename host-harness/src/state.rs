//! What a guest's store holds: its (minimal) WASI context, its resources, and the SQL backend.

use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::sql::SqlBackend;

pub struct HostState {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) sql: Arc<dyn SqlBackend>,
    /// For log lines: which extension said it.
    pub(crate) extension_name: String,
}

impl HostState {
    pub fn new(sql: Arc<dyn SqlBackend>, extension_name: &str) -> HostState {
        // No preopened directories, no environment, no network. Guest stdout would corrupt a
        // host's own output (the harness prints JSON lines), so only stderr is passed through.
        let wasi = WasiCtx::builder().inherit_stderr().build();
        HostState { wasi, table: ResourceTable::new(), sql, extension_name: extension_name.to_owned() }
    }
}

/// `types` holds only records; there is nothing to implement.
impl crate::bindings::broker::extension::types::Host for HostState {}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}
