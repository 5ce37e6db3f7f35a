//! VHDX test builders: independent readers (libvhdi's Python bindings, dissect), patching
//! headers, metadata and the BAT of an image, writing log entries, and making
//! differencing images (qemu-img cannot create them).

use std::path::Path;
use std::process::Command;

use imgconv::format::vhdx::header::{
    checksum, parse_bat, serialize_bat, BatEntry, FileIdentifier, Guid, Header, RegionEntry,
    RegionTable, BAT_REGION, HEADER_OFFSETS, METADATA_REGION, MIB, REGION_TABLE_OFFSETS,
    REGION_TABLE_SIZE,
};
use imgconv::format::vhdx::log::{
    descriptor_sectors, LogDataSector, LogDescriptor, LogEntryHeader, LOG_SECTOR,
};
use imgconv::format::vhdx::metadata::{
    FileParameters, MetadataEntry, MetadataTable, ParentLocator, FILE_PARAMETERS,
    LOGICAL_SECTOR_SIZE, PARENT_LOCATOR, PHYSICAL_SECTOR_SIZE, VHDX_PARENT_LOCATOR_TYPE,
    VIRTUAL_DISK_ID, VIRTUAL_DISK_SIZE,
};
use imgconv::format::vhdx::reader::Geometry;

use super::s;

/// The Python with libvhdi's bindings (`python3-libvhdi`): Debian's own Python.
fn pyvhdi_python() -> &'static str {
    for p in ["/usr/bin/python3", "python3"] {
        let ok = Command::new(p)
            .args(["-c", "import pyvhdi"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return p;
        }
    }
    panic!("no Python with pyvhdi (Debian: python3-libvhdi)");
}

const PYVHDI_EXPORT: &str = r#"
import sys, pyvhdi
def op(p):
    f = pyvhdi.file(); f.open(p); return f
f = op(sys.argv[1]); keep = []; cur = f
for p in sys.argv[3:]:
    par = op(p); cur.set_parent(par); keep.append(par); cur = par
size = f.get_media_size(); pos = 0
with open(sys.argv[2], 'wb') as out:
    while pos < size:
        n = min(1 << 20, size - pos); out.write(f.read_buffer(n)); pos += n
"#;

const DISSECT_EXPORT: &str = r#"
import sys
from pathlib import Path
from dissect.hypervisor.disk.vhdx import VHDX
v = VHDX(Path(sys.argv[1])); pos = 0
with open(sys.argv[2], 'wb') as out:
    while pos < v.size:
        n = min(1 << 20, v.size - pos); v.seek(pos); out.write(v.read(n)); pos += n
"#;

/// The virtual disk of `img` as libvhdi reads it; `parents` from the child's parent up.
pub fn libvhdi_read(img: &Path, parents: &[&Path]) -> Vec<u8> {
    let out = img.with_extension("libvhdi.raw");
    let mut args = vec!["-c", PYVHDI_EXPORT, s(img), s(&out)];
    args.extend(parents.iter().map(|p| s(p)));
    super::run_ok(pyvhdi_python(), &args);
    let b = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    b
}

/// The virtual disk of `img` as dissect.hypervisor reads it (parents through the
/// locator's relative path).
pub fn dissect_read(img: &Path) -> Vec<u8> {
    let out = img.with_extension("dissect.raw");
    super::run_ok("python3", &["-c", DISSECT_EXPORT, s(img), s(&out)]);
    let b = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    b
}

/// `vhdiinfo`'s "Media size" in bytes.
pub fn vhdiinfo_media_size(img: &Path) -> u64 {
    let o = super::run_ok("vhdiinfo", &[s(img)]);
    let line = o
        .lines()
        .find(|l| l.contains("Media size"))
        .unwrap_or_else(|| panic!("vhdiinfo {}: {o}", img.display()));
    let n = line.rsplit('(').next().unwrap().split(' ').next().unwrap();
    n.parse().unwrap()
}

/// The current header of the image at `path`, and its slot.
pub fn current_header(path: &Path) -> (usize, Header) {
    let b = std::fs::read(path).unwrap();
    let hs: Vec<Option<Header>> = HEADER_OFFSETS
        .iter()
        .map(|&o| {
            let raw = &b[o as usize..o as usize + 4096];
            Header::is_valid(raw).then(|| Header::parse(raw))
        })
        .collect();
    match (&hs[0], &hs[1]) {
        (Some(a), Some(b)) if a.sequence_number > b.sequence_number => (0, a.clone()),
        (_, Some(b)) => (1, b.clone()),
        (Some(a), None) => (0, a.clone()),
        _ => panic!("no valid header"),
    }
}

