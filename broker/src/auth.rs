//! Who may connect: username and password checked against a password file in the format of
//! Mosquitto's `mosquitto_passwd` (so operators keep their tool and their files), and anonymous
//! clients only when the configuration says so. Reloaded with the rest on SIGHUP.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::{Context, bail};
use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::types::AuthResult;
use sha2::{Digest, Sha512};

use crate::config::AuthConfig;

/// A password as `mosquitto_passwd` stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Hashed {
    /// `$6$salt$hash`: SHA-512 of the password followed by the salt (Mosquitto 1.x, `-H sha512`).
    Sha512 { salt: Vec<u8>, hash: Vec<u8> },
    /// `$7$iterations$salt$hash`: PBKDF2 with HMAC-SHA-512 (Mosquitto 2.0's default).
    Pbkdf2Sha512 { iterations: u32, salt: Vec<u8>, hash: Vec<u8> },
}

impl Hashed {
    fn parse(text: &str) -> anyhow::Result<Hashed> {
        let decode = |field: &str, what: &str| BASE64.decode(field).with_context(|| format!("{what} is not base64"));
        match text.split('$').collect::<Vec<_>>().as_slice() {
            ["", "6", salt, hash] => Ok(Hashed::Sha512 { salt: decode(salt, "salt")?, hash: decode(hash, "hash")? }),
            ["", "7", iterations, salt, hash] => Ok(Hashed::Pbkdf2Sha512 {
                iterations: match iterations.parse() {
                    Ok(n) if (1..=MAX_ITERATIONS).contains(&n) => n,
                    Ok(n) if n > MAX_ITERATIONS => bail!(
                        "iteration count {n} is above {MAX_ITERATIONS}: checking one CONNECT would take that long \
                         (mosquitto_passwd writes 101)"
                    ),
                    _ => bail!("iteration count `{iterations}` is not a positive number"),
                },
                salt: decode(salt, "salt")?,
                hash: decode(hash, "hash")?,
            }),
            _ => bail!("not a mosquitto_passwd hash (`$6$...` or `$7$...`); plain-text passwords are not accepted"),
        }
    }

    fn matches(&self, password: &[u8]) -> bool {
        match self {
            Hashed::Sha512 { salt, hash } => {
                let computed = Sha512::new().chain_update(password).chain_update(salt).finalize();
                same(&computed, hash)
            }
            Hashed::Pbkdf2Sha512 { iterations, salt, hash } => same(&pbkdf2_sha512(password, salt, *iterations), hash),
        }
    }
}

/// The most PBKDF2 iterations a password file may ask for: about 50 ms of one core per CONNECT,
/// a thousand times Mosquitto's default, so that a file cannot make each login a denial of service.
const MAX_ITERATIONS: u32 = 100_000;

/// PBKDF2-HMAC-SHA-512 (RFC 8018), one block: the 64 bytes `mosquitto_passwd` keeps.
fn pbkdf2_sha512(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 64] {
    let mac = Hmac::<Sha512>::new_from_slice(password).expect("HMAC takes a key of any length");
    let mut u: [u8; 64] =
        mac.clone().chain_update(salt).chain_update(1u32.to_be_bytes()).finalize().into_bytes().into();
    let mut block = u;
    for _ in 1..iterations {
        u = mac.clone().chain_update(u).finalize().into_bytes().into();
        block.iter_mut().zip(&u).for_each(|(b, x)| *b ^= x);
    }
    block
}

/// Compares without stopping at the first difference, so that the time taken does not tell
/// how much of a guess was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A password file: `username:hash` per line; empty lines and `#` comments are skipped.
#[derive(Debug, Default)]
pub struct PasswordFile {
    users: HashMap<String, Hashed>,
}

