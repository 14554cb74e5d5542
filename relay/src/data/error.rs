//! The error of a leg's read or write, by whose fault it was.

use std::io;

/// Why a leg's read or write failed, and whose fault it was: a hostile or broken peer
/// ([`LegError::Peer`], [`LegError::Tls`]) or the network and local state ([`LegError::Io`]).
#[derive(Debug)]
pub enum LegError {
    /// The peer broke a rule of the relay's TLS layer (a record or handshake message it
    /// refuses).
    Peer(&'static str),
    /// rustls refused the peer's input (a record not under the session's key, a malformed
    /// message); an alert went out where it could.
    Tls(rustls::Error),
    /// The socket failed (a reset, the peer's network, a deadline's shutdown), or the leg was
    /// already closed or failed on our side.
    Io(io::Error),
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
            LegError::Peer(what) => write!(f, "peer: {what}"),
            LegError::Tls(e) => write!(f, "tls: {e}"),
            LegError::Io(e) => write!(f, "io: {e}"),
        }
    }
}

impl From<io::Error> for LegError {
    fn from(e: io::Error) -> Self {
        LegError::Io(e)
    }
}
