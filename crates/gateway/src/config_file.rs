//! The configuration file (`--config wsgate.toml`, docs/configuration.md): TOML whose
//! top-level keys are the long flags of the command line (`max_message_size =
//! "64KiB"`, `-` and `_` alike), plus the `[[namespaces]]` tables ([`crate::namespaces`]).
//!
//! Precedence: command-line flags, then `WSGATE_*` variables, then the file, then the
//! defaults. The file is layered under clap rather than beside it: [`parse`] reads
//! the command line once to find the file and learn which settings the flags and the
//! environment already gave (`ArgMatches::value_source`), then parses it again with
//! the file's other settings added as flags. So a value from the file goes through the
//! same parser, and the same checks, as the flag it stands for.

use std::ffi::OsString;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};
use wsgate_fanout::Namespaces;

/// The id of the `--config` flag (a field of [`crate::Config`]).
pub const CONFIG_ARG: &str = "config";

/// A problem in the file's text, where the span (byte offsets) is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingError {
    pub span: Option<Range<usize>>,
    /// Names the setting and what is wrong with it.
    pub message: String,
}

/// A configuration file that cannot be used: which file, where, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    pub path: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}, line {line}: {}", self.path.display(), self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

impl std::error::Error for FileError {}

/// One top-level setting of the file.
#[derive(Debug, Clone)]
struct Setting {
    /// As written.
    key: String,
    span: Range<usize>,
    value: toml::Value,
}

/// A parsed and checked configuration file.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub path: PathBuf,
    text: String,
    settings: Vec<Setting>,
    /// Its `[[namespaces]]` (empty without).
    pub namespaces: Namespaces,
}

impl ConfigFile {
    /// Reads and parses `path`, checking the TOML syntax and the namespaces (the flag
    /// settings are checked against a command line by [`ConfigFile::args_for`]).
    ///
    /// # Errors
    /// The file cannot be read, is not TOML, or has a bad namespace.
    pub fn load(path: &Path) -> Result<Self, FileError> {
        let text = std::fs::read_to_string(path).map_err(|e| FileError {
            path: path.to_owned(),
            line: None,
            message: format!("--config: cannot read the file: {e}"),
        })?;
        Self::from_text(path, text)
    }

    /// Parses `text` as the content of `path`.
    ///
    /// # Errors
    /// As [`ConfigFile::load`].
    pub fn from_text(path: &Path, text: String) -> Result<Self, FileError> {
        let located = |e: SettingError| FileError {
            path: path.to_owned(),
            line: e.span.map(|s| line_of(&text, s.start)),
            message: e.message,
        };
        let syntax = |e: toml::de::Error| {
            located(SettingError {
                span: e.span(),
                message: format!("not valid TOML: {}", e.message()),
            })
        };
        let mut keys: Vec<(String, Range<usize>)> = toml::de::DeTable::parse(&text)
            .map_err(syntax)?
            .into_inner()
            .iter()
            .map(|(k, _)| (k.get_ref().to_string(), k.span()))
            .collect();
        keys.sort_by_key(|(_, span)| span.start);
        let mut table: toml::Table = toml::from_str(&text).map_err(syntax)?;
        let namespaces = crate::namespaces::parse(&text).map_err(located)?;
        let settings = keys
            .into_iter()
            .filter(|(key, _)| key != "namespaces")
            .filter_map(|(key, span)| {
                let value = table.remove(&key)?;
                Some(Setting { key, span, value })
            })
            .collect();
        Ok(ConfigFile {
            path: path.to_owned(),
            text,
            settings,
            namespaces,
        })
    }

    fn error(&self, span: &Range<usize>, message: String) -> FileError {
        FileError {
            path: self.path.clone(),
            line: Some(line_of(&self.text, span.start)),
            message,
        }
    }

