//! VHDX on-disk structures of the log (MS-VHDX 2.3.1): the entry header, zero and data
//! descriptors and data sectors, as plain structs with `parse` and `serialize`.
//!
//! A log entry is a run of 4 KiB sectors: descriptor sectors (the first one starts with
//! the 64-byte entry header and holds up to 126 descriptors, later ones 128), then one
//! data sector per data descriptor. Finding and replaying the active sequence is in
//! [`super::replay`].

use super::header::{u32_at, u64_at, Guid};

/// Every log sector is 4 KiB.
pub const LOG_SECTOR: usize = 4096;
/// Bytes of the entry header at the start of an entry.
pub const ENTRY_HEADER_SIZE: usize = 64;
/// Bytes of one descriptor.
pub const DESCRIPTOR_SIZE: usize = 32;
/// Bytes of payload a data sector carries (the other 12 are in its descriptor).
pub const DATA_SECTOR_PAYLOAD: usize = 4084;

/// Descriptor sectors needed for `count` descriptors (at least one, for the header).
pub fn descriptor_sectors(count: u64) -> u64 {
    // The header takes the room of two descriptors in the first sector.
    (count + 2).div_ceil((LOG_SECTOR / DESCRIPTOR_SIZE) as u64)
}

/// The header of a log entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogEntryHeader {
    /// CRC-32C over the whole entry with this field as zero.
    pub checksum: u32,
    /// Bytes of the entry, a multiple of 4 KiB.
    pub entry_length: u32,
    /// Offset in the log of the first entry of the sequence this one ends.
    pub tail: u32,
    /// Non-zero; one more than the previous entry's in a sequence.
    pub sequence_number: u64,
    /// Descriptors in this entry.
    pub descriptor_count: u32,
    /// Bits that must be 0.
    pub reserved: u32,
    /// Must equal the current header's log GUID.
    pub log_guid: Guid,
    /// The file was at least this long when the entry was written.
    pub flushed_file_offset: u64,
    /// Every structure fits below this offset.
    pub last_file_offset: u64,
}

impl LogEntryHeader {
    /// "loge".
    pub const SIGNATURE: [u8; 4] = *b"loge";

    /// Parses the first 64 bytes of `b`; `None` without the "loge" signature.
    pub fn parse(b: &[u8]) -> Option<LogEntryHeader> {
        if b.len() < ENTRY_HEADER_SIZE || b[..4] != Self::SIGNATURE {
            return None;
        }
        Some(LogEntryHeader {
            checksum: u32_at(b, 4),
            entry_length: u32_at(b, 8),
            tail: u32_at(b, 12),
            sequence_number: u64_at(b, 16),
            descriptor_count: u32_at(b, 24),
            reserved: u32_at(b, 28),
            log_guid: Guid::parse(&b[32..]),
            flushed_file_offset: u64_at(b, 48),
            last_file_offset: u64_at(b, 56),
        })
    }

    /// Writes the 64 bytes into `b` (the checksum field as it is in `self`).
    pub fn serialize(&self, b: &mut [u8]) {
        b[..4].copy_from_slice(&Self::SIGNATURE);
        b[4..8].copy_from_slice(&self.checksum.to_le_bytes());
        b[8..12].copy_from_slice(&self.entry_length.to_le_bytes());
        b[12..16].copy_from_slice(&self.tail.to_le_bytes());
        b[16..24].copy_from_slice(&self.sequence_number.to_le_bytes());
        b[24..28].copy_from_slice(&self.descriptor_count.to_le_bytes());
        b[28..32].copy_from_slice(&self.reserved.to_le_bytes());
        b[32..48].copy_from_slice(&self.log_guid.0);
        b[48..56].copy_from_slice(&self.flushed_file_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.last_file_offset.to_le_bytes());
    }
}

/// A log descriptor: what one entry writes where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogDescriptor {
    /// Writes `length` zero bytes at `file_offset`.
    Zero {
        /// Bytes to zero, a multiple of 4 KiB.
        length: u64,
        /// Where, a multiple of 4 KiB.
        file_offset: u64,
        /// The entry's sequence number.
        sequence_number: u64,
    },
    /// Writes the next data sector (with these first 8 and last 4 bytes restored) at
    /// `file_offset`.
    Data {
        /// Bytes 4092..4096 of the sector.
        trailing: [u8; 4],
        /// Bytes 0..8 of the sector.
        leading: [u8; 8],
        /// Where, a multiple of 4 KiB.
        file_offset: u64,
        /// The entry's sequence number.
        sequence_number: u64,
    },
}

impl LogDescriptor {
    /// "zero".
    pub const ZERO_SIGNATURE: [u8; 4] = *b"zero";
    /// "desc".
    pub const DATA_SIGNATURE: [u8; 4] = *b"desc";

    /// Parses 32 bytes; `None` with neither signature.
    pub fn parse(b: &[u8]) -> Option<LogDescriptor> {
        let sig: [u8; 4] = b[..4].try_into().ok()?;
        let file_offset = u64_at(b, 16);
        let sequence_number = u64_at(b, 24);
        if sig == Self::ZERO_SIGNATURE {
            Some(LogDescriptor::Zero {
                length: u64_at(b, 8),
                file_offset,
                sequence_number,
            })
        } else if sig == Self::DATA_SIGNATURE {
            Some(LogDescriptor::Data {
                trailing: b[4..8].try_into().expect("4 bytes"),
                leading: b[8..16].try_into().expect("8 bytes"),
                file_offset,
                sequence_number,
            })
        } else {
            None
        }
    }

