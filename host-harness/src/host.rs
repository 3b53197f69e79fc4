//! A guest running with its rules: reads the rules file, builds the pools it names, and runs
//! configured instances of the guest. What a broker embeds.
//!
//! A host serves concurrent calls: each call takes an idle instance (or configures a new one, up
//! to a bound) and gives it back afterwards, so a broker's sessions never wait for each other's
//! database round trips. A host survives its guest: a call that traps (a loop past the deadline,
//! a memory bomb, a panic) fails alone, and its instance is discarded. Rules and module can be
//! reloaded while it runs; a new configuration is validated on a fresh instance before it is
//! swapped in, and a bad one leaves the running configuration untouched. Calls already running
//! finish on the configuration they started with.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Instant;

use anyhow::{Context, anyhow};
use rules_file::RulesError;
use tokio::sync::Semaphore;

use crate::bindings::{Client, Configuration, Describe, FetchPage, HookError, Hookpoint, Subscription};
use crate::config::RulesFile;
use crate::engine::{ExtensionModule, Hook, Instance, Runtime};
use crate::interest::Interest;
use crate::metrics::Metrics;
use crate::postgres::PgBackend;
use crate::schema;
use crate::sql::SqlBackend;

/// The node name a host reports when none is given (EMQX's `node`).
pub const DEFAULT_NODE: &str = "harness@localhost";

/// How many instances may run calls at once, unless [`Host::with_max_instances`] says otherwise.
/// Each costs little (tens of KiB); calls mostly wait on the database, whose pools bound the
/// real concurrency.
pub const DEFAULT_MAX_INSTANCES: usize = 32;

pub struct Host {
    /// The running configuration; a reload replaces it whole.
    running: RwLock<Arc<Running>>,
    /// Instances between calls, each with the configuration it was made with.
    idle: Mutex<Vec<(Arc<Running>, Instance)>>,
    /// Bounds the instances in use at once.
    slots: Semaphore,
    /// Shared by every instance this host runs.
    metrics: Arc<Metrics>,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
    /// Answers the guests' SQL instead of the pools, reloads included ([`Host::with_sql`]).
    sql_instead: Option<Arc<dyn SqlBackend>>,
}

/// A module, its pools and its rules: what instances are made from.
struct Running {
    module: ExtensionModule,
    backend: Arc<PgBackend>,
    /// What answers the guests' SQL: the pools, or a host's stand-in ([`Host::with_sql`]).
    sql: Arc<dyn SqlBackend>,
    rules: Configuration,
    /// What the rules act on, as the first instance configured with them said.
    interest: OnceLock<Interest>,
}

/// The files a host was loaded from, for reloading them.
#[derive(Debug, Clone)]
pub struct Sources {
    pub module: PathBuf,
    pub rules: PathBuf,
}

impl Host {
    /// Loads `module` and configures it with the rules file at `rules`. Errors name the file,
    /// line and key of a bad rule.
    pub async fn load(runtime: &Runtime, sources: &Sources, node: &str) -> anyhow::Result<Host> {
        let module = runtime.load(&sources.module)?;
        let (text, source) = read_rules(&sources.rules)?;
        Host::with_rules(&module, &text, &source, node).await
    }

    /// Like [`Host::load`], with the rules given as text; `source` names them in errors.
    pub async fn with_rules(module: &ExtensionModule, text: &str, source: &str, node: &str) -> anyhow::Result<Host> {
        Host::configure(module, text, source, node, None).await
    }

    /// Like [`Host::with_rules`], with `sql` answering the guests' statements instead of the
    /// rules' pools (which are configured, and never connected): a fake database, for tests of
    /// the protocol that need no PostgreSQL.
    pub async fn with_sql(
        module: &ExtensionModule,
        text: &str,
        source: &str,
        node: &str,
        sql: Arc<dyn SqlBackend>,
    ) -> anyhow::Result<Host> {
        Host::configure(module, text, source, node, Some(sql)).await
    }

