//! What a configured guest's rules act on (`configure`'s answer), so that a host skips the calls
//! that would do nothing: a hook on every publish, delivery and ack is the hottest path a host
//! has, and most deployments hang rules on few of them, or on some topics only.

use crate::bindings::{Hookpoint, Interest as Declared};

/// Per hookpoint: not acted on, acted on for every event, or for messages whose topic matches
/// one of these filters.
#[derive(Debug, Clone, PartialEq)]
enum Topics {
    None,
    Every,
    Matching(Vec<String>),
}

/// A configuration's interest. Until a guest declared one, every event is of interest.
#[derive(Debug, Clone, PartialEq)]
pub struct Interest {
    by_hookpoint: [Topics; 7],
}

impl Default for Interest {
    fn default() -> Self {
        Interest { by_hookpoint: std::array::from_fn(|_| Topics::Every) }
    }
}

impl Interest {
    /// What the guest declared; a hookpoint it did not name is of no interest, one it named twice
    /// takes the filters of both.
    pub fn declared(declared: Vec<Declared>) -> Interest {
        let mut by_hookpoint = std::array::from_fn(|_| Topics::None);
        for Declared { hookpoint, topics } in declared {
            let slot: &mut Topics = &mut by_hookpoint[hookpoint as usize];
            *slot = match (std::mem::replace(slot, Topics::None), topics) {
                (Topics::Every, _) | (_, None) => Topics::Every,
                (Topics::None, Some(filters)) => Topics::Matching(filters),
                (Topics::Matching(mut known), Some(filters)) => {
                    known.extend(filters);
                    Topics::Matching(known)
                }
            };
        }
        Interest { by_hookpoint }
    }

    /// Whether any event of `hookpoint` may be acted on.
    pub fn any(&self, hookpoint: Hookpoint) -> bool {
        self.by_hookpoint[hookpoint as usize] != Topics::None
    }

    /// Whether a message hook's event about `topic` may be acted on.
    pub fn topic(&self, hookpoint: Hookpoint, topic: &str) -> bool {
        match &self.by_hookpoint[hookpoint as usize] {
            Topics::None => false,
            Topics::Every => true,
            Topics::Matching(filters) => filters.iter().any(|filter| mqtt_topic::matches(filter, topic)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declared(hookpoint: Hookpoint, topics: Option<&[&str]>) -> Declared {
        Declared { hookpoint, topics: topics.map(|t| t.iter().map(|s| s.to_string()).collect()) }
    }

    #[test]
    fn what_was_not_declared_is_skipped_and_filters_match_as_mqtt_does() {
        let interest = Interest::declared(vec![
            declared(Hookpoint::MessagePublish, Some(&["sensors/+/temp", "alarms/#"])),
            declared(Hookpoint::MessageAcked, None),
        ]);
        assert!(interest.topic(Hookpoint::MessagePublish, "sensors/hall/temp"));
        assert!(interest.topic(Hookpoint::MessagePublish, "alarms"));
        assert!(!interest.topic(Hookpoint::MessagePublish, "sensors/hall/humidity"));
        assert!(interest.topic(Hookpoint::MessageAcked, "anything"));
        assert!(!interest.topic(Hookpoint::MessageDelivered, "sensors/hall/temp"));
        assert!(!interest.any(Hookpoint::ClientConnected));
        assert!(interest.any(Hookpoint::MessagePublish));
    }

    #[test]
    fn a_hookpoint_declared_twice_takes_both() {
        let interest = Interest::declared(vec![
            declared(Hookpoint::MessagePublish, Some(&["a"])),
            declared(Hookpoint::MessagePublish, Some(&["b"])),
            declared(Hookpoint::MessageDelivered, Some(&["a"])),
            declared(Hookpoint::MessageDelivered, None),
        ]);
        assert!(interest.topic(Hookpoint::MessagePublish, "a") && interest.topic(Hookpoint::MessagePublish, "b"));
        assert!(interest.topic(Hookpoint::MessageDelivered, "z"));
    }

    #[test]
    fn before_any_declaration_everything_is_of_interest() {
        let interest = Interest::default();
        assert!(interest.any(Hookpoint::ClientConnected) && interest.topic(Hookpoint::MessagePublish, "x"));
    }
}
