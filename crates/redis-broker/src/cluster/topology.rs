//! The slot map as this node reads it (`CLUSTER SLOTS`, through the cluster client):
//! which primary owns each of the 16384 hash slots.
//!
//! The redis crate keeps its own map for routing; this one is for what the crate does
//! not expose: readiness (every slot served), the per-shard metrics, and noticing that
//! a shard's primary changed (failover) or a slot moved, so that the topics concerned
//! are subscribed again. Primaries are numbered by the lowest slot they own (shard 0
//! owns slot 0): the `shard` label, bounded by the number of primaries and stable
//! across a failover (the promoted replica owns the same slots).

use std::sync::Arc;

use redis::Value;

use crate::cluster::slot::SLOTS;

/// A primary as `CLUSTER SLOTS` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Primary {
    /// `host:port`, for logs.
    pub addr: Arc<str>,
    /// The node id: what identifies a primary across address changes, and tells a
    /// promoted replica from the primary it replaced.
    pub id: Arc<str>,
}

/// Slot → primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotMap {
    /// Index into `primaries` per slot; `u16::MAX` when no node serves the slot.
    owner: Vec<u16>,
    /// Primaries in shard-number order.
    primaries: Vec<Primary>,
    /// The lowest slot of each primary.
    first_slots: Vec<u16>,
}

const NONE: u16 = u16::MAX;

impl Default for SlotMap {
    fn default() -> Self {
        SlotMap {
            owner: vec![NONE; SLOTS],
            primaries: Vec::new(),
            first_slots: Vec::new(),
        }
    }
}

impl SlotMap {
    /// Builds a map from `(first slot, last slot, primary)` ranges.
    pub fn from_ranges(mut ranges: Vec<(u16, u16, Primary)>) -> SlotMap {
        ranges.sort_by_key(|r| r.0);
        let mut map = SlotMap::default();
        for (first, last, primary) in ranges {
            let idx = match map.primaries.iter().position(|p| p.id == primary.id) {
                Some(i) => i,
                None => {
                    map.primaries.push(primary);
                    map.first_slots.push(first);
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
    pub fn owner(&self, slot: u16) -> Option<(usize, &Primary)> {
        let i = *self.owner.get(slot as usize)?;
        (i != NONE).then(|| (i as usize, &self.primaries[i as usize]))
    }

    /// Primaries in shard-number order.
    pub fn primaries(&self) -> &[Primary] {
        &self.primaries
    }

    /// The lowest slot shard `i` owns.
    pub fn first_slot(&self, i: usize) -> u16 {
        self.first_slots[i]
    }

    /// Whether every slot has an owner (the cluster can serve every channel).
    pub fn covers_all(&self) -> bool {
        !self.primaries.is_empty() && self.owner.iter().all(|&i| i != NONE)
    }

    /// Reads a `CLUSTER SLOTS` reply.
    ///
    /// # Errors
    /// A reply that is not shaped like one.
    pub fn from_cluster_slots(reply: &Value) -> Result<SlotMap, String> {
        let Value::Array(entries) = reply else {
            return Err(format!("CLUSTER SLOTS: unexpected reply {reply:?}"));
        };
        let int = |v: Option<&Value>| match v {
            Some(Value::Int(i)) => Some(*i),
            _ => None,
        };
        let text = |v: Option<&Value>| match v {
            Some(Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            Some(Value::SimpleString(s)) => Some(s.clone()),
            _ => None,
        };
        let mut ranges = Vec::new();
        for e in entries {
            let Value::Array(f) = e else {
                return Err("CLUSTER SLOTS: entry is not an array".into());
            };
            let (Some(first), Some(last), Some(Value::Array(node))) =
                (int(f.first()), int(f.get(1)), f.get(2))
            else {
                return Err("CLUSTER SLOTS: malformed entry".into());
            };
            let host = text(node.first()).unwrap_or_default();
            let port = int(node.get(1)).unwrap_or(0);
            let id = text(node.get(2)).unwrap_or_else(|| format!("{host}:{port}"));
            let (Ok(first), Ok(last)) = (u16::try_from(first), u16::try_from(last)) else {
                return Err("CLUSTER SLOTS: slot out of range".into());
            };
            ranges.push((
                first,
                last,
                Primary {
                    addr: Arc::from(format!("{host}:{port}")),
                    id: Arc::from(id),
                },
            ));
        }
        Ok(SlotMap::from_ranges(ranges))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: u16) -> Primary {
        Primary {
            addr: Arc::from(format!("127.0.0.1:{n}")),
            id: Arc::from(format!("id{n}")),
        }
    }

    #[test]
    fn shards_are_numbered_by_lowest_slot() {
        let m = SlotMap::from_ranges(vec![
            (10923, 16383, p(3)),
            (0, 5460, p(1)),
            (5461, 10922, p(2)),
        ]);
        assert!(m.covers_all());
        assert_eq!(m.primaries(), &[p(1), p(2), p(3)]);
        assert_eq!(m.owner(0), Some((0, &p(1))));
        assert_eq!(m.owner(5461), Some((1, &p(2))));
        assert_eq!(m.owner(16383), Some((2, &p(3))));
        assert_eq!(m.owner(16384), None);
        assert_eq!(m.first_slot(1), 5461);
        let partial = SlotMap::from_ranges(vec![(0, 100, p(1))]);
        assert!(!partial.covers_all());
        assert_eq!(partial.owner(101), None);
    }

    #[test]
    fn reads_cluster_slots_replies() {
        let node = |h: &str, port: i64, id: &str| {
            Value::Array(vec![
                Value::BulkString(h.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(id.as_bytes().to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(8191),
                node("10.0.0.1", 7000, "a"),
                node("10.0.0.9", 7009, "replica"),
            ]),
            // One primary with two ranges is one shard.
            Value::Array(vec![
                Value::Int(8192),
                Value::Int(9000),
                node("10.0.0.2", 7001, "b"),
            ]),
            Value::Array(vec![
                Value::Int(9001),
                Value::Int(16383),
                node("10.0.0.1", 7000, "a"),
            ]),
        ]);
        let m = SlotMap::from_cluster_slots(&reply).unwrap();
        assert!(m.covers_all());
        assert_eq!(m.primaries().len(), 2);
        assert_eq!(&*m.owner(1).unwrap().1.addr, "10.0.0.1:7000");
        assert_eq!(m.owner(9000).unwrap().0, 1);
        assert_eq!(m.owner(16000).unwrap().0, 0);
        assert!(SlotMap::from_cluster_slots(&Value::Int(1)).is_err());
    }
}
