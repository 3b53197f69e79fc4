//! `harness run`: a small broker that replays broker events, given as JSON lines, through an
//! extension, and prints what the broker does, as JSON lines.
//!
//! It keeps what a broker keeps: online clients and their subscriptions. A publish goes to the
//! `message-publish` hook, then is routed live to online subscribers whose filters match. A
//! subscribe goes to `session-subscribed` and the whole backlog it returns is delivered, page by
//! page. Deliveries with QoS > 0 are acked back (`message-acked`) unless the subscription said
//! `"auto_ack": false`; then a `message.acked` event acks one. See README for the event format.

use std::collections::{BTreeMap, HashMap};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

use crate::bindings::{
    Client, Describe, FetchPage, HookError, Message, Property, PropertyValue, PublishOutcome, Subscription,
};
use crate::engine::{Instance, Runtime};
use crate::host::{Host, Sources};
use crate::protocol::delivery::{Connection, Deliveries, FetchEnd, Live, PassedAck, Refetch};

/// One input line.
#[derive(Debug, Deserialize)]
#[serde(tag = "event", deny_unknown_fields)]
enum Event {
    /// `clean_start: false` resumes the session the client id kept, if any; the session is kept
    /// after the client leaves when `session_expiry` (seconds) is above 0, or, without it, when
    /// `clean_start` is false (MQTT 3.1.1's `clean_session = false`).
    #[serde(rename = "client.connected")]
    ClientConnected {
        clientid: String,
        username: Option<String>,
        peerhost: Option<String>,
        #[serde(default = "yes")]
        clean_start: bool,
        session_expiry: Option<u32>,
    },
    #[serde(rename = "client.disconnected")]
    ClientDisconnected { clientid: String, reason: Option<String> },
    #[serde(rename = "session.subscribed")]
    SessionSubscribed {
        clientid: String,
        topic: String,
        #[serde(default)]
        qos: u8,
        #[serde(default = "yes")]
        auto_ack: bool,
    },
    #[serde(rename = "session.unsubscribed")]
    SessionUnsubscribed { clientid: String, topic: String },
    /// The session a client left behind expired: its subscriptions end.
    #[serde(rename = "session.expired")]
    SessionExpired { clientid: String },
    #[serde(rename = "message.publish")]
    MessagePublish {
        clientid: String,
        topic: String,
        #[serde(default)]
        qos: u8,
        #[serde(default)]
        retain: bool,
        payload: Option<String>,
        payload_base64: Option<String>,
        /// MQTT 5 properties, e.g. {"content-type": "text/plain", "message-expiry-interval": 60,
        /// "correlation-data": {"base64": "AAE="}}.
        #[serde(default)]
        properties: BTreeMap<String, serde_json::Value>,
    },
    #[serde(rename = "message.acked")]
    MessageAcked { clientid: String, id: i64 },
    /// Housekeeping: what a broker does every few seconds.
    #[serde(rename = "tick")]
    Tick {},
}

fn yes() -> bool {
    true
}

/// serde's message without its " at line 1 column N": a replay line is one line, and its number
/// is reported beside the message.
fn without_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

/// A property of a `message.publish` line: a string, a number (seconds, for
/// `message-expiry-interval`), or `{"base64": "..."}` for bytes (`correlation-data`).
fn property_value(key: &str, value: serde_json::Value) -> Result<PropertyValue, Stop> {
    match value {
        serde_json::Value::String(text) => Ok(PropertyValue::Text(text)),
        serde_json::Value::Number(number) => Ok(PropertyValue::Text(number.to_string())),
        serde_json::Value::Object(object) if object.len() == 1 && object.contains_key("base64") => {
            let text = object["base64"].as_str().unwrap_or_default();
            let bytes = BASE64.decode(text).map_err(|e| Stop::Failed(format!("properties.{key}.base64: {e}")))?;
            Ok(PropertyValue::Bytes(bytes))
        }
        other => {
            failed(format!("properties.{key}: expected a string, a number or {{\"base64\": \"...\"}}, got {other}"))
        }
    }
}

