//! In-place qcow2 transactions (snapshot, data write, bitmap, commit) on arbitrary
//! bytes: no panic, and every committed image checks clean.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    imgconv::fuzzing::qcow2_edit(data);
});
