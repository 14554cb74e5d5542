//! The recording's channel tap (`hatch_relay::recording::tap`), fed what a pump forwards: any
//! bytes, split anywhere, never panic, every call uses all of its input, and the data the tap
//! yields is the same however the bytes are split (the first input byte picks the split
//! points). Yielded data lies inside the input.

#![no_main]

use hatch_relay::recording::tap::{Tap, Tapped};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Data(Vec<u8>),
    Resize(u16, u16),
    Exit(i32),
}

fn run(input: &[u8], step: usize) -> (Vec<Seen>, u64) {
    let mut tap = Tap::default();
    let mut seen: Vec<Seen> = Vec::new();
    for piece in input.chunks(step.max(1)) {
        let mut pos = 0;
        while let Some(t) = tap.next(piece, &mut pos) {
            assert!(pos <= piece.len());
            match (t, seen.last_mut()) {
                (Tapped::Data(d), Some(Seen::Data(prev))) => prev.extend_from_slice(d),
                (Tapped::Data(d), _) => seen.push(Seen::Data(d.to_vec())),
                (Tapped::Resize { cols, rows }, _) => seen.push(Seen::Resize(cols, rows)),
                (Tapped::Exit(s), _) => seen.push(Seen::Exit(s)),
            }
        }
        assert_eq!(pos, piece.len(), "the tap left input unused");
    }
    (seen, tap.recorded())
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, input)) = data.split_first() else { return };
    let whole = run(input, input.len());
    let split = run(input, usize::from(split) + 1);
    assert_eq!(whole, split, "the split changed what the tap saw");
    let data_len: usize =
        whole.0.iter().map(|s| if let Seen::Data(d) = s { d.len() } else { 0 }).sum();
    assert_eq!(data_len as u64, whole.1);
});
