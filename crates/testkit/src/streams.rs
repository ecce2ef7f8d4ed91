//! Stream clients under faults, and the seq-by-seq check of what they received.
//!
//! A [`ResumingClient`] keeps itself subscribed to one stream topic across nodes: on
//! any disconnect it moves to the next node and resumes with `since` from the last
//! position it saw, recording every `subscribed`, message, `reset` and close as an
//! [`Event`]. [`check`] walks those events: every seq exactly once, in order, or an
//! explicit `reset` / `recovered:false` — a silent gap or a duplicate fails.
//! [`position`] and [`history`] ask a node where the stream is and what it kept, to
//! compare with what clients got.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::http::blocking;
use crate::wait::wait_until;

/// What a client saw, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A `subscribed` reply's entry for the stream.
    Subscribed {
        seq: u64,
        epoch: String,
        recovered: Option<bool>,
    },
    /// A message: its seq and its data.
    Message(u64, String),
    Reset {
        seq: u64,
        epoch: String,
    },
    /// The connection ended (with a close code, if one came).
    Closed(Option<u16>),
}

/// What one client saw so far, shared with the task that runs it.
pub type Events = Arc<Mutex<Vec<Event>>>;

/// A stream client's WebSocket connection to a node.
pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The nodes clients may connect to, one URL per slot (a replaced node takes its
/// slot).
pub type Urls = Arc<Mutex<Vec<String>>>;

/// One connection of a client that ended: on which slot, how, when.
#[derive(Debug, Clone)]
pub struct Close {
    pub slot: usize,
    /// The close frame's code, if one came (`None`: reset, EOF, or an error reply).
    pub code: Option<u16>,
    pub at: Instant,
}

/// The connections a client lost, in order.
pub type Closes = Arc<Mutex<Vec<Close>>>;

/// A client that keeps itself subscribed to a stream topic, resuming across nodes.
pub struct ResumingClient {
    pub urls: Urls,
    /// The slot it tries first (`first % slots`); after that, each attempt goes to
    /// another slot drawn at random, so a failed node's clients spread over the others.
    pub first: usize,
    pub topic: String,
    pub events: Events,
    pub closes: Closes,
    /// Ends the client (it returns at once).
    pub stop: Arc<AtomicBool>,
    /// Ends the client at this instant at the latest.
    pub until: Instant,
}

impl ResumingClient {
    /// Runs until `stop` or `until`.
    pub async fn run(self) {
        let topic = self.topic.as_str();
        let mut position: Option<(u64, String)> = None;
        let mut next = Slots::new(self.first);
        let over = || self.stop.load(Ordering::Relaxed) || Instant::now() >= self.until;
        while !over() {
            let Some((slot, mut ws)) = next.connect(&self.urls).await else {
                continue;
            };
            let mut cmd = json!({"op":"subscribe","id":1,"topics":[topic]});
            if let Some((seq, epoch)) = &position {
                cmd["since"] = json!({ topic: {"seq": seq, "epoch": epoch} });
            }
            if ws.send(Message::text(cmd.to_string())).await.is_err() {
                continue;
            }
            let mut code = None;
            loop {
                if over() {
                    return; // the run is over
                }
                let v = match next_json(&mut ws).await {
                    None => continue,
                    Some(Err(close)) => {
                        code = close;
                        break;
                    }
                    Some(Ok(v)) => v,
                };
                let event = match v["op"].as_str() {
                    Some("subscribed") => {
                        let s = &v["streams"][topic];
                        let seq = s["seq"].as_u64().expect("a stream position");
                        let epoch = s["epoch"].as_str().unwrap().to_owned();
                        let recovered = s["recovered"].as_bool();
                        if recovered != Some(true) {
                            position = Some((seq, epoch.clone()));
                        }
                        Event::Subscribed {
                            seq,
                            epoch,
                            recovered,
                        }
                    }
                    Some("message") => {
                        let seq = v["seq"].as_u64().expect("stream messages carry seq");
                        if let Some(p) = &mut position {
                            p.0 = seq;
                        }
                        Event::Message(seq, v["data"].to_string())
                    }
                    Some("reset") => {
                        let seq = v["seq"].as_u64().unwrap();
                        let epoch = v["epoch"].as_str().unwrap().to_owned();
                        position = Some((seq, epoch.clone()));
                        Event::Reset { seq, epoch }
                    }
                    Some("welcome") => continue,
                    // The subscribe failed (e.g. `unavailable` while the node has no
                    // Redis): leave, and try again elsewhere.
                    Some("error") => break,
                    _ => panic!("unexpected frame {v}"),
                };
                self.events.lock().push(event);
            }
            self.events.lock().push(Event::Closed(code));
            self.closes.lock().push(Close {
                slot,
                code,
                at: Instant::now(),
            });
            // Reconnect soon, but not all in the same instant.
            tokio::time::sleep(Duration::from_millis(20 + u64::from(rand_byte()) % 100)).await;
        }
    }
}

fn rand_byte() -> u8 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    (nanos ^ (nanos >> 8)) as u8
}

