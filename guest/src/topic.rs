//! How a topic filter selects stored messages in SQL. Matching itself is `mqtt_topic`'s.

pub use mqtt_topic::{covers, has_wildcard, matches, overlaps, shared, validate_filter};

use crate::bindings::broker::extension::sql::Value;
use crate::db::Query;

/// Appends ` AND <the topic column matches filter>`: an equality for a plain filter, else the
/// prefix range (so the topic index narrows the scan) and the regular expression.
pub fn push_match(query: &mut Query, filter: &str) {
    if !has_wildcard(filter) {
        query.bind(" AND topic = ?", Value::Text(filter.to_owned()));
        return;
    }
    if let Some((low, high)) = literal_prefix_range(filter) {
        query.bind(" AND topic >= ?", Value::Text(low)).bind(" AND topic < ?", Value::Text(high));
    }
    query.bind(" AND topic ~ ?", Value::Text(filter_regex(filter)));
}

/// A PostgreSQL regular expression (ARE) that matches exactly the topics `filter` matches.
/// It is bound as a parameter, never pasted into statement text.
pub fn filter_regex(filter: &str) -> String {
    let mut re = String::from("^");
    if filter.starts_with('+') || filter.starts_with('#') {
        re.push_str("(?!\\$)");
    }
    for (i, level) in filter.split('/').enumerate() {
        match level {
            "#" if i == 0 => re.push_str(".*"),
            "#" => re.push_str("(/.*)?"),
            _ => {
                if i > 0 {
                    re.push('/');
                }
                if level == "+" {
                    re.push_str("[^/]*");
                } else {
                    for c in level.chars() {
                        // Every regex metacharacter is ASCII punctuation; escaping all of it is safe.
                        if c.is_ascii_punctuation() {
                            re.push('\\');
                        }
                        re.push(c);
                    }
                }
            }
        }
    }
    re.push('$');
    re
}

/// The range `[low, high)` of topics (in the `C` collation of `mqtt_msg.topic`) that can match
/// a wildcard filter: every topic starting with the filter's literal levels. Lets the topic index
/// narrow a wildcard fetch. `None` when the filter starts with a wildcard.
pub fn literal_prefix_range(filter: &str) -> Option<(String, String)> {
    let levels: Vec<&str> = filter.split('/').collect();
    let first_wildcard = levels.iter().position(|l| *l == "+" || *l == "#")?;
    if first_wildcard == 0 {
        return None;
    }
    let mut prefix = levels[..first_wildcard].join("/");
    // `a/+` needs the separator; `a/#` also matches `a` itself, so it stops before it.
    if levels[first_wildcard] == "+" {
        prefix.push('/');
    }
    // U+10FFFF is the largest character; a topic holding that noncharacter right after the
    // prefix is the one case the range misses (MQTT says topics should not contain noncharacters).
    let high = format!("{prefix}\u{10FFFF}");
    Some((prefix, high))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regex_escapes_literals() {
        assert_eq!(filter_regex("a.b/+/c"), "^a\\.b/[^/]*/c$");
        assert_eq!(filter_regex("a/#"), "^a(/.*)?$");
        assert_eq!(filter_regex("#"), "^(?!\\$).*$");
        assert_eq!(filter_regex("+/x"), "^(?!\\$)[^/]*/x$");
        assert_eq!(filter_regex("(x)*"), "^\\(x\\)\\*$");
    }

    #[test]
    fn prefix_range_covers_the_literal_levels() {
        assert_eq!(literal_prefix_range("a/b/+/c").unwrap().0, "a/b/");
        assert_eq!(literal_prefix_range("a/#").unwrap().0, "a");
        assert_eq!(literal_prefix_range("a/b/#").unwrap().0, "a/b");
        assert!(literal_prefix_range("#").is_none());
        assert!(literal_prefix_range("+/a").is_none());
        let (low, high) = literal_prefix_range("a/+").unwrap();
        assert!(low.as_str() <= "a/x" && "a/x" < high.as_str());
        assert!("a/\u{FFFF}/z" < high.as_str());
    }
}
