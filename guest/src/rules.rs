//! What the hook entries of a rules file mean: hookpoints, actions, functions and their options.
//! The file's grammar is `rules_file`'s; this module turns each hook entry into a [`Rule`] and
//! refuses anything it cannot run, naming the line and key.

use serde_json::{Map, Value};

use crate::functions;
use crate::hookpoint::Hookpoint;
use crate::template::Statement;
use crate::topic;
use rules_file::{Key, RulesError, parse_duration};

/// The built-in functions of emqx_backend_pgsql.
#[derive(Debug, Clone, PartialEq)]
pub enum Function {
    /// `mqtt_client`: online, with node and time.
    ClientConnected,
    /// `mqtt_client`: offline, with time.
    ClientDisconnected,
    /// The client's stored subscriptions (`mqtt_sub`), for the host to apply.
    SubscribeLookup,
    /// Hand a subscriber the stored messages it has not read yet.
    MessageFetch(OfflineOpts),
    /// Hand a subscriber the retained messages its filter matches.
    RetainLookup,
    /// Store QoS 1/2 messages; the stored id travels with the message.
    MessagePublish(StoreOpts),
    /// Store every message, QoS 0 included, for archive use; no id travels.
    MessageStore(StoreOpts),
    /// Keep a retained message with a payload as its topic's retained message.
    MessageRetain,
    /// A retained message with an empty payload deletes its topic's retained message.
    RetainDelete,
    /// Move a subscriber's read position to an acked message.
    MessageAcked,
}

impl Function {
    /// The function and its name as the table spells it.
    fn parse(name: &str, hookpoint: Hookpoint) -> Result<(Function, &'static str), String> {
        let Some(builtin) = functions::ALL.iter().find(|b| b.name == name) else {
            let known: Vec<&str> = functions::ALL.iter().map(|b| b.name).collect();
            return Err(format!("unknown function `{name}`; known: {}", known.join(", ")));
        };
        if builtin.hookpoint != hookpoint {
            let home = builtin.hookpoint.name();
            return Err(format!("function `{name}` belongs on hookpoint {home}, not {}", hookpoint.name()));
        }
        Ok(((builtin.function)(), builtin.name))
    }
}

/// `offline_opts` of on_message_fetch.
#[derive(Debug, Clone, PartialEq)]
pub struct OfflineOpts {
    /// Page size: how many messages one fetch returns. The whole backlog still arrives, page by page.
    pub max_returned_count: u32,
    /// Page budget in payload bytes: a page stops before the message that would take it past
    /// this, so a page's memory is bounded in bytes as well as in messages. A message larger
    /// than the budget comes in a page of its own.
    pub max_returned_bytes: u64,
    /// Only messages that arrived within this many seconds are fetched.
    pub time_range_secs: Option<u64>,
    /// Where a first subscription starts reading.
    pub first_fetch: FirstFetch,
    /// `tick` deletes read positions not used (subscribed or acked) for this many seconds: a
    /// subscriber away longer starts again as a new one. None (the default, as EMQX): kept.
    pub position_idle_secs: Option<u64>,
}

/// EMQX's example value; a page size, so it bounds memory, not what is delivered.
pub const DEFAULT_PAGE_SIZE: u32 = 500;

/// 4 MiB: with the host's default guest memory of 64 MiB, a page and a message of the largest
/// size a listener accepts by default fit many times over.
pub const DEFAULT_PAGE_BYTES: u64 = 4 << 20;

