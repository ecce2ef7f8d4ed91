//! How the broker's calls get their answers from the relay tasks: each call hands a
//! task a one-shot [`Reply`] and returns a future of the answer; a task that is gone
//! (its receiver or the reply dropped) answers [`BrokerError::Closed`].

use tokio::sync::{mpsc, oneshot};
use wsgate_fanout::{BrokerError, BrokerFuture};

/// Where a relay task sends the outcome of one command.
pub(crate) type Reply = oneshot::Sender<Result<(), BrokerError>>;

/// `unavailable`: Redis (or the shard) cannot take the command now.
pub(crate) fn unavailable(why: impl Into<String>) -> BrokerError {
    BrokerError::Unavailable(why.into())
}

/// The future of the answer that `rx`'s [`Reply`] will carry.
pub(crate) fn answer(rx: oneshot::Receiver<Result<(), BrokerError>>) -> BrokerFuture {
    BrokerFuture::pending(async move { rx.await.unwrap_or(Err(BrokerError::Closed)) })
}

/// Sends the command `make` builds around a new [`Reply`] to the task behind `tx`;
/// the future of its answer.
pub(crate) fn ask<C>(tx: &mpsc::UnboundedSender<C>, make: impl FnOnce(Reply) -> C) -> BrokerFuture {
    let (reply, rx) = oneshot::channel();
    if tx.send(make(reply)).is_err() {
        return BrokerFuture::ready(Err(BrokerError::Closed));
    }
    answer(rx)
}
