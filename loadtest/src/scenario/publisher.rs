//! Publishers: over WebSocket (JSON `publish` or NATS `PUB`), over the HTTP publish
//! API, or straight into Redis. Each has one topic, a global index that goes into
//! every payload, and either a fixed rate or an open loop bounded by unacknowledged
//! publications.
//!
//! WebSocket publishers write whole batches of frames with one syscall and read the
//! acknowledgements on a separate task (fastwebsockets' reader is not cancel-safe, so
//! it gets its own task). NATS has no per-publication acknowledgement: each batch
//! ends with a `PING`, and its `PONG` acknowledges the whole batch, since the server
//! handles a connection's commands in order.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use fastwebsockets::{OpCode, Role};
use tokio::io::AsyncWriteExt as _;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::cli::PublishVia;
use crate::http::HttpConn;
use crate::net::{handshake_stream, push_frame, Url};
use crate::payload::{encode, Stamp};
use crate::proto::{classify, NatsEvent, NatsParser, Op, Target};
use crate::run::Ctx;
use crate::stats::now_ns;

/// What one publisher does.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Global publisher index (goes into every payload).
    pub index: u32,
    pub topic_idx: usize,
    pub topic: String,
    /// Publications per second for this publisher; 0 = open loop.
    pub rate: f64,
    /// Delay of this publisher's schedule after the common start. Publishers at a
    /// fixed rate are spread evenly over one period (publisher j of P starts j/P of a
    /// period late), as independent publishers would be on average: P publishers
    /// firing at the same instants would offer P-fold bursts instead of the stated
    /// rate.
    pub phase: Duration,
    pub payload: usize,
    pub batch: usize,
    pub max_inflight: usize,
    /// Stops publishing before `end` when cancelled (a phase of unknown length).
    pub stop: Option<tokio_util::sync::CancellationToken>,
}

/// What one publisher did.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub topic_idx: usize,
    pub sent: u64,
    pub acked: u64,
    pub errors: u64,
    pub error_codes: BTreeMap<String, u64>,
    pub max_lag_ms: f64,
}

/// Acknowledgement state shared with a WebSocket publisher's reader task.
#[derive(Default)]
struct Acks {
    acked: AtomicU64,
    errors: AtomicU64,
    codes: Mutex<BTreeMap<String, u64>>,
    /// NATS: sizes of the batches whose PONG is still due.
    batches: Mutex<VecDeque<u64>>,
    /// NATS: the server pinged us; answer with the next write.
    owe_pong: AtomicBool,
}

enum Conn {
    Ws {
        write: OwnedWriteHalf,
        reader: JoinHandle<()>,
        acks: Arc<Acks>,
        window: Arc<Semaphore>,
    },
    Http {
        conn: HttpConn,
        bearer: Option<String>,
    },
    Redis {
        conn: redis::aio::MultiplexedConnection,
        channel: String,
        /// `FCALL wsgate_publish` (stream topics) instead of `PUBLISH`.
        fcall: bool,
    },
}

/// A connected publisher, ready to start.
pub struct Publisher {
    plan: Plan,
    target: Target,
    conn: Conn,
}

/// Where publishers connect.
pub struct Endpoints {
    pub via: PublishVia,
    pub ws: Vec<Url>,
    pub http: Vec<Url>,
    pub api_key: Option<String>,
    pub redis: Option<redis::Client>,
    pub redis_prefix: String,
    pub redis_fcall: bool,
}

impl Publisher {
    /// Connects publisher `plan` to the `k`-th endpoint (round-robin).
    pub async fn connect(ctx: &Ctx, plan: Plan, ep: &Endpoints, k: usize) -> Result<Publisher> {
        let target = ctx.common.target;
        let conn = match ep.via {
            PublishVia::Ws => {
                let url = &ep.ws[k % ep.ws.len()];
                let stream = ctx.dialer.dial(url.addr, None).await?;
                let stream = handshake_stream(stream, url).await?;
                let (read, mut write) = stream.into_split();
                if let Some(hello) = target.hello() {
                    let mut buf = Vec::new();
                    push_frame(&mut buf, 2, hello);
                    write.write_all(&buf).await?;
                }
                let acks = Arc::new(Acks::default());
                let window = Arc::new(Semaphore::new(plan.max_inflight.max(1)));
                let reader = tokio::spawn(read_acks(
                    read,
                    target,
                    Arc::clone(&acks),
                    Arc::clone(&window),
                ));
                Conn::Ws {
                    write,
                    reader,
                    acks,
                    window,
                }
            }
            PublishVia::Http => {
                let url = &ep.http[k % ep.http.len()];
                let stream = ctx.dialer.dial(url.addr, None).await?;
                Conn::Http {
                    conn: HttpConn::open(url, stream).await?,
                    bearer: ep.api_key.clone(),
                }
            }
            PublishVia::Redis => {
                let client = ep.redis.as_ref().context("no Redis client")?;
                Conn::Redis {
                    conn: client.get_multiplexed_async_connection().await?,
                    channel: format!("{}{}", ep.redis_prefix, plan.topic),
                    fcall: ep.redis_fcall,
                }
            }
        };
        Ok(Publisher { plan, target, conn })
    }

