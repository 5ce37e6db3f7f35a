//! VHDX on-disk structures of the metadata region: the metadata table, the known items
//! (file parameters, virtual disk size, virtual disk ID, sector sizes) and the parent
//! locator, as plain structs with `parse` and `serialize` (MS-VHDX 2.6).
//!
//! The metadata region carries no checksum; its structure is validated here (signature,
//! counts, items inside the region and not overlapping) and by the reader.

use super::header::{u16_at, u32_at, u64_at, Guid, FORMAT};
use crate::error::{Error, Result};

/// The metadata table occupies the first 64 KiB of the region; items come after.
pub const TABLE_SIZE: usize = 64 << 10;
/// Most entries a metadata table may hold.
pub const MAX_ENTRIES: u16 = 2047;
/// Largest metadata item.
pub const MAX_ITEM_LENGTH: u32 = 1 << 20;

/// File Parameters: block size and the fixed / differencing flags.
pub const FILE_PARAMETERS: Guid = Guid::from_fields(
    0xcaa1_6737,
    0xfa36,
    0x4d43,
    [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b],
);
/// Virtual Disk Size.
pub const VIRTUAL_DISK_SIZE: Guid = Guid::from_fields(
    0x2fa5_4224,
    0xcd1b,
    0x4876,
    [0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8],
);
/// Virtual Disk ID (QEMU calls it Page 83 Data).
pub const VIRTUAL_DISK_ID: Guid = Guid::from_fields(
    0xbeca_12ab,
    0xb2e6,
    0x4523,
    [0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46],
);
/// Logical Sector Size.
pub const LOGICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0x8141_bf1d,
    0xa96f,
    0x4709,
    [0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f],
);
/// Physical Sector Size.
pub const PHYSICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0xcda3_48c7,
    0x445d,
    0x4471,
    [0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56],
);
/// Parent Locator (differencing images).
pub const PARENT_LOCATOR: Guid = Guid::from_fields(
    0xa8d3_5f2d,
    0xb30b,
    0x454d,
    [0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c],
);
/// The locator type of a VHDX parent (the only one the spec defines).
pub const VHDX_PARENT_LOCATOR_TYPE: Guid = Guid::from_fields(
    0xb04a_efb7,
    0xd19e,
    0x4a81,
    [0xb7, 0x89, 0x25, 0xb8, 0xe9, 0x44, 0x59, 0x13],
);

/// One entry of the metadata table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataEntry {
    /// Which item.
    pub item_id: Guid,
    /// Where the item starts, relative to the region (0 with length 0, else ≥ 64 KiB).
    pub offset: u32,
    /// Its length (at most 1 MiB).
    pub length: u32,
    /// Bit 0 IsUser, bit 1 IsVirtualDisk, bit 2 IsRequired.
    pub flags: u32,
}

impl MetadataEntry {
    /// Bytes of one entry.
    pub const SIZE: usize = 32;
    /// User metadata (not interpreted by the format).
    pub const IS_USER: u32 = 1;
    /// Describes the virtual disk (copied to a child on forking).
    pub const IS_VIRTUAL_DISK: u32 = 2;
    /// The file cannot be read without understanding this item.
    pub const IS_REQUIRED: u32 = 4;

    /// True when the IsRequired flag is set.
    pub fn is_required(&self) -> bool {
        self.flags & Self::IS_REQUIRED != 0
    }

    /// True when the IsUser flag is set.
    pub fn is_user(&self) -> bool {
        self.flags & Self::IS_USER != 0
    }
}

/// The metadata table at the start of the metadata region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataTable {
    /// The entries, in table order.
    pub entries: Vec<MetadataEntry>,
}

impl MetadataTable {
    /// "metadata".
    pub const SIGNATURE: [u8; 8] = *b"metadata";

