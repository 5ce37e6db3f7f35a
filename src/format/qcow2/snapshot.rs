//! qcow2 internal snapshot table entries (on-disk structure) and the walk that reads the
//! table with every length bounded by the file.

use crate::error::{Error, Result};
use crate::image::SnapshotInfo;
use crate::io::{read_struct, Storage};

const FMT: &str = "qcow2";

/// Fixed part of a snapshot table entry, before extra data, id and name.
pub const SNAPSHOT_FIXED_LEN: usize = 40;

/// Largest extra-data area QEMU accepts per snapshot.
pub const MAX_SNAPSHOT_EXTRA_DATA: u32 = 1024;

/// One entry of the snapshot table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// File offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in that L1 table.
    pub l1_size: u32,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock when taken, nanoseconds.
    pub vm_clock_nsec: u64,
    /// 32-bit VM state size (superseded by the 64-bit one in `extra`).
    pub vm_state_size32: u32,
    /// Extra data (64-bit VM state size, disk size, icount, then unknown fields).
    pub extra: Vec<u8>,
    /// Snapshot ID (no NUL).
    pub id: String,
    /// Snapshot name (no NUL).
    pub name: String,
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// The bytes up to the first NUL, as QEMU reads the ID and name (C strings).
fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

impl SnapshotEntry {
    /// Total on-disk length (padded to 8) of an entry whose fixed part is `fixed`.
    pub fn total_len(fixed: &[u8]) -> u64 {
        let id_len = u16::from_be_bytes([fixed[12], fixed[13]]) as u64;
        let name_len = u16::from_be_bytes([fixed[14], fixed[15]]) as u64;
        let extra = be32(fixed, 36) as u64;
        (SNAPSHOT_FIXED_LEN as u64 + extra + id_len + name_len).next_multiple_of(8)
    }

    /// Parses one whole entry (`buf` holds at least [`Self::total_len`] bytes).
    pub fn parse(buf: &[u8], offset: u64) -> Result<Self> {
        if buf.len() < SNAPSHOT_FIXED_LEN || (buf.len() as u64) < Self::total_len(buf) {
            return Err(Error::corrupt(
                FMT,
                "snapshot table entry",
                offset,
                "entry is truncated",
            ));
        }
        let id_len = u16::from_be_bytes([buf[12], buf[13]]) as usize;
        let name_len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
        let extra_len = be32(buf, 36) as usize;
        let extra_end = SNAPSHOT_FIXED_LEN + extra_len;
        let id_end = extra_end + id_len;
        Ok(SnapshotEntry {
            l1_table_offset: be64(buf, 0),
            l1_size: be32(buf, 8),
            date_sec: be32(buf, 16),
            date_nsec: be32(buf, 20),
            vm_clock_nsec: be64(buf, 24),
            vm_state_size32: be32(buf, 32),
            extra: buf[SNAPSHOT_FIXED_LEN..extra_end].to_vec(),
            id: c_string(&buf[extra_end..id_end]),
            name: c_string(&buf[id_end..id_end + name_len]),
        })
    }

    /// The entry's bytes, padded to a multiple of 8.
    pub fn serialize(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(
            SNAPSHOT_FIXED_LEN + self.extra.len() + self.id.len() + self.name.len() + 8,
        );
        v.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        v.extend_from_slice(&self.l1_size.to_be_bytes());
        v.extend_from_slice(&(self.id.len() as u16).to_be_bytes());
        v.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        v.extend_from_slice(&self.date_sec.to_be_bytes());
        v.extend_from_slice(&self.date_nsec.to_be_bytes());
        v.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        v.extend_from_slice(&self.vm_state_size32.to_be_bytes());
        v.extend_from_slice(&(self.extra.len() as u32).to_be_bytes());
        v.extend_from_slice(&self.extra);
        v.extend_from_slice(self.id.as_bytes());
        v.extend_from_slice(self.name.as_bytes());
        v.resize(v.len().next_multiple_of(8), 0);
        v
    }

