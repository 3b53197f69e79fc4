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

use bindings::broker::extension::log::{self, Level};
use bindings::broker::extension::sql;
use bindings::broker::extension::types::{Client, Message, Subscription};
use bindings::exports::broker::extension::hooks::{
    ConfigError, FetchPage, Guest, HookError, PublishOutcome, Rules as RulesText,
};
use functions::{acked, fetch, publish};
use placeholder::Event;
use rules::{Action, Function, Hookpoint, Rule, Rules};

thread_local! {
    /// The installed rules. A component instance is single-threaded; hooks borrow a snapshot.
    static RULES: RefCell<Rc<Rules>> = RefCell::new(Rc::new(Rules::default()));
}

fn rules() -> Rc<Rules> {
    RULES.with(|r| r.borrow().clone())
}

fn sql_error(rule: &Rule, error: sql::Error) -> HookError {
    log::write(Level::Warn, &format!("{}: {error:?}", rule.key));
    HookError::Sql((rule.key.clone(), error))
}

/// Runs the sql-action rules of `hookpoint` that fire for `topic` (or all, for client hooks).
fn run_sql_rules(hookpoint: Hookpoint, topic: Option<&str>, event: &Event<'_>) -> Result<(), HookError> {
    for rule in rules().for_hookpoint(hookpoint) {
        if let Action::Sql(statements) = &rule.action
            && topic.is_none_or(|t| rule.fires_for(t))
        {
            action::run(&rule.pool, statements, std::slice::from_ref(event)).map_err(|e| sql_error(rule, e))?;
        }
    }
    Ok(())
}

struct Extension;

impl Guest for Extension {
    fn configure(text: RulesText) -> Result<(), ConfigError> {
        let parsed = Rules::parse(&text.text, &text.pools).map_err(|e| ConfigError {
            line: e.line,
            key: e.key,
            message: e.message,
        })?;
        RULES.with(|r| *r.borrow_mut() = Rc::new(parsed));
        Ok(())
    }

    fn client_connected(client: Client) -> Result<Vec<Subscription>, HookError> {
        run_sql_rules(Hookpoint::ClientConnected, None, &Event::Client(&client))?;
        Ok(Vec::new())
    }

    fn client_disconnected(client: Client, _reason: String) -> Result<(), HookError> {
        run_sql_rules(Hookpoint::ClientDisconnected, None, &Event::Client(&client))
    }

    fn session_subscribed(client: Client, subscription: Subscription) -> Result<FetchPage, HookError> {
        let event = Event::Subscription { client: &client, filter: &subscription.filter, qos: Some(subscription.qos) };
        run_sql_rules(Hookpoint::SessionSubscribed, Some(&subscription.filter), &event)?;
        let rules = rules();
        // The first fetch rule that fires serves the subscription; only QoS 1/2 subscriptions fetch.
        let fetch_rule = rules.for_hookpoint(Hookpoint::SessionSubscribed).iter().find_map(|rule| match &rule.action {
            Action::Function(Function::MessageFetch(opts)) if rule.fires_for(&subscription.filter) => Some((rule, opts)),
            _ => None,
        });
        let Some((rule, opts)) = fetch_rule.filter(|_| subscription.qos > 0) else {
            return Ok(FetchPage { messages: Vec::new(), next: None });
        };
        let page = fetch::first_page(&rule.pool, rule.index, opts, &client.clientid, &subscription.filter)
            .map_err(|e| sql_error(rule, e))?;
        Ok(FetchPage { messages: page.messages, next: page.next.map(|c| c.encode()) })
    }

    fn session_fetch_next(_client: Client, subscription: Subscription, cursor: String) -> Result<FetchPage, HookError> {
        let cursor = fetch::Cursor::decode(&cursor).map_err(HookError::Invalid)?;
        let rules = rules();
        let Some(rule) = rules.find(Hookpoint::SessionSubscribed, cursor.rule_index) else {
            return Err(HookError::Invalid(format!("the rule of cursor `{}` is no longer configured", cursor.encode())));
        };
        let Action::Function(Function::MessageFetch(opts)) = &rule.action else {
            return Err(HookError::Invalid(format!("{} is not an on_message_fetch rule", rule.key)));
        };
        let page = fetch::page(&rule.pool, opts, &subscription.filter, cursor).map_err(|e| sql_error(rule, e))?;
        Ok(FetchPage { messages: page.messages, next: page.next.map(|c| c.encode()) })
    }

    fn session_unsubscribed(client: Client, filter: String) -> Result<(), HookError> {
        let event = Event::Subscription { client: &client, filter: &filter, qos: None };
        run_sql_rules(Hookpoint::SessionUnsubscribed, Some(&filter), &event)
    }

    fn message_publish(mut messages: Vec<Message>) -> Vec<PublishOutcome> {
        let mut outcomes: Vec<PublishOutcome> = messages.iter().map(|_| PublishOutcome::NotStored).collect();
        let rules = rules();
        for rule in rules.for_hookpoint(Hookpoint::MessagePublish) {
            // The messages this rule applies to; one that already failed is not worked on further.
            let selected: Vec<usize> = (0..messages.len())
                .filter(|&i| rule.fires_for(&messages[i].topic) && !matches!(outcomes[i], PublishOutcome::Failed(_)))
                .filter(|&i| !matches!(rule.action, Action::Function(Function::MessagePublish)) || publish::stores(&messages[i]))
                .collect();
            if selected.is_empty() {
                continue;
            }
            let result = match &rule.action {
                Action::Function(Function::MessagePublish) => {
                    let batch: Vec<&Message> = selected.iter().map(|&i| &messages[i]).collect();
                    publish::store(&rule.pool, &batch).map(|ids| {
                        for (&i, id) in selected.iter().zip(ids) {
                            messages[i].id = Some(id);
                            outcomes[i] = PublishOutcome::Stored(id);
                        }
                    })
                }
                Action::Sql(statements) => {
                    let events: Vec<Event<'_>> =
                        selected.iter().map(|&i| Event::Message { receiver: None, message: &messages[i] }).collect();
                    action::run(&rule.pool, statements, &events)
                }
                Action::Function(_) => Ok(()), // configuration keeps other functions off this hookpoint
            };
            if let Err(error) = result {
                let failure = sql_error(rule, error);
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
        if let Some(id) = message.id {
            for rule in rules().for_hookpoint(Hookpoint::MessageAcked) {
                if rule.action == Action::Function(Function::MessageAcked) && rule.fires_for(&message.topic) {
                    acked::advance(&rule.pool, &client.clientid, id).map_err(|e| sql_error(rule, e))?;
                }
            }
        }
        let event = Event::Message { receiver: Some(&client), message: &message };
        run_sql_rules(Hookpoint::MessageAcked, Some(&message.topic), &event)
    }
}

bindings::export!(Extension with_types_in bindings);