    /// Parses the table at the start of `b` (read at file offset `offset`): signature,
    /// entry count, and each item inside a region of `region_len` bytes, unique, and not
    /// overlapping another.
    pub fn parse(b: &[u8], offset: u64, region_len: u64) -> Result<MetadataTable> {
        let corrupt = |at: u64, r: String| Error::corrupt(FORMAT, "metadata table", at, r);
        if b.len() < 32 {
            return Err(corrupt(offset, "the table is cut short".into()));
        }
        if b[..8] != Self::SIGNATURE {
            return Err(corrupt(offset, "the signature is not \"metadata\"".into()));
        }
        let n = u16_at(b, 10);
        if n > MAX_ENTRIES || 32 + n as usize * MetadataEntry::SIZE > b.len().min(TABLE_SIZE) {
            return Err(corrupt(
                offset,
                format!("{n} entries, more than the {MAX_ENTRIES} allowed"),
            ));
        }
        let mut entries: Vec<MetadataEntry> = Vec::with_capacity(n as usize);
        for i in 0..n as usize {
            let at = 32 + i * MetadataEntry::SIZE;
            let e = &b[at..];
            let entry = MetadataEntry {
                item_id: Guid::parse(e),
                offset: u32_at(e, 16),
                length: u32_at(e, 20),
                flags: u32_at(e, 24),
            };
            let here = offset + at as u64;
            let (start, len) = (entry.offset as u64, entry.length as u64);
            if len == 0 {
                if start != 0 {
                    return Err(corrupt(
                        here,
                        format!("item {} is empty but has offset {start:#x}", entry.item_id),
                    ));
                }
            } else if start < TABLE_SIZE as u64
                || len > MAX_ITEM_LENGTH as u64
                || start + len > region_len
            {
                return Err(corrupt(
                    here,
                    format!(
                        "item {} at {start:#x}+{len} is not inside the {region_len}-byte region after its 64 KiB table",
                        entry.item_id
                    ),
                ));
            }
            for other in &entries {
                if other.item_id == entry.item_id && other.is_user() == entry.is_user() {
                    return Err(corrupt(
                        here,
                        format!("item {} is listed twice", entry.item_id),
                    ));
                }
                let (s, l) = (other.offset as u64, other.length as u64);
                if len > 0 && l > 0 && start < s + l && s < start + len {
                    return Err(corrupt(
                        here,
                        format!(
                            "item {} overlaps item {} in the metadata region",
                            entry.item_id, other.item_id
                        ),
                    ));
                }
            }
            entries.push(entry);
        }
        Ok(MetadataTable { entries })
    }

    /// The 64 KiB table.
    pub fn serialize(&self) -> Vec<u8> {
        let mut b = vec![0u8; TABLE_SIZE];
        b[..8].copy_from_slice(&Self::SIGNATURE);
        let n = self.entries.len().min(MAX_ENTRIES as usize);
        b[10..12].copy_from_slice(&(n as u16).to_le_bytes());
        for (i, e) in self.entries.iter().take(n).enumerate() {
            let o = 32 + i * MetadataEntry::SIZE;
            b[o..o + 16].copy_from_slice(&e.item_id.0);
            b[o + 16..o + 20].copy_from_slice(&e.offset.to_le_bytes());
            b[o + 20..o + 24].copy_from_slice(&e.length.to_le_bytes());
            b[o + 24..o + 28].copy_from_slice(&e.flags.to_le_bytes());
        }
        b
    }

    /// The system (not user) item `id`, if listed.
    pub fn find(&self, id: Guid) -> Option<&MetadataEntry> {
        self.entries
            .iter()
            .find(|e| e.item_id == id && !e.is_user())
    }
}

/// The File Parameters item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileParameters {
    /// Payload block size: a power of two from 1 MiB to 256 MiB.
    pub block_size: u32,
    /// A fixed image: blocks stay allocated.
    pub leave_blocks_allocated: bool,
    /// A differencing image: it has a parent locator.
    pub has_parent: bool,
    /// Bits 2–31 (must be 0).
    pub reserved: u32,
}

impl FileParameters {
    /// Bytes of the item.
    pub const SIZE: usize = 8;

    /// Parses the 8-byte item.
    pub fn parse(b: &[u8]) -> FileParameters {
        let bits = u32_at(b, 4);
        FileParameters {
            block_size: u32_at(b, 0),
            leave_blocks_allocated: bits & 1 != 0,
            has_parent: bits & 2 != 0,
            reserved: bits & !3,
        }
    }

    /// The 8-byte item.
    pub fn serialize(&self) -> [u8; 8] {
        let bits = self.leave_blocks_allocated as u32
            | (self.has_parent as u32) << 1
            | (self.reserved & !3);
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&self.block_size.to_le_bytes());
        b[4..].copy_from_slice(&bits.to_le_bytes());
        b
    }
}

/// Reads a u32 item (sector sizes).
pub fn parse_u32_item(b: &[u8]) -> u32 {
    u32_at(b, 0)
}

/// Reads a u64 item (virtual disk size).
pub fn parse_u64_item(b: &[u8]) -> u64 {
    u64_at(b, 0)
}

/// The parent locator item: its type and key/value pairs (UTF-16 in the file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentLocator {
    /// The locator type ([`VHDX_PARENT_LOCATOR_TYPE`] for a VHDX parent).
    pub locator_type: Guid,
    /// The pairs, in table order.
    pub entries: Vec<(String, String)>,
}

impl ParentLocator {
    /// Bytes of the header (type, reserved, count).
    pub const HEADER_SIZE: usize = 20;
    /// Bytes of one key/value entry.
    pub const ENTRY_SIZE: usize = 12;

