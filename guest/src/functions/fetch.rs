//! on_message_fetch: hand a subscriber the stored messages it has not read, oldest first, one
//! page at a time.
//!
//! A read position is kept per (clientid, subscription filter) in `mqtt_acked.mid`: every stored
//! message of the filter up to that id was delivered to the client (through that subscription, or
//! another of its filters that reached it first) and acked, or was stored before the position
//! started (`since`: a first subscription with `first_fetch: latest`); the host says which
//! positions an ack may move (see on_message_acked). Because publishers take the commit-order
//! lock, ids become visible in order, so nothing below a position can still appear later. What a
//! position says the client had, the backlogs of its other filters pass over ([`Delivered`]).
//!
//! A shared subscription (`$share/<group>/<filter>`) reads its group's position instead, one per
//! (group, filter) whichever member subscribes, kept in `mqtt_acked` under the client id
//! `$share/<group>`. Members ack out of order, so a group position is a mark (`mid`: every
//! message of the filter up to it was acked by some member) and the ids acked above it
//! (`acked`); a fetch passes over both (see on_message_acked).

use std::borrow::Cow;

use crate::bindings::broker::extension::sql::{self, Value};
use crate::bindings::broker::extension::types::Message;
use crate::db::{self, Query};
use crate::functions::Builtin;
use crate::functions::rows;
use crate::hookpoint::Hookpoint;
use crate::rules::{FirstFetch, Function, OfflineOpts};
use crate::topic;

/// `on_message_fetch`: hand a subscriber the stored messages it has not read yet.
pub const ON_MESSAGE_FETCH: Builtin = Builtin {
    name: "on_message_fetch",
    hookpoint: Hookpoint::SessionSubscribed,
    function: || Function::MessageFetch(OfflineOpts::default()),
};

/// Finds or creates the subscriber's position. A first subscription starts after the newest
/// stored message (`first_fetch: latest`, EMQX's behaviour) or before all of them (`earliest`),
/// and records where it started (`since`). `topic_re` is kept for operators' own statements (EMQX
/// 4 had it).
const POSITION: &str = "INSERT INTO mqtt_acked (clientid, topic, topic_re, mid, since) \
                        SELECT $1, $2, $3, first.mid, first.mid \
                        FROM (SELECT CASE WHEN $4 THEN 0 ELSE (SELECT coalesce(max(id), 0) FROM mqtt_msg) END AS mid) first \
                        ON CONFLICT (clientid, topic) DO UPDATE SET topic_re = excluded.topic_re, updated = now() \
                        RETURNING mid";

/// The client's positions of its other filters that record messages it had: from where each
/// started up to where it is.
const OTHER_POSITIONS: &str = "SELECT topic, since, mid FROM mqtt_acked \
                               WHERE clientid = $1 AND topic <> $2 AND since IS NOT NULL AND mid > since";

/// What the client had through its other filters, from their positions: every stored message of
/// such a filter after where its position started (`since`: a first subscription skips what was
/// stored before it) up to the position reached the client and was acked. A backlog passes over
/// those, so that a filter subscribed again while another one stayed, or one subscribed beside
/// another, does not bring the client what it had through the other. Only the positions of
/// filters the same fetch rule serves count (another rule's `time_range` or pool says nothing of
/// this one's). A share group's positions are its own: another filter's group is another
/// subscription, and it has none here.
#[derive(Default)]
pub struct Delivered {
    /// (filter, since, mid)
    positions: Vec<(String, i64, i64)>,
}

impl Delivered {
    /// The positions of `reader`'s owner for the filters, other than its own, that overlap it
    /// and that `served_alike` says the same rule serves.
    pub fn load(pool: &str, reader: &Reader<'_>, served_alike: impl Fn(&str) -> bool) -> Result<Delivered, sql::Error> {
        if reader.shared {
            return Ok(Delivered::default());
        }
        let rows = sql::query(pool, OTHER_POSITIONS, &[db::text(&reader.owner), db::text(reader.filter)])?.rows;
        let mut positions = Vec::new();
        for row in &rows {
            let filter = db::string(row, 0)?;
            if topic::overlaps(&filter, reader.filter) && served_alike(&filter) {
                positions.push((filter, db::int64(row, 1)?, db::int64(row, 2)?));
            }
        }
        Ok(Delivered { positions })
    }

