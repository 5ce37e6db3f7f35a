//! On-disk structures of a VDI file: the pre-header, the v1.1 header, UUIDs and the
//! block map, as plain structs with `parse` / `serialize`.
//!
//! All integers are little-endian. Offsets in this file are absolute file offsets.

use std::fmt;
use std::str::FromStr;

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::error::{Error, Result};
use crate::limits::{MAX_VDI_BLOCKS, MAX_VIRTUAL_SIZE};

/// Format name used in errors.
pub const FORMAT: &str = "vdi";

/// `u32Signature` of the pre-header.
pub const SIGNATURE: u32 = 0xBEDA_107F;
/// Header version 1.1, the only layout written since VirtualBox 1.x.
pub const VERSION_1_1: u32 = 0x0001_0001;
/// Size of the pre-header (text, signature, version).
pub const PRE_HEADER_SIZE: usize = 0x48;
/// `cbHeader` of a v1.1 header without LCHS geometry (what QEMU writes).
pub const HEADER_SIZE_V1: u32 = 0x180;
/// `cbHeader` of a v1.1 header with LCHS geometry (what VirtualBox writes).
pub const HEADER_SIZE_V1_PLUS: u32 = 0x190;
/// Bytes of pre-header plus the largest header this module understands.
pub const MAX_HEADER_BYTES: usize = PRE_HEADER_SIZE + HEADER_SIZE_V1_PLUS as usize;
/// Length of the comment field.
pub const COMMENT_SIZE: usize = 256;
/// The only sector size VirtualBox accepts in the geometry.
pub const SECTOR_SIZE: u32 = 512;
/// Block-map entry: never allocated (read from the parent, or zeros).
pub const BLOCK_FREE: u32 = 0xFFFF_FFFF;
/// Block-map entry: discarded, reads as zeros, the parent is not consulted.
pub const BLOCK_ZERO: u32 = 0xFFFF_FFFE;
/// Image flag bit 0: "zero expand". No other flag bit is defined.
pub const FLAGS_MASK: u32 = 0x1;
/// The text VirtualBox (Oracle VM releases) puts in front of its images.
pub const VIRTUALBOX_TEXT: &str = "<<< Oracle VM VirtualBox Disk Image >>>\n";

// Offsets of the header fields (absolute in the file).
const OFF_TEXT: usize = 0x00;
const OFF_SIGNATURE: usize = 0x40;
const OFF_VERSION: usize = 0x44;
const OFF_CB_HEADER: usize = 0x48;
const OFF_TYPE: usize = 0x4C;
const OFF_FLAGS: usize = 0x50;
const OFF_COMMENT: usize = 0x54;
const OFF_BLOCKS: usize = 0x154;
const OFF_DATA: usize = 0x158;
const OFF_LEGACY_GEOMETRY: usize = 0x15C;
const OFF_DUMMY: usize = 0x16C;
const OFF_DISK_SIZE: usize = 0x170;
const OFF_BLOCK_SIZE: usize = 0x178;
const OFF_BLOCK_EXTRA: usize = 0x17C;
const OFF_CBLOCKS: usize = 0x180;
const OFF_ALLOCATED: usize = 0x184;
const OFF_UUID_CREATE: usize = 0x188;
const OFF_UUID_MODIFY: usize = 0x198;
const OFF_UUID_LINKAGE: usize = 0x1A8;
const OFF_UUID_PARENT_MODIFY: usize = 0x1B8;
const OFF_LCHS: usize = 0x1C8;

