//! What the broker keeps per connected client so that stored messages reach it once, in order,
//! and an ack moves a read position only as far as it is true (the contract's invariant: position
//! (client, filter) = N means every stored message of that filter up to N was delivered through
//! that subscription and acked). A state machine without I/O; a broker adapter drives it (the
//! rmqtt broker's `hooks.rs`), whatever its message type ([`Held`]).
//!
//! - **Subscriptions fetch, then go live.** After a SUBSCRIBE (or when a subscription must catch
//!   up, below) it is *fetching*: its backlog goes out page by page, and live stored messages it
//!   matches are held back meanwhile. Held messages belong to the client, not to one
//!   subscription: when a fetch ends, or a subscription goes away, a held message is released
//!   once no subscription that matches it is fetching, and dropped only when no live
//!   subscription matches it any more, or a page already sent it (a duplicate).
//! - **Per-subscription ack gates.** Each stored message is attributed to the subscriptions that
//!   delivered it: its own backlog's pages, or every live subscription that matches it when it
//!   goes out live. An ack credits each of them; a subscription's position may move to the
//!   highest acked id below its lowest unacked one. So an ack never moves the position of a
//!   filter the client is not subscribed to, nor of one whose backlog is behind.
//! - **Once per connection, whatever the overlaps.** A live message that a page or an earlier
//!   copy already sent does not go again (a broker sends an MQTT 3.1.1 client a copy per
//!   subscription that matches), even once the first is acked; while that delivery is
//!   outstanding it counts for the other subscriptions that match it too.
//! - **Nothing dropped silently.** A stored message lost on the way (rmqtt's session queue was
//!   full) is left to the database: every subscription it concerns stops its position below it
//!   and catches up, fetching again from its stored position once what it delivered so far is
//!   acked. Ids a subscription already had acked are not sent again. Held messages are bounded
//!   ([`HELD_PER_CLIENT`]); past that they are left to the database the same way.
//! - **Persistent sessions: one store.** A session the broker keeps after its client leaves
//!   (MQTT 3.1.1 `clean_session = false`, MQTT 5 session expiry) keeps its subscriptions here
//!   too. When the client comes back and the broker resumes the session, each of them fetches
//!   again from its stored position ([`Deliveries::connected`] with `resumed`). What the broker
//!   queued for the session meanwhile arrives as live messages while they fetch: held back, and
//!   deduped against the pages by stored id, so each message reaches the client once, whichever
//!   of the two stores had it. Resends of what was in flight (MQTT DUP) go as MQTT requires and
//!   count as outstanding, so no page sends them again: from the moment the session resumes,
//!   when the adapter told what was in flight as the client left ([`Deliveries::kept_in_flight`]),
//!   since the first page may go before the broker resends anything. A connection that takes
//!   over one still open takes over what that one had acked.
//! - **Shared subscriptions: the group's claim.** A subscription `$share/<group>/<filter>` reads
//!   its group's position (one per group and filter). The broker gives each live message to one
//!   member; a member's backlog pages skip what another member of the group has outstanding
//!   (delivered, not acked), so two members fetching at once never both get a message. Its acks
//!   pass one by one, at once: the group's position records each and moves its mark only over
//!   what is acked without a gap (the guest's), so no gate holds them. What a member leaves
//!   unacked goes back to the group: another member still here fetches again.
//!
//! One [`Deliveries`] per extension: ids are the extension's own.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use crate::bindings::Message;
use tokio::sync::Notify;

/// A client connection: its client id and when rmqtt created it (a reconnection is another).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub clientid: String,
    pub since: i64,
}

/// Messages forwarded to a session at a time (a slice of a page, or of the held-back ones), well
/// below rmqtt's per-session queue (1000 by default), which drops messages when full.
pub const FORWARD_AT_ONCE: usize = 100;

/// Live stored messages held back per client while its subscriptions fetch. Past that, the held
/// ones are let go and the fetching subscriptions fetch once more at the end (the messages are in
/// the database): a client's memory here stays below this many messages.
pub const HELD_PER_CLIENT: usize = 1000;

/// A live message as the broker routes it, held back behind a backlog: the broker's own type
/// (rmqtt's `Publish`), so that releasing it forwards it as it came.
pub trait Held {
    fn topic(&self) -> &str;
    /// The QoS it goes to the client at.
    fn qos(&self) -> u8;
}

/// A live stored message about to go to a client, for [`Deliveries::hold`].
pub struct Live<'a, P> {
    pub topic: &'a str,
    /// A resend (MQTT DUP): it goes as it is (see [`Deliveries::hold`]).
    pub resend: bool,
    /// The QoS this copy goes to the client at (a broker sends each overlapping subscription's
    /// copy at that subscription's QoS): nothing acks a QoS 0 copy.
    pub qos: u8,
    /// The message to keep, if it is held back (called only then: most are not).
    pub keep: &'a dyn Fn() -> P,
}

/// The harness holds the contract's own message.
impl Held for Message {
    fn topic(&self) -> &str {
        &self.topic
    }
    fn qos(&self) -> u8 {
        self.qos
    }
}

pub struct Deliveries<P> {
    clients: Mutex<HashMap<String, ClientState<P>>>,
    /// Sessions the broker kept after their client left, by client id.
    kept: Mutex<HashMap<String, KeptSession>>,
    /// What each share group's members have (see [`Groups`]). Locked after `clients`, never
    /// before.
    groups: Mutex<Groups>,
}

impl<P> Default for Deliveries<P> {
    fn default() -> Self {
        Deliveries {
            clients: Mutex::new(HashMap::new()),
            kept: Mutex::new(HashMap::new()),
            groups: Mutex::new(Groups::default()),
        }
    }
}

/// What a resumed session takes back.
#[derive(Default)]
struct KeptSession {
    /// Its subscriptions (filter, QoS): each fetches again from its stored position.
    subscriptions: Vec<(String, u8)>,
    /// The stored messages (id, topic) the broker had in flight to the client when it left. The
    /// broker resends them (DUP) once the session is back, on its own time: they are outstanding
    /// from the start, so that no page sent before a resend arrives sends them too.
    in_flight: Vec<(i64, String)>,
}

/// A member of a share group that fetches the group's backlog again (what another member left
/// unacked): its connection, the subscription's filter, and its QoS.
pub type Refetch = (Connection, String, u8);

fn is_shared(filter: &str) -> bool {
    mqtt_topic::shared(filter).is_some()
}

/// Acked ids a share group remembers at most ([`Group::acked`]).
const GROUP_ACKED_REMEMBERED: usize = 10_000;

/// The share groups' claims, by subscription filter (`$share/<group>/<filter>`), while a member
/// is here.
#[derive(Default)]
struct Groups(HashMap<String, Group>);

#[derive(Default)]
struct Group {
    /// Stored ids members have outstanding (delivered, not acked), and which member has each.
    claims: HashMap<i64, Connection>,
    /// Ids members acked lately: a page fetched before the group's position recorded them (the
    /// acks are written in the background) must not send them again. The lowest go first.
    acked: BTreeSet<i64>,
}

impl Groups {
    /// Whether `id` is the group's already for a member other than `connection`: another member
    /// has it outstanding, or a member acked it.
    fn taken(&self, filter: &str, id: i64, connection: &Connection) -> bool {
        self.0.get(filter).is_some_and(|g| g.acked.contains(&id) || g.claims.get(&id).is_some_and(|c| c != connection))
    }

    /// `connection` has `id` outstanding through `filter`, if that is a shared subscription.
    fn claim(&mut self, filter: &str, id: i64, connection: &Connection) {
        if is_shared(filter) {
            self.0.entry(filter.to_owned()).or_default().claims.insert(id, connection.clone());
        }
    }

    fn acked(&mut self, filter: &str, id: i64) {
        let group = self.0.entry(filter.to_owned()).or_default();
        group.claims.remove(&id);
        group.acked.insert(id);
        while group.acked.len() > GROUP_ACKED_REMEMBERED {
            group.acked.pop_first();
        }
    }

    /// Lost on the way: the member will fetch it again.
    fn unclaim(&mut self, filter: &str, id: i64) {
        if let Some(group) = self.0.get_mut(filter) {
            group.claims.remove(&id);
        }
    }

    /// Drops the claims of `connection` (it left): true if it had any.
    fn drop_claims(&mut self, filter: &str, connection: &Connection) -> bool {
        let Some(group) = self.0.get_mut(filter) else { return false };
        let before = group.claims.len();
        group.claims.retain(|_, c| c != connection);
        group.claims.len() < before
    }

