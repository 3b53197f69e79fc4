//! The offline-messaging extension: EMQX 4's `emqx_backend_pgsql` rules, run as a
//! `broker:extension` component. It sees rules and events, reaches PostgreSQL only through the
//! host's `sql` interface (by pool name), and never sees a credential.

mod action;
mod db;
mod functions;
mod hookpoint;
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
    ConfigError, Configuration, FetchPage, Guest, HookError, Interest, PublishOutcome, RuleFailure, Skipped,
};
use db::{Conn, Work};
use functions::{acked, client, fetch, housekeeping, publish, retain};
use hookpoint::Hookpoint;
use placeholder::{Event, Subject};
use rules::{Action, Function, OfflineOpts, OnError, Rule, Rules};

/// What `configure` installed.
#[derive(Default)]
struct Installed {
    rules: Rules,
    /// The broker node's name.
    node: String,
}

thread_local! {
    /// A component instance is single-threaded; each hook works on a snapshot of the config.
    static INSTALLED: RefCell<Rc<Installed>> = RefCell::new(Rc::new(Installed::default()));
}

fn installed() -> Rc<Installed> {
    INSTALLED.with(|c| c.borrow().clone())
}

pub(crate) fn warn(message: &str) {
    log::write(Level::Warn, message);
}

/// A rule's failure, for the host (which logs it).
fn sql_error(rule: &Rule, error: sql::Error) -> HookError {
    HookError::Sql(RuleFailure { rule: rule.key.clone(), error })
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
fn firing<'a>(config: &'a Installed, hookpoint: Hookpoint, topic: Option<&'a str>) -> impl Iterator<Item = &'a Rule> {
    config.rules.for_hookpoint(hookpoint).iter().filter(move |rule| topic.is_none_or(|t| rule.fires_for(t)))
}

/// Runs the sql actions of `hookpoint` that fire for `event`.
fn run_sql_rules(
    config: &Installed,
    hookpoint: Hookpoint,
    topic: Option<&str>,
    event: &Event<'_>,
) -> Result<(), HookError> {
    for rule in firing(config, hookpoint, topic) {
        if let Action::Sql(statements) = &rule.action {
            let started = Instant::now();
            settle(rule, started, action::run(&Conn::Pool(&rule.pool), statements, std::slice::from_ref(event)))?;
        }
    }
    Ok(())
}

/// A page a fetch rule made, reported to metrics, as the contract hands it over.
fn served(rule: &Rule, started: Instant, page: Result<fetch::Page, sql::Error>) -> Result<FetchPage, HookError> {
    observe(rule, started, &page.as_ref().map(|p| p.messages.len() as u64));
    let page = page.map_err(|e| sql_error(rule, e))?;
    Ok(FetchPage { messages: page.messages, next: page.next.map(|c| c.encode()) })
}

/// Where a backlog goes on after a fetch trapped: `cursor`, or the subscriber's stored position.
/// None when it has none: nothing to fetch.
fn restart_point(
    rule: &Rule,
    client: &Client,
    subscription: &Subscription,
    cursor: Option<String>,
) -> Result<Option<fetch::Cursor>, HookError> {
    match cursor {
        Some(cursor) => fetch::Cursor::decode(&cursor).map(Some).map_err(HookError::Invalid),
        None => {
            fetch::stored_position(&rule.pool, &client.clientid, &subscription.filter).map_err(|e| sql_error(rule, e))
        }
    }
}

/// Whether the fetch rule that serves `filter` is `rule`: then its position says what `rule`'s
/// backlogs may pass over (`fetch::Delivered`).
fn served_alike(config: &Installed, rule: &Rule, filter: &str) -> bool {
    config.rules.fetch_rule(filter).is_some_and(|(serving, _)| serving.index == rule.index)
}

/// See the retained messages of `session_subscribed`.
const TIME_RANGE_MARGIN_MS: i64 = 60_000;

fn now_millis() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Whether a rule of message.publish works on `message`: its topic filter fires, and its
/// function wants such a message.
fn publish_applies(rule: &Rule, message: &Message) -> bool {
    let wanted = match &rule.action {
        Action::Function(Function::MessagePublish(_)) => publish::publish_stores(message),
        Action::Function(Function::MessageRetain) => retain::retains(message),
        Action::Function(Function::RetainDelete) => retain::deletes(message),
        _ => true,
    };
    wanted && rule.fires_for(&message.topic)
}

/// Runs the message.publish rules that reject on error over the messages `selected`, all or
/// nothing: when more than one rule has work, they share one transaction per pool. Returns the
/// ids the storing rules gave (message index, id); on error nothing took effect (the ids set on
/// `messages` meanwhile are stale: the caller clears them).
fn publish_together(
    config: &Installed,
    messages: &mut [Message],
    selected: &[usize],
) -> Result<Vec<(usize, i64)>, HookError> {
    // Storing rules first, so that every other rule sees the stored id (`${id}`, the retained
    // message's `msg_id`); otherwise in `N` order.
    let mut working: Vec<(&Rule, Vec<usize>)> = config
        .rules
        .for_hookpoint(Hookpoint::MessagePublish)
        .iter()
        .filter(|rule| rule.on_error != OnError::Ignore)
        .map(|rule| (rule, selected.iter().copied().filter(|&i| publish_applies(rule, &messages[i])).collect()))
        .filter(|(_, indices): &(&Rule, Vec<usize>)| !indices.is_empty())
        .collect();
    working.sort_by_key(|(rule, _)| !matches!(rule.action, Action::Function(Function::MessagePublish(_))));
    let work = match working.as_slice() {
        [_, _, ..] => Work::shared(working.iter().map(|(rule, _)| rule.pool.as_str())).map_err(|error| {
            HookError::Sql(RuleFailure { rule: "backend.pgsql.hook.message.publish (begin)".into(), error })
        })?,
        _ => Work::alone(),
    };
    let mut stored = Vec::new();
    for (rule, indices) in &working {
        let started = Instant::now();
        let result = run_publish_rule(rule, &config.node, &work.conn(&rule.pool), messages, indices, &mut stored);
        settle(rule, started, result)?;
    }
    work.commit().map_err(|error| {
        HookError::Sql(RuleFailure { rule: "backend.pgsql.hook.message.publish (commit)".into(), error })
    })?;
    Ok(stored)
}

/// One message.publish rule over the messages at `indices`; a storing rule records the ids it
/// gave in `stored` and on the messages (for `${id}` in later rules). Returns the rows handled.
fn run_publish_rule(
    rule: &Rule,
    node: &str,
    conn: &Conn<'_>,
    messages: &mut [Message],
    indices: &[usize],
    stored: &mut Vec<(usize, i64)>,
) -> Result<u64, sql::Error> {
    let batch: Vec<&Message> = indices.iter().map(|&i| &messages[i]).collect();
    let rows = batch.len() as u64;
    match &rule.action {
        Action::Function(Function::MessagePublish(_)) => {
            let ids = publish::store(conn, &batch)?;
            for (&i, id) in indices.iter().zip(ids) {
                messages[i].id = Some(id);
                stored.push((i, id));
            }
            Ok(rows)
        }
        // Archive copies: no id travels, acks do not move positions with them.
        Action::Function(Function::MessageStore(_)) => publish::store(conn, &batch).map(|_| rows),
        Action::Function(Function::MessageRetain) => retain::keep(conn, &batch).map(|()| rows),
        Action::Function(Function::RetainDelete) => retain::delete(conn, &batch).map(|()| rows),
        Action::Sql(statements) => {
            let events: Vec<Event<'_>> = batch
                .iter()
                .map(|&message| Event { node, subject: Subject::Message { receiver: None, message } })
                .collect();
            action::run(conn, statements, &events)
        }
        Action::Function(_) => Ok(0), // configuration keeps other functions off this hookpoint
    }
}

fn record_stored(outcomes: &mut [PublishOutcome], stored: Vec<(usize, i64)>) {
    for (i, id) in stored {
        outcomes[i] = PublishOutcome::Stored(id);
    }
}

/// The ids a refused `part` was given meanwhile: stale, nothing of it was committed.
fn forget_ids(messages: &mut [Message], part: &[usize]) {
    for &i in part {
        messages[i].id = None;
    }
}

/// The halves of `part` as a stack: the left one on top, tried first.
fn halves(part: &[usize]) -> [Vec<usize>; 2] {
    let (left, right) = part.split_at(part.len() / 2);
    [right.to_vec(), left.to_vec()]
}

/// A failure that is the database's, not a message's: trying messages one by one would only
/// wait for the same unreachable server again.
fn unreachable(failure: &HookError) -> bool {
    matches!(failure, HookError::Sql(RuleFailure { error: sql::Error::Connection(_) | sql::Error::NoSuchPool(_), .. }))
}

struct Extension;

/// The contract's name of a hookpoint.
fn contract_hookpoint(hookpoint: Hookpoint) -> bindings::exports::broker::extension::hooks::Hookpoint {
    use bindings::exports::broker::extension::hooks::Hookpoint as Contract;
    match hookpoint {
        Hookpoint::ClientConnected => Contract::ClientConnected,
        Hookpoint::ClientDisconnected => Contract::ClientDisconnected,
        Hookpoint::SessionSubscribed => Contract::SessionSubscribed,
        Hookpoint::SessionUnsubscribed => Contract::SessionUnsubscribed,
        Hookpoint::MessagePublish => Contract::MessagePublish,
        Hookpoint::MessageDelivered => Contract::MessageDelivered,
        Hookpoint::MessageAcked => Contract::MessageAcked,
    }
}

impl Guest for Extension {
    fn configure(configuration: Configuration) -> Result<Vec<Interest>, ConfigError> {
        let rules = Rules::parse(&configuration.text, &configuration.pools).map_err(|e| ConfigError {
            line: e.line,
            key: e.key,
            message: e.message,
        })?;
        let interest = rules
            .interest()
            .into_iter()
            .map(|(hookpoint, topics)| Interest { hookpoint: contract_hookpoint(hookpoint), topics })
            .collect();
        INSTALLED.with(|c| *c.borrow_mut() = Rc::new(Installed { rules, node: configuration.node }));
        Ok(interest)
    }

    fn client_connected(client: Client) -> Result<Vec<Subscription>, HookError> {
        let config = installed();
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
                Action::Sql(statements) => action::run(
                    &Conn::Pool(&rule.pool),
                    statements,
                    &[Event { node: &config.node, subject: Subject::Client(&client) }],
                ),
                Action::Function(_) => continue,
            };
            settle(rule, started, result)?;
        }
        Ok(subscriptions)
    }

    fn client_disconnected(client: Client, _reason: String) -> Result<(), HookError> {
        let config = installed();
        for rule in firing(&config, Hookpoint::ClientDisconnected, None) {
            let started = Instant::now();
            let result = match &rule.action {
                Action::Function(Function::ClientDisconnected) => {
                    client::disconnected(&rule.pool, &client.clientid, &config.node).map(|()| 1)
                }
                Action::Sql(statements) => action::run(
                    &Conn::Pool(&rule.pool),
                    statements,
                    &[Event { node: &config.node, subject: Subject::Client(&client) }],
                ),
                Action::Function(_) => continue,
            };
            settle(rule, started, result)?;
        }
        Ok(())
    }

    fn session_subscribed(client: Client, subscription: Subscription) -> Result<FetchPage, HookError> {
        let config = installed();
        let filter = subscription.filter.as_str();
        let subject = Subject::Subscription { client: &client, filter, qos: Some(subscription.qos) };
        let event = Event { node: &config.node, subject };
        // Retained messages first, then the offline backlog's first page (one fetch rule serves a
        // subscription: the first that fires; only QoS 1/2 subscriptions fetch).
        let fetch_rule = config.rules.fetch_rule(filter);
        let mut retained = Vec::new();
        let mut backlog = None;
        for rule in firing(&config, Hookpoint::SessionSubscribed, Some(filter)) {
            let started = Instant::now();
            let result = match &rule.action {
                // MQTT sends no retained messages to a new shared subscription.
                Action::Function(Function::RetainLookup) if topic::shared(filter).is_some() => continue,
                Action::Function(Function::RetainLookup) => retain::lookup(&rule.pool, filter).map(|found| {
                    let rows = found.len() as u64;
                    retained.extend(found);
                    rows
                }),
                Action::Function(Function::MessageFetch(opts))
                    if fetch_rule.is_some_and(|(serving, _)| serving.index == rule.index) && subscription.qos > 0 =>
                {
                    let served_alike = |other: &str| served_alike(&config, rule, other);
                    fetch::first_page(&rule.pool, opts, &client.clientid, filter, served_alike).map(|first| {
                        let rows = first.first.messages.len() as u64;
                        backlog = Some(first);
                        rows
                    })
                }
                Action::Sql(statements) => {
                    action::run(&Conn::Pool(&rule.pool), statements, std::slice::from_ref(&event))
                }
                Action::Function(_) => continue,
            };
            settle(rule, started, result)?;
        }
        // One delivery per message: a retained message that the backlog holds (stored after the
        // position the backlog starts from) comes with the backlog, in order, not twice.
        if let Some(backlog) = &backlog {
            // `time_range` is judged by the database's clock, page by page: a message this close to
            // leaving it (or a clock this far off) comes as retained too, rather than not at all.
            let time_range = fetch_rule.and_then(|(_, opts)| opts.time_range_secs);
            let fetched_since = time_range.map(|secs| now_millis() - secs as i64 * 1000 + TIME_RANGE_MARGIN_MS);
            retained.retain(|(stored_id, message)| {
                let in_backlog = stored_id.is_some_and(|id| backlog.holds(id, &message.topic))
                    && fetched_since.is_none_or(|since| message.timestamp >= since);
                !in_backlog
            });
        }
        let mut messages: Vec<Message> = retained.into_iter().map(|(_, message)| message).collect();
        let mut next = None;
        if let Some(backlog) = backlog {
            messages.extend(backlog.first.messages);
            next = backlog.first.next.map(|c| c.encode());
        }
        Ok(FetchPage { messages, next })
    }

    fn session_resume(client: Client, subscription: Subscription) -> Result<FetchPage, HookError> {
        let config = installed();
        let Some((rule, opts)) = config.rules.fetch_rule(&subscription.filter) else {
            return Ok(FetchPage { messages: Vec::new(), next: None });
        };
        let started = Instant::now();
        let served_alike = |other: &str| served_alike(&config, rule, other);
        served(rule, started, fetch::resume(&rule.pool, opts, &client.clientid, &subscription.filter, served_alike))
    }

    fn session_fetch_next(client: Client, subscription: Subscription, cursor: String) -> Result<FetchPage, HookError> {
        let cursor = fetch::Cursor::decode(&cursor).map_err(HookError::Invalid)?;
        let config = installed();
        // The rule in force now serves the page, whatever rule served the one before.
        let Some((rule, opts)) = config.rules.fetch_rule(&subscription.filter) else {
            warn(&format!("no on_message_fetch rule serves {} any more: its backlog ends here", subscription.filter));
            return Ok(FetchPage { messages: Vec::new(), next: None });
        };
        let started = Instant::now();
        let reader = fetch::reader(&client.clientid, &subscription.filter);
        let delivered = if cursor.passing_over {
            fetch::Delivered::load(&rule.pool, &reader, |other| served_alike(&config, rule, other))
        } else {
            Ok(fetch::Delivered::default())
        };
        let page =
            delivered.and_then(|delivered| fetch::page(&rule.pool, opts, &subscription.filter, cursor, &delivered));
        served(rule, started, page)
    }

    fn session_fetch_one(
        client: Client,
        subscription: Subscription,
        cursor: Option<String>,
    ) -> Result<FetchPage, HookError> {
        let config = installed();
        let Some((rule, opts)) = config.rules.fetch_rule(&subscription.filter) else {
            return Ok(FetchPage { messages: Vec::new(), next: None });
        };
        let started = Instant::now();
        let Some(cursor) = restart_point(rule, &client, &subscription, cursor)? else {
            return Ok(FetchPage { messages: Vec::new(), next: None });
        };
        let one = OfflineOpts { max_returned_count: 1, ..opts.clone() };
        // The poison path (a message that traps the guest) goes one stored message at a time, as
        // stored, passing over nothing.
        let page = fetch::page(&rule.pool, &one, &subscription.filter, cursor, &fetch::Delivered::default());
        served(rule, started, page)
    }

    fn session_skip(
        client: Client,
        subscription: Subscription,
        cursor: Option<String>,
    ) -> Result<Option<Skipped>, HookError> {
        let config = installed();
        let Some((rule, opts)) = config.rules.fetch_rule(&subscription.filter) else { return Ok(None) };
        let Some(cursor) = restart_point(rule, &client, &subscription, cursor)? else { return Ok(None) };
        let id = fetch::next_id(&rule.pool, opts, &subscription.filter, &cursor).map_err(|e| sql_error(rule, e))?;
        Ok(id.map(|id| Skipped { id, next: fetch::Cursor::after(id).encode() }))
    }

    fn session_unsubscribed(client: Client, filter: String) -> Result<(), HookError> {
        let config = installed();
        let event = Event {
            node: &config.node,
            subject: Subject::Subscription { client: &client, filter: &filter, qos: None },
        };
        run_sql_rules(&config, Hookpoint::SessionUnsubscribed, Some(&filter), &event)
    }

    fn message_publish(mut messages: Vec<Message>) -> Vec<PublishOutcome> {
        let config = installed();
        let mut outcomes: Vec<PublishOutcome> = messages.iter().map(|_| PublishOutcome::NotStored).collect();
        let all: Vec<usize> = (0..messages.len()).collect();
        match publish_together(&config, &mut messages, &all) {
            Ok(stored) => record_stored(&mut outcomes, stored),
            // A failure belongs to its message: unless the database itself is out of reach, the
            // batch is tried again in halves, and a failing half in halves again, until each
            // failure is down to its own message. One bad message among n costs about
            // 2 log2(n) more transactions (n, tried one by one); the left half goes first, so
            // ids still follow arrival order.
            Err(failure) if all.len() > 1 && !unreachable(&failure) => {
                forget_ids(&mut messages, &all);
                let mut parts = Vec::from(halves(&all));
                while let Some(part) = parts.pop() {
                    match publish_together(&config, &mut messages, &part) {
                        Ok(stored) => record_stored(&mut outcomes, stored),
                        Err(failure) if part.len() > 1 && !unreachable(&failure) => {
                            forget_ids(&mut messages, &part);
                            parts.extend(halves(&part));
                        }
                        Err(failure) => {
                            forget_ids(&mut messages, &part);
                            part.iter().for_each(|&i| outcomes[i] = PublishOutcome::Failed(failure.clone()));
                        }
                    }
                }
            }
            Err(failure) => outcomes.iter_mut().for_each(|o| *o = PublishOutcome::Failed(failure.clone())),
        }
        // `on_error: ignore` rules run outside the all-or-nothing, on the messages accepted.
        for rule in config.rules.for_hookpoint(Hookpoint::MessagePublish) {
            if rule.on_error != OnError::Ignore {
                continue;
            }
            let selected: Vec<usize> = (0..messages.len())
                .filter(|&i| !matches!(outcomes[i], PublishOutcome::Failed(_)) && publish_applies(rule, &messages[i]))
                .collect();
            if selected.is_empty() {
                continue;
            }
            let started = Instant::now();
            let mut stored = Vec::new();
            let result =
                run_publish_rule(rule, &config.node, &Conn::Pool(&rule.pool), &mut messages, &selected, &mut stored);
            if settle(rule, started, result).is_ok() {
                record_stored(&mut outcomes, stored);
            }
        }
        outcomes
    }

    fn message_delivered(client: Client, message: Message) -> Result<(), HookError> {
        let config = installed();
        let event =
            Event { node: &config.node, subject: Subject::Message { receiver: Some(&client), message: &message } };
        run_sql_rules(&config, Hookpoint::MessageDelivered, Some(&message.topic), &event)
    }

    fn message_acked(client: Client, message: Message, positions: Vec<String>) -> Result<(), HookError> {
        let config = installed();
        let event =
            Event { node: &config.node, subject: Subject::Message { receiver: Some(&client), message: &message } };
        for rule in firing(&config, Hookpoint::MessageAcked, Some(&message.topic)) {
            let started = Instant::now();
            let result = match (&rule.action, message.id) {
                (Action::Function(Function::MessageAcked), Some(id)) => {
                    let opts =
                        |filter: &str| config.rules.fetch_rule(filter).map(|(_, o)| o.clone()).unwrap_or_default();
                    acked::advance(&rule.pool, &client.clientid, id, &positions, opts)
                }
                (Action::Sql(statements), _) => {
                    action::run(&Conn::Pool(&rule.pool), statements, std::slice::from_ref(&event))
                }
                _ => continue,
            };
            settle(rule, started, result)?;
        }
        Ok(())
    }

    fn tick() -> Result<u64, HookError> {
        let config = installed();
        let mut deleted = 0;
        // Each pool that store rules write to, once, with the shortest of their retentions (and
        // the rule that set it, to name in an error): every retention applies to the whole table.
        let mut pools: Vec<(&Rule, Option<u64>)> = Vec::new();
        for rule in config.rules.for_hookpoint(Hookpoint::MessagePublish) {
            let (Action::Function(Function::MessagePublish(opts)) | Action::Function(Function::MessageStore(opts))) =
                &rule.action
            else {
                continue;
            };
            match pools.iter_mut().find(|(r, _)| r.pool == rule.pool) {
                None => pools.push((rule, opts.retention_secs)),
                Some(entry) if opts.retention_secs.is_some_and(|r| entry.1.is_none_or(|shortest| r < shortest)) => {
                    *entry = (rule, opts.retention_secs)
                }
                Some(_) => {}
            }
        }
        for (rule, retention) in pools {
            deleted += housekeeping::delete_expired(&rule.pool).map_err(|e| sql_error(rule, e))?;
            if let Some(retention) = retention {
                deleted += housekeeping::delete_older_than(&rule.pool, retention).map_err(|e| sql_error(rule, e))?;
                // Partitions only give space back sooner: where their upkeep fails (a pool user
                // that does not own the table), the tick goes on, and deletes row by row at the
                // rate it would without them.
                if let Err(error) = housekeeping::keep_partitions(&rule.pool, retention) {
                    warn(&format!(
                        "{}: mqtt_msg's partitions are not kept (retention deletes row by row): {error:?}",
                        rule.key
                    ));
                }
            }
        }
        for rule in config.rules.for_hookpoint(Hookpoint::SessionSubscribed) {
            if let Action::Function(Function::MessageFetch(OfflineOpts { position_idle_secs: Some(idle), .. })) =
                &rule.action
            {
                deleted += housekeeping::delete_idle_positions(&rule.pool, *idle).map_err(|e| sql_error(rule, e))?;
            }
        }
        Ok(deleted)
    }
}

bindings::export!(Extension with_types_in bindings);
