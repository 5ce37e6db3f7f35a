//! On-disk structures of hosted sparse extents: the 512-byte `KDMV` header and the
//! stream markers. Plain structs with `parse` / `serialize`; no I/O here.

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::error::{Error, Result};
use crate::limits::MAX_DESCRIPTOR_BYTES;

/// Format name used in errors.
pub const FMT: &str = "vmdk";

/// Bytes per sector: every VMDK offset and size counts in these.
pub const SECTOR: u64 = 512;

/// `KDMV` as a little-endian u32.
pub const SPARSE_MAGIC: u32 = 0x564D_444B;

/// `COWD` (ESX 2.x/3.x vmfsSparse) as a little-endian u32.
pub const COWD_MAGIC: u32 = 0x4457_4F43;

/// seSparse constant-header magic (first u64).
pub const SESPARSE_MAGIC: u64 = 0xCAFE_BABE;

/// `gdOffset` value meaning "the grain directory is found through the footer".
pub const GD_AT_END: u64 = u64::MAX;

/// Header flag: the newline-detection bytes are valid.
pub const FLAG_NL_TEST: u32 = 1 << 0;
/// Header flag: a redundant grain directory is kept.
pub const FLAG_RGD: u32 = 1 << 1;
/// Header flag: grain-table entry 1 means "zeroed grain".
pub const FLAG_ZEROED_GRAIN: u32 = 1 << 2;
/// Header flag: grains are compressed.
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// Header flag: grains and metadata are preceded by markers (streamOptimized).
pub const FLAG_MARKERS: u32 = 1 << 17;

/// Flags this reader understands; others are refused at open.
pub const KNOWN_FLAGS: u32 =
    FLAG_NL_TEST | FLAG_RGD | FLAG_ZEROED_GRAIN | FLAG_COMPRESSED | FLAG_MARKERS;

/// `compressAlgorithm` value for deflate (zlib streams).
pub const COMPRESSION_DEFLATE: u16 = 1;

/// Marker type: end of stream.
pub const MARKER_EOS: u32 = 0;
/// Marker type: a grain table follows.
pub const MARKER_GT: u32 = 1;
/// Marker type: the grain directory follows.
pub const MARKER_GD: u32 = 2;
/// Marker type: the footer (a copy of the header) follows.
pub const MARKER_FOOTER: u32 = 3;

/// The 512-byte header at sector 0 of a hosted sparse extent (and the stream footer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseHeader {
    /// 1, 2 (zeroed grains) or 3 (streamOptimized).
    pub version: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Extent size in sectors.
    pub capacity: u64,
    /// Grain size in sectors.
    pub grain_size: u64,
    /// Embedded descriptor start (sectors), 0 when none.
    pub descriptor_offset: u64,
    /// Embedded descriptor length (sectors).
    pub descriptor_size: u64,
    /// Entries per grain table (512).
    pub num_gtes_per_gt: u32,
    /// Redundant grain directory (sectors), 0 when none.
    pub rgd_offset: u64,
    /// Grain directory (sectors) or [`GD_AT_END`].
    pub gd_offset: u64,
    /// Sectors before the first grain.
    pub overhead: u64,
    /// Set while the extent is open for writing.
    pub unclean_shutdown: bool,
    /// The four newline-detection bytes as found.
    pub newline_bytes: [u8; 4],
    /// 0 none, 1 deflate.
    pub compress_algorithm: u16,
}

/// The newline-detection bytes every writer stores: `\n`, ` `, `\r`, `\n`.
pub const NEWLINE_BYTES: [u8; 4] = [b'\n', b' ', b'\r', b'\n'];

impl SparseHeader {
    /// Parses a header from 512 bytes found at `offset` of its file (for errors).
    pub fn parse(b: &[u8; 512], offset: u64) -> Result<Self> {
        let magic = LE::read_u32(&b[0..4]);
        if magic != SPARSE_MAGIC {
            return Err(Error::corrupt(
                FMT,
                "sparse extent header",
                offset,
                format!("bad magic {magic:#010x} (expected KDMV)"),
            ));
        }
        Ok(SparseHeader {
            version: LE::read_u32(&b[4..8]),
            flags: LE::read_u32(&b[8..12]),
            capacity: LE::read_u64(&b[12..20]),
            grain_size: LE::read_u64(&b[20..28]),
            descriptor_offset: LE::read_u64(&b[28..36]),
            descriptor_size: LE::read_u64(&b[36..44]),
            num_gtes_per_gt: LE::read_u32(&b[44..48]),
            rgd_offset: LE::read_u64(&b[48..56]),
            gd_offset: LE::read_u64(&b[56..64]),
            overhead: LE::read_u64(&b[64..72]),
            unclean_shutdown: b[72] != 0,
            newline_bytes: [b[73], b[74], b[75], b[76]],
            compress_algorithm: LE::read_u16(&b[77..79]),
        })
    }