    /// `connection` no longer has the subscriptions `filters`. For each shared one, its claims
    /// go; a group no client subscribes to any more is forgotten; and where it left messages
    /// unacked, another member fetches again: one that is here, fetching already (then once
    /// more) or live (then it starts). Returns the members that start.
    fn leave<'a, P>(
        &mut self,
        clients: &mut HashMap<String, ClientState<P>>,
        filters: impl IntoIterator<Item = &'a String>,
        connection: &Connection,
    ) -> Vec<Refetch> {
        let mut returned = Vec::new();
        for filter in filters.into_iter().filter(|f| is_shared(f)) {
            if self.drop_claims(filter, connection) {
                returned.push(filter.clone());
            }
            if !clients.values().any(|s| s.subscriptions.contains_key(filter)) {
                self.0.remove(filter);
            }
        }
        return_to_groups(clients, &returned, connection)
    }
}

/// Another member of each share group in `filters` fetches again (see [`Groups::leave`]).
fn return_to_groups<P>(
    clients: &mut HashMap<String, ClientState<P>>,
    filters: &[String],
    connection: &Connection,
) -> Vec<Refetch> {
    let mut start = Vec::new();
    for filter in filters {
        let member = clients
            .iter_mut()
            .filter(|(clientid, _)| **clientid != connection.clientid)
            .find_map(|(clientid, s)| Some((clientid, s.since, s.subscriptions.get_mut(filter)?)));
        if let Some((clientid, since, sub)) = member {
            sub.refetch = true;
            if !sub.fetching {
                sub.fetching = true;
                start.push((Connection { clientid: clientid.clone(), since }, filter.clone(), sub.qos));
            }
        }
    }
    start
}

struct ClientState<P> {
    since: i64,
    subscriptions: HashMap<String, Subscription>,
    /// Live stored messages held back while a subscription that matches them fetches.
    held: Vec<(i64, P)>,
    /// Messages this extension forwarded to the session that have not left the broker yet.
    queued: usize,
    /// Woken when what [`Deliveries::sent`] or [`Deliveries::settled`] waits for may have come:
    /// `queued` reached 0, a subscription has nothing unacked left or went away, or the client
    /// went away. Not on every forward and ack: each wake-up is a task switch, two per message
    /// of a backlog where it woke on both.
    progress: Arc<Notify>,
    /// Stored ids the client acked during this connection, while a fetch might reach them
    /// again through another subscription: that page does not send them twice. Forgotten when
    /// no subscription fetches, and bounded ([`ACKED_REMEMBERED`]).
    acked: BTreeSet<i64>,
    /// Stored ids of live messages that went out matching more than one of the client's
    /// subscriptions. An MQTT 3.1.1 client gets a copy per subscription from the broker, one
    /// after the other through the session's queue; a later copy that leaves the queue after
    /// the first was acked (a small in-flight window) finds no subscription that still has the
    /// id outstanding, and would go again. Bounded ([`COPIES_REMEMBERED`]).
    copies: BTreeSet<i64>,
}

/// Acked ids a client's state remembers at most for [`ClientState::acked`] (the lowest go
/// first: forgetting one only means a page may send it once more).
const ACKED_REMEMBERED: usize = 10_000;

/// Ids a client's state remembers at most for [`ClientState::copies`] (the lowest go first). A
/// later copy is at most a session queue behind the first (rmqtt's `max_queue`, 1000 by
/// default), and a client whose broker sends one copy per client (MQTT 5) keeps this many ids
/// at most, some 40 kB.
const COPIES_REMEMBERED: usize = 1000;

#[derive(Default)]
struct Subscription {
    qos: u8,
    /// The backlog is going out (or will again: `refetch`).
    fetching: bool,
    /// Fetch again from the stored position when the current fetch ends: something this
    /// subscription should have delivered was let go.
    refetch: bool,
    /// The lowest and highest stored ids its pages sent.
    sent: Option<(i64, i64)>,
    /// Stored ids it delivered that are not acked yet.
    unacked: BTreeSet<i64>,
    /// Acked, waiting for a lower unacked id (or for `stop`). Shared: one ack may wait in
    /// several subscriptions.
    acked: BTreeMap<i64, Arc<Message>>,
    /// A stored id it lost on the way: its position stays below until it fetches again.
    stop: Option<i64>,
    /// Its backlog could not be fetched: no ack moves its position during this connection.
    stalled: bool,
}

impl Subscription {
    /// The highest acked id its position may move to now, taken out of `acked`.
    fn passable(&mut self) -> Option<Arc<Message>> {
        if self.stalled {
            return None;
        }
        let floor = self.unacked.first().copied().unwrap_or(i64::MAX).min(self.stop.unwrap_or(i64::MAX));
        let rest = self.acked.split_off(&floor);
        let passable = std::mem::replace(&mut self.acked, rest);
        passable.into_values().next_back()
    }

    fn has(&self, id: i64) -> bool {
        within(self.sent, id) || self.unacked.contains(&id) || self.acked.contains_key(&id)
    }
}

fn within(range: Option<(i64, i64)>, id: i64) -> bool {
    range.is_some_and(|(low, high)| (low..=high).contains(&id))
}

/// What a fetching subscription does when its pages are out.
#[derive(Debug, PartialEq, Eq)]
pub enum FetchEnd {
    /// Something was let go meanwhile: fetch again from the stored position (after waiting for
    /// [`Deliveries::settled`]).
    Refetch,
    /// The subscription is live now; release what is held ([`Deliveries::release`]).
    Live,
    /// It is gone (unsubscribed, client away).
    Gone,
}

/// An ack to pass on: the message, and the filters whose positions may move to it.
pub type PassedAck = (Message, Vec<String>);

impl<P: Held> Deliveries<P> {
    /// Live stored messages held back now, over all clients (a gauge for `/metrics`).
    pub fn held(&self) -> usize {
        self.clients.lock().unwrap().values().map(|c| c.held.len()).sum()
    }

    /// A client connected. With `resumed` (the broker resumed the session the client id had:
    /// MQTT's "session present"), the subscriptions the session kept are back, each fetching
    /// from its stored position: returned, for the adapter to send their backlogs
    /// (`session-resume`). Without, whatever the client id had is gone, as the broker's session.
    pub fn connected(&self, connection: &Connection, resumed: bool) -> Vec<(String, u8)> {
        // `clients` first, as `disconnected` locks them: the connection taken over either is
        // still here, or has left its kept session already. (Taking `kept` before, a
        // `disconnected` in between left this connection with neither, and no subscriptions.)
        let mut clients = self.clients.lock().unwrap();
        let kept = self.kept.lock().unwrap().remove(&connection.clientid);
        let old = clients.remove(&connection.clientid);
        let mut state = ClientState {
            since: connection.since,
            subscriptions: HashMap::new(),
            held: Vec::new(),
            queued: 0,
            progress: Arc::new(Notify::new()),
            acked: BTreeSet::new(),
            copies: BTreeSet::new(),
        };
        // A connection that takes over one still open has the subscriptions of that one.
        let restored = match (&old, resumed) {
            (_, false) => KeptSession::default(),
            (Some(old), true) => KeptSession {
                subscriptions: old.subscriptions.iter().map(|(filter, sub)| (filter.clone(), sub.qos)).collect(),
                in_flight: Vec::new(),
            },
            (None, true) => kept.unwrap_or_default(),
        };
        for (filter, qos) in &restored.subscriptions {
            state
                .subscriptions
                .insert(filter.clone(), Subscription { qos: *qos, fetching: true, ..Default::default() });
        }
        let mut groups = self.groups.lock().unwrap();
        if let Some(old) = old {
            old.progress.notify_waiters();
            let gone = Connection { clientid: connection.clientid.clone(), since: old.since };
            for filter in old.subscriptions.keys() {
                groups.drop_claims(filter, &gone);
            }
            // Taken over (resumed): what that connection had acked, no page sends again, and
            // the later copies of what it had, still in the session's queue, do not go. (Not
            // what it had outstanding: the broker resends only what it had in flight, and which
            // of those were is not known here.)
            if resumed {
                state.acked = old.acked;
                state.copies = old.copies;
            }
        }
        for (id, topic) in &restored.in_flight {
            resent(&mut state, &mut groups, connection, *id, topic);
        }
        drop(groups);
        clients.insert(connection.clientid.clone(), state);
        restored.subscriptions
    }

    /// The connection ended. With `kept` (the broker keeps the session for the client's return),
    /// its subscriptions are remembered for [`Deliveries::connected`]. What its shared
    /// subscriptions left unacked goes back to their groups: returns the members that fetch it.
    pub fn disconnected(&self, connection: &Connection, kept: bool) -> Vec<Refetch> {
        let mut clients = self.clients.lock().unwrap();
        let mut start = Vec::new();
        if clients.get(&connection.clientid).is_some_and(|s| s.since == connection.since) {
            let state = clients.remove(&connection.clientid).expect("present");
            state.progress.notify_waiters();
            start = self.groups.lock().unwrap().leave(&mut clients, state.subscriptions.keys(), connection);
            let mut sessions = self.kept.lock().unwrap();
            if kept {
                let subscriptions = state.subscriptions.iter().map(|(f, sub)| (f.clone(), sub.qos)).collect();
                sessions.insert(connection.clientid.clone(), KeptSession { subscriptions, in_flight: Vec::new() });
            } else {
                sessions.remove(&connection.clientid);
            }
        }
        start
    }