struct Session {
    client: Client,
    /// This connection, for the delivery protocol.
    connection: Connection,
    /// Filter to (granted QoS, auto-ack).
    subscriptions: BTreeMap<String, (u8, bool)>,
    /// Delivered with QoS > 0 and not acked yet, by stored id: what a `message.acked` line may
    /// name. Which positions an ack moves is the protocol's ack gate's to say.
    unacked: HashMap<i64, Message>,
    /// The session outlives this connection (persistent).
    kept: bool,
}

/// Why an event stopped.
enum Stop {
    /// The event failed: reported as an error line, the replay goes on.
    Failed(String),
    /// The guest trapped: its instance is unusable, the replay ends.
    Trap(anyhow::Error),
}

impl From<HookError> for Stop {
    fn from(e: HookError) -> Stop {
        let message = e.describe();
        tracing::warn!("{message}");
        Stop::Failed(message)
    }
}

impl From<anyhow::Error> for Stop {
    fn from(e: anyhow::Error) -> Stop {
        Stop::Trap(e)
    }
}

impl From<std::io::Error> for Stop {
    fn from(e: std::io::Error) -> Stop {
        Stop::Trap(e.into())
    }
}

fn failed<T>(message: impl Into<String>) -> Result<T, Stop> {
    Err(Stop::Failed(message.into()))
}

/// A control line: `{"control":"reload"}` reloads the module and rules from their files;
/// `{"control":"mark"}` prints `{"mark":{"line":N}}`, so that a program feeding events one at a
/// time knows when everything the lines before it caused has been printed.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Control {
    control: ControlCommand,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ControlCommand {
    Reload,
    Mark,
    /// Forget every connection and kept session, as a broker process that restarts (the
    /// database keeps what it has).
    Restart,
}

pub struct Broker<'a, W> {
    host: &'a Host,
    /// Where reloads come from, when the host was loaded from files.
    reload_from: Option<(&'a Runtime, Sources)>,
    out: W,
    sessions: BTreeMap<String, Session>,
    /// The auto-ack choice of each subscription of a kept session (the protocol keeps the rest).
    kept: BTreeMap<String, BTreeMap<String, bool>>,
    /// The delivery protocol (as the broker's): dedupe by stored id, the ack gates.
    deliveries: Deliveries<Message>,
    /// Connections so far: each one's `since`.
    connections: i64,
    published: u64,
}

impl<'a, W: AsyncWrite + Unpin> Broker<'a, W> {
    pub fn new(host: &'a Host, out: W) -> Self {
        Broker {
            host,
            reload_from: None,
            out,
            sessions: BTreeMap::new(),
            kept: BTreeMap::new(),
            deliveries: Deliveries::default(),
            connections: 0,
            published: 0,
        }
    }

    /// Lets reloads (control lines, `reloads` requests) reload the host from `sources`.
    pub fn reloading_from(mut self, runtime: &'a Runtime, sources: Sources) -> Self {
        self.reload_from = Some((runtime, sources));
        self
    }