/// Which node slot a reconnecting client tries: `first` at first, then each time
/// another slot than the last, drawn at random (xorshift, seeded by `first`), so the
/// clients of a node that went away spread evenly over the others instead of all
/// landing on its neighbour.
pub struct Slots {
    last: Option<usize>,
    first: usize,
    state: u64,
}

impl Slots {
    pub fn new(first: usize) -> Slots {
        Slots {
            last: None,
            first,
            state: (first as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }

    /// A WebSocket connection to the next node of `urls` ([`Slots::pick`]), given
    /// 2 s: its slot and the socket, or `None` after a short pause when the node did
    /// not answer in time.
    pub async fn connect(&mut self, urls: &Urls) -> Option<(usize, Socket)> {
        let (slot, url) = {
            let urls = urls.lock();
            let slot = self.pick(urls.len());
            (slot, urls[slot].clone())
        };
        match tokio::time::timeout(
            Duration::from_secs(2),
            tokio_tungstenite::connect_async(url.as_str()),
        )
        .await
        {
            Ok(Ok((ws, _))) => Some((slot, ws)),
            _ => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                None
            }
        }
    }

    /// The slot to try next, out of `n`.
    pub fn pick(&mut self, n: usize) -> usize {
        let slot = match self.last {
            None => self.first % n,
            Some(_) if n == 1 => 0,
            Some(last) => {
                self.state ^= self.state << 13;
                self.state ^= self.state >> 7;
                self.state ^= self.state << 17;
                (last % n + 1 + (self.state % (n as u64 - 1)) as usize) % n
            }
        };
        self.last = Some(slot);
        slot
    }
}

/// The next JSON frame from a node, waiting at most 200 ms: `None` when nothing (or a
/// frame that is not text) came, `Some(Err(code))` when the connection ended (with
/// the close frame's code, if one came).
pub async fn next_json(ws: &mut Socket) -> Option<Result<Value, Option<u16>>> {
    match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
        Err(_) => None,
        Ok(None) | Ok(Some(Err(_))) => Some(Err(None)),
        Ok(Some(Ok(Message::Text(t)))) => Some(Ok(serde_json::from_str(&t).unwrap())),
        Ok(Some(Ok(Message::Close(c)))) => Some(Err(c.map(|c| u16::from(c.code)))),
        Ok(Some(Ok(_))) => None,
    }
}

/// A configuration file making `chat:*` streams with a history longer than any
/// outage of the fault tests (100,000 publications, 10 minutes).
pub fn chat_streams_config() -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        file.path(),
        "[[namespaces]]\nname = \"chat\"\ntopics = [\"chat:*\"]\nhistory_size = 100000\nhistory_ttl = \"10m\"\n",
    )
    .unwrap();
    file
}

/// The flags every node of the fault tests starts with: `config` (see
/// [`chat_streams_config`]), a short drain, and rate limits no test client reaches.
pub fn fault_node_args(config: &tempfile::NamedTempFile) -> Vec<String> {
    [
        "--config",
        config.path().to_str().unwrap(),
        "--drain-timeout",
        "1s",
        "--rate-limit",
        "100000",
        "--rate-burst",
        "100000",
    ]
    .map(String::from)
    .to_vec()
}

/// The last seq a client's events reached (a message, or a position it was given),
/// without walking them all.
pub fn last_seq(events: &[Event]) -> Option<u64> {
    events.iter().rev().find_map(|e| match e {
        Event::Message(seq, _) => Some(*seq),
        Event::Reset { seq, .. } => Some(*seq),
        Event::Subscribed {
            seq,
            recovered: Some(false) | None,
            ..
        } => Some(*seq),
        _ => None,
    })
}

