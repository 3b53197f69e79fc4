//! One client connection through the proxy: its MQTT 5 connection to the upstream broker, and
//! the adapter's side of the delivery protocol (`host_harness::protocol`) for it. One task per
//! client owns both sockets; the backlog tasks of `host_harness::adapter` hand it their messages
//! through a channel ([`Own`]).
//!
//! What each event does, in order, is the same as in the rmqtt broker (`broker/src/hooks.rs`);
//! what differs is where the broker's own work is done here:
//! - **Publish.** A QoS 1/2 publish is stored first, one publish of a client at a time (the group
//!   commit keeps each publisher's order), then forwarded upstream with its stored ids; the
//!   broker's PUBACK/PUBREC goes back to the publisher. A store that failed refuses the publish
//!   (MQTT 5: the reason code; 3.1.1: the connection closes) and nothing goes upstream.
//! - **Subscribe.** Forwarded upstream; live messages for it are held back from then on. After
//!   the broker's SUBACK the first page is fetched, then the client gets its SUBACK, then the
//!   backlog: so no message falls between the stored position and the live subscription.
//! - **Packet ids.** The proxy numbers every PUBLISH to the client (the broker's deliveries and
//!   its own never share an id) and maps each ack back to where it belongs: to the broker, to
//!   the ack gate, or to both. Towards the broker the client's packet ids go unchanged (a QoS 2
//!   exchange then survives a reconnection in the broker's session); only the proxy's own
//!   SUBSCRIBEs (stored subscriptions) take ids, from the top of the range.
//! - **Flow.** The broker's deliveries and the proxy's share the client's window (its Receive
//!   Maximum, or `mqtt.max_inflight`), which the broker is told as the proxy's Receive Maximum.
//!   What does not fit waits here; each backlog sends its next slice only when its last has
//!   left, so what waits is bounded by the window plus a slice per subscription fetching.
//!   The client's publishes waiting for the store are bounded too: past the bound the proxy
//!   stops reading from the client.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::num::NonZeroU16;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use host_harness::Instance;
use host_harness::adapter::{self, Outbox};
use host_harness::bindings::{Client, Describe, Message, PublishOutcome, Subscription};
use host_harness::protocol::delivery::{Connection, Held, Live};
use host_harness::wire;
use rmqtt_codec::types::{Publish, QoS};
use rmqtt_codec::v5::{self, PublishAckReason};
use rmqtt_codec::{MqttCodec, MqttPacket, v3};
use rmqtt_net::MqttStream;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::Framed;

use crate::Proxy;
use crate::config::RetainedFrom;
use crate::packet_ids::PacketIds;
use crate::translate;

/// Publishes of one client waiting to be stored, at most (see `Session::reading`).
const QUEUED_PUBLISHES: usize = 1000;
/// Their payload bytes, at most.
const QUEUED_BYTES: usize = 16 << 20;

/// How long a new connection may take to send its CONNECT, and the broker to answer it.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// A live message from the broker, held back behind a backlog as it came.
#[derive(Debug, Clone)]
pub struct Routed(pub Publish);

impl Held for Routed {
    fn topic(&self) -> &str {
        &self.0.topic
    }
    fn qos(&self) -> u8 {
        self.0.qos.value()
    }
}

/// What the backlog tasks and the SUBSCRIBE tasks hand the session.
pub enum Own {
    /// A message of extension `extension` (by index): a backlog's, or a held one released.
    Deliver { extension: usize, publish: Publish },
    /// The SUBACK of a client's SUBSCRIBE, once the first pages are fetched.
    SubAck(v5::SubscribeAck),
}

/// A client's session as the backlog tasks reach it.
pub struct ClientOutbox {
    pub own: mpsc::UnboundedSender<Own>,
    pub extension: usize,
}

impl Outbox<Routed> for ClientOutbox {
    fn send_stored(&self, message: Message, qos: u8, extension: &str) -> bool {
        let publish = wire::to_publish(message, qos, extension);
        self.own.send(Own::Deliver { extension: self.extension, publish }).is_ok()
    }

    fn send_held(&self, Routed(publish): Routed) -> bool {
        self.own.send(Own::Deliver { extension: self.extension, publish }).is_ok()
    }
}

/// Where a PUBLISH to the client came from, which says where its ack goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// The broker's delivery, under its packet id on the upstream connection (QoS 1/2).
    Broker(Option<NonZeroU16>),
    /// The proxy's own, for extension `n`: the broker knows nothing of it.
    Own(usize),
}

/// A PUBLISH to the client waiting for its ack.
struct Delivery {
    origin: Origin,
    publish: Publish,
    /// QoS 2: the client's PUBREC came (the ack gate has passed it).
    received: bool,
}

/// A SUBSCRIBE the broker has not answered yet: the client's (answered with its SUBACK), or the
/// proxy's own for stored subscriptions.
struct Subscribing {
    client: bool,
    filters: Vec<(String, u8)>,
    /// Per extension and filter: whether its backlog starts (`Deliveries::subscribed`).
    starts: Vec<Vec<bool>>,
}

type Storing = Pin<Box<dyn Future<Output = (Box<Publish>, bool)> + Send>>;

