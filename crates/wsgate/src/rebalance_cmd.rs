//! `wsgate rebalance`: asks the fleet to rebalance its connections after a scale-out
//! (`POST /api/rebalance` on any node's main listener) and prints the answer: each
//! node's connections, share and what it will shed. Exits 0 on a 2xx, 1 otherwise.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::drain_cmd::connect;

/// Rebalances the fleet's connections (POST /api/rebalance).
#[derive(Debug, Parser)]
#[command(
    name = "wsgate rebalance",
    about = "Ask nodes holding more than their share of connections to shed the excess (POST /api/rebalance)"
)]
struct RebalanceArgs {
    /// Any node's main URL (default: from WSGATE_LISTEN, with 0.0.0.0 meaning
    /// 127.0.0.1, else http://127.0.0.1:8080).
    #[arg(long, env = "WSGATE_URL")]
    url: Option<String>,

    /// The API key (`--api-key` of the nodes).
    #[arg(long, env = "WSGATE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,

    /// Only say what each node would shed; change nothing.
    #[arg(long)]
    dry_run: bool,
}

const TIMEOUT: Duration = Duration::from_secs(10);

fn default_url() -> String {
    match std::env::var("WSGATE_LISTEN") {
        Ok(listen) if !listen.is_empty() => {
            let listen = listen
                .replace("0.0.0.0:", "127.0.0.1:")
                .replace("[::]:", "[::1]:");
            format!("http://{listen}")
        }
        _ => "http://127.0.0.1:8080".to_string(),
    }
}

/// The request's bytes.
fn request(host: &str, api_key: Option<&str>, dry_run: bool) -> String {
    let body = if dry_run { r#"{"dry_run":true}"# } else { "{}" };
    let auth = api_key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    format!(
        "POST /api/rebalance HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The status code and body of an HTTP/1.1 answer read to its end.
fn parse_answer(raw: &[u8]) -> Result<(u16, String), String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "not an HTTP answer".to_string())?;
    let code = head
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| "not an HTTP answer".to_string())?;
    Ok((code, body.to_string()))
}

fn post(url: &str, api_key: Option<&str>, dry_run: bool) -> Result<(u16, String), String> {
    let (mut s, host) = connect(url, TIMEOUT)?;
    s.write_all(request(host, api_key, dry_run).as_bytes())
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("reading the answer: {e}"))?;
    parse_answer(&raw)
}

/// `rebalance` as a subcommand of `wsgate`, so that `wsgate --help` lists it.
pub fn command() -> clap::Command {
    <RebalanceArgs as clap::CommandFactory>::command().name("rebalance")
}

/// Runs `wsgate rebalance …` (`args` without the leading `rebalance`).
pub fn run(args: impl Iterator<Item = String>) -> ExitCode {
    let args =
        RebalanceArgs::parse_from(std::iter::once("wsgate rebalance".to_string()).chain(args));
    let url = args.url.unwrap_or_else(default_url);
    match post(
        url.trim_end_matches('/'),
        args.api_key.as_deref(),
        args.dry_run,
    ) {
        Ok((code, body)) if (200..300).contains(&code) => {
            println!("{}", body.trim_end());
            ExitCode::SUCCESS
        }
        Ok((code, body)) => {
            eprintln!("wsgate rebalance: {url}: HTTP {code} {}", body.trim_end());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("wsgate rebalance: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers() {
        let r = request("127.0.0.1:8080", Some("k"), true);
        assert!(r.starts_with("POST /api/rebalance HTTP/1.1\r\n"), "{r}");
        assert!(r.contains("Authorization: Bearer k\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\n{\"dry_run\":true}"), "{r}");
        assert!(!request("h:1", None, false).contains("Authorization"));
        let a = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_answer(a), Ok((200, "{}".into())));
        assert!(parse_answer(b"garbage").is_err());
    }
}