impl PasswordFile {
    pub fn load(path: &Path) -> anyhow::Result<PasswordFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("[auth] password_file: reading {}", path.display()))?;
        PasswordFile::parse(&text).with_context(|| format!("[auth] password_file {}", path.display()))
    }

    fn parse(text: &str) -> anyhow::Result<PasswordFile> {
        let mut users = HashMap::new();
        for (number, line) in text.lines().enumerate() {
            // As Mosquitto reads it: blanks around the username and the hash do not count, and a
            // line without `:` (a comment, say) is skipped.
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let place = || format!("line {}", number + 1);
            let Some((user, hash)) = line.split_once(':') else {
                tracing::warn!("password file, {}: no `:` after a username, skipped", place());
                continue;
            };
            let (user, hash) = (user.trim(), hash.trim());
            let hashed = Hashed::parse(hash).with_context(|| format!("{}: user `{user}`", place()))?;
            if users.insert(user.to_owned(), hashed).is_some() {
                bail!("{}: user `{user}` again", place());
            }
        }
        Ok(PasswordFile { users })
    }

    #[cfg(test)]
    fn check(&self, username: &str, password: &[u8]) -> bool {
        self.users.get(username).is_some_and(|hashed| hashed.matches(password))
    }

    /// The users of `self` that `next` drops or gives another password.
    fn revoked_in(&self, next: &PasswordFile) -> Vec<String> {
        self.users
            .iter()
            .filter(|(user, hashed)| next.users.get(*user) != Some(hashed))
            .map(|(u, _)| u.clone())
            .collect()
    }
}

/// rmqtt's `ClientAuthenticate` hook. rmqtt lets a client without a username in by itself only
/// when the listener allows anonymous clients; every other CONNECT comes here. Clones share the
/// password file (rmqtt owns the registered one, the reload task another).
#[derive(Clone)]
pub struct Authenticator {
    allow_anonymous: bool,
    password_file: Option<PathBuf>,
    passwords: Arc<RwLock<Arc<PasswordFile>>>,
}

impl Authenticator {
    pub fn load(config: &AuthConfig) -> anyhow::Result<Authenticator> {
        let passwords = match &config.password_file {
            Some(path) => PasswordFile::load(path)?,
            None => PasswordFile::default(),
        };
        Ok(Authenticator {
            allow_anonymous: config.allow_anonymous,
            password_file: config.password_file.clone(),
            passwords: Arc::new(RwLock::new(Arc::new(passwords))),
        })
    }

    /// Reads the password file again; a file that does not parse leaves the running one. Clients
    /// connected as a user the new file drops, or gives another password, are disconnected:
    /// revoking a user takes effect at once.
    pub async fn reload(&self, why: &str, scx: &ServerContext) {
        let Some(path) = &self.password_file else { return };
        let next = match PasswordFile::load(path) {
            Ok(next) => Arc::new(next),
            Err(e) => return tracing::error!("password file reload ({why}) refused, the running one stays: {e:#}"),
        };
        let previous = std::mem::replace(&mut *self.passwords.write().unwrap_or_else(|p| p.into_inner()), next.clone());
        let revoked = previous.revoked_in(&next);
        tracing::info!(revoked = revoked.len(), "password file reloaded ({why})");
        if revoked.is_empty() {
            return;
        }
        crate::disconnect_clients(scx, |id| {
            id.username.as_ref().is_some_and(|user| revoked.iter().any(|r| **r == **user))
        })
        .await;
    }

    async fn authenticate(&self, username: Option<&str>, password: Option<&[u8]>) -> AuthResult {
        let Some(username) = username else {
            // Only reached when anonymous clients are refused (see above).
            return AuthResult::NotAuthorized;
        };
        if self.password_file.is_none() {
            // Anonymous access allowed and no password file: a username is a name, not a claim.
            return if self.allow_anonymous { AuthResult::Allow(false, None) } else { AuthResult::NotAuthorized };
        }
        let Some(hashed) = self.passwords.read().unwrap_or_else(|p| p.into_inner()).users.get(username).cloned() else {
            return AuthResult::BadUsernameOrPassword;
        };
        // Hashing takes a while by design: off the broker's threads, no lock held.
        let password = password.unwrap_or_default().to_vec();
        match tokio::task::spawn_blocking(move || hashed.matches(&password)).await {
            Ok(true) => AuthResult::Allow(false, None),
            _ => AuthResult::BadUsernameOrPassword,
        }
    }
}

