//! The offline-messaging extension: EMQX 4's `emqx_backend_pgsql` rules, run as a
//! `broker:extension` component. It sees rules and events, reaches PostgreSQL only through the
//! host's `sql` interface (by pool name), and never sees a credential.

mod action;
mod db;
mod functions;
mod placeholder;
mod rules;
mod template;
mod topic;

mod bindings {
    wit_bindgen::generate!({ path: "../wit", world: "extension" });
}

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Instant;

use bindings::broker::extension::log::{self, Level};
use bindings::broker::extension::metrics;
use bindings::broker::extension::sql;
use bindings::broker::extension::types::{Client, Message, Subscription};
use bindings::exports::broker::extension::hooks::{
    ConfigError, FetchPage, Guest, HookError, PublishOutcome, Rules as RulesText,
};
use functions::{acked, client, fetch, housekeeping, publish, retain};
use placeholder::Event;
use rules::{Action, Function, Hookpoint, OnError, Rule, Rules};

/// What `configure` installed.
#[derive(Default)]
struct Config {
    rules: Rules,
    /// The broker node's name.
    node: String,
}

thread_local! {
    /// A component instance is single-threaded; each hook works on a snapshot of the config.
    static CONFIG: RefCell<Rc<Config>> = RefCell::new(Rc::new(Config::default()));
}

fn config() -> Rc<Config> {
    CONFIG.with(|c| c.borrow().clone())
}

/// The broker node's name, for `${node}`.
pub(crate) fn node() -> String {
    config().node.clone()
}

pub(crate) fn warn(message: &str) {
    log::write(Level::Warn, message);
}

/// A rule's failure, for the host (which logs it).
fn sql_error(rule: &Rule, error: sql::Error) -> HookError {
    HookError::Sql((rule.key.clone(), error))
}

/// Reports one run of `rule` to the host's metrics.
fn observe<T>(rule: &Rule, started: Instant, result: &Result<u64, T>) {
    let elapsed = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
    metrics::observe(rule.metric_name, result.is_ok(), *result.as_ref().unwrap_or(&0), elapsed);
}

/// A rule's outcome, reported to metrics and settled by its `on_error` policy: an ignored error
/// is only logged. `result` holds how many rows the rule handled.
fn settle(rule: &Rule, started: Instant, result: Result<u64, sql::Error>) -> Result<(), HookError> {
    observe(rule, started, &result);
    match result.map(drop) {
        Err(error) if rule.on_error == OnError::Ignore => {
            warn(&format!("{} (on_error: ignore): {error:?}", rule.key));
            Ok(())
        }
        other => other.map_err(|e| sql_error(rule, e)),
    }
}

/// The rules of `hookpoint` that fire for an event about `topic` (every rule, for client hooks).
fn firing<'a>(config: &'a Config, hookpoint: Hookpoint, topic: Option<&'a str>) -> impl Iterator<Item = &'a Rule> {
    config.rules.for_hookpoint(hookpoint).iter().filter(move |rule| topic.is_none_or(|t| rule.fires_for(t)))
}

/// Runs the sql actions of `hookpoint` that fire for `event`.
fn run_sql_rules(hookpoint: Hookpoint, topic: Option<&str>, event: &Event<'_>) -> Result<(), HookError> {
    let config = config();
    for rule in firing(&config, hookpoint, topic) {
        if let Action::Sql(statements) = &rule.action {
            let started = Instant::now();
            settle(rule, started, action::run(&rule.pool, statements, std::slice::from_ref(event)))?;
        }
    }
    Ok(())
}

struct Extension;

impl Guest for Extension {
    fn configure(text: RulesText) -> Result<(), ConfigError> {
        let rules = Rules::parse(&text.text, &text.pools).map_err(|e| ConfigError {
            line: e.line,
            key: e.key,
            message: e.message,
        })?;
        CONFIG.with(|c| *c.borrow_mut() = Rc::new(Config { rules, node: text.node }));
        Ok(())
    }