    /// Replays every line of `input`. A malformed line or a failed event is an error line, and
    /// so is a guest trap (its instance is replaced); only an I/O error stops the replay.
    /// Each message on `reloads` (a file watcher, SIGHUP) reloads the host between two events.
    pub async fn replay(
        &mut self,
        input: impl AsyncBufRead + Unpin,
        mut reloads: Option<tokio::sync::mpsc::UnboundedReceiver<String>>,
    ) -> anyhow::Result<()> {
        let mut lines = input.lines();
        let mut number = 0u64;
        loop {
            let reload_requested = async {
                match reloads.as_mut() {
                    Some(requests) => requests.recv().await,
                    None => std::future::pending().await,
                }
            };
            let line = tokio::select! {
                line = lines.next_line() => line?,
                Some(why) = reload_requested => {
                    self.reload(None, &why).await?;
                    continue;
                }
            };
            let Some(line) = line else { break };
            number += 1;
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let result = if line.contains("\"control\"") {
                match serde_json::from_str::<Control>(&line) {
                    Ok(Control { control: ControlCommand::Reload }) => {
                        self.reload(Some(number), "control line").await?;
                        continue;
                    }
                    Ok(Control { control: ControlCommand::Restart }) => {
                        self.sessions.clear();
                        self.kept.clear();
                        self.deliveries = Deliveries::default();
                        continue;
                    }
                    Ok(Control { control: ControlCommand::Mark }) => {
                        self.emit(json!({"mark": {"line": number}})).await?;
                        self.out.flush().await?;
                        continue;
                    }
                    Err(e) => failed(format!("malformed control line: {}", without_position(&e))),
                }
            } else {
                match serde_json::from_str::<Event>(&line) {
                    Ok(event) => self.handle(event).await,
                    Err(e) => failed(format!("malformed event: {}", without_position(&e))),
                }
            };
            match result {
                Ok(()) => {}
                Err(Stop::Failed(message)) => self.emit(json!({"error": {"line": number, "message": message}})).await?,
                Err(Stop::Trap(e)) => {
                    let message = format!("the extension failed: {e:#}");
                    self.emit(json!({"error": {"line": number, "message": message}})).await?;
                }
            }
        }
        self.out.flush().await?;
        Ok(())
    }

    /// Reloads module and rules from their files; a refused reload leaves the running ones. Its
    /// error line names the control line that asked for it (none for a signal or a file watch).
    async fn reload(&mut self, line: Option<u64>, why: &str) -> anyhow::Result<()> {
        let error = |message: &str| match line {
            Some(line) => json!({"error": {"line": line, "message": message}}),
            None => json!({"error": {"message": message}}),
        };
        let Some((runtime, sources)) = &self.reload_from else {
            return self.emit(error("reload: this host was not loaded from files")).await;
        };
        match self.host.reload(runtime, sources).await {
            Ok(()) => {
                tracing::info!("reloaded ({why})");
                let reloaded = json!({"module": sources.module, "rules": sources.rules, "why": why});
                self.emit(json!({ "reloaded": reloaded })).await
            }
            Err(e) => {
                tracing::error!("reload refused ({why}), the running configuration stays: {e:#}");
                let message = format!("reload refused, the running configuration stays: {e:#}");
                self.emit(error(&message)).await
            }
        }
    }

