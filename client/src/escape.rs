//! The `~` escape of an interactive session, as in OpenSSH: recognised only as the first
//! character typed on a line (after Enter, or at the very start of the session).
//!
//! | typed after Enter | effect |
//! |---|---|
//! | `~.` | disconnect (exit 255) |
//! | `~~` | send one `~` |
//! | `~?` | list the escapes |
//! | `~^Z` (`~` then Ctrl-Z) | suspend the client (the local shell's job control) |
//! | `~` + anything else | send both characters |
//!
//! Sans-IO: [`Escape::feed`] turns typed bytes into [`Action`]s; the session acts on them.

/// The escape character.
pub const ESCAPE_CHAR: u8 = b'~';
/// Ctrl-Z as typed in raw mode (SUB), which after `~` suspends the client.
pub const CTRL_Z: u8 = 0x1a;

/// The line `~^Z` prints before the client stops (raw mode: `\r\n`), as OpenSSH's.
pub const SUSPEND_LINE: &str = "~^Z [suspend hatch]\r\n";

/// The help text `~?` prints (lines end with `\r\n`: the terminal is in raw mode).
pub const HELP: &str = "Supported escape sequences:\r\n \
                        ~.  - terminate connection\r\n \
                        ~^Z - suspend hatch\r\n \
                        ~?  - this message\r\n \
                        ~~  - send the escape character by typing it twice\r\n\
                        (Note that escapes are only recognized immediately after newline.)\r\n";

/// What to do with a run of typed bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send these bytes to the remote side.
    Send(Vec<u8>),
    /// Disconnect now (`~.`).
    Disconnect,
    /// Print [`HELP`] locally (`~?`).
    Help,
    /// Suspend the client (`~^Z`): restore the terminal, stop, and on continue go on.
    Suspend,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The last byte typed ended a line (or nothing was typed yet).
    LineStart,
    /// Inside a line: `~` is an ordinary character.
    Mid,
    /// A `~` was typed at the start of a line and held back.
    Tilde,
}

/// The escape state machine; one per interactive session.
#[derive(Debug, Clone)]
pub struct Escape {
    state: State,
}

impl Default for Escape {
    fn default() -> Self {
        Self::new()
    }
}

impl Escape {
    /// A machine at the start of a line.
    pub fn new() -> Self {
        Escape { state: State::LineStart }
    }

    /// Feeds typed bytes; returns the actions in order. Bytes after a `Disconnect` are
    /// dropped.
    #[must_use]
    pub fn feed(&mut self, input: &[u8]) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut send = Vec::with_capacity(input.len());
        for &b in input {
            match self.state {
                State::Tilde => {
                    self.state = State::Mid;
                    match b {
                        b'.' => {
                            flush(&mut send, &mut actions);
                            actions.push(Action::Disconnect);
                            return actions;
                        }
                        b'?' => {
                            flush(&mut send, &mut actions);
                            actions.push(Action::Help);
                            // As in ssh, the line start is kept so that `~.` works next.
                            self.state = State::LineStart;
                        }
                        CTRL_Z => {
                            flush(&mut send, &mut actions);
                            actions.push(Action::Suspend);
                            // As for `~?`: after coming back, `~.` works at once.
                            self.state = State::LineStart;
                        }
                        ESCAPE_CHAR => send.push(ESCAPE_CHAR),
                        other => {
                            send.push(ESCAPE_CHAR);
                            send.push(other);
                            self.state = after(other);
                        }
                    }
                }
                State::LineStart if b == ESCAPE_CHAR => self.state = State::Tilde,
                State::LineStart | State::Mid => {
                    send.push(b);
                    self.state = after(b);
                }
            }
        }
        flush(&mut send, &mut actions);
        actions
    }
}

/// The state after sending `b`: Enter (CR in raw mode, LF when piped) starts a new line.
fn after(b: u8) -> State {
    if b == b'\r' || b == b'\n' { State::LineStart } else { State::Mid }
}

fn flush(send: &mut Vec<u8>, actions: &mut Vec<Action>) {
    if !send.is_empty() {
        actions.push(Action::Send(std::mem::take(send)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::*;

    fn s(b: &[u8]) -> Action {
        Send(b.to_vec())
    }

    #[test]
    fn table() {
        // Each row: the chunks typed (fed separately), then every action in order.
        let table: &[(&[&[u8]], &[Action])] = &[
            (&[b"ls\r"], &[Send(b"ls\r".to_vec())]),
            (&[b"~."], &[Disconnect]),
            (&[b"~", b"."], &[Disconnect]),
            (&[b"echo\r~."], &[Send(b"echo\r".to_vec()), Disconnect]),
            (&[b"echo\n~."], &[Send(b"echo\n".to_vec()), Disconnect]),
            (&[b"echo\r", b"~", b"."], &[Send(b"echo\r".to_vec()), Disconnect]),
            // Not at line start: `~.` is ordinary text.
            (&[b"a~."], &[Send(b"a~.".to_vec())]),
            (&[b"x", b"~."], &[Send(b"x".to_vec()), Send(b"~.".to_vec())]),
            // `~~` sends one `~`, and the line is no longer at its start.
            (&[b"~~."], &[Send(b"~.".to_vec())]),
            (&[b"~", b"~"], &[Send(b"~".to_vec())]),
            // `~?` prints help, and `~.` still works right after it.
            (&[b"~?~."], &[Help, Disconnect]),
            (&[b"\r~?"], &[Send(b"\r".to_vec()), Help]),
            // `~^Z` suspends; the line start is kept, and bytes typed after it are sent.
            (&[b"~\x1a"], &[Suspend]),
            (&[b"ls\r~\x1a~."], &[Send(b"ls\r".to_vec()), Suspend, Disconnect]),
            (&[b"~", b"\x1apwd\r"], &[Suspend, Send(b"pwd\r".to_vec())]),
            // Ctrl-Z not after `~`, or `~` not at line start: sent as typed (the remote's job
            // control gets it).
            (&[b"\x1a"], &[Send(vec![0x1a])]),
            (&[b"a~\x1a"], &[Send(b"a~\x1a".to_vec())]),
            // Any other character after `~` sends both.
            (&[b"~a"], &[Send(b"~a".to_vec())]),
            (&[b"~\r~."], &[Send(b"~\r".to_vec()), Disconnect]),
            // Bytes after a disconnect are dropped.
            (&[b"~.rm -rf\r"], &[Disconnect]),
            // Binary bytes pass through untouched.
            (&[&[0, 0xff, 0x03, b'~']], &[Send(vec![0, 0xff, 0x03, b'~'])]),
            (&[b""], &[]),
        ];
        for (chunks, want) in table {
            let mut esc = Escape::new();
            let mut got = Vec::new();
            for chunk in chunks.iter() {
                let acts = esc.feed(chunk);
                let done = acts.contains(&Disconnect);
                got.extend(acts);
                if done {
                    break;
                }
            }
            assert_eq!(got, *want, "typed {chunks:?}");
        }
    }

    #[test]
    fn held_tilde_is_not_sent_until_the_next_byte() {
        let mut esc = Escape::new();
        assert_eq!(esc.feed(b"~"), vec![]);
        assert_eq!(esc.feed(b"x"), vec![s(b"~x")]);
    }
}
