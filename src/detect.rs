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
    /// VHD (Virtual PC, Hyper-V), qemu's `vpc`.
    Vpc,
}

impl Format {
    /// Every format, in probing order (raw last: it matches anything).
    pub const ALL: [Format; 5] = [
        Format::Qcow2,
        Format::Vmdk,
        Format::Vdi,
        Format::Vpc,
        Format::Raw,
    ];

    /// The name qemu-img uses (`raw`, `qcow2`, `vmdk`, `vdi`, `vpc`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vdi => "vdi",
            Format::Vpc => "vpc",
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
            "vpc" => Ok(Format::Vpc),
            other => Err(Error::invalid(format!(
                "unknown format '{other}' (known: raw, qcow2, vmdk, vdi, vpc)"
            ))),
        }
    }
}

/// How many leading bytes [`probe`] looks at.
pub const PROBE_LEN: usize = 4096;
/// How many trailing bytes [`probe`] looks at (a fixed VHD's footer).
pub const TAIL_LEN: usize = 512;

/// Recognises the format of the bytes in `head` (the first bytes of a file; shorter is
/// fine). Raw is the fallback.
pub fn probe_bytes(head: &[u8]) -> Format {
    probe_head_tail(head, &[])
}

/// Recognises the format from the first bytes of a file and its last 512 bytes (`tail`;
/// empty when unknown, as on a stream): a fixed VHD has its only footer at the end.
pub fn probe_head_tail(head: &[u8], tail: &[u8]) -> Format {
    for f in Format::ALL {
        let hit = match f {
            Format::Qcow2 => head.starts_with(b"QFI\xfb"),
            Format::Vmdk => crate::format::vmdk::probe(head),
            Format::Vdi => head.len() >= 0x44 && head[0x40..0x44] == [0x7f, 0x10, 0xda, 0xbe],
            Format::Vpc => crate::format::vpc::probe(head, tail),
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
    let err = |e| match storage.path() {
        Some(p) => Error::io(p, e),
        None => Error::Stream(e),
    };
    let n = (storage.len() as usize).min(PROBE_LEN);
    let mut head = vec![0u8; n];
    storage.read_exact_at(&mut head, 0).map_err(err)?;
    let t = (storage.len() as usize).min(TAIL_LEN);
    let mut tail = vec![0u8; t];
    storage
        .read_exact_at(&mut tail, storage.len() - t as u64)
        .map_err(err)?;
    Ok(probe_head_tail(&head, &tail))
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
        assert_eq!(probe_bytes(b""), Format::Raw);
        assert_eq!(probe_bytes(&[0u8; 512]), Format::Raw);
        assert_eq!("QCOW2".parse::<Format>().unwrap(), Format::Qcow2);
        assert!("vhd".parse::<Format>().is_err());
        assert_eq!("vpc".parse::<Format>().unwrap(), Format::Vpc);
        assert_eq!(probe_bytes(b"conectix\0\0\0\x02"), Format::Vpc);
        let mut tail = vec![0u8; 512];
        assert_eq!(probe_head_tail(&[0u8; 512], &tail), Format::Raw);
        tail[..8].copy_from_slice(b"conectix");
        assert_eq!(probe_head_tail(&[0u8; 512], &tail), Format::Vpc);
        tail.rotate_right(1);
        assert_eq!(probe_head_tail(&[0u8; 512], &tail), Format::Vpc);
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