    /// What the broker had in flight to `clientid` (stored id, topic) when the client left, the
    /// broker keeping its session (after [`Deliveries::disconnected`]): it resends them when the
    /// session resumes, and [`Deliveries::connected`] counts them as outstanding from the start.
    pub fn kept_in_flight(&self, clientid: &str, in_flight: Vec<(i64, String)>) {
        if let Some(session) = self.kept.lock().unwrap().get_mut(clientid) {
            session.in_flight = in_flight;
        }
    }

    /// The session the broker kept for `clientid` ended (it expired): returns the filters of its
    /// subscriptions, which end with it (the adapter calls `session-unsubscribed` for each).
    pub fn session_ended(&self, clientid: &str) -> Vec<String> {
        let kept = self.kept.lock().unwrap().remove(clientid);
        kept.into_iter().flat_map(|session| session.subscriptions).map(|(filter, _)| filter).collect()
    }

    /// Runs `f` on the state of `connection`, if it is still the client's current connection.
    fn with<T>(&self, connection: &Connection, f: impl FnOnce(&mut ClientState<P>) -> T) -> Option<T> {
        let mut clients = self.clients.lock().unwrap();
        clients.get_mut(&connection.clientid).filter(|s| s.since == connection.since).map(f)
    }

    /// A subscription to `filter` starts fetching its backlog: live stored messages it matches
    /// are held back from now on. A repeated SUBSCRIBE keeps what the subscription had. Returns
    /// false when its backlog is going out already (a repeated SUBSCRIBE, a stored subscription
    /// of a resumed session): that fetch covers it, and another must not start.
    pub fn subscribed(&self, connection: &Connection, filter: &str, qos: u8) -> bool {
        self.with(connection, |s| {
            let subscription = s.subscriptions.entry(filter.to_owned()).or_default();
            subscription.qos = qos;
            subscription.stalled = false;
            !std::mem::replace(&mut subscription.fetching, true)
        })
        .unwrap_or(false)
    }

    /// The subscription went away. What is held stays for the client's other subscriptions
    /// ([`Deliveries::release`] lets go of what none of them matches). What a shared subscription
    /// left unacked goes back to its group: returns the member that fetches it.
    pub fn unsubscribed(&self, connection: &Connection, filter: &str) -> Vec<Refetch> {
        let mut clients = self.clients.lock().unwrap();
        let Some(s) = clients.get_mut(&connection.clientid).filter(|s| s.since == connection.since) else {
            return Vec::new();
        };
        if s.subscriptions.remove(filter).is_none() {
            return Vec::new();
        }
        s.progress.notify_waiters();
        self.groups.lock().unwrap().leave(&mut clients, [&filter.to_owned()], connection)
    }

    /// A page slice of `filter`'s backlog is about to be forwarded. Returns, for each message,
    /// whether to forward it, or `None` when the backlog is no longer wanted (client gone,
    /// unsubscribed). The client gets a stored message once, whichever subscriptions' pages
    /// reach it: one it already acked counts as acked for this subscription too, and one another
    /// subscription delivered and is still unacked counts for both when it is acked. Retained
    /// messages (no id) always go.
    pub fn forward_page(&self, connection: &Connection, filter: &str, page: &[Message]) -> Option<Vec<bool>> {
        self.with(connection, |s| {
            let mut subscription = s.subscriptions.remove(filter)?;
            let mut groups = self.groups.lock().unwrap();
            let mut decisions = Vec::with_capacity(page.len());
            for message in page {
                let Some(id) = message.id else {
                    decisions.push(true);
                    continue;
                };
                subscription.sent = Some(subscription.sent.map_or((id, id), |(low, high)| (low.min(id), high.max(id))));
                let forward = match subscription.acked.entry(id) {
                    // This subscription has it acked already.
                    Entry::Occupied(_) => false,
                    // The client acked it through another subscription: it counts here too.
                    Entry::Vacant(slot) if s.acked.contains(&id) => {
                        slot.insert(Arc::new(message.clone()));
                        false
                    }
                    // Goes, unless a delivery of it is still unacked (this subscription's own: a
                    // resend, a live copy before a repeated SUBSCRIBE; or another's).
                    // Another member of the share group has it: the group's, not this one's.
                    Entry::Vacant(_) if groups.taken(filter, id, connection) => false,
                    Entry::Vacant(_) => {
                        let outstanding = subscription.unacked.contains(&id)
                            || s.subscriptions.values().any(|other| other.unacked.contains(&id));
                        subscription.unacked.insert(id);
                        groups.claim(filter, id, connection);
                        !outstanding
                    }
                };
                decisions.push(forward);
            }
            s.subscriptions.insert(filter.to_owned(), subscription);
            s.queued += decisions.iter().filter(|&&d| d).count();
            Some(decisions)
        })
        .flatten()
    }

    /// What `filter`'s pages counted as acked because the client had acked it through another
    /// subscription: no ack of this subscription may come for it, so it passes here, the
    /// highest such message up to the lowest unacked one. (Left to the next ack, it waited for
    /// one that might never come, and the position stayed behind until the next connection
    /// fetched it all again.)
    pub fn credited(&self, connection: &Connection, filter: &str) -> Vec<PassedAck> {
        self.with(connection, |s| {
            let subscription = s.subscriptions.get_mut(filter).filter(|_| !is_shared(filter))?;
            let highest = subscription.passable()?;
            Some(vec![(Arc::unwrap_or_clone(highest), vec![filter.to_owned()])])
        })
        .flatten()
        .unwrap_or_default()
    }

    /// Waits until everything forwarded has left the broker. False if the client went away.
    pub async fn sent(&self, connection: &Connection) -> bool {
        self.wait(connection, |s| s.queued == 0).await
    }

    /// Waits until everything `filter` delivered has been acked, so that its stored position
    /// (once the acks are written) is where a new fetch must start. False if the client or the
    /// subscription went away.
    pub async fn settled(&self, connection: &Connection, filter: &str) -> bool {
        self.wait(connection, |s| s.subscriptions.get(filter).is_none_or(|sub| sub.unacked.is_empty())).await
            && self.with(connection, |s| s.subscriptions.contains_key(filter)).unwrap_or(false)
    }

    async fn wait(&self, connection: &Connection, done: impl Fn(&ClientState<P>) -> bool) -> bool {
        loop {
            // Registered under the lock, before the check: a wake-up sent after it (under the
            // same lock) is not lost.
            let Some((ready, progress)) = self.with(connection, |s| (done(s), s.progress.clone().notified_owned()))
            else {
                return false;
            };
            if ready {
                return true;
            }
            progress.await;
        }
    }

    /// A fetch of `filter` is about to start again from the stored position: what it lost is
    /// behind that position, so its stop is lifted.
    pub fn refetching(&self, connection: &Connection, filter: &str) {
        self.with(connection, |s| {
            if let Some(subscription) = s.subscriptions.get_mut(filter) {
                subscription.refetch = false;
                subscription.stop = None;
            }
        });
    }

    /// Whether `filter` let something go during its fetch and should fetch again now.
    pub fn refetch_wanted(&self, connection: &Connection, filter: &str) -> bool {
        self.with(connection, |s| s.subscriptions.get(filter).is_some_and(|sub| sub.refetch)).unwrap_or(false)
    }

    /// `filter`'s pages are all out.
    pub fn fetch_end(&self, connection: &Connection, filter: &str) -> FetchEnd {
        self.with(connection, |s| {
            let Some(subscription) = s.subscriptions.get_mut(filter) else { return FetchEnd::Gone };
            if subscription.refetch {
                return FetchEnd::Refetch;
            }
            subscription.fetching = false;
            FetchEnd::Live
        })
        .unwrap_or(FetchEnd::Gone)
    }

    /// The backlog of `filter` could not be fetched: the subscription goes live, but its
    /// position does not move during this connection (it stays before the unread messages).
    pub fn fetch_failed(&self, connection: &Connection, filter: &str) {
        self.with(connection, |s| {
            if let Some(subscription) = s.subscriptions.get_mut(filter) {
                subscription.fetching = false;
                subscription.refetch = false;
                subscription.stalled = true;
            }
        });
    }