    /// The flags that bring the file's settings into a parse of `cmd`: `--name=value`
    /// for each setting that `matches` (a parse of the command line without the file)
    /// has only as a default, or not at all. Every setting is checked, even one the
    /// command line overrides.
    ///
    /// # Errors
    /// A key that is no flag of `cmd` (or `config` itself), a key given twice (`a-b`
    /// and `a_b`), a value of the wrong shape or that the flag's parser refuses.
    pub fn args_for(
        &self,
        cmd: &Command,
        matches: &ArgMatches,
    ) -> Result<Vec<OsString>, FileError> {
        let mut out = Vec::new();
        let mut seen: Vec<(String, &str)> = Vec::new();
        for s in &self.settings {
            let id = s.key.replace('-', "_");
            if id == CONFIG_ARG {
                return Err(self.error(&s.span, "`config`: a configuration file cannot name another one (use --config or WSGATE_CONFIG)".into()));
            }
            let Some((arg, long)) = settable(cmd, &id) else {
                return Err(self.error(
                    &s.span,
                    format!(
                        "unknown setting `{}` (settings are the long flags of `wsgate --help`, written `max_message_size` or `max-message-size`; namespaces go in [[namespaces]] tables)",
                        s.key
                    ),
                ));
            };
            if let Some((_, first)) = seen.iter().find(|(i, _)| *i == id) {
                return Err(self.error(
                    &s.span,
                    format!("`{}`: the same setting as `{first}`, given twice", s.key),
                ));
            }
            seen.push((id.clone(), &s.key));
            let many = matches!(arg.get_action(), ArgAction::Append);
            let values = strings(&s.value, many)
                .map_err(|m| self.error(&s.span, format!("`{}`: {m}", s.key)))?;
            for v in &values {
                check_value(arg, long, v)
                    .map_err(|m| self.error(&s.span, format!("`{}`: {m}", s.key)))?;
            }
            match matches.value_source(&id) {
                Some(ValueSource::CommandLine | ValueSource::EnvVariable) => {}
                _ => out.extend(
                    values
                        .iter()
                        .map(|v| OsString::from(format!("--{long}={v}"))),
                ),
            }
        }
        Ok(out)
    }
}

/// The argument of `cmd` a file key may set: a long flag taking a value.
fn settable<'c>(cmd: &'c Command, id: &str) -> Option<(&'c Arg, &'c str)> {
    let arg = cmd.get_arguments().find(|a| a.get_id() == id)?;
    let long = arg.get_long()?;
    matches!(arg.get_action(), ArgAction::Set | ArgAction::Append).then_some((arg, long))
}

/// The value as flag values: one for a scalar, one per element for a list (only where
/// the flag takes several).
fn strings(value: &toml::Value, many: bool) -> Result<Vec<String>, String> {
    let scalar = |v: &toml::Value| match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        toml::Value::Datetime(_) => Err("a date is no value of this setting".to_string()),
        toml::Value::Array(_) | toml::Value::Table(_) => {
            Err("expected a string, number or boolean".to_string())
        }
    };
    match value {
        toml::Value::Array(items) if many => items.iter().map(scalar).collect(),
        toml::Value::Array(_) => Err("takes one value, not a list".into()),
        v => Ok(vec![scalar(v)?]),
    }
}

/// Runs the flag's own parser on `value`: the message is clap's, naming the flag.
fn check_value(arg: &Arg, long: &str, value: &str) -> Result<(), String> {
    let probe = Arg::new("value")
        .long(long.to_owned())
        .value_name(
            arg.get_value_names()
                .and_then(|n| n.first())
                .map_or_else(|| long.to_uppercase(), |n| n.to_string()),
        )
        .value_parser(arg.get_value_parser().clone())
        .action(ArgAction::Set);
    Command::new("wsgate")
        .no_binary_name(true)
        .disable_help_flag(true)
        .arg(probe)
        .try_get_matches_from([format!("--{long}={value}")])
        .map(drop)
        .map_err(|e| {
            let text = e.to_string();
            let text = text.trim_start_matches("error: ");
            text.split("\n\n").next().unwrap_or(text).trim().to_string()
        })
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .unwrap_or(text)
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}

/// A command line read with its configuration file.
#[derive(Debug)]
pub struct Layered {
    pub matches: ArgMatches,
    /// The file, when `--config` (or `WSGATE_CONFIG`) named one.
    pub file: Option<ConfigFile>,
}

