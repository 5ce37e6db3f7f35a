//! streamOptimized VMDK on arbitrary bytes: the one-pass pipe reader and the
//! random-access reader (markers, compressed grains, footer).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    imgconv::fuzzing::vmdk_stream(data);
});