    /// Held messages that may go now (the lowest ids first, at most [`FORWARD_AT_ONCE`]):
    /// those no fetching subscription matches. Each is attributed to the live subscriptions that
    /// match it and did not have it from a page; one that none needs is dropped, and takes no
    /// place in the slice. Call until empty: empty means nothing that may go is left.
    pub fn release(&self, connection: &Connection) -> Vec<P> {
        self.with(connection, |s| {
            let subscriptions = &s.subscriptions;
            let (mut ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut s.held).into_iter().partition(|(_, p)| {
                !subscriptions.iter().any(|(filter, sub)| sub.fetching && mqtt_topic::matches(filter, p.topic()))
            });
            s.held = waiting;
            ready.sort_by_key(|(id, _)| *id);
            ready.dedup_by_key(|(id, _)| *id);
            let mut out = Vec::new();
            let mut groups = self.groups.lock().unwrap();
            let mut ready = ready.into_iter();
            // The slice is counted in messages that go, not in messages looked at: a resumed
            // session's queue replays what the backlog sent, and a slice of such duplicates
            // alone would be empty, taken for "nothing left", and strand what came after.
            while out.len() < FORWARD_AT_ONCE {
                let Some((id, publish)) = ready.next() else { break };
                if route_live(s, &mut groups, connection, id, publish.topic(), publish.qos()) {
                    out.push(publish);
                }
            }
            // What does not fit in this slice waits for the next call, unattributed.
            s.held.extend(ready);
            s.queued += out.len();
            out
        })
        .unwrap_or_default()
    }

    /// A live message stored as `id` is about to go to the client (rmqtt's expiry check, as it
    /// leaves the session queue). Returns true when it must not go now: a subscription it matches
    /// is fetching (it is held back, to follow), or the client already has it (a page sent it, or
    /// another subscription's copy did). Otherwise it is attributed to every live subscription
    /// that matches it. A resend (DUP: what was in flight, on the same connection or on a
    /// resumed session) goes as MQTT requires, and counts as outstanding for every subscription
    /// it matches, so that no page sends it again.
    pub fn hold(&self, connection: &Connection, id: i64, live: Live<'_, P>) -> bool {
        self.with(connection, |s| {
            let topic = live.topic;
            let mut groups = self.groups.lock().unwrap();
            if live.resend {
                return resent(s, &mut groups, connection, id, topic) == Some(false);
            }
            let matching = || s.subscriptions.iter().filter(|(filter, _)| mqtt_topic::matches(filter, topic));
            if matching().any(|(_, sub)| sub.fetching) {
                s.held.push((id, (live.keep)()));
                if s.held.len() > HELD_PER_CLIENT {
                    let_go_held(s);
                }
                return true;
            }
            // A message no subscription matches is not this extension's to hold.
            matching().next().is_some() && !route_live(s, &mut groups, connection, id, topic, live.qos)
        })
        .unwrap_or(false)
    }

    /// A message this extension forwarded left the broker (or was dropped).
    pub fn forwarded_gone(&self, connection: &Connection) {
        self.with(connection, |s| {
            s.queued = s.queued.saturating_sub(1);
            if s.queued == 0 {
                s.progress.notify_waiters();
            }
        });
    }

    /// A stored message on its way to the client was lost (a full session queue). Every
    /// subscription it concerns stops its position below it and fetches again: returns the
    /// filters that were live and now need a fetch started (the others refetch when their
    /// current fetch ends).
    pub fn lost(&self, connection: &Connection, id: i64, topic: &str) -> Vec<(String, u8)> {
        self.with(connection, |s| {
            let mut start = Vec::new();
            let mut groups = self.groups.lock().unwrap();
            for (filter, sub) in s.subscriptions.iter_mut() {
                if !(sub.unacked.remove(&id) || mqtt_topic::matches(filter, topic)) {
                    continue;
                }
                groups.unclaim(filter, id);
                sub.stop = Some(sub.stop.map_or(id, |stop| stop.min(id)));
                sub.refetch = true;
                if !sub.fetching {
                    sub.fetching = true;
                    start.push((filter.clone(), sub.qos));
                }
            }
            s.progress.notify_waiters();
            start
        })
        .unwrap_or_default()
    }

    /// The client acked `message` (stored as `id`). Returns the acks to pass on: for each
    /// subscription whose position may move now, the highest such message, grouped by message.
    pub fn acked(&self, connection: &Connection, id: i64, message: Message) -> Vec<PassedAck> {
        self.settled_by(connection, id, Some(message))
    }

    /// A stored message on its way to the client expired in the broker's queue (its MQTT 5
    /// message expiry interval ran out): no ack will come, and no fetch returns it any more, so
    /// positions may pass it as if it were acked, without passing it on itself. Returns the acks
    /// that may pass now: those that waited for it.
    pub fn expired(&self, connection: &Connection, id: i64) -> Vec<PassedAck> {
        self.settled_by(connection, id, None)
    }

    /// `id` is no longer outstanding: acked as `message`, or expired (`None`).
    fn settled_by(&self, connection: &Connection, id: i64, message: Option<Message>) -> Vec<PassedAck> {
        self.with(connection, |s| {
            let message = message.map(Arc::new);
            let mut passed: Vec<(Arc<Message>, Vec<String>)> = Vec::new();
            let mut groups = self.groups.lock().unwrap();
            // What `settled` waits for: a subscription with nothing unacked left.
            let mut settled = false;
            for (filter, sub) in s.subscriptions.iter_mut() {
                let removed = sub.unacked.remove(&id);
                settled |= removed && sub.unacked.is_empty();
                // A share group's position records each ack: it passes at once.
                if is_shared(filter) {
                    match (&message, removed) {
                        (Some(message), true) => {
                            groups.acked(filter, id);
                            match passed.iter_mut().find(|(m, _)| m.id == message.id) {
                                Some((_, filters)) => filters.push(filter.clone()),
                                None => passed.push((message.clone(), vec![filter.clone()])),
                            }
                        }
                        (None, true) => groups.unclaim(filter, id),
                        (_, false) => {}
                    }
                    continue;
                }
                if let (Some(message), true) = (&message, removed) {
                    sub.acked.insert(id, message.clone());
                }
                if let Some(highest) = sub.passable() {
                    match passed.iter_mut().find(|(m, _)| m.id == highest.id) {
                        Some((_, filters)) => filters.push(filter.clone()),
                        None => passed.push((highest, vec![filter.clone()])),
                    }
                }
            }
            // An expired message no page returns: only an acked one is remembered.
            if message.is_some() {
                if s.subscriptions.values().any(|sub| sub.fetching) {
                    s.acked.insert(id);
                    while s.acked.len() > ACKED_REMEMBERED {
                        s.acked.pop_first();
                    }
                } else {
                    s.acked.clear();
                }
            }
            if settled {
                s.progress.notify_waiters();
            }
            passed.into_iter().map(|(message, filters)| (Arc::unwrap_or_clone(message), filters)).collect()
        })
        .unwrap_or_default()
    }
}

/// A live message `id` on `topic` that no fetching subscription holds back: whether it goes to
/// the client, attributed to every subscription that matches it. It does not go when the client
/// has it already: a page or an earlier copy sent it, or the client acked it while a page might
/// reach it. Then it counts for the subscriptions that match it and lack it only while that
/// delivery is outstanding, so that their positions wait for its ack, as for their own. A
/// message another member of a share group has is the group's already. A QoS 0 subscription
/// gets it with nothing to ack, and so does every subscription when this copy goes at QoS 0 (a
/// QoS 0 subscription's copy that comes first, or the one copy an MQTT 5 client gets, at the QoS
/// of the subscription rmqtt picks): it is not outstanding there, and the later copies of the
/// other subscriptions do not go. Were it outstanding, nothing would ack it and their positions
/// would stay behind it for the rest of the connection; as it is, they pass it with their next
/// ack.
fn route_live<P>(
    s: &mut ClientState<P>,
    groups: &mut Groups,
    connection: &Connection,
    id: i64,
    topic: &str,
    qos: u8,
) -> bool {
    let delivered = s.acked.contains(&id) || s.copies.contains(&id) || s.subscriptions.values().any(|sub| sub.has(id));
    let outstanding = s.subscriptions.values().any(|sub| sub.unacked.contains(&id));
    let (mut matching, mut wanted) = (0, false);
    for (filter, sub) in s.subscriptions.iter_mut().filter(|(filter, _)| mqtt_topic::matches(filter, topic)) {
        matching += 1;
        if sub.has(id) || groups.taken(filter, id, connection) {
            continue;
        }
        wanted = true;
        if sub.qos > 0 && qos > 0 && (outstanding || !delivered) {
            groups.claim(filter, id, connection);
            sub.unacked.insert(id);
        }
    }
    let goes = wanted && !delivered;
    if goes && matching > 1 {
        s.copies.insert(id);
        while s.copies.len() > COPIES_REMEMBERED {
            s.copies.pop_first();
        }
    }
    goes
}

