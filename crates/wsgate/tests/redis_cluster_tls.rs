//! Cluster mode over TLS and with credentials: a real 3-primary Redis Cluster that
//! speaks only TLS (`--port 0 --tls-port P`, TLS on the cluster bus too) and wants a
//! password, with an ACL user; certificates made here (a CA, a server certificate for
//! IP 127.0.0.1). Nodes with the default user's password and with the ACL user relay
//! between each other on every shard; a wrong CA or a wrong password leaves a node up
//! but not ready, without the password in its logs.

use std::time::Duration;

use serde_json::json;
use wsgate_redis::cluster::slot::key_slot;
use wsgate_testkit::process::Node;
use wsgate_testkit::redis::{Access, RedisCluster};
use wsgate_testkit::tls::Pki;
use wsgate_testkit::wait_until;
use wsgate_testkit::ws::Client;

const WAIT: Duration = Duration::from_secs(15);
const PASSWORD: &str = "cluster-Pa55";
const ALICE_PASSWORD: &str = "alice-cluster-Pa55";

/// A CA, a server certificate for IP 127.0.0.1 (what the cluster announces), and an
/// unrelated CA (`other-ca.pem`).
fn pki() -> Pki {
    let pki = Pki::new("wsgate cluster test CA");
    pki.leaf("server", &["127.0.0.1"]);
    pki
}

fn tls_cluster(pki: &Pki) -> RedisCluster {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    let user = format!(">{ALICE_PASSWORD}");
    let access = Access {
        server_args: s(&[
            "--tls-cert-file",
            &pki.arg("server.pem"),
            "--tls-key-file",
            &pki.arg("server.key"),
            "--tls-ca-cert-file",
            &pki.arg("ca.pem"),
            "--tls-auth-clients",
            "no",
            "--tls-cluster",
            "yes",
            "--tls-replication",
            "yes",
            "--requirepass",
            PASSWORD,
            "--masterauth",
            PASSWORD,
            "--user",
            "alice",
            "on",
            &user,
            "~*",
            "&*",
            "+@all",
        ]),
        cli_args: s(&["--tls", "--cacert", &pki.arg("ca.pem"), "-a", PASSWORD]),
        tls: true,
        password: Some(PASSWORD.into()),
    };
    RedisCluster::start_with(3, 0, access)
}

fn node(seeds: &str, extra: &[&str]) -> Node {
    let mut args = vec![
        "--redis-mode",
        "cluster",
        "--rate-limit",
        "1000000",
        "--rate-burst",
        "1000000",
    ];
    args.extend_from_slice(extra);
    Node::start_logged(Some(seeds), &args)
}

/// Seed URLs (the first two nodes) with `auth` (`:password@`, `user@`) inserted.
fn seeds(cluster: &RedisCluster, auth: &str) -> String {
    cluster
        .seeds()
        .split(',')
        .map(|u| u.replace("rediss://", &format!("rediss://{auth}")))
        .collect::<Vec<_>>()
        .join(",")
}

