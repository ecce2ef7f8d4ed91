//! `GET /sse` (docs/protocol.md, "Server-Sent Events"): refusals, the event stream,
//! heartbeats, the final event, slow consumers, the server API, and resuming streams
//! with `Last-Event-ID` — a real gateway on 127.0.0.1:0, a plain HTTP/1.1 client
//! reading the chunked body.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wsgate_fanout::{Namespace, Namespaces, Node, Pattern, SlowConsumer, StreamOptions};
use wsgate_gateway::security::Security;
use wsgate_gateway::Gateway;
use wsgate_metrics::Metrics;
use wsgate_testkit::gateway::jwt::{hs256, now, SECRET};
use wsgate_testkit::gateway::{start, start_gateway, TestServer};
use wsgate_testkit::http::{http, http_json};

const WITHIN: Duration = Duration::from_secs(10);

/// One thing read from an event stream.
#[derive(Debug, PartialEq)]
enum Item {
    Event {
        event: Option<String>,
        id: Option<String>,
        retry: Option<u64>,
        data: String,
    },
    Comment(String),
    End,
}

impl Item {
    fn json(&self) -> Value {
        match self {
            Item::Event { data, .. } => serde_json::from_str(data).expect("data is JSON"),
            other => panic!("expected an event, got {other:?}"),
        }
    }
    fn id(&self) -> Option<String> {
        match self {
            Item::Event { id, .. } => id.clone(),
            _ => None,
        }
    }
}

/// A minimal SSE client: HTTP/1.1, a chunked body, events split per the SSE spec.
struct Sse {
    stream: TcpStream,
    status: u16,
    head: String,
    /// Undecoded body bytes (chunked framing included).
    raw: Vec<u8>,
    /// Decoded body text not yet parsed into items.
    text: String,
    ended: bool,
}

impl Sse {
    async fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Sse {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut req =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        let end = loop {
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(WITHIN, stream.read(&mut buf))
                .await
                .expect("response head in time")
                .unwrap();
            assert!(n > 0, "connection closed before the response head");
            raw.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..end]).into_owned();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let raw = raw[end + 4..].to_vec();
        Sse {
            stream,
            status,
            head: head.to_ascii_lowercase(),
            raw,
            text: String::new(),
            ended: false,
        }
    }

    /// The body of a refusal (which has a Content-Length).
    async fn body(mut self) -> Value {
        let len: usize = self
            .head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .expect("content-length")
            .trim()
            .parse()
            .unwrap();
        while self.raw.len() < len {
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(WITHIN, self.stream.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0);
            self.raw.extend_from_slice(&buf[..n]);
        }
        serde_json::from_slice(&self.raw[..len]).unwrap()
    }

    /// Moves whole chunks from `raw` to `text`.
    fn dechunk(&mut self) {
        loop {
            let Some(eol) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let size =
                usize::from_str_radix(std::str::from_utf8(&self.raw[..eol]).unwrap().trim(), 16)
                    .unwrap();
            if size == 0 {
                self.ended = true;
                return;
            }
            if self.raw.len() < eol + 2 + size + 2 {
                return;
            }
            let chunk = self.raw[eol + 2..eol + 2 + size].to_vec();
            self.text.push_str(std::str::from_utf8(&chunk).unwrap());
            self.raw.drain(..eol + 2 + size + 2);
        }
    }

    /// The next event or comment, or `End` when the response ended.
    async fn next(&mut self) -> Item {
        self.next_within(WITHIN).await.expect("an SSE item in time")
    }

    async fn next_within(&mut self, within: Duration) -> Option<Item> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            self.dechunk();
            if let Some(i) = self.text.find("\n\n") {
                let block: String = self.text.drain(..i + 2).collect();
                return Some(parse_block(block.trim_end_matches('\n')));
            }
            if self.ended {
                return Some(Item::End);
            }
            let mut buf = [0u8; 16384];
            let n = match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Err(_) => return None,
                Ok(Ok(n)) => n,
                Ok(Err(_)) => 0,
            };
            if n == 0 {
                return Some(Item::End);
            }
            self.raw.extend_from_slice(&buf[..n]);
        }
    }

    /// The next event, skipping heartbeat comments.
    async fn event(&mut self) -> Item {
        loop {
            match self.next().await {
                Item::Comment(_) => continue,
                other => return other,
            }
        }
    }
}

