//! Replaying a VHDX log in memory, for reading: the source file is never written.
//!
//! When the current header's log GUID is non-zero, the log may hold updates that were
//! not yet written to their final place. [`replay`] finds the *active sequence* as
//! MS-VHDX 2.3.3 describes it — scanning the circular log for runs of valid entries
//! with consecutive sequence numbers, keeping the newest run whose head entry's `Tail`
//! points at one of its own entries — and builds a [`ReplayedStorage`]: the file as it
//! reads after the replay (data and zero descriptors applied in order, later ones over
//! earlier ones, the file extended to the head entry's `LastFileOffset`). Every other
//! structure of the image (region table, metadata, BAT, blocks) is then read through it.
//!
//! An entry is valid when its header is sane (signature, length, log GUID, non-zero
//! sequence number), every descriptor carries the entry's sequence number with a known
//! signature and 4 KiB-aligned offsets, each data sector matches its descriptor, there
//! are as many data sectors as data descriptors, and the CRC-32C over the whole entry
//! matches: torn and stale entries fall out here.
//!
//! Bounds: the log is read whole into memory only when it must be replayed and is at
//! most [`MAX_VHDX_LOG_BYTES`] long; the overlay holds at most one 4 KiB copy per data
//! descriptor plus one range per zero descriptor, so it is bounded by the log's size.
//! The scan is linear in the log's size: a structurally valid entry cannot contain
//! another entry's header sector, so the entries whose checksum is computed are
//! disjoint, and each position's verdict is computed once.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::Path;
use std::sync::Arc;

use super::header::{checksum, Guid, Header, FORMAT, MIB};
use super::log::{
    descriptor_sectors, LogDataSector, LogDescriptor, LogEntryHeader, ENTRY_HEADER_SIZE, LOG_SECTOR,
};
use crate::error::{Error, Result};
use crate::io::{read_struct, Storage};
use crate::limits::{MAX_VHDX_LOG_BYTES, MAX_VIRTUAL_SIZE};

/// What a replay found, for `info` and `check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Entries in the active sequence.
    pub entries: usize,
    /// Descriptors applied.
    pub descriptors: usize,
    /// Sequence number of the head entry.
    pub head_sequence: u64,
}

/// One valid log entry, as found by the scan.
#[derive(Debug, Clone)]
struct Entry {
    /// Offset of its first sector in the log.
    pos: u64,
    header: LogEntryHeader,
}

/// The log read into memory, with each position's verdict cached.
struct LogScan<'a> {
    log: &'a [u8],
    guid: Guid,
    verdicts: HashMap<u64, Option<Entry>>,
}