/// Writes `h` (checksummed) into header slot `slot` of the image.
pub fn write_header(path: &Path, slot: usize, h: &Header) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&h.serialize(), HEADER_OFFSETS[slot])
        .unwrap();
}

/// Makes `h` the current header of the image (both slots, higher sequence numbers).
pub fn replace_headers(path: &Path, f: impl FnOnce(&mut Header)) {
    let (_, mut h) = current_header(path);
    f(&mut h);
    let seq = h.sequence_number;
    h.sequence_number = seq + 1;
    write_header(path, 0, &h);
    h.sequence_number = seq + 2;
    write_header(path, 1, &h);
}

/// The first region table of the image.
pub fn region_table(path: &Path) -> RegionTable {
    let b = std::fs::read(path).unwrap();
    let o = REGION_TABLE_OFFSETS[0] as usize;
    RegionTable::parse(&b[o..o + REGION_TABLE_SIZE], o as u64).unwrap()
}

/// The region `guid` of the image.
pub fn region(path: &Path, guid: Guid) -> RegionEntry {
    *region_table(path).find(guid).unwrap()
}

/// Rewrites BAT entries of the image (the whole BAT region).
pub fn patch_bat(path: &Path, f: impl FnOnce(&mut Vec<BatEntry>)) {
    use std::os::unix::fs::FileExt;
    let r = region(path, BAT_REGION);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut raw = vec![0u8; r.length as usize];
    file.read_exact_at(&mut raw, r.file_offset).unwrap();
    let mut bat: Vec<BatEntry> = parse_bat(&raw).collect();
    f(&mut bat);
    file.write_all_at(&serialize_bat(&bat), r.file_offset)
        .unwrap();
}

/// The BAT entries of the image.
pub fn read_bat(path: &Path) -> Vec<BatEntry> {
    let mut v = Vec::new();
    patch_bat(path, |b| v = b.clone());
    v
}

/// The metadata table of the image and the file offset of its region.
pub fn metadata_table(path: &Path) -> (MetadataTable, u64) {
    let r = region(path, METADATA_REGION);
    let b = std::fs::read(path).unwrap();
    let at = r.file_offset as usize;
    (
        MetadataTable::parse(&b[at..at + 65536], r.file_offset, r.length as u64).unwrap(),
        r.file_offset,
    )
}

/// Overwrites the bytes of metadata item `id` (same length) in the image.
pub fn patch_metadata_item(path: &Path, id: Guid, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let (t, at) = metadata_table(path);
    let e = t.find(id).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at + e.offset as u64).unwrap();
}

/// One log entry to write: where in the log, its numbers, and its descriptors
/// (`(file offset, Some(4 KiB of data))` or `(file offset, None)` to zero `zero_len`).
pub struct LogEntrySpec {
    /// Offset of the entry in the log.
    pub pos: u64,
    /// Sequence number.
    pub seq: u64,
    /// The Tail field.
    pub tail: u64,
    /// Log GUID written in the entry.
    pub guid: Guid,
    /// Descriptors: data (4 KiB) or zero (`len` bytes).
    pub descs: Vec<(u64, LogWrite)>,
    /// FlushedFileOffset.
    pub flushed: u64,
    /// LastFileOffset.
    pub last: u64,
    /// Flip a bit after the checksum was computed (a torn entry).
    pub corrupt: bool,
}

/// What a descriptor writes.
pub enum LogWrite {
    /// This 4 KiB sector.
    Data(Vec<u8>),
    /// This many zero bytes.
    Zero(u64),
}

/// The bytes of one log entry.
pub fn log_entry_bytes(e: &LogEntrySpec) -> Vec<u8> {
    let n = e.descs.len() as u64;
    let ds = descriptor_sectors(n);
    let data: Vec<&Vec<u8>> = e
        .descs
        .iter()
        .filter_map(|(_, w)| match w {
            LogWrite::Data(d) => Some(d),
            LogWrite::Zero(_) => None,
        })
        .collect();
    let total = ds + data.len() as u64;
    let mut b = vec![0u8; (total as usize) * LOG_SECTOR];
    LogEntryHeader {
        checksum: 0,
        entry_length: (total as usize * LOG_SECTOR) as u32,
        tail: e.tail as u32,
        sequence_number: e.seq,
        descriptor_count: n as u32,
        reserved: 0,
        log_guid: e.guid,
        flushed_file_offset: e.flushed,
        last_file_offset: e.last,
    }
    .serialize(&mut b[..64]);
    let mut k = 0usize;
    for (i, (off, w)) in e.descs.iter().enumerate() {
        let d = match w {
            LogWrite::Zero(len) => LogDescriptor::Zero {
                length: *len,
                file_offset: *off,
                sequence_number: e.seq,
            },
            LogWrite::Data(sector) => {
                let (ds_bytes, leading, trailing) = LogDataSector::split(sector, e.seq);
                let at = (ds as usize + k) * LOG_SECTOR;
                b[at..at + LOG_SECTOR].copy_from_slice(&ds_bytes);
                k += 1;
                LogDescriptor::Data {
                    trailing,
                    leading,
                    file_offset: *off,
                    sequence_number: e.seq,
                }
            }
        };
        let at = 64 + 32 * i;
        d.serialize(&mut b[at..at + 32]);
    }
    let c = checksum(&b, 4);
    b[4..8].copy_from_slice(&c.to_le_bytes());
    if e.corrupt {
        let l = b.len();
        b[l - 100] ^= 1;
    }
    b
}

