//! The host's half of a rules file: the pool settings (`backend.pgsql.<pool>.<setting>`), and
//! the rest of the text, without them, for the guest.

use std::collections::BTreeMap;
use std::fmt;

use rules_file::{Key, RulesError};
use serde_json::Value;

/// The settings of one connection pool. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct PoolSettings {
    pub host: String,
    pub port: u16,
    pub pool_size: usize,
    pub username: String,
    pub password: Option<String>,
    pub database: String,
    pub tls: Tls,
    /// The server cancels a statement that runs longer.
    pub statement_timeout_secs: u64,
}

/// `ssl` and `ssl_opts.*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tls {
    Off,
    /// TLS required; the server's certificate is checked against `cacertfile` (PEM), or against
    /// the usual public roots when there is none.
    On {
        cacertfile: Option<String>,
    },
}

impl fmt::Debug for PoolSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("pool_size", &self.pool_size)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("database", &self.database)
            .field("tls", &self.tls)
            .field("statement_timeout_secs", &self.statement_timeout_secs)
            .finish()
    }
}

/// A rules file split between host and guest.
#[derive(Debug, Clone)]
pub struct RulesFile {
    /// Pool name to its settings.
    pub pools: BTreeMap<String, PoolSettings>,
    /// The text the guest gets: the file without any pool setting.
    pub guest_text: String,
}

pub const SETTINGS: [&str; 8] =
    ["server", "pool_size", "username", "password", "database", "ssl", "ssl_opts.cacertfile", "statement_timeout"];

/// Below the default per-call deadline of the sandbox, so that a slow statement fails as an SQL
/// error (the rule's error policy applies) before the call itself is stopped.
pub const DEFAULT_STATEMENT_TIMEOUT_SECS: u64 = 5;

/// What a pool takes from the environment where its lines say nothing, as libpq does: `PGHOST`
/// and `PGPORT` (for `server`, or for the port a `server` without one lacks), `PGUSER`,
/// `PGPASSWORD`, `PGDATABASE`. A rules file's own settings always win.
#[derive(Debug, Clone, Default)]
pub struct PoolDefaults {
    pub host: Option<String>,
    pub port: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub database: Option<String>,
}

impl PoolDefaults {
    pub fn from_env() -> PoolDefaults {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        PoolDefaults {
            host: var("PGHOST"),
            port: var("PGPORT"),
            user: var("PGUSER"),
            password: var("PGPASSWORD"),
            database: var("PGDATABASE"),
        }
    }
}

impl RulesFile {
    /// Parses `text`, pools completed from the environment ([`PoolDefaults::from_env`]).
    pub fn parse(text: &str) -> Result<RulesFile, RulesError> {
        RulesFile::parse_with(text, &PoolDefaults::from_env())
    }

    pub fn parse_with(text: &str, defaults: &PoolDefaults) -> Result<RulesFile, RulesError> {
        let mut raw: BTreeMap<String, BTreeMap<String, (Option<u32>, String)>> = BTreeMap::new();
        for entry in rules_file::parse(text)? {
            let Key::Pool { pool, setting } = &entry.kind else { continue };
            if !SETTINGS.contains(&setting.as_str()) {
                return Err(RulesError::new(
                    entry.line,
                    Some(&entry.key),
                    format!("unknown pool setting `{setting}`; known: {}", SETTINGS.join(", ")),
                ));
            }
            let value = match &entry.value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            raw.entry(pool.clone()).or_default().insert(setting.clone(), (entry.line, value));
        }
        let pools = raw
            .into_iter()
            .map(|(name, settings)| Ok((name.clone(), pool_settings(&name, &settings, defaults)?)))
            .collect::<Result<_, RulesError>>()?;
        Ok(RulesFile { pools, guest_text: rules_file::redact_pools(text)? })
    }
}