/// What the check of one client's events found.
#[derive(Default)]
pub struct Verdict {
    /// Where the client ended.
    pub end: Option<(u64, String)>,
    /// What it received of the epoch it ended in: seq → data.
    pub data: HashMap<u64, String>,
    pub delivered: u64,
    /// Publications announced lost (`reset`, or skipped by `recovered:false`).
    pub announced_lost: u64,
    pub resets: u64,
    pub not_recovered: u64,
    pub recovered: u64,
    pub reconnects: u64,
    pub close_codes: Vec<Option<u16>>,
    /// What each announced loss was announced after.
    pub notes: Vec<String>,
}

impl std::fmt::Debug for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verdict")
            .field("end", &self.end)
            .field("delivered", &self.delivered)
            .field("announced_lost", &self.announced_lost)
            .field("resets", &self.resets)
            .field("not_recovered", &self.not_recovered)
            .field("recovered", &self.recovered)
            .field("reconnects", &self.reconnects)
            .field("close_codes", &self.close_codes)
            .field("notes", &self.notes)
            .finish()
    }
}

/// Walks a client's events: every message must be the next seq of the epoch it is in;
/// anything else is a silent gap or a duplicate, and fails.
pub fn check(events: &[Event]) -> Result<Verdict, String> {
    let mut v = Verdict::default();
    let mut at: Option<(u64, String)> = None;
    for (i, e) in events.iter().enumerate() {
        match e {
            Event::Subscribed {
                seq,
                epoch,
                recovered,
            } => match (recovered, &at) {
                (Some(true), Some((last, ep))) => {
                    if ep != epoch || last > seq {
                        return Err(format!("event {i}: recovered from {at:?} at {e:?}"));
                    }
                    v.recovered += 1;
                }
                (Some(true), None) => return Err(format!("event {i}: recovered from nothing")),
                (recovered, _) => {
                    if *recovered == Some(false) {
                        v.not_recovered += 1;
                        v.notes.push(format!("not recovered from {at:?}: {e:?}"));
                        if let Some((last, ep)) = &at {
                            if ep == epoch {
                                v.announced_lost += seq.saturating_sub(*last);
                            } else {
                                v.announced_lost += 1; // at least: another epoch
                            }
                        }
                    }
                    at = Some((*seq, epoch.clone()));
                }
            },
            Event::Message(seq, data) => {
                let Some((last, epoch)) = &mut at else {
                    return Err(format!("event {i}: a message before any subscribed"));
                };
                if *seq != *last + 1 {
                    return Err(format!(
                        "event {i}: seq {seq} after {last}: {} (around: {:?})",
                        if *seq <= *last {
                            "a duplicate"
                        } else {
                            "a silent gap"
                        },
                        &events[i.saturating_sub(3)..(i + 3).min(events.len())]
                    ));
                }
                *last = *seq;
                v.delivered += 1;
                if v.end.as_ref().is_some_and(|(_, ep)| ep != epoch) {
                    v.data.clear(); // only the final epoch is compared with history
                }
                v.end = Some((*seq, epoch.clone()));
                v.data.insert(*seq, data.clone());
            }
            Event::Reset { seq, epoch } => {
                v.resets += 1;
                v.notes.push(format!("reset after {at:?}: {e:?}"));
                if let Some((last, ep)) = &at {
                    if ep == epoch {
                        if seq < last {
                            return Err(format!("event {i}: reset back from {last} to {seq}"));
                        }
                        v.announced_lost += seq - last;
                    } else {
                        v.announced_lost += 1;
                    }
                }
                at = Some((*seq, epoch.clone()));
            }
            Event::Closed(code) => {
                v.reconnects += 1;
                v.close_codes.push(*code);
            }
        }
    }
    v.end = at;
    Ok(v)
}

/// How long [`position`] and [`history`] wait for a node to answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(15);

