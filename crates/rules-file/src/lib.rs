//! The grammar of an `emqx_backend_pgsql` rules file, and nothing else.
//!
//! A rules file is either EMQX conf lines:
//!
//! ```text
//! ## a comment
//! backend.pgsql.pool1.server = 127.0.0.1:5432
//! backend.pgsql.hook.message.publish.1 = {"topic": "#", "action": {"function": "on_message_publish"}, "pool": "pool1"}
//! ```
//!
//! or a JSON document with the same keys (hook values are JSON objects, pool values scalars):
//!
//! ```json
//! {"backend.pgsql.pool1.server": "127.0.0.1:5432",
//!  "backend.pgsql.hook.message.publish.1": {"action": {"function": "on_message_publish"}, "pool": "pool1"}}
//! ```
//!
//! Hook entries belong to the guest, pool entries to the host; each interprets its own values.
//! [`redact_pools`] removes the pool entries (and with them every password) before the text goes
//! to a guest.

use std::collections::HashMap;
use std::fmt;

use serde_json::Value;

const PREFIX: &str = "backend.pgsql.";
const HOOK_PREFIX: &str = "backend.pgsql.hook.";

/// What a key names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// `backend.pgsql.hook.<hookpoint>.<index>`: a rule. The hookpoint is not checked here.
    Hook { hookpoint: String, index: u32 },
    /// `backend.pgsql.<pool>.<setting>`: a pool setting.
    Pool { pool: String, setting: String },
}

/// One `key = value` of the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// 1-based line of the key, in conf lines and JSON documents alike.
    pub line: Option<u32>,
    /// The key as written.
    pub key: String,
    pub kind: Key,
    /// A hook's JSON object, or a pool setting as a JSON scalar (conf values are strings).
    pub value: Value,
}

/// A problem and its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RulesError {
    pub line: Option<u32>,
    pub key: Option<String>,
    pub message: String,
}

impl RulesError {
    pub fn new(line: Option<u32>, key: Option<&str>, message: impl Into<String>) -> Self {
        RulesError { line, key: key.map(str::to_owned), message: message.into() }
    }
}