impl Default for OfflineOpts {
    fn default() -> Self {
        OfflineOpts {
            max_returned_count: DEFAULT_PAGE_SIZE,
            max_returned_bytes: DEFAULT_PAGE_BYTES,
            time_range_secs: None,
            first_fetch: FirstFetch::Latest,
            position_idle_secs: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstFetch {
    /// After the newest stored message (EMQX): what came before the subscription is not offline.
    Latest,
    /// Every stored message still within `time_range`.
    Earliest,
}

/// Options of the storing functions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoreOpts {
    /// Messages older than this many seconds are deleted by `tick`.
    pub retention_secs: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Function(Function),
    /// Statements run in order, in one transaction.
    Sql(Vec<Statement>),
}

/// One `backend.pgsql.hook.<hookpoint>.<N>` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// The key as written, to name the rule in errors and logs.
    pub key: String,
    pub hookpoint: Hookpoint,
    pub index: u32,
    /// Which events fire the rule: matched against the subscription filter (session hooks) or
    /// the topic (message hooks). `None` fires on every event.
    pub topic: Option<String>,
    pub pool: String,
    pub action: Action,
    pub on_error: OnError,
    /// What metrics call this rule: its function's name, or `sql`.
    pub metric_name: &'static str,
}

/// What a failing rule does to its event (`"on_error"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// The hook fails: a message is reported not stored (the broker must not accept it).
    Reject,
    /// The error is logged and the event goes on as if the rule had not fired (fail-open).
    Ignore,
}

impl Rule {
    /// Whether this rule fires for an event about `topic` (a filter or a topic name).
    /// A shared subscription (`$share/<group>/<filter>`) counts as its filter.
    pub fn fires_for(&self, topic: &str) -> bool {
        let topic = topic::shared(topic).map_or(topic, |(_, filter)| filter);
        self.topic.as_deref().is_none_or(|filter| topic::matches(filter, topic))
    }
}

/// Every rule of a rules file, per hookpoint, in `N` order.
#[derive(Debug, Default)]
pub struct Rules {
    by_hookpoint: [Vec<Rule>; 7],
}

impl Rules {
    pub fn parse(text: &str, pools: &[String]) -> Result<Rules, RulesError> {
        let mut rules = Rules::default();
        for entry in rules_file::parse(text)? {
            let Key::Hook { hookpoint, index } = &entry.kind else {
                continue; // pool settings are the host's
            };
            let at = |message: String| RulesError::new(entry.line, Some(&entry.key), message);
            let hookpoint = Hookpoint::from_name(hookpoint).ok_or_else(|| {
                let known: Vec<_> = Hookpoint::ALL.iter().map(|h| h.name()).collect();
                at(format!("unknown hookpoint `{hookpoint}`; known: {}", known.join(", ")))
            })?;
            let Value::Object(object) = &entry.value else {
                return Err(at("a rule must be a JSON object".into()));
            };
            let rule = parse_rule(object, &entry.key, hookpoint, *index, pools).map_err(at)?;
            rules.by_hookpoint[hookpoint as usize].push(rule);
        }
        for list in &mut rules.by_hookpoint {
            list.sort_by_key(|rule| rule.index);
        }
        Ok(rules)
    }

    pub fn for_hookpoint(&self, hookpoint: Hookpoint) -> &[Rule] {
        &self.by_hookpoint[hookpoint as usize]
    }

    /// What these rules act on, for `configure`'s answer: each hookpoint with a rule, and the
    /// topic filters its rules fire for (None when one of them fires for every event). A host
    /// skips the calls of hookpoints not named, and message hooks for topics no filter matches.
    pub fn interest(&self) -> Vec<(Hookpoint, Option<Vec<String>>)> {
        Hookpoint::ALL
            .into_iter()
            .filter(|&hookpoint| !self.for_hookpoint(hookpoint).is_empty())
            .map(|hookpoint| {
                let mut filters = Vec::new();
                for rule in self.for_hookpoint(hookpoint) {
                    let Some(filter) = &rule.topic else { return (hookpoint, None) };
                    if !filters.contains(filter) {
                        filters.push(filter.clone());
                    }
                }
                (hookpoint, Some(filters))
            })
            .collect()
    }

