//! The qcow2 on-disk structure parsers (header, extensions, table entries, snapshot and
//! bitmap directory entries) on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    imgconv::fuzzing::qcow2_header(data);
});
