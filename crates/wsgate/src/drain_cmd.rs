//! `wsgate drain`: asks a running node to start its graceful drain (`POST /drain` on
//! its admin listener). Made for a Kubernetes preStop hook in an image without a
//! shell or curl. Binds nothing; exits 0 on any 2xx, 1 otherwise.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// Starts the graceful drain of a running wsgate node.
#[derive(Debug, Parser)]
#[command(
    name = "wsgate drain",
    about = "Start the graceful drain of a running wsgate node (POST /drain)"
)]
struct DrainArgs {
    /// The node's admin URL (default: from WSGATE_ADMIN_LISTEN, with 0.0.0.0 meaning
    /// 127.0.0.1, else http://127.0.0.1:9090).
    #[arg(long, env = "WSGATE_ADMIN_URL")]
    admin_url: Option<String>,
}

const TIMEOUT: Duration = Duration::from_secs(5);

fn default_url() -> String {
    match std::env::var("WSGATE_ADMIN_LISTEN") {
        Ok(listen) if !listen.is_empty() => {
            let listen = listen
                .replace("0.0.0.0:", "127.0.0.1:")
                .replace("[::]:", "[::1]:");
            format!("http://{listen}")
        }
        _ => "http://127.0.0.1:9090".to_string(),
    }
}

/// `host:port` of an `http://host:port[/…]` URL.
pub(crate) fn authority(url: &str) -> Result<&str, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("`{url}`: only http:// admin URLs are supported"))?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() {
        return Err(format!("`{url}`: no host"));
    }
    Ok(host)
}

/// A connection to the host of `http://host[:port][/…]` (port 80 by default), with
/// `timeout` on connecting, reading and writing; and the host as written.
pub(crate) fn connect(url: &str, timeout: Duration) -> Result<(TcpStream, &str), String> {
    let host = authority(url)?;
    let host_port = if host.contains(':') && !host.ends_with(']') {
        host.to_string()
    } else {
        format!("{host}:80")
    };
    let addr = host_port
        .to_socket_addrs()
        .map_err(|e| format!("{host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}: no address"))?;
    let s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    Ok((s, host))
}

fn post_drain(url: &str) -> Result<u16, String> {
    let (mut s, host) = connect(url, TIMEOUT)?;
    write!(
        s,
        "POST /drain HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)
        .map_err(|e| format!("reading the answer: {e}"))?;
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| "not an HTTP answer".to_string())
}

/// `drain` as a subcommand of `wsgate`, so that `wsgate --help` lists it.
pub fn command() -> clap::Command {
    <DrainArgs as clap::CommandFactory>::command().name("drain")
}

/// Runs `wsgate drain …` (`args` without the leading `drain`).
pub fn run(args: impl Iterator<Item = String>) -> ExitCode {
    let args = DrainArgs::parse_from(std::iter::once("wsgate drain".to_string()).chain(args));
    let url = args.admin_url.unwrap_or_else(default_url);
    match post_drain(url.trim_end_matches('/')) {
        Ok(code) if (200..300).contains(&code) => {
            eprintln!("wsgate drain: {url}: draining ({code})");
            ExitCode::SUCCESS
        }
        Ok(code) => {
            eprintln!("wsgate drain: {url}: HTTP {code}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("wsgate drain: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities() {
        assert_eq!(authority("http://127.0.0.1:9090"), Ok("127.0.0.1:9090"));
        assert_eq!(authority("http://127.0.0.1:9090/x"), Ok("127.0.0.1:9090"));
        assert!(authority("https://x").is_err());
        assert!(authority("http://").is_err());
    }
}
