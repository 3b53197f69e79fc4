//! MQTT topic names and filters: validation, matching, and the SQL condition that selects the
//! stored messages a filter matches.

/// Checks a topic filter (what a client subscribes to): `+` and `#` fill whole levels, `#` only last.
pub fn validate_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("a topic filter must not be empty".into());
    }
    if filter.contains('\0') {
        return Err(format!("topic filter `{filter}` contains a NUL character"));
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        let wildcard_inside = level.len() > 1 && (level.contains('+') || level.contains('#'));
        let hash_not_last = *level == "#" && i + 1 != levels.len();
        if wildcard_inside || hash_not_last {
            return Err(format!(
                "topic filter `{filter}`: `+` must fill a whole level and `#` must be the last level"
            ));
        }
    }
    Ok(())
}

pub fn has_wildcard(filter: &str) -> bool {
    filter.split('/').any(|level| level == "+" || level == "#")
}

/// Whether `topic` matches `filter` by the MQTT rules. A topic starting with `$` is not matched
/// by a filter starting with a wildcard.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut filter_levels = filter.split('/');
    let mut topic_levels = topic.split('/');
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            // `a/#` also matches `a` itself.
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(f), Some(t)) if f == t => {}
            (None, None) => return true,
            _ => return false,
        }
    }
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
    fn matching_follows_the_mqtt_rules() {
        let cases = [
            ("a/b/c", "a/b/c", true),
            ("a/+/c", "a/b/c", true),
            ("a/+/c", "a//c", true),
            ("a/+/c", "a/b/d", false),
            ("a/+", "a/b/c", false),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("a/#", "ab", false),
            ("#", "a/b", true),
            ("+/+", "/x", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("a/b", "a/b/c", false),
        ];
        for (filter, topic, expected) in cases {
            assert_eq!(matches(filter, topic), expected, "{filter} ~ {topic}");
        }
    }

    #[test]
    fn invalid_filters_are_refused() {
        for bad in ["", "a/#/b", "a/b#", "a+/b", "a/\0"] {
            assert!(validate_filter(bad).is_err(), "{bad:?}");
        }
        for good in ["#", "+", "a/+/c", "a/#", "/", "$SYS/#"] {
            assert!(validate_filter(good).is_ok(), "{good:?}");
        }
    }

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
