//! The configuration file as the binary reads it: `--config` / `WSGATE_CONFIG`, its
//! precedence under flags and variables, `wsgate check-config`, and namespaces that
//! make topics streams.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::json;

use wsgate_testkit::http::blocking as http;
use wsgate_testkit::process::Node;
use wsgate_testkit::{free_port, wait_until};

fn addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

/// `text` as `wsgate.toml` in a directory of its own.
fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wsgate.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// The binary with `args` and `env`, and no other `WSGATE_*` variable.
fn wsgate(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("WSGATE_")) {
        cmd.env_remove(k);
    }
    cmd.args(args).envs(env.iter().copied());
    cmd
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    wsgate(args, env).output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A node started with only what the test gives it; killed on drop.
struct Running(Child);

impl Running {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Running {
        let child = wsgate(args, env)
            .args(["--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Running(child)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn healthy(admin: SocketAddr) -> bool {
    wait_until(Duration::from_secs(10), || {
        http(admin, "GET", "/healthz", "").0 == 200
    })
}

fn publishes(listen: SocketAddr) -> bool {
    let body = r#"{"topic":"t","data":1}"#;
    http(listen, "POST", "/api/publish", body).0 == 200
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn the_file_sets_the_listeners_and_a_flag_overrides_it() {
    let (listen, admin, other) = (addr(), addr(), addr());
    let (_dir, cfg) = file(&format!(
        "# both listeners from the file\nlisten = \"{listen}\"\nadmin-listen = \"{admin}\"\n"
    ));
    {
        let _node = Running::start(&["--config", path(&cfg)], &[]);
        assert!(healthy(admin), "admin_listen from the file");
        assert!(publishes(listen), "listen from the file");
    }
    let _node = Running::start(
        &["--config", path(&cfg), "--listen", &other.to_string()],
        &[],
    );
    assert!(healthy(admin), "admin_listen still from the file");
    assert!(publishes(other), "the flag's listen");
    assert!(!publishes(listen), "the file's listen is overridden");
}

#[test]
fn the_environment_overrides_the_file_and_may_name_it() {
    let (listen, admin, env_admin) = (addr(), addr(), addr());
    let (_dir, cfg) = file(&format!(
        "listen = \"{listen}\"\nadmin_listen = \"{admin}\"\n"
    ));
    let env_admin_s = env_admin.to_string();
    let _node = Running::start(
        &[],
        &[
            ("WSGATE_CONFIG", path(&cfg)),
            ("WSGATE_ADMIN_LISTEN", &env_admin_s),
        ],
    );
    assert!(healthy(env_admin), "the variable's admin_listen");
    assert!(
        publishes(listen),
        "listen from the file named by WSGATE_CONFIG"
    );
    assert_eq!(
        http(admin, "GET", "/healthz", "").0,
        0,
        "file's admin_listen overridden"
    );
}

#[test]
fn check_config_exits_0_with_a_summary_or_2_naming_the_setting() {
    let (_dir, good) = file(
        "max_message_size = \"32KiB\"\n\n[[namespaces]]\nname = \"chat\"\ntopics = [\"chat:*\"]\nhistory_size = 1000\nhistory_ttl = \"10m\"\n\n[[namespaces]]\nname = \"news\"\ntopics = [\"news\"]\n",
    );
    let out = run(&["check-config", path(&good)], &[]);
    let summary = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        summary.contains("chat: chat:* → stream (history 1000 messages, 10m)"),
        "{summary}"
    );
    assert!(summary.contains("news: news → plain"), "{summary}");

    // A bad namespace setting: exit 2, naming it and its line, at check and at start.
    let (_dir2, bad) = file(
        "[[namespaces]]\nname = \"chat\"\ntopics = [\"chat:*\"]\nhistory_size = 0\nhistory_ttl = \"10m\"\n",
    );
    let out = run(&["check-config", path(&bad)], &[]);
    assert_eq!(out.status.code(), Some(2));
    let message = stderr(&out);
    assert!(
        message.contains("line 4") && message.contains("history_size"),
        "{message}"
    );
    let start = run(&["--config", path(&bad)], &[]);
    assert_eq!(start.status.code(), Some(2));
    assert_eq!(stderr(&start), message, "the start says the same");

    // The environment is checked with the file, as the start would.
    let out = run(
        &["check-config", path(&good)],
        &[("WSGATE_MAX_CONNECTIONS", "0")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--max-connections"),
        "{}",
        stderr(&out)
    );
    // And flags after the file.
    let out = run(
        &["check-config", path(&good), "--max-message-size", "12"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--max-message-size"),
        "{}",
        stderr(&out)
    );
    // A file that is not there.
    let out = run(&["check-config", "/nonexistent/wsgate.toml"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--config"), "{}", stderr(&out));
}

#[test]
fn unknown_keys_and_bad_values_are_refused() {
    let (_dir, cfg) = file("listen = \"127.0.0.1:0\"\nheartbeat_intervall = \"5s\"\n");
    for args in [
        vec!["check-config", path(&cfg)],
        vec!["--config", path(&cfg)],
    ] {
        let out = run(&args, &[]);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let message = stderr(&out);
        assert!(
            message.contains("line 2") && message.contains("unknown setting `heartbeat_intervall`"),
            "{message}"
        );
    }
    let (_dir, cfg) = file("[[namespaces]]\nname = \"a\"\ntopics = [\"a:*\"]\nhistory = 5\n");
    let out = run(&["check-config", path(&cfg)], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("unknown field `history`"),
        "{}",
        stderr(&out)
    );
    let (_dir, cfg) = file("drain_timeout = \"soon\"\n");
    let out = run(&["check-config", path(&cfg)], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("`drain_timeout`"), "{}", stderr(&out));
}

#[test]
fn help_lists_check_config_and_the_new_flags() {
    let out = run(&["--help"], &[]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    let line = help
        .lines()
        .find(|l| l.trim_start().starts_with("check-config "))
        .unwrap_or_else(|| panic!("--help does not list `check-config`:\n{help}"));
    assert!(line.contains("configuration file"), "{line}");
    for flag in [
        "--config",
        "WSGATE_CONFIG",
        "--history-memory",
        "WSGATE_HISTORY_MEMORY",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
    let out = run(&["check-config", "--help"], &[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("<FILE>"));
}

#[tokio::test]
async fn namespaces_in_the_file_make_their_topics_streams() {
    let (_dir, cfg) = file(
        "[[namespaces]]\nname = \"chat\"\ntopics = [\"chat:*\"]\nhistory_size = 10\nhistory_ttl = \"1m\"\n",
    );
    let node = Node::start(None, &["--config", path(&cfg)]);
    let mut c = node.connect().await;
    let r = c
        .call(json!({"op":"publish","topic":"chat:1","data":"a"}))
        .await;
    assert_eq!(r["op"], "published", "{r}");
    assert_eq!(r["seq"], 1, "a stream publication is numbered: {r}");
    let r = c
        .call(json!({"op":"publish","topic":"news","data":"a"}))
        .await;
    assert_eq!(r["op"], "published", "{r}");
    assert!(r.get("seq").is_none(), "no namespace: a plain topic: {r}");

    // Without the file, the same topic is plain (the default: no streams).
    let plain = Node::start(None, &[]);
    let mut c = plain.connect().await;
    let r = c
        .call(json!({"op":"publish","topic":"chat:1","data":"a"}))
        .await;
    assert!(r.get("seq").is_none(), "{r}");
}

#[test]
fn the_readme_table_lists_every_flag_of_help() {
    let out = run(&["--help"], &[]);
    let help = String::from_utf8_lossy(&out.stdout);
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let flags: Vec<&str> = help
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .filter_map(|l| l.split([' ', '<']).next())
        .filter(|f| !matches!(*f, "help" | "version"))
        .collect();
    assert!(flags.len() > 40, "{flags:?}");
    let missing: Vec<_> = flags
        .iter()
        .filter(|f| !readme.contains(&format!("`--{f}`")))
        .collect();
    assert!(missing.is_empty(), "README.md lacks {missing:?}");
}