impl LogScan<'_> {
    fn len(&self) -> u64 {
        self.log.len() as u64
    }

    /// The 4 KiB log sector `i` sectors after position `pos`, wrapping around.
    fn sector(&self, pos: u64, i: u64) -> &[u8] {
        let o = ((pos + i * LOG_SECTOR as u64) % self.len()) as usize;
        &self.log[o..o + LOG_SECTOR]
    }

    /// The descriptor `i` of the entry at `pos`.
    fn descriptor(&self, pos: u64, i: u64) -> Option<LogDescriptor> {
        let at = ENTRY_HEADER_SIZE as u64 + i * 32;
        let s = self.sector(pos, at / LOG_SECTOR as u64);
        let o = (at % LOG_SECTOR as u64) as usize;
        LogDescriptor::parse(&s[o..o + 32])
    }

    /// The valid entry starting at `pos`, if there is one.
    fn entry_at(&mut self, pos: u64) -> Option<Entry> {
        if let Some(v) = self.verdicts.get(&pos) {
            return v.clone();
        }
        let v = self.validate(pos);
        self.verdicts.insert(pos, v.clone());
        v
    }

    fn validate(&self, pos: u64) -> Option<Entry> {
        let h = LogEntryHeader::parse(self.sector(pos, 0))?;
        let len = h.entry_length as u64;
        let sector = LOG_SECTOR as u64;
        if len == 0
            || len % sector != 0
            || len > self.len()
            || h.sequence_number == 0
            || h.log_guid != self.guid
            || h.tail as u64 % sector != 0
            || h.tail as u64 >= self.len()
        {
            return None;
        }
        let total = len / sector;
        let desc_sectors = descriptor_sectors(h.descriptor_count as u64);
        if desc_sectors > total {
            return None;
        }
        // Descriptors, then their data sectors, in file order: the first sector that
        // does not fit ends the verdict, so an invalid candidate costs no more than the
        // sectors up to the next entry header.
        let mut data = 0u64;
        for i in 0..h.descriptor_count as u64 {
            let d = self.descriptor(pos, i)?;
            if d.sequence_number() != h.sequence_number || d.file_offset() % sector != 0 {
                return None;
            }
            match d {
                LogDescriptor::Zero { length, .. } => {
                    if length % sector != 0 {
                        return None;
                    }
                }
                LogDescriptor::Data { .. } => {
                    if desc_sectors + data >= total {
                        return None;
                    }
                    let s = self.sector(pos, desc_sectors + data);
                    if LogDataSector::sequence_number(s) != Some(h.sequence_number) {
                        return None;
                    }
                    data += 1;
                }
            }
        }
        if desc_sectors + data != total {
            return None;
        }
        let crc = self.entry_checksum(pos, total);
        (crc == h.checksum).then_some(Entry { pos, header: h })
    }

    /// CRC-32C of the `total` sectors at `pos` with the header's checksum field as 0.
    fn entry_checksum(&self, pos: u64, total: u64) -> u32 {
        let first = self.sector(pos, 0);
        let mut crc = checksum(first, 4);
        for i in 1..total {
            crc = crc32c::crc32c_append(crc, self.sector(pos, i));
        }
        crc
    }

    /// The active sequence (MS-VHDX 2.3.3), oldest entry first; empty when the log holds
    /// no valid, complete sequence.
    fn active_sequence(&mut self) -> Vec<Entry> {
        let n = self.len();
        let sector = LOG_SECTOR as u64;
        let mut candidate: Vec<Entry> = Vec::new();
        let mut tail = 0u64;
        loop {
            // Extend a sequence from `tail` for as long as entries follow each other
            // with consecutive sequence numbers (never more than the whole log).
            let mut seq: Vec<Entry> = Vec::new();
            let mut head = tail;
            let mut span = 0u64;
            while let Some(e) = self.entry_at(head) {
                let follows = seq
                    .last()
                    .is_none_or(|l| e.header.sequence_number == l.header.sequence_number + 1);
                let len = e.header.entry_length as u64;
                if !follows || span + len > n {
                    break;
                }
                span += len;
                head = (head + len) % n;
                seq.push(e);
            }
            // Valid when the head entry's tail is one of the sequence's own entries; the
            // sequence to replay starts there.
            let valid_from = seq
                .last()
                .and_then(|h| seq.iter().position(|e| e.pos == h.header.tail as u64));
            if let Some(start) = valid_from {
                let newer = candidate.last().is_none_or(|c| {
                    seq.last().expect("non-empty").header.sequence_number > c.header.sequence_number
                });
                if newer {
                    candidate = seq.split_off(start);
                }
            }
            let next = if valid_from.is_none() {
                tail + sector
            } else {
                // A sequence that wrapped around the end ends the scan.
                if head <= tail {
                    break;
                }
                head
            };
            if next >= n {
                break;
            }
            tail = next;
        }
        candidate
    }
}

