//! A recorded session as its shard and pumps hold it: the writer's handle, what the taps have
//! recorded per direction, the exit status, and how the recording ends.
//!
//! The shard makes one [`Recording`] when it accepts the first leg of a session whose token
//! says it is recorded (`rec`), keeps it in a map by session id across detaches, and lets go of
//! it when the session ends. Both pumps hold an `Rc` while they forward; the recording is
//! finished (an exit record, fsync, `Outcome::Finished`) or suspended (`Outcome::Suspended`,
//! for a resume on the next relay) when the last of them lets go, so that nothing a pump
//! pushed is behind the finish.
//!
//! [`record`] is what a pump calls with the bytes a forward step wrote, before it writes them
//! on: so nothing reaches a peer that is not queued for the record. A full queue is waited
//! for (the leg is not read meanwhile), never dropped.

use std::cell::Cell;
use std::time::Instant;

use hatch_proto::api::RecordingMode;

use super::session::Leg;
use crate::recording::format::MAX_PAYLOAD;
use crate::recording::tap::{Tap, Tapped};
use crate::recording::{Event, PushError, SessionRecorder};

/// How a recording ends when its last holder lets go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The session is live (or detached): nothing yet.
    Open,
    /// The session ended at this time: finish the file.
    Finished(Instant),
    /// The session outlives this relay (a shutdown with a resume window): suspend the file so
    /// the next relay continues it.
    Suspended,
}

/// One recorded session on its owner shard.
#[derive(Debug)]
pub struct Recording {
    /// `None` only while being dropped.
    handle: Option<SessionRecorder>,
    mode: RecordingMode,
    /// DATA/STDERR bytes recorded per direction (client → agent, agent → client): a new
    /// leg's tap starts from here, so that what a resumed sender resends is not recorded
    /// twice.
    recorded: [Cell<u64>; 2],
    exit: Cell<Option<i32>>,
    end: Cell<End>,
}

impl Recording {
    /// A recording of `mode` written through `handle`.
    pub fn new(handle: SessionRecorder, mode: RecordingMode) -> Recording {
        Recording {
            handle: Some(handle),
            mode,
            recorded: [Cell::new(0), Cell::new(0)],
            exit: Cell::new(None),
            end: Cell::new(End::Open),
        }
    }

    /// The writer's handle.
    pub fn handle(&self) -> &SessionRecorder {
        // Invariant: `handle` is taken only in `drop`.
        self.handle.as_ref().expect("recording handle present until drop")
    }

    /// A tap for the bytes read from `from`, going on from what was recorded.
    pub fn tap(&self, from: Leg) -> Tap {
        Tap::at(self.recorded[from.index()].get())
    }

    /// The session ended at `now`: finish the file once the pumps let go.
    pub fn finish_at(&self, now: Instant) {
        self.end.set(End::Finished(now));
    }

    /// The session lives on past this relay: suspend the file once the pumps let go.
    pub fn suspend(&self) {
        self.end.set(End::Suspended);
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        let Some(h) = self.handle.take() else { return };
        match self.end.get() {
            End::Finished(at) => h.finish(at, self.exit.get()),
            // Dropping the handle unfinished syncs the file and reports it suspended.
            End::Open | End::Suspended => drop(h),
        }
    }
}

/// Records what a forward step wrote from leg `from` (`out`, server frames) at `now`: output
/// from the agent, input (mode `full`) and resizes from the client; the agent's EXIT is kept
/// for the finish. Waits while the queue is full; an error is a failed recording (the session
/// must end).
pub async fn record(
    rec: &Recording,
    tap: &mut Tap,
    from: Leg,
    out: &[u8],
    now: Instant,
) -> Result<(), PushError> {
    let mut pos = 0;
    while let Some(t) = tap.next(out, &mut pos) {
        match (from, t) {
            (Leg::Agent, Tapped::Data(d)) => push_bytes(rec, now, d, false).await?,
            (Leg::Client, Tapped::Data(d)) if rec.mode.records_input() => {
                push_bytes(rec, now, d, true).await?;
            }
            (Leg::Client, Tapped::Resize { cols, rows }) => {
                push(rec, now, Event::Resize { cols, rows }).await?;
            }
            (Leg::Agent, Tapped::Exit(status)) => rec.exit.set(Some(status)),
            _ => {}
        }
    }
    rec.recorded[from.index()].set(tap.recorded());
    Ok(())
}

async fn push_bytes(
    rec: &Recording,
    now: Instant,
    bytes: &[u8],
    input: bool,
) -> Result<(), PushError> {
    // A slice of one read buffer is smaller than a record's bound; split anyway rather than
    // rely on the buffer size.
    for part in bytes.chunks(MAX_PAYLOAD) {
        let event = if input { Event::Input(part) } else { Event::Output(part) };
        push(rec, now, event).await?;
    }
    Ok(())
}

async fn push(rec: &Recording, now: Instant, event: Event<'_>) -> Result<(), PushError> {
    loop {
        match rec.handle().try_push(now, event) {
            Err(PushError::Full) => rec.handle().ready().await,
            other => return other,
        }
    }
}
