//! rmqtt's hooks mapped onto the contract: one handler, registered for each hook type it
//! serves, calling every extension in order.

use std::sync::Arc;

use async_trait::async_trait;
use host_harness::Instance;
use host_harness::adapter::{self, Outbox};
use host_harness::bindings::{Describe, FetchPage, Message, PublishOutcome, Subscription};
use host_harness::wire;
use rmqtt::codec::v5::PublishAckReason;
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::session::Session;
use rmqtt::types::{
    ConnectInfo, From, Id, Message as SessionMessage, Publish, PublishAclResult, PublishResult, QoS, Reason, Subscribe,
    Tx,
};

use crate::Extension;
use crate::message::{self, Routed, STORE_FAILED};
use crate::stats::BrokerStats;
use host_harness::protocol::delivery::{Connection, Live, Refetch};

/// The hook types [`Hooks`] handles.
pub const TYPES: [Type; 12] = [
    Type::ClientConnected,
    Type::ClientDisconnected,
    Type::OfflineInflightMessages,
    Type::SessionTerminated,
    Type::SessionSubscribed,
    Type::SessionUnsubscribed,
    Type::MessagePublish,
    Type::MessagePublishCheckAcl,
    Type::MessageExpiryCheck,
    Type::MessageDelivered,
    Type::MessageAcked,
    Type::MessageDropped,
];

#[derive(Clone)]
pub struct Hooks {
    pub extensions: Arc<Vec<Arc<Extension>>>,
    pub scx: ServerContext,
    pub stats: Arc<BrokerStats>,
}

/// Registers the hooks with rmqtt and enables them.
pub async fn register(hooks: Hooks) {
    let register = hooks.scx.extends.hook_mgr().register();
    for typ in TYPES {
        register.add(typ, Box::new(hooks.clone())).await;
    }
    register.start().await;
}

/// Marks `publish` with what became of it in `extension`: its stored id, or the failure that
/// the ACL check turns into a refusal.
fn record_outcome(publish: &mut Publish, extension: &Extension, outcome: PublishOutcome) {
    match outcome {
        PublishOutcome::Stored(id) => wire::attach_stored_id(publish, &extension.name, id),
        PublishOutcome::NotStored => {}
        PublishOutcome::Failed(e) => {
            tracing::warn!(extension = extension.name, topic = %publish.topic, "not stored: {}", e.describe());
            message::set_flag(publish, STORE_FAILED);
        }
    }
}

/// Whether rmqtt keeps the session after this connection ends (as its own `clean_session`
/// decides): MQTT 3.1.1 `clean_session = false`, or an MQTT 5 session expiry interval.
async fn session_kept(session: &Session) -> bool {
    match session.connect_info().await.as_deref() {
        Ok(ConnectInfo::V3(_, connect)) => !connect.clean_session,
        Ok(ConnectInfo::V5(..)) => {
            let disconnect = session.disconnect().await.ok().flatten();
            !session.fitter.session_expiry_interval(disconnect.as_ref()).is_zero()
        }
        Err(_) => false,
    }
}

fn connection(session: &Session) -> Connection {
    Connection { clientid: session.id.client_id.to_string(), since: session.id.create_time }
}

/// Messages an extension forwards to a session come "from" it: a system sender named after it.
/// The sender also names the connection it forwards to (in its user name, which a system sender
/// has no other use for), for [`forwarded_to`].
fn from_extension(session: &Session, extension: &Extension) -> From {
    let to = Some(session.id.create_time.to_string().into());
    From::from_system(Id::new(session.id.node_id, 0, None, None, extension.name.as_str().into(), to))
}

fn is_from(from: &From, extension: &Extension) -> bool {
    from.is_system() && *from.id.client_id == *extension.name
}

/// Whether our forward `from` was for the connection created at `since`. rmqtt hands what it
/// queued for a kept session to the connection that resumes it, our forwards to an earlier one
/// too.
fn forwarded_to(from: &From, since: i64) -> bool {
    from.id.username.as_deref().and_then(|to| to.parse::<i64>().ok()) == Some(since)
}

