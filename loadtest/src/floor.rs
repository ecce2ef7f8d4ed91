//! `floor`: what the fan-out workload costs this machine's kernel alone, with no
//! WebSocket server and no generator in the way.
//!
//! The same shape as `fanout` (N subscriber sockets, one publication fanned out to all
//! of them R times a second, each delivery a WebSocket text frame of the same payload
//! size), but the "server" is W plain threads writing pre-built frames into blocking
//! loopback TCP sockets, and the "clients" are C threads reading them through epoll and
//! taking the latency from the stamp in each frame. Everything a real server and
//! generator add — parsing, JSON, topic lookup, per-connection tasks, wake-ups — is
//! missing, so this is the yardstick for any server on the same machine: one that
//! does all that work can at best come close to it (a better-ordered sweep than these
//! plain threads' may gain a little, within the machine's noise).
//!
//! The writers batch the way an ideal server would: when they fall behind, every
//! publication that is due goes into one write per socket. Each publication is stamped
//! with the time it was *due* (not when a writer got to it), so queueing in the writers
//! counts as latency, exactly as a publisher's send time does in `fanout`.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::Args;
use hdrhistogram::Histogram;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use serde::Serialize;

use crate::net::{parse_source_addrs, Dialer};
use crate::report::Latency;
use crate::stats::new_hist;
use crate::sysmon;