    async fn configure(
        module: &ExtensionModule,
        text: &str,
        source: &str,
        node: &str,
        sql_instead: Option<Arc<dyn SqlBackend>>,
    ) -> anyhow::Result<Host> {
        let (backend, rules) = prepare(text, source, node, None)?;
        let metrics = Arc::new(Metrics::default());
        let running = Arc::new(Running::new(module.clone(), backend, rules, &sql_instead));
        let instance = configured(&running, &metrics).await?;
        Ok(Host {
            idle: Mutex::new(vec![(running.clone(), instance)]),
            running: RwLock::new(running),
            slots: Semaphore::new(DEFAULT_MAX_INSTANCES),
            metrics,
            reloading: tokio::sync::Mutex::new(()),
            sql_instead,
        })
    }

    /// Allows up to `max` calls at once (at least one).
    pub fn with_max_instances(mut self, max: usize) -> Host {
        self.slots = Semaphore::new(max.max(1));
        self
    }

    /// Runs one call on an instance, timed for the metrics under the hook it called. If it
    /// traps, the instance is discarded (the next call gets a fresh one with the same
    /// configuration), and the error is returned for this call alone.
    pub async fn call<T>(&self, call: impl AsyncFnOnce(&mut Instance) -> anyhow::Result<T>) -> anyhow::Result<T> {
        let _slot = self.slots.acquire().await.expect("the semaphore is never closed");
        let (running, mut instance) = self.checkout().await?;
        let started = Instant::now();
        let result = call(&mut instance).await;
        let hook = instance.take_called().map_or("(none)", Hook::name);
        self.metrics.hook(hook, result.is_err(), started.elapsed());
        match &result {
            Ok(_) => self.idle.lock().unwrap().push((running, instance)),
            Err(e) => tracing::error!(
                extension = running.module.name(),
                hook,
                "the extension trapped; its instance is discarded: {e:#}"
            ),
        }
        result
    }

    /// Like [`Host::call`], for a caller that carries on whatever happened: the guest's answer,
    /// or `None` once a trap or a hook error has been logged. The one place where both become
    /// "nothing" (the rules' `on_error` already decided in the guest what an error means).
    pub async fn call_or_log<T>(
        &self,
        call: impl AsyncFnOnce(&mut Instance) -> anyhow::Result<Result<T, HookError>>,
    ) -> Option<T> {
        self.answered(self.call(call).await)
    }

    /// The answer of a call, or `None` once a trap or a hook error has been logged.
    pub fn answered<T>(&self, answer: anyhow::Result<Result<T, HookError>>) -> Option<T> {
        match answer {
            Ok(Ok(value)) => Some(value),
            Ok(Err(e)) => {
                tracing::warn!(extension = self.running().module.name(), "{}", e.describe());
                None
            }
            // Logged by `call`.
            Err(_) => None,
        }
    }

    /// Calls a backlog fetch of `subscription` (`session-subscribed`, `session-fetch-next`,
    /// `session-resume`). A fetch that traps other than on its deadline (a stored message too
    /// large for the guest's memory, say) is not retried into the same trap at every reconnect:
    /// the backlog goes on from `from` (the cursor the fetch started after; none for the stored
    /// position) one message at a time, and a message that traps the guest even alone is skipped,
    /// logged and counted, so that the subscriber gets the rest.
    pub async fn fetch(
        &self,
        client: &Client,
        subscription: &Subscription,
        from: Option<&str>,
        call: impl AsyncFnOnce(&mut Instance) -> anyhow::Result<Result<FetchPage, HookError>>,
    ) -> anyhow::Result<Result<FetchPage, HookError>> {
        match self.call(call).await {
            Err(trap) if poisoned(&trap) => {}
            answer => return answer,
        }
        let mut from = from.map(str::to_owned);
        loop {
            let one = async |i: &mut Instance| i.session_fetch_one(client, subscription, from.as_deref()).await;
            match self.call(one).await {
                Err(trap) if poisoned(&trap) => {}
                answer => return answer,
            }
            let skip = async |i: &mut Instance| i.session_skip(client, subscription, from.as_deref()).await;
            match self.call(skip).await? {
                Ok(Some(skipped)) => {
                    tracing::error!(
                        extension = self.running().module.name(),
                        clientid = client.clientid,
                        filter = subscription.filter,
                        id = skipped.id,
                        "stored message {} traps the extension even alone: skipped for this subscription",
                        skipped.id
                    );
                    self.metrics.skipped();
                    from = Some(skipped.next);
                }
                Ok(None) => return Ok(Ok(FetchPage { messages: Vec::new(), next: None })),
                Err(e) => return Ok(Err(e)),
            }
        }
    }

