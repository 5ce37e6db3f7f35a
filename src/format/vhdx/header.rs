//! VHDX on-disk structures of the header section and the BAT: GUIDs, the file type
//! identifier, the two headers, the region table and BAT entries, as plain structs with
//! `parse` and `serialize`, and the CRC-32C checksum every one of them carries.
//!
//! Everything is little-endian (MS-VHDX 2). Validation beyond a structure's own
//! signature and checksum belongs to the reader.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Format name in errors.
pub const FORMAT: &str = "vhdx";

/// 1 MiB: the alignment of every region, the log and every block.
pub const MIB: u64 = 1 << 20;

/// "vhdxfile" at offset 0.
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// Where the two headers live (each 4 KiB of a 64 KiB slot).
pub const HEADER_OFFSETS: [u64; 2] = [64 << 10, 128 << 10];
/// Where the two copies of the region table live.
pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 << 10, 256 << 10];
/// End of the header section (file identifier, headers, region tables).
pub const HEADER_SECTION_END: u64 = MIB;
/// Bytes a header's checksum covers.
pub const HEADER_SIZE: usize = 4096;
/// Bytes a region table's checksum covers.
pub const REGION_TABLE_SIZE: usize = 64 << 10;
/// Most entries a region table may hold.
pub const MAX_REGION_ENTRIES: u32 = 2047;
/// Bytes of the creator string in the file type identifier.
pub const CREATOR_BYTES: usize = 512;

/// CRC-32C (Castagnoli) of `buf` with the four bytes at `crc_offset` taken as zero, as
/// every VHDX checksum is computed.
pub fn checksum(buf: &[u8], crc_offset: usize) -> u32 {
    let crc = crc32c::crc32c(&buf[..crc_offset]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &buf[crc_offset + 4..])
}

/// Stores the checksum of `buf` at `crc_offset`.
pub fn set_checksum(buf: &mut [u8], crc_offset: usize) {
    let c = checksum(buf, crc_offset);
    buf[crc_offset..crc_offset + 4].copy_from_slice(&c.to_le_bytes());
}

pub(crate) fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
pub(crate) fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
pub(crate) fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

/// A GUID in its on-disk (Microsoft, mixed-endian) byte order: `Data1` u32 LE, `Data2`
/// and `Data3` u16 LE, then 8 bytes as they are.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// All zeros ("no log", "no parent linkage").
    pub const NIL: Guid = Guid([0; 16]);

    /// The GUID written `d1-d2-d3-d4[0..2]-d4[2..8]`.
    pub const fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4],
            d4[5], d4[6], d4[7],
        ])
    }

    /// A random (version 4) GUID.
    pub fn random() -> Guid {
        let mut b: [u8; 16] = crate::random::bytes();
        // Version 4 in Data3's high nibble, variant 10 in Data4[0].
        b[7] = (b[7] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Guid(b)
    }

    /// True for the all-zero GUID.
    pub fn is_nil(&self) -> bool {
        self.0 == [0; 16]
    }

    /// Reads 16 bytes.
    pub fn parse(b: &[u8]) -> Guid {
        Guid(b[..16].try_into().expect("16 bytes"))
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            u32_at(b, 0),
            u16_at(b, 4),
            u16_at(b, 6),
            b[8],
            b[9],
            b[10],
            b[11],
            b[12],
            b[13],
            b[14],
            b[15]
        )
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{{self}}}")
    }
}

