//! Loading guests: one [`Runtime`] (wasmtime engine and linker) per process, a compiled
//! [`ExtensionModule`] per `.wasm`, and an [`Instance`] per running copy of it. An instance's
//! methods are the broker hooks of the contract.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, Store};

use crate::bindings::{
    self, Client, ConfigError, Configuration, Extension, ExtensionPre, FetchPage, HookError, Interest, Message,
    PublishOutcome, Skipped, Subscription,
};
use crate::metrics::Metrics;
use crate::sandbox::{self, Limits};
use crate::sql::SqlBackend;
use crate::state::HostState;
use sha2::{Digest, Sha256};

/// The wasmtime engine and a linker holding what a guest may import: the contract's `sql`, `log`
/// and `metrics`, and WASI (which a Rust guest's std imports even when it does no I/O). One per
/// process.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    limits: Limits,
    /// Where compiled components are kept, keyed by module digest and engine configuration.
    cache_dir: Option<PathBuf>,
}

impl Runtime {
    pub fn new() -> anyhow::Result<Runtime> {
        Runtime::with_limits(Limits::default(), None)
    }

    pub fn with_limits(limits: Limits, cache_dir: Option<PathBuf>) -> anyhow::Result<Runtime> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        let engine = Engine::new(&config)?;
        sandbox::start_epoch_ticker(&engine);
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        Extension::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |state| state)?;
        Ok(Runtime { engine, linker, limits, cache_dir })
    }

    /// Compiles a guest (or loads its cached compilation) and checks what it imports.
    pub fn load(&self, path: &Path) -> anyhow::Result<ExtensionModule> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let name = path.file_stem().map_or_else(|| "extension".into(), |s| s.to_string_lossy().into_owned());
        self.load_bytes(&name, &bytes).with_context(|| format!("loading {}", path.display()))
    }

    pub fn load_bytes(&self, name: &str, bytes: &[u8]) -> anyhow::Result<ExtensionModule> {
        let component = self.compile(bytes)?;
        bindings::check_contract(&self.engine, &component)?;
        sandbox::check_imports(&self.engine, &component)?;
        let pre = self.linker.instantiate_pre(&component).map_err(anyhow::Error::from)?;
        Ok(ExtensionModule {
            engine: self.engine.clone(),
            pre: ExtensionPre::new(pre)?,
            name: name.to_owned(),
            limits: self.limits,
        })
    }

    fn compile(&self, bytes: &[u8]) -> anyhow::Result<Component> {
        let Some(dir) = &self.cache_dir else {
            return Ok(Component::new(&self.engine, bytes)?);
        };
        let mut engine_hash = std::hash::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut engine_hash);
        let digest: String = Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
        let path = dir.join(format!("{digest}-{:016x}.cwasm", engine_hash.finish()));
        if path.exists() {
            // SAFETY: the file is one this host wrote into its own cache directory, named by the
            // digest of the module and of the engine's configuration.
            if let Ok(component) = unsafe { Component::deserialize_file(&self.engine, &path) } {
                return Ok(component);
            }
        }
        let component = Component::new(&self.engine, bytes)?;
        // The cache only saves time: a host that cannot write it runs all the same.
        if let Err(e) = component.serialize().map_err(anyhow::Error::from).and_then(|b| store_compiled(dir, &path, &b))
        {
            tracing::warn!("not cached: {}: {e:#}", path.display());
        }
        Ok(component)
    }
}

/// Writes a compiled component into the cache. Several hosts may share a cache directory and
/// compile the same module at once (the broker tests start brokers side by side), so each writes
/// a file of its own and renames it into place: the rename is atomic, and the last one wins with
/// the same bytes.
fn store_compiled(dir: &Path, path: &Path, compiled: &[u8]) -> anyhow::Result<()> {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    std::fs::create_dir_all(dir)?;
    let write = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let partial = path.with_extension(format!("partial-{}-{write}", std::process::id()));
    std::fs::write(&partial, compiled)?;
    std::fs::rename(&partial, path).inspect_err(|_| drop(std::fs::remove_file(&partial)))?;
    Ok(())
}

/// A compiled guest, ready to instantiate cheaply.
#[derive(Clone)]
pub struct ExtensionModule {
    engine: Engine,
    pre: ExtensionPre<HostState>,
    name: String,
    limits: Limits,
}

