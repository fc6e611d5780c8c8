//! Completion tokens: what a CQE belongs to, packed into the `user_data`
//! of its SQE.

/// What a CQE belongs to, packed into its `user_data`: kind in the top
/// byte, a 24-bit epoch (session receives), an index in the low 32 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Token {
    ListenerRecv(u32),
    /// `epoch` tells a receive from an earlier one on the same slot index.
    SessionRecv {
        index: u32,
        epoch: u32,
    },
    Send(u32),
    Cancel,
    Wake,
}

pub(super) const EPOCH_MASK: u32 = 0x00ff_ffff;

impl Token {
    pub(super) fn encode(self) -> u64 {
        let (kind, epoch, index) = match self {
            Token::ListenerRecv(i) => (1u64, 0u32, i),
            Token::SessionRecv { index, epoch } => (2, epoch & EPOCH_MASK, index),
            Token::Send(i) => (3, 0, i),
            Token::Cancel => (4, 0, 0),
            Token::Wake => (5, 0, 0),
        };
        kind << 56 | u64::from(epoch) << 32 | u64::from(index)
    }

    pub(super) fn decode(v: u64) -> Option<Token> {
        let index = v as u32;
        let epoch = (v >> 32) as u32 & EPOCH_MASK;
        Some(match v >> 56 {
            1 => Token::ListenerRecv(index),
            2 => Token::SessionRecv { index, epoch },
            3 => Token::Send(index),
            4 => Token::Cancel,
            5 => Token::Wake,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trip() {
        for t in [
            Token::ListenerRecv(0),
            Token::ListenerRecv(u32::MAX),
            Token::SessionRecv { index: 7, epoch: 0 },
            Token::SessionRecv {
                index: u32::MAX,
                epoch: EPOCH_MASK,
            },
            Token::Send(12345),
            Token::Cancel,
            Token::Wake,
        ] {
            assert_eq!(Token::decode(t.encode()), Some(t));
        }
        assert_eq!(Token::decode(0), None);
        assert_eq!(Token::decode(u64::MAX), None);
        // Epochs are 24 bits: a wrapped epoch is the masked value.
        let t = Token::SessionRecv {
            index: 1,
            epoch: EPOCH_MASK + 5,
        }
        .encode();
        assert_eq!(
            Token::decode(t),
            Some(Token::SessionRecv { index: 1, epoch: 4 })
        );
    }
}
