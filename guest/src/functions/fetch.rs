//! on_message_fetch: hand a subscriber the stored messages it has not read, oldest first, one
//! page at a time.
//!
//! A read position is kept per (clientid, subscription filter) in `mqtt_acked.mid`: every stored
//! message of the filter up to that id was delivered through that subscription and acked (the
//! host says which positions an ack may move; see on_message_acked). Because publishers take the
//! commit-order lock, ids become visible in order, so nothing below a position can still appear
//! later.
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
/// stored message (`first_fetch: latest`, EMQX's behaviour) or before all of them (`earliest`).
/// `topic_re` is kept for operators' own statements (EMQX 4 had it).
const POSITION: &str = "INSERT INTO mqtt_acked (clientid, topic, topic_re, mid) \
                        VALUES ($1, $2, $3, CASE WHEN $4 THEN 0 ELSE (SELECT coalesce(max(id), 0) FROM mqtt_msg) END) \
                        ON CONFLICT (clientid, topic) DO UPDATE SET topic_re = excluded.topic_re, updated = now() \
                        RETURNING mid";

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

/// Where the next page starts: the last id handed out. It names no rule: the rule in force
/// when the next page is asked for serves it (see `Rules::fetch_rule`). The host treats it as
/// opaque.
#[derive(Debug, PartialEq, Eq)]
pub struct Cursor {
    pub after_id: i64,
}

impl Cursor {
    pub fn encode(&self) -> String {
        self.after_id.to_string()
    }

    pub fn decode(text: &str) -> Result<Cursor, String> {
        text.parse().map(|after_id| Cursor { after_id }).map_err(|_| format!("malformed cursor `{text}`"))
    }
}

pub struct Page {
    pub messages: Vec<Message>,
    pub next: Option<Cursor>,
}

/// The first page for a (new) subscription, and the position it starts after. A share group's
/// first subscription sets the group's position.
pub fn first_page(pool: &str, opts: &OfflineOpts, clientid: &str, filter: &str) -> Result<(i64, Page), sql::Error> {
    let reader = reader(clientid, filter);
    if !reader.shared && reserved(clientid) {
        return Ok((0, Page { messages: Vec::new(), next: None }));
    }
    let params = [
        db::text(&reader.owner),
        db::text(reader.filter),
        Value::Text(topic::filter_regex(reader.filter)),
        Value::Boolean(opts.first_fetch == FirstFetch::Earliest),
    ];
    let position = sql::query(pool, POSITION, &params)?;
    let after_id = db::int64(position.rows.first().map_or(&[][..], |r| r), 0)?;
    Ok((after_id, page(pool, opts, filter, Cursor { after_id })?))
}

/// The subscriber's stored position: where a fetch starts again (`session-resume`). None when
/// it has none (an unsubscribe's sql action deleted it, say).
const STORED_POSITION: &str = "SELECT mid FROM mqtt_acked WHERE clientid = $1 AND topic = $2";

pub fn stored_position(pool: &str, clientid: &str, filter: &str) -> Result<Option<Cursor>, sql::Error> {
    let reader = reader(clientid, filter);
    if !reader.shared && reserved(clientid) {
        return Ok(None);
    }
    let position = sql::query(pool, STORED_POSITION, &[db::text(&reader.owner), db::text(reader.filter)])?;
    match position.rows.first() {
        Some(row) => Ok(Some(Cursor { after_id: db::int64(row, 0)? })),
        None => Ok(None),
    }
}

/// The backlog again from the stored position.
pub fn resume(pool: &str, opts: &OfflineOpts, clientid: &str, filter: &str) -> Result<Page, sql::Error> {
    match stored_position(pool, clientid, filter)? {
        Some(cursor) => page(pool, opts, filter, cursor),
        None => Ok(Page { messages: Vec::new(), next: None }),
    }
}

/// The page after `cursor`: unread, unexpired, within time_range, oldest first; at most
/// `max_returned_count` messages, and no more payload bytes than `max_returned_bytes` (the first
/// message always, however large, so that a backlog always moves).
pub fn page(pool: &str, opts: &OfflineOpts, filter: &str, cursor: Cursor) -> Result<Page, sql::Error> {
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
    let messages = rows.iter_mut().map(|row| rows::decode(row)).collect::<Result<Vec<_>, _>>()?;
    // More may follow when the candidates were a full page, or the byte budget cut them.
    let more = candidates >= i64::from(limit) || (messages.len() as i64) < candidates;
    let next = match messages.last() {
        Some(last) if more => Some(Cursor { after_id: last.id.unwrap_or(cursor.after_id) }),
        _ => None,
    };
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

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let cursor = Cursor { after_id: 9_000_000_000 };
        assert_eq!(Cursor::decode(&cursor.encode()), Ok(cursor));
        for bad in ["", "x", "3:1", "1.5"] {
            assert!(Cursor::decode(bad).is_err(), "{bad:?}");
        }
    }
}
