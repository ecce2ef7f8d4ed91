//! The slot map: which primary owns each of the 16384 hash slots, read with
//! `CLUSTER SLOTS` from any node that answers.
//!
//! Primaries are numbered by the lowest slot they own (shard 0 owns slot 0). The
//! number is the `shard` label of the per-shard metrics: bounded by the number of
//! primaries, and stable across a failover (the promoted replica owns the same slots,
//! so it gets the same number).

use std::sync::Arc;

use crate::cluster::resp::{self, Auth, Value};
use crate::cluster::slot::SLOTS;

/// A node address as the cluster announces it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr {
    pub host: Arc<str>,
    pub port: u16,
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl Addr {
    /// Parses `host:port` (as in a `MOVED` reply).
    pub fn parse(s: &str) -> Option<Addr> {
        let (host, port) = s.rsplit_once(':')?;
        Some(Addr {
            host: Arc::from(host),
            port: port.parse().ok()?,
        })
    }
}

/// Slot → primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotMap {
    /// Index into `primaries` per slot; `u16::MAX` when no node serves the slot.
    owner: Vec<u16>,
    /// Primaries in shard-number order.
    primaries: Vec<Addr>,
}

const NONE: u16 = u16::MAX;

impl Default for SlotMap {
    fn default() -> Self {
        SlotMap {
            owner: vec![NONE; SLOTS],
            primaries: Vec::new(),
        }
    }
}

impl SlotMap {
    /// Builds a map from `(first slot, last slot, primary)` ranges.
    pub fn from_ranges(mut ranges: Vec<(u16, u16, Addr)>) -> SlotMap {
        ranges.sort_by_key(|r| r.0);
        let mut map = SlotMap::default();
        for (first, last, addr) in ranges {
            let idx = match map.primaries.iter().position(|a| *a == addr) {
                Some(i) => i,
                None => {
                    map.primaries.push(addr);
                    map.primaries.len() - 1
                }
            };
            for s in first..=last.min(SLOTS as u16 - 1) {
                map.owner[s as usize] = idx as u16;
            }
        }
        map
    }

    /// The shard number and primary owning `slot`.
    pub fn owner(&self, slot: u16) -> Option<(usize, &Addr)> {
        let i = *self.owner.get(slot as usize)?;
        (i != NONE).then(|| (i as usize, &self.primaries[i as usize]))
    }

    /// Primaries in shard-number order.
    pub fn primaries(&self) -> &[Addr] {
        &self.primaries
    }

    /// Shard number of a primary.
    pub fn shard_of(&self, addr: &Addr) -> Option<usize> {
        self.primaries.iter().position(|a| a == addr)
    }

    /// Whether every slot has an owner (the cluster can serve every channel).
    pub fn covers_all(&self) -> bool {
        !self.primaries.is_empty() && self.owner.iter().all(|&i| i != NONE)
    }

    /// Reads a `CLUSTER SLOTS` reply. A node that announces an empty host (it does
    /// not know its own address) is reached at `fallback_host`, the host we asked.
    pub fn from_cluster_slots(reply: &Value, fallback_host: &str) -> Result<SlotMap, String> {
        let Value::Array(entries) = reply else {
            return Err(format!("CLUSTER SLOTS: unexpected reply {reply:?}"));
        };
        let mut ranges = Vec::new();
        for e in entries {
            let Value::Array(f) = e else {
                return Err("CLUSTER SLOTS: entry is not an array".into());
            };
            let (Some(first), Some(last), Some(Value::Array(node))) = (
                f.first().and_then(Value::int),
                f.get(1).and_then(Value::int),
                f.get(2),
            ) else {
                return Err("CLUSTER SLOTS: malformed entry".into());
            };
            let host = node
                .first()
                .and_then(Value::bytes)
                .map(|h| String::from_utf8_lossy(h).into_owned())
                .unwrap_or_default();
            let host = if host.is_empty() || host == "?" {
                fallback_host.to_string()
            } else {
                host
            };
            let port = node.get(1).and_then(Value::int).unwrap_or(0);
            let (Ok(first), Ok(last), Ok(port)) = (
                u16::try_from(first),
                u16::try_from(last),
                u16::try_from(port),
            ) else {
                return Err("CLUSTER SLOTS: value out of range".into());
            };
            ranges.push((
                first,
                last,
                Addr {
                    host: Arc::from(host),
                    port,
                },
            ));
        }
        Ok(SlotMap::from_ranges(ranges))
    }
}