/// The MQTT version the client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V3,
    V5,
}

/// Serves one accepted connection until it ends.
pub async fn serve<Io>(proxy: Arc<Proxy>, stream: MqttStream<Io>, peer: std::net::SocketAddr) -> anyhow::Result<()>
where
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (io, version) = match stream {
        MqttStream::V3(s) => (s.io, Version::V3),
        MqttStream::V5(s) => (s.io, Version::V5),
    };
    let Some(mut session) = Session::connect(proxy, io, version, peer).await? else { return Ok(()) };
    let ended = session.run().await;
    session.end(ended.as_ref().err().map(|e| format!("{e:#}"))).await;
    ended
}

struct Session<Io> {
    proxy: Arc<Proxy>,
    client_io: Framed<Io, MqttCodec>,
    version: Version,
    upstream: Framed<TcpStream, v5::Codec>,
    connection: Connection,
    client: Client,
    keep_alive: u16,
    /// Session expiry (seconds) as last said: CONNECT, or DISCONNECT.
    session_expiry: u32,
    /// QoS 1/2 messages the client may have unacknowledged.
    window: usize,
    /// The largest packet an MQTT 5 client takes (its Maximum Packet Size).
    max_packet: Option<usize>,
    to_client: PacketIds<Delivery>,
    /// The SUBSCRIBEs the broker has not answered, by packet id.
    subscribing: HashMap<NonZeroU16, Subscribing>,
    /// Client-facing QoS 1/2 messages waiting for the window.
    waiting: VecDeque<(Origin, Publish)>,
    /// QoS 2 to the client: the broker's packet id → the client's, between the client's PUBREC
    /// and its PUBCOMP.
    upstream_rel: HashMap<NonZeroU16, NonZeroU16>,
    own: mpsc::UnboundedReceiver<Own>,
    own_tx: mpsc::UnboundedSender<Own>,
    /// The client's publishes not yet stored, in order; the one being stored.
    publishes: VecDeque<Box<Publish>>,
    storing: Option<Storing>,
    /// The client's DISCONNECT.
    disconnected: Option<v5::Disconnect>,
    /// Payload bytes of `publishes`: past [`QUEUED_BYTES`] (or [`QUEUED_PUBLISHES`] publishes),
    /// the proxy reads nothing more from the client until the store catches up.
    queued_bytes: usize,
    /// When the proxy last sent the broker anything: a client busy acking a backlog sends the
    /// broker nothing, so the proxy pings it within the keep-alive itself.
    upstream_sent: Instant,
    /// PINGREQs of the client the broker has not answered yet.
    pings_owed: u32,
}

