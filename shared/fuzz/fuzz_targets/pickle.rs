//! Feeds arbitrary bytes to the checkpoint pickle interpreter: it must return Ok or Err,
//! never panic, hang or allocate without bound.
//!
//! Run (nightly): `cd shared/fuzz && cargo +nightly fuzz run pickle -- -max_len=4096`.
//! Seed corpus: copy small files of `../shared/fixtures/grok1-tiny-a/ckpt-0/` into
//! `corpus/pickle/`.
#![no_main]

use grok_shared::bytes::ByteView;
use grok_shared::checkpoint::{pickle, StoredTensor};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let file = Path::new("fuzz-input");
    if let Ok(t) = pickle::parse(ByteView::from_vec(data.to_vec()), file) {
        // Whatever parses must be self-consistent.
        let arrays = match &t {
            StoredTensor::Plain(a) => vec![a],
            StoredTensor::Quantized { weight, scales } => vec![weight, scales],
        };
        for a in arrays {
            assert_eq!(a.numel() * a.dtype.size(), a.data.len());
        }
    }
});