/// A resend of `id` (what was in flight to the client): outstanding for every subscription it
/// matches, so that no page sends it again. Unless every share group it is for has it acked by
/// another member meanwhile (the member left it unacked, it went back to the group): then once is
/// enough. Returns whether it goes, or `None` if no subscription matches it.
fn resent<P>(
    s: &mut ClientState<P>,
    groups: &mut Groups,
    connection: &Connection,
    id: i64,
    topic: &str,
) -> Option<bool> {
    let mut wanted = None;
    for (filter, sub) in s.subscriptions.iter_mut().filter(|(f, _)| mqtt_topic::matches(f, topic)) {
        let elsewhere = groups.0.get(filter.as_str()).is_some_and(|g| g.acked.contains(&id));
        wanted = Some(wanted.unwrap_or(false) || !elsewhere);
        if !elsewhere && sub.qos > 0 && !sub.acked.contains_key(&id) {
            groups.claim(filter, id, connection);
            sub.unacked.insert(id);
        }
    }
    wanted
}

/// Too much is held: let it all go to the database, and have every fetching subscription fetch
/// once more when its pages are out (the held messages are stored after the pages it has seen).
fn let_go_held<P>(s: &mut ClientState<P>) {
    tracing::info!(held = s.held.len(), "held messages left to the database");
    s.held.clear();
    for sub in s.subscriptions.values_mut().filter(|sub| sub.fetching) {
        sub.refetch = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A live message as a broker would hold it.
    #[derive(Debug, Clone)]
    struct Routed {
        id: i64,
        topic: String,
    }

    impl Held for Routed {
        fn topic(&self) -> &str {
            &self.topic
        }
        fn qos(&self) -> u8 {
            1
        }
    }

    type Deliveries = super::Deliveries<Routed>;

    fn stored(id: i64, topic: &str) -> Message {
        Message {
            id: Some(id),
            msgid: String::new(),
            sender: "p".into(),
            topic: topic.into(),
            payload: id.to_string().into_bytes(),
            qos: 1,
            retain: false,
            timestamp: 0,
            properties: vec![],
        }
    }

    /// Whether `deliveries` holds back the live message `id` on `topic`.
    fn hold(deliveries: &Deliveries, connection: &Connection, id: i64, topic: &str) -> bool {
        hold_at(deliveries, connection, id, topic, 1)
    }

    /// Like [`hold`], for a copy that goes at `qos`.
    fn hold_at(deliveries: &Deliveries, connection: &Connection, id: i64, topic: &str, qos: u8) -> bool {
        let keep = || Routed { id, topic: topic.into() };
        deliveries.hold(connection, id, Live { topic, resend: false, qos, keep: &keep })
    }

    fn client() -> (Deliveries, Connection) {
        let deliveries = Deliveries::default();
        let connection = Connection { clientid: "c".into(), since: 1 };
        deliveries.connected(&connection, false);
        (deliveries, connection)
    }

    /// Forwards a page of messages on topic `t/p` with these ids; returns which went.
    fn page(
        deliveries: &Deliveries,
        connection: &Connection,
        filter: &str,
        ids: impl IntoIterator<Item = i64>,
    ) -> Vec<bool> {
        let page: Vec<Message> = ids.into_iter().map(|id| stored(id, "t/p")).collect();
        deliveries.forward_page(connection, filter, &page).expect("subscribed")
    }

    fn go_live(deliveries: &Deliveries, connection: &Connection, filter: &str) -> Vec<i64> {
        assert_eq!(deliveries.fetch_end(connection, filter), FetchEnd::Live);
        let mut released = Vec::new();
        loop {
            let slice = deliveries.release(connection);
            if slice.is_empty() {
                return released;
            }
            assert!(slice.len() <= FORWARD_AT_ONCE);
            released.extend(slice.iter().map(|p| p.id));
        }
    }

    /// (filters, id) of what an ack passes on, sorted.
    fn passed(acks: Vec<PassedAck>) -> Vec<(i64, Vec<String>)> {
        let mut out: Vec<(i64, Vec<String>)> = acks
            .into_iter()
            .map(|(m, mut filters)| {
                filters.sort();
                (m.id.unwrap(), filters)
            })
            .collect();
        out.sort();
        out
    }

    fn ack(deliveries: &Deliveries, connection: &Connection, id: i64, topic: &str) -> Vec<(i64, Vec<String>)> {
        passed(deliveries.acked(connection, id, stored(id, topic)))
    }

    /// Time for a woken task to run: a waiter not done by then was not woken, and stays pending.
    const A_WAKE_UP: std::time::Duration = std::time::Duration::from_millis(50);

    /// A waiter in `sent` or `settled` on a task of its own, once it waits.
    async fn waiting<T: Send + 'static>(wait: impl Future<Output = T> + Send + 'static) -> tokio::task::JoinHandle<T> {
        let waiter = tokio::spawn(wait);
        tokio::time::sleep(A_WAKE_UP).await;
        assert!(!waiter.is_finished(), "it waits");
        waiter
    }

    /// Whether `waiter` is done after `change`.
    async fn done_after<T>(waiter: &tokio::task::JoinHandle<T>, change: impl FnOnce()) -> bool {
        change();
        tokio::time::sleep(A_WAKE_UP).await;
        waiter.is_finished()
    }

    #[tokio::test]
    async fn waiters_wake_when_what_they_wait_for_comes_and_not_before() {
        let (deliveries, connection) = client();
        let deliveries = Arc::new(deliveries);
        assert!(deliveries.subscribed(&connection, "t/#", 1));
        assert_eq!(page(&deliveries, &connection, "t/#", [1, 2]), [true, true]);

        // `sent`: the slice has left the broker.
        let (d, c) = (deliveries.clone(), connection.clone());
        let sent = waiting(async move { d.sent(&c).await }).await;
        assert!(!done_after(&sent, || deliveries.forwarded_gone(&connection)).await, "one of two left");
        assert!(done_after(&sent, || deliveries.forwarded_gone(&connection)).await, "both left");

        // `settled`: the subscription has nothing unacked left.
        let (d, c) = (deliveries.clone(), connection.clone());
        let settled = waiting(async move { d.settled(&c, "t/#").await }).await;
        assert!(!done_after(&settled, || drop(ack(&deliveries, &connection, 1, "t/p"))).await, "one of two acked");
        assert!(done_after(&settled, || drop(ack(&deliveries, &connection, 2, "t/p"))).await, "both acked");
        assert!(settled.await.unwrap());

        // `settled`: the subscription went away.
        assert!(deliveries.subscribed(&connection, "u/#", 1));
        assert_eq!(page(&deliveries, &connection, "u/#", [3]), [true]);
        let (d, c) = (deliveries.clone(), connection.clone());
        let settled = waiting(async move { d.settled(&c, "u/#").await }).await;
        assert!(done_after(&settled, || drop(deliveries.unsubscribed(&connection, "u/#"))).await, "unsubscribed");
        assert!(!settled.await.unwrap(), "not settled: gone");
    }

    #[tokio::test]
    async fn a_qos_0_subscriptions_live_messages_are_not_outstanding() {
        let (deliveries, connection) = client();
        assert!(deliveries.subscribed(&connection, "z/#", 0));
        assert_eq!(go_live(&deliveries, &connection, "z/#"), Vec::<i64>::new());
        for id in 1..=100 {
            assert!(!hold(&deliveries, &connection, id, "z/a"), "it goes");
        }
        // Nothing to wait for: no ack will ever come for them.
        let settled = tokio::time::timeout(std::time::Duration::from_secs(1), deliveries.settled(&connection, "z/#"));
        assert!(settled.await.expect("settled at once"));
    }

    #[test]
    fn held_messages_are_released_in_id_order_in_slices_without_what_the_backlog_sent() {
        let (deliveries, connection) = client();
        deliveries.subscribed(&connection, "t/#", 1);
        // The pages sent ids 5 to 10; the position had passed 1 to 4.
        page(&deliveries, &connection, "t/#", 5..=10);
        // Live messages arrive out of order, some of them already in the backlog.
        for id in (1..=260).rev() {
            assert!(hold(&deliveries, &connection, id, "t/a"));
        }
        assert!(!hold(&deliveries, &connection, 999, "other"));
        let released = go_live(&deliveries, &connection, "t/#");
        let expected: Vec<i64> = (1..=4).chain(11..=260).collect();
        assert_eq!(released, expected, "all but what the pages sent, in order");
        assert!(!hold(&deliveries, &connection, 261, "t/a"), "live now");
        assert!(hold(&deliveries, &connection, 7, "t/a"), "a duplicate");
    }

    #[test]
    fn live_messages_held_behind_a_full_slice_of_duplicates_are_released() {
        // A resumed session: the broker's own queue replays the 150 messages published while
        // the client was away, which the backlog's pages also sent, and 10 new ones come live
        // while the backlog goes out.
        let (deliveries, connection) = client();
        deliveries.subscribed(&connection, "t/#", 1);
        page(&deliveries, &connection, "t/#", 1..=150);
        for id in 1..=160 {
            assert!(hold(&deliveries, &connection, id, "t/a"));
        }
        let expected: Vec<i64> = (151..=160).collect();
        assert_eq!(go_live(&deliveries, &connection, "t/#"), expected);
    }

    #[test]
    fn an_ack_waits_for_every_lower_unacked_id_of_its_subscription_and_passes_the_highest() {
        let (deliveries, connection) = client();
        deliveries.subscribed(&connection, "#", 1);
        go_live(&deliveries, &connection, "#");
        for id in [1, 2, 3, 4] {
            assert!(!hold(&deliveries, &connection, id, if id % 2 == 0 { "b" } else { "a" }));
        }
        assert_eq!(ack(&deliveries, &connection, 3, "a"), [], "1 is unacked");
        assert_eq!(ack(&deliveries, &connection, 2, "b"), []);
        assert_eq!(ack(&deliveries, &connection, 1, "a"), [(3, vec!["#".to_owned()])], "the highest");
        assert_eq!(ack(&deliveries, &connection, 4, "b"), [(4, vec!["#".to_owned()])]);
    }

    #[test]
    fn an_ack_moves_only_the_positions_of_subscriptions_that_delivered_the_message() {
        // Issue 17, case 1: a/# has a backlog going out, a/+/c runs ahead of it.
        let (deliveries, connection) = client();
        deliveries.subscribed(&connection, "a/#", 1);
        deliveries.subscribed(&connection, "a/+/c", 1);
        page(&deliveries, &connection, "a/#", 1..=3);
        page(&deliveries, &connection, "a/+/c", [10, 20]);
        assert_eq!(ack(&deliveries, &connection, 10, "a/x/c"), [(10, vec!["a/+/c".to_owned()])], "not a/#");
        assert_eq!(ack(&deliveries, &connection, 1, "a/y"), [(1, vec!["a/#".to_owned()])]);
        // A filter the client is not subscribed to is never named.
        deliveries.unsubscribed(&connection, "a/#");
        assert_eq!(ack(&deliveries, &connection, 2, "a/y"), []);
        assert_eq!(ack(&deliveries, &connection, 20, "a/x/c"), [(20, vec!["a/+/c".to_owned()])]);
    }

    #[test]
    fn a_live_message_counts_for_every_live_subscription_it_matches_and_goes_once() {
        let (deliveries, connection) = client();
        for filter in ["a/#", "a/+/c"] {
            deliveries.subscribed(&connection, filter, 1);
            go_live(&deliveries, &connection, filter);
        }
        assert!(!hold(&deliveries, &connection, 5, "a/x/c"));
        assert!(hold(&deliveries, &connection, 5, "a/x/c"), "a second copy (3.1.1: one per subscription)");
        assert_eq!(ack(&deliveries, &connection, 5, "a/x/c"), [(5, vec!["a/#".to_owned(), "a/+/c".to_owned()])]);
    }

    #[test]
    fn a_later_copy_of_a_live_message_does_not_go_again_once_the_first_is_acked() {
        // MQTT 3.1.1: the broker routes a copy per matching subscription, one after the other
        // through the session's queue. With a small in-flight window the second copy leaves the
        // queue only once the first is acked.
        let (deliveries, connection) = client();
        for filter in ["a/#", "a/+/c"] {
            deliveries.subscribed(&connection, filter, 1);
            go_live(&deliveries, &connection, filter);
        }
        assert!(!hold(&deliveries, &connection, 5, "a/x/c"));
        assert_eq!(ack(&deliveries, &connection, 5, "a/x/c"), [(5, vec!["a/#".to_owned(), "a/+/c".to_owned()])]);
        assert!(hold(&deliveries, &connection, 5, "a/x/c"), "the second copy, after the ack");
        // A message one subscription matches has no second copy to wait for.
        assert!(!hold(&deliveries, &connection, 6, "a/y"));
    }

    #[test]
    fn a_copy_at_qos_0_leaves_nothing_outstanding_and_the_later_copies_do_not_go() {
        // a/# at QoS 0 (its copy comes first) and a/+/c at QoS 1: nothing acks the QoS 0 copy,
        // so a/+/c must not wait for 5, and its own copy of 5 does not go again.
        let (deliveries, connection) = client();
        for (filter, qos) in [("a/#", 0), ("a/+/c", 1)] {
            deliveries.subscribed(&connection, filter, qos);
            go_live(&deliveries, &connection, filter);
        }
        assert!(!hold_at(&deliveries, &connection, 5, "a/x/c", 0));
        assert!(hold_at(&deliveries, &connection, 5, "a/x/c", 1), "a/+/c's copy");
        assert!(!hold_at(&deliveries, &connection, 6, "a/x/c", 1));
        assert!(hold_at(&deliveries, &connection, 6, "a/x/c", 0), "a/#'s copy");
        assert_eq!(ack(&deliveries, &connection, 6, "a/x/c"), [(6, vec!["a/+/c".to_owned()])], "not held behind 5");
    }

    #[test]
    fn a_held_message_a_page_of_another_subscription_sent_is_not_released_again() {
        // t/# drains its backlog; t/+ subscribes meanwhile, and its first page has 10, stored
        // after t/+'s position was set and before the broker routed to t/+. The broker's copies
        // of 10 are held behind t/#'s backlog.
        let (deliveries, connection) = client();
        deliveries.subscribed(&connection, "t/#", 1);
        page(&deliveries, &connection, "t/#", 1..=3);
        deliveries.subscribed(&connection, "t/+", 1);
        assert_eq!(page(&deliveries, &connection, "t/+", [10]), [true]);
        assert!(hold(&deliveries, &connection, 10, "t/p"), "the copy for t/#");
        assert!(hold(&deliveries, &connection, 10, "t/p"), "the copy for t/+");
        assert_eq!(go_live(&deliveries, &connection, "t/+"), Vec::<i64>::new(), "t/# still fetches");
        assert_eq!(go_live(&deliveries, &connection, "t/#"), Vec::<i64>::new(), "t/+'s page sent it");
        // Its ack counts for both: t/# waits for it, as for its own backlog.
        assert_eq!(ack(&deliveries, &connection, 1, "t/p"), [(1, vec!["t/#".to_owned()])]);
        assert_eq!(ack(&deliveries, &connection, 3, "t/p"), []);
        assert_eq!(ack(&deliveries, &connection, 2, "t/p"), [(3, vec!["t/#".to_owned()])], "not past 10");
        assert_eq!(ack(&deliveries, &connection, 10, "t/p"), [(10, vec!["t/#".to_owned(), "t/+".to_owned()])]);
        // Acked before the release: it does not go, and nothing waits for it.
        deliveries.subscribed(&connection, "t/p", 1);
        assert_eq!(page(&deliveries, &connection, "t/p", [20]), [true]);
        assert!(hold(&deliveries, &connection, 20, "t/p"));
        assert_eq!(ack(&deliveries, &connection, 20, "t/p"), [(20, vec!["t/p".to_owned()])]);
        assert_eq!(go_live(&deliveries, &connection, "t/p"), Vec::<i64>::new(), "acked already");
        assert!(!hold(&deliveries, &connection, 21, "t/p"));
        assert_eq!(
            ack(&deliveries, &connection, 21, "t/p"),
            [(21, vec!["t/#".to_owned(), "t/+".to_owned(), "t/p".to_owned()])]
        );
    }

    #[test]
    fn a_live_copy_of_what_another_subscriptions_page_sent_counts_for_both() {
        let (deliveries, connection) = client();
        deliveries.subscribed(&connection, "a/#", 1);
        go_live(&deliveries, &connection, "a/#");
        deliveries.subscribed(&connection, "a/+/c", 1);
        assert_eq!(page(&deliveries, &connection, "a/+/c", [7]), [true]);
        go_live(&deliveries, &connection, "a/+/c");
        assert!(hold(&deliveries, &connection, 7, "a/x/c"), "the page sent it");
        assert!(!hold(&deliveries, &connection, 8, "a/y"));
        assert_eq!(ack(&deliveries, &connection, 8, "a/y"), [], "a/# waits for 7");
        assert_eq!(
            ack(&deliveries, &connection, 7, "a/x/c"),
            [(7, vec!["a/+/c".to_owned()]), (8, vec!["a/#".to_owned()])]
        );
    }

    #[test]
    fn unsubscribing_keeps_held_messages_another_subscription_matches() {
        // Issue 17, case 2: a/# live, a/+/c fetching; a/x/c messages held; a/+/c goes away.
        let (deliveries, connection) = client();
        deliveries.subscribed(&connection, "a/#", 1);
        go_live(&deliveries, &connection, "a/#");
        deliveries.subscribed(&connection, "a/+/c", 1);
        page(&deliveries, &connection, "a/+/c", [1, 2]);
        for id in 10..20 {
            assert!(hold(&deliveries, &connection, id, "a/x/c"), "held behind a/+/c's backlog");
        }
        deliveries.unsubscribed(&connection, "a/+/c");
        let released: Vec<i64> = deliveries.release(&connection).iter().map(|p| p.id).collect();
        assert_eq!(released, (10..20).collect::<Vec<_>>(), "a/# still wants them");
        assert_eq!(ack(&deliveries, &connection, 10, "a/x/c"), [(10, vec!["a/#".to_owned()])]);
    }

    #[test]
    fn held_messages_nobody_matches_any_more_are_dropped() {
        let (deliveries, connection) = client();
        deliveries.subscribed(&connection, "a/+/c", 1);
        assert!(hold(&deliveries, &connection, 3, "a/x/c"));
        deliveries.unsubscribed(&connection, "a/+/c");
        assert!(deliveries.release(&connection).is_empty());
    }

    #[test]
    fn a_lost_message_stops_the_position_below_it_and_refetches_without_resending_what_was_acked() {
        // Issue 17, case 3: a slow consumer's session queue overflows.
        let (deliveries, connection) = client();
        deliveries.subscribed(&connection, "t", 1);
        go_live(&deliveries, &connection, "t");
        for id in 1..=4 {
            assert!(!hold(&deliveries, &connection, id, "t"));
        }
        assert_eq!(deliveries.lost(&connection, 5, "t"), [("t".to_owned(), 1)], "a fetch to start");
        assert!(hold(&deliveries, &connection, 6, "t"), "held while it catches up");
        assert!(hold(&deliveries, &connection, 7, "t"));
        assert_eq!(ack(&deliveries, &connection, 1, "t"), [(1, vec!["t".to_owned()])]);
        assert_eq!(ack(&deliveries, &connection, 4, "t"), [], "2 and 3 unacked");
        assert_eq!(ack(&deliveries, &connection, 2, "t"), [(2, vec!["t".to_owned()])]);
        assert_eq!(ack(&deliveries, &connection, 3, "t"), [(4, vec!["t".to_owned()])], "up to the lost 5, not past");
        // Fetching again from the stored position (4): 5, 6, 7 come from the database.
        deliveries.refetching(&connection, "t");
        assert_eq!(page(&deliveries, &connection, "t", [5, 6, 7]), [true; 3]);
        assert_eq!(deliveries.fetch_end(&connection, "t"), FetchEnd::Live);
        assert!(deliveries.release(&connection).is_empty(), "6 came with the page");
        assert_eq!(ack(&deliveries, &connection, 5, "t"), [(5, vec!["t".to_owned()])]);
    }

    #[test]
    fn a_message_that_expired_on_the_way_lets_the_acks_behind_it_pass() {
        // MQTT 5 message expiry: the broker drops 2 from the session's queue after it was
        // attributed. No ack comes for it; positions pass it, and the ack waiting behind it goes.
        let (deliveries, connection) = client();
        deliveries.subscribed(&connection, "t", 1);
        go_live(&deliveries, &connection, "t");
        for id in 1..=3 {
            assert!(!hold(&deliveries, &connection, id, "t"));
        }
        assert_eq!(ack(&deliveries, &connection, 1, "t"), [(1, vec!["t".to_owned()])]);
        assert_eq!(ack(&deliveries, &connection, 3, "t"), [], "2 is outstanding");
        assert_eq!(passed(deliveries.expired(&connection, 2)), [(3, vec!["t".to_owned()])]);
        assert!(!hold(&deliveries, &connection, 4, "t"));
        assert_eq!(ack(&deliveries, &connection, 4, "t"), [(4, vec!["t".to_owned()])]);
        assert_eq!(passed(deliveries.expired(&connection, 9)), [], "nothing waited for 9");
    }

    #[test]
    fn a_page_does_not_resend_what_the_subscription_already_had_acked() {
        let (deliveries, connection) = client();
        deliveries.subscribed(&connection, "t", 1);
        go_live(&deliveries, &connection, "t");
        assert!(!hold(&deliveries, &connection, 6, "t"));
        deliveries.lost(&connection, 5, "t");
        assert_eq!(ack(&deliveries, &connection, 6, "t"), [], "stopped below 5");
        deliveries.refetching(&connection, "t");
        assert_eq!(page(&deliveries, &connection, "t", [5, 6]), [true, false]);
        assert_eq!(ack(&deliveries, &connection, 5, "t"), [(6, vec!["t".to_owned()])]);
    }

    #[test]
    fn overlapping_backlogs_send_a_message_once_and_its_ack_counts_for_both() {
        let (deliveries, connection) = client();
        deliveries.subscribed(&connection, "a/#", 1);
        deliveries.subscribed(&connection, "a/+/c", 1);
        // a/+/c runs ahead: 11 goes out and is acked before a/#'s pages reach it.
        assert_eq!(page(&deliveries, &connection, "a/+/c", [1, 11]), [true, true]);
        assert_eq!(ack(&deliveries, &connection, 1, "a/x/c"), [(1, vec!["a/+/c".to_owned()])]);
        assert_eq!(ack(&deliveries, &connection, 11, "a/x/c"), [(11, vec!["a/+/c".to_owned()])]);
        // a/#'s page: 1 and 11 the client has; 2 is new.
        assert_eq!(page(&deliveries, &connection, "a/#", [1, 2, 11, 12]), [false, true, false, true]);
        assert_eq!(ack(&deliveries, &connection, 2, "a/y"), [(11, vec!["a/#".to_owned()])], "1 and 11 count as acked");
        // Outstanding in one subscription, reached by the other's page: one copy, acked for both.
        assert_eq!(page(&deliveries, &connection, "a/+/c", [21]), [true]);
        assert_eq!(page(&deliveries, &connection, "a/#", [21]), [false]);
        assert_eq!(ack(&deliveries, &connection, 12, "a/y"), [(12, vec!["a/#".to_owned()])]);
        assert_eq!(ack(&deliveries, &connection, 21, "a/x/c"), [(21, vec!["a/#".to_owned(), "a/+/c".to_owned()])]);
    }

    #[test]
    fn what_a_page_counts_as_acked_through_another_subscription_passes_without_an_ack_of_its_own() {
        // a/+/c sent 11 and 12 live while a/#'s backlog was still going out; the client acked
        // both. a/#'s last page reaches them: they are not sent again, and a/#'s position
        // moves to 12 now, with no ack through a/# to come.
        let (deliveries, connection) = client();
        deliveries.subscribed(&connection, "a/#", 1);
        deliveries.subscribed(&connection, "a/+/c", 1);
        assert_eq!(page(&deliveries, &connection, "a/+/c", [11, 12]), [true, true]);
        assert_eq!(ack(&deliveries, &connection, 11, "a/x/c"), [(11, vec!["a/+/c".to_owned()])]);
        assert_eq!(ack(&deliveries, &connection, 12, "a/x/c"), [(12, vec!["a/+/c".to_owned()])]);
        assert_eq!(page(&deliveries, &connection, "a/#", [1]), [true]);
        assert_eq!(passed(deliveries.credited(&connection, "a/#")), [], "1 is unacked");
        assert_eq!(ack(&deliveries, &connection, 1, "a/y"), [(1, vec!["a/#".to_owned()])]);
        assert_eq!(page(&deliveries, &connection, "a/#", [11, 12]), [false, false]);
        assert_eq!(passed(deliveries.credited(&connection, "a/#")), [(12, vec!["a/#".to_owned()])]);
        assert_eq!(passed(deliveries.credited(&connection, "a/#")), [], "passed once");
    }

    #[test]
    fn too_many_held_messages_are_left_to_the_database_and_the_fetch_goes_once_more() {
        let (deliveries, connection) = client();
        deliveries.subscribed(&connection, "t", 1);
        for id in 1..=(HELD_PER_CLIENT as i64 + 1) {
            assert!(hold(&deliveries, &connection, id, "t"));
        }
        assert_eq!(deliveries.fetch_end(&connection, "t"), FetchEnd::Refetch);
        deliveries.refetching(&connection, "t");
        assert_eq!(deliveries.fetch_end(&connection, "t"), FetchEnd::Live);
        assert!(deliveries.release(&connection).is_empty(), "nothing kept in memory");
    }

    #[test]
    fn a_backlog_that_failed_keeps_its_position_and_the_others_go_on() {
        let (deliveries, connection) = client();
        deliveries.subscribed(&connection, "t/#", 1);
        deliveries.fetch_failed(&connection, "t/#");
        deliveries.subscribed(&connection, "u", 1);
        go_live(&deliveries, &connection, "u");
        assert!(!hold(&deliveries, &connection, 7, "t/a"));
        assert_eq!(ack(&deliveries, &connection, 7, "t/a"), []);
        assert!(!hold(&deliveries, &connection, 8, "u"));
        assert_eq!(ack(&deliveries, &connection, 8, "u"), [(8, vec!["u".to_owned()])]);
    }

    #[test]
    fn a_resumed_session_fetches_again_and_what_the_broker_queued_meanwhile_goes_once() {
        let (deliveries, connection) = client();
        deliveries.subscribed(&connection, "t/#", 1);
        go_live(&deliveries, &connection, "t/#");
        deliveries.subscribed(&connection, "u", 0);
        go_live(&deliveries, &connection, "u");
        deliveries.disconnected(&connection, true);
        // Back, and the broker resumed the session: both subscriptions fetch from their positions.
        let back = Connection { clientid: "c".into(), since: 2 };
        let mut restored = deliveries.connected(&back, true);
        restored.sort();
        assert_eq!(restored, [("t/#".to_owned(), 1), ("u".to_owned(), 0)]);
        // What the broker queued for the session (1 to 5) arrives while the backlog goes out.
        for id in 1..=5 {
            assert!(hold(&deliveries, &back, id, "t/a"), "held behind the backlog");
        }
        assert_eq!(page(&deliveries, &back, "t/#", 1..=4), [true; 4]);
        assert_eq!(go_live(&deliveries, &back, "t/#"), [5], "1 to 4 came with the page");
        // A stored subscription applied again (on_subscribe_lookup) starts no second fetch.
        assert!(!deliveries.subscribed(&back, "u", 0));
        assert!(deliveries.subscribed(&back, "v", 1), "a new one does");
    }

    #[test]
    fn a_session_not_resumed_or_ended_forgets_its_subscriptions() {
        let (deliveries, connection) = client();
        deliveries.subscribed(&connection, "t", 1);
        deliveries.disconnected(&connection, true);
        let clean = Connection { clientid: "c".into(), since: 2 };
        assert_eq!(deliveries.connected(&clean, false), [], "a clean start");
        deliveries.disconnected(&clean, true);
        assert_eq!(deliveries.connected(&Connection { clientid: "c".into(), since: 3 }, true), []);

        let (deliveries, connection) = client();
        deliveries.subscribed(&connection, "t", 1);
        deliveries.disconnected(&connection, true);
        assert_eq!(deliveries.session_ended("c"), ["t".to_owned()]);
        assert_eq!(deliveries.connected(&Connection { clientid: "c".into(), since: 2 }, true), []);
    }

    #[test]
    fn a_resend_on_a_resumed_session_goes_and_no_page_sends_it_again() {
        let (deliveries, connection) = client();
        deliveries.subscribed(&connection, "t", 1);
        go_live(&deliveries, &connection, "t");
        deliveries.disconnected(&connection, true);
        let back = Connection { clientid: "c".into(), since: 2 };
        deliveries.connected(&back, true);
        // 3 was in flight when the client left: the broker resends it (DUP) at once.
        let keep = || Routed { id: 3, topic: "t".into() };
        assert!(!deliveries.hold(&back, 3, Live { topic: "t", resend: true, qos: 1, keep: &keep }));
        assert_eq!(page(&deliveries, &back, "t", [3, 4]), [false, true]);
        assert_eq!(ack(&deliveries, &back, 4, "t"), [], "3 is outstanding");
        assert_eq!(ack(&deliveries, &back, 3, "t"), [(4, vec!["t".to_owned()])]);
    }

    #[test]
    fn a_takeover_does_not_send_again_what_the_connection_taken_over_had_acked() {
        let (deliveries, connection) = client();
        deliveries.subscribed(&connection, "t", 1);
        assert_eq!(page(&deliveries, &connection, "t", [1, 2, 3]), [true, true, true]);
        assert_eq!(ack(&deliveries, &connection, 2, "t"), [], "1 is unacked");
        // The client connects again while the broker still has it connected: it takes over.
        let again = Connection { clientid: "c".into(), since: 2 };
        assert_eq!(deliveries.connected(&again, true), [("t".to_owned(), 1)]);
        assert_eq!(ack(&deliveries, &connection, 1, "t"), [], "the connection taken over is gone");
        assert_eq!(page(&deliveries, &again, "t", [1, 2, 3, 4]), [true, false, true, true]);
        assert_eq!(ack(&deliveries, &again, 4, "t"), [], "1 and 3 are unacked");
        assert_eq!(ack(&deliveries, &again, 1, "t"), [(2, vec!["t".to_owned()])]);
        assert_eq!(ack(&deliveries, &again, 3, "t"), [(4, vec!["t".to_owned()])]);
    }

    #[test]
    fn what_was_in_flight_goes_once_as_its_resend_even_when_a_page_comes_first() {
        let (deliveries, connection) = client();
        deliveries.subscribed(&connection, "t", 1);
        go_live(&deliveries, &connection, "t");
        deliveries.disconnected(&connection, true);
        // 2 and 3 were in flight when the client left (the broker's offline in-flight messages).
        deliveries.kept_in_flight("c", vec![(2, "t".into()), (3, "t".into())]);
        let back = Connection { clientid: "c".into(), since: 2 };
        assert_eq!(deliveries.connected(&back, true), [("t".to_owned(), 1)]);
        // The first page goes before the broker's resends reach `hold` (a loaded broker).
        assert_eq!(page(&deliveries, &back, "t", [1, 2, 3, 4]), [true, false, false, true]);
        let resend = |id: i64| {
            let keep = || Routed { id, topic: "t".into() };
            deliveries.hold(&back, id, Live { topic: "t", resend: true, qos: 1, keep: &keep })
        };
        assert!(!resend(3) && !resend(2), "the resends go, as MQTT requires");
        assert_eq!(ack(&deliveries, &back, 1, "t"), [(1, vec!["t".to_owned()])]);
        assert_eq!(ack(&deliveries, &back, 4, "t"), [], "2 and 3 are outstanding");
        assert_eq!(ack(&deliveries, &back, 3, "t"), []);
        assert_eq!(ack(&deliveries, &back, 2, "t"), [(4, vec!["t".to_owned()])]);
        // Another session of the client id starts clean: nothing of it is outstanding.
        deliveries.disconnected(&back, true);
        deliveries.kept_in_flight("c", vec![(5, "t".into())]);
        let clean = Connection { clientid: "c".into(), since: 3 };
        deliveries.connected(&clean, false);
        deliveries.subscribed(&clean, "t", 1);
        assert_eq!(page(&deliveries, &clean, "t", [5]), [true]);
    }

    #[test]
    fn share_group_members_never_both_send_a_message_and_what_one_leaves_goes_to_another() {
        let deliveries = Deliveries::default();
        let (w1, w2) = (Connection { clientid: "w1".into(), since: 1 }, Connection { clientid: "w2".into(), since: 2 });
        let group = "$share/g/t/#";
        for member in [&w1, &w2] {
            deliveries.connected(member, false);
            deliveries.subscribed(member, group, 1);
        }
        // Both fetched the same first page: w1 sends it first, w2 sends none of it.
        assert_eq!(page(&deliveries, &w1, group, 1..=3), [true; 3]);
        assert_eq!(page(&deliveries, &w2, group, 1..=3), [false; 3]);
        assert_eq!(page(&deliveries, &w2, group, 4..=5), [true; 2]);
        // Acks pass one by one, whatever is unacked below them; an acked one is not sent again.
        assert_eq!(ack(&deliveries, &w1, 3, "t/p"), [(3, vec![group.to_owned()])]);
        assert_eq!(ack(&deliveries, &w2, 5, "t/p"), [(5, vec![group.to_owned()])]);
        assert_eq!(page(&deliveries, &w2, group, [3]), [false], "the group acked it");
        // Live: w2 gets 6 from the broker.
        go_live(&deliveries, &w2, group);
        assert!(!hold(&deliveries, &w2, 6, "t/p"));
        // w1 leaves with 1 and 2 unacked: w2 fetches the group's backlog again, and gets them.
        assert_eq!(deliveries.disconnected(&w1, false), [(w2.clone(), group.to_owned(), 1)]);
        assert_eq!(page(&deliveries, &w2, group, [1, 2, 4, 6]), [true, true, false, false], "4 and 6 are w2's already");
        // Its acks pass at once too.
        assert_eq!(ack(&deliveries, &w2, 1, "t/p"), [(1, vec![group.to_owned()])]);
        // w1 comes back to its kept session, and the broker resends what it had in flight (1):
        // w2 acked it meanwhile, so it does not go a second time. 2 is not acked: it goes.
        deliveries.connected(&w1, true);
        deliveries.subscribed(&w1, group, 1);
        go_live(&deliveries, &w1, group);
        let resend = |id: i64| {
            let keep = || Routed { id, topic: "t/p".into() };
            deliveries.hold(&w1, id, Live { topic: "t/p", resend: true, qos: 1, keep: &keep })
        };
        assert!(resend(1), "the group has it");
        assert!(!resend(2), "nobody acked it yet");
    }
}