#[async_trait]
impl Handler for Hooks {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::ClientConnected(session) => self.client_connected(session).await,
            Parameter::ClientDisconnected(session, reason) => {
                let client = message::client(&session.id);
                let kept = session_kept(session).await;
                for extension in self.extensions.iter() {
                    let returned = extension.deliveries.disconnected(&connection(session), kept);
                    self.refetch(extension, returned).await;
                    extension.client_disconnected(&client, &reason.to_string()).await;
                }
            }
            // The client left and rmqtt keeps its session (after `ClientDisconnected`): what it
            // had in flight, rmqtt resends when the session resumes. Outstanding from then on,
            // so that a page sent before the resends does not send them too.
            Parameter::OfflineInflightMessages(session, in_flight) => {
                let clientid = session.id.client_id.to_string();
                for extension in self.extensions.iter() {
                    let stored = in_flight
                        .iter()
                        .filter_map(|m| {
                            Some((wire::stored_id(&m.publish, &extension.name)?, m.publish.topic.to_string()))
                        })
                        .collect();
                    extension.deliveries.kept_in_flight(&clientid, stored);
                }
            }
            // A kept session expired: its subscriptions end with it, as if the client had
            // unsubscribed (the rules say what that does to their read positions).
            Parameter::SessionTerminated(session, Reason::SessionExpiration) => {
                let client = message::client(&session.id);
                for extension in self.extensions.iter() {
                    extension.session_expired(&client).await;
                }
            }
            Parameter::SessionSubscribed(session, subscribe) => self.session_subscribed(session, subscribe).await,
            Parameter::SessionUnsubscribed(session, unsubscribe) => {
                let client = message::client(&session.id);
                let filter = message::filter(&unsubscribe.topic_filter, unsubscribe.shared_group.as_ref());
                for extension in self.extensions.iter() {
                    let returned = extension.deliveries.unsubscribed(&connection(session), &filter);
                    self.refetch(extension, returned).await;
                    extension.session_unsubscribed(&client, &filter).await;
                    // What was held for it may be what another subscription still waits for.
                    let (scx, extension, session) = (self.scx.clone(), extension.clone(), (*session).clone());
                    tokio::spawn(async move { release_held(&scx, &extension, &session).await });
                }
            }
            Parameter::MessagePublish(_, from, publish) => {
                let publish = match acc {
                    Some(HookResult::Publish(p)) => p,
                    _ => (*publish).clone(),
                };
                BrokerStats::add(&self.stats.received);
                return (true, Some(HookResult::Publish(self.message_publish(from, publish).await)));
            }
            Parameter::MessagePublishCheckAcl(session, publish) if message::has_flag(publish, STORE_FAILED) => {
                // Fail-closed. MQTT 3.1.1 has no negative PUBACK: the connection closes instead, and the
                // client sends the message again when it reconnects.
                BrokerStats::add(&self.stats.refused);
                let v5 = session.protocol().await.is_ok_and(|p| p >= 5);
                let refused = PublishResult::reason_code(
                    PublishAckReason::ImplementationSpecificError,
                    Some("message not stored".into()),
                    !v5,
                );
                return (false, Some(HookResult::PublishAclResult(PublishAclResult(refused))));
            }
            // Our own forward to an earlier connection of the client (a backlog, released
            // messages), which rmqtt kept in the session's queue and hands this one on
            // resumption: stored, and not acked, so this connection's backlog sends it (once).
            // A resend of one that was in flight (DUP) goes, below.
            Parameter::MessageExpiryCheck(session, from, publish)
                if !publish.dup
                    && self.extensions.iter().any(|e| is_from(from, e))
                    && !forwarded_to(from, session.id.create_time) =>
            {
                return (false, Some(HookResult::MessageExpiry));
            }
            // Our own forwards (a backlog, released messages) were counted when they went; a
            // resend of one (DUP, a resumed session) is counted again, as any resend.
            Parameter::MessageExpiryCheck(session, from, publish) if !from.is_system() || publish.dup => {
                // Held back behind a backlog (the broker drops it here, the backlog sends it
                // later), or already sent by one.
                for extension in self.extensions.iter() {
                    let keep = || Routed((*publish).clone());
                    let live =
                        Live { topic: &publish.topic, resend: publish.dup, qos: publish.qos.value(), keep: &keep };
                    if let Some(id) = wire::stored_id(publish, &extension.name)
                        && extension.deliveries.hold(&connection(session), id, live)
                    {
                        return (false, Some(HookResult::MessageExpiry));
                    }
                }
            }
            Parameter::MessageDelivered(session, from, publish) => {
                BrokerStats::add(&self.stats.delivered);
                self.message_delivered(session, from, publish).await
            }
            Parameter::MessageAcked(session, from, publish) => self.message_acked(session, from, publish).await,
            Parameter::MessageDropped(Some(to), from, publish, reason) => {
                let connection = Connection { clientid: to.client_id.to_string(), since: to.create_time };
                for extension in self.extensions.iter() {
                    if is_from(from, extension) && forwarded_to(from, to.create_time) {
                        extension.deliveries.forwarded_gone(&connection);
                    }
                    let Some(id) = wire::stored_id(publish, &extension.name) else { continue };
                    // Expired on the way (MQTT 5 message expiry): meant to be skipped, and never
                    // acked, so the acks behind it pass without it. (The broker also reports
                    // what the delivery protocol held back or found a duplicate as expired:
                    // those have time left.)
                    if matches!(reason, Reason::MessageExpiration) {
                        if message::expired(publish) {
                            extension.expired(&connection, || message::client(to), id);
                        }
                        continue;
                    }
                    // Lost on the way (a full queue): left to the database, the subscriptions it
                    // concerns catch up from their positions. Held-back ones come later.
                    if publish.qos != QoS::AtMostOnce {
                        tracing::debug!(extension = extension.name, clientid = %to.client_id, id, "a stored message was let go ({reason})");
                        let restart = extension.deliveries.lost(&connection, id, &publish.topic);
                        if restart.is_empty() {
                            continue;
                        }
                        tracing::info!(extension = extension.name, clientid = %to.client_id, id, "a stored message was let go ({reason}): its subscriptions catch up from the database");
                        let Some(session) = self.scx.extends.shared().await.entry(to.clone()).session() else {
                            continue;
                        };
                        for (filter, qos) in restart {
                            resume_backlog(&self.scx, extension, &session, filter, qos);
                        }
                    }
                }
            }
            _ => {}
        }
        (true, acc)
    }
}

