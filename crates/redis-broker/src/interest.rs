//! Which topics a node holds in Redis, as pure state: no I/O, no clock of its own.
//! The relay tasks (single mode's [`crate::subscriber`], cluster mode's
//! [`crate::cluster::subscribe`]) do the Redis calls and tell this what happened; the
//! rules live here, where they can be unit-tested step by step:
//! - a subscribe asks Redis only for topics not held yet, each once per batch;
//! - a release does not unsubscribe at once: it is due after the delay, and when it
//!   is due the node is asked again, so a subscriber that came back keeps the topic
//!   (flapping clients cause no Redis traffic);
//! - a topic released twice is unsubscribed once; one not held is not unsubscribed.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// Releases waiting for their delay, in deadline order (the delay is constant, so
/// arrival order is deadline order).
#[derive(Debug)]
pub(crate) struct Releases {
    delay: Duration,
    due: VecDeque<(Instant, Arc<str>)>,
}

impl Releases {
    pub(crate) fn new(delay: Duration) -> Self {
        Releases {
            delay,
            due: VecDeque::new(),
        }
    }

    /// The node's last local subscriber of `topics` left at `now`.
    pub(crate) fn schedule(&mut self, topics: impl IntoIterator<Item = Arc<str>>, now: Instant) {
        let at = now + self.delay;
        self.due.extend(topics.into_iter().map(|t| (at, t)));
    }

    /// When the next release falls due.
    pub(crate) fn next_at(&self) -> Option<Instant> {
        self.due.front().map(|(at, _)| *at)
    }

    /// The releases due at `now`, each topic once, for which `give_up` says yes (the
    /// caller checks it still holds the topic and that the node has no subscriber).
    pub(crate) fn take_due(
        &mut self,
        now: Instant,
        mut give_up: impl FnMut(&Arc<str>) -> bool,
    ) -> Vec<Arc<str>> {
        let mut seen: HashSet<Arc<str>> = HashSet::new();
        let mut gone = Vec::new();
        while self.due.front().is_some_and(|(at, _)| *at <= now) {
            let (_, t) = self.due.pop_front().expect("checked");
            if !seen.contains(&t) && give_up(&t) {
                seen.insert(t.clone());
                gone.push(t);
            }
        }
        gone
    }

    /// How many releases are waiting.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.due.len()
    }
}

/// Single mode's subscription state: the topics Redis confirmed on the current
/// connection, and the releases waiting.
#[derive(Debug)]
pub(crate) struct Interest {
    held: HashSet<Arc<str>>,
    pub(crate) releases: Releases,
}

impl Interest {
    pub(crate) fn new(unsubscribe_delay: Duration) -> Self {
        Interest {
            held: HashSet::new(),
            releases: Releases::new(unsubscribe_delay),
        }
    }

    /// A new connection, subscribed to exactly `topics`. Releases still waiting stay:
    /// when due they are checked against the node again.
    pub(crate) fn reconnected(&mut self, topics: HashSet<Arc<str>>) {
        self.held = topics;
    }

    /// Whether Redis confirmed `topic` on this connection.
    #[cfg(test)]
    pub(crate) fn holds(&self, topic: &str) -> bool {
        self.held.contains(topic)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.held.len()
    }

    /// Adds to `batch` the topics of one subscribe request that Redis must be asked
    /// for: not held, and not already in the batch.
    pub(crate) fn want(&self, topics: Vec<Arc<str>>, batch: &mut Batch) {
        for t in topics {
            if !self.held.contains(&t) && batch.seen.insert(t.clone()) {
                batch.topics.push(t);
            }
        }
    }

    /// Redis confirmed `topics`.
    pub(crate) fn confirmed(&mut self, topics: impl IntoIterator<Item = Arc<str>>) {
        self.held.extend(topics);
    }

    /// The topics to unsubscribe at `now`: due, held, and without a subscriber on the
    /// node (`has_subscribers`). They stay held until [`Interest::unsubscribed`].
    pub(crate) fn due(
        &mut self,
        now: Instant,
        has_subscribers: impl Fn(&str) -> bool,
    ) -> Vec<Arc<str>> {
        let held = &self.held;
        self.releases
            .take_due(now, |t| held.contains(t) && !has_subscribers(t))
    }

    /// Redis confirmed the unsubscribe of `topics`.
    pub(crate) fn unsubscribed(&mut self, topics: &[Arc<str>]) {
        for t in topics {
            self.held.remove(t);
        }
    }
}