/// A UUID, held in RFC 4122 (big-endian) byte order.
///
/// VirtualBox stores UUIDs in GUID memory order: the first three fields little-endian,
/// the last eight bytes as they are; [`Uuid::from_disk`] / [`Uuid::to_disk`] convert.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// The all-zero UUID (VirtualBox's "not set").
    pub const NULL: Uuid = Uuid([0; 16]);

    /// Decodes the 16 bytes stored in a VDI header.
    pub fn from_disk(b: &[u8]) -> Uuid {
        let mut u = [0u8; 16];
        u[0..4].copy_from_slice(&[b[3], b[2], b[1], b[0]]);
        u[4..6].copy_from_slice(&[b[5], b[4]]);
        u[6..8].copy_from_slice(&[b[7], b[6]]);
        u[8..16].copy_from_slice(&b[8..16]);
        Uuid(u)
    }

    /// The 16 bytes to store in a VDI header.
    pub fn to_disk(self) -> [u8; 16] {
        let u = self.0;
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&[u[3], u[2], u[1], u[0]]);
        b[4..6].copy_from_slice(&[u[5], u[4]]);
        b[6..8].copy_from_slice(&[u[7], u[6]]);
        b[8..16].copy_from_slice(&u[8..16]);
        b
    }

    /// A fresh random (version 4) UUID.
    pub fn random() -> Uuid {
        let mut u: [u8; 16] = crate::random::bytes();
        u[6] = (u[6] & 0x0F) | 0x40;
        u[8] = (u[8] & 0x3F) | 0x80;
        Uuid(u)
    }

    /// True for the all-zero UUID.
    pub fn is_null(&self) -> bool {
        self.0 == [0; 16]
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Uuid {
    type Err = Error;

    /// Parses `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (braces allowed, any case).
    fn from_str(s: &str) -> Result<Uuid> {
        let t = s.trim().trim_start_matches('{').trim_end_matches('}');
        let bad = || {
            Error::invalid(format!(
                "'{s}' is not a UUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)"
            ))
        };
        let groups: Vec<&str> = t.split('-').collect();
        if groups.len() != 5 || groups.iter().map(|g| g.len()).ne([8, 4, 4, 4, 12]) {
            return Err(bad());
        }
        let hex: String = groups.concat();
        let mut u = [0u8; 16];
        for (i, byte) in u.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(Uuid(u))
    }
}

/// The 72-byte pre-header: a text for people, the signature and the header version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreHeader {
    /// `szFileInfo`: NUL-padded text, not validated by anyone.
    pub text: [u8; 64],
    /// `u32Signature`, [`SIGNATURE`] in a valid file.
    pub signature: u32,
    /// `u32Version`: `(major << 16) | minor`.
    pub version: u32,
}

impl PreHeader {
    /// A pre-header with `text` (truncated to 63 bytes) and version 1.1.
    pub fn new(text: &str) -> Self {
        let mut t = [0u8; 64];
        let n = text.len().min(63);
        t[..n].copy_from_slice(&text.as_bytes()[..n]);
        PreHeader {
            text: t,
            signature: SIGNATURE,
            version: VERSION_1_1,
        }
    }

    /// Decodes the first [`PRE_HEADER_SIZE`] bytes of `b` (which must be that long).
    pub fn parse(b: &[u8]) -> PreHeader {
        let mut text = [0u8; 64];
        text.copy_from_slice(&b[OFF_TEXT..OFF_TEXT + 64]);
        PreHeader {
            text,
            signature: LE::read_u32(&b[OFF_SIGNATURE..]),
            version: LE::read_u32(&b[OFF_VERSION..]),
        }
    }

    /// Encodes into the first [`PRE_HEADER_SIZE`] bytes of `b`.
    pub fn serialize(&self, b: &mut [u8]) {
        b[OFF_TEXT..OFF_TEXT + 64].copy_from_slice(&self.text);
        LE::write_u32(&mut b[OFF_SIGNATURE..], self.signature);
        LE::write_u32(&mut b[OFF_VERSION..], self.version);
    }

    /// Major header version.
    pub fn major(&self) -> u32 {
        self.version >> 16
    }

    /// Minor header version.
    pub fn minor(&self) -> u32 {
        self.version & 0xFFFF
    }