impl Hooks {
    /// Connects the client in each extension. A resumed session's subscriptions fetch their
    /// backlogs again from their stored positions; what rmqtt queued for the session meanwhile is
    /// held back behind them and deduped by stored id (`Deliveries::connected`). rmqtt delivers
    /// that queue only after this hook.
    async fn client_connected(&self, session: &Session) {
        let client = message::client(&session.id);
        let resumed = session.session_present().await.unwrap_or(false);
        let mut stored = Vec::new();
        let mut restored = Vec::new();
        for extension in self.extensions.iter() {
            for (filter, qos) in extension.deliveries.connected(&connection(session), resumed) {
                restored.push(filter.clone());
                resume_backlog(&self.scx, extension, session, filter, qos);
            }
            stored.extend(extension.client_connected(&client).await);
        }
        // Stored subscriptions (on_subscribe_lookup) are applied like the client's own, but for
        // those the resumed session has already.
        let subscribes: Vec<Subscribe> = stored
            .iter()
            .filter(|s| !restored.contains(&s.filter))
            .filter_map(|s| {
                let qos = QoS::try_from(s.qos).unwrap_or(QoS::AtMostOnce);
                Subscribe::from_v3(&s.filter.as_str().into(), qos, true, false)
                    .inspect_err(|e| {
                        tracing::warn!(clientid = client.clientid, "stored subscription {}: {e}", s.filter)
                    })
                    .ok()
            })
            .collect();
        if !subscribes.is_empty()
            && let Some(tx) = self.scx.extends.shared().await.entry(session.id.clone()).tx()
        {
            let _ = tx.unbounded_send(SessionMessage::Subscribes(subscribes, None));
        }
    }

    /// Called before the SUBACK goes out. Holds live messages back from now on and fetches the
    /// first page here, so that the read position of a first subscription (`first_fetch`) is
    /// taken before anything published after the SUBACK. The backlog is sent by a task of its
    /// own, so that it follows the SUBACK.
    async fn session_subscribed(&self, session: &Session, subscribe: &Subscribe) {
        let subscription = message::subscription(subscribe);
        let client = message::client(&session.id);
        for extension in self.extensions.iter() {
            let start = extension.deliveries.subscribed(&connection(session), &subscription.filter, subscription.qos);
            // Its acks so far first: the fetch starts from the position they leave.
            extension.acks.flush(&client.clientid, &subscription.filter).await;
            let call = async |i: &mut Instance| i.session_subscribed(&client, &subscription).await;
            let first = extension.fetch(&client, &subscription, None, call).await;
            if !start {
                // Its backlog is going out already (the rules have seen the SUBSCRIBE).
                continue;
            }
            let (extension, session, subscription) = (extension.clone(), session.clone(), subscription.clone());
            let scx = self.scx.clone();
            tokio::spawn(async move {
                match first {
                    Some(first) => send_backlog(&scx, &extension, &session, &subscription, Some(first)).await,
                    None => {
                        let Some(outbox) = SessionOutbox::of(&scx, &session, &extension).await else { return };
                        adapter::fetch_failed(&extension, &connection(&session), &subscription.filter, &outbox).await;
                    }
                }
            });
        }
    }