impl fmt::Display for RulesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, &self.key) {
            (Some(line), Some(key)) => write!(f, "line {line}, {key}: {}", self.message),
            (Some(line), None) => write!(f, "line {line}: {}", self.message),
            (None, Some(key)) => write!(f, "{key}: {}", self.message),
            (None, None) => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for RulesError {}

/// True when the text is a JSON document rather than conf lines.
pub fn is_json(text: &str) -> bool {
    text.trim_start().starts_with('{')
}

/// Parses a rules file into its entries, in file order. Checks the grammar only: keys, JSON
/// syntax, duplicates. What a hook or a pool setting means is for its owner to check.
///
/// ```
/// use rules_file::{Key, parse};
///
/// let text = "backend.pgsql.pool1.pool_size = 8\n\
///             backend.pgsql.hook.message.publish.1 = {\"action\": {\"function\": \"on_message_publish\"}}";
/// let entries = parse(text).unwrap();
/// assert_eq!(entries[1].kind, Key::Hook { hookpoint: "message.publish".into(), index: 1 });
/// assert_eq!(entries[1].line, Some(2));
///
/// let error = parse("backend.pgsql.hook.message.publish.1 = {not json").unwrap_err();
/// assert_eq!(error.line, Some(1));
/// ```
pub fn parse(text: &str) -> Result<Vec<Entry>, RulesError> {
    let entries = if is_json(text) { parse_json(text)? } else { parse_conf(text)? };
    let mut seen: HashMap<&str, Option<u32>> = HashMap::new();
    for entry in &entries {
        if let Some(first) = seen.insert(&entry.key, entry.line) {
            let at = first.map(|l| format!(" (first set on line {l})")).unwrap_or_default();
            return Err(RulesError::new(entry.line, Some(&entry.key), format!("duplicate key{at}")));
        }
    }
    Ok(entries)
}

fn parse_conf(text: &str) -> Result<Vec<Entry>, RulesError> {
    let mut entries = Vec::new();
    for (number, raw) in text.lines().enumerate() {
        let line = Some(u32::try_from(number + 1).unwrap_or(u32::MAX));
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let Some((key, value)) = trimmed.split_once('=') else {
            return Err(RulesError::new(line, None, "expected `key = value`"));
        };
        let key = key.trim();
        let value = value.trim();
        let kind = classify(key).map_err(|message| RulesError::new(line, Some(key), message))?;
        let value = match kind {
            Key::Hook { .. } => parse_hook_value(value).map_err(|message| RulesError::new(line, Some(key), message))?,
            Key::Pool { .. } => Value::String(value.to_owned()),
        };
        entries.push(Entry { line, key: key.to_owned(), kind, value });
    }
    Ok(entries)
}

fn parse_hook_value(value: &str) -> Result<Value, String> {
    match serde_json::from_str::<Value>(value) {
        Ok(object @ Value::Object(_)) => Ok(object),
        Ok(_) => Err("a rule must be a JSON object".into()),
        Err(e) => Err(format!("invalid JSON at column {}: {e}", e.column())),
    }
}

/// A JSON document's top-level members in document order, repeated keys included (a map would
/// keep only the last of them).
struct Members(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Members {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Members, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Members;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, Value>()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// The 1-based line of each member's key, found in document order: each key is searched for as a
/// JSON string followed by `:`, after the previous one.
fn member_lines(text: &str, members: &[(String, Value)]) -> Vec<Option<u32>> {
    let mut from = 0;
    members
        .iter()
        .map(|(key, _)| {
            let quoted = serde_json::to_string(key).ok()?;
            let mut at = from;
            let found = loop {
                let start = at + text.get(at..)?.find(&quoted)?;
                let after = start + quoted.len();
                if text[after..].trim_start().starts_with(':') {
                    break start;
                }
                at = after;
            };
            from = found + quoted.len();
            u32::try_from(text[..found].matches('\n').count() + 1).ok()
        })
        .collect()
}

fn parse_json(text: &str) -> Result<Vec<Entry>, RulesError> {
    let Members(members) = serde_json::from_str(text).map_err(|e| {
        let what = match e.is_data() {
            true => "a JSON rules document must be an object".to_owned(),
            false => format!("invalid JSON at column {}: {e}", e.column()),
        };
        RulesError::new(Some(e.line() as u32), None, what)
    })?;
    let lines = member_lines(text, &members);
    let mut entries = Vec::with_capacity(members.len());
    for ((key, value), line) in members.into_iter().zip(lines) {
        let kind = classify(&key).map_err(|message| RulesError::new(line, Some(&key), message))?;
        let well_formed = match kind {
            Key::Hook { .. } => value.is_object(),
            Key::Pool { .. } => value.is_string() || value.is_number() || value.is_boolean(),
        };
        if !well_formed {
            let expected =
                if matches!(kind, Key::Hook { .. }) { "a JSON object" } else { "a string, number or boolean" };
            return Err(RulesError::new(line, Some(&key), format!("the value must be {expected}")));
        }
        entries.push(Entry { line, key, kind, value });
    }
    Ok(entries)
}

fn classify(key: &str) -> Result<Key, String> {
    let expected = "expected backend.pgsql.hook.<hookpoint>.<N> or backend.pgsql.<pool>.<setting>";
    if let Some(rest) = key.strip_prefix(HOOK_PREFIX) {
        let Some((hookpoint, index)) = rest.rsplit_once('.') else {
            return Err(format!("unknown key: {expected}"));
        };
        let index =
            index.parse::<u32>().map_err(|_| format!("the last part of a hook key must be a number, not `{index}`"))?;
        return Ok(Key::Hook { hookpoint: hookpoint.to_owned(), index });
    }
    let Some(rest) = key.strip_prefix(PREFIX) else {
        return Err(format!("unknown key: {expected}"));
    };
    // A setting may have parts of its own (`ssl_opts.cacertfile`).
    match rest.split_once('.') {
        Some((pool, setting)) if is_name(pool) && setting.split('.').all(is_name) => {
            Ok(Key::Pool { pool: pool.to_owned(), setting: setting.to_owned() })
        }
        _ => Err(format!("unknown key: {expected}")),
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The text with every pool entry removed, for a guest. Conf lines are blanked rather than
/// deleted so that line numbers in the guest's errors still point into the operator's file.
pub fn redact_pools(text: &str) -> Result<String, RulesError> {
    if is_json(text) {
        // The hooks, each on the line it had, so that the guest's errors name the operator's lines.
        let mut out = String::from("{");
        let mut line = 1;
        for (n, entry) in parse_json(text)?.into_iter().filter(|e| matches!(e.kind, Key::Hook { .. })).enumerate() {
            if n > 0 {
                out.push(',');
            }
            while line < entry.line.unwrap_or(line) {
                out.push('\n');
                line += 1;
            }
            out.push_str(&serde_json::to_string(&entry.key).unwrap_or_default());
            out.push(':');
            out.push_str(&entry.value.to_string());
        }
        out.push('}');
        return Ok(out);
    }
    let mut out = String::with_capacity(text.len());
    for raw in text.lines() {
        let key = raw.split_once('=').map(|(k, _)| k.trim());
        let is_pool = !raw.trim_start().starts_with('#') && matches!(key.map(classify), Some(Ok(Key::Pool { .. })));
        if !is_pool {
            out.push_str(raw);
        }
        out.push('\n');
    }
    Ok(out)
}

/// `10s`, `30m`, `2h`, `1d`, `1w`, or a sum such as `1h30m`, in seconds.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let bad = || format!("bad duration `{text}`: expected a number and a unit s, m, h, d or w (e.g. 2h)");
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in text.trim().chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 604_800,
            _ => return Err(bad()),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        total = n.checked_mul(unit).and_then(|s| total.checked_add(s)).ok_or_else(bad)?;
        digits.clear();
    }
    if !digits.is_empty() || total == 0 {
        return Err(bad());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONF: &str = "## pools\n\
        backend.pgsql.pool1.server = 127.0.0.1:5432\n\
        backend.pgsql.pool1.password = s3cret=x\n\
        \n\
        backend.pgsql.hook.message.publish.1 = {\"topic\": \"#\", \"action\": {\"function\": \"on_message_publish\"}, \"pool\": \"pool1\"}\n";

    #[test]
    fn conf_lines_become_entries_with_line_numbers() {
        let entries = parse(CONF).unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].kind, Key::Pool { pool: "pool1".into(), setting: "server".into() });
        assert_eq!(entries[1].value, Value::String("s3cret=x".into()), "only the first `=` splits");
        assert_eq!(entries[2].line, Some(5));
        assert_eq!(entries[2].kind, Key::Hook { hookpoint: "message.publish".into(), index: 1 });
        assert_eq!(entries[2].value["pool"], "pool1");
    }

    #[test]
    fn bad_json_names_the_line_and_key() {
        let err = parse("\n\nbackend.pgsql.hook.message.publish.1 = {\"topic\": }\n").unwrap_err();
        assert_eq!(err.line, Some(3));
        assert_eq!(err.key.as_deref(), Some("backend.pgsql.hook.message.publish.1"));
        assert!(err.message.contains("invalid JSON"), "{err}");
    }

    #[test]
    fn unknown_keys_and_missing_equals_are_refused() {
        assert_eq!(parse("listener.tcp = 1883").unwrap_err().line, Some(1));
        assert!(parse("backend.pgsql.hook.message.publish.x = {}").unwrap_err().message.contains("number"));
        assert!(parse("\nbackend.pgsql.pool1.server").unwrap_err().message.contains("key = value"));
    }

    #[test]
    fn duplicate_keys_name_both_lines() {
        let err = parse("backend.pgsql.pool1.server = a\nbackend.pgsql.pool1.server = b\n").unwrap_err();
        assert_eq!(err.line, Some(2));
        assert!(err.message.contains("line 1"), "{err}");
    }

    #[test]
    fn a_json_document_names_lines_and_refuses_a_key_given_twice() {
        let doc = "{\"backend.pgsql.pool1.pool_size\": 8,\n\
                   \"backend.pgsql.hook.message.acked.1\": {\"action\": {\"function\": \"on_message_acked\"}, \"pool\": \"pool1\"},\n\
                   \n\
                   \"backend.pgsql.pool1.pool_size\": 4}";
        let err = parse(doc).unwrap_err();
        assert_eq!((err.line, err.key.as_deref()), (Some(4), Some("backend.pgsql.pool1.pool_size")), "{err}");
        assert!(err.message.contains("duplicate key (first set on line 1)"), "{err}");
        let err = parse("{\"backend.pgsql.pool1.pool_size\": 8,\n \"backend.pgsql.pool1.srever\": {}}").unwrap_err();
        assert_eq!(err.line, Some(2), "{err}");
    }

    #[test]
    fn a_redacted_json_document_keeps_each_hook_on_its_line() {
        let doc = "{\"backend.pgsql.pool1.password\": \"hunter2\",\n\
                   \"backend.pgsql.hook.message.acked.1\": {\"pool\": \"pool1\", \"action\": {\"function\": \"on_message_acked\"}},\n\
                   \"backend.pgsql.pool1.server\": \"h\",\n\
                   \"backend.pgsql.hook.message.publish.1\": {\"pool\": \"pool1\", \"action\": {\"function\": \"on_message_publish\"}}}";
        let redacted = redact_pools(doc).unwrap();
        assert!(!redacted.contains("hunter2"), "{redacted}");
        let lines: Vec<(String, Option<u32>)> =
            parse(&redacted).unwrap().into_iter().map(|e| (e.key, e.line)).collect();
        assert_eq!(
            lines,
            [
                ("backend.pgsql.hook.message.acked.1".to_owned(), Some(2)),
                ("backend.pgsql.hook.message.publish.1".to_owned(), Some(4))
            ]
        );
    }

    #[test]
    fn json_document_has_the_same_keys() {
        let doc = r#"{"backend.pgsql.pool1.pool_size": 8,
                      "backend.pgsql.hook.message.acked.1": {"action": {"function": "on_message_acked"}, "pool": "pool1"}}"#;
        let entries = parse(doc).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries.iter().map(|e| e.line).collect::<Vec<_>>(), [Some(1), Some(2)]);
        let err = parse(r#"{"backend.pgsql.hook.message.acked.1": "on_message_acked"}"#).unwrap_err();
        assert!(err.message.contains("JSON object"), "{err}");
    }

    #[test]
    fn redaction_removes_every_pool_setting_and_keeps_line_numbers() {
        let redacted = redact_pools(CONF).unwrap();
        assert!(!redacted.contains("s3cret"));
        assert!(!redacted.contains("127.0.0.1"));
        assert_eq!(redacted.lines().count(), CONF.lines().count());
        assert_eq!(parse(&redacted).unwrap()[0].line, Some(5));

        let doc = r#"{"backend.pgsql.pool1.password": "s3cret",
                      "backend.pgsql.hook.message.acked.1": {"pool": "pool1"}}"#;
        let redacted = redact_pools(doc).unwrap();
        assert!(!redacted.contains("s3cret"));
        assert_eq!(parse(&redacted).unwrap().len(), 1);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(10));
        assert_eq!(parse_duration("2h"), Ok(7200));
        assert_eq!(parse_duration("1d"), Ok(86_400));
        assert_eq!(parse_duration("1h30m"), Ok(5400));
        for bad in ["", "2", "h", "2x", "0s", "99999999999999999999w"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