impl FromStr for Guid {
    type Err = Error;
    /// Parses `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, with or without braces, any case
    /// (the parent locator writes `{…}`).
    fn from_str(s: &str) -> Result<Guid> {
        let bad = || Error::invalid(format!("'{s}' is not a GUID"));
        let t = s.trim();
        let t = t
            .strip_prefix('{')
            .and_then(|t| t.strip_suffix('}'))
            .unwrap_or(t);
        let parts: Vec<&str> = t.split('-').collect();
        let lens = [8, 4, 4, 4, 12];
        if parts.len() != 5
            || parts
                .iter()
                .zip(lens)
                .any(|(p, n)| p.len() != n || !p.bytes().all(|c| c.is_ascii_hexdigit()))
        {
            return Err(bad());
        }
        let d1 = u32::from_str_radix(parts[0], 16).map_err(|_| bad())?;
        let d2 = u16::from_str_radix(parts[1], 16).map_err(|_| bad())?;
        let d3 = u16::from_str_radix(parts[2], 16).map_err(|_| bad())?;
        let rest = format!("{}{}", parts[3], parts[4]);
        let mut d4 = [0u8; 8];
        for (i, b) in d4.iter_mut().enumerate() {
            *b = u8::from_str_radix(&rest[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Guid::from_fields(d1, d2, d3, d4))
    }
}

/// The region table entry of the BAT.
pub const BAT_REGION: Guid = Guid::from_fields(
    0x2dc2_7766,
    0xf623,
    0x4200,
    [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08],
);
/// The region table entry of the metadata region.
pub const METADATA_REGION: Guid = Guid::from_fields(
    0x8b7c_a206,
    0x4790,
    0x4b9a,
    [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e],
);

/// The file type identifier at offset 0: signature and creator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileIdentifier {
    /// Who made the file (UTF-16 in the file; diagnostic only).
    pub creator: String,
}

impl FileIdentifier {
    /// Parses the first `8 + 512` bytes (fewer: the creator is cut).
    pub fn parse(b: &[u8]) -> Result<FileIdentifier> {
        if b.len() < 8 || &b[..8] != FILE_SIGNATURE {
            return Err(Error::corrupt(
                FORMAT,
                "file type identifier",
                0,
                "the signature is not \"vhdxfile\"",
            ));
        }
        let raw = &b[8..b.len().min(8 + CREATOR_BYTES)];
        let units: Vec<u16> = raw
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        Ok(FileIdentifier {
            creator: String::from_utf16_lossy(&units),
        })
    }

    /// The 64 KiB slot at offset 0 (the creator cut to 255 UTF-16 units).
    pub fn serialize(&self) -> Vec<u8> {
        let mut b = vec![0u8; 64 << 10];
        b[..8].copy_from_slice(FILE_SIGNATURE);
        for (i, u) in self.creator.encode_utf16().take(255).enumerate() {
            b[8 + 2 * i..10 + 2 * i].copy_from_slice(&u.to_le_bytes());
        }
        b
    }
}

/// One of the two headers (4 KiB at 64 KiB and 128 KiB).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// "head".
    pub signature: [u8; 4],
    /// CRC-32C over the 4 KiB with this field as zero.
    pub checksum: u32,
    /// The valid header with the larger one is current.
    pub sequence_number: u64,
    /// Changed on the first write of every session.
    pub file_write_guid: Guid,
    /// Changed on the first guest-visible write of every session; a child's parent
    /// linkage names its parent's.
    pub data_write_guid: Guid,
    /// Non-zero while the log may hold entries to replay.
    pub log_guid: Guid,
    /// Must be 0.
    pub log_version: u16,
    /// Must be 1.
    pub version: u16,
    /// Bytes of log, a multiple of 1 MiB.
    pub log_length: u32,
    /// Where the log starts, a multiple of 1 MiB.
    pub log_offset: u64,
}

impl Header {
    /// "head".
    pub const SIGNATURE: [u8; 4] = *b"head";

    /// Parses the first bytes of `b` (at least 80).
    pub fn parse(b: &[u8]) -> Header {
        Header {
            signature: b[0..4].try_into().expect("4 bytes"),
            checksum: u32_at(b, 4),
            sequence_number: u64_at(b, 8),
            file_write_guid: Guid::parse(&b[16..]),
            data_write_guid: Guid::parse(&b[32..]),
            log_guid: Guid::parse(&b[48..]),
            log_version: u16_at(b, 64),
            version: u16_at(b, 66),
            log_length: u32_at(b, 68),
            log_offset: u64_at(b, 72),
        }
    }

    /// True when the 4 KiB `b` carries a valid header: its signature and checksum.
    pub fn is_valid(b: &[u8]) -> bool {
        b.len() >= HEADER_SIZE
            && b[..4] == Self::SIGNATURE
            && checksum(&b[..HEADER_SIZE], 4) == u32_at(b, 4)
    }

    /// The 4 KiB structure, its checksum computed (the `checksum` field is ignored).
    pub fn serialize(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(&self.signature);
        b[8..16].copy_from_slice(&self.sequence_number.to_le_bytes());
        b[16..32].copy_from_slice(&self.file_write_guid.0);
        b[32..48].copy_from_slice(&self.data_write_guid.0);
        b[48..64].copy_from_slice(&self.log_guid.0);
        b[64..66].copy_from_slice(&self.log_version.to_le_bytes());
        b[66..68].copy_from_slice(&self.version.to_le_bytes());
        b[68..72].copy_from_slice(&self.log_length.to_le_bytes());
        b[72..80].copy_from_slice(&self.log_offset.to_le_bytes());
        set_checksum(&mut b, 4);
        b
    }
}