impl ExtensionModule {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub async fn instantiate(&self, sql: Arc<dyn SqlBackend>, metrics: Arc<Metrics>) -> anyhow::Result<Instance> {
        let mut store = Store::new(&self.engine, HostState::new(sql, metrics, &self.name, &self.limits));
        store.limiter(|state| &mut state.limits);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(self.limits.deadline_ticks());
        let hooks = self.pre.instantiate_async(&mut store).await?;
        Ok(Instance { store, hooks, deadline: self.limits.deadline_ticks(), called: None })
    }
}

/// One instance of a guest. Each method is a hook call; the outer `Result` is a trap (the
/// instance is then unusable), the inner one the guest's own answer.
pub struct Instance {
    store: Store<HostState>,
    hooks: Extension,
    /// Epoch ticks each call may take.
    deadline: u64,
    /// The hook called last: what `Host::call` counts and logs a call as, so that a call is
    /// named by what it did, never by a string that could say something else.
    called: Option<Hook>,
}

/// The store, with the call deadline armed, for a call of `hook`.
fn armed<'a>(
    store: &'a mut Store<HostState>,
    deadline: u64,
    called: &mut Option<Hook>,
    hook: Hook,
) -> &'a mut Store<HostState> {
    *called = Some(hook);
    store.set_epoch_deadline(deadline);
    store
}

/// The contract's exported functions: what a call into a guest is named by in metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    Configure,
    ClientConnected,
    ClientDisconnected,
    SessionSubscribed,
    SessionFetchNext,
    SessionResume,
    SessionFetchOne,
    SessionSkip,
    SessionUnsubscribed,
    MessagePublish,
    MessageDelivered,
    MessageAcked,
    Tick,
}

impl Hook {
    /// Its name in the contract (`message-publish`).
    pub fn name(self) -> &'static str {
        match self {
            Hook::Configure => "configure",
            Hook::ClientConnected => "client-connected",
            Hook::ClientDisconnected => "client-disconnected",
            Hook::SessionSubscribed => "session-subscribed",
            Hook::SessionFetchNext => "session-fetch-next",
            Hook::SessionResume => "session-resume",
            Hook::SessionFetchOne => "session-fetch-one",
            Hook::SessionSkip => "session-skip",
            Hook::SessionUnsubscribed => "session-unsubscribed",
            Hook::MessagePublish => "message-publish",
            Hook::MessageDelivered => "message-delivered",
            Hook::MessageAcked => "message-acked",
            Hook::Tick => "tick",
        }
    }
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

type Call<T> = anyhow::Result<T>;

impl Instance {
    /// The hook the last call called, and forgets it.
    pub fn take_called(&mut self) -> Option<Hook> {
        self.called.take()
    }

    pub async fn configure(&mut self, configuration: &Configuration) -> Call<Result<Vec<Interest>, ConfigError>> {
        Ok(self
            .hooks
            .broker_extension_hooks()
            .call_configure(armed(&mut self.store, self.deadline, &mut self.called, Hook::Configure), configuration)
            .await?)
    }

    pub async fn client_connected(&mut self, client: &Client) -> Call<Result<Vec<Subscription>, HookError>> {
        Ok(self
            .hooks
            .broker_extension_hooks()
            .call_client_connected(
                armed(&mut self.store, self.deadline, &mut self.called, Hook::ClientConnected),
                client,
            )
            .await?)
    }

    pub async fn client_disconnected(&mut self, client: &Client, reason: &str) -> Call<Result<(), HookError>> {
        Ok(self
            .hooks
            .broker_extension_hooks()
            .call_client_disconnected(
                armed(&mut self.store, self.deadline, &mut self.called, Hook::ClientDisconnected),
                client,
                reason,
            )
            .await?)
    }

    pub async fn session_subscribed(
        &mut self,
        client: &Client,
        subscription: &Subscription,
    ) -> Call<Result<FetchPage, HookError>> {
        Ok(self
            .hooks
            .broker_extension_hooks()
            .call_session_subscribed(
                armed(&mut self.store, self.deadline, &mut self.called, Hook::SessionSubscribed),
                client,
                subscription,
            )
            .await?)
    }

