//! Topic permissions: lists of patterns from a token's claims (docs/auth.md).
//!
//! Topics are split into segments at `.`. In a pattern:
//! - `*` as a whole segment matches exactly one segment (any text, even empty);
//! - `**` as the last segment matches one or more remaining segments;
//! - `{sub}` anywhere in a segment is replaced by the token's subject; a subject that
//!   contains `.` `*` or `{`, or is empty, makes that pattern match nothing (so a
//!   subject can never widen its own permissions);
//! - anything else matches itself exactly.
//!
//! Patterns are compiled once per token; matching allocates nothing.

/// One segment of a compiled pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Literal(String),
    One,
    Rest,
}

/// Compiled patterns: a topic is allowed when any pattern matches it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    any: bool,
    patterns: Vec<Vec<Seg>>,
}

fn compile(pattern: &str, subject: &str) -> Option<Vec<Seg>> {
    if pattern.is_empty() {
        return None;
    }
    let parts: Vec<&str> = pattern.split('.').collect();
    let last = parts.len() - 1;
    let mut segs = Vec::with_capacity(parts.len());
    for (i, part) in parts.into_iter().enumerate() {
        segs.push(match part {
            "*" => Seg::One,
            "**" if i == last => Seg::Rest,
            // `**` in the middle is not a wildcard: refuse the whole pattern rather
            // than guess what was meant.
            "**" => return None,
            p if p.contains("{sub}") => {
                let unsafe_subject = subject.is_empty() || subject.contains(['.', '*', '{', '}']);
                if unsafe_subject {
                    return None;
                }
                Seg::Literal(p.replace("{sub}", subject))
            }
            p => Seg::Literal(p.to_owned()),
        });
    }
    Some(segs)
}

fn matches(pattern: &[Seg], topic: &str) -> bool {
    let mut parts = topic.split('.');
    for (i, seg) in pattern.iter().enumerate() {
        match seg {
            Seg::Rest => {
                debug_assert_eq!(i, pattern.len() - 1);
                return parts.next().is_some();
            }
            Seg::One => {
                if parts.next().is_none() {
                    return false;
                }
            }
            Seg::Literal(l) => {
                if parts.next() != Some(l.as_str()) {
                    return false;
                }
            }
        }
    }
    parts.next().is_none()
}

impl Acl {
    /// Compiles `patterns` for a token whose subject is `subject`.
    pub fn new<S: AsRef<str>>(patterns: &[S], subject: &str) -> Self {
        Acl {
            any: false,
            patterns: patterns
                .iter()
                .filter_map(|p| compile(p.as_ref(), subject))
                .collect(),
        }
    }

    /// Allows every topic (anonymous clients of a gateway without auth).
    pub fn any() -> Self {
        Acl {
            any: true,
            patterns: Vec::new(),
        }
    }

    /// Whether `topic` is allowed.
    pub fn allows(&self, topic: &str) -> bool {
        self.any || self.patterns.iter().any(|p| matches(p, topic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn acl(p: &[&str]) -> Acl {
        Acl::new(p, "alice")
    }

    #[test]
    fn wildcards() {
        let a = acl(&["chat.*", "news", "logs.**"]);
        assert!(a.allows("chat.1"));
        assert!(a.allows("chat."));
        assert!(!a.allows("chat"));
        assert!(!a.allows("chat.1.2"));
        assert!(a.allows("news"));
        assert!(!a.allows("news.x"));
        assert!(!a.allows("newsx"));
        assert!(a.allows("logs.a"));
        assert!(a.allows("logs.a.b.c"));
        assert!(!a.allows("logs"));
        assert!(!a.allows("other"));
        assert!(!Acl::default().allows("news"));
        assert!(Acl::any().allows("anything"));
    }

    #[test]
    fn subject_substitution() {
        let a = acl(&["user.{sub}.*", "dm-{sub}"]);
        assert!(a.allows("user.alice.inbox"));
        assert!(!a.allows("user.bob.inbox"));
        assert!(!a.allows("user.{sub}.inbox"));
        assert!(a.allows("dm-alice"));
        // A subject with a dot or wildcard cannot widen the pattern.
        for evil in ["a.b", "*", "", "{sub}", "**"] {
            let a = Acl::new(&["user.{sub}.*"], evil);
            assert!(!a.allows("user.a.b.x"), "{evil}");
            assert!(!a.allows("user.x.y"), "{evil}");
            assert!(!a.allows("user..y"), "{evil}");
        }
    }

    #[test]
    fn bad_patterns_match_nothing() {
        let a = acl(&["", "a.**.b"]);
        assert!(!a.allows("a.x.b"));
        assert!(!a.allows(""));
    }

    fn topic() -> impl Strategy<Value = String> {
        "[a-z0-9_:/-]{0,4}(\\.[a-z0-9_:/-]{0,4}){0,4}"
    }

    proptest! {
        #[test]
        fn a_literal_pattern_matches_only_itself(p in topic(), t in topic()) {
            let a = Acl::new(&[&p], "alice");
            prop_assert_eq!(a.allows(&t), p == t && !p.is_empty());
        }

        #[test]
        fn star_matches_every_one_segment_suffix(prefix in "[a-z]{1,5}", seg in "[a-z0-9_-]{0,8}") {
            let a = Acl::new(&[format!("{prefix}.*")], "alice");
            let one = format!("{prefix}.{seg}");
            prop_assert!(a.allows(&one));
            let deeper = format!("{prefix}.{seg}.x");
            prop_assert!(!a.allows(&deeper));
        }

        #[test]
        fn matching_never_panics(ps in proptest::collection::vec(".{0,12}", 0..4), sub in ".{0,6}", t in ".{0,24}") {
            let a = Acl::new(&ps, &sub);
            let _ = a.allows(&t);
        }

        #[test]
        fn subject_only_reaches_its_own_topics(sub in "[a-z.*{}]{0,6}", other in "[a-z]{1,6}", leaf in "[a-z]{1,4}") {
            let a = Acl::new(&["user.{sub}.*"], &sub);
            let t = format!("user.{other}.{leaf}");
            prop_assert_eq!(a.allows(&t), other == sub);
        }
    }
}