    fn extra_u64(&self, at: usize) -> Option<u64> {
        self.extra.get(at..at + 8).map(|b| be64(b, 0))
    }

    /// VM state size: the 64-bit field of the extra data when present.
    pub fn vm_state_size(&self) -> u64 {
        self.extra_u64(0).unwrap_or(self.vm_state_size32 as u64)
    }

    /// Virtual disk size when the snapshot was taken, if recorded.
    pub fn disk_size(&self) -> Option<u64> {
        self.extra_u64(8)
    }

    /// Instruction count, if recorded (all ones means "not recorded").
    pub fn icount(&self) -> Option<u64> {
        self.extra_u64(16).filter(|&c| c != u64::MAX)
    }

    /// The raw instruction-count field of the extra data (all ones when absent, as
    /// QEMU writes it then).
    pub fn extra_icount(&self) -> u64 {
        self.extra_u64(16).unwrap_or(u64::MAX)
    }

    /// On-disk length without the padding that follows the last entry of a table.
    pub fn unpadded_len(&self) -> usize {
        SNAPSHOT_FIXED_LEN + self.extra.len() + self.id.len() + self.name.len()
    }

    /// The entry as `info` shows it.
    pub fn info(&self) -> SnapshotInfo {
        SnapshotInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            vm_state_size: self.vm_state_size(),
            date_sec: self.date_sec as u64,
            date_nsec: self.date_nsec as u64,
            vm_clock_sec: self.vm_clock_nsec / 1_000_000_000,
            vm_clock_nsec: self.vm_clock_nsec % 1_000_000_000,
            icount: self.icount(),
        }
    }
}

/// Largest snapshot table QEMU reads (its own limit, 1 KiB per possible snapshot).
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 1024 * crate::limits::MAX_QCOW2_SNAPSHOTS as u64;

/// A snapshot table as read from the image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotTable {
    /// The entries, in table order.
    pub entries: Vec<SnapshotEntry>,
    /// Bytes the table occupies as QEMU counts them: from its offset to the end of the
    /// last entry, whose padding is not included.
    pub size: u64,
}

