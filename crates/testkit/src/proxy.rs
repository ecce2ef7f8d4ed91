//! A fault-injecting TCP proxy ([`Proxy`]): listens on a loopback port and forwards
//! every connection to a target, byte for byte, until told otherwise. Put between a
//! gateway and Redis, it makes that one link slow, silent or broken while everything
//! else stays healthy.
//!
//! Faults, changed at any time, apply to open connections and new ones alike:
//! - **latency**: each chunk read from either side waits this long before it is
//!   written on (per chunk, so a burst read at once waits once);
//! - **throttle**: at most this many bytes per second in each direction;
//! - **stall**: a black hole — nothing is read or forwarded any more, in either
//!   direction, but every socket stays open (new connections are accepted and
//!   connected, then stall too), as a frozen peer or a dead route looks;
//! - **cut**: every open connection is reset (RST on both sides), and new ones are
//!   reset as soon as they are accepted;
//! - **heal**: back to plain forwarding (what was held during a stall goes on).
//!
//! The proxy runs on a thread of its own with its own runtime, so it keeps working
//! whatever the test's runtime does; dropping the handle stops it and closes every
//! socket it holds.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

/// How long the proxy waits for the target to accept a connection.
const CONNECT_WITHIN: Duration = Duration::from_secs(5);
/// The largest chunk read at once.
const CHUNK: usize = 16 * 1024;

/// Whether bytes flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Forwarding (with the latency and throttle, if any).
    #[default]
    Pass,
    /// Nothing forwarded, sockets kept open.
    Stall,
    /// Every connection reset, new ones too.
    Cut,
}

/// The faults in force.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    pub mode: Mode,
    /// Added before each chunk is forwarded.
    pub latency: Duration,
    /// Bytes per second per direction and connection; `None`: unlimited.
    pub bytes_per_sec: Option<u64>,
}