    /// The text up to its first NUL or newline, for display.
    pub fn text_str(&self) -> String {
        let end = self.text.iter().position(|&c| c == 0).unwrap_or(64);
        String::from_utf8_lossy(&self.text[..end])
            .trim_end_matches('\n')
            .to_string()
    }
}

/// Disk geometry as the header stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Geometry {
    /// Cylinders (0 = not set).
    pub cylinders: u32,
    /// Heads.
    pub heads: u32,
    /// Sectors per track.
    pub sectors: u32,
    /// Bytes per sector (512).
    pub sector_size: u32,
}

impl Geometry {
    /// "Not calculated": 0/0/0 with 512-byte sectors, as VirtualBox initialises it.
    pub const UNSET: Geometry = Geometry {
        cylinders: 0,
        heads: 0,
        sectors: 0,
        sector_size: SECTOR_SIZE,
    };

    fn parse(b: &[u8]) -> Geometry {
        Geometry {
            cylinders: LE::read_u32(&b[0..]),
            heads: LE::read_u32(&b[4..]),
            sectors: LE::read_u32(&b[8..]),
            sector_size: LE::read_u32(&b[12..]),
        }
    }

    fn serialize(&self, b: &mut [u8]) {
        LE::write_u32(&mut b[0..], self.cylinders);
        LE::write_u32(&mut b[4..], self.heads);
        LE::write_u32(&mut b[8..], self.sectors);
        LE::write_u32(&mut b[12..], self.sector_size);
    }
}

/// `u32Type`: what kind of image this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageType {
    /// 1: dynamically growing ("normal").
    Dynamic,
    /// 2: every block preallocated ("fixed", qemu's `static=on`).
    Static,
    /// 3: an obsolete undo image (a child of another image).
    Undo,
    /// 4: a differencing image (a child of another image).
    Diff,
}

impl ImageType {
    /// Decodes `u32Type`.
    pub fn from_u32(v: u32) -> Option<ImageType> {
        match v {
            1 => Some(ImageType::Dynamic),
            2 => Some(ImageType::Static),
            3 => Some(ImageType::Undo),
            4 => Some(ImageType::Diff),
            _ => None,
        }
    }

    /// The value stored in `u32Type`.
    pub fn to_u32(self) -> u32 {
        match self {
            ImageType::Dynamic => 1,
            ImageType::Static => 2,
            ImageType::Undo => 3,
            ImageType::Diff => 4,
        }
    }

    /// Name shown by `info`.
    pub fn name(self) -> &'static str {
        match self {
            ImageType::Dynamic => "dynamic",
            ImageType::Static => "static",
            ImageType::Undo => "undo",
            ImageType::Diff => "differencing",
        }
    }

    /// True for images whose free blocks are read from a parent image.
    pub fn has_parent(self) -> bool {
        matches!(self, ImageType::Undo | ImageType::Diff)
    }
}

/// The v1.1 header (`VDIHEADER1` / `VDIHEADER1PLUS`), every field as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// `cbHeader`: 0x180, or 0x190 and more with LCHS geometry.
    pub header_size: u32,
    /// `u32Type`, raw (see [`ImageType::from_u32`]).
    pub image_type: u32,
    /// `fFlags`.
    pub flags: u32,
    /// `szComment`: NUL-terminated UTF-8.
    pub comment: [u8; COMMENT_SIZE],
    /// `offBlocks`: file offset of the block map.
    pub blocks_offset: u32,
    /// `offData`: file offset of physical block 0.
    pub data_offset: u32,
    /// Legacy geometry (ignored since 1.1, kept as found).
    pub legacy_geometry: Geometry,
    /// `u32Dummy` (old BIOS translation).
    pub dummy: u32,
    /// `cbDisk`: virtual size in bytes.
    pub disk_size: u64,
    /// `cbBlock`: block size, a power of two.
    pub block_size: u32,
    /// `cbBlockExtra`: bytes in front of each block's data (0 or a power of two).
    pub block_extra: u32,
    /// `cBlocks`: entries in the block map.
    pub blocks: u32,
    /// `cBlocksAllocated`: physical blocks in use.
    pub blocks_allocated: u32,
    /// `uuidCreate`: the image's identity (what VirtualBox registers).
    pub uuid_create: Uuid,
    /// `uuidModify`: changes with every modification.
    pub uuid_modify: Uuid,
    /// `uuidLinkage`: the parent's `uuidCreate` (child images).
    pub uuid_linkage: Uuid,
    /// `uuidParentModify`: the parent's `uuidModify` when the child was made.
    pub uuid_parent_modify: Uuid,
    /// LCHS geometry, present when `header_size >= 0x190`.
    pub lchs: Option<Geometry>,
}

