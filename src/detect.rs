//! The names of image formats and compressions, and how compressions and tar archives are
//! recognised: by magic bytes, never by file name. Disk formats are recognised by their
//! drivers' probes, asked in turn by [`crate::format::probe`].

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// The disk-image formats imgconv knows: those it reads and writes, and those it only
/// recognises (so that such a file is named, and refused, rather than taken for raw).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Format {
    /// The disk's bytes, nothing else.
    Raw,
    /// QEMU copy-on-write v2 / v3.
    Qcow2,
    /// VMware virtual disk (every hosted subformat).
    Vmdk,
    /// VirtualBox disk image.
    Vdi,
    /// Microsoft Virtual PC / Hyper-V VHD (qemu's name: `vpc`).
    Vpc,
    /// Hyper-V VHDX.
    Vhdx,
    /// QEMU copy-on-write version 1 (recognised only).
    Qcow,
    /// QEMU enhanced disk (recognised only).
    Qed,
    /// Apple disk image (recognised only).
    Dmg,
    /// Parallels disk image (recognised only).
    Parallels,
    /// Bochs growing image (recognised only).
    Bochs,
    /// Linux compressed loop image (recognised only).
    Cloop,
    /// LUKS encrypted volume (recognised only).
    Luks,
}

impl Format {
    /// Every format, as qemu-img names them.
    pub const ALL: [Format; 13] = [
        Format::Raw,
        Format::Qcow2,
        Format::Vmdk,
        Format::Vdi,
        Format::Vpc,
        Format::Vhdx,
        Format::Qcow,
        Format::Qed,
        Format::Dmg,
        Format::Parallels,
        Format::Bochs,
        Format::Cloop,
        Format::Luks,
    ];

    /// The name qemu-img uses (`raw`, `qcow2`, `vmdk`, `vdi`, `vpc`, `vhdx`, …).
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vdi => "vdi",
            Format::Vpc => "vpc",
            Format::Vhdx => "vhdx",
            Format::Qcow => "qcow",
            Format::Qed => "qed",
            Format::Dmg => "dmg",
            Format::Parallels => "parallels",
            Format::Bochs => "bochs",
            Format::Cloop => "cloop",
            Format::Luks => "luks",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for Format {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase();
        Format::ALL
            .into_iter()
            .find(|f| f.name() == lower)
            .ok_or_else(|| {
                let known: Vec<&str> = Format::ALL.iter().map(|f| f.name()).collect();
                Error::invalid(format!(
                    "unknown format '{lower}' (known: {})",
                    known.join(", ")
                ))
            })
    }
}

/// How many leading bytes the format probes look at.
pub const PROBE_LEN: usize = 4096;

/// How many trailing bytes the format probes look at (a VHD footer, a DMG trailer).
pub const PROBE_TAIL_LEN: usize = 512;

/// A compression wrapped around an image file, found by magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Compression {
    /// gzip (RFC 1952), possibly several concatenated members.
    Gzip,
    /// bzip2, possibly several concatenated streams (pbzip2, lbzip2).
    Bzip2,
    /// xz, possibly several concatenated streams and multi-block.
    Xz,
    /// Zstandard, possibly several frames (and skippable frames).
    Zstd,
}

impl Compression {
    /// The name `info` shows (`gzip`, `bzip2`, `xz`, `zstd`).
    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Bzip2 => "bzip2",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
        }
    }
}

impl serde::Serialize for Compression {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Recognises a compressed stream by its first bytes (never by file name).
pub fn probe_compression(head: &[u8]) -> Option<Compression> {
    if head.starts_with(b"\xfd7zXZ\0") {
        Some(Compression::Xz)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some(Compression::Zstd)
    } else if head.len() >= 4
        && head[1..4] == [0x2a, 0x4d, 0x18]
        && (0x50..=0x5f).contains(&head[0])
    {
        // A zstd skippable frame first (e.g. a seek table or pzstd header).
        Some(Compression::Zstd)
    } else if head.starts_with(&[0x1f, 0x8b, 0x08]) {
        Some(Compression::Gzip)
    } else if head.len() >= 4 && head.starts_with(b"BZh") && (b'1'..=b'9').contains(&head[3]) {
        Some(Compression::Bzip2)
    } else {
        None
    }
}

/// True when `head` (at least 263 bytes) starts with a ustar or GNU tar header.
pub fn probe_tar(head: &[u8]) -> bool {
    head.len() >= 263 && &head[257..262] == b"ustar"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_names_round_trip() {
        for f in Format::ALL {
            assert_eq!(f.name().parse::<Format>().unwrap(), f);
        }
        assert_eq!("QCOW2".parse::<Format>().unwrap(), Format::Qcow2);
        assert!("vhdz".parse::<Format>().is_err());
    }

    #[test]
    fn probes_compression_magics() {
        assert_eq!(
            probe_compression(b"\xfd7zXZ\0\0\x04"),
            Some(Compression::Xz)
        );
        assert_eq!(
            probe_compression(&[0x28, 0xb5, 0x2f, 0xfd, 0]),
            Some(Compression::Zstd)
        );
        assert_eq!(
            probe_compression(&[0x5a, 0x2a, 0x4d, 0x18]),
            Some(Compression::Zstd)
        );
        assert_eq!(
            probe_compression(&[0x1f, 0x8b, 0x08, 0]),
            Some(Compression::Gzip)
        );
        assert_eq!(probe_compression(b"BZh91AY&SY"), Some(Compression::Bzip2));
        assert_eq!(probe_compression(b"BZh0"), None);
        assert_eq!(probe_compression(b"QFI\xfb"), None);
        assert_eq!(probe_compression(b""), None);
        let mut tar = vec![0u8; 512];
        tar[257..263].copy_from_slice(b"ustar\0");
        assert!(probe_tar(&tar));
        assert!(!probe_tar(&tar[..200]));
    }
}