    pub async fn session_fetch_next(
        &mut self,
        client: &Client,
        subscription: &Subscription,
        cursor: &str,
    ) -> Call<Result<FetchPage, HookError>> {
        Ok(self
            .hooks
            .broker_extension_hooks()
            .call_session_fetch_next(
                armed(&mut self.store, self.deadline, &mut self.called, Hook::SessionFetchNext),
                client,
                subscription,
                cursor,
            )
            .await?)
    }

    pub async fn session_resume(
        &mut self,
        client: &Client,
        subscription: &Subscription,
    ) -> Call<Result<FetchPage, HookError>> {
        Ok(self
            .hooks
            .broker_extension_hooks()
            .call_session_resume(
                armed(&mut self.store, self.deadline, &mut self.called, Hook::SessionResume),
                client,
                subscription,
            )
            .await?)
    }

    pub async fn session_fetch_one(
        &mut self,
        client: &Client,
        subscription: &Subscription,
        cursor: Option<&str>,
    ) -> Call<Result<FetchPage, HookError>> {
        Ok(self
            .hooks
            .broker_extension_hooks()
            .call_session_fetch_one(
                armed(&mut self.store, self.deadline, &mut self.called, Hook::SessionFetchOne),
                client,
                subscription,
                cursor,
            )
            .await?)
    }

    pub async fn session_skip(
        &mut self,
        client: &Client,
        subscription: &Subscription,
        cursor: Option<&str>,
    ) -> Call<Result<Option<Skipped>, HookError>> {
        Ok(self
            .hooks
            .broker_extension_hooks()
            .call_session_skip(
                armed(&mut self.store, self.deadline, &mut self.called, Hook::SessionSkip),
                client,
                subscription,
                cursor,
            )
            .await?)
    }

    pub async fn session_unsubscribed(&mut self, client: &Client, filter: &str) -> Call<Result<(), HookError>> {
        Ok(self
            .hooks
            .broker_extension_hooks()
            .call_session_unsubscribed(
                armed(&mut self.store, self.deadline, &mut self.called, Hook::SessionUnsubscribed),
                client,
                filter,
            )
            .await?)
    }

    pub async fn message_publish(&mut self, messages: &[Message]) -> Call<Vec<PublishOutcome>> {
        Ok(self
            .hooks
            .broker_extension_hooks()
            .call_message_publish(
                armed(&mut self.store, self.deadline, &mut self.called, Hook::MessagePublish),
                messages,
            )
            .await?)
    }

    pub async fn message_delivered(&mut self, client: &Client, message: &Message) -> Call<Result<(), HookError>> {
        Ok(self
            .hooks
            .broker_extension_hooks()
            .call_message_delivered(
                armed(&mut self.store, self.deadline, &mut self.called, Hook::MessageDelivered),
                client,
                message,
            )
            .await?)
    }

    pub async fn message_acked(
        &mut self,
        client: &Client,
        message: &Message,
        positions: &[String],
    ) -> Call<Result<(), HookError>> {
        Ok(self
            .hooks
            .broker_extension_hooks()
            .call_message_acked(
                armed(&mut self.store, self.deadline, &mut self.called, Hook::MessageAcked),
                client,
                message,
                positions,
            )
            .await?)
    }

    pub async fn tick(&mut self) -> Call<Result<u64, HookError>> {
        Ok(self
            .hooks
            .broker_extension_hooks()
            .call_tick(armed(&mut self.store, self.deadline, &mut self.called, Hook::Tick))
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::store_compiled;

    /// Hosts sharing a cache directory write the same compilation at once; none of them fails.
    #[test]
    fn hosts_writing_one_cache_entry_at_once_all_succeed() {
        let dir = std::env::temp_dir().join(format!("engine-cache-{}", std::process::id()));
        let path = dir.join("module.cwasm");
        let writers: Vec<_> = (0..8)
            .map(|_| {
                let (dir, path) = (dir.clone(), path.clone());
                std::thread::spawn(move || (0..200).try_for_each(|_| store_compiled(&dir, &path, &[7; 4096])))
            })
            .collect();
        for writer in writers {
            writer.join().unwrap().expect("writing the cache");
        }
        assert_eq!(std::fs::read(&path).unwrap(), [7; 4096]);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no partial file is left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
