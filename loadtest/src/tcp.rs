//! Forward mode's destination: a plain TCP server on loopback (`hatch-loadtest forward-server`,
//! its own process, one single-threaded runtime), reached by the simulated agents' forwarded
//! connections and, for the floor, by the simulated clients directly. The first byte a
//! connection sends picks what the server does with it:
//!
//! - `E`: echo every byte back at once; at the client's FIN, FIN.
//! - `U` (upload): a sink. It reads the [`Pattern`] stream until the client's FIN, checking
//!   every byte in place, then answers 16 bytes, the bytes it read and how many were not the
//!   pattern's (`u64` big-endian each), and FINs.
//! - `D` + `u64` milliseconds, big-endian (download): a source. It writes the [`Pattern`]
//!   stream for that long (at most [`MAX_SOURCE`]), then the number of pattern bytes it wrote
//!   (`u64` big-endian), and FINs; then reads until the client's FIN.
//!
//! Anything else is closed. Every read and write has a deadline.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout};

/// An echo connection silent this long is closed: it may wait for the whole setup and the
/// parent's `go`, but not for ever.
pub const ECHO_IDLE: Duration = Duration::from_secs(900);
/// A bulk read or write that makes no progress for this long ends the connection.
pub const STALL: Duration = Duration::from_secs(30);
/// Longest download a client may ask for.
pub const MAX_SOURCE: Duration = Duration::from_secs(3600);
/// I/O buffer of the bulk directions.
pub const BULK_BUF: usize = 64 * 1024;

/// The bulk byte stream: byte `p` is byte `p % 8` (little-endian) of word `p / 8`, where word
/// `k` is `k` times an odd constant. A lost, repeated or reordered piece moves every later byte
/// off its place, so a check in place sees it.
#[derive(Debug, Default, Clone)]
pub struct Pattern {
    /// Stream position of the next byte.
    pub pos: u64,
}

impl Pattern {
    fn word(k: u64) -> [u8; 8] {
        k.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes()
    }

    fn byte(p: u64) -> u8 {
        Self::word(p / 8)[(p % 8) as usize]
    }

    /// Fills `buf` with the next bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let head = ((8 - self.pos % 8) % 8).min(buf.len() as u64) as usize;
        let (h, rest) = buf.split_at_mut(head);
        for b in h {
            *b = Self::byte(self.pos);
            self.pos += 1;
        }
        let mut words = rest.chunks_exact_mut(8);
        for w in &mut words {
            w.copy_from_slice(&Self::word(self.pos / 8));
            self.pos += 8;
        }
        for b in words.into_remainder() {
            *b = Self::byte(self.pos);
            self.pos += 1;
        }
    }

    /// Checks `data` as the next bytes of the stream; returns how many were not in place.
    pub fn check(&mut self, data: &[u8]) -> u64 {
        let mut bad = 0u64;
        let head = ((8 - self.pos % 8) % 8).min(data.len() as u64) as usize;
        let (h, rest) = data.split_at(head);
        for &b in h {
            bad += u64::from(b != Self::byte(self.pos));
            self.pos += 1;
        }
        let mut words = rest.chunks_exact(8);
        for w in &mut words {
            let want = Self::word(self.pos / 8);
            if w != want {
                bad += w.iter().zip(want).filter(|(a, b)| *a != b).count() as u64;
            }
            self.pos += 8;
        }
        for &b in words.remainder() {
            bad += u64::from(b != Self::byte(self.pos));
            self.pos += 1;
        }
        bad
    }
}

/// Entry point of `hatch-loadtest forward-server`.
pub fn process_main() -> ExitCode {
    match serve_until_stdin_closes() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hatch-loadtest forward-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve_until_stdin_closes() -> anyhow::Result<()> {
    crate::proc::raise_nofile()?;
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
    let listener = crate::floor::bind_reuseport(addr, 1)?.remove(0);
    let addr = listener.local_addr()?;
    std::thread::Builder::new().name("forward-server".into()).spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
        match rt {
            Ok(rt) => {
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, serve(listener));
            }
            Err(e) => eprintln!("forward-server: runtime: {e}"),
        }
    })?;
    crate::floor::announce_until_stdin_closes(addr)
}

async fn serve(listener: std::net::TcpListener) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("forward-server: {e}");
            return;
        }
    };
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                tokio::task::spawn_local(async move {
                    // A connection that breaks the rules or stalls is just closed.
                    let _ = serve_conn(s).await;
                });
            }
            Err(e) => {
                // Out of file descriptors, most likely: wait a little rather than spin.
                eprintln!("forward-server: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A wait with a deadline; running out is an I/O error like any other.
async fn within<T>(
    d: Duration,
    f: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    timeout(d, f).await.unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

async fn serve_conn(mut s: TcpStream) -> std::io::Result<()> {
    let _ = s.set_nodelay(true);
    let mut kind = [0u8; 1];
    within(ECHO_IDLE, s.read_exact(&mut kind)).await?;
    match kind[0] {
        b'E' => echo(s).await,
        b'U' => sink(s).await,
        b'D' => {
            let mut ms = [0u8; 8];
            within(STALL, s.read_exact(&mut ms)).await?;
            let d = Duration::from_millis(u64::from_be_bytes(ms)).min(MAX_SOURCE);
            source(s, d).await
        }
        _ => Ok(()),
    }
}

async fn echo(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = within(ECHO_IDLE, s.read(&mut buf)).await?;
        if n == 0 {
            return within(STALL, s.shutdown()).await;
        }
        within(STALL, s.write_all(&buf[..n])).await?;
    }
}

async fn sink(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; BULK_BUF];
    let mut p = Pattern::default();
    let mut bad = 0u64;
    loop {
        let n = within(STALL, s.read(&mut buf)).await?;
        if n == 0 {
            break;
        }
        bad += p.check(&buf[..n]);
    }
    let mut answer = [0u8; 16];
    answer[..8].copy_from_slice(&p.pos.to_be_bytes());
    answer[8..].copy_from_slice(&bad.to_be_bytes());
    within(STALL, s.write_all(&answer)).await?;
    within(STALL, s.shutdown()).await
}

async fn source(mut s: TcpStream, d: Duration) -> std::io::Result<()> {
    let mut buf = vec![0u8; BULK_BUF];
    let mut p = Pattern::default();
    let end = Instant::now() + d;
    while Instant::now() < end {
        p.fill(&mut buf);
        within(STALL, s.write_all(&buf)).await?;
    }
    within(STALL, s.write_all(&p.pos.to_be_bytes())).await?;
    within(STALL, s.shutdown()).await?;
    // Until the client's FIN: it has every byte then.
    loop {
        if within(STALL, s.read(&mut buf)).await? == 0 {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_checks_in_any_cut_and_sees_a_lost_or_moved_byte() {
        let mut whole = vec![0u8; 1000];
        Pattern::default().fill(&mut whole);
        // Filled in odd pieces, the stream is the same.
        let mut pieces = vec![0u8; 1000];
        let mut p = Pattern::default();
        for c in pieces.chunks_mut(13) {
            p.fill(c);
        }
        assert_eq!(whole, pieces);
        let mut c = Pattern::default();
        assert_eq!(whole.chunks(7).map(|b| c.check(b)).sum::<u64>(), 0);
        assert_eq!(c.pos, 1000);
        // One byte lost: the bytes after it are out of place.
        let mut lost = whole.clone();
        lost.remove(100);
        assert!(Pattern::default().check(&lost) > 100);
        let mut flipped = whole.clone();
        flipped[555] ^= 1;
        assert_eq!(Pattern::default().check(&flipped), 1);
    }
}