    /// Whether there is anything to pass over.
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Whether the stored message `id` on `topic` reached the client through another filter.
    pub fn has(&self, id: i64, topic: &str) -> bool {
        self.positions.iter().any(|(filter, since, mid)| *since < id && id <= *mid && topic::matches(filter, topic))
    }

    /// Where a backlog of `filter` after `position` may start: past what a filter that covers
    /// it had (every message of this one is one of that one's), where that one's record reaches
    /// back to `position`. Otherwise the pages would only pass over those messages one by one.
    fn start(&self, filter: &str, position: i64) -> i64 {
        let mut start = position;
        loop {
            let further = self
                .positions
                .iter()
                .filter(|(other, since, mid)| *since <= start && *mid > start && topic::covers(other, filter))
                .map(|(_, _, mid)| *mid)
                .max();
            match further {
                Some(mid) => start = mid,
                None => return start,
            }
        }
    }
}

/// Whose read position a subscription reads and moves.
pub struct Reader<'a> {
    /// The client id, or `$share/<group>` for a shared subscription.
    pub owner: Cow<'a, str>,
    /// The filter that selects topics (without `$share/<group>/`).
    pub filter: &'a str,
    pub shared: bool,
}

/// Whether `clientid` looks like a share group's position: such a client has no position of its
/// own (it would read and move the group's).
pub fn reserved(clientid: &str) -> bool {
    let reserved = clientid.starts_with("$share/");
    if reserved {
        crate::warn(&format!(
            "client id `{clientid}` is reserved for share groups' positions: it gets no offline messages"
        ));
    }
    reserved
}

/// The reader of `subscription` (the filter as subscribed) for `clientid`.
pub fn reader<'a>(clientid: &'a str, subscription: &'a str) -> Reader<'a> {
    match topic::shared(subscription) {
        Some((group, filter)) => Reader { owner: Cow::Owned(format!("$share/{group}")), filter, shared: true },
        None => Reader { owner: Cow::Borrowed(clientid), filter: subscription, shared: false },
    }
}

/// Where the next page starts: the last id handed out, and whether the pages pass over what
/// other filters of the client had ([`Delivered`]: its positions are read again for each page,
/// and only then). It names no rule: the rule in force when the next page is asked for serves it
/// (see `Rules::fetch_rule`). The host treats it as opaque.
#[derive(Debug, PartialEq, Eq)]
pub struct Cursor {
    pub after_id: i64,
    pub passing_over: bool,
}

impl Cursor {
    pub fn after(after_id: i64) -> Cursor {
        Cursor { after_id, passing_over: false }
    }

    pub fn encode(&self) -> String {
        if self.passing_over { format!("{}+", self.after_id) } else { self.after_id.to_string() }
    }

    pub fn decode(text: &str) -> Result<Cursor, String> {
        let (id, passing_over) = match text.strip_suffix('+') {
            Some(id) => (id, true),
            None => (text, false),
        };
        // `i64::from_str` takes a leading `+`: "+" and "++" are not cursors.
        let after_id = id.strip_prefix('+').map_or_else(|| id.parse().ok(), |_| None);
        after_id.map(|after_id| Cursor { after_id, passing_over }).ok_or_else(|| format!("malformed cursor `{text}`"))
    }
}

pub struct Page {
    pub messages: Vec<Message>,
    pub next: Option<Cursor>,
}

/// A subscription's backlog as its first page starts it.
pub struct Backlog {
    /// Where the pages start (after this id).
    pub start: i64,
    pub delivered: Delivered,
    pub first: Page,
}

impl Backlog {
    /// Whether the stored message `id` on `topic` comes with these pages.
    pub fn holds(&self, id: i64, topic: &str) -> bool {
        id > self.start && !self.delivered.has(id, topic)
    }
}

