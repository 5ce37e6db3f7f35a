//! Random sparse content → each writer → each reader must give the content back.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    imgconv::fuzzing::roundtrip(data);
});