/// Writes `entries` into the image's log (wrapping around its end) and makes `guid` the
/// current header's log GUID.
pub fn write_log(path: &Path, guid: Guid, entries: &[LogEntrySpec]) {
    use std::os::unix::fs::FileExt;
    let (_, h) = current_header(path);
    let (off, len) = (h.log_offset, h.log_length as u64);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut log = vec![0u8; len as usize];
    f.read_exact_at(&mut log, off).unwrap();
    for e in entries {
        let b = log_entry_bytes(e);
        for (i, byte) in b.iter().enumerate() {
            log[((e.pos as usize) + i) % len as usize] = *byte;
        }
    }
    f.write_all_at(&log, off).unwrap();
    drop(f);
    replace_headers(path, |h| h.log_guid = guid);
}

/// What one block of a differencing image holds.
#[derive(Clone)]
pub enum ChildBlock {
    /// Fully present, filled by [`pattern`] with this seed.
    Full(u8),
    /// Partially present: these sector ranges `(first, count)` (of the block) from the
    /// file, filled by [`pattern`] with this seed; the rest from the parent.
    Partial(u8, Vec<(u64, u64)>),
    /// ZERO state: zeros, whatever the parent holds.
    Zero,
    /// UNMAPPED state: zeros.
    Unmapped,
}

/// Recognisable data: byte `i` of the disk for seed `seed`.
pub fn pattern(seed: u8, disk_offset: u64) -> u8 {
    seed.wrapping_add((disk_offset / 512) as u8).wrapping_mul(3) | 1
}

/// A differencing image to make.
pub struct ChildSpec<'a> {
    /// Virtual size.
    pub size: u64,
    /// Payload block size.
    pub block_size: u64,
    /// Logical sector size.
    pub lss: u64,
    /// The parent's data write GUID (the linkage).
    pub linkage: Guid,
    /// `relative_path` as written (Windows style), if any.
    pub relative_path: Option<&'a str>,
    /// `absolute_win32_path`, if any.
    pub absolute_path: Option<&'a str>,
    /// Blocks other than NOT_PRESENT.
    pub blocks: Vec<(u64, ChildBlock)>,
}