fn parse_block(block: &str) -> Item {
    let mut event = None;
    let mut id = None;
    let mut retry = None;
    let mut data: Vec<&str> = Vec::new();
    let mut comment = None;
    for line in block.split('\n') {
        if let Some(c) = line.strip_prefix(':') {
            comment = Some(c.trim().to_owned());
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event = Some(value.to_owned()),
            "id" => id = Some(value.to_owned()),
            "retry" => retry = Some(value.parse().unwrap()),
            "data" => data.push(value),
            other => panic!("unexpected field {other:?} in {block:?}"),
        }
    }
    if data.is_empty() && event.is_none() && id.is_none() {
        return Item::Comment(comment.unwrap_or_default());
    }
    Item::Event {
        event,
        id,
        retry,
        data: data.join("\n"),
    }
}

async fn publish(s: &TestServer, topic: &str, data: Value) -> Value {
    let (st, body) = http_json(
        s.addr,
        "POST",
        "/api/publish",
        &json!({"topic":topic,"data":data}).to_string(),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// A gateway whose `chat:*` topics are streams, with `policy` for slow consumers.
async fn start_streams(args: &[&str], policy: SlowConsumer) -> TestServer {
    let cfg = wsgate_testkit::gateway::config(args);
    let namespaces = Namespaces::new(vec![Namespace {
        name: "chat".into(),
        topics: vec![Pattern::parse("chat:*").unwrap()],
        stream: Some(StreamOptions {
            history_size: 100,
            history_ttl: Duration::from_secs(600),
        }),
        slow_consumer: policy,
        ..Default::default()
    }])
    .unwrap();
    let node = Node::in_memory_with(
        Metrics::default(),
        cfg.max_publication_size(),
        namespaces,
        1 << 24,
    );
    let security = Security::from_config(&cfg).unwrap();
    start_gateway(Gateway::new(cfg, node, security)).await
}

#[tokio::test]
async fn welcome_subscribed_messages_and_heartbeat_comments() {
    let s = start(&["--heartbeat-interval", "1s"]).await;
    let mut sse = Sse::open(s.addr, "/sse?topics=news,sport", &[]).await;
    assert_eq!(sse.status, 200);
    assert!(
        sse.head.contains("content-type: text/event-stream"),
        "{}",
        sse.head
    );
    assert!(sse.head.contains("cache-control: no-cache"), "{}", sse.head);
    assert!(
        sse.head.contains("transfer-encoding: chunked"),
        "{}",
        sse.head
    );
    let welcome = sse.event().await;
    assert_eq!(welcome.json()["op"], "welcome");
    assert_eq!(welcome.id(), None);
    let sub = sse.event().await;
    assert_eq!(sub.json()["op"], "subscribed");
    assert_eq!(sub.json()["topics"], json!(["news", "sport"]));
    assert_eq!(sub.id(), None, "no stream: no id");
    assert_eq!(
        s.metric("wsgate_transport_connections{compression=\"none\",transport=\"sse\"}")
            .await,
        1.0
    );
    // Pretty-printed data keeps its line breaks: one `data:` field per line.
    let (st, _) = http_json(
        s.addr,
        "POST",
        "/api/publish",
        "{\"topic\":\"news\",\"data\":{\n  \"n\": 1\n}}",
    )
    .await;
    assert_eq!(st, 200);
    let m = sse.event().await;
    assert_eq!(m.json()["op"], "message");
    assert_eq!(m.json()["topic"], "news");
    assert_eq!(m.json()["data"], json!({"n":1}));
    assert_eq!(m.id(), None);
    // Heartbeats are comments.
    let mut pinged = false;
    for _ in 0..5 {
        if let Some(Item::Comment(c)) = sse.next_within(Duration::from_secs(3)).await {
            assert_eq!(c, "ping");
            pinged = true;
            break;
        }
    }
    assert!(pinged, "a heartbeat comment within the heartbeat interval");
    assert!(s.metric("wsgate_sse_events_total").await >= 3.0);
    assert!(s.metric("wsgate_sse_bytes_sent_total").await > 100.0);
    drop(sse);
    // The session ends when the client goes (its next write fails).
    let deadline = tokio::time::Instant::now() + WITHIN;
    while s
        .metric("wsgate_transport_connections{compression=\"none\",transport=\"sse\"}")
        .await
        != 0.0
    {
        assert!(tokio::time::Instant::now() < deadline, "session not ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn refusals_are_plain_http_with_json_errors() {
    let s = start(&["--max-connections-per-ip", "1", "--max-connections", "5"]).await;
    let bad = Sse::open(s.addr, "/sse?topics=a%20b", &[]).await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.body().await["error"], "invalid_topic");
    let bad = Sse::open(s.addr, "/sse?topics=a", &[("Last-Event-ID", "nonsense")]).await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.body().await["error"], "bad_request");
    let bad = Sse::open(s.addr, "/sse?topics=a&since=v1.e30x", &[]).await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.body().await["error"], "bad_request");
    // A well-formed id whose entry breaks the `since` rules.
    let id = format!(
        "v1.{}",
        base64_url(r#"{"a":{"seq":-1,"epoch":"x"}}"#.as_bytes())
    );
    let bad = Sse::open(s.addr, &format!("/sse?topics=a&since={id}"), &[]).await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.body().await["error"], "bad_request");
    // Per-IP limit: the first stream holds the address's only slot.
    let mut first = Sse::open(s.addr, "/sse?topics=a", &[]).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.event().await.json()["op"], "welcome");
    let second = Sse::open(s.addr, "/sse?topics=a", &[]).await;
    assert_eq!(second.status, 429);
    assert_eq!(second.body().await["error"], "per_ip_limit");
    // Wrong method.
    let (st, _) = http(s.addr, "POST", "/sse?topics=a", &[], b"").await;
    assert_eq!(st, 405);
    drop(first);

    // Draining: 503. A WebSocket client that does not answer its close keeps the
    // draining node up (for the close handshake's grace) while the stream is refused.
    let open = "wsgate_transport_connections{compression=\"none\",transport=\"sse\"}";
    let deadline = tokio::time::Instant::now() + WITHIN;
    while s.metric(open).await != 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "first stream still open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ws = s.connect().await;
    let (st, _) = http(s.admin, "POST", "/drain", &[], b"").await;
    assert_eq!(st, 202);
    let r = Sse::open(s.addr, "/sse?topics=a", &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.body().await["error"], "draining");
}