/// One entry of the region table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionEntry {
    /// Which region (BAT, metadata, or one this version does not know).
    pub guid: Guid,
    /// Where it starts (a multiple of 1 MiB, at least 1 MiB).
    pub file_offset: u64,
    /// Its length (a multiple of 1 MiB).
    pub length: u32,
    /// Bit 0: the file cannot be read without understanding this region.
    pub required: u32,
}

impl RegionEntry {
    /// Bytes of one entry.
    pub const SIZE: usize = 32;

    /// True when bit 0 of the `Required` field is set.
    pub fn is_required(&self) -> bool {
        self.required & 1 != 0
    }
}

/// The region table (64 KiB at 192 KiB and 256 KiB).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionTable {
    /// The entries, in file order.
    pub entries: Vec<RegionEntry>,
}

impl RegionTable {
    /// "regi".
    pub const SIGNATURE: [u8; 4] = *b"regi";

    /// Parses and verifies (signature, checksum, entry count) the 64 KiB table read at
    /// `offset`.
    pub fn parse(b: &[u8], offset: u64) -> Result<RegionTable> {
        let corrupt = |r: String| Error::corrupt(FORMAT, "region table", offset, r);
        if b.len() < REGION_TABLE_SIZE {
            return Err(corrupt("the table is cut short".into()));
        }
        let b = &b[..REGION_TABLE_SIZE];
        if b[..4] != Self::SIGNATURE {
            return Err(corrupt("the signature is not \"regi\"".into()));
        }
        let stored = u32_at(b, 4);
        let computed = checksum(b, 4);
        if stored != computed {
            return Err(corrupt(format!(
                "CRC-32C checksum {stored:#010x} does not match the contents ({computed:#010x})"
            )));
        }
        let n = u32_at(b, 8);
        if n > MAX_REGION_ENTRIES {
            return Err(corrupt(format!(
                "{n} entries, more than the {MAX_REGION_ENTRIES} allowed"
            )));
        }
        let entries = (0..n as usize)
            .map(|i| {
                let e = &b[16 + i * RegionEntry::SIZE..];
                RegionEntry {
                    guid: Guid::parse(e),
                    file_offset: u64_at(e, 16),
                    length: u32_at(e, 24),
                    required: u32_at(e, 28),
                }
            })
            .collect();
        Ok(RegionTable { entries })
    }

    /// The 64 KiB table with its checksum (at most 2047 entries are written).
    pub fn serialize(&self) -> Vec<u8> {
        let mut b = vec![0u8; REGION_TABLE_SIZE];
        b[..4].copy_from_slice(&Self::SIGNATURE);
        let n = self.entries.len().min(MAX_REGION_ENTRIES as usize);
        b[8..12].copy_from_slice(&(n as u32).to_le_bytes());
        for (i, e) in self.entries.iter().take(n).enumerate() {
            let o = 16 + i * RegionEntry::SIZE;
            b[o..o + 16].copy_from_slice(&e.guid.0);
            b[o + 16..o + 24].copy_from_slice(&e.file_offset.to_le_bytes());
            b[o + 24..o + 28].copy_from_slice(&e.length.to_le_bytes());
            b[o + 28..o + 32].copy_from_slice(&e.required.to_le_bytes());
        }
        set_checksum(&mut b, 4);
        b
    }

    /// The entry of region `guid`, if listed.
    pub fn find(&self, guid: Guid) -> Option<&RegionEntry> {
        self.entries.iter().find(|e| e.guid == guid)
    }
}

/// Payload block states (the low 3 bits of a payload BAT entry).
pub mod payload {
    /// Never written: zeros (dynamic), or the parent's data (differencing).
    pub const NOT_PRESENT: u8 = 0;
    /// Contents undefined; read as zeros.
    pub const UNDEFINED: u8 = 1;
    /// Reads as zeros.
    pub const ZERO: u8 = 2;
    /// Unmapped (trimmed); read as zeros.
    pub const UNMAPPED: u8 = 3;
    /// Unmapped, in the numbering of the spec's draft 0.95 (QEMU reads it as zeros).
    pub const UNMAPPED_V095: u8 = 5;
    /// The whole block is in the file.
    pub const FULLY_PRESENT: u8 = 6;
    /// Differencing only: the sector bitmap says which sectors are in the file.
    pub const PARTIALLY_PRESENT: u8 = 7;
}

/// Sector bitmap block states (the low 3 bits of a sector bitmap BAT entry).
pub mod bitmap {
    /// Not allocated.
    pub const NOT_PRESENT: u8 = 0;
    /// In the file.
    pub const PRESENT: u8 = 6;
}

