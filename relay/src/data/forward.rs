//! The forward step lives in proto now ([`hatch_proto::forward`]); re-exported for the pumps.

pub use hatch_proto::forward::{Deframer, Event, MAX_TAIL, Step, step};