/// The first page for a (new) subscription, where it starts, and what the pages pass over. A
/// share group's first subscription sets the group's position.
pub fn first_page(
    pool: &str,
    opts: &OfflineOpts,
    clientid: &str,
    filter: &str,
    served_alike: impl Fn(&str) -> bool,
) -> Result<Backlog, sql::Error> {
    let reader = reader(clientid, filter);
    if !reader.shared && reserved(clientid) {
        let first = Page { messages: Vec::new(), next: None };
        return Ok(Backlog { start: 0, delivered: Delivered::default(), first });
    }
    let params = [
        db::text(&reader.owner),
        db::text(reader.filter),
        Value::Text(topic::filter_regex(reader.filter)),
        Value::Boolean(opts.first_fetch == FirstFetch::Earliest),
    ];
    let position = sql::query(pool, POSITION, &params)?;
    let position = db::int64(position.rows.first().map_or(&[][..], |r| r), 0)?;
    from_position(pool, opts, &reader, filter, position, served_alike)
}

/// The backlog of `filter` after its position: its first page, starting past what a covering
/// filter had, and leaving out what the client's other filters had.
fn from_position(
    pool: &str,
    opts: &OfflineOpts,
    reader: &Reader<'_>,
    filter: &str,
    position: i64,
    served_alike: impl Fn(&str) -> bool,
) -> Result<Backlog, sql::Error> {
    let delivered = Delivered::load(pool, reader, served_alike)?;
    let start = delivered.start(reader.filter, position);
    let first = page(pool, opts, filter, Cursor::after(start), &delivered)?;
    Ok(Backlog { start, delivered, first })
}

/// The subscriber's stored position: where a fetch starts again. None when it has none (an
/// unsubscribe's sql action deleted it, say).
const STORED_POSITION: &str = "SELECT mid FROM mqtt_acked WHERE clientid = $1 AND topic = $2";

pub fn stored_position(pool: &str, clientid: &str, filter: &str) -> Result<Option<Cursor>, sql::Error> {
    let reader = reader(clientid, filter);
    if !reader.shared && reserved(clientid) {
        return Ok(None);
    }
    let position = sql::query(pool, STORED_POSITION, &[db::text(&reader.owner), db::text(reader.filter)])?;
    match position.rows.first() {
        Some(row) => Ok(Some(Cursor::after(db::int64(row, 0)?))),
        None => Ok(None),
    }
}

/// The backlog again from the stored position (`session-resume`), passing over what the client
/// had through its other filters.
pub fn resume(
    pool: &str,
    opts: &OfflineOpts,
    clientid: &str,
    filter: &str,
    served_alike: impl Fn(&str) -> bool,
) -> Result<Page, sql::Error> {
    match stored_position(pool, clientid, filter)? {
        Some(position) => {
            let reader = reader(clientid, filter);
            Ok(from_position(pool, opts, &reader, filter, position.after_id, served_alike)?.first)
        }
        None => Ok(Page { messages: Vec::new(), next: None }),
    }
}

/// The page after `cursor`: unread, unexpired, within time_range, oldest first; at most
/// `max_returned_count` messages, and no more payload bytes than `max_returned_bytes` (the first
/// message always, however large, so that a backlog always moves). What `delivered` says the
/// client had is left out; the next page starts after it all the same.
pub fn page(
    pool: &str,
    opts: &OfflineOpts,
    filter: &str,
    cursor: Cursor,
    delivered: &Delivered,
) -> Result<Page, sql::Error> {
    // Backlog messages go with RETAIN clear (MQTT: a message for an established subscription).
    // The candidates: the next `max_returned_count` by id (a top-N sort, whatever the backlog's
    // size). Around them, the running byte count that cuts the page, and how many there were.
    let limit = opts.max_returned_count;
    let query = candidates(opts, filter, &cursor, limit);
    let counted = format!(
        "SELECT id, false, {}, candidates FROM (SELECT c.*, \
           sum(octet_length(c.payload)) OVER (ORDER BY c.id) - octet_length(c.payload) AS bytes_before, \
           count(*) OVER () AS candidates FROM ({}) c) w",
        rows::COLUMNS,
        query.sql
    );
    let mut query = Query { sql: counted, params: query.params };
    query.bind(
        " WHERE bytes_before < ? ORDER BY id",
        Value::Int64(i64::try_from(opts.max_returned_bytes).unwrap_or(i64::MAX)),
    );

    let mut rows = query.run(pool)?.rows;
    let candidates = match rows.first() {
        Some(row) => db::int64(row, rows::DECODED_COLUMNS)?,
        None => 0,
    };
    let mut messages = rows.iter_mut().map(|row| rows::decode(row)).collect::<Result<Vec<_>, _>>()?;
    // More may follow when the candidates were a full page, or the byte budget cut them.
    let more = candidates >= i64::from(limit) || (messages.len() as i64) < candidates;
    let next = match messages.last() {
        Some(last) if more => {
            Some(Cursor { after_id: last.id.unwrap_or(cursor.after_id), passing_over: !delivered.is_empty() })
        }
        _ => None,
    };
    messages.retain(|m| m.id.is_none_or(|id| !delivered.has(id, &m.topic)));
    Ok(Page { messages, next })
}

