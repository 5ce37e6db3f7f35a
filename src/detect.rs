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
}

impl Format {
    /// Every format, in probing order (raw last: it matches anything).
    pub const ALL: [Format; 4] = [Format::Qcow2, Format::Vmdk, Format::Vdi, Format::Raw];

    /// The name qemu-img uses (`raw`, `qcow2`, `vmdk`, `vdi`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vdi => "vdi",
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
            other => Err(Error::invalid(format!(
                "unknown format '{other}' (known: raw, qcow2, vmdk, vdi)"
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
    }
}