/// Reads `count` snapshot entries from the table at `offset` of `storage`.
///
/// Tolerant exactly where QEMU is: each entry starts at the next multiple of 8, the last
/// entry needs no padding, and bytes past the end of the file read as zeros (QEMU's
/// reads there return zeros; `check` then reports such entries). Bounded as QEMU is:
/// at most 1024 bytes of extra data per entry and a table of at most
/// [`MAX_SNAPSHOT_TABLE_BYTES`], read in windows of 256 KiB.
pub fn read_snapshot_table(
    storage: &dyn Storage,
    offset: u64,
    count: u32,
) -> Result<SnapshotTable> {
    const WINDOW: u64 = 256 * 1024;
    let file_len = storage.len();
    let mut out = Vec::new();
    let mut win: Vec<u8> = Vec::new();
    let mut win_start = offset;
    let mut pos = offset;
    let mut size = 0u64;
    // Makes `win` cover [pos, pos + need), reading ahead up to WINDOW bytes; bytes past
    // the end of the file are zeros.
    let fill = |pos: u64, need: u64, win: &mut Vec<u8>, win_start: &mut u64| -> Result<()> {
        let have = *win_start + win.len() as u64;
        if pos >= *win_start && pos + need <= have {
            return Ok(());
        }
        let n = need.max(WINDOW);
        win.clear();
        win.resize(n as usize, 0);
        if pos < file_len {
            let avail = ((file_len - pos).min(n)) as usize;
            read_struct(storage, &mut win[..avail], pos, FMT, "snapshot table")?;
        }
        *win_start = pos;
        Ok(())
    };
    for _ in 0..count {
        pos = pos.next_multiple_of(8);
        // An entry is at most 40 + 1024 + 2 * 65535 bytes: this keeps every sum below exact.
        if pos > u64::MAX / 2 {
            return Err(Error::corrupt(
                FMT,
                "snapshot table",
                pos,
                "table offset is out of range",
            ));
        }
        fill(pos, SNAPSHOT_FIXED_LEN as u64, &mut win, &mut win_start)?;
        let rel = (pos - win_start) as usize;
        let fixed = &win[rel..rel + SNAPSHOT_FIXED_LEN];
        let extra = be32(fixed, 36);
        if extra > MAX_SNAPSHOT_EXTRA_DATA {
            return Err(Error::corrupt(
                FMT,
                "snapshot table entry",
                pos + 36,
                format!("extra data size {extra} above {MAX_SNAPSHOT_EXTRA_DATA}"),
            ));
        }
        let strings = u16::from_be_bytes([fixed[12], fixed[13]]) as u64
            + u16::from_be_bytes([fixed[14], fixed[15]]) as u64;
        let unpadded = SNAPSHOT_FIXED_LEN as u64 + extra as u64 + strings;
        let total = SnapshotEntry::total_len(fixed);
        fill(pos, total, &mut win, &mut win_start)?;
        let rel = (pos - win_start) as usize;
        let e = SnapshotEntry::parse(&win[rel..rel + total as usize], pos)?;
        pos += unpadded;
        size = pos - offset;
        if size > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(Error::TooLarge {
                format: FMT,
                structure: "snapshot table",
                size,
                limit: MAX_SNAPSHOT_TABLE_BYTES,
            });
        }
        out.push(e);
    }
    Ok(SnapshotTable { entries: out, size })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemStorage;

    fn entry(id: &str, name: &str) -> SnapshotEntry {
        let mut extra = Vec::new();
        extra.extend_from_slice(&0u64.to_be_bytes());
        extra.extend_from_slice(&(1u64 << 20).to_be_bytes());
        extra.extend_from_slice(&0u64.to_be_bytes());
        SnapshotEntry {
            l1_table_offset: 0x50000,
            l1_size: 1,
            date_sec: 1_700_000_000,
            date_nsec: 5,
            vm_clock_nsec: 3_500_000_000,
            vm_state_size32: 0,
            extra,
            id: id.into(),
            name: name.into(),
        }
    }

    #[test]
    fn roundtrip_and_info() {
        let e = entry("1", "snap1");
        let b = e.serialize();
        assert_eq!(b.len() % 8, 0);
        assert_eq!(SnapshotEntry::total_len(&b), b.len() as u64);
        assert_eq!(SnapshotEntry::parse(&b, 0).unwrap(), e);
        let i = e.info();
        assert_eq!((i.vm_clock_sec, i.vm_clock_nsec), (3, 500_000_000));
        assert_eq!(i.icount, Some(0));
        assert_eq!(e.disk_size(), Some(1 << 20));
    }

    #[test]
    fn table_walk_is_bounded() {
        let mut file = vec![0u8; 512];
        for n in 0..3 {
            file.extend_from_slice(&entry(&n.to_string(), "s").serialize());
        }
        let s = MemStorage::new(file.clone());
        let t = read_snapshot_table(&s, 512, 3).unwrap();
        assert_eq!(t.entries.len(), 3);
        assert_eq!(t.entries[2].id, "2");
        // Past the end of the file, entries read as zeros (as QEMU reads them).
        let t = read_snapshot_table(&s, 512, 4).unwrap();
        assert_eq!(t.entries[3].id, "");
        assert_eq!(t.size, file.len() as u64 - 512 + 40);
        // The last entry needs no padding: cut the file right after its name.
        let cut = file.len() - 6;
        let s = MemStorage::new(file[..cut].to_vec());
        let t = read_snapshot_table(&s, 512, 3).unwrap();
        assert_eq!(t.entries[2].name, "s");
        assert_eq!(t.size, cut as u64 - 512);
        // Too much extra data is refused.
        file[512 + 36..512 + 40].copy_from_slice(&2000u32.to_be_bytes());
        let s = MemStorage::new(file);
        assert!(read_snapshot_table(&s, 512, 1).is_err());
    }
}
