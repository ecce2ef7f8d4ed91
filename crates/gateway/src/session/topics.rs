//! A client's topics.

use std::sync::Arc;

/// A session's topics: a sorted vector, a few bytes where a hash set would take a
/// hundred for the one or two topics most connections have.
#[derive(Default)]
pub(super) struct TopicSet(Vec<Arc<str>>);

impl TopicSet {
    pub(super) fn contains(&self, t: &str) -> bool {
        self.0.binary_search_by(|x| (**x).cmp(t)).is_ok()
    }

    /// Adds `t`; `false` if it was there.
    pub(super) fn insert(&mut self, t: Arc<str>) -> bool {
        match self.0.binary_search_by(|x| (**x).cmp(&*t)) {
            Ok(_) => false,
            Err(i) => {
                // Grow one at a time while small (most sessions never have many
                // topics), by doubling beyond.
                if self.0.len() < 4 {
                    self.0.reserve_exact(1);
                }
                self.0.insert(i, t);
                true
            }
        }
    }

    /// Removes `t`; `false` if it was not there.
    pub(super) fn remove(&mut self, t: &str) -> bool {
        match self.0.binary_search_by(|x| (**x).cmp(t)) {
            Ok(i) => {
                self.0.remove(i);
                true
            }
            Err(_) => false,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Arc<str>> {
        self.0.iter()
    }

    pub(super) fn drain(&mut self) -> impl Iterator<Item = Arc<str>> {
        std::mem::take(&mut self.0).into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_set_is_a_set() {
        let mut s = TopicSet::default();
        for t in ["b", "a", "c", "a"] {
            s.insert(Arc::from(t));
        }
        assert_eq!(s.len(), 3);
        assert!(s.contains("a") && s.contains("c") && !s.contains("d"));
        assert_eq!(s.0.capacity(), 3, "no spare slots while small");
        assert!(s.remove("b") && !s.remove("b"));
        let rest: Vec<Arc<str>> = s.drain().collect();
        assert_eq!(rest, [Arc::from("a"), Arc::from("c")]);
        assert_eq!(s.len(), 0);
    }
}