    /// The 512-byte on-disk form.
    pub fn serialize(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        LE::write_u32(&mut b[0..4], SPARSE_MAGIC);
        LE::write_u32(&mut b[4..8], self.version);
        LE::write_u32(&mut b[8..12], self.flags);
        LE::write_u64(&mut b[12..20], self.capacity);
        LE::write_u64(&mut b[20..28], self.grain_size);
        LE::write_u64(&mut b[28..36], self.descriptor_offset);
        LE::write_u64(&mut b[36..44], self.descriptor_size);
        LE::write_u32(&mut b[44..48], self.num_gtes_per_gt);
        LE::write_u64(&mut b[48..56], self.rgd_offset);
        LE::write_u64(&mut b[56..64], self.gd_offset);
        LE::write_u64(&mut b[64..72], self.overhead);
        b[72] = self.unclean_shutdown as u8;
        b[73..77].copy_from_slice(&self.newline_bytes);
        LE::write_u16(&mut b[77..79], self.compress_algorithm);
        b
    }

    /// True when grains are compressed.
    pub fn compressed(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0
    }

    /// True when grains carry markers.
    pub fn has_markers(&self) -> bool {
        self.flags & FLAG_MARKERS != 0
    }

    /// True when GT entry 1 means "zeroed grain".
    pub fn zeroed_grain(&self) -> bool {
        self.flags & FLAG_ZEROED_GRAIN != 0
    }

    /// Grain size in bytes.
    pub fn grain_bytes(&self) -> u64 {
        self.grain_size * SECTOR
    }

    /// Number of grains covering the capacity.
    pub fn grains(&self) -> u64 {
        self.capacity.div_ceil(self.grain_size.max(1))
    }

    /// Number of grain-directory entries (grain tables).
    pub fn gd_entries(&self) -> u64 {
        self.grains().div_ceil(self.num_gtes_per_gt.max(1) as u64)
    }

    /// Where the embedded descriptor is and how long, in bytes: `None` when there is
    /// none; an error when it is longer than [`MAX_DESCRIPTOR_BYTES`].
    pub fn embedded_descriptor(&self) -> Result<Option<(u64, u64)>> {
        if self.descriptor_offset == 0 || self.descriptor_size == 0 {
            return Ok(None);
        }
        let bytes = self.descriptor_size.saturating_mul(SECTOR);
        if bytes > MAX_DESCRIPTOR_BYTES {
            return Err(Error::TooLarge {
                format: FMT,
                structure: "embedded descriptor",
                size: bytes,
                limit: MAX_DESCRIPTOR_BYTES,
            });
        }
        Ok(Some((self.descriptor_offset.saturating_mul(SECTOR), bytes)))
    }

    /// Checks the fields that do not depend on the file: version, flags, sizes.
    pub fn validate(&self, offset: u64) -> Result<()> {
        let bad = |reason: String| Err(Error::corrupt(FMT, "sparse extent header", offset, reason));
        if self.version == 0 || self.version > 3 {
            return Err(Error::unsupported(
                FMT,
                format!("sparse extent version {}", self.version),
            ));
        }
        if self.flags & !KNOWN_FLAGS != 0 {
            return Err(Error::unsupported(
                FMT,
                format!("sparse extent flags {:#x}", self.flags & !KNOWN_FLAGS),
            ));
        }
        if self.compressed() && self.compress_algorithm != COMPRESSION_DEFLATE {
            return Err(Error::unsupported(
                FMT,
                format!("compression algorithm {}", self.compress_algorithm),
            ));
        }
        if self.grain_size == 0 || !self.grain_size.is_power_of_two() || self.grain_size > 2048 {
            return bad(format!(
                "grain size {} sectors (must be a power of two up to 1 MiB)",
                self.grain_size
            ));
        }
        if self.num_gtes_per_gt == 0 || self.num_gtes_per_gt > 512 {
            return bad(format!(
                "{} entries per grain table (at most 512)",
                self.num_gtes_per_gt
            ));
        }
        if self.capacity > crate::limits::MAX_VIRTUAL_SIZE / SECTOR {
            return bad(format!("capacity {} sectors is too large", self.capacity));
        }
        if self.gd_entries() > crate::limits::MAX_VMDK_GD_ENTRIES {
            return Err(Error::TooLarge {
                format: FMT,
                structure: "grain directory",
                size: self.gd_entries() * 4,
                limit: crate::limits::MAX_VMDK_GD_ENTRIES * 4,
            });
        }
        Ok(())
    }
}

/// Grain-table entries per table in a COWD extent.
pub const COWD_GTES_PER_GT: u32 = 4096;

/// The header of a legacy ESX `COWD` (vmfsSparse) extent: magic, then ten u32 fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CowdHeader {
    /// Format version (1).
    pub version: u32,
    /// Flags.
    pub flags: u32,
    /// Extent size in sectors.
    pub disk_sectors: u32,
    /// Grain size in sectors.
    pub granularity: u32,
    /// Grain directory offset in sectors.
    pub l1dir_offset: u32,
    /// Grain directory entries.
    pub l1dir_size: u32,
    /// File size in sectors.
    pub file_sectors: u32,
    /// Geometry: cylinders.
    pub cylinders: u32,
    /// Geometry: heads.
    pub heads: u32,
    /// Geometry: sectors per track.
    pub sectors_per_track: u32,
}