    /// Publishes from `start` until `end`, then waits (up to 3 s) for outstanding
    /// acknowledgements.
    pub async fn run(mut self, ctx: &Ctx, start: Instant, end: Instant) -> Outcome {
        let plan = self.plan.clone();
        let start = start + plan.phase;
        let mut out = Outcome {
            topic_idx: plan.topic_idx,
            ..Outcome::default()
        };
        let mut seq: u64 = 0;
        let mut data = Vec::with_capacity(plan.payload + 64);
        let mut cmd = Vec::with_capacity(plan.payload + 128);
        let mut buf = Vec::with_capacity((plan.payload + 128) * plan.batch);
        loop {
            let now = Instant::now();
            if now >= end || plan.stop.as_ref().is_some_and(|s| s.is_cancelled()) {
                break;
            }
            let n = if plan.rate > 0.0 {
                let due = match now.checked_duration_since(start) {
                    Some(d) => (d.as_secs_f64() * plan.rate) as u64 + 1,
                    None => 0,
                };
                let next_at = start + Duration::from_secs_f64(seq as f64 / plan.rate);
                if due <= seq {
                    tokio::time::sleep_until(next_at.into()).await;
                    continue;
                }
                out.max_lag_ms = out.max_lag_ms.max((now - next_at).as_secs_f64() * 1000.0);
                (due - seq).min(plan.batch as u64)
            } else {
                plan.batch as u64
            };
            if let Conn::Ws { window, .. } = &self.conn {
                // Open loop or not, never more than --max-inflight unacknowledged.
                let want = (n as u32).min(plan.max_inflight as u32);
                match tokio::time::timeout_at(end.into(), window.acquire_many(want)).await {
                    Ok(Ok(p)) => p.forget(),
                    _ => break,
                }
            }
            let n = n.min(plan.max_inflight as u64);
            let sent_ns = now_ns();
            let ok = match &mut self.conn {
                Conn::Ws { write, acks, .. } => {
                    buf.clear();
                    if self.target.is_json() {
                        for i in 0..n {
                            stamp(&mut data, &plan, seq + i, sent_ns);
                            cmd.clear();
                            self.target
                                .publish(&mut cmd, &plan.topic, seq + i + 1, &data);
                            push_frame(&mut buf, 1, &cmd);
                        }
                    } else {
                        cmd.clear();
                        if acks.owe_pong.swap(false, Ordering::Relaxed) {
                            cmd.extend_from_slice(b"PONG\r\n");
                        }
                        for i in 0..n {
                            stamp(&mut data, &plan, seq + i, sent_ns);
                            self.target.publish(&mut cmd, &plan.topic, 0, &data);
                        }
                        cmd.extend_from_slice(b"PING\r\n");
                        acks.batches.lock().expect("acks lock").push_back(n);
                        push_frame(&mut buf, 2, &cmd);
                    }
                    write.write_all(&buf).await.is_ok()
                }
                Conn::Http { conn, bearer } => {
                    let mut body = Vec::new();
                    let array = n > 1;
                    if array {
                        body.push(b'[');
                    }
                    for i in 0..n {
                        stamp(&mut data, &plan, seq + i, sent_ns);
                        if i > 0 {
                            body.push(b',');
                        }
                        body.extend_from_slice(
                            format!(r#"{{"topic":"{}","data":"#, plan.topic).as_bytes(),
                        );
                        body.extend_from_slice(&data);
                        body.push(b'}');
                    }
                    if array {
                        body.push(b']');
                    }
                    match conn
                        .request(hyper::Method::POST, Bytes::from(body), bearer.as_deref())
                        .await
                    {
                        Ok((200, _)) => {
                            out.acked += n;
                            true
                        }
                        Ok((status, _)) => {
                            out.errors += n;
                            *out.error_codes.entry(format!("http_{status}")).or_default() += 1;
                            true
                        }
                        Err(_) => false,
                    }
                }
                Conn::Redis {
                    conn,
                    channel,
                    fcall,
                } => {
                    let mut pipe = redis::pipe();
                    for i in 0..n {
                        stamp(&mut data, &plan, seq + i, sent_ns);
                        if *fcall {
                            pipe.cmd("FCALL")
                                .arg("wsgate_publish")
                                .arg(1)
                                .arg(&*channel)
                                .arg(&data[..]);
                        } else {
                            pipe.cmd("PUBLISH").arg(&*channel).arg(&data[..]);
                        }
                    }
                    // PUBLISH answers a count, FCALL wsgate_publish [seq, epoch]; an
                    // error reply fails the whole pipeline.
                    match pipe.query_async::<Vec<redis::Value>>(conn).await {
                        Ok(_) => {
                            out.acked += n;
                            true
                        }
                        Err(_) => false,
                    }
                }
            };
            if !ok {
                *out.error_codes.entry("connection".into()).or_default() += 1;
                break;
            }
            seq += n;
            out.sent += n;
            ctx.sent.fetch_add(n, Ordering::Relaxed);
        }
        if let Conn::Ws {
            write,
            reader,
            acks,
            ..
        } = self.conn
        {
            let deadline = Instant::now() + Duration::from_secs(3);
            while acks.acked.load(Ordering::Relaxed) + acks.errors.load(Ordering::Relaxed)
                < out.sent
                && Instant::now() < deadline
                && !reader.is_finished()
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            out.acked = acks.acked.load(Ordering::Relaxed);
            out.errors = acks.errors.load(Ordering::Relaxed);
            out.error_codes
                .extend(acks.codes.lock().expect("acks lock").clone());
            let mut write = write;
            let mut bye = Vec::new();
            push_frame(&mut bye, 8, &1000u16.to_be_bytes());
            let _ = write.write_all(&bye).await;
            reader.abort();
        }
        out
    }
}

fn stamp(data: &mut Vec<u8>, plan: &Plan, seq: u64, sent_ns: u64) {
    data.clear();
    let st = Stamp {
        publisher: plan.index,
        seq,
        sent_ns,
    };
    encode(data, &st, plan.payload);
}

/// Reads acknowledgements (and errors) until the connection ends.
async fn read_acks(
    read: tokio::net::tcp::OwnedReadHalf,
    target: Target,
    acks: Arc<Acks>,
    window: Arc<Semaphore>,
) {
    // Only the read side is used; the writer never goes through fastwebsockets.
    let (mut rd, _wr) =
        fastwebsockets::after_handshake_split(read, tokio::io::sink(), Role::Client);
    let mut nats = NatsParser::default();
    // Obligated pongs are dropped: a publisher writes all the time, and any frame
    // counts as liveness for the server.
    let mut no_send = |_f| async { Ok::<(), std::io::Error>(()) };
    loop {
        let frame = match rd.read_frame(&mut no_send).await {
            Ok(f) => f,
            Err(_) => return,
        };
        match frame.opcode {
            OpCode::Close => return,
            OpCode::Text | OpCode::Binary => {}
            _ => continue,
        }
        if target.is_json() {
            match classify(&frame.payload) {
                Op::Published => {
                    acks.acked.fetch_add(1, Ordering::Relaxed);
                    window.add_permits(1);
                }
                Op::Error(code) => {
                    acks.errors.fetch_add(1, Ordering::Relaxed);
                    *acks
                        .codes
                        .lock()
                        .expect("acks lock")
                        .entry(code.to_string())
                        .or_default() += 1;
                    window.add_permits(1);
                }
                _ => {}
            }
        } else {
            let _ = nats.feed(&frame.payload, |ev| match ev {
                NatsEvent::Pong => {
                    let n = acks
                        .batches
                        .lock()
                        .expect("acks lock")
                        .pop_front()
                        .unwrap_or(0);
                    acks.acked.fetch_add(n, Ordering::Relaxed);
                    window.add_permits(n as usize);
                }
                NatsEvent::Ping => acks.owe_pong.store(true, Ordering::Relaxed),
                NatsEvent::Err(e) => {
                    acks.errors.fetch_add(1, Ordering::Relaxed);
                    *acks
                        .codes
                        .lock()
                        .expect("acks lock")
                        .entry(e.to_string())
                        .or_default() += 1;
                }
                _ => {}
            });
        }
    }
}