    async fn handle(&mut self, event: Event) -> Result<(), Stop> {
        match event {
            Event::ClientConnected { clientid, username, peerhost, clean_start, session_expiry } => {
                let client = Client { clientid: clientid.clone(), username, peerhost };
                // The broker has accepted the connection when the hook fires (as in EMQX): a
                // failing rule is reported, the client stays connected. A new connection takes
                // over the client id's old one, as in MQTT.
                self.connections += 1;
                let connection = Connection { clientid: clientid.clone(), since: self.connections };
                let kept = self.kept.remove(&clientid);
                let resumed = !clean_start && kept.is_some();
                let restored = self.deliveries.connected(&connection, resumed);
                let session = Session {
                    client: client.clone(),
                    connection,
                    subscriptions: BTreeMap::new(),
                    unacked: HashMap::new(),
                    kept: session_expiry.map_or(!clean_start, |secs| secs > 0),
                };
                self.sessions.insert(clientid.clone(), session);
                // A resumed session's subscriptions fetch again from their stored positions.
                let auto_ack = kept.unwrap_or_default();
                for (filter, qos) in restored {
                    let auto_ack = auto_ack.get(&filter).copied().unwrap_or(true);
                    self.backlog(&clientid, Subscription { filter, qos }, auto_ack, false).await?;
                }
                let stored = self.host.call(async |i| i.client_connected(&client).await).await??;
                for subscription in stored {
                    self.subscribe(&clientid, subscription, true).await?;
                }
            }
            Event::ClientDisconnected { clientid, reason } => {
                let client = self.session(&clientid)?.client.clone();
                // Unacked deliveries are simply forgotten: the position did not move past them,
                // so they come again on the next subscription (at least once).
                if let Some(session) = self.sessions.remove(&clientid) {
                    let returned = self.deliveries.disconnected(&session.connection, session.kept);
                    if session.kept {
                        let auto_ack = session.subscriptions.iter().map(|(f, (_, auto))| (f.clone(), *auto)).collect();
                        self.kept.insert(clientid.clone(), auto_ack);
                    }
                    self.return_to_groups(returned).await?;
                }
                self.host
                    .call(async |i| i.client_disconnected(&client, reason.as_deref().unwrap_or("normal")).await)
                    .await??;
            }
            Event::SessionExpired { clientid } => {
                if self.sessions.contains_key(&clientid) {
                    return failed(format!("{clientid} is connected: its session cannot expire"));
                }
                self.kept.remove(&clientid);
                let client = Client { clientid: clientid.clone(), username: None, peerhost: None };
                for filter in self.deliveries.session_ended(&clientid) {
                    self.host.call(async |i| i.session_unsubscribed(&client, &filter).await).await??;
                }
            }
            Event::SessionSubscribed { clientid, topic, qos, auto_ack } => {
                if qos > 2 {
                    return failed(format!("qos {qos} is not 0, 1 or 2"));
                }
                mqtt_topic::validate_filter(&topic).map_err(Stop::Failed)?;
                self.subscribe(&clientid, Subscription { filter: topic, qos }, auto_ack).await?;
            }
            Event::SessionUnsubscribed { clientid, topic } => {
                let session = self.session(&clientid)?;
                if session.subscriptions.remove(&topic).is_none() {
                    return failed(format!("{clientid} is not subscribed to {topic}"));
                }
                let (client, connection) = (session.client.clone(), session.connection.clone());
                let returned = self.deliveries.unsubscribed(&connection, &topic);
                self.host.call(async |i| i.session_unsubscribed(&client, &topic).await).await??;
                self.return_to_groups(returned).await?;
            }
            Event::MessagePublish { clientid, topic, qos, retain, payload, payload_base64, properties } => {
                let payload = match (payload, payload_base64) {
                    (Some(text), None) => text.into_bytes(),
                    (None, Some(b64)) => {
                        BASE64.decode(b64).map_err(|e| Stop::Failed(format!("payload_base64: {e}")))?
                    }
                    (None, None) => Vec::new(),
                    (Some(_), Some(_)) => return failed("give payload or payload_base64, not both"),
                };
                if qos > 2 || topic.is_empty() || topic.contains(['+', '#']) {
                    return failed(format!("cannot publish to `{topic}` with qos {qos}"));
                }
                self.publish(clientid, topic, qos, retain, payload, properties).await?;
            }
            Event::MessageAcked { clientid, id } => {
                let session = self.session(&clientid)?;
                let Some(acked) = session.unacked.remove(&id) else {
                    return failed(format!("{clientid} has no unacked message with id {id}"));
                };
                let (client, connection) = (session.client.clone(), session.connection.clone());
                let passed = self.deliveries.acked(&connection, id, acked);
                self.pass_acks(&client, passed).await?;
            }
            Event::Tick {} => {
                let deleted = self.host.call(async |i| i.tick().await).await??;
                self.emit(json!({"tick": {"deleted": deleted}})).await?;
            }
        }
        Ok(())
    }

    fn session(&mut self, clientid: &str) -> Result<&mut Session, Stop> {
        self.sessions.get_mut(clientid).ok_or_else(|| Stop::Failed(format!("client {clientid} is not connected")))
    }

    /// Members of share groups fetch what another member left unacked.
    async fn return_to_groups(&mut self, members: Vec<Refetch>) -> Result<(), Stop> {
        for (member, filter, qos) in members {
            let Some(session) = self.sessions.get(&member.clientid) else { continue };
            let auto_ack = session.subscriptions.get(&filter).is_none_or(|(_, auto)| *auto);
            self.backlog(&member.clientid, Subscription { filter, qos }, auto_ack, false).await?;
        }
        Ok(())
    }

    async fn subscribe(&mut self, clientid: &str, subscription: Subscription, auto_ack: bool) -> Result<(), Stop> {
        self.backlog(clientid, subscription, auto_ack, true).await
    }

