//! One client session: connect, handshake, (subscribe and wait until ready), then
//! receive stamped messages until told to stop.

use std::pin::pin;
use std::time::Duration;

use crate::net::{handshake_stream, Failure, Overloaded, Url};
use crate::payload;
use crate::proto::{classify, NatsEvent, NatsParser, Op, Target};
use crate::run::Ctx;
use crate::seq::{SeqCounts, SeqTracker};
use crate::stats::now_ns;
use crate::stream::{self, Position, StreamCounts, StreamTracker};
use crate::wsconn::{WsConn, OP_BINARY, OP_CLOSE, OP_PING, OP_TEXT};

/// An open, ready session.
pub struct Session {
    pub ws: WsConn,
    /// NATS only: protocol bytes carried over between frames.
    pub nats: NatsParser,
    /// The stream positions the `subscribed` reply reported (empty for plain topics).
    pub positions: Vec<(String, Position)>,
}

/// The opcode of protocol commands for `target` (NATS reads binary frames).
pub fn command_opcode(target: Target) -> u8 {
    if target.is_json() {
        OP_TEXT
    } else {
        OP_BINARY
    }
}

/// Connects to `url`; with `topics`, subscribes and waits for the server's confirmation.
///
/// # Errors
/// The failure kind, for the report's table (details go to the context's first-error log).
pub async fn open(
    ctx: &Ctx,
    url: &Url,
    topics: &[String],
    rcvbuf: Option<u32>,
) -> Result<Session, Failure> {
    let target = ctx.common.target;
    let cmd = (!topics.is_empty()).then(|| target.subscribe(topics, 1));
    open_with(ctx, url, cmd, rcvbuf).await
}

