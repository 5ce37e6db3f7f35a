//! VHD on-disk structures as plain structs with `parse` / `serialize`: the hard disk
//! footer, the dynamic disk header with its parent locators, the block allocation table
//! (BAT) and the per-block sector bitmap; the checksum, the CHS geometry and the virtual
//! size rule. No I/O here: [`super::reader`], [`super::writer`] and [`super::check`] walk
//! these.
//!
//! Every integer is big-endian (the parent locators' path data is UTF-16LE or UTF-8, the
//! parent name UTF-16BE).

use std::fmt;

use crate::error::{Error, Result};

/// Format name in errors (qemu's name for VHD).
pub const FORMAT: &str = "vpc";

/// Size of the hard disk footer.
pub const FOOTER_SIZE: usize = 512;
/// Size of the footer written by Virtual PC before 2004 (the last reserved byte missing).
pub const OLD_FOOTER_SIZE: usize = 511;
/// Size of the dynamic disk header.
pub const DYNAMIC_HEADER_SIZE: usize = 1024;
/// Sector size: the unit of the BAT, the bitmaps and the geometry.
pub const SECTOR: u64 = 512;

/// The footer's cookie.
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
/// The dynamic disk header's cookie.
pub const DYNAMIC_COOKIE: &[u8; 8] = b"cxsparse";

/// A BAT entry for a block that is not allocated.
pub const BAT_UNUSED: u32 = 0xFFFF_FFFF;

/// Offset of the checksum in the footer.
const FOOTER_CHECKSUM_AT: usize = 64;
/// Offset of the checksum in the dynamic disk header.
const HEADER_CHECKSUM_AT: usize = 36;

/// Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00:00 UTC).
pub const VHD_EPOCH: u64 = 946_684_800;

/// Largest virtual disk qemu opens or creates: 2040 GiB, in sectors.
pub const MAX_SECTORS: u64 = 0xff00_0000;
/// The largest geometry (65535 × 16 × 255), which means "the size is the current size".
pub const MAX_GEOMETRY_SECTORS: u64 = 65535 * 16 * 255;

/// `features`: bit 1 is reserved and always set.
pub const FEATURES_RESERVED: u32 = 0x2;
/// Footer and header version 1.0.
pub const VERSION_1_0: u32 = 0x0001_0000;
/// `data_offset` of a fixed disk's footer and of the dynamic header (no next structure).
pub const NO_NEXT: u64 = u64::MAX;

/// The disk types of the footer's `disk type` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    /// 2: the disk's bytes, then the footer.
    Fixed,
    /// 3: footer copy, dynamic header, BAT, blocks, footer.
    Dynamic,
    /// 4: a dynamic disk whose unallocated sectors come from a parent.
    Differencing,
}

impl DiskType {
    /// The type of a footer's `disk type` value, or `None` (0 none, 1 and 5–6 reserved).
    pub fn from_u32(v: u32) -> Option<DiskType> {
        match v {
            2 => Some(DiskType::Fixed),
            3 => Some(DiskType::Dynamic),
            4 => Some(DiskType::Differencing),
            _ => None,
        }
    }

    /// The on-disk value.
    pub fn to_u32(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }

    /// The name used in messages (`fixed`, `dynamic`, `differencing`).
    pub fn name(self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }
}

/// A cylinder/head/sector geometry as the footer stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Geometry {
    /// Cylinders.
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors: u8,
}

impl Geometry {
    /// 65535 × 16 × 255: what qemu writes with `force_size=on`.
    pub const MAX: Geometry = Geometry {
        cylinders: 65535,
        heads: 16,
        sectors: 255,
    };

    /// Cylinders × heads × sectors.
    pub fn total_sectors(self) -> u64 {
        self.cylinders as u64 * self.heads as u64 * self.sectors as u64
    }