#[async_trait]
impl Handler for Authenticator {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        let Parameter::ClientAuthenticate(connect) = param else { return (true, acc) };
        let password = connect.password().map(|p| &p[..]);
        let result = self.authenticate(connect.username().map(|u| &**u), password).await;
        if !matches!(result, AuthResult::Allow(..)) {
            tracing::info!(clientid = %connect.id().client_id, username = ?connect.username(), "connection refused: {result:?}");
        }
        (false, Some(HookResult::AuthResult(result)))
    }
}

/// The hook type [`Authenticator`] handles.
pub const TYPE: Type = Type::ClientAuthenticate;

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by Debian's `mosquitto_passwd` 2.0.11: alice (`$7$`, the default) with `secret`,
    /// bob (`-H sha512`) with `hunter2`.
    const FILE: &str = "alice:$7$101$nbTwv7IsnRTMuLbf$/DAVeVQJwEOK6kldTfPxxbv2yKuJuX/XpVD+Km344CuTSLLSUqC7nBf5Z9M1v2moYheFDSDpbps4dKlsAidSHg==\n\
                        bob:$6$d2rxsq31HJqfPCdL$nG/NiYQDOZDW+BcToXd9VaK5SgfpUM8S2whaSpJCZH2QAtXmz9eiemIshjTIopJOpZfBxtKWLjwrBdSBZSMJhw==\n";

    #[test]
    fn passwords_written_by_mosquitto_passwd_check_and_wrong_ones_do_not() {
        let file = PasswordFile::parse(FILE).unwrap();
        assert!(file.check("alice", b"secret"));
        assert!(file.check("bob", b"hunter2"));
        assert!(!file.check("alice", b"hunter2"));
        assert!(!file.check("bob", b"secret"));
        assert!(!file.check("carol", b"secret"));
        assert!(!file.check("alice", b""));
    }

    #[test]
    fn blanks_comments_and_lines_without_a_colon_are_read_as_mosquitto_reads_them() {
        let padded = FILE.replace("alice:", "  alice :").replace("==\n", "==  \r\n");
        let file = PasswordFile::parse(&format!("  # indented comment\nnot a user line\n{padded}")).unwrap();
        assert!(file.check("alice", b"secret") && file.check("bob", b"hunter2"));
    }

    #[test]
    fn a_reload_revokes_the_users_it_drops_or_changes() {
        let before = PasswordFile::parse(FILE).unwrap();
        let bob_only = PasswordFile::parse(FILE.lines().nth(1).unwrap()).unwrap();
        assert_eq!(before.revoked_in(&bob_only), ["alice"]);
        let bob_changed = PasswordFile::parse(&FILE.replace("bob:$6$d2rx", "bob:$6$e2rx")).unwrap();
        assert_eq!(before.revoked_in(&bob_changed), ["bob"]);
        assert!(before.revoked_in(&PasswordFile::parse(FILE).unwrap()).is_empty());
    }

    #[test]
    fn a_bad_line_is_refused_naming_its_line_and_user() {
        for (text, wanted) in [
            ("# users\n\nalice:plain\n", "line 3: user `alice`"),
            ("a:$7$1000000$c2FsdA==$aGFzaA==\n", "iteration count 1000000 is above 100000"),
            ("a:$7$x$c2FsdA==$aGFzaA==\n", "iteration count `x`"),
            ("a:$6$!!$aGFzaA==\n", "salt is not base64"),
            ("a:$6$c2FsdA==$aGFzaA==\na:$6$c2FsdA==$aGFzaA==\n", "line 2: user `a` again"),
        ] {
            let error = format!("{:#}", PasswordFile::parse(text).unwrap_err());
            assert!(error.contains(wanted), "{text:?}: {error}");
        }
    }
}
