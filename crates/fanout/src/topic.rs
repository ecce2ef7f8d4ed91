//! Topic names: 1–200 bytes of `A-Z a-z 0-9 _ . : / -` (the wire contract).
//!
//! Because the alphabet needs no JSON escaping, a validated topic can be spliced
//! into a JSON document byte for byte (see [`crate::publication`]).

/// Longest topic name the contract allows, in bytes.
pub const MAX_TOPIC_LEN: usize = 200;

/// Why a topic name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("topic is longer than {MAX_TOPIC_LEN} bytes")]
    TooLong,
    #[error("topic contains a character outside A-Z a-z 0-9 _ . : / -")]
    BadChar,
}

/// Checks a topic name against the contract.
pub fn validate_topic(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong);
    }
    if topic.bytes().all(is_topic_byte) {
        Ok(())
    } else {
        Err(TopicError::BadChar)
    }
}

fn is_topic_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'/' | b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_whole_alphabet() {
        assert_eq!(validate_topic("news"), Ok(()));
        assert_eq!(validate_topic("prices.AAPL"), Ok(()));
        assert_eq!(validate_topic("a_b.c:d/e-f09"), Ok(()));
        assert_eq!(validate_topic(&"x".repeat(200)), Ok(()));
    }

    #[test]
    fn refuses_outside_the_alphabet() {
        assert_eq!(validate_topic(""), Err(TopicError::Empty));
        assert_eq!(validate_topic(&"x".repeat(201)), Err(TopicError::TooLong));
        for bad in [
            "a b",
            "a*",
            "ünïcode",
            "a\"b",
            "a\\b",
            "a,b",
            "{room}",
            "a\n",
        ] {
            assert_eq!(validate_topic(bad), Err(TopicError::BadChar), "{bad:?}");
        }
    }
}