/// Replays the log of `storage` (described by the current `header`) in memory.
///
/// Returns `None` when there is nothing to replay: a zero log GUID, an empty log, or —
/// as QEMU treats it — a log holding no valid sequence.
pub fn replay(
    storage: &Arc<dyn Storage>,
    header: &Header,
) -> Result<Option<(ReplayedStorage, ReplaySummary)>> {
    if header.log_guid.is_nil() || header.log_length == 0 {
        return Ok(None);
    }
    let off = header.log_offset;
    let len = header.log_length as u64;
    let corrupt = |r: String| Error::corrupt(FORMAT, "log", off, r);
    if header.log_version != 0 {
        return Err(Error::unsupported(
            FORMAT,
            format!(
                "log version {} (a log that must be replayed)",
                header.log_version
            ),
        ));
    }
    if len % MIB != 0 {
        return Err(corrupt(format!("length {len} is not a multiple of 1 MiB")));
    }
    if len > MAX_VHDX_LOG_BYTES {
        return Err(Error::TooLarge {
            format: FORMAT,
            structure: "log to replay",
            size: len,
            limit: MAX_VHDX_LOG_BYTES,
        });
    }
    if off.checked_add(len).is_none_or(|e| e > storage.len()) {
        return Err(corrupt(format!(
            "the {len}-byte log runs past the end of the file ({:#x})",
            storage.len()
        )));
    }
    let mut log = vec![0u8; len as usize];
    read_struct(storage.as_ref(), &mut log, off, FORMAT, "log")?;
    let mut scan = LogScan {
        log: &log,
        guid: header.log_guid,
        verdicts: HashMap::new(),
    };
    let active = scan.active_sequence();
    let Some(head) = active.last() else {
        return Ok(None);
    };
    let file_len = storage.len();
    if head.header.flushed_file_offset > file_len {
        return Err(Error::corrupt(
            FORMAT,
            "log entry",
            off + head.pos,
            format!(
                "the log was written when the file was at least {} bytes long, but it is {file_len}: the file was truncated",
                head.header.flushed_file_offset
            ),
        ));
    }
    let mut overlay = ReplayedStorage {
        inner: storage.clone(),
        pieces: BTreeMap::new(),
        len: file_len,
    };
    let mut descriptors = 0usize;
    for e in &active {
        let h = &e.header;
        let first_data = descriptor_sectors(h.descriptor_count as u64);
        let mut data = 0u64;
        for i in 0..h.descriptor_count as u64 {
            let d = scan.descriptor(e.pos, i).expect("validated descriptor");
            let at = d.file_offset();
            let (piece_len, content) = match d {
                LogDescriptor::Zero { length, .. } => (length, Content::Zero),
                LogDescriptor::Data {
                    leading, trailing, ..
                } => {
                    let s = scan.sector(e.pos, first_data + data);
                    data += 1;
                    (
                        LOG_SECTOR as u64,
                        Content::Data(LogDataSector::restore(s, &leading, &trailing).into()),
                    )
                }
            };
            let end = at.checked_add(piece_len).filter(|&e| e <= MAX_VIRTUAL_SIZE);
            let Some(end) = end else {
                return Err(Error::corrupt(
                    FORMAT,
                    "log descriptor",
                    off + e.pos,
                    format!("writes {piece_len} bytes at {at:#x}, past any possible file"),
                ));
            };
            if piece_len > 0 {
                overlay.insert(at, end, content);
            }
            descriptors += 1;
        }
    }
    // The file as replayed is at least as long as every structure the log knew of.
    let last = head.header.last_file_offset;
    if last > MAX_VIRTUAL_SIZE {
        return Err(Error::corrupt(
            FORMAT,
            "log entry",
            off + head.pos,
            format!("last file offset {last:#x} is past any possible file"),
        ));
    }
    overlay.len = overlay.len.max(last.div_ceil(MIB) * MIB);
    let summary = ReplaySummary {
        entries: active.len(),
        descriptors,
        head_sequence: head.header.sequence_number,
    };
    Ok(Some((overlay, summary)))
}

/// What a replayed stretch of the file holds.
#[derive(Debug, Clone)]
enum Content {
    Zero,
    /// One 4 KiB sector.
    Data(Arc<[u8]>),
}

#[derive(Debug, Clone)]
struct Piece {
    end: u64,
    content: Content,
}

/// The image file as it reads after the log's replay: the replayed sectors over the
/// file, zeros past its end up to the replayed length.
pub struct ReplayedStorage {
    inner: Arc<dyn Storage>,
    /// Non-overlapping replayed stretches by start offset. Data pieces are single
    /// 4 KiB-aligned sectors and every descriptor is 4 KiB-aligned, so a later piece
    /// covers a data piece wholly or not at all; zero pieces may be cut.
    pieces: BTreeMap<u64, Piece>,
    len: u64,
}

