//! [`SqlBackend`] over PostgreSQL: one deadpool pool per configured pool name, statements
//! prepared once per connection, values converted to and from the contract's `value`.

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime};
use futures::future::try_join_all;
use futures::{StreamExt, TryStreamExt};
use postgres_types::{FromSql, IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::types::private::BytesMut;
use tokio_postgres::{NoTls, Row, Statement};

use crate::bindings::{DatabaseError, RowSet, SqlError, Value};
use crate::config::{PoolSettings, Tls};
use crate::sql::{SqlBackend, SqlTransaction};

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
        Ok(Box::new(PgTransaction { client: Some(client), begun: false }))
    }
}

/// A transaction held on one pooled connection. `BEGIN` goes out with the first statement, in
/// the same round trip (tokio-postgres pipelines requests made together).
struct PgTransaction {
    /// `None` once committed or rolled back.
    client: Option<Object>,
    /// Whether `BEGIN` was sent.
    begun: bool,
}

impl PgTransaction {
    fn client(&self) -> Result<&Object, SqlError> {
        self.client.as_ref().ok_or_else(|| SqlError::Connection("transaction already ended".into()))
    }

    /// Runs `work` on the connection, preceded by `BEGIN` the first time.
    async fn run<T>(&mut self, work: impl AsyncFnOnce(&Object) -> Result<T, SqlError>) -> Result<T, SqlError> {
        let begin = !self.begun;
        self.begun = true;
        let client = self.client()?;
        if !begin {
            return work(client).await;
        }
        // Polled in this order, BEGIN is sent before the statement.
        let (begun, result) = futures::join!(client.batch_execute("BEGIN"), work(client));
        begun.map_err(sql_error)?;
        result
    }
}

#[async_trait]
impl SqlTransaction for PgTransaction {
    async fn query(&mut self, statement: &str, params: &[Value]) -> Result<RowSet, SqlError> {
        self.run(async |client| query(client, statement, params).await).await
    }

    async fn execute(&mut self, statement: &str, params: &[Value]) -> Result<u64, SqlError> {
        self.run(async |client| execute(client, statement, params).await).await
    }

    async fn query_batch(&mut self, statement: &str, params: &[Vec<Value>]) -> Result<Vec<RowSet>, SqlError> {
        self.run(async |client| {
            let prepared = prepare(client, statement).await?;
            let bound: Vec<Vec<Param<'_>>> = params.iter().map(|p| bind(&prepared, p)).collect::<Result<_, _>>()?;
            let bound_refs: Vec<Vec<&(dyn ToSql + Sync)>> = bound.iter().map(|p| refs(p)).collect();
            // Polled together, the queries are pipelined on the connection: one round trip.
            let results =
                try_join_all(bound_refs.iter().map(|p| client.query(&prepared, p))).await.map_err(sql_error)?;
            results.into_iter().map(|rows| row_set(&prepared, rows)).collect::<Result<_, _>>()
        })
        .await
    }

    async fn commit(mut self: Box<Self>) -> Result<(), SqlError> {
        let client = self.client.take().ok_or_else(|| SqlError::Connection("transaction already ended".into()))?;
        if !self.begun {
            return Ok(());
        }
        client.batch_execute("COMMIT").await.map_err(sql_error)
    }

    async fn rollback(mut self: Box<Self>) {
        if let Some(client) = self.client.take()
            && self.begun
            && client.batch_execute("ROLLBACK").await.is_err()
        {
            // The connection's state is unknown: never hand it to another caller.
            let _ = Object::take(client);
        }
    }
}

impl Drop for PgTransaction {
    /// A transaction dropped without commit or rollback (its guest trapped) must not return an
    /// open transaction to the pool: detach the connection, which closes it.
    fn drop(&mut self) {
        if let Some(client) = self.client.take()
            && self.begun
        {
            let _ = Object::take(client);
        }
    }
}

async fn prepare(client: &Object, statement: &str) -> Result<Statement, SqlError> {
    client.prepare_cached(statement).await.map_err(sql_error)
}

