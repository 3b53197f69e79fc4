//! [`SqlBackend`] over PostgreSQL: one deadpool pool per configured pool name (TLS with rustls),
//! statements prepared once per connection. By concern: this module the pools, [`transaction`]
//! a guest's transaction on one connection, [`statements`] running a statement and its errors,
//! [`values`] the contract's `value` to and from PostgreSQL's types.

mod statements;
mod transaction;
mod values;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::bindings::{RowSet, SqlError, Value};
use crate::config::{PoolSettings, Tls};
use crate::sql::{SqlBackend, SqlTransaction};
use statements::{execute, innermost_cause, query};
use transaction::PgTransaction;

/// How long a statement waits for a free connection before it fails.
const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(5);

/// Rows one result may have: a guest pages through anything bigger (fetch pages at 500).
pub const MAX_RESULT_ROWS: usize = 100_000;

/// The pools of one rules file.
pub struct PgBackend {
    pools: BTreeMap<String, (PoolSettings, Pool)>,
}

impl PgBackend {
    /// Builds the pools, taking over those of `previous` whose settings are the same (with their
    /// open connections). Connections are opened on first use, so this does not fail when the
    /// server is down.
    pub fn new(settings: &BTreeMap<String, PoolSettings>, previous: Option<&PgBackend>) -> anyhow::Result<PgBackend> {
        let pools = settings
            .iter()
            .map(|(name, s)| {
                let kept =
                    previous.and_then(|p| p.pools.get(name)).filter(|(old, _)| old == s).map(|(_, pool)| pool.clone());
                let pool = match kept {
                    Some(pool) => pool,
                    None => build_pool(s)?,
                };
                Ok((name.clone(), (s.clone(), pool)))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(PgBackend { pools })
    }

    pub fn pool(&self, name: &str) -> Result<&Pool, SqlError> {
        self.pools.get(name).map(|(_, pool)| pool).ok_or_else(|| SqlError::NoSuchPool(name.to_owned()))
    }

    pub fn pool_names(&self) -> Vec<String> {
        self.pools.keys().cloned().collect()
    }

    /// A connection of pool `name`. Why there is none names the pool, its address and what
    /// failed, once: `pool pool1 (postgres@127.0.0.1:5432/mqtt): Connection refused (os error 111)`.
    pub async fn connection(&self, name: &str) -> Result<Object, SqlError> {
        let (settings, pool) = self.pools.get(name).ok_or_else(|| SqlError::NoSuchPool(name.to_owned()))?;
        pool.get().await.map_err(|e| {
            let PoolSettings { username, host, port, database, .. } = settings;
            let why = match &e {
                PoolError::Timeout(_) => format!("no connection within {} s", CHECKOUT_TIMEOUT.as_secs()),
                // The innermost cause says what failed; the layers above it repeat one another.
                _ => innermost_cause(&e),
            };
            SqlError::Connection(format!("pool {name} ({username}@{host}:{port}/{database}): {why}"))
        })
    }
}

fn build_pool(s: &PoolSettings) -> anyhow::Result<Pool> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(&s.host)
        .port(s.port)
        .user(&s.username)
        .dbname(&s.database)
        .application_name("mqtt-offline-host")
        .options(format!("-c statement_timeout={}s", s.statement_timeout_secs))
        .connect_timeout(CHECKOUT_TIMEOUT);
    if let Some(password) = &s.password {
        config.password(password);
    }
    let manager_config = ManagerConfig { recycling_method: RecyclingMethod::Fast };
    let manager = match &s.tls {
        Tls::Off => Manager::from_config(config, NoTls, manager_config),
        Tls::On { cacertfile } => {
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
            Manager::from_config(config, tls_connector(cacertfile.as_deref())?, manager_config)
        }
    };
    Ok(Pool::builder(manager)
        .max_size(s.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(CHECKOUT_TIMEOUT))
        .create_timeout(Some(CHECKOUT_TIMEOUT))
        .build()?)
}

/// TLS that checks the server's certificate (and name) against `cacertfile`, or the public roots.
fn tls_connector(cacertfile: Option<&str>) -> anyhow::Result<tokio_postgres_rustls::MakeRustlsConnect> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    let mut roots = rustls::RootCertStore::empty();
    match cacertfile {
        Some(path) => {
            for certificate in CertificateDer::pem_file_iter(path).with_context(|| format!("reading CA file {path}"))? {
                roots.add(certificate.with_context(|| format!("reading CA file {path}"))?)?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

#[async_trait]
impl SqlBackend for PgBackend {
    async fn query(&self, pool: &str, statement: &str, params: &[Value]) -> Result<RowSet, SqlError> {
        let client = self.connection(pool).await?;
        query(&client, statement, params).await
    }

    async fn execute(&self, pool: &str, statement: &str, params: &[Value]) -> Result<u64, SqlError> {
        let client = self.connection(pool).await?;
        execute(&client, statement, params).await
    }

    async fn begin(&self, pool: &str) -> Result<Box<dyn SqlTransaction>, SqlError> {
        let client = self.connection(pool).await?;
        Ok(Box::new(PgTransaction::on(client)))
    }
}
