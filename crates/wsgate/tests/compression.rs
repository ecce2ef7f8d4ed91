//! permessage-deflate (RFC 7692) on `/ws`, against a real `wsgate` process: what
//! the handshake negotiates, frames read raw off the socket (RSV1, sizes, one
//! compressed frame shared by every compressing subscriber), compressed client
//! messages, the decompression-bomb bound, and clients nobody here wrote (Python
//! `websockets`) compressed and not on one topic.

use std::time::Duration;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wsgate_testkit::process::Node;
use wsgate_testkit::ws::client_frame;

const WITHIN: Duration = Duration::from_secs(5);
const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];
const ACCEPTED: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// A handshake on `/ws` offering `extensions` (if any): the stream, right after the
/// `101` head, and the head's `Sec-WebSocket-Extensions` value (if any).
async fn handshake(node: &Node, extensions: Option<&str>) -> (TcpStream, Option<String>) {
    let mut s = TcpStream::connect(node.addr).await.unwrap();
    let offer = extensions.map_or(String::new(), |e| {
        format!("Sec-WebSocket-Extensions: {e}\r\n")
    });
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n",
        node.addr
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    tokio::time::timeout(WITHIN, async {
        while !head.ends_with(b"\r\n\r\n") {
            head.push(s.read_u8().await.unwrap());
        }
    })
    .await
    .expect("a handshake response in time");
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let ext = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("sec-websocket-extensions")
            .then(|| v.trim().to_string())
    });
    (s, ext)
}

/// One server frame: its first byte (FIN, RSV1, opcode) and its payload.
async fn frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    tokio::time::timeout(WITHIN, async {
        let b0 = s.read_u8().await.unwrap();
        let len = match s.read_u8().await.unwrap() & 0x7f {
            126 => usize::from(s.read_u16().await.unwrap()),
            127 => s.read_u64().await.unwrap() as usize,
            n => usize::from(n),
        };
        let mut p = vec![0; len];
        s.read_exact(&mut p).await.unwrap();
        (b0, p)
    })
    .await
    .expect("a frame in time")
}

/// The payload of the next text frame, inflated when RSV1 says so.
async fn text(s: &mut TcpStream) -> Value {
    let (b0, p) = frame(s).await;
    assert_eq!(b0 & 0x0f, 1, "a text frame");
    let p = if b0 & 0x40 != 0 { inflate(&p) } else { p };
    serde_json::from_slice(&p).unwrap()
}

fn inflate(data: &[u8]) -> Vec<u8> {
    let mut input = data.to_vec();
    input.extend_from_slice(&TAIL);
    let mut out = Vec::with_capacity(1 << 20);
    Decompress::new(false)
        .decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .unwrap();
    out
}

/// One permessage-deflate message: raw DEFLATE, sync-flushed, tail removed.
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 64);
    Compress::new(Compression::default(), false)
        .compress_vec(data, &mut out, FlushCompress::Sync)
        .unwrap();
    assert!(out.ends_with(&TAIL));
    out.truncate(out.len() - 4);
    out
}

/// A client text frame, compressed (RSV1 set).
fn compressed_frame(text: &[u8]) -> Vec<u8> {
    let mut f = client_frame(true, 1, &deflate(text));
    f[0] |= 0x40;
    f
}

/// Subscribes to `topic` (the command sent compressed when `compress`).
async fn subscribe(s: &mut TcpStream, topic: &str, compress: bool) {
    let welcome = text(s).await;
    assert_eq!(welcome["op"], "welcome");
    let cmd = json!({"op": "subscribe", "id": 1, "topics": [topic]}).to_string();
    let f = if compress {
        compressed_frame(cmd.as_bytes())
    } else {
        client_frame(true, 1, cmd.as_bytes())
    };
    s.write_all(&f).await.unwrap();
    let reply = text(s).await;
    assert_eq!(
        (reply["op"].as_str(), reply["id"].as_u64()),
        (Some("subscribed"), Some(1))
    );
}

/// The close code of the close frame that comes next (skipping other frames).
async fn close_code(s: &mut TcpStream) -> u16 {
    loop {
        let (b0, p) = frame(s).await;
        if b0 & 0x0f == 8 {
            return u16::from_be_bytes([p[0], p[1]]);
        }
    }
}

/// About 1 KiB of typical JSON: an array of quotes.
fn quotes() -> String {
    let rows: Vec<Value> = (0..15)
        .map(|i| json!({"symbol": format!("SYM{i}"), "bid": 100.25 + i as f64, "ask": 100.5 + i as f64, "volume": 1000 * i, "venue": "XNAS"}))
        .collect();
    Value::from(rows).to_string()
}

