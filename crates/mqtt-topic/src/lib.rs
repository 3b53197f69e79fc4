//! MQTT topic names and filters: validation and matching by the MQTT rules.
//!
//! ```
//! assert!(mqtt_topic::validate_filter("sensors/+/temp").is_ok());
//! assert!(mqtt_topic::validate_filter("sensors/#/temp").is_err());
//! assert!(mqtt_topic::matches("sensors/+/temp", "sensors/hall/temp"));
//! assert!(mqtt_topic::matches("sensors/#", "sensors"));
//! assert!(!mqtt_topic::matches("#", "$SYS/uptime"));
//! assert_eq!(mqtt_topic::shared("$share/workers/jobs/#"), Some(("workers", "jobs/#")));
//! assert!(mqtt_topic::matches("$share/workers/jobs/#", "jobs/1"));
//! ```

/// A shared subscription's filter, `$share/<group>/<filter>` (MQTT 5, and brokers accept it from
/// 3.1.1 clients too): its group and the filter that selects topics.
pub fn shared(filter: &str) -> Option<(&str, &str)> {
    filter.strip_prefix("$share/")?.split_once('/')
}

/// Checks a topic filter (what a client subscribes to): `+` and `#` fill whole levels, `#` only
/// last; a shared subscription names a group (no wildcard in it) and a filter.
pub fn validate_filter(filter: &str) -> Result<(), String> {
    if filter == "$share" || filter.starts_with("$share/") {
        return match shared(filter) {
            Some((group, rest)) if !group.is_empty() && !group.contains(['+', '#']) && !rest.is_empty() => {
                validate_filter(rest)
            }
            _ => Err(format!("shared subscription `{filter}`: `$share/<group>/<filter>`, a group without wildcards")),
        };
    }
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
            return Err(format!("topic filter `{filter}`: `+` must fill a whole level and `#` must be the last level"));
        }
    }
    Ok(())
}

pub fn has_wildcard(filter: &str) -> bool {
    filter.split('/').any(|level| level == "+" || level == "#")
}

/// Whether `topic` matches `filter` by the MQTT rules. A topic starting with `$` is not matched
/// by a filter starting with a wildcard. A shared subscription matches what its filter matches.
pub fn matches(filter: &str, topic: &str) -> bool {
    let filter = shared(filter).map_or(filter, |(_, filter)| filter);
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

/// Whether `general` covers `specific`: every topic that `specific` matches, `general` matches
/// too (`a/#` covers `a/+/c` and `a`; `a/+` does not cover `a/#`). Both are plain filters, not
/// shared subscriptions.
pub fn covers(general: &str, specific: &str) -> bool {
    // A filter starting with a wildcard matches no topic starting with `$`.
    if general.starts_with(['+', '#']) && specific.starts_with('$') {
        return false;
    }
    let mut general_levels = general.split('/');
    let mut specific_levels = specific.split('/');
    loop {
        match (general_levels.next(), specific_levels.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(s)) if s != "#" => {}
            (Some(g), Some(s)) if g == s => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether some topic matches both filters (plain filters, not shared subscriptions).
pub fn overlaps(one: &str, other: &str) -> bool {
    // A filter starting with a wildcard matches no topic starting with `$`.
    let wildcard_first = |f: &str| f.starts_with(['+', '#']);
    if (wildcard_first(one) && other.starts_with('$')) || (wildcard_first(other) && one.starts_with('$')) {
        return false;
    }
    let mut one_levels = one.split('/');
    let mut other_levels = other.split('/');
    loop {
        match (one_levels.next(), other_levels.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some(a), Some(b)) if a == "+" || b == "+" || a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_subscriptions_name_a_group_and_a_filter() {
        assert_eq!(shared("$share/g/a/+/c"), Some(("g", "a/+/c")));
        assert_eq!(shared("a/b"), None);
        assert!(validate_filter("$share/g/#").is_ok());
        for bad in ["$share", "$share/g", "$share//a", "$share/+/a", "$share/g/a/#/b"] {
            assert!(validate_filter(bad).is_err(), "{bad}");
        }
        assert!(matches("$share/g/a/#", "a/b"));
        assert!(!matches("$share/g/a/#", "b"));
    }

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
    fn a_filter_covers_another_when_it_matches_every_topic_that_one_matches() {
        let cases = [
            ("a/#", "a/+/c", true),
            ("a/#", "a", true),
            ("a/#", "a/#", true),
            ("#", "a/#", true),
            ("+/b", "a/b", true),
            ("a/+/#", "a/+", true),
            ("a/b", "a/b", true),
            ("a/+", "a/#", false),
            ("a/+/#", "a/#", false),
            ("a/+", "a", false),
            ("a", "a/#", false),
            ("a/b", "a/+", false),
            ("a/+", "a/b/c", false),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("#", "+/x", true),
        ];
        for (general, specific, expected) in cases {
            assert_eq!(covers(general, specific), expected, "{general} covers {specific}");
        }
    }

    #[test]
    fn filters_overlap_when_some_topic_matches_both() {
        let cases = [
            ("a/#", "a", true),
            ("a/+", "+/b", true),
            ("a/+/c", "a/b/#", true),
            ("#", "a/b", true),
            ("a/b", "a/c", false),
            ("a/+", "a/b/c", false),
            ("a/+/c", "a/b/d", false),
            ("#", "$SYS/x", false),
            ("$SYS/#", "+/x", false),
            ("$SYS/#", "$SYS/+", true),
        ];
        for (one, other, expected) in cases {
            assert_eq!(overlaps(one, other), expected, "{one} overlaps {other}");
            assert_eq!(overlaps(other, one), expected, "{other} overlaps {one}");
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
}
