//! Image formats and how they are recognised: by magic bytes, never by file name.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::io::Storage;

/// The disk-image formats imgconv knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Format {
    /// The disk's bytes, nothing else.
    Raw,
    /// QEMU copy-on-write v2 / v3.
    Qcow2,
    /// VMware virtual disk (every hosted subformat).
    Vmdk,
    /// VirtualBox disk image.
    Vdi,
    /// Hyper-V virtual hard disk v2.
    Vhdx,
}

impl Format {
    /// Every format, in probing order (raw last: it matches anything).
    pub const ALL: [Format; 5] = [
        Format::Qcow2,
        Format::Vmdk,
        Format::Vdi,
        Format::Vhdx,
        Format::Raw,
    ];

    /// The name qemu-img uses (`raw`, `qcow2`, `vmdk`, `vdi`, `vhdx`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vdi => "vdi",
            Format::Vhdx => "vhdx",
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
        match s.to_ascii_lowercase().as_str() {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            "vmdk" => Ok(Format::Vmdk),
            "vdi" => Ok(Format::Vdi),
            "vhdx" => Ok(Format::Vhdx),
            other => Err(Error::invalid(format!(
                "unknown format '{other}' (known: raw, qcow2, vmdk, vdi, vhdx)"
            ))),
        }
    }
}

/// How many leading bytes [`probe`] looks at.
pub const PROBE_LEN: usize = 4096;

/// Recognises the format of the bytes in `head` (the first bytes of a file; shorter is
/// fine). Raw is the fallback.
pub fn probe_bytes(head: &[u8]) -> Format {
    for f in Format::ALL {
        let hit = match f {
            Format::Qcow2 => head.starts_with(b"QFI\xfb"),
            Format::Vmdk => crate::format::vmdk::probe(head),
            Format::Vdi => head.len() >= 0x44 && head[0x40..0x44] == [0x7f, 0x10, 0xda, 0xbe],
            Format::Vhdx => crate::format::vhdx::probe(head, &[]),
            Format::Raw => true,
        };
        if hit {
            return f;
        }
    }
    Format::Raw
}

/// Recognises the format of a storage's contents.
pub fn probe(storage: &dyn Storage) -> Result<Format> {
    let n = (storage.len() as usize).min(PROBE_LEN);
    let mut head = vec![0u8; n];
    storage
        .read_exact_at(&mut head, 0)
        .map_err(|e| match storage.path() {
            Some(p) => Error::io(p, e),
            None => Error::Stream(e),
        })?;
    Ok(probe_bytes(&head))
}

/// A compression wrapped around an image file, found by magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    fn probes_magics() {
        assert_eq!(probe_bytes(b"QFI\xfb\0\0\0\x03"), Format::Qcow2);
        assert_eq!(probe_bytes(b"KDMV\x01\0\0\0"), Format::Vmdk);
        assert_eq!(probe_bytes(b"# Disk DescriptorFile\n"), Format::Vmdk);
        let mut vdi = vec![0u8; 0x48];
        vdi[0x40..0x44].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        assert_eq!(probe_bytes(&vdi), Format::Vdi);
        assert_eq!(probe_bytes(b"vhdxfile\0\0"), Format::Vhdx);
        assert_eq!("VHDX".parse::<Format>().unwrap(), Format::Vhdx);
        assert_eq!(probe_bytes(b""), Format::Raw);
        assert_eq!(probe_bytes(&[0u8; 512]), Format::Raw);
        assert_eq!("QCOW2".parse::<Format>().unwrap(), Format::Qcow2);
        assert!("vhd".parse::<Format>().is_err());
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