/// Writes the differencing image `spec` to `path` and applies its contents to
/// `expected` (the parent's virtual disk, resized to the child's). Returns the child's
/// data write GUID (for a grandchild's linkage).
pub fn make_child(path: &Path, spec: &ChildSpec<'_>, expected: &mut Vec<u8>) -> Guid {
    use std::os::unix::fs::FileExt;
    expected.resize(spec.size as usize, 0);
    let g = Geometry::new(spec.size, spec.block_size, spec.lss, true);
    let bat_offset = 2 * MIB;
    let bat_len = (g.bat_entries * 8).div_ceil(MIB).max(1) * MIB;
    let md_offset = bat_offset + bat_len;
    let mut next = md_offset + MIB;
    let f = std::fs::File::create(path).unwrap();
    let mut bat = vec![BatEntry::default(); g.bat_entries as usize];
    // Sector bitmap blocks by BAT index, written at the end.
    let mut bitmaps: std::collections::BTreeMap<usize, Vec<u8>> = Default::default();
    let spb = spec.block_size / spec.lss;
    for (block, kind) in &spec.blocks {
        let i = g.payload_index(*block) as usize;
        let start = block * spec.block_size;
        let blen = g.block_len(*block);
        let fill = |f: &std::fs::File, host: u64, seed: u8, from: u64, len: u64| {
            let data: Vec<u8> = (from..from + len)
                .map(|o| pattern(seed, start + o))
                .collect();
            f.write_all_at(&data, host + from).unwrap();
            data
        };
        match kind {
            ChildBlock::Full(seed) => {
                let host = next;
                next += spec.block_size;
                bat[i] = BatEntry::new(6, host);
                let d = fill(&f, host, *seed, 0, blen);
                expected[start as usize..(start + blen) as usize].copy_from_slice(&d);
            }
            ChildBlock::Partial(seed, ranges) => {
                let chunk = block / g.chunk_ratio;
                let si = g.bitmap_index(chunk) as usize;
                if bat[si].state() != 6 {
                    bat[si] = BatEntry::new(6, next);
                    next += MIB;
                    bitmaps.insert(si, vec![0u8; MIB as usize]);
                }
                let host = next;
                next += spec.block_size;
                bat[i] = BatEntry::new(7, host);
                // Sectors not present hold garbage in the file: the bitmap must win.
                let junk = vec![0xeeu8; blen as usize];
                f.write_all_at(&junk, host).unwrap();
                for &(first, count) in ranges {
                    let (from, len) = (first * spec.lss, count * spec.lss);
                    let d = fill(&f, host, *seed, from, len);
                    let a = (start + from) as usize;
                    expected[a..a + len as usize].copy_from_slice(&d);
                    let bits = bitmaps.get_mut(&si).unwrap();
                    for s in first..first + count {
                        let bit = (block % g.chunk_ratio) * spb + s;
                        bits[(bit / 8) as usize] |= 1 << (bit % 8);
                    }
                }
            }
            ChildBlock::Zero | ChildBlock::Unmapped => {
                let state = if matches!(kind, ChildBlock::Zero) {
                    2
                } else {
                    3
                };
                bat[i] = BatEntry::new(state, 0);
                expected[start as usize..(start + blen) as usize].fill(0);
            }
        }
    }
    for (si, bits) in &bitmaps {
        f.write_all_at(bits, bat[*si].offset()).unwrap();
    }
    f.set_len(next).unwrap();
    // Header section.
    let data_write_guid = Guid::random();
    let id = FileIdentifier {
        creator: "imgconv test".into(),
    }
    .serialize();
    f.write_all_at(&id, 0).unwrap();
    for (k, &at) in HEADER_OFFSETS.iter().enumerate() {
        let h = Header {
            signature: Header::SIGNATURE,
            checksum: 0,
            sequence_number: 10 + k as u64,
            file_write_guid: Guid::random(),
            data_write_guid,
            log_guid: Guid::NIL,
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        };
        f.write_all_at(&h.serialize(), at).unwrap();
    }
    let rt = RegionTable {
        entries: vec![
            RegionEntry {
                guid: METADATA_REGION,
                file_offset: md_offset,
                length: MIB as u32,
                required: 1,
            },
            RegionEntry {
                guid: BAT_REGION,
                file_offset: bat_offset,
                length: bat_len as u32,
                required: 1,
            },
        ],
    }
    .serialize();
    for at in REGION_TABLE_OFFSETS {
        f.write_all_at(&rt, at).unwrap();
    }
    f.write_all_at(&serialize_bat(&bat), bat_offset).unwrap();
    // Metadata.
    let mut pairs = vec![(
        "parent_linkage".to_string(),
        format!("{{{}}}", spec.linkage),
    )];
    if let Some(r) = spec.relative_path {
        pairs.push(("relative_path".into(), r.into()));
    }
    if let Some(a) = spec.absolute_path {
        pairs.push(("absolute_win32_path".into(), a.into()));
    }
    let locator = ParentLocator {
        locator_type: VHDX_PARENT_LOCATOR_TYPE,
        entries: pairs,
    }
    .serialize();
    let params = FileParameters {
        block_size: spec.block_size as u32,
        leave_blocks_allocated: false,
        has_parent: true,
        reserved: 0,
    }
    .serialize();
    let lss = (spec.lss as u32).to_le_bytes();
    let disk_id = Guid::random();
    let items: Vec<(Guid, Vec<u8>, u32)> = vec![
        (FILE_PARAMETERS, params.to_vec(), 4),
        (VIRTUAL_DISK_SIZE, spec.size.to_le_bytes().to_vec(), 6),
        (VIRTUAL_DISK_ID, disk_id.0.to_vec(), 6),
        (LOGICAL_SECTOR_SIZE, lss.to_vec(), 6),
        (PHYSICAL_SECTOR_SIZE, lss.to_vec(), 6),
        (PARENT_LOCATOR, locator, 4),
    ];
    let mut entries = Vec::new();
    let mut at = 65536u32;
    for (id, data, flags) in &items {
        f.write_all_at(data, md_offset + at as u64).unwrap();
        entries.push(MetadataEntry {
            item_id: *id,
            offset: at,
            length: data.len() as u32,
            flags: *flags,
        });
        at += data.len() as u32;
    }
    f.write_all_at(&MetadataTable { entries }.serialize(), md_offset)
        .unwrap();
    data_write_guid
}

/// The data write GUID of the image at `path` (what a child's linkage names).
pub fn data_write_guid(path: &Path) -> Guid {
    current_header(path).1.data_write_guid
}