/// One topic per primary.
fn one_topic_per_shard(cluster: &RedisCluster) -> Vec<String> {
    let ranges = cluster.slot_ranges();
    let mut out: Vec<(String, u16)> = Vec::new();
    for i in 0.. {
        let topic = format!("tls.{i}");
        let slot = key_slot(format!("wsgate:{topic}").as_bytes());
        let port = ranges
            .iter()
            .find(|(a, b, _)| (*a..=*b).contains(&slot))
            .unwrap()
            .2;
        if !out.iter().any(|(_, p)| *p == port) {
            out.push((topic, port));
        }
        if out.len() == cluster.primaries().len() {
            break;
        }
    }
    out.into_iter().map(|(t, _)| t).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_cluster_with_password_and_acl_user_relays_on_every_shard() {
    let pki = pki();
    let cluster = tls_cluster(&pki);
    let ca = pki.arg("ca.pem");
    // The default user's password in the URLs; the ACL user in the URL with its
    // password apart (what the Helm chart does).
    let a = node(
        &seeds(&cluster, &format!(":{PASSWORD}@")),
        &["--redis-ca-file", &ca],
    );
    let b = node(
        &seeds(&cluster, "alice@"),
        &["--redis-ca-file", &ca, "--redis-password", ALICE_PASSWORD],
    );
    assert!(
        wait_until(WAIT, || a.is_ready() && b.is_ready()),
        "{}{}",
        a.logs(),
        b.logs()
    );
    let topics = one_topic_per_shard(&cluster);
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let mut subs = Vec::new();
    for n in [&a, &b] {
        let mut c = Client::connect(n.addr).await;
        c.subscribe(&names).await;
        subs.push(c);
    }
    let mut publisher = Client::connect(a.addr).await;
    for t in &topics {
        let r = publisher
            .call(json!({"op":"publish","topic":t,"data":{"from":"ws"}}))
            .await;
        assert_eq!(r["op"], "published", "{r}");
        let (status, body) = b.http_publish(t, json!({"from":"http"}));
        assert_eq!(status, 200, "{body}");
        let out = cluster.cli_spublish(&format!("wsgate:{t}"), r#"{"from":"backend"}"#);
        assert_eq!(
            out.trim(),
            "2",
            "both nodes hold the channel over TLS: {out}"
        );
    }
    for (i, c) in subs.iter_mut().enumerate() {
        let mut got: std::collections::HashMap<String, Vec<String>> = Default::default();
        for _ in 0..3 * topics.len() {
            let m = c
                .next_message(WAIT)
                .await
                .unwrap_or_else(|| panic!("node {i}: only {got:?}"));
            got.entry(m["topic"].as_str().unwrap().to_string())
                .or_default()
                .push(m["data"]["from"].as_str().unwrap().to_string());
        }
        for t in &topics {
            assert_eq!(got[t], ["ws", "http", "backend"], "node {i}, {t}");
        }
    }
    // Node b is connected as alice, on every primary.
    for port in cluster.primaries() {
        let clients = cluster.cli_on(port, &["CLIENT", "LIST"]);
        assert!(clients.contains("user=alice"), "primary {port}: {clients}");
    }
    for n in [&a, &b] {
        assert!(!n.logs().contains(PASSWORD), "{}", n.logs());
        assert!(!n.logs().contains(ALICE_PASSWORD), "{}", n.logs());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_cluster_with_wrong_ca_or_password_is_not_ready() {
    let pki = pki();
    let cluster = tls_cluster(&pki);
    let (ca, other) = (pki.arg("ca.pem"), pki.arg("other-ca.pem"));
    let wrong_ca = node(
        &seeds(&cluster, &format!(":{PASSWORD}@")),
        &["--redis-ca-file", &other],
    );
    let wrong_password = node(
        &seeds(&cluster, "alice@"),
        &["--redis-ca-file", &ca, "--redis-password", "not-it"],
    );
    let plain = node(
        &cluster.seeds().replace("rediss://", "redis://"),
        &["--redis-password", PASSWORD],
    );
    // Several connection attempts: none may ever make them ready.
    std::thread::sleep(Duration::from_secs(3));
    for n in [&wrong_ca, &wrong_password, &plain] {
        assert_eq!(n.get("/healthz").0, 200);
        let (status, body) = n.get("/readyz");
        assert_eq!(status, 503, "{body}");
        assert!(body.contains(r#""broker_ready":false"#), "{body}");
        let mut c = Client::connect(n.addr).await;
        assert!(c.alive().await, "local traffic is served");
        let r = c.call(json!({"op":"subscribe","topics":["t"]})).await;
        assert_eq!(r["code"], "unavailable", "{r}");
        assert_eq!(n.http_publish("t", json!(1)).0, 503);
        assert!(!n.logs().contains(PASSWORD), "{}", n.logs());
    }
    assert!(
        wrong_ca.logs().contains("TLS failed") || wrong_ca.logs().contains("certificate"),
        "{}",
        wrong_ca.logs()
    );
    assert!(
        wrong_password.logs().contains("credentials"),
        "{}",
        wrong_password.logs()
    );
}
