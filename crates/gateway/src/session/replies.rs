//! The ordered replies queue: replies leave in the order of the commands, even when a
//! publication's ack comes later than the replies after it.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use wsgate_fanout::{frame, PublishAck};

use super::outbox::Outbox;
use crate::protocol::{self, CommandError, ErrorCode};

/// A reply waiting its turn in [`Replies`].
pub(super) enum Pending {
    /// A publication the broker has not answered yet.
    Publish { id: Option<u64>, ack: PublishAck },
    /// Any other reply, made after such a publication.
    Ready(Bytes),
    /// Answered once everything before it has been queued to the client (a reply
    /// that must be queued at an exact point, before a stream's replay, waits for it).
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// A session's publication replies, in command order: one task per connection that
/// publishes through an asynchronous broker (not one task per publication). The
/// broker answers in publish order (its pipeline is ordered), so awaiting the acks one
/// after another costs no extra round trips.
pub(super) struct Replies {
    pub(super) rx: mpsc::Receiver<Pending>,
    pub(super) outbox: Arc<Outbox>,
}

impl Replies {
    pub(super) async fn run(mut self) {
        while let Some(p) = self.rx.recv().await {
            let frame = match p {
                Pending::Ready(frame) => frame,
                Pending::Barrier(done) => {
                    let _ = done.send(());
                    continue;
                }
                Pending::Publish { id, ack } => {
                    // The ack counts the publication as it resolves.
                    let reply = match ack.await {
                        Ok(pos) => protocol::published_reply(id, pos.as_ref()),
                        Err(e) => protocol::error_reply(&CommandError::new(
                            id,
                            ErrorCode::Unavailable,
                            e.to_string(),
                        )),
                    };
                    frame::text(reply.as_bytes())
                }
            };
            self.outbox.push(frame, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::outbox::Batch;
    use wsgate_fanout::{Broker, BrokerError, BrokerFuture, Source};

    fn texts(ob: &Outbox) -> Vec<String> {
        let mut b = Batch::default();
        ob.take(&mut b);
        b.frames
            .iter()
            .map(|i| String::from_utf8(i.frame()[2..].to_vec()).unwrap())
            .collect()
    }

    type Answer = tokio::sync::oneshot::Receiver<Result<(), BrokerError>>;

    /// A broker that answers each publication when the test says so.
    struct Manual(parking_lot::Mutex<std::collections::VecDeque<Answer>>);
    impl Broker for Manual {
        fn publish(&self, _: &str, _: &[u8], _: u64) -> BrokerFuture {
            let done = self.0.lock().pop_front().expect("an answer per publish");
            BrokerFuture::pending(async move { done.await.unwrap() })
        }
        fn subscribe(&self, _: Vec<Arc<str>>) -> BrokerFuture {
            BrokerFuture::ready(Ok(()))
        }
        fn release(&self, _: Vec<Arc<str>>) {}
        fn is_ready(&self) -> bool {
            true
        }
        fn kind(&self) -> &'static str {
            "manual"
        }
    }

    #[tokio::test]
    async fn replies_leave_in_command_order_whatever_order_the_broker_answers() {
        let (ack1, done1) = tokio::sync::oneshot::channel();
        let (ack2, done2) = tokio::sync::oneshot::channel();
        let answers = parking_lot::Mutex::new([done1, done2].into());
        let node = wsgate_fanout::Node::new(wsgate_metrics::Metrics::default(), 64, |_| {
            Ok::<_, ()>(Manual(answers))
        })
        .unwrap();
        let outbox = Arc::new(Outbox::new(1 << 20));
        let (tx, rx) = mpsc::channel(8);
        let task = tokio::spawn(
            Replies {
                rx,
                outbox: outbox.clone(),
            }
            .run(),
        );
        let pending = |id| Pending::Publish {
            id: Some(id),
            ack: node.publish(Source::Client, "t", b"1").unwrap(),
        };
        tx.send(pending(1)).await.unwrap();
        tx.send(Pending::Ready(frame::text(b"{\"op\":\"pong\",\"id\":2}")))
            .await
            .unwrap();
        tx.send(pending(3)).await.unwrap();
        // The broker answers the later publication first, and refuses it.
        ack2.send(Err(BrokerError::Unavailable("down".into())))
            .unwrap();
        tokio::task::yield_now().await;
        assert!(texts(&outbox).is_empty(), "nothing may overtake id 1");
        ack1.send(Ok(())).unwrap();
        drop(tx);
        task.await.unwrap();
        let got = texts(&outbox);
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0], protocol::published_reply(Some(1), None));
        assert_eq!(got[1], "{\"op\":\"pong\",\"id\":2}");
        assert!(
            got[2].contains("\"id\":3") && got[2].contains("unavailable"),
            "{}",
            got[2]
        );
        // Each publication was counted once, by its ack.
        let m = node.metrics();
        assert_eq!(m.received.client.get(), 1);
        assert_eq!(m.broker_publish_duration.get_sample_count(), 2);
    }
}
