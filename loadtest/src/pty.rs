//! The `--mode pty` agent session: a real PTY in raw mode running `cat`, so the round trip
//! includes the terminal layer and a process's read and write. DATA from the client is written
//! to the PTY; whatever the PTY yields is sent back as DATA.

use std::os::fd::{AsFd, OwnedFd};
use std::process::Stdio;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hatch_proto::channel::{Message as Chan, TYPE_DATA};
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::net::{Failure, Ws};
use crate::worker::Ctl;

/// Read size from the PTY: one DATA message at most this large.
const READ_CHUNK: usize = 4096;

fn pty_err(e: impl std::fmt::Display) -> Failure {
    Failure::new("pty", e)
}

/// Serves one session through `cat` in a raw-mode PTY until either side ends or the run stops.
pub async fn serve_cat(ws: &mut Ws, ctl: &mut watch::Receiver<Ctl>) -> Result<(), Failure> {
    let pty = nix::pty::openpty(None, None).map_err(pty_err)?;
    let mut t = tcgetattr(&pty.slave).map_err(pty_err)?;
    // Raw: no echo, no line buffering, no CR/LF translation; `cat` returns the bytes as sent.
    cfmakeraw(&mut t);
    tcsetattr(&pty.slave, SetArg::TCSANOW, &t).map_err(pty_err)?;
    let slave = std::fs::File::from(pty.slave);
    let mut child = tokio::process::Command::new("cat")
        .stdin(slave.try_clone().map_err(pty_err)?)
        .stdout(slave.try_clone().map_err(pty_err)?)
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Failure::new("spawn", e))?;
    drop(slave);
    let flags = fcntl(&pty.master, FcntlArg::F_GETFL).map_err(pty_err)?;
    fcntl(&pty.master, FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK))
        .map_err(pty_err)?;
    // SAFETY: `register` requires the fd to stay open while registered; the `OwnedFd` is moved
    // into the `AsyncFd`, which deregisters it before closing it on drop.
    let master = unsafe { AsyncFd::register(pty.master) }.map_err(pty_err)?;
    let mut buf = vec![0u8; READ_CHUNK + 1];
    let res = loop {
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(Message::Binary(b))) => {
                    if let Ok(Chan::Data(d)) = Chan::decode(&b)
                        && let Err(f) = write_all(&master, d).await
                    {
                        break Err(f);
                    }
                }
                Some(Ok(Message::Close(_))) | None => break Ok(()),
                Some(Err(e)) => break Err(Failure::new("recv", e)),
                Some(Ok(_)) => {}
            },
            r = master.readable() => {
                let mut guard = match r {
                    Ok(g) => g,
                    Err(e) => break Err(pty_err(e)),
                };
                match guard.try_io(|fd| {
                    nix::unistd::read(fd.get_ref().as_fd(), &mut buf[1..]).map_err(std::io::Error::from)
                }) {
                    Ok(Ok(0)) => break Ok(()),
                    Ok(Ok(n)) => {
                        buf[0] = TYPE_DATA;
                        let msg = Message::Binary(Bytes::copy_from_slice(&buf[..n + 1]));
                        if let Err(e) = ws.send(msg).await {
                            break Err(Failure::new("send", e));
                        }
                    }
                    // EIO: `cat` exited and the slave side is closed.
                    Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => break Ok(()),
                    Ok(Err(e)) => break Err(pty_err(e)),
                    Err(_would_block) => {}
                }
            }
            _ = ctl.wait_for(|c| *c >= Ctl::End) => break Ok(()),
        }
    };
    let _ = child.start_kill();
    res
}

async fn write_all(master: &AsyncFd<OwnedFd>, mut data: &[u8]) -> Result<(), Failure> {
    while !data.is_empty() {
        let mut guard = master.writable().await.map_err(pty_err)?;
        match guard.try_io(|fd| {
            nix::unistd::write(fd.get_ref().as_fd(), data).map_err(std::io::Error::from)
        }) {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(pty_err(e)),
            Err(_would_block) => {}
        }
    }
    Ok(())
}