    /// The geometry the VHD specification's algorithm gives for `total_sectors`, as qemu
    /// computes it (up to 255 heads are not used: beyond 65535 × 16 × 63 sectors it takes
    /// 16 heads and 255 sectors per track). It may cover fewer sectors than asked.
    pub fn for_sectors(total_sectors: u64) -> Geometry {
        let total = total_sectors.min(MAX_GEOMETRY_SECTORS);
        let (mut spt, mut heads, mut cth);
        if total >= 65535 * 16 * 63 {
            spt = 255;
            heads = 16;
            cth = total / spt;
        } else {
            spt = 17;
            cth = total / spt;
            heads = cth.div_ceil(1024).max(4);
            if cth >= heads * 1024 || heads > 16 {
                spt = 31;
                heads = 16;
                cth = total / spt;
            }
            if cth >= heads * 1024 {
                spt = 63;
                heads = 16;
                cth = total / spt;
            }
        }
        Geometry {
            // Bounded by the min() above: 65535 × 16 × 255 / (16 × 255) = 65535.
            cylinders: (cth / heads) as u16,
            heads: heads as u8,
            sectors: spt as u8,
        }
    }
}

/// The size and geometry of a new image, as `qemu-img create -f vpc` decides them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewSize {
    /// The geometry to store.
    pub geometry: Geometry,
    /// The virtual size, in bytes (the footer's original and current size).
    pub size: u64,
}

/// The geometry and virtual size qemu gives a new image of at least `size` bytes: the
/// size rounded up to whole sectors, then (unless `force_size`) up to the smallest
/// geometry that covers it. With `force_size` — or when the disk is too large for a CHS
/// geometry — the geometry is 65535 × 16 × 255 and the size is exact.
pub fn new_size(size: u64, force_size: bool) -> Result<NewSize> {
    let too_large = || {
        Error::invalid(format!(
            "vpc: disk size {size} is too large, the largest VHD is 2040 GiB ({} bytes)",
            MAX_SECTORS * SECTOR
        ))
    };
    let size = size
        .checked_next_multiple_of(SECTOR)
        .ok_or_else(too_large)?;
    let geometry = if force_size {
        Geometry::MAX
    } else {
        let wanted = (size / SECTOR).min(MAX_GEOMETRY_SECTORS);
        let mut g = Geometry::default();
        let mut i = 0;
        while wanted > g.total_sectors() {
            g = Geometry::for_sectors(wanted + i);
            i += 1;
        }
        g
    };
    let sectors = if geometry.total_sectors() == MAX_GEOMETRY_SECTORS {
        size / SECTOR
    } else {
        geometry.total_sectors()
    };
    if sectors > MAX_SECTORS {
        return Err(too_large());
    }
    Ok(NewSize {
        geometry,
        size: sectors * SECTOR,
    })
}

/// The one's complement of the byte sum of `bytes`, leaving out the 4-byte checksum field
/// at `skip`.
fn checksum(bytes: &[u8], skip: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(skip..skip + 4).contains(i))
        .fold(0u32, |a, (_, &b)| a.wrapping_add(b as u32));
    !sum
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A 16-byte identifier, shown as its bytes in order (8-4-4-4-12 hex digits).
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// A random (version 4) identifier.
    pub fn random() -> Uuid {
        let mut u: [u8; 16] = crate::random::bytes();
        u[6] = (u[6] & 0x0F) | 0x40;
        u[8] = (u[8] & 0x3F) | 0x80;
        Uuid(u)
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

/// The hard disk footer (512 bytes; at the end of every VHD, and copied at offset 0 of a
/// dynamic or differencing one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// `conectix`.
    pub cookie: [u8; 8],
    /// Bit 0: temporary disk; bit 1: reserved, always set.
    pub features: u32,
    /// File format version, 0x00010000.
    pub version: u32,
    /// Offset of the dynamic disk header; all ones for a fixed disk.
    pub data_offset: u64,
    /// Creation time, seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    /// The application that made the image (`vpc `, `win `, `qemu`, `qem2`, `d2v\0`…).
    pub creator_app: [u8; 4],
    /// That application's version (major << 16 | minor).
    pub creator_version: u32,
    /// The host OS (`Wi2k`, `Mac `…).
    pub creator_os: [u8; 4],
    /// Size at creation, in bytes.
    pub original_size: u64,
    /// Current size, in bytes.
    pub current_size: u64,
    /// CHS geometry.
    pub geometry: Geometry,
    /// [`DiskType`] value.
    pub disk_type: u32,
    /// Checksum as stored.
    pub checksum: u32,
    /// The image's identifier (a differencing child names its parent by it).
    pub uuid: Uuid,
    /// 1 when a VM's saved state refers to the disk.
    pub saved_state: u8,
}