#[derive(Debug, Clone, Args)]
pub struct FloorArgs {
    /// Subscriber sockets (each is two file descriptors in this one process).
    #[arg(long, default_value_t = 2000)]
    pub sockets: usize,
    /// Publications per second; each goes to every socket.
    #[arg(long, default_value_t = 250.0)]
    pub rate: f64,
    /// Bytes of payload per delivery (the frame adds its WebSocket header).
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Writer threads (the server's cores).
    #[arg(long, default_value_t = 2)]
    pub writers: usize,
    /// Reader threads (the clients' cores).
    #[arg(long, default_value_t = 2)]
    pub readers: usize,
    /// Length of the publishing phase.
    #[arg(long, value_parser = crate::cli::duration, default_value = "10s")]
    pub duration: Duration,
    /// Excluded from the steady window at the start.
    #[arg(long, value_parser = crate::cli::duration, default_value = "2s")]
    pub warmup: Duration,
    /// At most this many due publications go into one write.
    #[arg(long, default_value_t = 256)]
    pub max_batch: usize,
    /// Source addresses for the client sockets: `127.0.0.2-127.0.0.9` or a list.
    #[arg(long)]
    pub source_addrs: Option<String>,
    /// Write the JSON result here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// What a floor run measured.
#[derive(Debug, Serialize)]
pub struct FloorReport {
    pub scenario: &'static str,
    pub sockets: usize,
    pub rate: f64,
    pub payload: usize,
    pub frame_bytes: usize,
    pub writers: usize,
    pub readers: usize,
    pub duration_s: f64,
    pub offered_per_s: f64,
    /// Deliveries of publications due in the steady window, per second.
    pub delivered_per_s: f64,
    pub expected: u64,
    pub delivered: u64,
    /// write() calls per second and deliveries per write (> 1 when the writers
    /// fell behind and batched).
    pub writes_per_s: f64,
    pub deliveries_per_write: f64,
    pub latency: Latency,
    /// CPU seconds (user + system) of the writer threads and of the reader threads.
    pub writer_cpu_s: f64,
    pub reader_cpu_s: f64,
    pub writer_cpu_s_per_million: f64,
    pub reader_cpu_s_per_million: f64,
}

/// The WebSocket header of an unmasked text frame carrying `len` bytes.
fn header(len: usize) -> Vec<u8> {
    match len {
        0..=125 => vec![0x81, len as u8],
        126..=65535 => vec![0x81, 126, (len >> 8) as u8, len as u8],
        _ => unreachable!("payload size is checked"),
    }
}

/// CPU seconds (user + system) of the calling thread so far.
fn thread_cpu_s() -> f64 {
    let u = sysmon::thread_usage();
    u.user_s + u.sys_s
}

/// Runs the floor measurement and prints a summary.
pub fn run(a: FloorArgs) -> Result<FloorReport> {
    if a.payload < 8 || a.payload > 65535 {
        bail!("--payload must be 8..=65535 bytes (the first 8 carry the stamp)");
    }
    if a.rate <= 0.0 || a.writers == 0 || a.readers == 0 || a.sockets == 0 {
        bail!("--rate, --writers, --readers and --sockets must be positive");
    }
    if a.warmup >= a.duration {
        bail!("--warmup must be shorter than --duration");
    }
    // Both ends of every socket live in this process.
    let nofile = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
    if 2 * a.sockets as u64 + 64 > nofile {
        bail!(
            "--sockets {} needs {} file descriptors (both ends are in this process); the limit is {nofile}",
            a.sockets,
            2 * a.sockets + 64
        );
    }
    let sources: Vec<IpAddr> = match &a.source_addrs {
        Some(s) => parse_source_addrs(s)?,
        None => Vec::new(),
    };

    // Connect every pair: the accepted end is the server's, the dialled end the client's.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let dialer = Dialer::new(sources);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let mut server = Vec::with_capacity(a.sockets);
    let mut client = Vec::with_capacity(a.sockets);
    for i in 0..a.sockets {
        let c = rt
            .block_on(dialer.dial(addr, None))
            .with_context(|| format!("socket {i}: connect"))?
            .into_std()?;
        let (s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        c.set_nonblocking(true)?;
        server.push(s);
        client.push(c);
    }
    drop(rt);

    let frame_bytes = header(a.payload).len() + a.payload;
    // Stamps are nanoseconds since `origin`, on the monotonic clock all threads share.
    let origin = Instant::now();
    let base = origin + Duration::from_millis(200);
    let end = base + a.duration;
    let stamp_ns = move |t: Instant| t.duration_since(origin).as_nanos() as u64;
    let steady_ns = (stamp_ns(base + a.warmup), stamp_ns(end));

    // Readers.
    let mut shares: Vec<Vec<TcpStream>> = (0..a.readers).map(|_| Vec::new()).collect();
    for (i, c) in client.into_iter().enumerate() {
        shares[i % a.readers].push(c);
    }
    // Readers stop once every frame written has arrived (or 3 s after the end).
    let progress = Arc::new(Progress {
        delivered: AtomicU64::new(0),
        expected: AtomicU64::new(u64::MAX),
    });
    let drain = Duration::from_secs(3);
    let readers: Vec<_> = shares
        .into_iter()
        .map(|socks| {
            let payload = a.payload;
            let progress = Arc::clone(&progress);
            std::thread::spawn(move || {
                read_loop(socks, payload, origin, end + drain, steady_ns, &progress)
            })
        })
        .collect();

    // Writers.
    let mut shares: Vec<Vec<TcpStream>> = (0..a.writers).map(|_| Vec::new()).collect();
    for (i, s) in server.into_iter().enumerate() {
        shares[i % a.writers].push(s);
    }
    let writers: Vec<_> = shares
        .into_iter()
        .map(|socks| {
            let (rate, payload, max_batch) = (a.rate, a.payload, a.max_batch.max(1));
            std::thread::spawn(move || {
                write_loop(socks, rate, payload, max_batch, base, end, stamp_ns)
            })
        })
        .collect();

    let (mut writes, mut expected) = (0u64, 0u64);
    let mut writer_cpu = 0.0;
    // The server ends stay open until the readers are done: a close would cut them.
    let mut keep = Vec::new();
    for w in writers {
        let (n, sent, cpu, socks) = w.join().expect("writer thread panicked")?;
        writes += n;
        expected += sent * socks.len() as u64;
        writer_cpu += cpu;
        keep.push(socks);
    }
    progress.expected.store(expected, Ordering::Relaxed);
    let mut hist = new_hist();
    let (mut delivered, mut steady, mut reader_cpu) = (0u64, 0u64, 0.0);
    for r in readers {
        let out = r.join().expect("reader thread panicked")?;
        hist.add(&out.hist)?;
        delivered += out.delivered;
        steady += out.steady;
        reader_cpu += out.cpu;
    }
    drop(keep);

    let steady_s = (a.duration - a.warmup).as_secs_f64();
    let report = FloorReport {
        scenario: "floor",
        sockets: a.sockets,
        rate: a.rate,
        payload: a.payload,
        frame_bytes,
        writers: a.writers,
        readers: a.readers,
        duration_s: a.duration.as_secs_f64(),
        offered_per_s: a.rate * a.sockets as f64,
        delivered_per_s: steady as f64 / steady_s,
        expected,
        delivered,
        writes_per_s: writes as f64 / a.duration.as_secs_f64(),
        deliveries_per_write: if writes == 0 {
            0.0
        } else {
            delivered as f64 / writes as f64
        },
        latency: Latency::from_hist(&hist),
        writer_cpu_s: writer_cpu,
        reader_cpu_s: reader_cpu,
        writer_cpu_s_per_million: writer_cpu / (delivered.max(1) as f64 / 1e6),
        reader_cpu_s_per_million: reader_cpu / (delivered.max(1) as f64 / 1e6),
    };
    print!("{}", render(&report));
    if let Some(p) = &a.out {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(p, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(report)
}

/// Writes every due publication to each socket; returns the write calls, the
/// publications sent, the CPU seconds, and the sockets (to be closed after the
/// readers finish).
fn write_loop(
    mut socks: Vec<TcpStream>,
    rate: f64,
    payload: usize,
    max_batch: usize,
    base: Instant,
    end: Instant,
    stamp_ns: impl Fn(Instant) -> u64,
) -> Result<(u64, u64, f64, Vec<TcpStream>)> {
    let head = header(payload);
    let frame_len = head.len() + payload;
    let mut buf = Vec::with_capacity(frame_len * max_batch);
    let mut sent: u64 = 0;
    let mut writes = 0u64;
    let period = 1.0 / rate;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let due = if now < base {
            0
        } else {
            ((now - base).as_secs_f64() / period) as u64 + 1
        };
        if due <= sent {
            let next = base + Duration::from_secs_f64(sent as f64 * period);
            std::thread::sleep(next.saturating_duration_since(now));
            continue;
        }
        let n = (due - sent).min(max_batch as u64);
        buf.clear();
        for k in sent..sent + n {
            let at = base + Duration::from_secs_f64(k as f64 * period);
            buf.extend_from_slice(&head);
            buf.extend_from_slice(&stamp_ns(at).to_le_bytes());
            buf.resize(buf.len() + payload - 8, b'x');
        }
        for s in socks.iter_mut() {
            s.write_all(&buf)?;
            writes += 1;
        }
        sent += n;
    }
    Ok((writes, sent, thread_cpu_s(), socks))
}

/// Deliveries so far over all readers, and the total to wait for (known once the
/// writers are done).
struct Progress {
    delivered: AtomicU64,
    expected: AtomicU64,
}

struct ReadOut {
    hist: Histogram<u64>,
    delivered: u64,
    steady: u64,
    cpu: f64,
}

/// Reads its sockets through epoll until `until`, recording each frame's latency.
fn read_loop(
    mut socks: Vec<TcpStream>,
    payload: usize,
    origin: Instant,
    until: Instant,
    steady_ns: (u64, u64),
    progress: &Progress,
) -> Result<ReadOut> {
    let head = header(payload).len();
    let frame_len = head + payload;
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    for (i, s) in socks.iter().enumerate() {
        epoll.add(s, EpollEvent::new(EpollFlags::EPOLLIN, i as u64))?;
    }
    // Bytes of a frame cut by the end of a read, per socket.
    let mut partial: Vec<Vec<u8>> = vec![Vec::new(); socks.len()];
    let mut hist = new_hist();
    let (mut delivered, mut steady) = (0u64, 0u64);
    let mut events = vec![EpollEvent::empty(); 512];
    let mut buf = vec![0u8; 64 * 1024];
    while Instant::now() < until
        && progress.delivered.load(Ordering::Relaxed) < progress.expected.load(Ordering::Relaxed)
    {
        let n = epoll.wait(&mut events, EpollTimeout::from(20u16))?;
        for ev in &events[..n] {
            let i = ev.data() as usize;
            let s = &mut socks[i];
            let got = match s.read(&mut buf) {
                Ok(0) => bail!("socket {i} was closed by the writer's end"),
                Ok(k) => k,
                Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            };
            let now = Instant::now().duration_since(origin).as_nanos() as u64;
            let mut data: &[u8] = &buf[..got];
            let carry = std::mem::take(&mut partial[i]);
            let joined;
            if !carry.is_empty() {
                let mut j = carry;
                j.extend_from_slice(data);
                joined = j;
                data = &joined;
            }
            let mut off = 0;
            let before = delivered;
            while off + frame_len <= data.len() {
                let mut st = [0u8; 8];
                st.copy_from_slice(&data[off + head..off + head + 8]);
                let sent = u64::from_le_bytes(st);
                let lat_us = now.saturating_sub(sent) / 1000;
                delivered += 1;
                if sent >= steady_ns.0 && sent < steady_ns.1 {
                    steady += 1;
                    hist.saturating_record(lat_us.max(1));
                }
                off += frame_len;
            }
            if off < data.len() {
                partial[i] = data[off..].to_vec();
            }
            progress
                .delivered
                .fetch_add(delivered - before, Ordering::Relaxed);
        }
    }
    Ok(ReadOut {
        hist,
        delivered,
        steady,
        cpu: thread_cpu_s(),
    })
}

/// The human-readable summary.
pub fn render(r: &FloorReport) -> String {
    let l = &r.latency;
    format!(
        "== wsgate-loadtest floor: kernel only — {} sockets, {} publications/s x {} B ({} B frames), {} writer + {} reader threads, {:.0} s\n\
         offered {:.0} deliveries/s; delivered {:.0}/s in the steady window ({} of {} expected over the run)\n\
         writes: {:.0}/s, {:.2} deliveries per write\n\
         latency (steady): p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3} ms  (n={})\n\
         cpu: writers {:.2} s ({:.3} CPU s per million), readers {:.2} s ({:.3} CPU s per million)\n",
        r.sockets,
        r.rate,
        r.payload,
        r.frame_bytes,
        r.writers,
        r.readers,
        r.duration_s,
        r.offered_per_s,
        r.delivered_per_s,
        r.delivered,
        r.expected,
        r.writes_per_s,
        r.deliveries_per_write,
        l.p50_ms,
        l.p90_ms,
        l.p99_ms,
        l.p999_ms,
        l.max_ms,
        l.count,
        r.writer_cpu_s,
        r.writer_cpu_s_per_million,
        r.reader_cpu_s,
        r.reader_cpu_s_per_million,
    )
}