async fn query(client: &Object, statement: &str, params: &[Value]) -> Result<RowSet, SqlError> {
    let prepared = prepare(client, statement).await?;
    let bound = bind(&prepared, params)?;
    // Streamed, so that a result past the cap is refused before it is all in memory.
    let stream = client.query_raw(&prepared, refs(&bound)).await.map_err(sql_error)?;
    let rows: Vec<Row> = stream.take(MAX_RESULT_ROWS + 1).try_collect().await.map_err(sql_error)?;
    row_set(&prepared, rows)
}

async fn execute(client: &Object, statement: &str, params: &[Value]) -> Result<u64, SqlError> {
    let prepared = prepare(client, statement).await?;
    let bound = bind(&prepared, params)?;
    client.execute(&prepared, &refs(&bound)[..]).await.map_err(sql_error)
}

fn bind<'a>(statement: &Statement, params: &'a [Value]) -> Result<Vec<Param<'a>>, SqlError> {
    if statement.params().len() != params.len() {
        return Err(SqlError::InvalidParameter(format!(
            "the statement has {} parameters but {} values were given",
            statement.params().len(),
            params.len()
        )));
    }
    Ok(params.iter().map(Param).collect())
}

fn refs<'a>(params: &'a [Param<'a>]) -> Vec<&'a (dyn ToSql + Sync)> {
    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
}

fn sql_error(e: tokio_postgres::Error) -> SqlError {
    if let Some(db) = e.as_db_error() {
        return SqlError::Database(DatabaseError {
            code: db.code().code().to_owned(),
            message: db.message().to_owned(),
            detail: db.detail().map(str::to_owned),
        });
    }
    // A parameter that could not be converted carries our own message as its source.
    if let Some(source) = e.source()
        && e.to_string().starts_with("error serializing parameter")
    {
        return SqlError::InvalidParameter(format!("{e}: {source}"));
    }
    SqlError::Connection(with_causes(&e))
}

/// An error and its causes on one line: "error performing TLS handshake: invalid peer certificate: UnknownIssuer".
fn innermost_cause(e: &dyn StdError) -> String {
    let mut innermost = e;
    while let Some(cause) = innermost.source() {
        innermost = cause;
    }
    innermost.to_string()
}

fn with_causes(e: &dyn StdError) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let part = c.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = c.source();
    }
    text
}

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// A contract value bound to a parameter, converted to the type the server inferred for it.
#[derive(Debug)]
struct Param<'a>(&'a Value);

type BoxError = Box<dyn StdError + Sync + Send>;