impl Footer {
    /// Parses a footer from 512 bytes, or from the 511 bytes of an old Virtual PC footer.
    /// Only the length is checked; see [`Footer::validate`].
    pub fn parse(b: &[u8]) -> Footer {
        let mut full = [0u8; FOOTER_SIZE];
        let n = b.len().min(FOOTER_SIZE);
        full[..n].copy_from_slice(&b[..n]);
        let b = &full;
        Footer {
            cookie: b[0..8].try_into().expect("8 bytes"),
            features: be32(b, 8),
            version: be32(b, 12),
            data_offset: be64(b, 16),
            timestamp: be32(b, 24),
            creator_app: b[28..32].try_into().expect("4 bytes"),
            creator_version: be32(b, 32),
            creator_os: b[36..40].try_into().expect("4 bytes"),
            original_size: be64(b, 40),
            current_size: be64(b, 48),
            geometry: Geometry {
                cylinders: be16(b, 56),
                heads: b[58],
                sectors: b[59],
            },
            disk_type: be32(b, 60),
            checksum: be32(b, FOOTER_CHECKSUM_AT),
            uuid: Uuid(b[68..84].try_into().expect("16 bytes")),
            saved_state: b[84],
        }
    }

    /// The 512 bytes of this footer, with the checksum as stored in the struct (reserved
    /// bytes zero).
    pub fn serialize(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        b[0..8].copy_from_slice(&self.cookie);
        b[8..12].copy_from_slice(&self.features.to_be_bytes());
        b[12..16].copy_from_slice(&self.version.to_be_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.timestamp.to_be_bytes());
        b[28..32].copy_from_slice(&self.creator_app);
        b[32..36].copy_from_slice(&self.creator_version.to_be_bytes());
        b[36..40].copy_from_slice(&self.creator_os);
        b[40..48].copy_from_slice(&self.original_size.to_be_bytes());
        b[48..56].copy_from_slice(&self.current_size.to_be_bytes());
        b[56..58].copy_from_slice(&self.geometry.cylinders.to_be_bytes());
        b[58] = self.geometry.heads;
        b[59] = self.geometry.sectors;
        b[60..64].copy_from_slice(&self.disk_type.to_be_bytes());
        b[64..68].copy_from_slice(&self.checksum.to_be_bytes());
        b[68..84].copy_from_slice(&self.uuid.0);
        b[84] = self.saved_state;
        b
    }

    /// Sets the checksum to the one these fields need, and returns the bytes.
    pub fn seal(&mut self) -> [u8; FOOTER_SIZE] {
        self.checksum = 0;
        self.checksum = Footer::computed_checksum(&self.serialize());
        self.serialize()
    }

    /// The checksum of footer bytes `b` (512 or 511 long).
    pub fn computed_checksum(b: &[u8]) -> u32 {
        checksum(b, FOOTER_CHECKSUM_AT)
    }

    /// True when `b` starts with the footer cookie.
    pub fn has_cookie(b: &[u8]) -> bool {
        b.starts_with(FOOTER_COOKIE)
    }

    /// The disk type, if it is one of the three.
    pub fn kind(&self) -> Option<DiskType> {
        DiskType::from_u32(self.disk_type)
    }

    /// Checks the cookie and the checksum of footer bytes `raw` found at `offset`.
    pub fn validate(raw: &[u8], offset: u64) -> Result<Footer> {
        let f = Footer::parse(raw);
        if &f.cookie != FOOTER_COOKIE {
            return Err(Error::corrupt(
                FORMAT,
                "footer",
                offset,
                format!("cookie {:?} is not \"conectix\"", printable(&f.cookie)),
            ));
        }
        let want = Footer::computed_checksum(raw);
        if f.checksum != want {
            return Err(Error::corrupt(
                FORMAT,
                "footer",
                offset,
                format!(
                    "checksum {:#010x} is wrong (the footer's bytes give {want:#010x})",
                    f.checksum
                ),
            ));
        }
        Ok(f)
    }

