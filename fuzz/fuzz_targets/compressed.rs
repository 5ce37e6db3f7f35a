//! Compressed and archived inputs on arbitrary bytes, as from a pipe: gzip, bzip2, xz
//! and zstd decoders, tar headers (GNU, pax, sparse members), spooling and detection.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    imgconv::fuzzing::compressed(data);
});
