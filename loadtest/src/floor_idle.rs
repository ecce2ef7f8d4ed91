//! `floor-idle`: what holding N idle loopback connections with heartbeats costs this
//! machine's kernel alone, with no WebSocket server in the way: the yardstick for a
//! server's idle CPU.
//!
//! The same shape as the `idle` workload against wsgate at its default heartbeat: N
//! connections, each pinged once per `--interval` (a 2-byte WebSocket ping, in
//! per-second batches from a wheel of `interval / 1 s` slots, as wsgate does), each
//! answering with a masked pong that is read back. The "server" is one thread in this
//! process (a loop of `send(2)` for the slot's pings, then epoll and `read(2)` for the
//! pongs until the next tick); the "clients" are a child process of this same binary
//! (one epoll thread answering every ping), so that each process holds one end of
//! every connection and stays within its open-file limit. The server's CPU over the
//! hold (user + system, `getrusage`) is the figure to put beside a server's.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use clap::Args;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use serde::Serialize;

use crate::net::{parse_source_addrs, Dialer};
use crate::sysmon;

/// A server's empty ping frame.
const PING: [u8; 2] = [0x89, 0x00];
/// A client's empty pong frame: masked, with a key of zeros.
const PONG: [u8; 6] = [0x8A, 0x80, 0, 0, 0, 0];
/// The wheel's tick (wsgate's heartbeat wheel ticks once a second).
const TICK: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Args)]
pub struct FloorIdleArgs {
    /// Connections held (this process holds the server ends, a child the clients').
    #[arg(long, default_value_t = 19000)]
    pub connections: usize,
    /// Each connection is pinged once per interval (wsgate's default heartbeat).
    #[arg(long, value_parser = crate::cli::duration, default_value = "25s")]
    pub interval: Duration,
    /// The measured hold.
    #[arg(long, value_parser = crate::cli::duration, default_value = "20s")]
    pub duration: Duration,
    /// Pause between the ramp and the hold (the wheel already runs).
    #[arg(long, value_parser = crate::cli::duration, default_value = "2s")]
    pub settle: Duration,
    /// Source addresses for the client sockets: `127.0.0.2-127.0.0.9` or a list.
    #[arg(long)]
    pub source_addrs: Option<String>,
    /// Write the JSON result here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Internal: run as the client side, connecting to this address.
    #[arg(long, hide = true)]
    pub peer: Option<SocketAddr>,
}

/// What an idle floor run measured.
#[derive(Debug, Serialize)]
pub struct FloorIdleReport {
    pub scenario: &'static str,
    pub connections: usize,
    pub interval_s: f64,
    pub hold_s: f64,
    /// Pings sent and pongs read during the hold.
    pub pings: u64,
    pub pongs: u64,
    /// The server side's CPU over the hold (user + system), in cores.
    pub server_cpu_cores: f64,
    pub server_cpu_user_s: f64,
    pub server_cpu_sys_s: f64,
    /// Server CPU per ping and its pong, in microseconds.
    pub server_us_per_ping: f64,
}