/// Connects to `url`; with a subscribe command `cmd`, sends it and waits for the
/// server's confirmation (keeping the stream positions it reports).
///
/// # Errors
/// As [`open`].
pub async fn open_with(
    ctx: &Ctx,
    url: &Url,
    cmd: Option<Vec<u8>>,
    rcvbuf: Option<u32>,
) -> Result<Session, Failure> {
    loop {
        match open_once(ctx, url, cmd.clone(), rcvbuf).await {
            Ok(Ok(s)) => return Ok(s),
            Err(f) => return Err(f),
            // A node limiting its upgrade rate: come back when it said (not counted
            // as a failure, nor in the connect timeout).
            Ok(Err(Overloaded(wait))) => {
                ctx.overloaded
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// One attempt of [`open_with`]: `Ok(Err(..))` when the node refused the upgrade with
/// a 503 that says when to retry.
async fn open_once(
    ctx: &Ctx,
    url: &Url,
    cmd: Option<Vec<u8>>,
    rcvbuf: Option<u32>,
) -> Result<Result<Session, Overloaded>, Failure> {
    let target = ctx.common.target;
    let attempt = async {
        let stream = ctx
            .dialer
            .dial(url.addr, rcvbuf)
            .await
            .map_err(|e| ctx.fail(Failure::Connect, e))?;
        let stream = match handshake_stream(stream, url).await {
            Ok(s) => s,
            Err(e) => match e.downcast_ref::<Overloaded>() {
                Some(o) => return Ok(Err(*o)),
                None => return Err(ctx.fail(Failure::Handshake, e)),
            },
        };
        let mut ws = WsConn::new(stream);
        if let Some(hello) = target.hello() {
            ws.send(command_opcode(target), hello)
                .await
                .map_err(|e| ctx.fail(Failure::Handshake, e))?;
        }
        let mut s = Session {
            ws,
            nats: NatsParser::default(),
            positions: Vec::new(),
        };
        if let Some(cmd) = cmd {
            s.ws.send(command_opcode(target), &cmd)
                .await
                .map_err(|e| ctx.fail(Failure::Subscribe, e))?;
            s.positions = wait_ready(&mut s, target)
                .await
                .map_err(|e| ctx.fail(Failure::Subscribe, e))?;
        }
        Ok(Ok(s))
    };
    match tokio::time::timeout(ctx.common.connect_timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(ctx.fail(Failure::Timeout, "connect timeout")),
    }
}

async fn wait_ready(s: &mut Session, target: Target) -> anyhow::Result<Vec<(String, Position)>> {
    loop {
        let frame = s.ws.read_frame().await?;
        match frame.opcode {
            OP_CLOSE => anyhow::bail!("closed before the subscription was confirmed"),
            OP_TEXT | OP_BINARY => {}
            _ => continue,
        }
        if target.is_json() {
            match classify(frame.payload) {
                Op::Subscribed => return Ok(stream::positions(frame.payload)),
                Op::Error(code) => anyhow::bail!("subscribe refused: {code}"),
                _ => {}
            }
        } else {
            let mut outcome = None;
            s.nats
                .feed(frame.payload, |ev| match ev {
                    NatsEvent::Pong if outcome.is_none() => outcome = Some(Ok(Vec::new())),
                    NatsEvent::Err(e) => outcome = Some(Err(anyhow::anyhow!("SUB refused: {e}"))),
                    _ => {}
                })
                .map_err(anyhow::Error::msg)?;
            if let Some(r) = outcome {
                return r;
            }
        }
    }
}

/// How a receiving session ended.
#[derive(Debug, Default)]
pub struct Received {
    pub counts: SeqCounts,
    /// Stream topics: seq contiguity per topic (all zero on plain topics).
    pub streams: StreamCounts,
    /// Close code sent by the server, `"eof"` for a connection end without one, or
    /// `None` when the generator itself stopped.
    pub closed_by_server: Option<String>,
    /// A slow subscriber reached its stop time and left the loop still connected.
    pub stalled: bool,
}

/// Receives stamped messages until `ctx.cancel`, the server closes, or (slow
/// subscribers) `stop_at_ns` passes. Latencies go to the shared timeline when
/// `record` is set.
///
/// Every frame is parsed and every stamp accounted; what is batched is the clock: one
/// reading per `read` from the socket, taken when the read returns, is the receive
/// time of every frame that read completed (the generator's own parsing of earlier
/// frames in the batch is not counted as server latency).
pub async fn receive(
    ctx: &Ctx,
    s: &mut Session,
    key: usize,
    publishers: usize,
    record: bool,
    stop_at_ns: Option<u64>,
) -> Received {
    let target = ctx.common.target;
    let mut rec = ctx.timeline.recorder(key);
    let mut seq = SeqTracker::new(publishers);
    let mut streams = StreamTracker::new();
    for (topic, p) in &s.positions {
        streams.start(topic.as_bytes(), p.seq);
    }
    let mut out = Received::default();
    // One cancellation future for the whole loop: creating one per read would
    // register a waiter each time.
    let mut cancelled = pin!(ctx.cancel.cancelled());
    let mut now = now_ns();
    let mut on_stamp = |st: payload::Stamp, now: u64| {
        seq.record(st.publisher, st.seq);
        if record {
            rec.record(now, now.saturating_sub(st.sent_ns) / 1000);
        }
    };
    'outer: loop {
        // Everything complete in the buffer, without awaiting.
        loop {
            let frame = match s.ws.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => {
                    out.closed_by_server = Some("protocol".into());
                    break 'outer;
                }
            };
            match frame.opcode {
                OP_TEXT | OP_BINARY if target.is_json() => {
                    let f = frame.payload;
                    let message = if let Some(st) = payload::scan_message(f) {
                        on_stamp(st, now);
                        true
                    } else {
                        match classify(f) {
                            Op::Message => {
                                if let Some(st) = payload::scan(f) {
                                    on_stamp(st, now);
                                }
                                true
                            }
                            Op::Reset => {
                                if let Some((topic, at)) = stream::parse_reset(f) {
                                    streams.reset(topic.as_bytes(), at);
                                }
                                false
                            }
                            _ => false,
                        }
                    };
                    // Plain topics stop at the tail check; only stream messages look
                    // for their topic.
                    if let Some(at) = stream::tail_seq(f).filter(|_| message) {
                        if let Some(topic) = stream::topic_of(f) {
                            streams.record(topic, at);
                        }
                    }
                }
                OP_TEXT | OP_BINARY => {
                    let mut ping = false;
                    let fed = s.nats.feed(frame.payload, |ev| match ev {
                        NatsEvent::Msg(body) => {
                            if let Some(st) = payload::scan(body) {
                                on_stamp(st, now);
                            }
                        }
                        NatsEvent::Ping => ping = true,
                        _ => {}
                    });
                    if fed.is_err() {
                        out.closed_by_server = Some("protocol".into());
                        break 'outer;
                    }
                    if ping {
                        let _ = s.ws.send(command_opcode(target), b"PONG\r\n").await;
                    }
                }
                OP_PING => {
                    let payload = frame.payload.to_vec();
                    let _ = s.ws.send(crate::wsconn::OP_PONG, &payload).await;
                }
                OP_CLOSE => {
                    out.closed_by_server = Some(close_code(frame.payload));
                    break 'outer;
                }
                _ => {}
            }
        }
        if let Some(at) = stop_at_ns {
            if now_ns() >= at {
                out.stalled = true;
                break;
            }
        }
        // `fill` is cancel safe.
        let filled = tokio::select! {
            biased;
            _ = &mut cancelled => break,
            r = s.ws.fill() => r,
        };
        if filled.is_err() {
            out.closed_by_server = Some("eof".into());
            break;
        }
        now = now_ns();
    }
    out.counts = seq.counts();
    out.streams = streams.counts();
    out
}

/// After stalling, a slow subscriber waits for the end of the run and then reads
/// what is left (briefly) to learn whether the server disconnected it.
pub async fn stall(ctx: &Ctx, s: &mut Session) -> String {
    ctx.cancel.cancelled().await;
    let drain = async {
        loop {
            match s.ws.read_frame().await {
                Ok(f) if f.opcode == OP_CLOSE => return close_code(f.payload),
                Ok(_) => {}
                Err(_) => return "eof".to_string(),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(2), drain)
        .await
        .unwrap_or_else(|_| "open".to_string())
}

fn close_code(payload: &[u8]) -> String {
    match payload {
        [a, b, ..] => u16::from_be_bytes([*a, *b]).to_string(),
        _ => "none".to_string(),
    }
}