impl Header {
    /// Decodes the header from `b`, the file's first bytes from offset 0: at least
    /// `0x48 + 0x180` bytes, and `0x48 + 0x190` when `cbHeader` says LCHS is present.
    ///
    /// Only decodes; [`Header::validate`] checks consistency.
    pub fn parse(b: &[u8]) -> Result<Header> {
        let min = PRE_HEADER_SIZE + HEADER_SIZE_V1 as usize;
        if b.len() < min {
            return Err(Error::corrupt(
                FORMAT,
                "header",
                OFF_CB_HEADER as u64,
                format!("{} bytes needed, {} present", min, b.len()),
            ));
        }
        let header_size = LE::read_u32(&b[OFF_CB_HEADER..]);
        let lchs = if header_size >= HEADER_SIZE_V1_PLUS {
            if b.len() < MAX_HEADER_BYTES {
                return Err(Error::corrupt(
                    FORMAT,
                    "header",
                    OFF_LCHS as u64,
                    "the LCHS geometry is cut off",
                ));
            }
            Some(Geometry::parse(&b[OFF_LCHS..]))
        } else {
            None
        };
        let mut comment = [0u8; COMMENT_SIZE];
        comment.copy_from_slice(&b[OFF_COMMENT..OFF_COMMENT + COMMENT_SIZE]);
        Ok(Header {
            header_size,
            image_type: LE::read_u32(&b[OFF_TYPE..]),
            flags: LE::read_u32(&b[OFF_FLAGS..]),
            comment,
            blocks_offset: LE::read_u32(&b[OFF_BLOCKS..]),
            data_offset: LE::read_u32(&b[OFF_DATA..]),
            legacy_geometry: Geometry::parse(&b[OFF_LEGACY_GEOMETRY..]),
            dummy: LE::read_u32(&b[OFF_DUMMY..]),
            disk_size: LE::read_u64(&b[OFF_DISK_SIZE..]),
            block_size: LE::read_u32(&b[OFF_BLOCK_SIZE..]),
            block_extra: LE::read_u32(&b[OFF_BLOCK_EXTRA..]),
            blocks: LE::read_u32(&b[OFF_CBLOCKS..]),
            blocks_allocated: LE::read_u32(&b[OFF_ALLOCATED..]),
            uuid_create: Uuid::from_disk(&b[OFF_UUID_CREATE..OFF_UUID_CREATE + 16]),
            uuid_modify: Uuid::from_disk(&b[OFF_UUID_MODIFY..OFF_UUID_MODIFY + 16]),
            uuid_linkage: Uuid::from_disk(&b[OFF_UUID_LINKAGE..OFF_UUID_LINKAGE + 16]),
            uuid_parent_modify: Uuid::from_disk(
                &b[OFF_UUID_PARENT_MODIFY..OFF_UUID_PARENT_MODIFY + 16],
            ),
            lchs,
        })
    }

