//! Shared subscriptions (`$share/<group>/<filter>`): rmqtt routes a message to one member of each
//! group, and asks this strategy which. Round robin over the members that are online; when none
//! is, the first member's session queues it (a persistent session gets it on its return). Offline
//! messages for a group come from the extensions (a group's read position), not from here.

use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use rmqtt::context::ServerContext;
use rmqtt::subscribe::SharedSubscription;
use rmqtt::types::{
    ClientId, Id, IsOnline, NodeId, SharedGroup, SubscriptionIdentifier, SubscriptionOptions, TopicName,
};

#[derive(Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

#[async_trait]
impl SharedSubscription for RoundRobin {
    fn is_supported(&self) -> bool {
        true
    }

    async fn choice(
        &self,
        _scx: &ServerContext,
        _group: &SharedGroup,
        _publisher: &Id,
        _topic: &TopicName,
        members: &[(NodeId, ClientId, SubscriptionOptions, Option<Vec<SubscriptionIdentifier>>, Option<IsOnline>)],
    ) -> Option<(usize, IsOnline)> {
        let online: Vec<usize> = (0..members.len()).filter(|&i| members[i].4.unwrap_or(true)).collect();
        if online.is_empty() {
            return (!members.is_empty()).then_some((0, false));
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        Some((online[turn % online.len()], true))
    }
}
