//! Packet ids the proxy gives out towards a client, each with what it stands for: the broker's
//! deliveries and the proxy's own (backlogs, released messages) must never share an id. An id is
//! free again when its exchange ends.

use std::collections::HashMap;
use std::num::NonZeroU16;

pub struct PacketIds<T> {
    in_use: HashMap<u16, T>,
    /// Where the search for a free id starts: ids go round, so a late ack for an old exchange is
    /// unlikely to meet a new one under the same id.
    next: u16,
}

impl<T> Default for PacketIds<T> {
    fn default() -> Self {
        PacketIds { in_use: HashMap::new(), next: 1 }
    }
}

impl<T> PacketIds<T> {
    /// A free id, now standing for `what`. None when all 65 535 are in use.
    pub fn allocate(&mut self, what: T) -> Option<NonZeroU16> {
        if self.in_use.len() >= usize::from(u16::MAX) {
            return None;
        }
        loop {
            let id = self.next;
            self.next = self.next.checked_add(1).unwrap_or(1);
            if let std::collections::hash_map::Entry::Vacant(free) = self.in_use.entry(id) {
                free.insert(what);
                return NonZeroU16::new(id);
            }
        }
    }

    pub fn get(&self, id: NonZeroU16) -> Option<&T> {
        self.in_use.get(&id.get())
    }

    pub fn get_mut(&mut self, id: NonZeroU16) -> Option<&mut T> {
        self.in_use.get_mut(&id.get())
    }

    /// Ends the exchange under `id`: what it stood for.
    pub fn release(&mut self, id: NonZeroU16) -> Option<T> {
        self.in_use.remove(&id.get())
    }

    /// What the ids in use stand for, in no order.
    pub fn in_use(&self) -> impl Iterator<Item = &T> {
        self.in_use.values()
    }

    pub fn len(&self) -> usize {
        self.in_use.len()
    }

    pub fn is_empty(&self) -> bool {
        self.in_use.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_two_exchanges_share_an_id_and_a_freed_id_comes_back_only_after_the_others() {
        let mut ids = PacketIds::default();
        let a = ids.allocate("a").unwrap();
        let b = ids.allocate("b").unwrap();
        assert_ne!(a, b);
        assert_eq!(ids.release(a), Some("a"));
        assert_eq!(ids.release(a), None, "an exchange ends once");
        let c = ids.allocate("c").unwrap();
        assert!(c != a && c != b, "ids go round before one is used again");
        assert_eq!(ids.get(b), Some(&"b"));
    }

    #[test]
    fn all_ids_in_use_refuses_and_wrapping_skips_those_in_use() {
        let mut ids = PacketIds::default();
        for n in 0..u16::MAX {
            ids.allocate(n).unwrap();
        }
        assert_eq!(ids.allocate(0), None);
        let seven = NonZeroU16::new(7).unwrap();
        ids.release(seven);
        assert_eq!(ids.allocate(1), Some(seven), "the only free id, after wrapping round");
        assert!(ids.get(NonZeroU16::new(u16::MAX).unwrap()).is_some());
    }
}