    /// Writes the 32 bytes into `b`.
    pub fn serialize(&self, b: &mut [u8]) {
        match *self {
            LogDescriptor::Zero {
                length,
                file_offset,
                sequence_number,
            } => {
                b[..4].copy_from_slice(&Self::ZERO_SIGNATURE);
                b[4..8].fill(0);
                b[8..16].copy_from_slice(&length.to_le_bytes());
                b[16..24].copy_from_slice(&file_offset.to_le_bytes());
                b[24..32].copy_from_slice(&sequence_number.to_le_bytes());
            }
            LogDescriptor::Data {
                trailing,
                leading,
                file_offset,
                sequence_number,
            } => {
                b[..4].copy_from_slice(&Self::DATA_SIGNATURE);
                b[4..8].copy_from_slice(&trailing);
                b[8..16].copy_from_slice(&leading);
                b[16..24].copy_from_slice(&file_offset.to_le_bytes());
                b[24..32].copy_from_slice(&sequence_number.to_le_bytes());
            }
        }
    }

    /// Where the descriptor writes.
    pub fn file_offset(&self) -> u64 {
        match *self {
            LogDescriptor::Zero { file_offset, .. } | LogDescriptor::Data { file_offset, .. } => {
                file_offset
            }
        }
    }

    /// The sequence number it carries.
    pub fn sequence_number(&self) -> u64 {
        match *self {
            LogDescriptor::Zero {
                sequence_number, ..
            }
            | LogDescriptor::Data {
                sequence_number, ..
            } => sequence_number,
        }
    }
}

/// A log data sector: "data", the sequence number split around 4084 bytes of payload.
pub struct LogDataSector;

impl LogDataSector {
    /// "data".
    pub const SIGNATURE: [u8; 4] = *b"data";

    /// The sequence number of the 4 KiB sector `b`, `None` without the signature.
    pub fn sequence_number(b: &[u8]) -> Option<u64> {
        if b.len() < LOG_SECTOR || b[..4] != Self::SIGNATURE {
            return None;
        }
        Some((u32_at(b, 4) as u64) << 32 | u32_at(b, 4092) as u64)
    }

    /// The 4 KiB sector written at its descriptor's offset: `leading`, the payload of the
    /// data sector `b`, `trailing`.
    pub fn restore(b: &[u8], leading: &[u8; 8], trailing: &[u8; 4]) -> Vec<u8> {
        let mut out = Vec::with_capacity(LOG_SECTOR);
        out.extend_from_slice(leading);
        out.extend_from_slice(&b[8..8 + DATA_SECTOR_PAYLOAD]);
        out.extend_from_slice(trailing);
        out
    }

    /// Splits the 4 KiB `sector` into its data sector for entry `seq` and the leading
    /// and trailing bytes its descriptor keeps.
    pub fn split(sector: &[u8], seq: u64) -> (Vec<u8>, [u8; 8], [u8; 4]) {
        let mut b = vec![0u8; LOG_SECTOR];
        b[..4].copy_from_slice(&Self::SIGNATURE);
        b[4..8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
        b[8..8 + DATA_SECTOR_PAYLOAD].copy_from_slice(&sector[8..8 + DATA_SECTOR_PAYLOAD]);
        b[4092..].copy_from_slice(&(seq as u32).to_le_bytes());
        (
            b,
            sector[..8].try_into().expect("8 bytes"),
            sector[4092..4096].try_into().expect("4 bytes"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_sector_counts() {
        assert_eq!(descriptor_sectors(0), 1);
        assert_eq!(descriptor_sectors(126), 1);
        assert_eq!(descriptor_sectors(127), 2);
        assert_eq!(descriptor_sectors(254), 2);
        assert_eq!(descriptor_sectors(255), 3);
    }

    #[test]
    fn structures_round_trip() {
        let h = LogEntryHeader {
            checksum: 9,
            entry_length: 8192,
            tail: 4096,
            sequence_number: 1 << 40 | 3,
            descriptor_count: 1,
            reserved: 0,
            log_guid: Guid::random(),
            flushed_file_offset: 4 << 20,
            last_file_offset: 5 << 20,
        };
        let mut b = [0u8; 64];
        h.serialize(&mut b);
        assert_eq!(LogEntryHeader::parse(&b), Some(h));
        for d in [
            LogDescriptor::Zero {
                length: 8192,
                file_offset: 4096,
                sequence_number: 5,
            },
            LogDescriptor::Data {
                trailing: [1, 2, 3, 4],
                leading: [5; 8],
                file_offset: 1 << 20,
                sequence_number: 5,
            },
        ] {
            let mut b = [0u8; 32];
            d.serialize(&mut b);
            assert_eq!(LogDescriptor::parse(&b), Some(d));
        }
        let sector: Vec<u8> = (0..4096).map(|i| (i % 251) as u8).collect();
        let (data, lead, trail) = LogDataSector::split(&sector, 1 << 33 | 7);
        assert_eq!(LogDataSector::sequence_number(&data), Some(1 << 33 | 7));
        assert_eq!(LogDataSector::restore(&data, &lead, &trail), sector);
    }
}