    fn client_connected(client: Client) -> Result<Vec<Subscription>, HookError> {
        let config = config();
        let mut subscriptions = Vec::new();
        for rule in firing(&config, Hookpoint::ClientConnected, None) {
            let started = Instant::now();
            let result = match &rule.action {
                Action::Function(Function::ClientConnected) => {
                    client::connected(&rule.pool, &client.clientid, &config.node).map(|()| 1)
                }
                Action::Function(Function::SubscribeLookup) => {
                    client::subscriptions(&rule.pool, &client.clientid).map(|found| {
                        let rows = found.len() as u64;
                        subscriptions.extend(found);
                        rows
                    })
                }
                Action::Sql(statements) => action::run(&rule.pool, statements, &[Event::Client(&client)]),
                Action::Function(_) => continue,
            };
            settle(rule, started, result)?;
        }
        Ok(subscriptions)
    }

    fn client_disconnected(client: Client, _reason: String) -> Result<(), HookError> {
        let config = config();
        for rule in firing(&config, Hookpoint::ClientDisconnected, None) {
            let started = Instant::now();
            let result = match &rule.action {
                Action::Function(Function::ClientDisconnected) => {
                    client::disconnected(&rule.pool, &client.clientid, &config.node).map(|()| 1)
                }
                Action::Sql(statements) => action::run(&rule.pool, statements, &[Event::Client(&client)]),
                Action::Function(_) => continue,
            };
            settle(rule, started, result)?;
        }
        Ok(())
    }

    fn session_subscribed(client: Client, subscription: Subscription) -> Result<FetchPage, HookError> {
        let config = config();
        let filter = subscription.filter.as_str();
        let event = Event::Subscription { client: &client, filter, qos: Some(subscription.qos) };
        // Retained messages first, then the offline backlog's first page (one fetch rule serves a
        // subscription: the first that fires; only QoS 1/2 subscriptions fetch).
        let mut page = FetchPage { messages: Vec::new(), next: None };
        let mut fetched = false;
        for rule in firing(&config, Hookpoint::SessionSubscribed, Some(filter)) {
            let started = Instant::now();
            let result = match &rule.action {
                Action::Function(Function::RetainLookup) => retain::lookup(&rule.pool, filter).map(|retained| {
                    let rows = retained.len() as u64;
                    page.messages.extend(retained);
                    rows
                }),
                Action::Function(Function::MessageFetch(opts)) if !fetched && subscription.qos > 0 => {
                    fetched = true;
                    fetch::first_page(&rule.pool, rule.index, opts, &client.clientid, filter).map(|first| {
                        let rows = first.messages.len() as u64;
                        page.messages.extend(first.messages);
                        page.next = first.next.map(|c| c.encode());
                        rows
                    })
                }
                Action::Sql(statements) => action::run(&rule.pool, statements, std::slice::from_ref(&event)),
                Action::Function(_) => continue,
            };
            settle(rule, started, result)?;
        }
        Ok(page)
    }

    fn session_fetch_next(_client: Client, subscription: Subscription, cursor: String) -> Result<FetchPage, HookError> {
        let cursor = fetch::Cursor::decode(&cursor).map_err(HookError::Invalid)?;
        let config = config();
        let Some(rule) = config.rules.find(Hookpoint::SessionSubscribed, cursor.rule_index) else {
            return Err(HookError::Invalid(format!(
                "the rule of cursor `{}` is no longer configured",
                cursor.encode()
            )));
        };
        let Action::Function(Function::MessageFetch(opts)) = &rule.action else {
            return Err(HookError::Invalid(format!("{} is not an on_message_fetch rule", rule.key)));
        };
        let started = Instant::now();
        let page = fetch::page(&rule.pool, opts, &subscription.filter, cursor);
        observe(rule, started, &page.as_ref().map(|p| p.messages.len() as u64));
        let page = page.map_err(|e| sql_error(rule, e))?;
        Ok(FetchPage { messages: page.messages, next: page.next.map(|c| c.encode()) })
    }

    fn session_unsubscribed(client: Client, filter: String) -> Result<(), HookError> {
        let event = Event::Subscription { client: &client, filter: &filter, qos: None };
        run_sql_rules(Hookpoint::SessionUnsubscribed, Some(&filter), &event)
    }

