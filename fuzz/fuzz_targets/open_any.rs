//! Format detection and whatever reader it picks, on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    imgconv::fuzzing::open_and_walk(data, None);
});
