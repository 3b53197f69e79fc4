//! A guest running with its rules: reads the rules file, builds the pools it names, and
//! instantiates and configures the guest. What a broker embeds.
//!
//! A host survives its guest: a call that traps (a loop past the deadline, a memory bomb, a
//! panic) fails alone, and the instance is replaced by a fresh, configured one. Rules and module
//! can be reloaded while it runs; a new configuration is validated on a fresh instance before it
//! is swapped in, and a bad one leaves the running configuration untouched.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, anyhow};
use rules_file::RulesError;

use crate::bindings::Rules;
use crate::config::RulesFile;
use crate::engine::{ExtensionModule, Instance, Runtime};
use crate::metrics::Metrics;
use crate::postgres::PgBackend;
use crate::schema;

/// The node name a host reports when none is given (EMQX's `node`).
pub const DEFAULT_NODE: &str = "harness@localhost";

pub struct Host {
    /// The running instance. Calls made through [`Host::call`] survive a trap.
    pub instance: Instance,
    module: ExtensionModule,
    backend: Arc<PgBackend>,
    /// What the instance was configured with.
    rules: Rules,
    /// Shared by every instance this host runs.
    metrics: Arc<Metrics>,
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
        let (backend, rules) = prepare(text, source, node, None)?;
        let metrics = Arc::new(Metrics::default());
        let instance = configured(module, &backend, &metrics, &rules).await?;
        Ok(Host { instance, module: module.clone(), backend, rules, metrics })
    }

    /// Runs one call of the hook named `hook` on the instance, timed for the metrics. If it
    /// traps, the instance is replaced by a fresh one with the same configuration, and the error
    /// is returned for this call alone.
    pub async fn call<T>(
        &mut self,
        hook: &str,
        call: impl AsyncFnOnce(&mut Instance) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let started = Instant::now();
        let result = call(&mut self.instance).await;
        self.metrics.hook(hook, result.is_err(), started.elapsed());
        if let Err(e) = &result {
            tracing::error!(
                extension = self.module.name(),
                hook,
                "the extension trapped; replacing its instance: {e:#}"
            );
            self.instance = configured(&self.module, &self.backend, &self.metrics, &self.rules).await?;
        }
        result
    }

    /// This host's metrics (`Metrics::prometheus` for a scrape endpoint).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Swaps in new rules once a fresh instance has accepted them. Pools whose settings did not
    /// change keep their connections. On error nothing changes.
    pub async fn reload_rules(&mut self, text: &str, source: &str) -> anyhow::Result<()> {
        let (backend, rules) = prepare(text, source, &self.rules.node, Some(&self.backend))?;
        self.swap(self.module.clone(), backend, rules).await
    }

    /// Swaps in a new module once a fresh instance of it has accepted the current rules.
    pub async fn reload_module(&mut self, module: ExtensionModule) -> anyhow::Result<()> {
        self.swap(module, self.backend.clone(), self.rules.clone()).await
    }

    /// Reloads both from their files (what `{"control":"reload"}`, `--watch` and SIGHUP do).
    /// Either both are swapped in or, on any error, neither.
    pub async fn reload(&mut self, runtime: &Runtime, sources: &Sources) -> anyhow::Result<()> {
        let module = runtime.load(&sources.module)?;
        let (text, source) = read_rules(&sources.rules)?;
        let (backend, rules) = prepare(&text, &source, &self.rules.node, Some(&self.backend))?;
        self.swap(module, backend, rules).await
    }

    /// Configures a fresh instance of `module` with `rules` and, only if that works, makes the
    /// three the running ones.
    async fn swap(&mut self, module: ExtensionModule, backend: Arc<PgBackend>, rules: Rules) -> anyhow::Result<()> {
        self.instance = configured(&module, &backend, &self.metrics, &rules).await?;
        self.module = module;
        self.backend = backend;
        self.rules = rules;
        Ok(())
    }

    /// Applies the schema to the database of every pool.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        for name in self.backend.pool_names() {
            let pool = self.backend.pool(&name).map_err(|e| anyhow!("{e:?}"))?;
            schema::migrate(pool).await.with_context(|| format!("migrating pool {name}"))?;
        }
        Ok(())
    }

    /// Converts the EMQX 4 tables of `pool`'s database (see schema/from-emqx4.sql).
    pub async fn migrate_from_emqx4(&self, pool: &str) -> anyhow::Result<()> {
        let pool_ref = self.backend.pool(pool).map_err(|e| anyhow!("{e:?}"))?;
        schema::migrate_from_emqx4(pool_ref).await.with_context(|| format!("converting pool {pool} from EMQX 4"))
    }

    pub fn pool_names(&self) -> Vec<String> {
        self.backend.pool_names()
    }

    /// The pools, for a host that wants to look at them (tests check that unchanged pools survive a reload).
    pub fn backend(&self) -> &PgBackend {
        &self.backend
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
) -> anyhow::Result<(Arc<PgBackend>, Rules)> {
    let file = RulesFile::parse(text).map_err(|e| anyhow!("{source}: {e}"))?;
    let backend = Arc::new(PgBackend::new(&file.pools, previous)?);
    let rules =
        Rules { source: source.to_owned(), text: file.guest_text, pools: backend.pool_names(), node: node.to_owned() };
    Ok((backend, rules))
}

/// A fresh instance of `module`, configured with `rules`.
async fn configured(
    module: &ExtensionModule,
    backend: &Arc<PgBackend>,
    metrics: &Arc<Metrics>,
    rules: &Rules,
) -> anyhow::Result<Instance> {
    let mut instance = module.instantiate(backend.clone(), metrics.clone()).await?;
    if let Err(e) = instance.configure(rules).await? {
        return Err(anyhow!("{}: {}", rules.source, RulesError { line: e.line, key: e.key, message: e.message }));
    }
    Ok(instance)
}