impl<Io: AsyncRead + AsyncWrite + Unpin + Send + 'static> Session<Io> {
    /// Reads the client's CONNECT, connects upstream with it, and answers with the broker's
    /// CONNACK. None: the broker refused (the client was told why) or could not be reached.
    async fn connect(
        proxy: Arc<Proxy>,
        mut client_io: Framed<Io, MqttCodec>,
        version: Version,
        peer: std::net::SocketAddr,
    ) -> anyhow::Result<Option<Session<Io>>> {
        let first = tokio::time::timeout(HANDSHAKE, client_io.next()).await.context("no CONNECT in time")?;
        let max_inflight = proxy.config.mqtt.max_inflight;
        let (mut connect, client_window) = match first {
            Some(Ok((MqttPacket::V3(v3::Packet::Connect(connect)), _))) => {
                (translate::connect_to_v5(*connect, max_inflight), max_inflight)
            }
            Some(Ok((MqttPacket::V5(v5::Packet::Connect(connect)), _))) => {
                let window = connect.receive_max.map_or(max_inflight, |r| r.min(max_inflight));
                (*connect, window)
            }
            Some(Ok(_)) => bail!("the first packet was not a CONNECT"),
            // An empty client id with a session to keep: refused as a broker refuses it.
            Some(Err(rmqtt_codec::error::DecodeError::InvalidClientId)) => {
                let refused = v5::ConnectAck {
                    reason_code: v5::ConnectAckReason::ClientIdentifierNotValid,
                    ..Default::default()
                };
                send_to(&mut client_io, version, v5::Packet::ConnectAck(Box::new(refused))).await?;
                return Ok(None);
            }
            Some(Err(e)) => bail!("reading CONNECT: {e}"),
            None => return Ok(None),
        };
        // The broker sends the client no more than the proxy lets it, and no topic alias (the
        // proxy reads every topic); the client's other wishes go as they are.
        connect.receive_max = Some(client_window);
        connect.topic_alias_max = 0;
        let upstream = tokio::time::timeout(HANDSHAKE, TcpStream::connect(&proxy.config.upstream.address)).await;
        let upstream = match upstream {
            Ok(Ok(stream)) => stream,
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".into(),
                };
                tracing::warn!(address = proxy.config.upstream.address, "upstream broker unreachable: {why}");
                let refused =
                    v5::ConnectAck { reason_code: v5::ConnectAckReason::ServerUnavailable, ..Default::default() };
                let _ = send_to(&mut client_io, version, v5::Packet::ConnectAck(Box::new(refused))).await;
                return Ok(None);
            }
        };
        upstream.set_nodelay(true)?;
        let max_packet = proxy.config.mqtt.max_packet_size;
        // What the broker sends may carry stored ids beyond what the client sent: no limit here,
        // the broker keeps to the client's Maximum Packet Size.
        let mut upstream = Framed::new(upstream, v5::Codec::new(0, 0));
        let keep_alive = connect.keep_alive;
        let client_max_packet = connect.max_packet_size.map(|m| m.get() as usize);
        let session_expiry = connect.session_expiry_interval_secs;
        let mut clientid = connect.client_id.to_string();
        let username = connect.username.as_ref().map(|u| u.to_string());
        upstream.send(v5::Packet::Connect(Box::new(connect))).await.context("sending CONNECT upstream")?;
        let answer = tokio::time::timeout(HANDSHAKE, upstream.next()).await.context("no CONNACK from the broker")?;
        let mut ack = match answer {
            Some(Ok((v5::Packet::ConnectAck(ack), _))) => ack,
            Some(Ok((other, _))) => bail!("the broker answered CONNECT with {other:?}"),
            Some(Err(e)) => bail!("reading the broker's CONNACK: {e}"),
            None => bail!("the broker closed the connection at CONNECT"),
        };
        if ack.reason_code != v5::ConnectAckReason::Success {
            tracing::info!(clientid, reason = ?ack.reason_code, "the broker refused the connection");
            send_to(&mut client_io, version, v5::Packet::ConnectAck(ack)).await?;
            return Ok(None);
        }
        if let Some(assigned) = &ack.assigned_client_id {
            clientid = assigned.to_string();
        }
        ack.topic_alias_max = 0;
        ack.max_packet_size = Some(ack.max_packet_size.map_or(max_packet, |m| m.min(max_packet)));
        let resumed = ack.session_present;
        send_to(&mut client_io, version, v5::Packet::ConnectAck(ack)).await?;

        let (own_tx, own) = mpsc::unbounded_channel();
        let client = Client { clientid: clientid.clone(), username, peerhost: Some(peer.ip().to_string()) };
        let connection = proxy.register(&clientid, own_tx.clone(), client.clone());
        let mut session = Session {
            proxy,
            client_io,
            version,
            upstream,
            connection,
            client,
            keep_alive,
            session_expiry,
            window: usize::from(client_window.get()),
            max_packet: client_max_packet,
            to_client: Default::default(),
            subscribing: HashMap::new(),
            waiting: VecDeque::new(),
            upstream_rel: HashMap::new(),
            own,
            own_tx,
            publishes: VecDeque::new(),
            storing: None,
            disconnected: None,
            queued_bytes: 0,
            upstream_sent: Instant::now(),
            pings_owed: 0,
        };
        session.connected(resumed).await?;
        Ok(Some(session))
    }

    /// The connection is up: a resumed session's subscriptions send their backlogs again, and
    /// the stored subscriptions (`on_subscribe_lookup`) the session does not have are
    /// subscribed upstream.
    async fn connected(&mut self, resumed: bool) -> anyhow::Result<()> {
        let mut stored = Vec::new();
        let mut restored = Vec::new();
        for (index, extension) in self.proxy.extensions.iter().enumerate() {
            for (filter, qos) in extension.deliveries.connected(&self.connection, resumed) {
                restored.push(filter.clone());
                self.resume_backlog(index, Subscription { filter, qos });
            }
            stored.extend(extension.client_connected(&self.client).await);
        }
        let subscribe: Vec<(String, u8)> = stored
            .into_iter()
            .filter(|s| !restored.contains(&s.filter))
            .filter(|s| {
                mqtt_topic::validate_filter(&s.filter)
                    .inspect_err(|e| {
                        tracing::warn!(clientid = self.client.clientid, "stored subscription {}: {e}", s.filter)
                    })
                    .is_ok()
            })
            .map(|s| (s.filter, s.qos.min(2)))
            .collect();
        if !subscribe.is_empty() {
            self.subscribe(subscribe, None).await?;
        }
        Ok(())
    }

    fn resume_backlog(&self, extension: usize, subscription: Subscription) {
        resume_backlog(
            &self.proxy,
            extension,
            self.connection.clone(),
            self.client.clone(),
            self.own_tx.clone(),
            subscription,
        );
    }

    async fn run(&mut self) -> anyhow::Result<()> {
        let patience = (self.keep_alive > 0).then(|| Duration::from_millis(u64::from(self.keep_alive) * 1500));
        let mut deadline = patience.map(|p| Instant::now() + p);
        let upstream_ping = (self.keep_alive > 0).then(|| Duration::from_millis(u64::from(self.keep_alive) * 500));
        loop {
            tokio::select! {
                packet = self.client_io.next(), if self.reading() => {
                    let packet = match packet {
                        Some(Ok((packet, _))) => packet,
                        Some(Err(e)) => bail!("malformed packet from the client: {e}"),
                        None => return Ok(()),
                    };
                    if let Some(patience) = patience {
                        deadline = Some(Instant::now() + patience);
                    }
                    let packet = match packet {
                        MqttPacket::V3(packet) => translate::to_v5(packet).context("a packet no client sends")?,
                        MqttPacket::V5(packet) => packet,
                        MqttPacket::Version(_) => bail!("a second CONNECT"),
                    };
                    if !self.on_client_packet(packet).await? {
                        return Ok(());
                    }
                }
                packet = self.upstream.next() => {
                    match packet {
                        Some(Ok((packet, _))) => {
                            if !self.on_broker_packet(packet).await? {
                                return Ok(());
                            }
                        }
                        Some(Err(e)) => bail!("malformed packet from the broker: {e}"),
                        None => bail!("the broker closed the connection"),
                    }
                }
                Some(own) = self.own.recv() => self.on_own(own).await?,
                stored = async { self.storing.as_mut().expect("storing").await }, if self.storing.is_some() => {
                    self.storing = None;
                    let (publish, stored) = stored;
                    self.stored(*publish, stored).await?;
                    self.store_next();
                }
                _ = sleep_until(deadline), if self.reading() => bail!("keep-alive: nothing from the client for 1.5 times {} s", self.keep_alive),
                _ = sleep_until(upstream_ping.map(|p| self.upstream_sent + p)) => self.send_upstream(v5::Packet::PingRequest).await?,
            }
        }
    }

    /// Whether the proxy reads from the client: not while its publishes wait to be stored past
    /// the bounds (TCP then holds the client back).
    fn reading(&self) -> bool {
        self.publishes.len() < QUEUED_PUBLISHES && self.queued_bytes < QUEUED_BYTES
    }

    /// A packet from the client. False: the session ends (DISCONNECT).
    async fn on_client_packet(&mut self, packet: v5::Packet) -> anyhow::Result<bool> {
        match packet {
            // A topic the proxy cannot read is refused before anything is stored: topic aliases
            // are off (Topic Alias Maximum 0), and a topic name has no wildcards.
            v5::Packet::Publish(publish) if !is_topic_name(&publish) => {
                bail!("PUBLISH to {:?}: not a topic name (wildcards, empty, or a topic alias)", publish.topic)
            }
            // Without extensions nothing is stored: forwarded at once.
            v5::Packet::Publish(mut publish) if self.proxy.extensions.is_empty() => {
                wire::strip_stored_ids(&mut publish);
                self.stored(*publish, true).await?;
            }
            v5::Packet::Publish(publish) => {
                self.queued_bytes += publish.payload.len();
                self.publishes.push_back(publish);
                if self.storing.is_none() {
                    self.store_next();
                }
            }
            v5::Packet::PublishAck(ack) => self.client_acked(ack.packet_id).await?,
            v5::Packet::PublishReceived(ack) => self.client_acked(ack.packet_id).await?,
            v5::Packet::PublishComplete(ack) => {
                if let Some(delivery) = self.to_client.release(ack.packet_id) {
                    if let Origin::Broker(Some(upstream_id)) = delivery.origin {
                        self.send_upstream(v5::Packet::PublishComplete(translate::ack2(upstream_id))).await?;
                    }
                    self.send_waiting().await?;
                }
            }
            // The client's QoS 2 exchanges are the broker's, under the client's packet ids: a
            // PUBREL after a reconnection finds the message the broker kept in the session.
            v5::Packet::PublishRelease(release) => self.send_upstream(v5::Packet::PublishRelease(release)).await?,
            v5::Packet::Subscribe(subscribe) => {
                let filters = subscribe.topic_filters.iter().map(|(f, o)| (f.to_string(), o.qos.value())).collect();
                self.subscribe(filters, Some(subscribe)).await?;
            }
            v5::Packet::Unsubscribe(unsubscribe) => {
                for filter in &unsubscribe.topic_filters {
                    self.unsubscribed(filter).await;
                }
                self.send_upstream(v5::Packet::Unsubscribe(unsubscribe)).await?;
            }
            v5::Packet::PingRequest => {
                self.pings_owed += 1;
                self.send_upstream(v5::Packet::PingRequest).await?
            }
            // Forwarded once what the client published before it is (`end`).
            v5::Packet::Disconnect(disconnect) => {
                if let Some(expiry) = disconnect.session_expiry_interval_secs {
                    self.session_expiry = expiry;
                }
                self.disconnected = Some(disconnect);
                return Ok(false);
            }
            v5::Packet::Auth(_) => bail!("AUTH: extended authentication is not supported by the proxy"),
            other => bail!("a packet no client sends: {other:?}"),
        }
        Ok(true)
    }

    /// Starts storing the next publish of the client, if any.
    fn store_next(&mut self) {
        let Some(mut publish) = self.publishes.pop_front() else { return };
        self.queued_bytes -= publish.payload.len();
        let extensions = self.proxy.extensions.clone();
        let clientid = self.client.clientid.clone();
        self.storing = Some(Box::pin(async move {
            wire::strip_stored_ids(&mut publish);
            let storing: Vec<_> = extensions.iter().filter(|e| e.publishes(&publish.topic)).collect();
            if storing.is_empty() {
                return (publish, true);
            }
            let message = wire::to_message(&publish, &clientid, None, wire::now_millis());
            let sent = wire::qos2_sent(&publish, &clientid);
            let mut stored = true;
            for extension in storing {
                match extension.message_publish(message.clone(), sent.clone(), publish.dup).await {
                    PublishOutcome::Stored(id) => wire::attach_stored_id(&mut publish, &extension.name, id),
                    PublishOutcome::NotStored => {}
                    PublishOutcome::Failed(e) => {
                        tracing::warn!(extension = extension.name, topic = %publish.topic, "not stored: {}", e.describe());
                        stored = false;
                    }
                }
            }
            (publish, stored)
        }));
    }

    /// A publish of the client went through the extensions: forwarded upstream, or refused.
    async fn stored(&mut self, publish: Publish, stored: bool) -> anyhow::Result<()> {
        if !stored {
            // Fail-closed. MQTT 3.1.1 has no negative PUBACK: the connection closes instead, and
            // the client sends the message again when it reconnects.
            let Some(packet_id) = publish.packet_id else { return Ok(()) };
            if self.version == Version::V3 {
                bail!("a publish could not be stored (MQTT 3.1.1 has no negative ack: closing)");
            }
            let mut refusal = translate::ack_with(packet_id, PublishAckReason::ImplementationSpecificError);
            refusal.reason_string = Some("message not stored".into());
            let refusal = match publish.qos {
                QoS::ExactlyOnce => v5::Packet::PublishReceived(refusal),
                _ => v5::Packet::PublishAck(refusal),
            };
            return self.send_client(refusal).await;
        }
        // Under the client's own packet id: the broker's answers go back as they come.
        self.send_upstream(v5::Packet::Publish(Box::new(publish))).await?;
        Ok(())
    }

    /// The client acked a delivery (PUBACK, or PUBREC for QoS 2): the ack gate for its stored
    /// ids, then the broker or, for the proxy's own QoS 2 deliveries, the PUBREL.
    async fn client_acked(&mut self, packet_id: NonZeroU16) -> anyhow::Result<()> {
        let Some(delivery) = self.to_client.get_mut(packet_id) else { return Ok(()) };
        if delivery.received {
            return Ok(()); // a repeated PUBREC
        }
        let (origin, qos) = (delivery.origin, delivery.publish.qos);
        delivery.received = true;
        let publish = delivery.publish.clone();
        self.pass_acks(&publish);
        match (origin, qos) {
            (Origin::Broker(Some(upstream_id)), QoS::ExactlyOnce) => {
                self.upstream_rel.insert(upstream_id, packet_id);
                self.send_upstream(v5::Packet::PublishReceived(translate::ack(upstream_id))).await?;
            }
            (Origin::Broker(Some(upstream_id)), _) => {
                self.to_client.release(packet_id);
                self.send_upstream(v5::Packet::PublishAck(translate::ack(upstream_id))).await?;
                self.send_waiting().await?;
            }
            (_, QoS::ExactlyOnce) => self.send_client(v5::Packet::PublishRelease(translate::ack2(packet_id))).await?,
            _ => {
                self.to_client.release(packet_id);
                self.send_waiting().await?;
            }
        }
        Ok(())
    }

    /// The client has `publish` (acked, or discarded for it): the ack gate for its stored ids.
    fn pass_acks(&self, publish: &Publish) {
        for extension in self.proxy.extensions.iter() {
            let Some(id) = wire::stored_id(publish, &extension.name) else { continue };
            let acked = wire::to_message(publish, "", Some(id), wire::now_millis());
            extension.acked(&self.connection, || self.client.clone(), id, acked);
        }
    }

    /// A packet from the broker. False: the session ends (the broker disconnected it).
    async fn on_broker_packet(&mut self, packet: v5::Packet) -> anyhow::Result<bool> {
        match packet {
            v5::Packet::Publish(publish) => self.on_broker_publish(*publish).await?,
            // Answers to the client's publishes, under its packet ids.
            v5::Packet::PublishAck(ack) => self.send_client(v5::Packet::PublishAck(ack)).await?,
            v5::Packet::PublishReceived(ack) => self.send_client(v5::Packet::PublishReceived(ack)).await?,
            v5::Packet::PublishComplete(complete) => self.send_client(v5::Packet::PublishComplete(complete)).await?,
            v5::Packet::PublishRelease(mut release) => match self.upstream_rel.remove(&release.packet_id) {
                Some(client_id) => {
                    release.packet_id = client_id;
                    self.send_client(v5::Packet::PublishRelease(release)).await?;
                }
                // A delivery the proxy answered itself (held back: it goes from the database).
                None => self.send_upstream(v5::Packet::PublishComplete(translate::ack2(release.packet_id))).await?,
            },
            v5::Packet::SubscribeAck(ack) => {
                if let Some(Subscribing { client, filters, starts }) = self.subscribing.remove(&ack.packet_id) {
                    self.subscribed(client.then_some(ack), filters, starts).await;
                }
            }
            v5::Packet::UnsubscribeAck(ack) => self.send_client(v5::Packet::UnsubscribeAck(ack)).await?,
            // The answer to the client's PINGREQ goes to it; to the proxy's own, nowhere.
            v5::Packet::PingResponse => {
                if self.pings_owed > 0 {
                    self.pings_owed -= 1;
                    self.send_client(v5::Packet::PingResponse).await?;
                }
            }
            v5::Packet::Disconnect(disconnect) => {
                tracing::info!(clientid = self.client.clientid, reason = ?disconnect.reason_code, "the broker disconnected the client");
                self.send_client(v5::Packet::Disconnect(disconnect)).await?;
                return Ok(false);
            }
            other => bail!("a packet no broker sends: {other:?}"),
        }
        Ok(true)
    }

    /// A message the broker delivers: held back behind a backlog (then answered here, as it
    /// goes from the database later), or on its way to the client.
    async fn on_broker_publish(&mut self, publish: Publish) -> anyhow::Result<()> {
        for extension in self.proxy.extensions.iter() {
            let Some(id) = wire::stored_id(&publish, &extension.name) else { continue };
            let keep = || Routed(publish.clone());
            let live = Live { topic: &publish.topic, resend: publish.dup, qos: publish.qos.value(), keep: &keep };
            if extension.deliveries.hold(&self.connection, id, live) {
                match (publish.qos, publish.packet_id) {
                    (QoS::AtLeastOnce, Some(id)) => {
                        self.send_upstream(v5::Packet::PublishAck(translate::ack(id))).await?
                    }
                    (QoS::ExactlyOnce, Some(id)) => {
                        self.send_upstream(v5::Packet::PublishReceived(translate::ack(id))).await?
                    }
                    _ => {}
                }
                return Ok(());
            }
        }
        let upstream_id = publish.packet_id;
        self.deliver(Origin::Broker(upstream_id), publish).await
    }

    async fn on_own(&mut self, own: Own) -> anyhow::Result<()> {
        match own {
            Own::Deliver { extension, publish } => self.deliver(Origin::Own(extension), publish).await,
            Own::SubAck(ack) => self.send_client(v5::Packet::SubscribeAck(ack)).await,
        }
    }

    /// Sends a message to the client, or keeps it for when the window has room.
    async fn deliver(&mut self, origin: Origin, mut publish: Publish) -> anyhow::Result<()> {
        // Larger than the client takes: MQTT has the server discard it (the broker does so with
        // its own deliveries). It counts as read: sent again, it would be discarded again.
        if let (Origin::Own(index), Some(max)) = (origin, self.max_packet)
            && encoded_size(&publish) > max
        {
            let topic = publish.topic.to_string();
            tracing::info!(
                clientid = self.client.clientid,
                topic,
                "discarded: over the client's Maximum Packet Size {max}"
            );
            self.proxy.extensions[index].deliveries.forwarded_gone(&self.connection);
            self.pass_acks(&publish);
            return Ok(());
        }
        if publish.qos != QoS::AtMostOnce {
            if self.to_client.len() >= self.window || !self.waiting.is_empty() {
                self.waiting.push_back((origin, publish));
                return Ok(());
            }
            let delivery = Delivery { origin, publish: publish.clone(), received: false };
            publish.packet_id =
                Some(self.to_client.allocate(delivery).context("no packet id free towards the client")?);
        } else {
            publish.packet_id = None;
        }
        publish.dup = false;
        self.send_client(v5::Packet::Publish(Box::new(publish.clone()))).await?;
        self.delivered(origin, &publish).await;
        Ok(())
    }

    /// Sends what waited for the window, as far as it has room now.
    async fn send_waiting(&mut self) -> anyhow::Result<()> {
        while self.to_client.len() < self.window {
            let Some((origin, mut publish)) = self.waiting.pop_front() else { break };
            let delivery = Delivery { origin, publish: publish.clone(), received: false };
            publish.packet_id =
                Some(self.to_client.allocate(delivery).context("no packet id free towards the client")?);
            self.send_client(v5::Packet::Publish(Box::new(publish.clone()))).await?;
            self.delivered(origin, &publish).await;
        }
        Ok(())
    }

    /// A message left for the client: its extension's backlog may send its next slice, and
    /// every extension hears of it (`message-delivered`).
    async fn delivered(&mut self, origin: Origin, publish: &Publish) {
        for (index, extension) in self.proxy.extensions.iter().enumerate() {
            if origin == Origin::Own(index) {
                extension.deliveries.forwarded_gone(&self.connection);
            }
            let id = wire::stored_id(publish, &extension.name);
            if id.is_some() {
                extension.host.metrics().delivered(1);
            }
            let message = || wire::to_message(publish, "", id, wire::now_millis());
            extension.message_delivered(|| self.client.clone(), &publish.topic, message).await;
        }
    }

    /// Subscribes upstream: the client's SUBSCRIBE `packet`, under its packet id, or (None) the
    /// proxy's own for stored subscriptions, under an id from the top of the range, where a
    /// client's counter rarely is.
    async fn subscribe(&mut self, filters: Vec<(String, u8)>, packet: Option<v5::Subscribe>) -> anyhow::Result<()> {
        // Live messages for them are held back from now on, before the broker routes any.
        let starts: Vec<Vec<bool>> = self
            .proxy
            .extensions
            .iter()
            .map(|e| {
                filters.iter().map(|(filter, qos)| e.deliveries.subscribed(&self.connection, filter, *qos)).collect()
            })
            .collect();
        let client = packet.is_some();
        let mut packet = packet.unwrap_or_else(|| v5::Subscribe {
            packet_id: NonZeroU16::MAX,
            id: None,
            user_properties: Vec::new(),
            topic_filters: filters
                .iter()
                .map(|(filter, qos)| {
                    let qos = QoS::try_from(*qos).unwrap_or(QoS::AtMostOnce);
                    (filter.as_str().into(), v5::SubscriptionOptions { qos, ..Default::default() })
                })
                .collect(),
        });
        // Retained messages from the database (`on_retain_lookup`): the broker's own would come
        // a second time. Its store stays for its other clients.
        if self.proxy.config.upstream.retained == RetainedFrom::Database {
            for (_, options) in &mut packet.topic_filters {
                options.retain_handling = v5::RetainHandling::NoAtSubscribe;
            }
        }
        if !client {
            packet.packet_id = (1..=u16::MAX)
                .rev()
                .filter_map(NonZeroU16::new)
                .find(|id| !self.subscribing.contains_key(id))
                .context("all packet ids towards the broker in use")?;
        }
        self.subscribing.insert(packet.packet_id, Subscribing { client, filters, starts });
        self.send_upstream(v5::Packet::Subscribe(packet)).await?;
        Ok(())
    }

    /// The broker answered a SUBSCRIBE. A task fetches each granted filter's first page, then
    /// sends the client its SUBACK (if it subscribed itself), then the backlogs.
    async fn subscribed(&mut self, ack: Option<v5::SubscribeAck>, filters: Vec<(String, u8)>, starts: Vec<Vec<bool>>) {
        let statuses: Vec<Option<QoS>> = match &ack {
            Some(ack) => ack.status.iter().map(|s| translate::granted(*s)).collect(),
            None => Vec::new(),
        };
        let mut granted = Vec::new();
        for (n, (filter, _)) in filters.into_iter().enumerate() {
            // A stored subscription's SUBACK is not kept: its statuses come from the same packet.
            let status = statuses.get(n).copied().unwrap_or(Some(QoS::AtLeastOnce));
            match status {
                Some(qos) => granted.push((n, Subscription { filter, qos: qos.value() })),
                None => {
                    // Refused: nothing to fetch, and nothing to hold for it.
                    for (index, extension) in self.proxy.extensions.iter().enumerate() {
                        let returned = extension.deliveries.unsubscribed(&self.connection, &filter);
                        self.proxy.refetch(index, returned);
                    }
                }
            }
        }
        let (proxy, connection, client, own) =
            (self.proxy.clone(), self.connection.clone(), self.client.clone(), self.own_tx.clone());
        tokio::spawn(async move {
            let mut backlogs = Vec::new();
            for (index, extension) in proxy.extensions.iter().enumerate() {
                for (n, subscription) in &granted {
                    // Its acks so far first: the fetch starts from the position they leave.
                    extension.acks.flush(&client.clientid, &subscription.filter).await;
                    let call = async |i: &mut Instance| i.session_subscribed(&client, subscription).await;
                    let first = extension.fetch(&client, subscription, None, call).await;
                    if starts[index][*n] {
                        backlogs.push((index, subscription.clone(), first));
                    }
                }
            }
            if let Some(ack) = ack
                && own.send(Own::SubAck(ack)).is_err()
            {
                return;
            }
            for (index, subscription, first) in backlogs {
                let (proxy, connection, client, own) = (proxy.clone(), connection.clone(), client.clone(), own.clone());
                tokio::spawn(async move {
                    let extension = &proxy.extensions[index];
                    let outbox = ClientOutbox { own, extension: index };
                    match first {
                        Some(first) => {
                            adapter::send_backlog(extension, &connection, &client, &subscription, Some(first), &outbox)
                                .await
                        }
                        None => adapter::fetch_failed(extension, &connection, &subscription.filter, &outbox).await,
                    }
                });
            }
        });
    }

    /// The client unsubscribed from `filter`.
    async fn unsubscribed(&mut self, filter: &str) {
        for (index, extension) in self.proxy.extensions.iter().enumerate() {
            let returned = extension.deliveries.unsubscribed(&self.connection, filter);
            self.proxy.refetch(index, returned);
            extension.session_unsubscribed(&self.client, filter).await;
            // What was held for it may be what another subscription still waits for.
            let (proxy, connection, own) = (self.proxy.clone(), self.connection.clone(), self.own_tx.clone());
            tokio::spawn(async move {
                let outbox = ClientOutbox { own, extension: index };
                adapter::release_held(&proxy.extensions[index], &connection, &outbox).await;
            });
        }
    }

    async fn send_upstream(&mut self, packet: v5::Packet) -> anyhow::Result<()> {
        self.upstream_sent = Instant::now();
        self.upstream.send(packet).await.context("writing to the broker")
    }

    async fn send_client(&mut self, packet: v5::Packet) -> anyhow::Result<()> {
        send_to(&mut self.client_io, self.version, packet).await
    }

    /// The broker's deliveries it has not had an ack for: sent to the client and not acked (a
    /// QoS 2 one not received), or waiting for the client's window. The broker resends them
    /// (DUP) when the session resumes.
    fn broker_in_flight(&self) -> Vec<Publish> {
        let sent = self.to_client.in_use().filter(|d| !d.received).map(|d| (&d.origin, &d.publish));
        let waiting = self.waiting.iter().map(|(origin, publish)| (origin, publish));
        sent.chain(waiting).filter(|(origin, _)| matches!(origin, Origin::Broker(_))).map(|(_, p)| p.clone()).collect()
    }

    /// The connection ended (`error` says why, if it did not end well).
    async fn end(&mut self, error: Option<String>) {
        if let Some(error) = &error {
            tracing::info!(clientid = self.client.clientid, "connection closed: {error}");
        }
        // What the client published before it left is stored and forwarded, whatever became
        // of the client: a stored message the broker never routed would be passed over by a
        // live subscriber acking what came after it.
        while let Some(storing) = self.storing.take() {
            let (publish, stored) = storing.await;
            if let Err(e) = self.stored(*publish, stored).await {
                tracing::debug!(clientid = self.client.clientid, "after the connection: {e:#}");
            }
            self.store_next();
        }
        if let Some(disconnect) = self.disconnected.clone() {
            let _ = self.send_upstream(v5::Packet::Disconnect(disconnect)).await;
        }
        // The broker's session ends or stays as it says; the proxy's goes with it.
        let _ = self.upstream.close().await;
        let _ = self.client_io.close().await;
        let in_flight = self.broker_in_flight();
        // What waited was never sent: the backlogs it came from must not wait for it.
        for (origin, _) in self.waiting.drain(..) {
            if let Origin::Own(index) = origin {
                self.proxy.extensions[index].deliveries.forwarded_gone(&self.connection);
            }
        }
        let kept = self.session_expiry > 0;
        let reason = match (&error, self.disconnected.is_some()) {
            (_, true) => "normal".to_owned(),
            (Some(error), false) => error.clone(),
            (None, false) => "closed".to_owned(),
        };
        for (index, extension) in self.proxy.extensions.iter().enumerate() {
            let returned = extension.deliveries.disconnected(&self.connection, kept);
            if kept {
                let stored = in_flight
                    .iter()
                    .filter_map(|p| Some((wire::stored_id(p, &extension.name)?, p.topic.to_string())))
                    .collect();
                extension.deliveries.kept_in_flight(&self.client.clientid, stored);
            }
            self.proxy.refetch(index, returned);
            extension.client_disconnected(&self.client, &reason).await;
        }
        self.proxy.unregister(&self.connection, &self.client, kept.then_some(self.session_expiry));
    }
}