    fn message_publish(mut messages: Vec<Message>) -> Vec<PublishOutcome> {
        let config = config();
        let mut outcomes: Vec<PublishOutcome> = messages.iter().map(|_| PublishOutcome::NotStored).collect();
        for rule in config.rules.for_hookpoint(Hookpoint::MessagePublish) {
            // The messages this rule works on; one that already failed is left alone.
            let applies: fn(&Message) -> bool = match &rule.action {
                Action::Function(Function::MessagePublish(_)) => publish::publish_stores,
                Action::Function(Function::MessageRetain) => retain::retains,
                Action::Function(Function::RetainDelete) => retain::deletes,
                _ => |_| true,
            };
            let selected: Vec<usize> = (0..messages.len())
                .filter(|&i| !matches!(outcomes[i], PublishOutcome::Failed(_)))
                .filter(|&i| rule.fires_for(&messages[i].topic) && applies(&messages[i]))
                .collect();
            if selected.is_empty() {
                continue;
            }
            let batch: Vec<&Message> = selected.iter().map(|&i| &messages[i]).collect();
            let rows = batch.len() as u64;
            let started = Instant::now();
            let result = match &rule.action {
                Action::Function(Function::MessagePublish(_)) => publish::store(&rule.pool, &batch).map(|ids| {
                    for (&i, id) in selected.iter().zip(ids) {
                        messages[i].id = Some(id);
                        outcomes[i] = PublishOutcome::Stored(id);
                    }
                    rows
                }),
                // Archive copies: no id travels, acks do not move positions with them.
                Action::Function(Function::MessageStore(_)) => publish::store(&rule.pool, &batch).map(|_| rows),
                Action::Function(Function::MessageRetain) => retain::keep(&rule.pool, &batch).map(|()| rows),
                Action::Function(Function::RetainDelete) => retain::delete(&rule.pool, &batch).map(|()| rows),
                Action::Sql(statements) => {
                    let events: Vec<Event<'_>> =
                        batch.iter().map(|&message| Event::Message { receiver: None, message }).collect();
                    action::run(&rule.pool, statements, &events)
                }
                Action::Function(_) => continue, // configuration keeps other functions off this hookpoint
            };
            if let Err(failure) = settle(rule, started, result) {
                for &i in &selected {
                    outcomes[i] = PublishOutcome::Failed(failure.clone());
                }
            }
        }
        outcomes
    }

    fn message_delivered(client: Client, message: Message) -> Result<(), HookError> {
        let event = Event::Message { receiver: Some(&client), message: &message };
        run_sql_rules(Hookpoint::MessageDelivered, Some(&message.topic), &event)
    }

    fn message_acked(client: Client, message: Message) -> Result<(), HookError> {
        let config = config();
        let event = Event::Message { receiver: Some(&client), message: &message };
        for rule in firing(&config, Hookpoint::MessageAcked, Some(&message.topic)) {
            let started = Instant::now();
            let result = match (&rule.action, message.id) {
                (Action::Function(Function::MessageAcked), Some(id)) => {
                    acked::advance(&rule.pool, &client.clientid, id).map(|()| 1)
                }
                (Action::Sql(statements), _) => action::run(&rule.pool, statements, std::slice::from_ref(&event)),
                _ => continue,
            };
            settle(rule, started, result)?;
        }
        Ok(())
    }

    fn tick() -> Result<u64, HookError> {
        let config = config();
        let mut deleted = 0;
        let mut swept_pools: Vec<&str> = Vec::new();
        for rule in config.rules.for_hookpoint(Hookpoint::MessagePublish) {
            let (Action::Function(Function::MessagePublish(opts)) | Action::Function(Function::MessageStore(opts))) =
                &rule.action
            else {
                continue;
            };
            if !swept_pools.contains(&rule.pool.as_str()) {
                swept_pools.push(&rule.pool);
                deleted += housekeeping::delete_expired(&rule.pool).map_err(|e| sql_error(rule, e))?;
            }
            if let Some(retention) = opts.retention_secs {
                deleted += housekeeping::delete_older_than(&rule.pool, retention).map_err(|e| sql_error(rule, e))?;
            }
        }
        Ok(deleted)
    }
}

bindings::export!(Extension with_types_in bindings);