    /// Encodes the header into `b` (from file offset 0; the pre-header bytes are left
    /// alone). `b` must hold [`Header::end`] bytes.
    pub fn serialize(&self, b: &mut [u8]) {
        LE::write_u32(&mut b[OFF_CB_HEADER..], self.header_size);
        LE::write_u32(&mut b[OFF_TYPE..], self.image_type);
        LE::write_u32(&mut b[OFF_FLAGS..], self.flags);
        b[OFF_COMMENT..OFF_COMMENT + COMMENT_SIZE].copy_from_slice(&self.comment);
        LE::write_u32(&mut b[OFF_BLOCKS..], self.blocks_offset);
        LE::write_u32(&mut b[OFF_DATA..], self.data_offset);
        self.legacy_geometry
            .serialize(&mut b[OFF_LEGACY_GEOMETRY..OFF_LEGACY_GEOMETRY + 16]);
        LE::write_u32(&mut b[OFF_DUMMY..], self.dummy);
        LE::write_u64(&mut b[OFF_DISK_SIZE..], self.disk_size);
        LE::write_u32(&mut b[OFF_BLOCK_SIZE..], self.block_size);
        LE::write_u32(&mut b[OFF_BLOCK_EXTRA..], self.block_extra);
        LE::write_u32(&mut b[OFF_CBLOCKS..], self.blocks);
        LE::write_u32(&mut b[OFF_ALLOCATED..], self.blocks_allocated);
        b[OFF_UUID_CREATE..OFF_UUID_CREATE + 16].copy_from_slice(&self.uuid_create.to_disk());
        b[OFF_UUID_MODIFY..OFF_UUID_MODIFY + 16].copy_from_slice(&self.uuid_modify.to_disk());
        b[OFF_UUID_LINKAGE..OFF_UUID_LINKAGE + 16].copy_from_slice(&self.uuid_linkage.to_disk());
        b[OFF_UUID_PARENT_MODIFY..OFF_UUID_PARENT_MODIFY + 16]
            .copy_from_slice(&self.uuid_parent_modify.to_disk());
        if let Some(g) = &self.lchs {
            g.serialize(&mut b[OFF_LCHS..OFF_LCHS + 16]);
        }
    }

    /// File offset just past the header fields this struct holds.
    pub fn end(&self) -> usize {
        if self.lchs.is_some() {
            MAX_HEADER_BYTES
        } else {
            PRE_HEADER_SIZE + HEADER_SIZE_V1 as usize
        }
    }

    /// The decoded image type (valid after [`Header::validate`]).
    pub fn kind(&self) -> Option<ImageType> {
        ImageType::from_u32(self.image_type)
    }

    /// The comment up to its first NUL.
    pub fn comment_str(&self) -> String {
        let end = self
            .comment
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(COMMENT_SIZE);
        String::from_utf8_lossy(&self.comment[..end]).into_owned()
    }

    /// Bytes one physical block takes in the file (`cbBlockExtra + cbBlock`).
    pub fn block_stride(&self) -> u64 {
        self.block_extra as u64 + self.block_size as u64
    }

    /// Blocks needed to cover the virtual disk.
    pub fn blocks_needed(&self) -> u64 {
        self.disk_size.div_ceil(self.block_size.max(1) as u64)
    }

