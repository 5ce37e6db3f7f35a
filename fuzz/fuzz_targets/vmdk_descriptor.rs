//! The VMDK text descriptor parser (and its render/parse round trip) on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    imgconv::fuzzing::vmdk_descriptor(data);
});