    /// Delivers a subscription's backlog: from `session-subscribed` for a SUBSCRIBE (`first`),
    /// from `session-resume` for a resumed session's subscription.
    async fn backlog(
        &mut self,
        clientid: &str,
        subscription: Subscription,
        auto_ack: bool,
        first: bool,
    ) -> Result<(), Stop> {
        let session = self.session(clientid)?;
        session.subscriptions.insert(subscription.filter.clone(), (subscription.qos, auto_ack));
        let (client, connection) = (session.client.clone(), session.connection.clone());
        let filter = &subscription.filter;
        let start = self.deliveries.subscribed(&connection, filter, subscription.qos) || !first;
        let mut page = if first {
            let call = async |i: &mut Instance| i.session_subscribed(&client, &subscription).await;
            self.host.fetch(&client, &subscription, None, call).await??
        } else {
            self.resume(&client, &connection, &subscription).await?
        };
        if !start {
            // Its backlog is going out already.
            return Ok(());
        }
        // The whole backlog, in order, one page in memory at a time. Events come one at a time,
        // so nothing live arrives meanwhile; the protocol still says what a page may send (not
        // what the client already has from another subscription).
        loop {
            loop {
                let decisions = self.deliveries.forward_page(&connection, filter, &page.messages).unwrap_or_default();
                for (message, go) in page.messages.into_iter().zip(decisions) {
                    if go {
                        let qos = message.qos.min(subscription.qos);
                        self.deliver(clientid, message, qos, auto_ack).await?;
                        self.deliveries.forwarded_gone(&connection);
                    }
                }
                let credited = self.deliveries.credited(&connection, filter);
                self.pass_acks(&client, credited).await?;
                let Some(cursor) = page.next else { break };
                let next = async |i: &mut Instance| i.session_fetch_next(&client, &subscription, &cursor).await;
                page = self.host.fetch(&client, &subscription, Some(&cursor), next).await??;
            }
            // Once more from the stored position when something was returned to it meanwhile.
            if self.deliveries.fetch_end(&connection, filter) != FetchEnd::Refetch {
                return Ok(());
            }
            page = self.resume(&client, &connection, &subscription).await?;
        }
    }

    /// The backlog's first page again from the stored position.
    async fn resume(
        &mut self,
        client: &Client,
        connection: &Connection,
        subscription: &Subscription,
    ) -> Result<FetchPage, Stop> {
        self.deliveries.refetching(connection, &subscription.filter);
        let call = async |i: &mut Instance| i.session_resume(client, subscription).await;
        Ok(self.host.fetch(client, subscription, None, call).await??)
    }