impl ReplayedStorage {
    /// Applies one descriptor: `[start, end)` now reads as `content`.
    fn insert(&mut self, start: u64, end: u64, content: Content) {
        let overlapping: Vec<u64> = self
            .pieces
            .range(..end)
            .rev()
            .take_while(|(_, p)| p.end > start)
            .map(|(&k, _)| k)
            .collect();
        for k in overlapping {
            let p = self.pieces.remove(&k).expect("listed piece");
            if k < start {
                self.pieces.insert(
                    k,
                    Piece {
                        end: start,
                        content: p.content.clone(),
                    },
                );
            }
            if p.end > end {
                self.pieces.insert(
                    end,
                    Piece {
                        end: p.end,
                        content: p.content,
                    },
                );
            }
        }
        self.pieces.insert(start, Piece { end, content });
        self.len = self.len.max(end);
    }

    /// Reads `buf` at `offset` from the file itself, zeros past its end.
    fn read_inner(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let inner_len = self.inner.len();
        let n = if offset >= inner_len {
            0
        } else {
            (inner_len - offset).min(buf.len() as u64) as usize
        };
        if n > 0 {
            self.inner.read_exact_at(&mut buf[..n], offset)?;
        }
        buf[n..].fill(0);
        Ok(())
    }
}

impl Storage for ReplayedStorage {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = crate::io::read_end(offset, buf.len(), self.len, "replayed file")?;
        let mut pos = offset;
        // The piece that starts at or before `offset` may cover it.
        let first = self
            .pieces
            .range(..=offset)
            .next_back()
            .filter(|(_, p)| p.end > offset)
            .map(|(&k, _)| k);
        let from = first.unwrap_or(offset);
        for (&start, p) in self.pieces.range(from..end) {
            if start > pos {
                let gap = (start - pos) as usize;
                let at = (pos - offset) as usize;
                self.read_inner(&mut buf[at..at + gap], pos)?;
                pos = start;
            }
            let stop = p.end.min(end);
            let at = (pos - offset) as usize;
            let n = (stop - pos) as usize;
            match &p.content {
                Content::Zero => buf[at..at + n].fill(0),
                Content::Data(d) => {
                    let within = (pos - start) as usize;
                    buf[at..at + n].copy_from_slice(&d[within..within + n]);
                }
            }
            pos = stop;
        }
        if pos < end {
            let at = (pos - offset) as usize;
            self.read_inner(&mut buf[at..], pos)?;
        }
        Ok(())
    }

    fn path(&self) -> Option<&Path> {
        self.inner.path()
    }

    fn allocated_bytes(&self) -> u64 {
        self.inner.allocated_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemStorage;

    fn overlay(data: Vec<u8>) -> ReplayedStorage {
        let len = data.len() as u64;
        ReplayedStorage {
            inner: Arc::new(MemStorage::new(data)),
            pieces: BTreeMap::new(),
            len,
        }
    }

    #[test]
    fn later_pieces_win_and_gaps_read_the_file() {
        let mut o = overlay(vec![1u8; 4 * 4096]);
        o.insert(0, 3 * 4096, Content::Zero);
        o.insert(4096, 8192, Content::Data(vec![7u8; 4096].into()));
        o.insert(6 * 4096, 7 * 4096, Content::Data(vec![9u8; 4096].into()));
        assert_eq!(o.len(), 7 * 4096);
        let mut b = vec![0xeeu8; 7 * 4096];
        o.read_exact_at(&mut b, 0).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0));
        assert!(b[4096..8192].iter().all(|&x| x == 7));
        assert!(b[8192..3 * 4096].iter().all(|&x| x == 0));
        assert!(b[3 * 4096..4 * 4096].iter().all(|&x| x == 1));
        assert!(b[4 * 4096..6 * 4096].iter().all(|&x| x == 0));
        assert!(b[6 * 4096..].iter().all(|&x| x == 9));
        // An unaligned read inside a piece, and one past the end.
        let mut s = [0u8; 10];
        o.read_exact_at(&mut s, 4096 + 5).unwrap();
        assert_eq!(s, [7; 10]);
        assert!(o.read_exact_at(&mut s, 7 * 4096 - 5).is_err());
        // Zeroing over a data piece replaces it; cutting a zero piece keeps both ends.
        o.insert(4096, 8192, Content::Zero);
        o.insert(8192, 12288, Content::Data(vec![3u8; 4096].into()));
        o.read_exact_at(&mut b, 0).unwrap();
        assert!(b[..8192].iter().all(|&x| x == 0));
        assert!(b[8192..12288].iter().all(|&x| x == 3));
        assert_eq!(o.pieces.len(), 4);
    }
}