    /// The on_message_fetch rule that serves a subscription to `filter`: the first that fires.
    /// Chosen anew for every page, so that a backlog survives a reload that renumbers or edits
    /// the rules: it goes on from where it is with the rule now in force.
    pub fn fetch_rule(&self, filter: &str) -> Option<(&Rule, &OfflineOpts)> {
        self.for_hookpoint(Hookpoint::SessionSubscribed).iter().filter(|rule| rule.fires_for(filter)).find_map(|rule| {
            match &rule.action {
                Action::Function(Function::MessageFetch(opts)) => Some((rule, opts)),
                _ => None,
            }
        })
    }
}

const RULE_KEYS: [&str; 6] = ["topic", "action", "pool", "offline_opts", "retention", "on_error"];

fn parse_rule(
    object: &Map<String, Value>,
    key: &str,
    hookpoint: Hookpoint,
    index: u32,
    pools: &[String],
) -> Result<Rule, String> {
    if let Some(unknown) = object.keys().find(|k| !RULE_KEYS.contains(&k.as_str())) {
        return Err(format!("unknown field `{unknown}`; a rule has {}", RULE_KEYS.join(", ")));
    }
    let topic = match object.get("topic") {
        None => None,
        Some(Value::String(filter)) => {
            topic::validate_filter(filter).map_err(|e| format!("topic: {e}"))?;
            Some(filter.clone())
        }
        Some(_) => return Err("topic must be a string (a topic filter)".into()),
    };
    let pool = match object.get("pool") {
        Some(Value::String(pool)) if pools.contains(pool) => pool.clone(),
        Some(Value::String(pool)) => {
            return Err(format!(
                "pool `{pool}` is not defined (define backend.pgsql.{pool}.server and the other pool settings)"
            ));
        }
        Some(_) => return Err("pool must be a string".into()),
        None => return Err("missing field `pool`".into()),
    };
    let (mut action, metric_name) = match object.get("action") {
        Some(Value::Object(action)) => parse_action(action, hookpoint)?,
        Some(_) => return Err("action must be an object: {\"function\": ...} or {\"sql\": [...]}".into()),
        None => return Err("missing field `action`".into()),
    };
    if let Some(opts) = object.get("offline_opts") {
        let Action::Function(Function::MessageFetch(fetch_opts)) = &mut action else {
            return Err("offline_opts applies only to the on_message_fetch function".into());
        };
        *fetch_opts = parse_offline_opts(opts)?;
    }
    if let Some(retention) = object.get("retention") {
        let (Action::Function(Function::MessagePublish(store_opts))
        | Action::Function(Function::MessageStore(store_opts))) = &mut action
        else {
            return Err("retention applies only to on_message_publish and on_message_store".into());
        };
        let text = retention.as_str().ok_or("retention must be a string such as \"7d\"")?;
        store_opts.retention_secs = Some(parse_duration(text).map_err(|e| format!("retention: {e}"))?);
    }
    let on_error = match object.get("on_error").map(|v| v.as_str()) {
        None | Some(Some("reject")) => OnError::Reject,
        Some(Some("ignore")) => OnError::Ignore,
        Some(_) => return Err("on_error must be \"reject\" (the default) or \"ignore\"".into()),
    };
    Ok(Rule { key: key.to_owned(), hookpoint, index, topic, pool, action, on_error, metric_name })
}

fn parse_action(action: &Map<String, Value>, hookpoint: Hookpoint) -> Result<(Action, &'static str), String> {
    match (action.get("function"), action.get("sql")) {
        (Some(_), Some(_)) => Err("action has both `function` and `sql`; a rule does one".into()),
        (Some(Value::String(name)), None) => {
            let (function, name) = Function::parse(name, hookpoint)?;
            Ok((Action::Function(function), name))
        }
        (Some(_), None) => Err("action.function must be a string".into()),
        (None, Some(sql)) => {
            let texts: Vec<&str> = match sql {
                Value::String(one) => vec![one.as_str()],
                Value::Array(many) => {
                    many.iter().map(|v| v.as_str().ok_or("action.sql must hold strings")).collect::<Result<_, _>>()?
                }
                _ => return Err("action.sql must be a string or a list of strings".into()),
            };
            if texts.is_empty() {
                return Err("action.sql is empty".into());
            }
            let statements = texts
                .iter()
                .enumerate()
                .map(|(i, text)| Statement::compile(text, hookpoint).map_err(|e| format!("action.sql[{i}]: {e}")))
                .collect::<Result<_, _>>()?;
            Ok((Action::Sql(statements), "sql"))
        }
        (None, None) => Err("action needs `function` or `sql`".into()),
    }
}

