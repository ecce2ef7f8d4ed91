//! One client session: connect, handshake, (subscribe and wait until ready), then
//! receive stamped messages until told to stop.

use std::pin::pin;
use std::time::Duration;

use fastwebsockets::{Frame, OpCode, Payload, WebSocket};
use tokio::net::TcpStream;

use crate::net::{handshake, Failure, Url};
use crate::payload;
use crate::proto::{classify, NatsEvent, NatsParser, Op, Target};
use crate::run::Ctx;
use crate::seq::{SeqCounts, SeqTracker};
use crate::stats::now_ns;

/// An open, ready session.
pub struct Session {
    pub ws: WebSocket<TcpStream>,
    /// NATS only: protocol bytes carried over between frames.
    pub nats: NatsParser,
}

/// A frame carrying a protocol command for `target` (NATS reads binary frames).
pub fn command_frame(target: Target, bytes: Vec<u8>) -> Frame<'static> {
    if target.is_json() {
        Frame::text(Payload::Owned(bytes))
    } else {
        Frame::binary(Payload::Owned(bytes))
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
    let attempt = async {
        let stream = ctx
            .dialer
            .dial(url.addr, rcvbuf)
            .await
            .map_err(|e| ctx.fail(Failure::Connect, e))?;
        let mut ws = handshake(stream, url)
            .await
            .map_err(|e| ctx.fail(Failure::Handshake, e))?;
        if let Some(hello) = target.hello() {
            ws.write_frame(command_frame(target, hello.to_vec()))
                .await
                .map_err(|e| ctx.fail(Failure::Handshake, e))?;
        }
        let mut s = Session {
            ws,
            nats: NatsParser::default(),
        };
        if !topics.is_empty() {
            s.ws.write_frame(command_frame(target, target.subscribe(topics, 1)))
                .await
                .map_err(|e| ctx.fail(Failure::Subscribe, e))?;
            wait_ready(&mut s, target)
                .await
                .map_err(|e| ctx.fail(Failure::Subscribe, e))?;
        }
        Ok(s)
    };
    match tokio::time::timeout(ctx.common.connect_timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(ctx.fail(Failure::Timeout, "connect timeout")),
    }
}

async fn wait_ready(s: &mut Session, target: Target) -> anyhow::Result<()> {
    loop {
        let frame = s.ws.read_frame().await?;
        match frame.opcode {
            OpCode::Close => anyhow::bail!("closed before the subscription was confirmed"),
            OpCode::Text | OpCode::Binary => {}
            _ => continue,
        }
        if target.is_json() {
            match classify(&frame.payload) {
                Op::Subscribed => return Ok(()),
                Op::Error(code) => anyhow::bail!("subscribe refused: {code}"),
                _ => {}
            }
        } else {
            let mut outcome = None;
            s.nats
                .feed(&frame.payload, |ev| match ev {
                    NatsEvent::Pong if outcome.is_none() => outcome = Some(Ok(())),
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
    /// Close code sent by the server, `"eof"` for a connection end without one, or
    /// `None` when the generator itself stopped.
    pub closed_by_server: Option<String>,
    /// A slow subscriber reached its stop time and left the loop still connected.
    pub stalled: bool,
}

/// Receives stamped messages until `ctx.cancel`, the server closes, or (slow
/// subscribers) `stop_at_ns` passes. Latencies go to the shared timeline when
/// `record` is set.
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
    let mut out = Received::default();
    // One cancellation future for the whole loop: creating one per frame would
    // register a waiter per message.
    let mut cancelled = pin!(ctx.cancel.cancelled());
    let mut on_payload = |body: &[u8]| {
        if let Some(st) = payload::scan(body) {
            let now = now_ns();
            seq.record(st.publisher, st.seq);
            if record {
                rec.record(now, now.saturating_sub(st.sent_ns) / 1000);
            }
        }
    };
    loop {
        // `read_frame` is not cancel-safe, but a cancelled session is dropped whole.
        let frame = tokio::select! {
            biased;
            _ = &mut cancelled => break,
            f = s.ws.read_frame() => f,
        };
        let frame = match frame {
            Ok(f) => f,
            Err(_) => {
                out.closed_by_server = Some("eof".into());
                break;
            }
        };
        // Not collapsible: a JSON frame that is not a message must not reach the
        // NATS arm below.
        #[allow(clippy::collapsible_match)]
        match frame.opcode {
            OpCode::Text | OpCode::Binary if target.is_json() => {
                if classify(&frame.payload) == Op::Message {
                    on_payload(&frame.payload);
                }
            }
            OpCode::Text | OpCode::Binary => {
                let mut ping = false;
                let fed = s.nats.feed(&frame.payload, |ev| match ev {
                    NatsEvent::Msg(body) => on_payload(body),
                    NatsEvent::Ping => ping = true,
                    _ => {}
                });
                if fed.is_err() {
                    out.closed_by_server = Some("protocol".into());
                    break;
                }
                if ping {
                    let _ =
                        s.ws.write_frame(command_frame(target, b"PONG\r\n".to_vec()))
                            .await;
                }
            }
            OpCode::Close => {
                out.closed_by_server = Some(close_code(&frame.payload));
                break;
            }
            _ => {}
        }
        if let Some(at) = stop_at_ns {
            if now_ns() >= at {
                out.stalled = true;
                break;
            }
        }
    }
    out.counts = seq.counts();
    out
}

/// After stalling, a slow subscriber waits for the end of the run and then reads
/// what is left (briefly) to learn whether the server disconnected it.
pub async fn stall(ctx: &Ctx, s: &mut Session) -> String {
    ctx.cancel.cancelled().await;
    let drain = async {
        loop {
            match s.ws.read_frame().await {
                Ok(f) if f.opcode == OpCode::Close => return close_code(&f.payload),
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