/// The stream's position `(seq, epoch)`, asked of the first of `nodes` (main
/// listeners) that answers `/api/history` (bounded: panics after 15 s).
pub fn position(nodes: &[SocketAddr], topic: &str) -> (u64, String) {
    let mut found = None;
    let body = json!({"topic": topic, "limit": 0}).to_string();
    assert!(
        wait_until(ANSWER_WITHIN, || {
            found = nodes.iter().find_map(|addr| {
                let (status, text) = blocking(*addr, "POST", "/api/history", &body);
                if status != 200 {
                    return None;
                }
                let v: Value = serde_json::from_str(&text).ok()?;
                Some((v["seq"].as_u64()?, v["epoch"].as_str()?.to_owned()))
            });
            found.is_some()
        }),
        "a node answers /api/history for {topic}"
    );
    found.unwrap()
}

/// The stream's whole history in `end`'s epoch, read from the node at `addr`:
/// seq → data (from where the history starts, if its beginning was trimmed).
pub fn history(addr: SocketAddr, topic: &str, end: &(u64, String)) -> HashMap<u64, String> {
    let mut out = HashMap::new();
    let mut after = 0;
    while after < end.0 {
        let body = json!({"topic": topic, "since": {"seq": after, "epoch": end.1}, "limit": 1000});
        let (status, text) = blocking(addr, "POST", "/api/history", &body.to_string());
        assert_eq!(status, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        let messages = v["messages"].as_array().unwrap();
        if messages.is_empty() {
            break; // the start of this epoch is trimmed: compare what is kept
        }
        for m in messages {
            after = m["seq"].as_u64().unwrap();
            out.insert(after, m["data"].to_string());
        }
    }
    out
}

/// Checks every client's events and compares what each received with the history
/// (`history`, of the final epoch): every client must have reached `end`. Returns the
/// verdicts, or panics naming the first client that failed.
pub fn check_all(
    clients: &[Vec<Event>],
    end: &(u64, String),
    history: &HashMap<u64, String>,
) -> Vec<Verdict> {
    let mut verdicts = Vec::new();
    for (i, events) in clients.iter().enumerate() {
        let v = check(events).unwrap_or_else(|e| panic!("client {i}: {e}"));
        assert_eq!(
            v.end.as_ref(),
            Some(end),
            "client {i} did not reach the end: {v:?}"
        );
        for (seq, data) in &v.data {
            assert_eq!(
                history.get(seq),
                Some(data),
                "client {i}: seq {seq} carried other data than the history's"
            );
        }
        verdicts.push(v);
    }
    verdicts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnects_go_elsewhere_and_spread() {
        let mut counts = [0usize; 4];
        for first in 0..400 {
            let mut s = Slots::new(first);
            let a = s.pick(4);
            assert_eq!(a, first % 4);
            let b = s.pick(4);
            assert_ne!(a, b, "never the slot just left");
            counts[b] += 1;
        }
        assert!(counts.iter().all(|c| *c >= 50), "spread: {counts:?}");
        assert_eq!(Slots::new(3).pick(1), 0);
    }

    #[test]
    fn the_checker_refuses_gaps_and_duplicates_and_accepts_announced_loss() {
        let m = |seq: u64| Event::Message(seq, seq.to_string());
        let sub = |seq, recovered| Event::Subscribed {
            seq,
            epoch: "e".into(),
            recovered,
        };
        let ok = [
            sub(0, None),
            m(1),
            m(2),
            Event::Closed(Some(1001)),
            sub(5, Some(true)),
            m(3),
            m(4),
            m(5),
            Event::Reset {
                seq: 8,
                epoch: "e".into(),
            },
            m(9),
            Event::Closed(None),
            sub(12, Some(false)),
            m(13),
        ];
        let v = check(&ok).unwrap();
        assert_eq!(v.end, Some((13, "e".into())));
        assert_eq!((v.delivered, v.announced_lost, v.resets), (7, 3 + 3, 1));
        assert_eq!(v.data[&13], "13");
        assert_eq!(last_seq(&ok), Some(13));
        assert_eq!(
            last_seq(&ok[..5]),
            Some(2),
            "a recovered position is not reached"
        );
        assert!(check(&[sub(0, None), m(2)]).is_err(), "gap");
        assert!(check(&[sub(0, None), m(1), m(1)]).is_err(), "duplicate");
        assert!(check(&[m(1)]).is_err(), "a message before subscribed");
        assert!(
            check(&[sub(3, None), Event::Closed(None), sub(1, Some(true))]).is_err(),
            "recovered backwards"
        );
    }
}