    /// True when qemu (since 8.2) takes the virtual size from the geometry for this
    /// creator: Virtual PC (`vpc `) and qemu without `force_size` (`qemu`) only. Every
    /// other creator — Hyper-V `win `, qemu with `force_size` `qem2`, Disk2VHD `d2v\0`,
    /// XenServer `tap\0`, XenConverter `CTXS`, Azure `wa\0\0`, FreeBSD mkimg `*img`… —
    /// is taken to store the exact size. The comparison is of all four bytes.
    pub fn size_from_geometry(&self) -> bool {
        matches!(&self.creator_app, b"vpc " | b"qemu")
    }

    /// The virtual size as qemu reads it: cylinders × heads × sectors × 512 for the
    /// creators that size by geometry ([`Footer::size_from_geometry`]) unless the geometry
    /// is the largest (65535 × 16 × 255); otherwise the current size, in whole sectors.
    pub fn virtual_size(&self) -> u64 {
        let chs = self.geometry.total_sectors();
        let sectors = if !self.size_from_geometry() || chs == MAX_GEOMETRY_SECTORS {
            self.current_size / SECTOR
        } else {
            chs
        };
        sectors * SECTOR
    }
}

/// Bytes as text for messages (non-printable bytes escaped).
pub fn printable(b: &[u8]) -> String {
    b.iter()
        .flat_map(|&c| std::ascii::escape_default(c))
        .map(char::from)
        .collect()
}

/// One of the eight parent locator entries of the dynamic disk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParentLocator {
    /// Platform code: `W2ru`, `W2ku`, `Wi2r`, `Wi2k`, `MacX`, `Mac `, or zero (unused).
    pub platform: [u8; 4],
    /// Space reserved for the locator data: sectors per the specification, bytes as
    /// Windows writes it.
    pub data_space: u32,
    /// Length of the locator data in bytes.
    pub data_length: u32,
    /// Reserved.
    pub reserved: u32,
    /// File offset of the locator data.
    pub data_offset: u64,
}

/// What a parent locator's data is, from its platform code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocatorKind {
    /// `W2ru`: a path relative to the child's folder, UTF-16LE, Windows separators.
    WindowsRelative,
    /// `W2ku`: an absolute path, UTF-16LE.
    WindowsAbsolute,
    /// `MacX`: a file URL, UTF-8.
    MacUrl,
    /// `Wi2r` / `Wi2k` (deprecated, ANSI paths) and `Mac ` (a Mac OS alias record).
    Unreadable,
    /// Zero platform code: an unused entry.
    None,
}

impl ParentLocator {
    /// Parses one 24-byte entry.
    pub fn parse(b: &[u8]) -> ParentLocator {
        ParentLocator {
            platform: b[0..4].try_into().expect("4 bytes"),
            data_space: be32(b, 4),
            data_length: be32(b, 8),
            reserved: be32(b, 12),
            data_offset: be64(b, 16),
        }
    }

    /// The 24 bytes of this entry.
    pub fn serialize(&self, b: &mut [u8]) {
        b[0..4].copy_from_slice(&self.platform);
        b[4..8].copy_from_slice(&self.data_space.to_be_bytes());
        b[8..12].copy_from_slice(&self.data_length.to_be_bytes());
        b[12..16].copy_from_slice(&self.reserved.to_be_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
    }

    /// What the entry holds.
    pub fn kind(&self) -> LocatorKind {
        match &self.platform {
            b"W2ru" => LocatorKind::WindowsRelative,
            b"W2ku" => LocatorKind::WindowsAbsolute,
            b"MacX" => LocatorKind::MacUrl,
            [0, 0, 0, 0] => LocatorKind::None,
            _ => LocatorKind::Unreadable,
        }
    }

    /// The header field name for messages and `--untrusted` refusals.
    pub fn field(&self) -> &'static str {
        match self.kind() {
            LocatorKind::WindowsRelative => "parent locator W2ru",
            LocatorKind::WindowsAbsolute => "parent locator W2ku",
            LocatorKind::MacUrl => "parent locator MacX",
            LocatorKind::Unreadable | LocatorKind::None => "parent locator",
        }
    }