impl CowdHeader {
    /// Parses the first 44 bytes of a COWD extent.
    pub fn parse(b: &[u8; 44]) -> Result<Self> {
        if LE::read_u32(&b[0..4]) != COWD_MAGIC {
            return Err(Error::corrupt(FMT, "COWD header", 0, "bad magic"));
        }
        let f = |i: usize| LE::read_u32(&b[4 + i * 4..8 + i * 4]);
        Ok(CowdHeader {
            version: f(0),
            flags: f(1),
            disk_sectors: f(2),
            granularity: f(3),
            l1dir_offset: f(4),
            l1dir_size: f(5),
            file_sectors: f(6),
            cylinders: f(7),
            heads: f(8),
            sectors_per_track: f(9),
        })
    }

    /// The 44-byte on-disk form.
    pub fn serialize(&self) -> [u8; 44] {
        let mut b = [0u8; 44];
        LE::write_u32(&mut b[0..4], COWD_MAGIC);
        let v = [
            self.version,
            self.flags,
            self.disk_sectors,
            self.granularity,
            self.l1dir_offset,
            self.l1dir_size,
            self.file_sectors,
            self.cylinders,
            self.heads,
            self.sectors_per_track,
        ];
        for (i, x) in v.iter().enumerate() {
            LE::write_u32(&mut b[4 + i * 4..8 + i * 4], *x);
        }
        b
    }
}

/// A stream marker: the first 12 (grain) or 16 (metadata) bytes of a sector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    /// A compressed grain for sector `lba`, `size` compressed bytes following the
    /// 12-byte marker.
    Grain {
        /// First guest sector of the grain.
        lba: u64,
        /// Compressed byte count.
        size: u32,
    },
    /// A metadata marker: `sectors` sectors of type `kind` follow this sector.
    Meta {
        /// Sectors that follow.
        sectors: u64,
        /// `MARKER_*` type.
        kind: u32,
    },
}

impl Marker {
    /// Parses the marker at the start of a sector (at least 16 bytes).
    pub fn parse(b: &[u8]) -> Marker {
        let val = LE::read_u64(&b[0..8]);
        let size = LE::read_u32(&b[8..12]);
        if size != 0 {
            Marker::Grain { lba: val, size }
        } else {
            Marker::Meta {
                sectors: val,
                kind: LE::read_u32(&b[12..16]),
            }
        }
    }

    /// Writes the marker into the first bytes of `b` (12 for grains, 16 otherwise).
    pub fn serialize_into(&self, b: &mut [u8]) {
        match *self {
            Marker::Grain { lba, size } => {
                LE::write_u64(&mut b[0..8], lba);
                LE::write_u32(&mut b[8..12], size);
            }
            Marker::Meta { sectors, kind } => {
                LE::write_u64(&mut b[0..8], sectors);
                LE::write_u32(&mut b[8..12], 0);
                LE::write_u32(&mut b[12..16], kind);
            }
        }
    }

    /// A whole metadata-marker sector.
    pub fn meta_sector(sectors: u64, kind: u32) -> [u8; 512] {
        let mut b = [0u8; 512];
        Marker::Meta { sectors, kind }.serialize_into(&mut b);
        b
    }
}

/// Parses a table of little-endian u32 entries (GD or GT).
pub fn parse_u32_table(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4).map(LE::read_u32).collect()
}

/// Serializes a table of u32 entries.
pub fn serialize_u32_table(t: &[u32]) -> Vec<u8> {
    let mut b = vec![0u8; t.len() * 4];
    LE::write_u32_into(t, &mut b);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = SparseHeader {
            version: 3,
            flags: FLAG_NL_TEST | FLAG_COMPRESSED | FLAG_MARKERS,
            capacity: 2048,
            grain_size: 128,
            descriptor_offset: 1,
            descriptor_size: 20,
            num_gtes_per_gt: 512,
            rgd_offset: 0,
            gd_offset: GD_AT_END,
            overhead: 128,
            unclean_shutdown: false,
            newline_bytes: NEWLINE_BYTES,
            compress_algorithm: 1,
        };
        let b = h.serialize();
        assert_eq!(&b[0..4], b"KDMV");
        assert_eq!(SparseHeader::parse(&b, 0).unwrap(), h);
        h.validate(0).unwrap();
        assert_eq!(h.grains(), 16);
        assert_eq!(h.gd_entries(), 1);
    }

    #[test]
    fn markers_round_trip() {
        let mut b = [0u8; 16];
        Marker::Grain { lba: 128, size: 77 }.serialize_into(&mut b);
        assert_eq!(Marker::parse(&b), Marker::Grain { lba: 128, size: 77 });
        let s = Marker::meta_sector(4, MARKER_GT);
        assert_eq!(
            Marker::parse(&s),
            Marker::Meta {
                sectors: 4,
                kind: MARKER_GT
            }
        );
    }
}
