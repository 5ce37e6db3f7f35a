//! The VMDK reader on arbitrary bytes: sparse (KDMV, COWD, seSparse) extents with their
//! grain directories and tables, and descriptor files (extents are refused: untrusted);
//! then `check` on what opened.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    imgconv::fuzzing::open_and_walk(data, Some(imgconv::Format::Vmdk));
});
