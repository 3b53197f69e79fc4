//! A guest running with its rules: reads the rules file, builds the pools it names, and
//! instantiates and configures the guest. What a broker embeds.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, anyhow};
use rules_file::RulesError;

use crate::bindings::Rules;
use crate::config::RulesFile;
use crate::engine::{ExtensionModule, Instance, Runtime};
use crate::postgres::PgBackend;
use crate::schema;

/// The node name a host reports when none is given (EMQX's `node`).
pub const DEFAULT_NODE: &str = "harness@localhost";

pub struct Host {
    pub instance: Instance,
    backend: Arc<PgBackend>,
}

impl Host {
    /// Loads `module` and configures it with the rules file at `rules`. Errors name the file,
    /// line and key of a bad rule.
    pub async fn load(runtime: &Runtime, module: &Path, rules: &Path, node: &str) -> anyhow::Result<Host> {
        let text = std::fs::read_to_string(rules).with_context(|| format!("reading {}", rules.display()))?;
        let module = runtime.load(module)?;
        Host::with_rules(&module, &text, &rules.display().to_string(), node).await
    }

    /// Like [`Host::load`], with the rules given as text; `source` names them in errors.
    pub async fn with_rules(module: &ExtensionModule, text: &str, source: &str, node: &str) -> anyhow::Result<Host> {
        let file = RulesFile::parse(text).map_err(|e| anyhow!("{source}: {e}"))?;
        let backend = Arc::new(PgBackend::new(&file.pools)?);
        let mut instance = module.instantiate(backend.clone()).await?;
        let rules = Rules {
            source: source.to_owned(),
            text: file.guest_text,
            pools: backend.pool_names(),
            node: node.to_owned(),
        };
        if let Err(e) = instance.configure(&rules).await? {
            return Err(anyhow!("{source}: {}", RulesError { line: e.line, key: e.key, message: e.message }));
        }
        Ok(Host { instance, backend })
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
}