/// A running proxy; stopped when dropped.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Where it forwards to.
    pub target: SocketAddr,
    faults: watch::Sender<Faults>,
    open: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Starts a proxy on a free loopback port, forwarding to `target`.
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (faults, rx) = watch::channel(Faults::default());
        let (shutdown, stop) = oneshot::channel();
        let open = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (o, a) = (open.clone(), accepted.clone());
        let thread = std::thread::Builder::new()
            .name(format!("proxy-{addr}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the proxy's runtime");
                rt.block_on(async move {
                    let listener = TcpListener::from_std(listener).unwrap();
                    accept_loop(listener, target, rx, o, a, stop).await;
                });
                // Dropping the runtime drops every connection task and its sockets.
            })
            .expect("the proxy's thread");
        Proxy {
            addr,
            target,
            faults,
            open,
            accepted,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// The faults in force.
    pub fn faults(&self) -> Faults {
        *self.faults.borrow()
    }

    /// Puts `faults` in force.
    pub fn set(&self, faults: Faults) {
        self.faults.send_replace(faults);
    }

    /// Adds `latency` before each forwarded chunk (keeps the other faults).
    pub fn latency(&self, latency: Duration) {
        self.faults.send_modify(|f| f.latency = latency);
    }

    /// Limits each direction of each connection to `bytes_per_sec` (at least 1).
    pub fn throttle(&self, bytes_per_sec: u64) {
        self.faults
            .send_modify(|f| f.bytes_per_sec = Some(bytes_per_sec.max(1)));
    }

    /// Stops forwarding, keeping every socket open (a black hole).
    pub fn stall(&self) {
        self.faults.send_modify(|f| f.mode = Mode::Stall);
    }

    /// Resets every open connection, and every new one until [`Proxy::heal`].
    pub fn cut(&self) {
        self.faults.send_modify(|f| f.mode = Mode::Cut);
    }

    /// Back to plain forwarding: no latency, no throttle, no stall or cut.
    pub fn heal(&self) {
        self.set(Faults::default());
    }

    /// Connections open through the proxy now (both sides connected).
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections accepted so far (reset ones included).
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    faults: watch::Receiver<Faults>,
    open: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        let client = tokio::select! {
            _ = &mut stop => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => {
                    // Out of descriptors, or the like: try again shortly.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        accepted.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(connection(client, target, faults.clone(), open.clone()));
    }
}

/// Counts a connection as open while it lives.
struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Closes `s` with a reset (`SO_LINGER` 0) rather than a FIN.
fn reset(s: &TcpStream) {
    let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
}

async fn connection(
    client: TcpStream,
    target: SocketAddr,
    mut faults: watch::Receiver<Faults>,
    open: Arc<AtomicUsize>,
) {
    if faults.borrow_and_update().mode == Mode::Cut {
        reset(&client);
        return;
    }
    let upstream = match tokio::time::timeout(CONNECT_WITHIN, TcpStream::connect(target)).await {
        Ok(Ok(s)) => s,
        _ => {
            reset(&client);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    open.fetch_add(1, Ordering::Relaxed);
    let _open = OpenGuard(open);
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let (up, down) = (faults.clone(), faults.clone());
    let both = async { tokio::try_join!(pump(&mut cr, &mut uw, up), pump(&mut ur, &mut cw, down)) };
    let cut = async {
        loop {
            if faults.borrow_and_update().mode == Mode::Cut {
                return;
            }
            if faults.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    let cut = tokio::select! {
        _ = both => false,
        _ = cut => true,
    };
    if cut {
        reset(cw.as_ref());
        reset(uw.as_ref());
    }
}

/// Waits while the proxy stalls (or cuts: the connection is about to be reset).
async fn flowing(faults: &mut watch::Receiver<Faults>) -> Faults {
    loop {
        let f = *faults.borrow_and_update();
        if f.mode == Mode::Pass {
            return f;
        }
        if faults.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Forwards `from` to `to` chunk by chunk under the faults in force; passes the end
/// of the stream on (a half close) and returns.
async fn pump(
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    mut faults: watch::Receiver<Faults>,
) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let f = flowing(&mut faults).await;
        // Under a throttle, small reads keep the pace even.
        let limit = f
            .bytes_per_sec
            .map_or(CHUNK, |b| (b / 20).clamp(1, CHUNK as u64) as usize);
        let n = from.read(&mut buf[..limit]).await?;
        if n == 0 {
            to.shutdown().await?;
            return Ok(());
        }
        // A stall that began during the read holds this chunk too.
        let f = flowing(&mut faults).await;
        if !f.latency.is_zero() {
            tokio::time::sleep(f.latency).await;
        }
        to.write_all(&buf[..n]).await?;
        if let Some(b) = f.bytes_per_sec {
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / b as f64)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// An echo server on a free loopback port, on the test's runtime.
    async fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    const WITHIN: Duration = Duration::from_secs(10);

    async fn round_trip(s: &mut TcpStream, data: &[u8]) -> Vec<u8> {
        s.write_all(data).await.unwrap();
        let mut got = vec![0u8; data.len()];
        tokio::time::timeout(WITHIN, s.read_exact(&mut got))
            .await
            .expect("the echo in time")
            .unwrap();
        got
    }

    /// Whether the peer ended the connection (EOF or a reset) within `WITHIN`.
    async fn ended(s: &mut TcpStream) -> bool {
        let mut b = [0u8; 64];
        loop {
            match tokio::time::timeout(WITHIN, s.read(&mut b)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
            }
        }
    }

    #[tokio::test]
    async fn passes_bytes_both_ways_and_counts_connections() {
        let proxy = Proxy::start(echo().await);
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(round_trip(&mut s, &data).await, data);
        assert_eq!(proxy.open_connections(), 1);
        assert_eq!(proxy.accepted(), 1);
        drop(s);
        assert!(
            crate::wait::eventually(WITHIN, || proxy.open_connections() == 0).await,
            "a closed connection is no longer counted"
        );
    }

    #[tokio::test]
    async fn latency_and_throttle_slow_the_link_down() {
        let proxy = Proxy::start(echo().await);
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        proxy.latency(Duration::from_millis(150));
        let start = Instant::now();
        assert_eq!(round_trip(&mut s, b"ping").await, b"ping");
        // Both directions wait once each.
        assert!(
            start.elapsed() >= Duration::from_millis(300),
            "{:?}",
            start.elapsed()
        );
        proxy.heal();
        proxy.throttle(100_000);
        let data = vec![7u8; 50_000];
        let start = Instant::now();
        assert_eq!(round_trip(&mut s, &data).await, data);
        // 50 kB at 100 kB/s, in each direction (pipelined: at least one way's worth,
        // less the pause after its last chunk).
        assert!(
            start.elapsed() >= Duration::from_millis(400),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(proxy.faults().bytes_per_sec, Some(100_000));
    }

    #[tokio::test]
    async fn a_stall_holds_bytes_and_sockets_until_healed() {
        let proxy = Proxy::start(echo().await);
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(round_trip(&mut s, b"before").await, b"before");
        proxy.stall();
        s.write_all(b"held").await.unwrap();
        let mut b = [0u8; 4];
        let early = tokio::time::timeout(Duration::from_millis(300), s.read(&mut b)).await;
        assert!(early.is_err(), "nothing comes through a stall: {early:?}");
        // A new connection is accepted, and stalls too.
        let mut t = TcpStream::connect(proxy.addr).await.unwrap();
        t.write_all(b"new!").await.unwrap();
        assert!(
            crate::wait::eventually(WITHIN, || proxy.open_connections() == 2).await,
            "both held open"
        );
        proxy.heal();
        tokio::time::timeout(WITHIN, s.read_exact(&mut b))
            .await
            .expect("released after the heal")
            .unwrap();
        assert_eq!(&b, b"held");
        tokio::time::timeout(WITHIN, t.read_exact(&mut b))
            .await
            .expect("released after the heal")
            .unwrap();
        assert_eq!(&b, b"new!");
    }

    #[tokio::test]
    async fn a_cut_resets_open_and_new_connections_until_healed() {
        let proxy = Proxy::start(echo().await);
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(round_trip(&mut s, b"x").await, b"x");
        proxy.cut();
        assert!(ended(&mut s).await, "the open connection was reset");
        // A new connection is reset too (so soon, on loopback, that the connect itself
        // may report it).
        if let Ok(mut t) = TcpStream::connect(proxy.addr).await {
            assert!(ended(&mut t).await, "a new connection is reset too");
        }
        assert_eq!(proxy.accepted(), 2);
        assert!(
            crate::wait::eventually(WITHIN, || proxy.open_connections() == 0).await,
            "nothing left open"
        );
        proxy.heal();
        let mut u = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(round_trip(&mut u, b"back").await, b"back");
    }

    #[tokio::test]
    async fn a_dropped_proxy_closes_its_connections() {
        let proxy = Proxy::start(echo().await);
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(round_trip(&mut s, b"x").await, b"x");
        drop(proxy);
        assert!(ended(&mut s).await, "closed with the proxy");
    }
}