    /// Checks the header as VirtualBox's `vdiValidateHeader` does, plus what a reader of
    /// untrusted files needs: offsets inside a file of `file_len` bytes and sizes within
    /// the crate's limits. Errors name the offending field's offset.
    pub fn validate(&self, file_len: u64) -> Result<()> {
        let bad = |off: usize, why: String| Err(Error::corrupt(FORMAT, "header", off as u64, why));
        if self.header_size < HEADER_SIZE_V1 {
            return bad(
                OFF_CB_HEADER,
                format!(
                    "header size {:#x} is below {HEADER_SIZE_V1:#x}",
                    self.header_size
                ),
            );
        }
        let header_end = PRE_HEADER_SIZE as u64 + self.header_size as u64;
        if (self.blocks_offset as u64) < header_end {
            return bad(
                OFF_BLOCKS,
                format!(
                    "block map offset {:#x} lies inside the header (which ends at {header_end:#x})",
                    self.blocks_offset
                ),
            );
        }
        if self.kind().is_none() {
            return bad(
                OFF_TYPE,
                format!("image type {} is not 1..4", self.image_type),
            );
        }
        if self.flags & !FLAGS_MASK != 0 {
            return bad(OFF_FLAGS, format!("unknown image flags {:#x}", self.flags));
        }
        if let Some(g) = &self.lchs {
            if g.sector_size != SECTOR_SIZE {
                return bad(
                    OFF_LCHS + 12,
                    format!("LCHS sector size {} is not {SECTOR_SIZE}", g.sector_size),
                );
            }
        }
        if self.disk_size == 0 {
            return bad(OFF_DISK_SIZE, "disk size is 0".into());
        }
        if self.disk_size > MAX_VIRTUAL_SIZE {
            return bad(
                OFF_DISK_SIZE,
                format!(
                    "disk size {} exceeds the limit {MAX_VIRTUAL_SIZE}",
                    self.disk_size
                ),
            );
        }
        if self.block_size == 0 || !self.block_size.is_power_of_two() {
            return bad(
                OFF_BLOCK_SIZE,
                format!("block size {} is not a power of two", self.block_size),
            );
        }
        if self.block_extra != 0 && !self.block_extra.is_power_of_two() {
            return bad(
                OFF_BLOCK_EXTRA,
                format!(
                    "block extra size {} is not 0 or a power of two",
                    self.block_extra
                ),
            );
        }
        if self.blocks == 0 {
            return bad(OFF_CBLOCKS, "block count is 0".into());
        }
        if (self.block_size as u64) * (self.blocks as u64) < self.disk_size {
            return bad(
                OFF_CBLOCKS,
                format!(
                    "{} blocks of {} bytes cannot hold a {}-byte disk",
                    self.blocks, self.block_size, self.disk_size
                ),
            );
        }
        if self.blocks as u64 > MAX_VDI_BLOCKS {
            return Err(Error::TooLarge {
                format: FORMAT,
                structure: "block map",
                size: self.blocks as u64 * 4,
                limit: MAX_VDI_BLOCKS * 4,
            });
        }
        if self.blocks_allocated > self.blocks {
            return bad(
                OFF_ALLOCATED,
                format!(
                    "{} blocks allocated out of {}",
                    self.blocks_allocated, self.blocks
                ),
            );
        }
        let map_end = self.blocks_offset as u64 + 4 * self.blocks as u64;
        if (self.data_offset as u64) < map_end {
            return bad(
                OFF_DATA,
                format!(
                    "data offset {:#x} overlaps the block map (which ends at {map_end:#x})",
                    self.data_offset
                ),
            );
        }
        if map_end > file_len {
            return Err(Error::corrupt(
                FORMAT,
                "block map",
                self.blocks_offset as u64,
                format!(
                    "{} entries end at {map_end:#x}, past the end of the file ({file_len:#x})",
                    self.blocks
                ),
            ));
        }
        if self.data_offset as u64 > file_len {
            return bad(
                OFF_DATA,
                format!(
                    "data offset {:#x} is past the end of the file ({file_len:#x})",
                    self.data_offset
                ),
            );
        }
        if self.uuid_create.is_null() {
            return bad(OFF_UUID_CREATE, "the image UUID is null".into());
        }
        if self.uuid_modify.is_null() {
            return bad(OFF_UUID_MODIFY, "the modification UUID is null".into());
        }
        if self.kind().is_some_and(ImageType::has_parent) && self.uuid_linkage.is_null() {
            return bad(
                OFF_UUID_LINKAGE,
                "a differencing image has a null parent UUID".into(),
            );
        }
        Ok(())
    }
}