fn parse_offline_opts(opts: &Value) -> Result<OfflineOpts, String> {
    let Value::Object(opts) = opts else {
        return Err("offline_opts must be an object".into());
    };
    let mut parsed = OfflineOpts::default();
    for (name, value) in opts {
        match name.as_str() {
            "max_returned_count" => {
                parsed.max_returned_count = value
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|n| *n > 0)
                    .ok_or("offline_opts.max_returned_count must be a whole number above 0")?;
            }
            "max_returned_bytes" => {
                parsed.max_returned_bytes = value
                    .as_u64()
                    .filter(|n| *n > 0)
                    .ok_or("offline_opts.max_returned_bytes must be a whole number of bytes above 0")?;
            }
            "time_range" => {
                let text = value.as_str().ok_or("offline_opts.time_range must be a string such as \"2h\"")?;
                parsed.time_range_secs =
                    Some(parse_duration(text).map_err(|e| format!("offline_opts.time_range: {e}"))?);
            }
            "first_fetch" => {
                parsed.first_fetch = match value.as_str() {
                    Some("latest") => FirstFetch::Latest,
                    Some("earliest") => FirstFetch::Earliest,
                    _ => return Err("offline_opts.first_fetch must be \"latest\" or \"earliest\"".into()),
                };
            }
            "position_idle" => {
                let text = value.as_str().ok_or("offline_opts.position_idle must be a string such as \"30d\"")?;
                parsed.position_idle_secs =
                    Some(parse_duration(text).map_err(|e| format!("offline_opts.position_idle: {e}"))?);
            }
            other => {
                return Err(format!(
                    "unknown field offline_opts.{other}; known: max_returned_count, max_returned_bytes, time_range, first_fetch, position_idle"
                ));
            }
        }
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools() -> Vec<String> {
        vec!["pool1".to_owned()]
    }

    fn error_of(line: &str) -> RulesError {
        Rules::parse(&format!("## comment\n{line}\n"), &pools()).unwrap_err()
    }

    /// The host skips what `interest` leaves out: every hookpoint with a rule is named, with
    /// each filter once, and one rule without a topic makes the whole hookpoint wanted.
    #[test]
    fn interest_names_each_hookpoint_with_rules_and_their_filters() {
        let text = r##"
backend.pgsql.hook.message.publish.1 = {"topic": "a/#", "action": {"function": "on_message_publish"}, "pool": "pool1"}
backend.pgsql.hook.message.publish.2 = {"topic": "b/+", "action": {"function": "on_message_retain"}, "pool": "pool1"}
backend.pgsql.hook.message.publish.3 = {"topic": "a/#", "action": {"sql": ["select 1"]}, "pool": "pool1"}
backend.pgsql.hook.message.acked.1 = {"topic": "x", "action": {"function": "on_message_acked"}, "pool": "pool1"}
backend.pgsql.hook.message.acked.2 = {"action": {"sql": ["select 1"]}, "pool": "pool1"}
"##;
        let rules = Rules::parse(text, &pools()).unwrap();
        assert_eq!(
            rules.interest(),
            vec![
                (Hookpoint::MessagePublish, Some(vec!["a/#".to_owned(), "b/+".to_owned()])),
                (Hookpoint::MessageAcked, None),
            ]
        );
        assert!(Rules::parse("", &pools()).unwrap().interest().is_empty());
    }

    #[test]
    fn the_seed_rules_parse() {
        let text = r##"
backend.pgsql.hook.session.subscribed.1  = {"topic": "#", "action": {"function": "on_message_fetch"}, "offline_opts": {"max_returned_count": 50, "time_range": "2h"}, "pool": "pool1"}
backend.pgsql.hook.message.publish.1     = {"topic": "#", "action": {"function": "on_message_publish"}, "pool": "pool1"}
backend.pgsql.hook.message.acked.1       = {"topic": "#", "action": {"function": "on_message_acked"}, "pool": "pool1"}
backend.pgsql.hook.session.unsubscribed.1= {"topic": "#", "action": {"sql": ["delete from mqtt_acked where clientid = ${clientid} and topic = ${topic}"]}, "pool": "pool1"}
"##;
        let rules = Rules::parse(text, &pools()).unwrap();
        let fetch = &rules.for_hookpoint(Hookpoint::SessionSubscribed)[0];
        assert_eq!(
            fetch.action,
            Action::Function(Function::MessageFetch(OfflineOpts {
                max_returned_count: 50,
                max_returned_bytes: DEFAULT_PAGE_BYTES,
                time_range_secs: Some(7200),
                first_fetch: FirstFetch::Latest,
                position_idle_secs: None,
            }))
        );
        assert_eq!(rules.for_hookpoint(Hookpoint::SessionUnsubscribed).len(), 1);
    }

    #[test]
    fn each_mistake_is_named_with_its_line() {
        let cases = [
            (
                r##"backend.pgsql.hook.session.connected.2 = {"action": {"function": "on_subscribe_lookup"}, "pool": "pool1"}"##,
                "unknown hookpoint",
            ),
            (
                r##"backend.pgsql.hook.message.publish.1 = {"action": {"function": "on_message_publsh"}, "pool": "pool1"}"##,
                "unknown function",
            ),
            (
                r##"backend.pgsql.hook.message.acked.1 = {"action": {"function": "on_message_fetch"}, "pool": "pool1"}"##,
                "belongs on hookpoint session.subscribed",
            ),
            (
                r##"backend.pgsql.hook.message.acked.1 = {"action": {"sql": ["select ${nope}"]}, "pool": "pool1"}"##,
                "unknown placeholder",
            ),
            (
                r##"backend.pgsql.hook.session.subscribed.1 = {"action": {"function": "on_message_fetch"}, "offline_opts": {"time_range": "2x"}, "pool": "pool1"}"##,
                "bad duration",
            ),
            (
                r##"backend.pgsql.hook.message.acked.1 = {"action": {"function": "on_message_acked"}, "pool": "pool9"}"##,
                "pool `pool9` is not defined",
            ),
            (
                r##"backend.pgsql.hook.message.acked.1 = {"action": {"function": "on_message_acked"}}"##,
                "missing field `pool`",
            ),
            (
                r##"backend.pgsql.hook.message.acked.1 = {"action": {"function": "on_message_acked"}, "pool": "pool1", "topik": "#"}"##,
                "unknown field `topik`",
            ),
            (
                r##"backend.pgsql.hook.message.acked.1 = {"action": {"function": "on_message_acked"}, "pool": "pool1", "topic": "a/#/b"}"##,
                "whole level",
            ),
            (
                r##"backend.pgsql.hook.message.acked.1 = {"action": {"function": "on_message_acked"} "pool": "pool1"}"##,
                "invalid JSON",
            ),
        ];
        for (line, expected) in cases {
            let err = error_of(line);
            assert_eq!(err.line, Some(2), "{line}");
            assert!(err.message.contains(expected), "{line}: {err}");
            assert!(err.key.is_some_and(|k| k.starts_with("backend.pgsql.hook.")), "{line}");
        }
    }
}
