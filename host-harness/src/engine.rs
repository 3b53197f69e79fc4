//! Loading guests: one [`Runtime`] (wasmtime engine and linker) per process, a compiled
//! [`ExtensionModule`] per `.wasm`, and an [`Instance`] per running copy of it. An instance's
//! methods are the broker hooks of the contract.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, Store};

use crate::bindings::{
    Client, ConfigError, Extension, ExtensionPre, FetchPage, HookError, Message, PublishOutcome, Rules, Subscription,
};
use crate::sql::SqlBackend;
use crate::state::HostState;

/// The wasmtime engine and a linker holding what a guest may import: the contract's `sql` and
/// `log`, and WASI (which a Rust guest's std imports even when it does no I/O).
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
}

impl Runtime {
    pub fn new() -> anyhow::Result<Runtime> {
        let engine = Engine::new(&Config::new())?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        Extension::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |state| state)?;
        Ok(Runtime { engine, linker })
    }

    /// Compiles a guest and checks that everything it imports is provided.
    pub fn load(&self, path: &Path) -> anyhow::Result<ExtensionModule> {
        let component = Component::from_file(&self.engine, path)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("loading {}", path.display()))?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("{} imports something this host does not provide", path.display()))?;
        let name = path.file_stem().map_or_else(|| "extension".into(), |s| s.to_string_lossy().into_owned());
        Ok(ExtensionModule { engine: self.engine.clone(), pre: ExtensionPre::new(pre)?, name })
    }
}

/// A compiled guest, ready to instantiate cheaply.
pub struct ExtensionModule {
    engine: Engine,
    pre: ExtensionPre<HostState>,
    name: String,
}

impl ExtensionModule {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub async fn instantiate(&self, sql: Arc<dyn SqlBackend>) -> anyhow::Result<Instance> {
        let mut store = Store::new(&self.engine, HostState::new(sql, &self.name));
        let hooks = self.pre.instantiate_async(&mut store).await?;
        Ok(Instance { store, hooks })
    }
}

/// One instance of a guest. Each method is a hook call; the outer `Result` is a trap (the
/// instance is then unusable), the inner one the guest's own answer.
pub struct Instance {
    store: Store<HostState>,
    hooks: Extension,
}

type Call<T> = anyhow::Result<T>;

impl Instance {
    pub async fn configure(&mut self, rules: &Rules) -> Call<Result<(), ConfigError>> {
        Ok(self.hooks.broker_extension_hooks().call_configure(&mut self.store, rules).await?)
    }

    pub async fn client_connected(&mut self, client: &Client) -> Call<Result<Vec<Subscription>, HookError>> {
        Ok(self.hooks.broker_extension_hooks().call_client_connected(&mut self.store, client).await?)
    }

    pub async fn client_disconnected(&mut self, client: &Client, reason: &str) -> Call<Result<(), HookError>> {
        Ok(self.hooks.broker_extension_hooks().call_client_disconnected(&mut self.store, client, reason).await?)
    }

    pub async fn session_subscribed(&mut self, client: &Client, subscription: &Subscription) -> Call<Result<FetchPage, HookError>> {
        Ok(self.hooks.broker_extension_hooks().call_session_subscribed(&mut self.store, client, subscription).await?)
    }

    pub async fn session_fetch_next(
        &mut self,
        client: &Client,
        subscription: &Subscription,
        cursor: &str,
    ) -> Call<Result<FetchPage, HookError>> {
        Ok(self.hooks.broker_extension_hooks().call_session_fetch_next(&mut self.store, client, subscription, cursor).await?)
    }

    pub async fn session_unsubscribed(&mut self, client: &Client, filter: &str) -> Call<Result<(), HookError>> {
        Ok(self.hooks.broker_extension_hooks().call_session_unsubscribed(&mut self.store, client, filter).await?)
    }

    pub async fn message_publish(&mut self, messages: &[Message]) -> Call<Vec<PublishOutcome>> {
        Ok(self.hooks.broker_extension_hooks().call_message_publish(&mut self.store, messages).await?)
    }

    pub async fn message_delivered(&mut self, client: &Client, message: &Message) -> Call<Result<(), HookError>> {
        Ok(self.hooks.broker_extension_hooks().call_message_delivered(&mut self.store, client, message).await?)
    }

    pub async fn message_acked(&mut self, client: &Client, message: &Message) -> Call<Result<(), HookError>> {
        Ok(self.hooks.broker_extension_hooks().call_message_acked(&mut self.store, client, message).await?)
    }

    pub async fn tick(&mut self) -> Call<Result<u64, HookError>> {
        Ok(self.hooks.broker_extension_hooks().call_tick(&mut self.store).await?)
    }
}
