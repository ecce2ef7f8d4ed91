//! What the writers send, the same in both modes: a plain publication (`PUBLISH` or
//! `SPUBLISH`) or a call of the stream functions (`FCALL`), queued in call order and
//! sent in pipelines by [`run`], which also installs the function library and calls
//! again once when Redis says a function is missing (a flushed or restarted Redis).

use std::future::Future;

use redis::Value;
use tokio::sync::oneshot;
use wsgate_fanout::{BrokerError, BrokerFuture};

use crate::reply::{unavailable, Reply};
use crate::streams::{function_missing, publish_many_cmd, StreamPublication};

/// One command on its way.
pub(crate) enum Op {
    /// `PUBLISH`/`SPUBLISH channel payload`.
    Publish { channel: Vec<u8>, payload: Vec<u8> },
    /// A stream function call; its reply goes back as it is.
    Call(redis::Cmd),
    /// A publication into a stream: its reply (`[seq, epoch]`) goes back as it is.
    /// Consecutive ones share one function call ([`run`]).
    Stream(StreamPublication),
}

/// Where a command's answer goes.
pub(crate) enum Ack {
    Done(Reply),
    Value(oneshot::Sender<Result<Value, BrokerError>>),
}

pub(crate) struct Job {
    pub op: Op,
    pub ack: Ack,
    /// Counted as a publication when accepted ([`Outcome::published`]): plain
    /// publishes and stream publications, not reads, presence writes or heartbeats.
    pub publication: bool,
}

impl Job {
    /// A call, and the receiver of its reply.
    pub(crate) fn call(cmd: redis::Cmd) -> (Job, oneshot::Receiver<Result<Value, BrokerError>>) {
        let (tx, rx) = oneshot::channel();
        (
            Job {
                op: Op::Call(cmd),
                ack: Ack::Value(tx),
                publication: false,
            },
            rx,
        )
    }

    /// A stream publication, and the receiver of its reply.
    pub(crate) fn stream(
        publication: StreamPublication,
    ) -> (Job, oneshot::Receiver<Result<Value, BrokerError>>) {
        let (tx, rx) = oneshot::channel();
        (
            Job {
                op: Op::Stream(publication),
                ack: Ack::Value(tx),
                publication: true,
            },
            rx,
        )
    }

    fn add_to(&self, pipe: &mut redis::Pipeline, publish: &str) {
        match &self.op {
            Op::Publish { channel, payload } => {
                pipe.cmd(publish).arg(channel).arg(payload);
            }
            Op::Call(cmd) => {
                pipe.add_command(cmd.clone());
            }
            Op::Stream(p) => {
                pipe.add_command(p.cmd());
            }
        }
    }

    pub(crate) fn fail(self, err: BrokerError) {
        match self.ack {
            Ack::Done(r) => {
                let _ = r.send(Err(err));
            }
            Ack::Value(r) => {
                let _ = r.send(Err(err));
            }
        }
    }

    /// Answers with Redis's reply; whether it was a success.
    fn answer(self, v: Option<Value>, publish: &str) -> bool {
        match (self.ack, v) {
            (Ack::Done(r), Some(Value::Int(_))) => {
                let _ = r.send(Ok(()));
                true
            }
            (Ack::Done(r), other) => {
                let why = match other {
                    Some(Value::ServerError(e)) => format!("redis: {e}"),
                    _ => format!("redis: unexpected reply to {publish}"),
                };
                let _ = r.send(Err(unavailable(why)));
                false
            }
            (Ack::Value(r), Some(Value::ServerError(e))) => {
                let _ = r.send(Err(unavailable(format!("redis: {e}"))));
                false
            }
            (Ack::Value(r), Some(v)) => {
                let _ = r.send(Ok(v));
                true
            }
            (Ack::Value(r), None) => {
                let _ = r.send(Err(unavailable("redis: no reply")));
                false
            }
        }
    }
}

/// The future of a call's parsed reply.
pub(crate) fn answer_with<T: Send + 'static>(
    rx: oneshot::Receiver<Result<Value, BrokerError>>,
    parse: fn(&Value) -> Result<T, BrokerError>,
) -> BrokerFuture<T> {
    BrokerFuture::pending(async move {
        match rx.await {
            Ok(Ok(v)) => parse(&v),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(BrokerError::Closed),
        }
    })
}

/// Where a writer sends its pipelines: the single Redis, or one slot's primary.
pub(crate) trait Target {
    /// Sends `pipe` (`n` commands) and returns one reply per command (server errors
    /// as [`Value::ServerError`]); `Err` when the connection failed.
    fn send(
        &mut self,
        pipe: redis::Pipeline,
        n: usize,
    ) -> impl Future<Output = redis::RedisResult<Vec<Value>>> + Send + '_;

    /// `FUNCTION LOAD REPLACE` of the stream library where the pipeline goes.
    fn install(&mut self) -> impl Future<Output = redis::RedisResult<()>> + Send + '_;
}