fn base64_url(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut s = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..=c.len() {
            s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    s
}

#[tokio::test]
async fn tokens_acls_and_server_only_namespaces_are_checked_before_the_stream() {
    let s = start(&["--jwt-secret", SECRET, "--jwt-leeway", "0s"]).await;
    let r = Sse::open(s.addr, "/sse?topics=a", &[]).await;
    assert_eq!(r.status, 401);
    assert!(r.head.contains("www-authenticate: bearer"), "{}", r.head);
    assert_eq!(r.body().await["error"], "auth_missing");
    let token = hs256(&json!({"sub":"u1","exp":now()+600,"subscribe":["a"]}));
    let r = Sse::open(s.addr, &format!("/sse?topics=b&token={token}"), &[]).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.body().await["error"], "forbidden");
    // The header works as on /ws.
    let bearer = format!("Bearer {token}");
    let mut ok = Sse::open(s.addr, "/sse?topics=a", &[("Authorization", &bearer)]).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.event().await.json()["op"], "welcome");
    assert_eq!(ok.event().await.json()["topics"], json!(["a"]));
}

#[tokio::test]
async fn drain_and_server_api_end_the_stream_with_a_close_event() {
    let s = start(&["--drain-timeout", "300ms"]).await;
    let mut a = Sse::open(s.addr, "/sse?topics=t", &[]).await;
    let session = a.event().await.json()["session"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(a.event().await.json()["op"], "subscribed");
    let mut b = Sse::open(s.addr, "/sse?topics=t", &[]).await;
    assert_eq!(b.event().await.json()["op"], "welcome");
    assert_eq!(b.event().await.json()["op"], "subscribed");

    // The server API's subscribe reaches the SSE session like a WebSocket one.
    let (st, body) = http_json(
        s.addr,
        "POST",
        "/api/subscribe",
        &json!({"session":session,"topics":["extra"]}).to_string(),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let sub = a.event().await.json();
    assert_eq!(sub, json!({"op":"subscribed","id":null,"topics":["extra"]}));
    publish(&s, "extra", json!("pushed")).await;
    assert_eq!(a.event().await.json()["data"], "pushed");

    let (st, body) = http_json(
        s.addr,
        "POST",
        "/api/disconnect",
        &json!({"session":session}).to_string(),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let close = a.event().await;
    match &close {
        Item::Event { event, .. } => assert_eq!(event.as_deref(), Some("close")),
        other => panic!("{other:?}"),
    }
    assert_eq!(close.json()["op"], "close");
    assert_eq!(close.json()["code"], 4010);
    assert_eq!(a.event().await, Item::End);

    let (st, _) = http(s.admin, "POST", "/drain", &[], b"").await;
    assert_eq!(st, 202);
    let close = b.event().await;
    assert_eq!(close.json()["op"], "close");
    assert_eq!(close.json()["code"], 1001);
    assert_eq!(b.event().await, Item::End);
    assert_eq!(
        s.metric("wsgate_disconnects_total{reason=\"drain\"}").await,
        1.0
    );
    assert_eq!(
        s.metric("wsgate_disconnects_total{reason=\"server_disconnect\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_stream_resumes_from_last_event_id_without_a_gap() {
    let s = start_streams(&[], SlowConsumer::Disconnect).await;
    let mut sse = Sse::open(s.addr, "/sse?topics=chat:1,news", &[]).await;
    assert_eq!(sse.event().await.json()["op"], "welcome");
    let sub = sse.event().await;
    let streams = &sub.json()["streams"];
    assert_eq!(streams["chat:1"]["seq"], 0, "{streams}");
    assert!(sub.id().unwrap().starts_with("v1."), "a position: an id");
    for n in 1..=3 {
        publish(&s, "chat:1", json!({"n":n})).await;
    }
    publish(&s, "news", json!("plain")).await;
    let mut ids = Vec::new();
    for n in 1..=3u64 {
        let m = sse.event().await;
        assert_eq!(m.json()["seq"], n);
        ids.push(m.id().expect("a stream message has an id"));
    }
    let plain = sse.event().await;
    assert_eq!(plain.json()["topic"], "news");
    assert_eq!(plain.id(), None, "a plain topic's message has no id");
    drop(sse);
    for n in 4..=6 {
        publish(&s, "chat:1", json!({"n":n})).await;
    }
    // Resume after seq 2, as a browser would.
    let mut again = Sse::open(
        s.addr,
        "/sse?topics=chat:1,news",
        &[("Last-Event-ID", &ids[1])],
    )
    .await;
    assert_eq!(again.status, 200);
    assert_eq!(again.event().await.json()["op"], "welcome");
    let sub = again.event().await.json();
    assert_eq!(sub["streams"]["chat:1"]["recovered"], true, "{sub}");
    assert_eq!(sub["streams"]["chat:1"]["seq"], 6, "{sub}");
    for n in 3..=6u64 {
        let m = again.event().await;
        assert_eq!(m.json()["seq"], n, "every seq once, in order");
        assert_eq!(m.json()["data"]["n"], n);
    }
    publish(&s, "chat:1", json!({"n":7})).await;
    let m = again.event().await;
    assert_eq!(m.json()["seq"], 7);
    let last = m.id().unwrap();
    drop(again);
    // The same position in the URL (a client reconnecting by hand).
    let mut by_hand = Sse::open(s.addr, &format!("/sse?topics=chat:1&since={last}"), &[]).await;
    assert_eq!(by_hand.event().await.json()["op"], "welcome");
    let sub = by_hand.event().await.json();
    assert_eq!(sub["streams"]["chat:1"]["recovered"], true, "{sub}");
    publish(&s, "chat:1", json!({"n":8})).await;
    assert_eq!(by_hand.event().await.json()["seq"], 8);
}

#[tokio::test]
async fn a_client_that_does_not_read_is_a_slow_consumer() {
    let s = start(&["--outbound-queue-bytes", "64KiB"]).await;
    let mut sse = Sse::open(s.addr, "/sse?topics=flood", &[]).await;
    assert_eq!(sse.event().await.json()["op"], "welcome");
    assert_eq!(sse.event().await.json()["op"], "subscribed");
    // Stop reading: the socket, then hyper, then the queue fill up.
    let big = "x".repeat(8 * 1024);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    while s
        .metric("wsgate_disconnects_total{reason=\"slow_consumer\"}")
        .await
        == 0.0
    {
        assert!(tokio::time::Instant::now() < deadline, "not closed 4008");
        for _ in 0..50 {
            publish(&s, "flood", json!(big)).await;
            n += 1;
        }
    }
    assert!(n > 0);
    // The stream then ends (after what was already in the socket).
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        assert!(tokio::time::Instant::now() < deadline, "stream did not end");
        match sse.next().await {
            Item::End => break,
            Item::Event { event: Some(e), .. } => assert_eq!(e, "close"),
            _ => {}
        }
    }
}

#[tokio::test]
async fn drop_oldest_streams_get_a_reset_with_an_id() {
    // The policy of the topic's namespace applies to SSE sessions as to /ws ones.
    let s = start_streams(
        &["--outbound-queue-bytes", "64KiB"],
        SlowConsumer::DropOldest,
    )
    .await;
    let mut sse = Sse::open(s.addr, "/sse?topics=chat:9", &[]).await;
    assert_eq!(sse.event().await.json()["op"], "welcome");
    assert_eq!(sse.event().await.json()["op"], "subscribed");
    let big = "y".repeat(8 * 1024);
    let mut n = 0u64;
    let mut reset = None;
    // Publish without reading until the queue overflows, then read it all.
    while s
        .metric("wsgate_messages_dropped_total{reason=\"drop_oldest\"}")
        .await
        == 0.0
        && n < 3000
    {
        for _ in 0..50 {
            publish(&s, "chat:9", json!(big)).await;
            n += 1;
        }
    }
    let mut last = 0;
    while last < n {
        let e = sse.event().await;
        let v = e.json();
        assert!(e.id().is_some(), "positions carry ids: {v}");
        match v["op"].as_str().unwrap() {
            "reset" => {
                reset = Some(v["seq"].as_u64().unwrap());
                last = v["seq"].as_u64().unwrap();
            }
            "message" => {
                let seq = v["seq"].as_u64().unwrap();
                assert_eq!(seq, last + 1, "no silent gap");
                last = seq;
            }
            other => panic!("{other}"),
        }
    }
    assert!(reset.is_some(), "a reset announced the dropped run");
}

#[tokio::test]
async fn a_drain_with_a_reconnect_hint_sets_the_retry_field() {
    // 10 upgrades/s and a drain that closes everyone at once: the close reasons carry
    // `retry=` hints, which the final events repeat as `retry:`.
    let s = start(&[
        "--drain-timeout",
        "0s",
        "--upgrade-rate",
        "10",
        "--upgrade-burst",
        "10",
    ])
    .await;
    let mut streams = Vec::new();
    for _ in 0..4 {
        let mut sse = Sse::open(s.addr, "/sse?topics=t", &[]).await;
        assert_eq!(sse.status, 200);
        let welcome = sse.event().await.json();
        assert!(welcome["reconnect_ms"].is_u64(), "{welcome}");
        streams.push(sse);
    }
    let (st, _) = http(s.admin, "POST", "/drain", &[], b"").await;
    assert_eq!(st, 202);
    let mut retries = Vec::new();
    for sse in streams.iter_mut() {
        let close = loop {
            match sse.event().await {
                e @ Item::Event { event: Some(_), .. } => break e,
                Item::End => panic!("no close event"),
                _ => continue,
            }
        };
        let Item::Event { retry, data, .. } = &close else {
            unreachable!()
        };
        let v: Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["code"], 1001);
        let reason = v["reason"].as_str().unwrap();
        let hint: Option<u64> = reason
            .rsplit_once("retry=")
            .map(|(_, ms)| ms.parse().unwrap());
        assert_eq!(*retry, hint, "retry: repeats the reason's hint ({reason})");
        retries.extend(*retry);
    }
    assert!(!retries.is_empty(), "some closes carry a hint");
}

#[tokio::test]
async fn a_client_that_goes_away_ends_its_session_before_any_write() {
    // The default 25 s heartbeat: nothing is written while the test waits.
    let s = start(&[]).await;
    let mut sse = Sse::open(s.addr, "/sse?topics=quiet", &[]).await;
    assert_eq!(sse.event().await.json()["op"], "welcome");
    assert_eq!(sse.event().await.json()["op"], "subscribed");
    let open = "wsgate_transport_connections{compression=\"none\",transport=\"sse\"}";
    assert_eq!(s.metric(open).await, 1.0);
    drop(sse);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while s.metric(open).await != 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the session outlived its client"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        s.metric("wsgate_disconnects_total{reason=\"client_gone\"}")
            .await,
        1.0
    );
}