    async fn publish(
        &mut self,
        sender: String,
        topic: String,
        qos: u8,
        retain: bool,
        payload: Vec<u8>,
        properties: BTreeMap<String, serde_json::Value>,
    ) -> Result<(), Stop> {
        self.published += 1;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let mut message = Message {
            id: None,
            msgid: format!("{:x}-{}", now.as_nanos(), self.published),
            sender,
            topic,
            payload,
            qos,
            retain,
            timestamp: now.as_millis() as i64,
            properties: properties
                .into_iter()
                .map(|(key, value)| property_value(&key, value).map(|value| Property { key, value }))
                .collect::<Result<_, Stop>>()?,
        };
        let outcome = self.host.call(async |i| i.message_publish(std::slice::from_ref(&message)).await).await?.pop();
        match outcome {
            Some(PublishOutcome::Stored(id)) => message.id = Some(id),
            Some(PublishOutcome::NotStored) => {}
            // Fail-closed: the publisher is not told the message was accepted, nobody gets it.
            Some(PublishOutcome::Failed(e)) => {
                tracing::warn!("message not stored: {}", e.describe());
                return failed(format!("message not stored: {}", e.describe()));
            }
            None => return failed("message-publish returned no outcome"),
        }
        let published =
            json!({"published": {"clientid": message.sender, "topic": message.topic, "qos": qos, "id": message.id}});
        self.emit(published).await?;

        // Live routing: each online client once, at the highest QoS among its matching filters;
        // the protocol counts the delivery for each of them. A share group's message goes to one
        // of its members, in turn.
        let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (clientid, session) in &self.sessions {
            for filter in session.subscriptions.keys() {
                if mqtt_topic::shared(filter).is_some() && mqtt_topic::matches(filter, &message.topic) {
                    groups.entry(filter).or_default().push(clientid);
                }
            }
        }
        let turn = self.published as usize;
        let chosen: Vec<(&str, &str)> =
            groups.iter().map(|(filter, members)| (*filter, members[turn % members.len()])).collect();
        let receivers: Vec<(String, u8, bool)> = self
            .sessions
            .iter()
            .filter_map(|(clientid, session)| {
                let matching: Vec<(&String, &(u8, bool))> = session
                    .subscriptions
                    .iter()
                    .filter(|(filter, _)| mqtt_topic::matches(filter, &message.topic))
                    .filter(|(filter, _)| {
                        mqtt_topic::shared(filter).is_none() || chosen.contains(&(filter.as_str(), clientid.as_str()))
                    })
                    .collect();
                let (qos, auto_ack) = matching.iter().map(|(_, options)| **options).max()?;
                Some((clientid.clone(), qos, auto_ack))
            })
            .collect();
        for (clientid, sub_qos, auto_ack) in receivers {
            if let (Some(id), Some(session)) = (message.id, self.sessions.get(&clientid)) {
                let keep = || message.clone();
                let live = Live { topic: &message.topic, resend: false, qos: qos.min(sub_qos), keep: &keep };
                if self.deliveries.hold(&session.connection, id, live) {
                    continue; // the client has it already
                }
            }
            // MQTT: a message forwarded to an established subscription goes without RETAIN.
            let live = Message { retain: false, ..message.clone() };
            self.deliver(&clientid, live, qos.min(sub_qos), auto_ack).await?;
        }
        Ok(())
    }

    /// Delivers one message to an online client, then acks it back if it asked for that.
    async fn deliver(&mut self, clientid: &str, message: Message, qos: u8, auto_ack: bool) -> anyhow::Result<()> {
        let payload = match std::str::from_utf8(&message.payload) {
            Ok(text) => ("payload", json!(text)),
            Err(_) => ("payload_base64", json!(BASE64.encode(&message.payload))),
        };
        let mut deliver = json!({"clientid": clientid, "topic": message.topic, "qos": qos, "retain": message.retain, "id": message.id});
        deliver[payload.0] = payload.1;
        self.emit(json!({ "deliver": deliver })).await?;
        self.host.metrics().delivered(1);

        let Some(session) = self.sessions.get_mut(clientid) else { return Ok(()) };
        let (client, connection) = (session.client.clone(), session.connection.clone());
        let message = Message { qos, ..message };
        match message.id {
            Some(id) if qos > 0 && !auto_ack => {
                session.unacked.insert(id, message.clone());
            }
            _ => {}
        }
        if let Err(e) = self.host.call(async |i| i.message_delivered(&client, &message).await).await? {
            self.report(clientid, &e).await?;
        }
        if let (Some(id), true) = (message.id, qos > 0 && auto_ack) {
            let passed = self.deliveries.acked(&connection, id, message);
            self.pass_acks(&client, passed).await?;
        }
        Ok(())
    }

    /// What the ack gates let through goes to `message-acked`.
    async fn pass_acks(&mut self, client: &Client, passed: Vec<PassedAck>) -> anyhow::Result<()> {
        for (message, positions) in passed {
            if let Err(e) = self.host.call(async |i| i.message_acked(client, &message, &positions).await).await? {
                self.report(&client.clientid, &e).await?;
            }
        }
        Ok(())
    }

    async fn report(&mut self, clientid: &str, e: &HookError) -> anyhow::Result<()> {
        tracing::warn!("{}", e.describe());
        self.emit(json!({"error": {"clientid": clientid, "message": e.describe()}})).await
    }

    async fn emit(&mut self, line: serde_json::Value) -> anyhow::Result<()> {
        let mut text = line.to_string();
        text.push('\n');
        self.out.write_all(text.as_bytes()).await?;
        Ok(())
    }
}