/// The topics one `SUBSCRIBE` will ask for, gathered from the requests waiting.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub(crate) topics: Vec<Arc<str>>,
    seen: HashSet<Arc<str>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics(names: &[&str]) -> Vec<Arc<str>> {
        names.iter().map(|n| Arc::from(*n)).collect()
    }

    const DELAY: Duration = Duration::from_secs(1);

    #[test]
    fn a_batch_asks_only_for_what_is_not_held_each_once() {
        let mut i = Interest::new(DELAY);
        i.confirmed(topics(&["a"]));
        let mut batch = Batch::default();
        i.want(topics(&["a", "b", "c"]), &mut batch);
        i.want(topics(&["b", "d", "a"]), &mut batch);
        assert_eq!(batch.topics, topics(&["b", "c", "d"]));
        i.confirmed(batch.topics);
        assert!(["a", "b", "c", "d"].iter().all(|t| i.holds(t)));
        let mut again = Batch::default();
        i.want(topics(&["d", "a"]), &mut again);
        assert!(again.topics.is_empty(), "everything held: nothing to ask");
    }

    #[test]
    fn a_release_waits_for_its_delay() {
        let t0 = Instant::now();
        let mut i = Interest::new(DELAY);
        i.confirmed(topics(&["a"]));
        i.releases.schedule(topics(&["a"]), t0);
        assert_eq!(i.releases.next_at(), Some(t0 + DELAY));
        assert!(i.due(t0 + DELAY / 2, |_| false).is_empty(), "not yet");
        assert!(i.holds("a"));
        let gone = i.due(t0 + DELAY, |_| false);
        assert_eq!(gone, topics(&["a"]));
        assert!(i.holds("a"), "held until Redis confirms the unsubscribe");
        i.unsubscribed(&gone);
        assert!(!i.holds("a"));
        assert_eq!(i.releases.next_at(), None);
    }

    #[test]
    fn a_subscriber_that_came_back_keeps_the_topic() {
        let t0 = Instant::now();
        let mut i = Interest::new(DELAY);
        i.confirmed(topics(&["a", "b"]));
        i.releases.schedule(topics(&["a", "b"]), t0);
        // `a` got a subscriber again before the delay ran out.
        let gone = i.due(t0 + DELAY, |t| t == "a");
        assert_eq!(gone, topics(&["b"]));
        assert_eq!(i.releases.len(), 0, "the check is done: a stays held");
        assert!(i.holds("a"));
    }

    #[test]
    fn released_twice_is_unsubscribed_once_and_unheld_never() {
        let t0 = Instant::now();
        let mut i = Interest::new(DELAY);
        i.confirmed(topics(&["a"]));
        i.releases.schedule(topics(&["a", "x"]), t0);
        i.releases.schedule(topics(&["a"]), t0 + DELAY / 4);
        let gone = i.due(t0 + 2 * DELAY, |_| false);
        assert_eq!(gone, topics(&["a"]), "x was never held: no UNSUBSCRIBE");
    }

    #[test]
    fn only_what_is_due_is_taken_in_deadline_order() {
        let t0 = Instant::now();
        let mut i = Interest::new(DELAY);
        i.confirmed(topics(&["a", "b", "c"]));
        i.releases.schedule(topics(&["a"]), t0);
        i.releases.schedule(topics(&["b"]), t0 + DELAY / 2);
        i.releases.schedule(topics(&["c"]), t0 + DELAY);
        assert_eq!(i.due(t0 + DELAY * 3 / 2, |_| false), topics(&["a", "b"]));
        assert_eq!(i.releases.next_at(), Some(t0 + 2 * DELAY));
        assert_eq!(i.due(t0 + 2 * DELAY, |_| false), topics(&["c"]));
    }

    #[test]
    fn a_reconnect_holds_exactly_what_was_resubscribed() {
        let t0 = Instant::now();
        let mut i = Interest::new(DELAY);
        i.confirmed(topics(&["a", "b"]));
        i.releases.schedule(topics(&["b"]), t0);
        // The connection was lost; the new one resubscribed what the node has now.
        i.reconnected(topics(&["a", "c"]).into_iter().collect());
        assert!(i.holds("a") && i.holds("c") && !i.holds("b"));
        assert_eq!(i.len(), 2);
        // b's release is still checked, but b is not held on this connection.
        assert!(i.due(t0 + DELAY, |_| false).is_empty());
        let mut batch = Batch::default();
        i.want(topics(&["b", "c"]), &mut batch);
        assert_eq!(batch.topics, topics(&["b"]));
    }
}
