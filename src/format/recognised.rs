//! Formats imgconv recognises but does not read: their magic bytes, so that such a file
//! is named (as qemu-img names it) and refused with a typed error instead of being taken
//! for a raw disk and copied as if its container were the guest's bytes.
//!
//! The magics are those qemu-img 10 probes (its `*_probe` functions), checked against
//! the corpus (`qemu-iotests/*.bochs`, `*.cloop`, `*.dmg`, `parallels-*`,
//! `freebsd-mkimg/*.qcow`) and images qemu-img makes. qemu recognises a DMG by its file
//! name; imgconv never looks at names and finds the `koly` trailer in the last 512 bytes
//! instead.

use crate::detect::Format;
use crate::driver::Driver;

/// qcow version 1: qcow2's magic with version 1.
pub const QCOW: Driver = Driver::recognised_only(Format::Qcow, |head, _| {
    head.starts_with(b"QFI\xfb") && be32(head, 4) == Some(1)
});

/// QED: `QED\0`.
pub const QED: Driver = Driver::recognised_only(Format::Qed, |head, _| head.starts_with(b"QED\0"));

/// Apple DMG: the `koly` trailer in the last 512 bytes.
pub const DMG: Driver = Driver::recognised_only(Format::Dmg, |_, tail| {
    tail.len() == 512 && tail.starts_with(b"koly")
});

/// Parallels: one of two 16-byte signatures and header version 2.
pub const PARALLELS: Driver = Driver::recognised_only(Format::Parallels, |head, _| {
    head.len() >= 64
        && (head.starts_with(b"WithoutFreeSpace") || head.starts_with(b"WithouFreSpacExt"))
        && le32(head, 16) == Some(2)
});

/// Bochs: the magic, type `Redolog`, subtype `Growing`, version 1 or 2.
pub const BOCHS: Driver = Driver::recognised_only(Format::Bochs, |head, _| {
    head.len() >= 512
        && cstr_is(&head[0..32], b"Bochs Virtual HD Image")
        && cstr_is(&head[32..48], b"Redolog")
        && cstr_is(&head[48..64], b"Growing")
        && matches!(le32(head, 64), Some(0x0001_0000 | 0x0002_0000))
});

/// cloop: the shell-script preamble of version 2.0 images.
pub const CLOOP: Driver = Driver::recognised_only(Format::Cloop, |head, _| {
    const MAGIC: &[u8] =
        b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";
    head.len() >= MAGIC.len() && head.starts_with(MAGIC)
});

/// LUKS (versions 1 and 2): `LUKS\xba\xbe`.
pub const LUKS: Driver = Driver::recognised_only(Format::Luks, |head, _| {
    head.starts_with(b"LUKS\xba\xbe") && matches!(be16(head, 6), Some(1 | 2))
});

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// True when the NUL-padded field `field` holds exactly `want`.
fn cstr_is(field: &[u8], want: &[u8]) -> bool {
    let end = field.iter().position(|&c| c == 0).unwrap_or(field.len());
    &field[..end] == want
}