/// The unread messages of `filter` after `cursor` (unexpired, within time_range, and for a
/// shared subscription not acked by the group), the first `limit` by id.
fn candidates(opts: &OfflineOpts, filter: &str, cursor: &Cursor, limit: u32) -> Query {
    let candidates = format!("SELECT * FROM mqtt_msg WHERE id > $1{}", rows::NOT_EXPIRED);
    let mut query = Query::new(&candidates, vec![Value::Int64(cursor.after_id)]);
    let reader = reader("", filter);
    topic::push_match(&mut query, reader.filter);
    if reader.shared {
        query
            .bind(" AND id <> ALL (coalesce((SELECT acked FROM mqtt_acked WHERE clientid = ?", db::text(&reader.owner))
            .bind(" AND topic = ?), '{}'))", db::text(reader.filter));
    }
    if let Some(secs) = opts.time_range_secs {
        query.bind(" AND arrived >= now() - ?::float8 * interval '1 second'", Value::Float64(secs as f64));
    }
    query.bind(" ORDER BY id LIMIT ?", Value::Int64(i64::from(limit)));
    query
}

/// The next message after `cursor`, its id only (the payload stays in the database): the one
/// `session-skip` passes over.
pub fn next_id(pool: &str, opts: &OfflineOpts, filter: &str, cursor: &Cursor) -> Result<Option<i64>, sql::Error> {
    let query = candidates(opts, filter, cursor, 1);
    let query = Query { sql: format!("SELECT id FROM ({}) c", query.sql), params: query.params };
    match query.run(pool)?.rows.first() {
        Some(row) => Ok(Some(db::int64(row, 0)?)),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivered(positions: &[(&str, i64, i64)]) -> Delivered {
        Delivered { positions: positions.iter().map(|&(f, since, mid)| (f.to_owned(), since, mid)).collect() }
    }

    #[test]
    fn what_another_filter_had_is_what_it_matches_after_its_start_up_to_its_position() {
        let had = delivered(&[("a/#", 10, 20)]);
        assert!(had.has(11, "a/b") && had.has(20, "a/b/c") && had.has(15, "a"));
        // Skipped by that filter's first subscription, not yet reached, or not its topic.
        assert!(!had.has(10, "a/b") && !had.has(21, "a/b") && !had.has(15, "b"));
    }

    #[test]
    fn a_backlog_starts_past_a_covering_filters_record_only_where_that_record_reaches_back() {
        let had = delivered(&[("a/#", 10, 20), ("+/b", 20, 30), ("a/+", 0, 99)]);
        // a/# covers a/b from 10 on; then +/b from 20 on; a/+ covers a/b from 0 on.
        assert_eq!(had.start("a/b", 12), 99);
        let had = delivered(&[("a/#", 10, 20), ("+/b", 20, 30)]);
        assert_eq!(had.start("a/b", 12), 30);
        // a/# started after 5: what came between stays in the backlog (it passes over a/#'s).
        assert_eq!(had.start("a/b", 5), 5);
        // a/+ does not cover a/#.
        assert_eq!(delivered(&[("a/+", 0, 99)]).start("a/#", 1), 1);
    }

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        for cursor in [Cursor::after(9_000_000_000), Cursor { after_id: 7, passing_over: true }] {
            assert_eq!(Cursor::decode(&cursor.encode()), Ok(cursor));
        }
        for bad in ["", "x", "3:1", "1.5", "+", "++", "+3", "3++"] {
            assert!(Cursor::decode(bad).is_err(), "{bad:?}");
        }
    }
}