/// What one [`run`] did.
pub(crate) struct Outcome {
    /// Commands Redis accepted.
    pub accepted: u64,
    /// Of those, publications (see [`Job::publication`]).
    pub published: u64,
    /// Commands Redis refused (error replies).
    pub refused: u64,
    /// The connection failed: every job not answered yet was answered `unavailable`.
    pub failed: Option<redis::RedisError>,
}

/// Most stream publications in one `wsgate_gateway_publish_many` call.
const MAX_GROUP: usize = 256;

/// One command of a pipeline: a job alone, or consecutive stream publications in one
/// call.
enum Entry {
    One(Job),
    Many(Vec<Job>),
}

impl Entry {
    /// `jobs` as pipeline commands, in order: each run of consecutive stream
    /// publications (up to [`MAX_GROUP`]) becomes one call. Their order is kept, so
    /// each stream's publications are numbered in the order they were queued; only
    /// the call's overhead (one function call, clock read, position read, seq write
    /// and expiry per stream, instead of one per publication) is shared.
    fn group(jobs: Vec<Job>) -> Vec<Entry> {
        let mut out: Vec<Entry> = Vec::with_capacity(jobs.len());
        for job in jobs {
            if !matches!(job.op, Op::Stream(_)) {
                out.push(Entry::One(job));
                continue;
            }
            match out.last_mut() {
                Some(Entry::Many(group)) if group.len() < MAX_GROUP => group.push(job),
                Some(
                    last @ Entry::One(Job {
                        op: Op::Stream(_), ..
                    }),
                ) => {
                    let Entry::One(first) = std::mem::replace(last, Entry::Many(Vec::new())) else {
                        unreachable!()
                    };
                    *last = Entry::Many(vec![first, job]);
                }
                _ => out.push(Entry::One(job)),
            }
        }
        out
    }

    fn add_to(&self, pipe: &mut redis::Pipeline, publish: &str) {
        match self {
            Entry::One(job) => job.add_to(pipe, publish),
            Entry::Many(jobs) => {
                pipe.add_command(publish_many_cmd(jobs.iter().map(|j| match &j.op {
                    Op::Stream(p) => p,
                    _ => unreachable!("only stream publications are grouped"),
                })));
            }
        }
    }

    fn into_jobs(self) -> Vec<Job> {
        match self {
            Entry::One(job) => vec![job],
            Entry::Many(jobs) => jobs,
        }
    }

    /// Answers the entry's jobs with its reply; how many were accepted, of which
    /// publications, and how many refused.
    fn answer(self, reply: Option<Value>, publish: &str, out: &mut Outcome) {
        let mut count = |job: Job, v: Option<Value>| {
            let publication = job.publication;
            if job.answer(v, publish) {
                out.accepted += 1;
                out.published += u64::from(publication);
            } else {
                out.refused += 1;
            }
        };
        match self {
            Entry::One(job) => count(job, reply),
            Entry::Many(jobs) => match reply {
                Some(Value::Array(items)) if items.len() == jobs.len() => {
                    for (job, item) in jobs.into_iter().zip(items) {
                        count(job, Some(item));
                    }
                }
                Some(e @ Value::ServerError(_)) => {
                    for job in jobs {
                        count(job, Some(e.clone()));
                    }
                }
                // Not one answer per publication: none of them is known to be in.
                _ => {
                    for job in jobs {
                        count(job, None);
                    }
                }
            },
        }
    }
}

/// Sends `jobs` as one pipeline (`publish` is `PUBLISH` or `SPUBLISH`) and answers
/// each; consecutive stream publications go as one call ([`Entry::group`]). Calls
/// that find no function are sent again once, after the library was installed; they
/// are stream publications and reads only, so their order among themselves is kept.
pub(crate) async fn run(target: &mut impl Target, jobs: Vec<Job>, publish: &str) -> Outcome {
    let mut out = Outcome {
        accepted: 0,
        published: 0,
        refused: 0,
        failed: None,
    };
    let mut pending = jobs;
    for attempt in 0..2 {
        let entries = Entry::group(pending);
        let mut pipe = redis::pipe();
        for entry in &entries {
            entry.add_to(&mut pipe, publish);
        }
        let replies = match target.send(pipe, entries.len()).await {
            Ok(r) => r,
            Err(e) => {
                // Some of it may have reached Redis: failing all of it can only be a
                // false failure, never a false success.
                let err = unavailable(format!("redis: {e}"));
                for job in entries.into_iter().flat_map(Entry::into_jobs) {
                    job.fail(err.clone());
                }
                out.failed = Some(e);
                return out;
            }
        };
        let mut again = Vec::new();
        let mut replies = replies.into_iter();
        for entry in entries {
            let reply = replies.next();
            if attempt == 0 && reply.as_ref().is_some_and(function_missing) {
                again.extend(entry.into_jobs());
            } else {
                entry.answer(reply, publish, &mut out);
            }
        }
        if again.is_empty() {
            break;
        }
        if let Err(e) = target.install().await {
            let err = unavailable(format!("redis: installing the stream functions: {e}"));
            out.refused += again.len() as u64;
            for job in again {
                job.fail(err.clone());
            }
            break;
        }
        tracing::info!("stream functions were missing in redis: installed again");
        pending = again;
    }
    out
}
