//! The error of a leg's read or write, by whose fault it was.

use std::io;

/// Why a leg's read or write failed, and whose fault it was: a hostile or broken peer
/// ([`LegError::Peer`], [`LegError::Tls`]) or the network and local state ([`LegError::Io`]).
#[derive(Debug)]
pub enum LegError {
    /// The peer broke a rule of the relay's TLS layer (a record or handshake message it
    /// refuses).
    Peer(PeerRule),
    /// rustls refused the peer's input (a record not under the session's key, a malformed
    /// message); an alert went out where it could.
    Tls(Box<rustls::Error>),
    /// The socket failed (a reset, the peer's network, a deadline's shutdown), or the leg was
    /// already closed or failed on our side.
    Io(io::Error),
}

/// A rule of the relay's TLS layer a peer broke (a `u8`, so that a [`LegError`] stays two
/// words: it sits in every read and write future of every leg).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRule {
    /// A record longer than a pool buffer holds.
    RecordTooLarge,
    /// Handshake input spread over more records than a pool buffer holds.
    InputTooLarge,
    /// A record's plaintext that does not fit in front of the record.
    PlaintextDoesNotFit,
    /// A handshake message split across records after the handshake.
    FragmentedAfterHandshake,
    /// Early data, or another TLS state the relay does not serve.
    UnexpectedState,
}

impl PeerRule {
    fn as_str(self) -> &'static str {
        match self {
            PeerRule::RecordTooLarge => "TLS record too large",
            PeerRule::InputTooLarge => "TLS input too large",
            PeerRule::PlaintextDoesNotFit => "TLS plaintext does not fit in front of its record",
            PeerRule::FragmentedAfterHandshake => {
                "TLS handshake message fragmented after the handshake"
            }
            PeerRule::UnexpectedState => "unexpected TLS state (early data)",
        }
    }
}

/// A leg operation's result.
pub type LegResult<T> = Result<T, LegError>;

impl LegError {
    pub(super) fn local(what: &'static str) -> LegError {
        LegError::Io(io::Error::other(what))
    }

    /// Whether the peer is at fault (it sent something the relay refuses).
    pub fn peer_fault(&self) -> bool {
        matches!(self, LegError::Peer(_) | LegError::Tls(_))
    }
}

impl std::fmt::Display for LegError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LegError::Peer(rule) => write!(f, "peer: {}", rule.as_str()),
            LegError::Tls(e) => write!(f, "tls: {e}"),
            LegError::Io(e) => write!(f, "io: {e}"),
        }
    }
}

impl From<rustls::Error> for LegError {
    fn from(e: rustls::Error) -> Self {
        LegError::Tls(Box::new(e))
    }
}

impl From<io::Error> for LegError {
    fn from(e: io::Error) -> Self {
        LegError::Io(e)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_leg_error_is_two_words() {
        // It is held in every read and write future of every leg (issue 13: memory per idle
        // session); a rustls::Error inline made those futures ~100 bytes larger each.
        assert_eq!(std::mem::size_of::<super::LegError>(), 16);
    }
}