fn pool_settings(
    pool: &str,
    settings: &BTreeMap<String, (Option<u32>, String)>,
    defaults: &PoolDefaults,
) -> Result<PoolSettings, RulesError> {
    let key = |setting: &str| format!("backend.pgsql.{pool}.{setting}");
    let error = |setting: &str, message: String| {
        let line = settings.get(setting).and_then(|(line, _)| *line);
        RulesError::new(line, Some(&key(setting)), message)
    };
    let get = |setting: &str| settings.get(setting).map(|(_, v)| v.as_str());

    let default_port = match &defaults.port {
        Some(port) => port.parse::<u16>().map_err(|_| {
            error("server", format!("PGPORT `{port}` is not a port (it gives the port this pool does not set)"))
        })?,
        None => 5432,
    };
    let (host, port) = match get("server") {
        Some(server) => match server.rsplit_once(':') {
            Some((host, port)) => {
                (host, port.parse::<u16>().map_err(|_| error("server", format!("bad port in `{server}`")))?)
            }
            None => (server, default_port),
        },
        None => (defaults.host.as_deref().unwrap_or("localhost"), default_port),
    };
    let pool_size = match get("pool_size") {
        None => 8,
        Some(n) => n
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1024).contains(n))
            .ok_or_else(|| error("pool_size", format!("`{n}` is not a pool size from 1 to 1024")))?,
    };
    let cacertfile = get("ssl_opts.cacertfile").map(str::to_owned);
    let tls = match get("ssl") {
        None | Some("false") if cacertfile.is_some() => {
            return Err(error("ssl_opts.cacertfile", "set only with ssl = true".into()));
        }
        None | Some("false") => Tls::Off,
        Some("true") => Tls::On { cacertfile },
        Some(other) => return Err(error("ssl", format!("`{other}` is not true or false"))),
    };
    let statement_timeout_secs = match get("statement_timeout") {
        None => DEFAULT_STATEMENT_TIMEOUT_SECS,
        Some(text) => rules_file::parse_duration(text).map_err(|e| error("statement_timeout", e))?,
    };
    Ok(PoolSettings {
        statement_timeout_secs,
        host: host.trim_matches(['[', ']']).to_owned(),
        port,
        pool_size,
        username: get("username").or(defaults.user.as_deref()).unwrap_or("postgres").to_owned(),
        password: get("password").or(defaults.password.as_deref()).map(str::to_owned),
        database: get("database").or(defaults.database.as_deref()).unwrap_or("mqtt").to_owned(),
        tls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses without the environment's defaults: the tests see only what they write.
    fn parse(text: &str) -> Result<RulesFile, RulesError> {
        RulesFile::parse_with(text, &PoolDefaults::default())
    }

    #[test]
    fn pools_are_read_and_hidden_from_the_guest() {
        let text = "backend.pgsql.pool1.server = 127.0.0.1:5433\n\
                    backend.pgsql.pool1.password = hunter2\n\
                    backend.pgsql.pool1.pool_size = 4\n\
                    backend.pgsql.hook.message.acked.1 = {\"action\": {\"function\": \"on_message_acked\"}, \"pool\": \"pool1\"}\n";
        let file = parse(text).unwrap();
        let pool = &file.pools["pool1"];
        assert_eq!((pool.host.as_str(), pool.port, pool.pool_size), ("127.0.0.1", 5433, 4));
        assert_eq!(pool.password.as_deref(), Some("hunter2"));
        assert!(!format!("{pool:?}").contains("hunter2"));
        assert!(!file.guest_text.contains("hunter2"));
        assert!(file.guest_text.contains("on_message_acked"));
    }

    #[test]
    fn what_a_pool_does_not_set_comes_from_libpqs_environment_variables() {
        let defaults = PoolDefaults {
            host: Some("db.example".into()),
            port: Some("6543".into()),
            user: Some("env-user".into()),
            password: Some("env-secret".into()),
            database: Some("env-db".into()),
        };
        let text = "backend.pgsql.pool1.pool_size = 2\n\
                    backend.pgsql.pool2.server = 10.0.0.1\n\
                    backend.pgsql.pool2.username = file-user\n\
                    backend.pgsql.pool3.server = 10.0.0.2:5433\n\
                    backend.pgsql.pool3.database = file-db\n\
                    backend.pgsql.pool3.password = file-secret\n";
        let file = RulesFile::parse_with(text, &defaults).unwrap();
        let summary = |name: &str| {
            let p = &file.pools[name];
            (p.host.as_str(), p.port, p.username.as_str(), p.password.as_deref(), p.database.as_str())
        };
        assert_eq!(summary("pool1"), ("db.example", 6543, "env-user", Some("env-secret"), "env-db"));
        assert_eq!(summary("pool2"), ("10.0.0.1", 6543, "file-user", Some("env-secret"), "env-db"));
        assert_eq!(summary("pool3"), ("10.0.0.2", 5433, "env-user", Some("file-secret"), "file-db"));
        let bare = RulesFile::parse_with("backend.pgsql.pool1.pool_size = 2\n", &PoolDefaults::default()).unwrap();
        let pool = &bare.pools["pool1"];
        assert_eq!((pool.host.as_str(), pool.port, pool.database.as_str()), ("localhost", 5432, "mqtt"));
    }

    #[test]
    fn bad_settings_name_their_line_and_key() {
        let err = parse("\nbackend.pgsql.pool1.server = h:port\n").unwrap_err();
        assert_eq!((err.line, err.key.as_deref()), (Some(2), Some("backend.pgsql.pool1.server")));
        let err = parse("backend.pgsql.pool1.server = h\nbackend.pgsql.pool1.pool_size = 0\n").unwrap_err();
        assert_eq!(err.line, Some(2));
        let err = parse("backend.pgsql.pool1.srever = h\n").unwrap_err();
        assert!(err.message.contains("unknown pool setting"), "{err}");
        let defaults = PoolDefaults { port: Some("x".into()), ..PoolDefaults::default() };
        let err = RulesFile::parse_with("backend.pgsql.pool1.username = u\n", &defaults).unwrap_err();
        assert!(err.message.contains("PGPORT `x` is not a port"), "{err}");
    }
}
