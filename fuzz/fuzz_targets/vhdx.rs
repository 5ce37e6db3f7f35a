//! The VHDX reader (log replay, region table, metadata, BAT, differencing blocks),
//! `check`, and the VHDX on-disk structures, on a sparse file built from the input.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    imgconv::fuzzing::vhdx(data);
});