    /// An idle instance of the running configuration, or a new one. Idle instances of an older
    /// configuration are dropped on the way.
    async fn checkout(&self) -> anyhow::Result<(Arc<Running>, Instance)> {
        let running = self.running();
        {
            let mut idle = self.idle.lock().unwrap();
            while let Some((made_with, instance)) = idle.pop() {
                if Arc::ptr_eq(&made_with, &running) {
                    return Ok((made_with, instance));
                }
            }
        }
        let instance = configured(&running, &self.metrics).await?;
        Ok((running, instance))
    }

    /// Whether the running rules may act on an event of `hookpoint`: about `topic` for the
    /// message hooks. A call they would not act on need not be made (`configure`'s interest).
    pub fn acts_on(&self, hookpoint: Hookpoint, topic: Option<&str>) -> bool {
        let running = self.running.read().unwrap();
        let Some(interest) = running.interest.get() else { return true };
        match topic {
            Some(topic) => interest.topic(hookpoint, topic),
            None => interest.any(hookpoint),
        }
    }

    fn running(&self) -> Arc<Running> {
        self.running.read().unwrap().clone()
    }

    /// This host's metrics (`Metrics::prometheus` for a scrape endpoint).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The module's name (its file stem).
    pub fn name(&self) -> String {
        self.running().module.name().to_owned()
    }

    /// Swaps in new rules once a fresh instance has accepted them. Pools whose settings did not
    /// change keep their connections. On error nothing changes.
    pub async fn reload_rules(&self, text: &str, source: &str) -> anyhow::Result<()> {
        let _one = self.reloading.lock().await;
        let current = self.running();
        let (backend, rules) = prepare(text, source, &current.rules.node, Some(&current.backend))?;
        self.swap(Running::new(current.module.clone(), backend, rules, &self.sql_instead)).await
    }

    /// Swaps in a new module once a fresh instance of it has accepted the current rules.
    pub async fn reload_module(&self, module: ExtensionModule) -> anyhow::Result<()> {
        let _one = self.reloading.lock().await;
        let current = self.running();
        self.swap(Running::new(module, current.backend.clone(), current.rules.clone(), &self.sql_instead)).await
    }

    /// Reloads both from their files (what `{"control":"reload"}`, `--watch` and SIGHUP do).
    /// Either both are swapped in or, on any error, neither.
    /// Counted in the metrics (`reloads`, `reloads_refused`).
    pub async fn reload(&self, runtime: &Runtime, sources: &Sources) -> anyhow::Result<()> {
        let _one = self.reloading.lock().await;
        let reloaded = async {
            let current = self.running();
            let module = runtime.load(&sources.module)?;
            let (text, source) = read_rules(&sources.rules)?;
            let (backend, rules) = prepare(&text, &source, &current.rules.node, Some(&current.backend))?;
            self.swap(Running::new(module, backend, rules, &self.sql_instead)).await
        }
        .await;
        self.metrics.reloaded(reloaded.is_ok());
        reloaded
    }

    /// Configures a fresh instance of `next` and, only if that works, makes `next` the running
    /// configuration.
    async fn swap(&self, next: Running) -> anyhow::Result<()> {
        let next = Arc::new(next);
        let instance = configured(&next, &self.metrics).await?;
        *self.running.write().unwrap() = next.clone();
        let mut idle = self.idle.lock().unwrap();
        idle.clear();
        idle.push((next, instance));
        Ok(())
    }

