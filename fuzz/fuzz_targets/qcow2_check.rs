//! The qcow2 consistency check (tables walked, refcounts rebuilt) on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    imgconv::fuzzing::qcow2_check(data);
});