/// Asks the nodes in `candidates`, in order, for the slot map; the first complete
/// answer wins, else the first partial one (a cluster that lost a shard still
/// serves the others).
///
/// # Errors
/// When no candidate answered.
pub async fn discover(candidates: &[Addr], auth: &Auth) -> Result<SlotMap, String> {
    let mut partial: Option<SlotMap> = None;
    let mut last_error = String::from("no Redis Cluster node to ask");
    for addr in candidates {
        match ask(addr, auth).await {
            Ok(map) if map.covers_all() => return Ok(map),
            Ok(map) => {
                if partial.is_none() && !map.primaries().is_empty() {
                    partial = Some(map);
                }
            }
            Err(e) => last_error = format!("{addr}: {e}"),
        }
    }
    partial.ok_or(last_error)
}

async fn ask(addr: &Addr, auth: &Auth) -> Result<SlotMap, String> {
    let once = async {
        let (mut r, mut w) = resp::open(&addr.host, addr.port, auth)
            .await
            .map_err(|e| e.to_string())?;
        let mut cmd = Vec::new();
        resp::encode(&mut cmd, &["CLUSTER", "SLOTS"]);
        w.send(&cmd).await.map_err(|e| e.to_string())?;
        let reply = r.next().await.map_err(|e| e.to_string())?;
        if let Value::Error(e) = &reply {
            return Err(e.clone());
        }
        SlotMap::from_cluster_slots(&reply, &addr.host)
    };
    tokio::time::timeout(resp::CONNECT_TIMEOUT * 2, once)
        .await
        .map_err(|_| "CLUSTER SLOTS timed out".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(p: u16) -> Addr {
        Addr {
            host: Arc::from("127.0.0.1"),
            port: p,
        }
    }

    #[test]
    fn shards_are_numbered_by_lowest_slot() {
        let m = SlotMap::from_ranges(vec![
            (10923, 16383, a(3)),
            (0, 5460, a(1)),
            (5461, 10922, a(2)),
        ]);
        assert!(m.covers_all());
        assert_eq!(m.primaries(), &[a(1), a(2), a(3)]);
        assert_eq!(m.owner(0), Some((0, &a(1))));
        assert_eq!(m.owner(5461), Some((1, &a(2))));
        assert_eq!(m.owner(16383), Some((2, &a(3))));
        assert_eq!(m.owner(16384), None);
        let partial = SlotMap::from_ranges(vec![(0, 100, a(1))]);
        assert!(!partial.covers_all());
        assert_eq!(partial.owner(101), None);
    }

    #[test]
    fn reads_cluster_slots_replies() {
        let node = |h: &str, p: i64| {
            Value::Array(vec![
                Value::Bulk(h.as_bytes().to_vec()),
                Value::Int(p),
                Value::Bulk(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(8191),
                node("10.0.0.1", 7000),
                node("10.0.0.9", 7009),
            ]),
            Value::Array(vec![Value::Int(8192), Value::Int(16383), node("", 7001)]),
        ]);
        let m = SlotMap::from_cluster_slots(&reply, "seed").unwrap();
        assert!(m.covers_all());
        assert_eq!(m.owner(1).unwrap().1.to_string(), "10.0.0.1:7000");
        assert_eq!(m.owner(9000).unwrap().1.to_string(), "seed:7001");
        assert!(SlotMap::from_cluster_slots(&Value::Int(1), "x").is_err());
        assert_eq!(Addr::parse("127.0.0.1:7002"), Some(a(7002)));
    }
}