    /// Applies the schema to the database of every pool.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        let backend = self.backend();
        for name in backend.pool_names() {
            let client = backend.connection(&name).await.map_err(|e| anyhow!("{}", e.describe()))?;
            schema::migrate(client).await.with_context(|| format!("migrating pool {name}"))?;
        }
        Ok(())
    }

    /// Converts the EMQX 4 tables of `pool`'s database (see schema/from-emqx4.sql).
    pub async fn migrate_from_emqx4(&self, pool: &str) -> anyhow::Result<()> {
        let backend = self.backend();
        let client = backend.connection(pool).await.map_err(|e| anyhow!("{}", e.describe()))?;
        schema::migrate_from_emqx4(client).await.with_context(|| format!("converting pool {pool} from EMQX 4"))
    }

    pub fn pool_names(&self) -> Vec<String> {
        self.backend().pool_names()
    }

    /// Whether every pool reaches its database now (`SELECT 1` on a connection of each, within
    /// `patience`): a health check. The error names the pool and what failed.
    pub async fn check_pools(&self, patience: std::time::Duration) -> Result<(), String> {
        let backend = self.backend();
        for name in backend.pool_names() {
            let check = async {
                let client = backend.connection(&name).await.map_err(|e| e.describe())?;
                client.simple_query("SELECT 1").await.map(drop).map_err(|e| format!("pool {name}: {e}"))
            };
            tokio::time::timeout(patience, check)
                .await
                .map_err(|_| format!("pool {name}: no answer within {} s", patience.as_secs_f32()))??;
        }
        Ok(())
    }

    /// The running pools, for a host that wants to look at them (tests check that unchanged
    /// pools survive a reload).
    pub fn backend(&self) -> Arc<PgBackend> {
        self.running().backend.clone()
    }
}

fn read_rules(path: &Path) -> anyhow::Result<(String, String)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok((text, path.display().to_string()))
}

/// Parses a rules text into its pools (reusing `previous` pools whose settings are unchanged)
/// and the guest's part.
fn prepare(
    text: &str,
    source: &str,
    node: &str,
    previous: Option<&PgBackend>,
) -> anyhow::Result<(Arc<PgBackend>, Configuration)> {
    let file = RulesFile::parse(text).map_err(|e| anyhow!("{source}: {e}"))?;
    let backend = Arc::new(PgBackend::new(&file.pools, previous)?);
    let rules = Configuration {
        source: source.to_owned(),
        text: file.guest_text,
        pools: backend.pool_names(),
        node: node.to_owned(),
    };
    Ok((backend, rules))
}

/// A fresh instance of `running`'s module, configured with its rules.
/// Whether a failed call trapped on what it was given (memory, a bug), rather than on its
/// deadline (a slow database ends a call that way too, and then no message is to blame) or
/// before it ran.
fn poisoned(error: &anyhow::Error) -> bool {
    error.downcast_ref::<wasmtime::Trap>().is_some_and(|trap| *trap != wasmtime::Trap::Interrupt)
}

impl Running {
    fn new(
        module: ExtensionModule,
        backend: Arc<PgBackend>,
        rules: Configuration,
        sql_instead: &Option<Arc<dyn SqlBackend>>,
    ) -> Running {
        let sql = sql_instead.clone().unwrap_or_else(|| backend.clone());
        Running { module, backend, sql, rules, interest: OnceLock::new() }
    }
}

async fn configured(running: &Running, metrics: &Arc<Metrics>) -> anyhow::Result<Instance> {
    let Running { module, sql, rules, .. } = running;
    let mut instance = module.instantiate(sql.clone(), metrics.clone()).await?;
    match instance.configure(rules).await? {
        Ok(declared) => {
            running.interest.get_or_init(|| Interest::declared(declared));
        }
        Err(e) => {
            return Err(anyhow!("{}: {}", rules.source, RulesError { line: e.line, key: e.key, message: e.message }));
        }
    }
    Ok(instance)
}