/// Runs the idle floor (or, with `--peer`, its client side) and prints a summary.
pub fn run(a: FloorIdleArgs) -> Result<Option<FloorIdleReport>> {
    if let Some(addr) = a.peer {
        peer(addr, &a)?;
        return Ok(None);
    }
    ensure!(a.connections > 0, "--connections must be positive");
    ensure!(a.interval >= TICK, "--interval must be at least 1s");
    ensure!(!a.duration.is_zero(), "--duration must be positive");
    let nofile = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
    if a.connections as u64 + 64 > nofile {
        bail!(
            "--connections {} needs {} file descriptors in each process; the limit is {nofile}",
            a.connections,
            a.connections + 64
        );
    }
    if let Some(s) = &a.source_addrs {
        parse_source_addrs(s)?;
    }
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut child = spawn_peer(addr, &a)?;
    let result = serve(&listener, &a, &mut child);
    // The child ends when its sockets close; bounded either way.
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let report = result?;
    print!("{}", render(&report));
    if let Some(p) = &a.out {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(p, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(Some(report))
}

fn spawn_peer(addr: SocketAddr, a: &FloorIdleArgs) -> Result<Child> {
    let exe = std::env::current_exe().context("finding this program")?;
    let mut cmd = Command::new(exe);
    cmd.arg("floor-idle")
        .arg("--peer")
        .arg(addr.to_string())
        .arg("--connections")
        .arg(a.connections.to_string())
        .arg("--duration")
        .arg(format!(
            "{}ms",
            (a.duration + a.settle).as_millis() + 120_000
        ))
        .stdin(Stdio::null());
    if let Some(s) = &a.source_addrs {
        cmd.arg("--source-addrs").arg(s);
    }
    cmd.spawn().context("starting the client process")
}

/// The server side: accepts every connection, then pings them from a wheel and reads
/// their pongs; measures its own CPU over the hold.
fn serve(listener: &TcpListener, a: &FloorIdleArgs, child: &mut Child) -> Result<FloorIdleReport> {
    listener.set_nonblocking(true)?;
    let mut socks: Vec<TcpStream> = Vec::with_capacity(a.connections);
    let ramp_deadline = Instant::now() + Duration::from_secs(120);
    while socks.len() < a.connections {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(true)?;
                s.set_nodelay(true)?;
                socks.push(s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "the client process ended ({status}) after {} connections",
                        socks.len()
                    );
                }
                ensure!(
                    Instant::now() < ramp_deadline,
                    "only {} of {} connections within 120 s",
                    socks.len(),
                    a.connections
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    for (i, s) in socks.iter().enumerate() {
        epoll.add(s, EpollEvent::new(EpollFlags::EPOLLIN, i as u64))?;
    }
    // The wheel: connection i is in slot i mod slots; a slot is visited per tick.
    let slots = (a.interval.as_millis() / TICK.as_millis()).max(1) as usize;
    let mut events = vec![EpollEvent::empty(); 1024];
    let mut buf = [0u8; 4096];
    let start = Instant::now();
    let hold_from = start + a.settle;
    let hold_to = hold_from + a.duration;
    let (mut pings, mut pongs) = (0u64, 0u64);
    let mut before = None;
    let mut next_tick = start;
    let mut slot = 0;
    loop {
        let now = Instant::now();
        if before.is_none() && now >= hold_from {
            before = Some((sysmon::self_usage(), now, pings, pongs));
        }
        if now >= hold_to {
            break;
        }
        if now >= next_tick {
            for s in socks.iter_mut().skip(slot).step_by(slots) {
                match s.write(&PING) {
                    Ok(2) => pings += 1,
                    Ok(_) => bail!("a ping was cut short"),
                    Err(e) => return Err(e).context("sending a ping"),
                }
            }
            slot = (slot + 1) % slots;
            next_tick += TICK;
            continue;
        }
        let wait = (next_tick.min(hold_to) - now).as_millis().min(1000) as u16;
        let n = epoll.wait(&mut events, EpollTimeout::from(wait.max(1)))?;
        for ev in &events[..n] {
            let s = &mut socks[ev.data() as usize];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => bail!("a client closed its connection"),
                    Ok(k) => pongs += (k / PONG.len()) as u64,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e).context("reading a pong"),
                }
            }
        }
    }
    let after = sysmon::self_usage();
    let (u0, t0, pings0, pongs0) = before.expect("the hold started");
    let hold_s = t0.elapsed().as_secs_f64();
    let (user, sys) = (after.user_s - u0.user_s, after.sys_s - u0.sys_s);
    let pings = pings - pings0;
    drop(socks);
    Ok(FloorIdleReport {
        scenario: "floor-idle",
        connections: a.connections,
        interval_s: a.interval.as_secs_f64(),
        hold_s,
        pings,
        pongs: pongs - pongs0,
        server_cpu_cores: (user + sys) / hold_s,
        server_cpu_user_s: user,
        server_cpu_sys_s: sys,
        server_us_per_ping: (user + sys) * 1e6 / pings.max(1) as f64,
    })
}

/// The client side: connects every socket, answers each ping with a pong until the
/// server closes them (or `--duration` passes).
fn peer(addr: SocketAddr, a: &FloorIdleArgs) -> Result<()> {
    let sources: Vec<IpAddr> = match &a.source_addrs {
        Some(s) => parse_source_addrs(s)?,
        None => Vec::new(),
    };
    let dialer = Dialer::new(sources);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let mut socks = Vec::with_capacity(a.connections);
    for i in 0..a.connections {
        let s = rt
            .block_on(dialer.dial(addr, None))
            .with_context(|| format!("connection {i}: connect"))?
            .into_std()?;
        s.set_nonblocking(true)?;
        socks.push(Some(s));
    }
    drop(rt);
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    for (i, s) in socks.iter().enumerate() {
        let s = s.as_ref().expect("just connected");
        epoll.add(s, EpollEvent::new(EpollFlags::EPOLLIN, i as u64))?;
    }
    let until = Instant::now() + a.duration;
    let mut open = socks.len();
    let mut events = vec![EpollEvent::empty(); 1024];
    let mut buf = [0u8; 4096];
    let mut out = Vec::new();
    while open > 0 && Instant::now() < until {
        let n = epoll.wait(&mut events, EpollTimeout::from(100u16))?;
        for ev in &events[..n] {
            let i = ev.data() as usize;
            let Some(s) = socks[i].as_mut() else { continue };
            let mut closed = false;
            loop {
                match s.read(&mut buf) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(k) => {
                        // Only empty pings come: one pong for each.
                        out.clear();
                        for _ in 0..k / PING.len() {
                            out.extend_from_slice(&PONG);
                        }
                        s.write_all(&out)?;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        closed = true;
                        break;
                    }
                }
            }
            if closed {
                let _ = epoll.delete(&*s);
                socks[i] = None;
                open -= 1;
            }
        }
    }
    Ok(())
}

/// The human-readable summary.
pub fn render(r: &FloorIdleReport) -> String {
    format!(
        "== wsgate-loadtest floor-idle: kernel only — {} connections, one ping each per {:.0} s, {:.1} s hold\n\
         pings {} / pongs {} in the hold\n\
         server cpu: {:.3}% of a core (user {:.3} s, sys {:.3} s), {:.2} µs per ping and pong\n",
        r.connections,
        r.interval_s,
        r.hold_s,
        r.pings,
        r.pongs,
        r.server_cpu_cores * 100.0,
        r.server_cpu_user_s,
        r.server_cpu_sys_s,
        r.server_us_per_ping,
    )
}