    /// Decodes the locator's `data` into a path: UTF-16LE for the Windows kinds (up to a
    /// NUL), a `file://` URL for `MacX` (scheme and host `localhost` dropped,
    /// `%XX` escapes decoded). `None` when it is not text or the kind is unreadable.
    pub fn decode_path(&self, data: &[u8]) -> Option<String> {
        let s = match self.kind() {
            LocatorKind::WindowsRelative | LocatorKind::WindowsAbsolute => {
                utf16(data, u16::from_le_bytes)?
            }
            LocatorKind::MacUrl => {
                let end = data.iter().position(|&c| c == 0).unwrap_or(data.len());
                let text = std::str::from_utf8(&data[..end]).ok()?;
                let rest = text.strip_prefix("file://").unwrap_or(text);
                let rest = rest.strip_prefix("localhost").unwrap_or(rest);
                percent_decode(rest)?
            }
            LocatorKind::Unreadable | LocatorKind::None => return None,
        };
        (!s.is_empty()).then_some(s)
    }
}

/// Decodes UTF-16 code units (2-byte chunks read with `unit`) up to the first NUL.
fn utf16(data: &[u8], unit: fn([u8; 2]) -> u16) -> Option<String> {
    let units: Vec<u16> = data
        .chunks_exact(2)
        .map(|c| unit([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16(&units).ok()
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The dynamic disk header (1024 bytes, at the footer's `data_offset`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicHeader {
    /// `cxsparse`.
    pub cookie: [u8; 8],
    /// Unused: all ones.
    pub data_offset: u64,
    /// File offset of the BAT.
    pub table_offset: u64,
    /// Header version, 0x00010000.
    pub version: u32,
    /// Entries in the BAT.
    pub max_table_entries: u32,
    /// Bytes of guest data per block (2 MiB by default; a power of two).
    pub block_size: u32,
    /// Checksum as stored.
    pub checksum: u32,
    /// Differencing disks: the parent's footer UUID.
    pub parent_uuid: Uuid,
    /// Differencing disks: the parent's modification time (VHD epoch).
    pub parent_timestamp: u32,
    /// Reserved.
    pub reserved: u32,
    /// Differencing disks: the parent's file name, UTF-16BE (256 units).
    pub parent_name: [u8; 512],
    /// The parent locator entries.
    pub locators: [ParentLocator; 8],
}

impl DynamicHeader {
    /// Parses 1024 bytes (see [`DynamicHeader::validate`] for the checks).
    pub fn parse(b: &[u8; DYNAMIC_HEADER_SIZE]) -> DynamicHeader {
        let mut locators = [ParentLocator::default(); 8];
        for (i, l) in locators.iter_mut().enumerate() {
            *l = ParentLocator::parse(&b[576 + 24 * i..600 + 24 * i]);
        }
        DynamicHeader {
            cookie: b[0..8].try_into().expect("8 bytes"),
            data_offset: be64(b, 8),
            table_offset: be64(b, 16),
            version: be32(b, 24),
            max_table_entries: be32(b, 28),
            block_size: be32(b, 32),
            checksum: be32(b, HEADER_CHECKSUM_AT),
            parent_uuid: Uuid(b[40..56].try_into().expect("16 bytes")),
            parent_timestamp: be32(b, 56),
            reserved: be32(b, 60),
            parent_name: b[64..576].try_into().expect("512 bytes"),
            locators,
        }
    }

    /// The 1024 bytes of this header (reserved bytes zero, checksum as stored).
    pub fn serialize(&self) -> [u8; DYNAMIC_HEADER_SIZE] {
        let mut b = [0u8; DYNAMIC_HEADER_SIZE];
        b[0..8].copy_from_slice(&self.cookie);
        b[8..16].copy_from_slice(&self.data_offset.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.version.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        b[36..40].copy_from_slice(&self.checksum.to_be_bytes());
        b[40..56].copy_from_slice(&self.parent_uuid.0);
        b[56..60].copy_from_slice(&self.parent_timestamp.to_be_bytes());
        b[60..64].copy_from_slice(&self.reserved.to_be_bytes());
        b[64..576].copy_from_slice(&self.parent_name);
        for (i, l) in self.locators.iter().enumerate() {
            l.serialize(&mut b[576 + 24 * i..600 + 24 * i]);
        }
        b
    }

    /// Sets the checksum to the one these fields need, and returns the bytes.
    pub fn seal(&mut self) -> [u8; DYNAMIC_HEADER_SIZE] {
        self.checksum = 0;
        self.checksum = DynamicHeader::computed_checksum(&self.serialize());
        self.serialize()
    }

    /// The checksum of header bytes `b`.
    pub fn computed_checksum(b: &[u8]) -> u32 {
        checksum(b, HEADER_CHECKSUM_AT)
    }

    /// Parses header bytes `raw` found at `offset`, checking the cookie, the checksum and
    /// the block size (a power of two of at least one sector, as qemu requires).
    pub fn validate(raw: &[u8; DYNAMIC_HEADER_SIZE], offset: u64) -> Result<DynamicHeader> {
        let h = DynamicHeader::parse(raw);
        if &h.cookie != DYNAMIC_COOKIE {
            return Err(Error::corrupt(
                FORMAT,
                "dynamic disk header",
                offset,
                format!("cookie {:?} is not \"cxsparse\"", printable(&h.cookie)),
            ));
        }
        let want = DynamicHeader::computed_checksum(raw);
        if h.checksum != want {
            return Err(Error::corrupt(
                FORMAT,
                "dynamic disk header",
                offset,
                format!(
                    "checksum {:#010x} is wrong (the header's bytes give {want:#010x})",
                    h.checksum
                ),
            ));
        }
        if !h.block_size.is_power_of_two() || (h.block_size as u64) < SECTOR {
            return Err(Error::corrupt(
                FORMAT,
                "dynamic disk header",
                offset + 32,
                format!(
                    "block size {} is not a power of two of at least 512",
                    h.block_size
                ),
            ));
        }
        Ok(h)
    }

    /// Bytes of the sector bitmap before each block's data: one bit per sector, rounded
    /// up to whole sectors.
    pub fn bitmap_size(&self) -> u64 {
        bitmap_size(self.block_size as u64)
    }

    /// The parent's file name (UTF-16BE up to a NUL), if any.
    pub fn parent_name(&self) -> Option<String> {
        utf16(&self.parent_name, u16::from_be_bytes).filter(|s| !s.is_empty())
    }
}

/// Bytes of the sector bitmap of a block of `block_size` bytes.
pub fn bitmap_size(block_size: u64) -> u64 {
    (block_size / SECTOR).div_ceil(8).next_multiple_of(SECTOR)
}

/// Decodes BAT bytes (4 per entry, big-endian): the sector offset of each block's
/// bitmap, or [`BAT_UNUSED`].
pub fn parse_bat(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_be_bytes(c.try_into().expect("4 bytes")))
        .collect()
}

/// Encodes BAT entries, padded with unused entries to whole sectors.
pub fn serialize_bat(bat: &[u32]) -> Vec<u8> {
    let len = (bat.len() as u64 * 4).next_multiple_of(SECTOR) as usize;
    let mut b = vec![0xFF; len];
    for (c, e) in b.chunks_exact_mut(4).zip(bat) {
        c.copy_from_slice(&e.to_be_bytes());
    }
    b
}

/// True when sector `n` of a block is marked present in its `bitmap` (most significant
/// bit first, as the specification and Windows store it).
pub fn bitmap_bit(bitmap: &[u8], n: u64) -> bool {
    bitmap
        .get((n / 8) as usize)
        .is_some_and(|b| b & (0x80 >> (n % 8)) != 0)
}

/// From sector `n` of a block, how many sectors (at most `limit`) share its bit in
/// `bitmap`, and that bit.
pub fn bitmap_run(bitmap: &[u8], n: u64, limit: u64) -> (bool, u64) {
    let bit = bitmap_bit(bitmap, n);
    let mut k = 1;
    while k < limit {
        let i = n + k;
        // Whole bytes at once where possible.
        if i % 8 == 0 && k + 8 <= limit {
            let byte = bitmap.get((i / 8) as usize).copied().unwrap_or(0);
            if byte == if bit { 0xFF } else { 0 } {
                k += 8;
                continue;
            }
        }
        if bitmap_bit(bitmap, i) != bit {
            break;
        }
        k += 1;
    }
    (bit, k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_and_sizes_match_qemu() {
        // (requested, qemu-img's virtual size without and with force_size), measured.
        for (req, chs, forced) in [
            (512u64, 34816u64, 512u64),
            (1000, 34816, 1024),
            (1 << 20, 1079296, 1 << 20),
            (100 << 20, 104865792, 100 << 20),
            (31 << 30, 33286127616, 33285996544),
            (33 << 30, 35435028480, 35433480192),
            (127 << 30, 136365219840, 136365211648),
            (128 << 30, 137438953472, 137438953472),
            (2040 << 30, 2190433320960, 2190433320960),
        ] {
            assert_eq!(new_size(req, false).unwrap().size, chs, "{req}");
            let f = new_size(req, true).unwrap();
            assert_eq!((f.size, f.geometry), (forced, Geometry::MAX), "{req}");
        }
        assert!(new_size(2041 << 30, true).is_err());
        assert!(new_size(3000 << 30, false).is_err());
        assert!(new_size(u64::MAX, false).is_err());
        assert_eq!(new_size(0, false).unwrap().size, 0);
    }

    #[test]
    fn footer_round_trips_and_checksums() {
        let mut f = Footer {
            cookie: *FOOTER_COOKIE,
            features: 2,
            version: VERSION_1_0,
            data_offset: 512,
            timestamp: 1,
            creator_app: *b"qemu",
            creator_version: 0x0005_0003,
            creator_os: *b"Wi2k",
            original_size: 34816,
            current_size: 34816,
            geometry: Geometry {
                cylinders: 1,
                heads: 4,
                sectors: 17,
            },
            disk_type: 3,
            checksum: 0,
            uuid: Uuid::random(),
            saved_state: 0,
        };
        let b = f.seal();
        assert_eq!(Footer::validate(&b, 0).unwrap(), f);
        assert_eq!(Footer::validate(&b[..511], 0).unwrap(), f);
        let mut bad = b;
        bad[100] = 1;
        assert!(matches!(
            Footer::validate(&bad, 7),
            Err(Error::Corrupt { offset: 7, .. })
        ));
        assert_eq!(f.virtual_size(), 34816);
        f.creator_app = *b"win ";
        f.current_size = 40000;
        assert_eq!(f.virtual_size(), 39936);
        f.creator_app = *b"vpc ";
        assert_eq!(f.virtual_size(), 34816);
        f.creator_app = *b"*img";
        assert_eq!(f.virtual_size(), 39936);
    }

    #[test]
    fn bitmaps_and_locators() {
        let bm = [0xF0u8, 0xFF, 0x00, 0x01];
        assert_eq!(bitmap_run(&bm, 0, 32), (true, 4));
        assert_eq!(bitmap_run(&bm, 4, 32), (false, 4));
        assert_eq!(bitmap_run(&bm, 8, 32), (true, 8));
        assert_eq!(bitmap_run(&bm, 16, 32), (false, 15));
        assert_eq!(bitmap_run(&bm, 31, 32), (true, 1));
        assert_eq!(bitmap_run(&bm, 0, 2), (true, 2));
        assert_eq!(bitmap_size(2 << 20), 512);
        assert_eq!(bitmap_size(512), 512);
        assert_eq!(bitmap_size(1 << 31), 512 * 1024);
        let l = ParentLocator {
            platform: *b"W2ru",
            ..Default::default()
        };
        let data: Vec<u8> = ".\\p.vhd\0"
            .encode_utf16()
            .flat_map(|u| u.to_le_bytes())
            .collect();
        assert_eq!(l.decode_path(&data).as_deref(), Some(".\\p.vhd"));
        let m = ParentLocator {
            platform: *b"MacX",
            ..Default::default()
        };
        assert_eq!(
            m.decode_path(b"file://localhost/a%20b.vhd").as_deref(),
            Some("/a b.vhd")
        );
        assert_eq!(m.decode_path(b"file://./c.vhd").as_deref(), Some("./c.vhd"));
        assert_eq!(m.decode_path(b"bad%zz"), None);
    }
}