impl Layered {
    /// The namespaces in force: the file's, or none.
    pub fn namespaces(&self) -> Namespaces {
        self.file
            .as_ref()
            .map(|f| f.namespaces.clone())
            .unwrap_or_default()
    }
}

/// Why [`parse`] failed.
#[derive(Debug)]
pub enum ParseError {
    /// The command line or environment (or `--help`/`--version`): print it with
    /// `clap::Error::exit`.
    Clap(clap::Error),
    /// The configuration file.
    File(FileError),
}

/// Parses `argv` (with the program name) against `cmd`, which must have the
/// [`CONFIG_ARG`] flag: flags, then `WSGATE_*` variables, then the file `--config`
/// names, then defaults.
///
/// # Errors
/// What clap refuses (including `--help`), or what is wrong in the file.
pub fn parse(cmd: &Command, argv: Vec<OsString>) -> Result<Layered, ParseError> {
    // First pass: what the flags and the environment say. Relations between settings
    // (`requires`) are not checked yet: the file may complete them.
    let first = cmd
        .clone()
        .ignore_errors(true)
        .try_get_matches_from(&argv)
        .map_err(ParseError::Clap)?;
    let Some(path) = first.get_one::<PathBuf>(CONFIG_ARG).cloned() else {
        return cmd
            .clone()
            .try_get_matches_from(argv)
            .map(|matches| Layered {
                matches,
                file: None,
            })
            .map_err(ParseError::Clap);
    };
    let file = ConfigFile::load(&path).map_err(ParseError::File)?;
    let extra = file.args_for(cmd, &first).map_err(ParseError::File)?;
    let matches = cmd
        .clone()
        .try_get_matches_from(argv.into_iter().chain(extra))
        .map_err(ParseError::Clap)?;
    Ok(Layered {
        matches,
        file: Some(file),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::{CommandFactory, FromArgMatches};

    use super::*;
    use crate::Config;

    /// Parses `cmd` like the binary, with `file` as the configuration file.
    fn parse_cmd(cmd: Command, file: &str, args: &[&str]) -> Result<Config, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wsgate.toml");
        std::fs::write(&path, file).unwrap();
        let mut argv: Vec<OsString> = vec!["wsgate".into(), "--config".into(), path.into()];
        argv.extend(args.iter().map(OsString::from));
        let layered = parse(&cmd, argv).map_err(|e| match e {
            ParseError::Clap(e) => e.to_string(),
            ParseError::File(e) => e.to_string(),
        })?;
        Ok(Config::from_arg_matches(&layered.matches).unwrap())
    }

    fn parse_with(file: &str, args: &[&str]) -> Result<Config, String> {
        parse_cmd(Config::command(), file, args)
    }

    #[test]
    fn the_file_fills_what_flags_leave_at_their_default() {
        let c = parse_with(
            "listen = \"127.0.0.1:7001\"\nmax-message-size = \"32KiB\"\nrate_limit = 50\nclient_publish = false\nallowed_origins = [\"https://a.example\", \"https://b.example\"]\nhistory_memory = \"8MiB\"\nmax_publication_size = 1000\n",
            &["--max-message-size", "16KiB"],
        )
        .unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:7001");
        assert_eq!(c.max_message_size, 16 * 1024, "the flag wins");
        assert_eq!(c.rate_limit, 50.0);
        assert!(!c.client_publish);
        assert_eq!(
            c.allowed_origins,
            ["https://a.example", "https://b.example"]
        );
        assert_eq!(c.history_memory, 8 << 20);
        assert_eq!(c.max_publication_size, Some(1000));
        assert_eq!(
            c.heartbeat_interval,
            Duration::from_secs(25),
            "default kept"
        );
    }

    #[test]
    fn the_environment_wins_over_the_file() {
        // A variable name of this test's own: the process environment is shared.
        const VAR: &str = "WSGATE_TEST_CONFIG_FILE_JWT_LEEWAY";
        std::env::set_var(VAR, "7s");
        // clap reads the variable when it is attached.
        let cmd = Config::command().mut_arg("jwt_leeway", |a| a.env(VAR));
        let c = parse_cmd(
            cmd.clone(),
            "jwt_leeway = \"9s\"\nhandshake_timeout = \"3s\"\n",
            &[],
        );
        let flag = parse_cmd(cmd, "jwt_leeway = \"9s\"\n", &["--jwt-leeway", "5s"]);
        std::env::remove_var(VAR);
        let c = c.unwrap();
        assert_eq!(c.jwt_leeway, Duration::from_secs(7), "env over file");
        assert_eq!(
            c.handshake_timeout,
            Duration::from_secs(3),
            "file over default"
        );
        assert_eq!(
            flag.unwrap().jwt_leeway,
            Duration::from_secs(5),
            "flag over env"
        );
    }

    #[test]
    fn the_file_may_complete_a_pair_the_flags_started() {
        let c = parse_with("tls_key = \"k.pem\"\n", &["--tls-cert", "c.pem"]).unwrap();
        assert_eq!(c.tls_key.unwrap(), PathBuf::from("k.pem"));
        let e = parse_with("tls_key = \"k.pem\"\n", &[]).unwrap_err();
        assert!(e.contains("--tls-cert"), "{e}");
    }

    #[test]
    fn bad_settings_are_named_with_their_line() {
        let e = parse_with("listen = \"127.0.0.1:1\"\n\nlisten_addr = \"x\"\n", &[]).unwrap_err();
        assert!(
            e.contains("line 3") && e.contains("unknown setting `listen_addr`"),
            "{e}"
        );
        let e = parse_with("heartbeat_interval = \"soon\"\n", &[]).unwrap_err();
        assert!(
            e.contains("line 1") && e.contains("`heartbeat_interval`") && e.contains("examples"),
            "{e}"
        );
        // Checked even where a flag overrides it.
        let e = parse_with(
            "max_message_size = \"12XB\"\n",
            &["--max-message-size", "1KiB"],
        )
        .unwrap_err();
        assert!(e.contains("`max_message_size`"), "{e}");
        let e = parse_with("log_format = \"xml\"\n", &[]).unwrap_err();
        assert!(e.contains("`log_format`") && e.contains("xml"), "{e}");
        let e = parse_with("listen = [\"a\", \"b\"]\n", &[]).unwrap_err();
        assert!(e.contains("`listen`: takes one value"), "{e}");
        let e = parse_with(
            "admin_listen = \"127.0.0.1:1\"\nadmin-listen = \"127.0.0.1:2\"\n",
            &[],
        )
        .unwrap_err();
        assert!(e.contains("line 2") && e.contains("given twice"), "{e}");
        let e = parse_with("config = \"other.toml\"\n", &[]).unwrap_err();
        assert!(e.contains("`config`"), "{e}");
        let e = parse_with("help = true\n", &[]).unwrap_err();
        assert!(e.contains("unknown setting `help`"), "{e}");
        let e = parse_with("listen = \n", &[]).unwrap_err();
        assert!(e.contains("line 1") && e.contains("not valid TOML"), "{e}");
        let e = parse_with("[[namespaces]]\nname = \"a\"\ntopics = [\"x\"]\nhistory_size = 0\nhistory_ttl = \"1m\"\n", &[]).unwrap_err();
        assert!(e.contains("line 4") && e.contains("history_size"), "{e}");
    }

    #[test]
    fn an_unreadable_file_names_the_flag() {
        let argv = ["wsgate", "--config", "/nonexistent/wsgate.toml"].map(OsString::from);
        let Err(ParseError::File(e)) = parse(&Config::command(), argv.to_vec()) else {
            panic!("a missing file is an error")
        };
        assert!(e.to_string().contains("--config"), "{e}");
    }

    #[test]
    fn without_a_file_nothing_changes() {
        let argv = ["wsgate", "--listen", "127.0.0.1:7002"].map(OsString::from);
        let Ok(l) = parse(&Config::command(), argv.to_vec()) else {
            panic!("valid")
        };
        assert!(l.file.is_none());
        assert!(!l.namespaces().has_streams());
        let c = Config::from_arg_matches(&l.matches).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:7002");
        let argv = ["wsgate", "--listen", "nope"].map(OsString::from);
        assert!(matches!(
            parse(&Config::command(), argv.to_vec()),
            Err(ParseError::Clap(_))
        ));
    }
}