/// One BAT entry: a state in bits 0–2 and a file offset in MiB in bits 20–63.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatEntry(pub u64);

impl BatEntry {
    /// An entry of `state` pointing at `offset` (a multiple of 1 MiB).
    pub fn new(state: u8, offset: u64) -> BatEntry {
        BatEntry((offset & !(MIB - 1)) | (state & 7) as u64)
    }

    /// The state (see [`payload`] and [`bitmap`]).
    pub fn state(self) -> u8 {
        (self.0 & 7) as u8
    }

    /// The file offset in bytes (`FileOffsetMB` × 1 MiB).
    pub fn offset(self) -> u64 {
        self.0 & !(MIB - 1)
    }

    /// The reserved bits 3–19 (must be 0).
    pub fn reserved(self) -> u64 {
        self.0 & (MIB - 1) & !7
    }
}

/// Reads little-endian BAT entries from `b` (a multiple of 8 bytes).
pub fn parse_bat(b: &[u8]) -> impl Iterator<Item = BatEntry> + '_ {
    b.chunks_exact(8).map(|c| BatEntry(u64_at(c, 0)))
}

/// Writes BAT entries little-endian.
pub fn serialize_bat(entries: &[BatEntry]) -> Vec<u8> {
    let mut b = Vec::with_capacity(entries.len() * 8);
    for e in entries {
        b.extend_from_slice(&e.0.to_le_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_is_castagnoli() {
        // The standard check value of CRC-32C.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        let mut b = b"abcd\xff\xff\xff\xffefgh".to_vec();
        set_checksum(&mut b, 4);
        assert_eq!(checksum(&b, 4), u32_at(&b, 4));
        assert_eq!(checksum(&b, 4), crc32c::crc32c(b"abcd\0\0\0\0efgh"));
    }

    #[test]
    fn guid_text_and_bytes() {
        assert_eq!(
            BAT_REGION.to_string(),
            "2dc27766-f623-4200-9d64-115e9bfd4a08"
        );
        assert_eq!(BAT_REGION.0[..4], [0x66, 0x77, 0xc2, 0x2d]);
        let g: Guid = "{2DC27766-F623-4200-9D64-115E9BFD4A08}".parse().unwrap();
        assert_eq!(g, BAT_REGION);
        assert!("2dc27766-f623-4200-9d64-115e9bfd4a0"
            .parse::<Guid>()
            .is_err());
        assert!("{zzc27766-f623-4200-9d64-115e9bfd4a08}"
            .parse::<Guid>()
            .is_err());
        let r = Guid::random();
        assert_eq!(r.to_string().parse::<Guid>().unwrap(), r);
        assert_eq!(r.0[7] >> 4, 4);
    }

    #[test]
    fn header_and_region_table_round_trip() {
        let h = Header {
            signature: Header::SIGNATURE,
            checksum: 0,
            sequence_number: 7,
            file_write_guid: Guid::random(),
            data_write_guid: Guid::random(),
            log_guid: Guid::NIL,
            log_version: 0,
            version: 1,
            log_length: 1 << 20,
            log_offset: 1 << 20,
        };
        let b = h.serialize();
        assert!(Header::is_valid(&b));
        let back = Header::parse(&b);
        assert_eq!(
            Header {
                checksum: 0,
                ..back
            },
            h
        );
        let mut bad = b.clone();
        bad[100] ^= 1;
        assert!(!Header::is_valid(&bad));

        let t = RegionTable {
            entries: vec![RegionEntry {
                guid: BAT_REGION,
                file_offset: 2 << 20,
                length: 1 << 20,
                required: 1,
            }],
        };
        let b = t.serialize();
        assert_eq!(RegionTable::parse(&b, 0).unwrap(), t);
        let mut bad = b.clone();
        bad[5000] = 1;
        assert!(RegionTable::parse(&bad, 0).is_err());
    }

    #[test]
    fn bat_entries() {
        let e = BatEntry::new(payload::FULLY_PRESENT, 5 << 20);
        assert_eq!((e.state(), e.offset(), e.reserved()), (6, 5 << 20, 0));
        let b = serialize_bat(&[e, BatEntry(0x8)]);
        let v: Vec<BatEntry> = parse_bat(&b).collect();
        assert_eq!(v[0], e);
        assert_eq!(v[1].reserved(), 8);
    }

    #[test]
    fn file_identifier() {
        let f = FileIdentifier {
            creator: "imgconv".into(),
        };
        let b = f.serialize();
        assert_eq!(FileIdentifier::parse(&b).unwrap(), f);
        assert!(FileIdentifier::parse(b"vhdxfil").is_err());
    }
}
