//! The node's settings: each crate's clap section, flattened into one command line,
//! read with the `--config` file under it (flags > `WSGATE_*` > file > defaults) and
//! checked. Used by the start and by `wsgate check-config`, so both accept and refuse
//! exactly the same things.

use std::ffi::OsString;

use clap::{CommandFactory, FromArgMatches, Parser};
use wsgate_fanout::Namespaces;
use wsgate_gateway::config_file::{self, ParseError};
use wsgate_gateway::Config;
use wsgate_redis::{BrokerSetup, RedisArgs};

use crate::{check_config, drain_cmd, rebalance_cmd};

/// The command line: each crate's settings, flattened (`wsgate --help` lists them all).
#[derive(Debug, Parser)]
#[command(
    name = "wsgate",
    version,
    about = "wsgate: a horizontally scalable WebSocket pub/sub gateway",
    long_about = None,
    max_term_width = 100
)]
struct Cli {
    #[command(flatten)]
    gateway: Config,
    #[command(flatten)]
    redis: RedisArgs,
}

/// The node's command. `drain`, `rebalance` and `check-config` are declared as subcommands only for
/// `--help`: `main` runs them before any of this, so the node's settings are never
/// parsed for them, and after a flag they are refused (not ignored).
pub fn command() -> clap::Command {
    Cli::command()
        .subcommand(drain_cmd::command())
        .subcommand(rebalance_cmd::command())
        .subcommand(check_config::command())
        .args_conflicts_with_subcommands(true)
        .disable_help_subcommand(true)
}

/// Everything the node needs to start, read and checked.
#[derive(Debug)]
pub struct Settings {
    pub gateway: Config,
    /// `None`: the in-memory broker.
    pub redis: Option<BrokerSetup>,
    /// Which topics are streams (none without a `--config` file that says so).
    pub namespaces: Namespaces,
}

/// Reads the settings from `argv` (with the program name), the environment and the
/// `--config` file, and checks them. A command-line error (or `--help`) is printed
/// by clap, which exits (2, or 0 for help).
///
/// # Errors
/// A message naming the setting that is wrong (exit 2).
pub fn load(argv: Vec<OsString>) -> Result<Settings, String> {
    let mut cmd = command();
    let layered = match config_file::parse(&cmd, argv) {
        Ok(l) => l,
        Err(ParseError::Clap(e)) => e.format(&mut cmd).exit(),
        Err(ParseError::File(e)) => return Err(e.to_string()),
    };
    let namespaces = layered.namespaces();
    let mut matches = layered.matches;
    let Cli { mut gateway, redis } =
        Cli::from_arg_matches_mut(&mut matches).unwrap_or_else(|e| e.format(&mut cmd).exit());
    // Resolved once, so logs, traces and `welcome` agree even on a random id.
    gateway.node_id = Some(gateway.resolved_node_id());
    gateway.validate()?;
    let redis = redis.broker()?;
    Ok(Settings {
        gateway,
        redis,
        namespaces,
    })
}