/// Decodes a block map (`cBlocks` little-endian u32 entries).
pub fn parse_block_map(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4).map(LE::read_u32).collect()
}

/// Encodes a block map.
pub fn serialize_block_map(map: &[u32]) -> Vec<u8> {
    let mut b = vec![0u8; map.len() * 4];
    for (chunk, &e) in b.chunks_exact_mut(4).zip(map) {
        LE::write_u32(chunk, e);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            header_size: HEADER_SIZE_V1_PLUS,
            image_type: 1,
            flags: 0,
            comment: [0; COMMENT_SIZE],
            blocks_offset: 0x10_0000,
            data_offset: 0x20_0000,
            legacy_geometry: Geometry::UNSET,
            dummy: 0,
            disk_size: 10 << 20,
            block_size: 1 << 20,
            block_extra: 0,
            blocks: 10,
            blocks_allocated: 3,
            uuid_create: Uuid::random(),
            uuid_modify: Uuid::random(),
            uuid_linkage: Uuid::NULL,
            uuid_parent_modify: Uuid::NULL,
            lchs: Some(Geometry::UNSET),
        }
    }

    #[test]
    fn header_round_trips() {
        let h = sample();
        let mut b = vec![0u8; MAX_HEADER_BYTES];
        PreHeader::new(VIRTUALBOX_TEXT).serialize(&mut b);
        h.serialize(&mut b);
        let p = PreHeader::parse(&b);
        assert_eq!((p.signature, p.major(), p.minor()), (SIGNATURE, 1, 1));
        assert_eq!(p.text_str(), "<<< Oracle VM VirtualBox Disk Image >>>");
        assert_eq!(Header::parse(&b).unwrap(), h);
        h.validate(0x20_0000).unwrap();
    }

    #[test]
    fn uuids_use_guid_byte_order() {
        let u: Uuid = "01020304-0506-0708-090a-0b0c0d0e0f10".parse().unwrap();
        assert_eq!(
            u.to_disk(),
            [4, 3, 2, 1, 6, 5, 8, 7, 9, 10, 11, 12, 13, 14, 15, 16]
        );
        assert_eq!(Uuid::from_disk(&u.to_disk()), u);
        assert_eq!(u.to_string(), "01020304-0506-0708-090a-0b0c0d0e0f10");
        let r = Uuid::random();
        assert_eq!(r.0[6] >> 4, 4);
        assert_ne!(r, Uuid::random());
        assert!("0102".parse::<Uuid>().is_err());
        assert!("0102030g-0506-0708-090a-0b0c0d0e0f10"
            .parse::<Uuid>()
            .is_err());
    }

    #[test]
    fn validation_catches_bad_fields() {
        let check = |f: &dyn Fn(&mut Header)| {
            let mut h = sample();
            f(&mut h);
            h.validate(1 << 30).unwrap_err()
        };
        check(&|h| h.block_size = 3 << 19);
        check(&|h| h.blocks = 5);
        check(&|h| h.blocks = 0);
        check(&|h| h.uuid_create = Uuid::NULL);
        check(&|h| h.uuid_modify = Uuid::NULL);
        check(&|h| h.image_type = 7);
        check(&|h| h.flags = 2);
        check(&|h| h.data_offset = 0x10_0010);
        check(&|h| h.blocks_offset = 0x100);
        check(&|h| h.blocks_allocated = 11);
        check(&|h| h.image_type = 4);
        let mut h = sample();
        assert!(h.validate(0x10_0010).is_err()); // map past EOF
        h.blocks = u32::MAX;
        h.data_offset = u32::MAX;
        assert!(matches!(h.validate(u64::MAX), Err(Error::TooLarge { .. })));
    }

    #[test]
    fn block_map_round_trips() {
        let m = vec![BLOCK_FREE, 0, 1, BLOCK_ZERO];
        assert_eq!(parse_block_map(&serialize_block_map(&m)), m);
    }
}