    /// Members of share groups fetch the group's backlog again (another member left messages
    /// unacked), each if it is still the client's connection.
    async fn refetch(&self, extension: &Arc<Extension>, members: Vec<Refetch>) {
        for (member, filter, qos) in members {
            let id = Id::new(self.scx.node.id(), 0, None, None, member.clientid.as_str().into(), None);
            let Some(session) = self.scx.extends.shared().await.entry(id).session() else { continue };
            if session.id.create_time != member.since {
                continue;
            }
            tracing::debug!(extension = extension.name, clientid = member.clientid, filter, "returned to the group");
            resume_backlog(&self.scx, extension, &session, filter, qos);
        }
    }

    /// Stores the message with every extension; returns it carrying the stored ids, or marked
    /// as failed for the ACL check that follows.
    async fn message_publish(&self, from: &From, mut publish: Publish) -> Publish {
        message::strip_own_properties(&mut publish);
        let storing: Vec<&Arc<Extension>> = self.extensions.iter().filter(|e| e.publishes(&publish.topic)).collect();
        if storing.is_empty() {
            return publish;
        }
        let sender = from.id.client_id.to_string();
        let message = message::to_message(&publish, &sender, None);
        let sent = wire::qos2_sent(&publish, &sender);
        if let Some((last, others)) = storing.split_last() {
            for extension in others {
                let outcome = extension.message_publish(message.clone(), sent.clone(), publish.dup).await;
                record_outcome(&mut publish, extension, outcome);
            }
            // The last extension takes the message itself, the others a copy.
            let outcome = last.message_publish(message, sent, publish.dup).await;
            record_outcome(&mut publish, last, outcome);
        }
        publish
    }

    async fn message_delivered(&self, session: &Session, from: &From, publish: &Publish) {
        for extension in self.extensions.iter() {
            let id = wire::stored_id(publish, &extension.name);
            if is_from(from, extension) && forwarded_to(from, session.id.create_time) {
                extension.deliveries.forwarded_gone(&connection(session));
            }
            if id.is_some() {
                extension.host.metrics().delivered(1);
            }
            let message = || message::to_message(publish, &from.id.client_id, id);
            extension.message_delivered(|| message::client(&session.id), &publish.topic, message).await;
        }
    }

    async fn message_acked(&self, session: &Session, from: &From, publish: &Publish) {
        for extension in self.extensions.iter() {
            let Some(id) = wire::stored_id(publish, &extension.name) else { continue };
            let acked = message::to_message(publish, &from.id.client_id, Some(id));
            extension.acked(&connection(session), || message::client(&session.id), id, acked);
        }
    }
}

/// A session's queue in rmqtt, as the adapter loops send to it: our messages come "from" the
/// extension.
struct SessionOutbox {
    tx: Tx,
    from: From,
}

impl SessionOutbox {
    /// None if the session has gone.
    async fn of(scx: &ServerContext, session: &Session, extension: &Extension) -> Option<SessionOutbox> {
        let tx = scx.extends.shared().await.entry(session.id.clone()).tx()?;
        Some(SessionOutbox { tx, from: from_extension(session, extension) })
    }
}

impl Outbox<Routed> for SessionOutbox {
    fn send_stored(&self, message: Message, qos: u8, extension: &str) -> bool {
        let publish = message::to_publish(message, qos, extension);
        self.tx.unbounded_send(SessionMessage::Forward(self.from.clone(), publish)).is_ok()
    }

    fn send_held(&self, Routed(publish): Routed) -> bool {
        self.tx.unbounded_send(SessionMessage::Forward(self.from.clone(), publish)).is_ok()
    }
}

/// Sends a subscription's backlog (from `first`, or from its stored position) to the session.
async fn send_backlog(
    scx: &ServerContext,
    extension: &Extension,
    session: &Session,
    subscription: &Subscription,
    first: Option<FetchPage>,
) {
    let Some(outbox) = SessionOutbox::of(scx, session, extension).await else { return };
    let client = message::client(&session.id);
    adapter::send_backlog(extension, &connection(session), &client, subscription, first, &outbox).await;
}

/// Sends `filter`'s backlog again from its stored position, in a task of its own.
fn resume_backlog(scx: &ServerContext, extension: &Arc<Extension>, session: &Session, filter: String, qos: u8) {
    let (scx, extension, session) = (scx.clone(), extension.clone(), session.clone());
    tokio::spawn(async move {
        send_backlog(&scx, &extension, &session, &Subscription { filter, qos }, None).await;
    });
}

/// Forwards the held-back messages that may go now.
async fn release_held(scx: &ServerContext, extension: &Extension, session: &Session) {
    let Some(outbox) = SessionOutbox::of(scx, session, extension).await else { return };
    adapter::release_held(extension, &connection(session), &outbox).await;
}
