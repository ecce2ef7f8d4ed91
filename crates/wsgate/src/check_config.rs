//! `wsgate check-config FILE [FLAGS…]`: reads the configuration as `wsgate --config
//! FILE FLAGS…` would start (the `WSGATE_*` environment included, key and certificate
//! files read, a JWKS URL fetched), prints a short summary and exits 0; on any problem
//! prints the same message the start would, naming the setting, and exits 2.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use wsgate_gateway::namespaces::describe;
use wsgate_gateway::security::Security;

use crate::settings::{self, Settings};

/// Checks a configuration file without starting a node.
#[derive(Debug, Parser)]
#[command(
    name = "wsgate check-config",
    about = "Check a configuration file (and the WSGATE_* environment) without starting: exit 0, or 2 naming the bad setting"
)]
struct CheckArgs {
    /// The TOML configuration file, as given to --config (docs/configuration.md).
    file: PathBuf,
    /// Node flags to check along with the file, as `wsgate --config FILE FLAGS…` would.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "FLAGS"
    )]
    flags: Vec<OsString>,
}

/// `check-config` as a subcommand of `wsgate`, so that `wsgate --help` lists it.
pub fn command() -> clap::Command {
    <CheckArgs as clap::CommandFactory>::command().name("check-config")
}

/// A byte count the way the flags write it.
fn bytes(n: usize) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{}MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{}KiB", n >> 10),
        n => n.to_string(),
    }
}

fn summary(file: &str, s: &Settings) -> String {
    let mut out = format!("{file}: valid\n");
    out += &match &s.redis {
        None => format!(
            "broker: in-memory (history memory {})\n",
            bytes(s.gateway.history_memory)
        ),
        Some(wsgate_redis::BrokerSetup::Single(_)) => "broker: redis\n".to_string(),
        Some(wsgate_redis::BrokerSetup::Cluster(_)) => "broker: redis cluster\n".to_string(),
    };
    let lines = describe(&s.namespaces);
    let streams = s.namespaces.iter().filter(|n| n.stream.is_some()).count();
    out += &format!("namespaces: {} ({streams} with streams)\n", lines.len());
    for l in lines {
        out += &format!("  {l}\n");
    }
    out += "other topics: plain\n";
    out
}

/// Runs `wsgate check-config …` (`args` without the leading `check-config`).
pub fn run(args: impl Iterator<Item = String>) -> ExitCode {
    let args =
        CheckArgs::parse_from(std::iter::once("wsgate check-config".to_string()).chain(args));
    let argv = [
        "wsgate".into(),
        "--config".into(),
        args.file.clone().into_os_string(),
    ]
    .into_iter()
    .chain(args.flags);
    let checked = settings::load(argv.collect()).and_then(|s| {
        Security::from_config(&s.gateway).map_err(|e| e.to_string())?;
        Ok(s)
    });
    match checked {
        Ok(s) => {
            print!("{}", summary(&args.file.display().to_string(), &s));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wsgate: invalid configuration: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_as_flags_write_them() {
        assert_eq!(bytes(256 << 20), "256MiB");
        assert_eq!(bytes(64 << 10), "64KiB");
        assert_eq!(bytes(1000), "1000");
    }
}