/// The size of `publish` encoded as MQTT 5, or a little more: the fixed header at its largest,
/// the packet id, and each property with its identifier and lengths.
fn encoded_size(publish: &Publish) -> usize {
    let properties = publish.properties.as_ref().map_or(0, |p| {
        let texts = [p.content_type.as_deref(), p.response_topic.as_deref()];
        p.user_properties.iter().map(|(k, v)| 5 + k.len() + v.len()).sum::<usize>()
            + texts.iter().flatten().map(|t| 3 + t.len()).sum::<usize>()
            + p.correlation_data.as_ref().map_or(0, |d| 3 + d.len())
            + 5 * usize::from(p.message_expiry_interval.is_some())
            + 2 * usize::from(p.is_utf8_payload)
            + 3
            + 5 * p.subscription_ids.len()
    });
    5 + 2 + publish.topic.len() + 2 + 4 + properties + publish.payload.len()
}

/// Whether `publish` names its topic in full, as a topic name may (no wildcards, no NUL, no
/// alias).
fn is_topic_name(publish: &Publish) -> bool {
    let alias = publish.properties.as_ref().is_some_and(|p| p.topic_alias.is_some());
    !alias && !publish.topic.is_empty() && !publish.topic.contains(['+', '#', '\0'])
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Writes `packet` to a client in its MQTT version (a packet 3.1.1 cannot say is not written).
async fn send_to<Io: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Framed<Io, MqttCodec>,
    version: Version,
    packet: v5::Packet,
) -> anyhow::Result<()> {
    let packet = match version {
        Version::V5 => MqttPacket::V5(packet),
        Version::V3 => match translate::to_v3(packet) {
            Some(packet) => MqttPacket::V3(packet),
            None => return Ok(()),
        },
    };
    io.send(packet).await.context("writing to the client")
}

/// Sends `subscription`'s backlog again from its stored position, in a task of its own.
pub fn resume_backlog(
    proxy: &Arc<Proxy>,
    extension: usize,
    connection: Connection,
    client: Client,
    own: mpsc::UnboundedSender<Own>,
    subscription: Subscription,
) {
    let proxy = proxy.clone();
    tokio::spawn(async move {
        let outbox = ClientOutbox { own, extension };
        adapter::send_backlog(&proxy.extensions[extension], &connection, &client, &subscription, None, &outbox).await;
    });
}