    /// Parses the item `b` (read at file offset `offset`): every key and value inside
    /// the item, non-empty, valid UTF-16, keys unique.
    pub fn parse(b: &[u8], offset: u64) -> Result<ParentLocator> {
        let corrupt = |r: String| Error::corrupt(FORMAT, "parent locator", offset, r);
        if b.len() < Self::HEADER_SIZE {
            return Err(corrupt(format!(
                "{} bytes, shorter than its header",
                b.len()
            )));
        }
        let n = u16_at(b, 18) as usize;
        if Self::HEADER_SIZE + n * Self::ENTRY_SIZE > b.len() {
            return Err(corrupt(format!(
                "{n} key/value entries do not fit in the {}-byte item",
                b.len()
            )));
        }
        let string = |o: u32, l: u16, what: &str| -> Result<String> {
            let (o, l) = (o as usize, l as usize);
            if o == 0 || l == 0 || l % 2 != 0 || o.checked_add(l).map_or(true, |e| e > b.len()) {
                return Err(corrupt(format!(
                    "{what} at {o:#x}+{l} is empty, odd or outside the {}-byte item",
                    b.len()
                )));
            }
            let units: Vec<u16> = b[o..o + l]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).map_err(|_| corrupt(format!("{what} is not valid UTF-16")))
        };
        let mut entries: Vec<(String, String)> = Vec::with_capacity(n);
        for i in 0..n {
            let e = &b[Self::HEADER_SIZE + i * Self::ENTRY_SIZE..];
            let key = string(u32_at(e, 0), u16_at(e, 8), "key")?;
            let value = string(u32_at(e, 4), u16_at(e, 10), "value")?;
            if entries.iter().any(|(k, _)| *k == key) {
                return Err(corrupt(format!("key {key:?} appears twice")));
            }
            entries.push((key, value));
        }
        Ok(ParentLocator {
            locator_type: Guid::parse(b),
            entries,
        })
    }

    /// The item: header, entries, then the UTF-16 strings.
    pub fn serialize(&self) -> Vec<u8> {
        let n = self.entries.len();
        let mut b = vec![0u8; Self::HEADER_SIZE + n * Self::ENTRY_SIZE];
        b[..16].copy_from_slice(&self.locator_type.0);
        b[18..20].copy_from_slice(&(n as u16).to_le_bytes());
        let utf16 = |s: &str| -> Vec<u8> { s.encode_utf16().flat_map(u16::to_le_bytes).collect() };
        for (i, (k, v)) in self.entries.iter().enumerate() {
            let (kb, vb) = (utf16(k), utf16(v));
            let e = Self::HEADER_SIZE + i * Self::ENTRY_SIZE;
            let ko = b.len() as u32;
            b.extend_from_slice(&kb);
            let vo = b.len() as u32;
            b.extend_from_slice(&vb);
            b[e..e + 4].copy_from_slice(&ko.to_le_bytes());
            b[e + 4..e + 8].copy_from_slice(&vo.to_le_bytes());
            b[e + 8..e + 10].copy_from_slice(&(kb.len() as u16).to_le_bytes());
            b[e + 10..e + 12].copy_from_slice(&(vb.len() as u16).to_le_bytes());
        }
        b
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_round_trip_and_checks() {
        let t = MetadataTable {
            entries: vec![
                MetadataEntry {
                    item_id: FILE_PARAMETERS,
                    offset: 64 << 10,
                    length: 8,
                    flags: MetadataEntry::IS_REQUIRED,
                },
                MetadataEntry {
                    item_id: VIRTUAL_DISK_SIZE,
                    offset: (64 << 10) + 8,
                    length: 8,
                    flags: 6,
                },
            ],
        };
        let b = t.serialize();
        assert_eq!(MetadataTable::parse(&b, 0, 1 << 20).unwrap(), t);
        assert!(t.find(VIRTUAL_DISK_SIZE).is_some());
        // Overlapping items, and an item past the region, are refused.
        let mut o = t.clone();
        o.entries[1].offset = (64 << 10) + 4;
        assert!(MetadataTable::parse(&o.serialize(), 0, 1 << 20).is_err());
        let mut o = t.clone();
        o.entries[1].offset = (1 << 20) - 4;
        assert!(MetadataTable::parse(&o.serialize(), 0, 1 << 20).is_err());
        let mut o = t;
        o.entries[1].item_id = FILE_PARAMETERS;
        assert!(MetadataTable::parse(&o.serialize(), 0, 1 << 20).is_err());
    }

    #[test]
    fn file_parameters_round_trip() {
        let p = FileParameters {
            block_size: 32 << 20,
            leave_blocks_allocated: true,
            has_parent: false,
            reserved: 0,
        };
        assert_eq!(FileParameters::parse(&p.serialize()), p);
    }

    #[test]
    fn parent_locator_round_trip() {
        let l = ParentLocator {
            locator_type: VHDX_PARENT_LOCATOR_TYPE,
            entries: vec![
                (
                    "parent_linkage".into(),
                    "{83ed0ec3-24c8-49a6-a959-5e4bf1288bfb}".into(),
                ),
                ("relative_path".into(), ".\\bäse.vhdx".into()),
            ],
        };
        let b = l.serialize();
        let back = ParentLocator::parse(&b, 0).unwrap();
        assert_eq!(back, l);
        assert_eq!(back.get("relative_path"), Some(".\\bäse.vhdx"));
        assert!(ParentLocator::parse(&b[..b.len() - 2], 0).is_err());
    }
}