impl ToSql for Param<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        let mismatch = || -> BoxError {
            format!("cannot bind {} to a parameter of type {ty}; cast it in SQL", kind(self.0)).into()
        };
        match self.0 {
            Value::Null => Ok(IsNull::Yes),
            Value::Boolean(b) => match *ty {
                Type::BOOL => b.to_sql(ty, out),
                Type::INT2 | Type::INT4 | Type::INT8 => integer_to_sql(i64::from(*b), ty, out),
                _ => Err(mismatch()),
            },
            Value::Int32(v) => integer_to_sql(i64::from(*v), ty, out),
            Value::Int64(v) => integer_to_sql(*v, ty, out),
            Value::Float64(v) => match *ty {
                Type::FLOAT8 => v.to_sql(ty, out),
                Type::FLOAT4 => (*v as f32).to_sql(ty, out),
                _ => Err(mismatch()),
            },
            Value::Text(s) => text_to_sql(s, ty, out).ok_or_else(mismatch)?,
            Value::Bytes(b) => match *ty {
                Type::BYTEA => b.as_slice().to_sql(ty, out),
                _ => match std::str::from_utf8(b) {
                    Ok(s) => text_to_sql(s, ty, out).ok_or_else(mismatch)?,
                    Err(_) => Err(format!("cannot bind non-UTF-8 bytes to a parameter of type {ty}").into()),
                },
            },
            Value::Timestamp(micros) => match *ty {
                Type::TIMESTAMPTZ | Type::TIMESTAMP => {
                    out.extend_from_slice(&(micros - PG_EPOCH_MICROS).to_be_bytes());
                    Ok(IsNull::No)
                }
                _ => Err(mismatch()),
            },
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

fn integer_to_sql(v: i64, ty: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
    let out_of_range = || -> BoxError { format!("{v} is out of range for type {ty}").into() };
    match *ty {
        Type::INT2 => i16::try_from(v).map_err(|_| out_of_range())?.to_sql(ty, out),
        Type::INT4 => i32::try_from(v).map_err(|_| out_of_range())?.to_sql(ty, out),
        Type::INT8 => v.to_sql(ty, out),
        Type::OID => u32::try_from(v).map_err(|_| out_of_range())?.to_sql(ty, out),
        Type::FLOAT8 => (v as f64).to_sql(ty, out),
        Type::TEXT | Type::VARCHAR => v.to_string().to_sql(ty, out),
        _ => Err(format!("cannot bind an integer to a parameter of type {ty}; cast it in SQL").into()),
    }
}

/// Text goes to text-like types as is, and to json/jsonb as their wire format. `None` for a
/// type text does not convert to.
fn text_to_sql(s: &str, ty: &Type, out: &mut BytesMut) -> Option<Result<IsNull, BoxError>> {
    match *ty {
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => Some(s.to_sql(&Type::TEXT, out)),
        Type::JSON => {
            out.extend_from_slice(s.as_bytes());
            Some(Ok(IsNull::No))
        }
        Type::JSONB => {
            out.extend_from_slice(&[1]); // jsonb wire format version
            out.extend_from_slice(s.as_bytes());
            Some(Ok(IsNull::No))
        }
        Type::BYTEA => Some(s.as_bytes().to_sql(ty, out)),
        _ => None,
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Boolean(_) => "a boolean",
        Value::Int32(_) | Value::Int64(_) => "an integer",
        Value::Float64(_) => "a float",
        Value::Text(_) => "text",
        Value::Bytes(_) => "bytes",
        Value::Timestamp(_) => "a timestamp",
    }
}

/// A result cell of any type, read as a contract value.
struct Cell(Value);

impl<'a> FromSql<'a> for Cell {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Cell, BoxError> {
        let value = match *ty {
            Type::BOOL => Value::Boolean(bool::from_sql(ty, raw)?),
            Type::INT2 => Value::Int32(i32::from(i16::from_sql(ty, raw)?)),
            Type::INT4 => Value::Int32(i32::from_sql(ty, raw)?),
            Type::INT8 => Value::Int64(i64::from_sql(ty, raw)?),
            Type::OID => Value::Int64(i64::from(u32::from_sql(ty, raw)?)),
            Type::FLOAT4 => Value::Float64(f64::from(f32::from_sql(ty, raw)?)),
            Type::FLOAT8 => Value::Float64(f64::from_sql(ty, raw)?),
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN | Type::JSON => {
                Value::Text(String::from_utf8(raw.to_vec())?)
            }
            Type::JSONB => Value::Text(String::from_utf8(raw.get(1..).unwrap_or_default().to_vec())?),
            Type::BYTEA => Value::Bytes(raw.to_vec()),
            Type::TIMESTAMPTZ | Type::TIMESTAMP => Value::Timestamp(i64::from_sql(&Type::INT8, raw)? + PG_EPOCH_MICROS),
            _ => return Err(format!("type {ty} has no contract value; cast the column (e.g. ::text)").into()),
        };
        Ok(Cell(value))
    }

    fn from_sql_null(_: &Type) -> Result<Cell, BoxError> {
        Ok(Cell(Value::Null))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

fn row_set(statement: &Statement, rows: Vec<Row>) -> Result<RowSet, SqlError> {
    if rows.len() > MAX_RESULT_ROWS {
        return Err(SqlError::TooLarge(format!("the result has more than {MAX_RESULT_ROWS} rows; page it (LIMIT)")));
    }
    let columns: Vec<String> = statement.columns().iter().map(|c| c.name().to_owned()).collect();
    let rows = rows
        .iter()
        .map(|row| {
            (0..columns.len())
                .map(|i| {
                    row.try_get::<_, Cell>(i).map(|cell| cell.0).map_err(|e| {
                        SqlError::UnsupportedType(format!(
                            "column {}: {}",
                            columns[i],
                            e.source().map_or(e.to_string(), |s| s.to_string())
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RowSet { columns, rows })
}