fn series(m: &std::collections::HashMap<String, f64>, name: &str, has: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(name) && k.contains(has))
        .map(|(_, v)| *v)
        .sum()
}

#[tokio::test]
async fn one_compressed_frame_is_shared_and_plain_clients_get_the_plain_one() {
    let node = Node::start(None, &[]);
    let (mut z1, e1) = handshake(&node, Some("permessage-deflate")).await;
    let (mut z2, e2) = handshake(
        &node,
        Some("permessage-deflate; client_max_window_bits; server_no_context_takeover"),
    )
    .await;
    let (mut plain, e3) = handshake(&node, None).await;
    assert_eq!(e1.as_deref(), Some(ACCEPTED));
    assert_eq!(
        e2.as_deref(),
        Some(ACCEPTED),
        "client_max_window_bits is accepted"
    );
    assert_eq!(e3, None, "no offer, no extension");
    subscribe(&mut z1, "ticks", false).await;
    subscribe(&mut z2, "ticks", true).await;
    subscribe(&mut plain, "ticks", false).await;

    let data = quotes();
    assert!(data.len() > 900, "{}", data.len());
    node.publish("ticks", &data).await;
    let (b1, p1) = frame(&mut z1).await;
    let (b2, p2) = frame(&mut z2).await;
    let (b3, p3) = frame(&mut plain).await;
    assert_eq!(
        (b1, b2, b3),
        (0xC1, 0xC1, 0x81),
        "RSV1 only where negotiated"
    );
    assert_eq!(p1, p2, "every compressing subscriber gets the same bytes");
    assert_eq!(
        inflate(&p1),
        p3,
        "the compressed frame inflates to the plain one"
    );
    let v: Value = serde_json::from_slice(&p3).unwrap();
    assert_eq!(v["data"], serde_json::from_str::<Value>(&data).unwrap());
    println!(
        "1 KiB JSON: {} bytes plain, {} compressed",
        p3.len(),
        p1.len()
    );
    assert!(
        p1.len() * 10 <= p3.len() * 4,
        "compressed to at most 40%: {} of {}",
        p1.len(),
        p3.len()
    );

    // Under the threshold: plain for everyone.
    node.publish("ticks", r#"{"n":1}"#).await;
    assert_eq!(frame(&mut z1).await.0, 0x81);
    assert_eq!(frame(&mut plain).await.0, 0x81);

    // A compressed publish from a client reaches both kinds of subscriber intact.
    let big = json!({"op": "publish", "topic": "ticks", "data": {"q": data}}).to_string();
    z2.write_all(&compressed_frame(big.as_bytes()))
        .await
        .unwrap();
    for s in [&mut z1, &mut plain] {
        let v = loop {
            let v = text(s).await;
            if v["op"] == "message" {
                break v;
            }
        };
        assert_eq!(v["data"]["q"], data);
    }

    node.eventually(
        "connections by compression and the compression totals",
        |m| {
            let deflate = series(m, "wsgate_transport_connections{", "\"deflate\"");
            let none = series(m, "wsgate_transport_connections{", "\"none\"");
            let bytes_in = series(m, "wsgate_compression_bytes_in_total", "");
            let bytes_out = series(m, "wsgate_compression_bytes_out_total", "");
            deflate == 2.0 && none == 1.0 && bytes_out > 0.0 && bytes_in > 2.0 * bytes_out
        },
    )
    .await;
}

#[tokio::test]
async fn negotiation_edge_cases() {
    let node = Node::start(None, &[]);
    // Offers the RFC says to decline: the upgrade still succeeds, uncompressed.
    for bad in [
        "permessage-deflate; unknown_param",
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; client_max_window_bits=7",
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
        "permessage-deflate; client_no_context_takeover=yes",
        "x-webkit-deflate-frame",
    ] {
        let (_s, ext) = handshake(&node, Some(bad)).await;
        assert_eq!(ext, None, "{bad} is declined");
    }
    // A declined offer, then one that is accepted.
    let (_s, ext) = handshake(
        &node,
        Some("permessage-deflate; foo, permessage-deflate; client_max_window_bits=10"),
    )
    .await;
    assert_eq!(ext.as_deref(), Some(ACCEPTED));

    // A smaller server window is echoed; publications then go out uncompressed.
    let (mut small, ext) =
        handshake(&node, Some("permessage-deflate; server_max_window_bits=10")).await;
    assert_eq!(
        ext.as_deref(),
        Some(&*format!("{ACCEPTED}; server_max_window_bits=10"))
    );
    subscribe(&mut small, "w", true).await;
    node.publish("w", &quotes()).await;
    assert_eq!(frame(&mut small).await.0, 0x81);

    // RSV1 without the extension, and on a control frame with it: 1002.
    let (mut plain, _) = handshake(&node, None).await;
    plain
        .write_all(&compressed_frame(br#"{"op":"ping"}"#))
        .await
        .unwrap();
    assert_eq!(close_code(&mut plain).await, 1002);
    let (mut z, _) = handshake(&node, Some("permessage-deflate")).await;
    let mut ping = client_frame(true, 9, b"");
    ping[0] |= 0x40;
    z.write_all(&ping).await.unwrap();
    assert_eq!(close_code(&mut z).await, 1002);
    // RSV1 on a continuation: 1002 too.
    let (mut z, _) = handshake(&node, Some("permessage-deflate")).await;
    let packed = deflate(br#"{"op":"ping","id":1}"#);
    let mut first = client_frame(false, 1, &packed[..2]);
    first[0] |= 0x40;
    let mut cont = client_frame(true, 0, &packed[2..]);
    cont[0] |= 0x40;
    z.write_all(&[first, cont].concat()).await.unwrap();
    assert_eq!(close_code(&mut z).await, 1002);

    // Compression off: offers are ignored.
    let off = Node::start(None, &["--compression", "false"]);
    let (_s, ext) = handshake(&off, Some("permessage-deflate")).await;
    assert_eq!(ext, None);
}

/// Peak resident memory of a process (`VmHWM`), in KiB.
fn peak_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn a_decompression_bomb_closes_1009_before_memory_grows() {
    let node = Node::start(None, &["--max-message-size", "64KiB"]);
    let (mut z, _) = handshake(&node, Some("permessage-deflate")).await;
    assert_eq!(text(&mut z).await["op"], "welcome");
    // 256 MiB of zeros compress to about 256 KiB: split into fragments under the
    // limit that together are over it would be refused before inflating, so the
    // bomb is one frame that fits: 48 MiB, about 48 KiB compressed.
    let zeros = vec![b' '; 48 << 20];
    let bomb = deflate(&zeros);
    drop(zeros);
    assert!(bomb.len() < 64 << 10, "{} bytes", bomb.len());
    let before = peak_kib(node.pid());
    let mut f = client_frame(true, 1, &bomb);
    f[0] |= 0x40;
    z.write_all(&f).await.unwrap();
    assert_eq!(close_code(&mut z).await, 1009);
    let after = peak_kib(node.pid());
    println!("peak RSS {before} KiB before the bomb, {after} KiB after");
    assert!(
        after < before + 16 * 1024,
        "peak RSS grew from {before} KiB to {after} KiB"
    );
    // The node is fine.
    let (mut ok, _) = handshake(&node, Some("permessage-deflate")).await;
    assert_eq!(text(&mut ok).await["op"], "welcome");
}

/// Python `websockets` offers permessage-deflate by default: a compressing client
/// and one with compression off, subscribed to one topic, both get what a
/// compressing client publishes, intact.
#[tokio::test]
async fn python_websockets_with_and_without_compression() {
    let node = Node::start(None, &[]);
    let code = r#"
import asyncio, json, sys, websockets

async def next_op(ws, op):
    while True:
        v = json.loads(await ws.recv())
        if v["op"] == op:
            return v

async def main():
    url = sys.argv[1]
    async with websockets.connect(url) as z, websockets.connect(url, compression=None) as p:
        ext = z.response.headers.get("Sec-WebSocket-Extensions", "")
        assert ext.startswith("permessage-deflate"), ext
        assert "Sec-WebSocket-Extensions" not in p.response.headers
        for ws in (z, p):
            await next_op(ws, "welcome")
            await ws.send(json.dumps({"op": "subscribe", "id": 1, "topics": ["py"]}))
            await asyncio.wait_for(next_op(ws, "subscribed"), 5)
        data = {"rows": [{"i": i, "name": "row %d" % i, "ok": True} for i in range(100)]}
        await z.send(json.dumps({"op": "publish", "id": 2, "topic": "py", "data": data}))
        for ws in (z, p):
            m = await asyncio.wait_for(next_op(ws, "message"), 5)
            assert m["data"] == data, m
        print("ok")

asyncio.run(main())
"#;
    let out = tokio::process::Command::new("python3")
        .args(["-c", code, &node.ws_url()])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("the python client finished in time")
        .expect("python3 runs");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "python client failed (is `websockets` installed?): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    node.eventually("a compressed delivery", |m| {
        series(m, "wsgate_compression_bytes_out_total", "") > 0.0
    })
    .await;
}
