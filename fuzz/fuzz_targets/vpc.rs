//! The VHD reader (footer, dynamic header, BAT, bitmaps, locators, data paths) and
//! `check` on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    imgconv::fuzzing::open_and_walk(data, Some(imgconv::Format::Vpc));
});
