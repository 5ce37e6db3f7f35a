//! Entry points for the fuzz targets in `fuzz/` (and their regression tests).
//!
//! Not part of the stable API.

use std::sync::Arc;

use crate::detect::Format;
use crate::device::BlockDevice;
use crate::image::{OpenContext, OpenOptions};
use crate::io::MemStorage;

/// Most bytes of guest data read per input, so that a tiny file claiming a huge disk
/// cannot make one run slow.
const READ_BUDGET: u64 = 4 << 20;
/// Most extents walked per input.
const MAP_BUDGET: usize = 4096;

/// Opens `data` as an image (untrusted, in memory), then walks its map and reads some of
/// its data, and runs `check` on VMDK and VDI images (qcow2's has a target of its own).
/// Errors are fine; panics, hangs and huge allocations are the bugs.
pub fn open_and_walk(data: &[u8], format: Option<Format>) {
    let storage = Arc::new(MemStorage::new(data.to_vec()));
    let mut opts = OpenOptions::untrusted();
    opts.format = format;
    let ctx = OpenContext::detached("fuzz-input", &opts).with_opener(crate::open::open_storage);
    let Ok(img) = crate::open::open_storage(storage.clone(), &ctx) else {
        return;
    };
    let _ = format!("{:?}", img.info());
    walk(img.device().as_ref());
    // qcow2's check has a target of its own.
    let check = crate::format::driver(img.format()).check;
    if let (Some(check), false) = (check, img.format() == Format::Qcow2) {
        let req = crate::driver::CheckRequest { storage, ctx: &ctx };
        if let Ok(report) = check(&req) {
            let _ = report.exit_code();
        }
    }
}

/// Walks the map of `dev` and reads data extents, within fixed budgets.
pub fn walk(dev: &dyn BlockDevice) {
    let size = dev.size();
    let mut pos = 0;
    let mut budget = READ_BUDGET;
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..MAP_BUDGET {
        if pos >= size {
            break;
        }
        let Ok(e) = dev.map(pos, size - pos) else {
            break;
        };
        assert!(
            e.offset == pos && e.len > 0 && e.end() <= size,
            "map({pos}) returned a bad extent {e:?} on a {size}-byte disk"
        );
        if !e.kind.reads_as_zero() && budget > 0 {
            let n = e.len.min(buf.len() as u64).min(budget) as usize;
            let _ = dev.read_at(&mut buf[..n], pos);
            budget -= n as u64;
        }
        pos = e.end();
    }
    // A few unaligned reads at the end and across the middle.
    let mut small = [0u8; 777];
    for off in [size.saturating_sub(777), size / 2, 1] {
        if off + 777 <= size {
            let _ = dev.read_at(&mut small, off);
        }
    }
}

/// The writer configurations the round-trip target picks from: format and `-o` string,
/// `-c`.
pub const WRITER_CONFIGS: &[(Format, &str, bool)] = &[
    (Format::Raw, "", false),
    (Format::Qcow2, "", false),
    (Format::Qcow2, "cluster_size=4096,compat=0.10", false),
    (Format::Qcow2, "cluster_size=512,refcount_bits=1", false),
    (Format::Qcow2, "", true),
    (
        Format::Qcow2,
        "compression_type=zstd,cluster_size=16384",
        true,
    ),
    (Format::Qcow2, "extended_l2=on,cluster_size=32768", false),
    (Format::Vmdk, "", false),
    (Format::Vmdk, "subformat=streamOptimized", false),
    (Format::Vmdk, "subformat=monolithicFlat", false),
    (Format::Vmdk, "subformat=twoGbMaxExtentSparse", false),
    (Format::Vdi, "", false),
    (Format::Vdi, "static=on", false),
    (Format::Vpc, "force_size=on", false),
    (Format::Vpc, "subformat=fixed,force_size=on", false),
    (Format::Vpc, "", false),
    (Format::Vpc, "subformat=fixed", false),
    (Format::Vhdx, "", false),
    (Format::Vhdx, "subformat=fixed,block_size=1M", false),
    (
        Format::Vhdx,
        "block_size=1M,block_state_zero=off,log_size=2M",
        false,
    ),
];

/// Builds a disk from `data` (a size, then pieces of content at offsets), writes it with
/// one of [`WRITER_CONFIGS`], reads it back and panics if the content differs.
pub fn roundtrip(data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    let (format, o, compressed) = WRITER_CONFIGS[data[0] as usize % WRITER_CONFIGS.len()];
    let mut size = 1 + (u16::from_le_bytes([data[1], data[2]]) as u64) * 97 % (3 << 20);
    if format != Format::Raw {
        // VMDK counts whole sectors, QEMU needs qcow2 sizes in whole sectors, and the
        // VDI writer rounds up to 512 because VirtualBox rounds an odd disk size down
        // (cutting data off).
        size = size.div_ceil(512) * 512;
    }
    let mut content = vec![0u8; size as usize];
    let mut rest = &data[3..];
    while rest.len() >= 4 {
        let off = (u32::from_le_bytes([rest[0], rest[1], rest[2], 0]) as u64 * 13) % size;
        let len = (rest[3] as usize * 61).min((size - off) as usize);
        for (i, b) in content[off as usize..off as usize + len]
            .iter_mut()
            .enumerate()
        {
            *b = rest[3].wrapping_add(i as u8) | 1;
        }
        rest = &rest[4..];
    }
    let dir = std::env::temp_dir().join(format!("imgconv-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let dst = dir.join("out.img");
    let src = crate::image::Image::from_opened(crate::image::Opened {
        device: Arc::new(crate::device::MemDevice::new(content.clone())),
        info: crate::image::ImageInfo::new("mem", Format::Raw, size),
    });
    let mut opts = crate::convert::ConvertOptions::new(format).compressed(compressed);
    opts.write.parse_o(o).expect("the config's options parse");
    opts.engine.threads = 2;
    match crate::convert::convert(&src, &dst, &opts) {
        Ok(()) => {}
        Err(crate::Error::Unsupported { .. }) => return,
        Err(e) => panic!("writing {format} ({o}) failed: {e}"),
    }
    let img = crate::open(&dst, &OpenOptions::trusted().format(format))
        .unwrap_or_else(|e| panic!("reading back {format} ({o}) failed: {e}"));
    // VHD without force_size rounds the size up to a CHS geometry, as qemu-img does.
    let expected = match format {
        Format::Vpc => {
            crate::format::vpc::header::new_size(size, o.contains("force_size=on"))
                .expect("a small size")
                .size
        }
        _ => size,
    };
    assert_eq!(img.size(), expected, "{format} ({o}) changed the size");
    let mut back = vec![0u8; expected as usize];
    img.device()
        .read_at(&mut back, 0)
        .unwrap_or_else(|e| panic!("reading back {format} ({o}) failed: {e}"));
    assert!(
        back[..content.len()] == content[..] && back[content.len()..].iter().all(|&b| b == 0),
        "{format} ({o}) gave different content back"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs the qcow2 on-disk structure parsers (`format/qcow2/header.rs`, the snapshot
/// entry) on arbitrary bytes, and checks that what parses serializes to something that
/// parses back the same.
pub fn qcow2_header(data: &[u8]) {
    use crate::format::qcow2::header::{
        parse_bitmap_directory, parse_extensions, refcount_get, serialize_extensions,
        CompressedDescriptor, Header, L1Entry, L2Entry, SubclusterBitmap, BITMAP_ENTRY_FIXED_LEN,
    };
    use crate::format::qcow2::snapshot::{SnapshotEntry, SNAPSHOT_FIXED_LEN};

    let _ = Header::needed_len(data);
    if let Ok(h) = Header::parse(data) {
        let again = Header::parse(&h.serialize()).expect("a serialized header parses");
        assert_eq!(again, h, "header changed across serialize/parse");
        let _ = (h.cluster_size(), h.refcount_bits(), h.l2_entries());
        let _ = (h.bytes_per_l1_entry(), h.min_l1_size(), h.compression());
        // The extension area lives in the first cluster.
        let first = &data[..data.len().min(h.cluster_size() as usize)];
        if let Ok(exts) = parse_extensions(first, h.extensions_offset()) {
            let back = parse_extensions(&serialize_extensions(&exts), 0)
                .expect("serialized extensions parse");
            let kinds = |v: &[crate::format::qcow2::header::HeaderExtension]| {
                v.iter().map(|e| e.kind()).collect::<Vec<_>>()
            };
            assert_eq!(kinds(&back), kinds(&exts));
        }
        // Table entries of every kind, decoded with this header's geometry.
        for w in data.chunks_exact(8).take(512) {
            let v = u64::from_be_bytes(w.try_into().expect("8 bytes"));
            let _ = L1Entry(v).l2_offset();
            let _ = L2Entry(v).decode(h.cluster_bits, h.extended_l2(), h.has_external_data_file());
            let d = CompressedDescriptor::decode(v, h.cluster_bits);
            let _ = d.max_len();
            let bm = SubclusterBitmap(v);
            for i in 0..32 {
                let _ = (bm.state(i), bm.run_len(i));
            }
        }
    }
    // Structures that do not depend on the header.
    if data.len() >= SNAPSHOT_FIXED_LEN {
        let _ = SnapshotEntry::total_len(data);
        if let Ok(s) = SnapshotEntry::parse(data, 0) {
            let _ = (s.info(), s.disk_size(), s.icount(), s.vm_state_size());
            let back = SnapshotEntry::parse(&s.serialize(), 0)
                .expect("a serialized snapshot entry parses");
            assert_eq!(back, s, "snapshot entry changed across serialize/parse");
        }
    }
    if data.len() >= BITMAP_ENTRY_FIXED_LEN {
        let count = u32::from(data[0]) % 32;
        let _ = parse_bitmap_directory(data, count, 0);
    }
    if let Some((&order, block)) = data.split_first() {
        let order = u32::from(order % 7);
        let entries = (block.len() as u64 * 8) >> order;
        for i in (0..entries).step_by(1 + entries as usize / 64) {
            let _ = refcount_get(block, i, order);
        }
    }
}

/// Runs the qcow2 consistency check (`imgconv check`: every table walked, refcounts
/// rebuilt and compared) on arbitrary bytes.
pub fn qcow2_check(data: &[u8]) {
    let storage = MemStorage::new(data.to_vec());
    if let Ok(report) = crate::format::qcow2::check::check(&storage) {
        let _ = report.exit_code();
    }
}

/// Changes arbitrary bytes in place as a qcow2 image (in a temporary file): opens a
/// [`Qcow2Edit`](crate::format::qcow2::edit::Qcow2Edit) transaction on them, makes an
/// internal snapshot, writes the first cluster, adds a persistent bitmap and commits.
/// Errors are fine; a panic is a bug, and so is a committed image whose check finds
/// corruption (every transaction must leave a consistent image).
pub fn qcow2_edit(data: &[u8]) {
    use crate::format::qcow2::{bitmap, check, edit::Qcow2Edit, snapshot_edit};
    if data.len() > 8 << 20 {
        return;
    }
    let path = std::env::temp_dir().join(format!(
        "imgconv-fuzz-edit-{}-{:?}.qcow2",
        std::process::id(),
        std::thread::current().id()
    ));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let edited = (|| -> crate::Result<()> {
        let mut e = Qcow2Edit::open(&path)?;
        snapshot_edit::create(&mut e, "fuzz", (0, 0))?;
        if e.size() > 0 {
            let cluster = vec![0x5a; e.cluster_size() as usize];
            e.write_cluster(0, &cluster)?;
        }
        // A bitmap costs one bit per 4 KiB or more: keep it small.
        if e.size() <= 1 << 32 {
            bitmap::add(&mut e, "fuzz", None)?;
        }
        crate::format::qcow2::bitmap::commit(e)
    })();
    if edited.is_ok() {
        if let Ok(storage) = crate::io::FileStorage::open_image(&path, true) {
            let r = check::check(&storage).expect("an image this transaction wrote checks");
            assert!(
                r.corruptions == 0 && r.check_errors == 0,
                "the edited image is not consistent: {:?}",
                r.messages
            );
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Runs the VMDK text descriptor parser on arbitrary bytes (decoded as the reader
/// decodes them) and checks that a parsed descriptor renders to text that parses back
/// the same.
pub fn vmdk_descriptor(data: &[u8]) {
    use crate::format::vmdk::descriptor::{
        decode_text, looks_like_descriptor, Descriptor, ExtentType,
    };
    let _ = looks_like_descriptor(data);
    let text = decode_text(&data[..data.len().min(crate::limits::MAX_DESCRIPTOR_BYTES as usize)]);
    if let Ok(d) = Descriptor::parse(&text, 0) {
        let _ = (d.total_sectors(), d.get("ddb.adapterType"));
        let again = Descriptor::parse(&d.render(), 0).expect("a rendered descriptor parses");
        // Only FLAT extents carry an offset; the other kinds ignore (and drop) it.
        let key = |d: &Descriptor| {
            d.extents
                .iter()
                .map(|e| {
                    let flat = e.kind == ExtentType::Flat;
                    (
                        e.access,
                        e.sectors,
                        e.kind,
                        e.filename.clone(),
                        flat.then_some(e.offset),
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(key(&again), key(&d), "extents changed across render/parse");
        assert_eq!(again.ddb, d.ddb, "keys changed across render/parse");
    }
}

/// Opens `data` as a streamOptimized VMDK read from a pipe (one pass, in order), and
/// through the random-access reader.
pub fn vmdk_stream(data: &[u8]) {
    let opts = OpenOptions::untrusted();
    let ctx = OpenContext::detached("fuzz-input", &opts).with_opener(crate::open::open_storage);
    let reader = Box::new(std::io::Cursor::new(data.to_vec()));
    if let Ok(opened) = crate::format::vmdk::open_stream(reader, &ctx) {
        walk_in_order(opened.device.as_ref());
    }
    open_and_walk(data, Some(Format::Vmdk));
}

/// Reads a sequential-only device from start to end (within the read budget).
fn walk_in_order(dev: &dyn BlockDevice) {
    let size = dev.size();
    let mut buf = vec![0u8; 64 * 1024];
    let mut pos = 0;
    while pos < size && pos < READ_BUDGET {
        let n = (size - pos).min(buf.len() as u64) as usize;
        if dev.read_at(&mut buf[..n], pos).is_err() {
            break;
        }
        pos += n as u64;
    }
}

/// Most decompressed bytes the compressed-input target reads from one input, so that a
/// small compression bomb (legitimate, just large) does not count as a hang.
const DECODE_BUDGET: u64 = 16 << 20;

/// Runs the compressed-input layer (gzip/bzip2/xz/zstd decoders, tar parsing, spooling,
/// format detection) on arbitrary bytes, as if they came from a pipe.
pub fn compressed(data: &[u8]) {
    use std::io::Read;
    if let Some(c) = crate::detect::probe_compression(data) {
        let reader = Box::new(std::io::Cursor::new(data.to_vec()));
        let Ok(dec) = crate::io::compressed::decoder(c, reader) else {
            return;
        };
        let mut n = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        let mut dec = dec.take(DECODE_BUDGET + 1);
        loop {
            match dec.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => n += k as u64,
                Err(_) => return,
            }
        }
        if n > DECODE_BUDGET {
            return; // a bomb: only its first bytes were checked
        }
    }
    let reader = Box::new(std::io::Cursor::new(data.to_vec()));
    if let Ok(img) = crate::open::open_stream_input(reader, "fuzz-input", &OpenOptions::untrusted())
    {
        let _ = format!("{:?}", img.info());
        walk_in_order(img.device().as_ref());
    }
    // Read in one pass instead (a raw disk of unrecorded length, found at the end of
    // the stream), through the conversion engine into a raw stream.
    let reader = Box::new(std::io::Cursor::new(data.to_vec()));
    let opts = OpenOptions::untrusted().stream_unknown_length();
    if let Ok(img) = crate::open::open_stream_input(reader, "fuzz-input", &opts) {
        let to_raw = crate::convert::ConvertOptions::new(Format::Raw);
        let sink = BudgetSink { left: READ_BUDGET };
        let _ = crate::convert::convert_to_writer(&img, Box::new(sink), &to_raw);
    }
}

/// An output that takes [`READ_BUDGET`] bytes, then fails: a small input may declare a
/// disk of gigabytes, whose zeros a raw stream must spell out (legitimate, not a hang);
/// the conversion stops at the budget like one whose reader went away.
struct BudgetSink {
    left: u64,
}

impl std::io::Write for BudgetSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len() as u64;
        if n > self.left {
            return Err(std::io::Error::other(
                "the fuzz target's output budget is spent",
            ));
        }
        self.left -= n;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A file made of 512-byte sectors placed anywhere in a declared length, zeros elsewhere:
/// the VHDX target's input (a VHDX puts its structures megabytes apart, which no small
/// flat input could reach).
struct SparseSectors {
    sectors: std::collections::BTreeMap<u64, [u8; 512]>,
    len: u64,
}

impl SparseSectors {
    /// Largest file the VHDX target builds.
    const MAX_LEN: u64 = 64 << 20;

    /// Decodes `data`: one byte giving the length in MiB (1–64), then records of a
    /// little-endian u32 sector number (taken modulo the length), a little-endian u16
    /// count `n` (at most 512) and `n` bytes: the sector's first bytes, the rest zeros.
    fn decode(data: &[u8]) -> Option<SparseSectors> {
        let (&mib, mut rest) = data.split_first()?;
        let len = (u64::from(mib) % 64 + 1) << 20;
        let mut sectors = std::collections::BTreeMap::new();
        while rest.len() >= 6 {
            let n = u32::from_le_bytes(rest[..4].try_into().ok()?) as u64 % (len / 512);
            let count = (u16::from_le_bytes([rest[4], rest[5]]) as usize)
                .min(512)
                .min(rest.len() - 6);
            let mut s = [0u8; 512];
            s[..count].copy_from_slice(&rest[6..6 + count]);
            sectors.insert(n, s);
            rest = &rest[6 + count..];
        }
        Some(SparseSectors { sectors, len })
    }
}

impl crate::io::Storage for SparseSectors {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "past the end")
            })?;
        buf.fill(0);
        for (&n, sector) in self.sectors.range(offset / 512..end.div_ceil(512)) {
            let (s, e) = ((n * 512).max(offset), (n * 512 + 512).min(end));
            buf[(s - offset) as usize..(e - offset) as usize]
                .copy_from_slice(&sector[(s - n * 512) as usize..(e - n * 512) as usize]);
        }
        Ok(())
    }
}

/// The VHDX reader (headers, log replay, region table, metadata, BAT, blocks) and
/// `check` on a sparse file described by `data` (see `SparseSectors`); and the VHDX
/// on-disk structure parsers on the raw bytes, checking that what parses serializes to
/// something that parses back the same.
pub fn vhdx(data: &[u8]) {
    use crate::format::vhdx::header::{Header, RegionTable};
    use crate::format::vhdx::log::{LogDescriptor, LogEntryHeader};
    use crate::format::vhdx::metadata::{MetadataTable, ParentLocator};

    if let Some(file) = SparseSectors::decode(data) {
        debug_assert!(file.len <= SparseSectors::MAX_LEN);
        let storage: Arc<dyn crate::io::Storage> = Arc::new(file);
        let ctx = OpenContext::detached("fuzz-input", &OpenOptions::untrusted());
        if let Ok(opened) = crate::format::vhdx::open(storage.clone(), &ctx) {
            let _ = format!("{:?}", opened.info);
            walk(opened.device.as_ref());
        }
        if let Ok(report) = crate::format::vhdx::check(storage) {
            let _ = report.exit_code();
        }
    }
    // The structures, straight from the bytes.
    if data.len() >= 80 {
        let h = Header::parse(data);
        let again = Header::parse(&h.serialize());
        assert_eq!(
            Header {
                checksum: h.checksum,
                ..again
            },
            h
        );
    }
    if let Ok(t) = RegionTable::parse(data, 0) {
        assert_eq!(RegionTable::parse(&t.serialize(), 0).expect("reparses"), t);
    }
    if let Ok(t) = MetadataTable::parse(data, 0, 1 << 20) {
        assert_eq!(
            MetadataTable::parse(&t.serialize(), 0, 1 << 20).expect("reparses"),
            t
        );
    }
    if let Ok(l) = ParentLocator::parse(data, 0) {
        assert_eq!(
            ParentLocator::parse(&l.serialize(), 0).expect("reparses"),
            l
        );
    }
    if let Some(h) = LogEntryHeader::parse(data) {
        let mut b = [0u8; 64];
        h.serialize(&mut b);
        assert_eq!(LogEntryHeader::parse(&b), Some(h));
    }
    for c in data.chunks_exact(32).take(256) {
        if let Some(d) = LogDescriptor::parse(c) {
            let mut b = [0u8; 32];
            d.serialize(&mut b);
            assert_eq!(LogDescriptor::parse(&b), Some(d));
        }
    }
}

/// Replays one saved fuzz input through the target its file name names:
/// `<format>-<target>-<short-name>` in `tests/fuzz-regressions/`, where format is
/// `qcow2`, `vmdk`, `vdi`, `vhdx`, `any` or `roundtrip`. Inputs of a structure target
/// (`qcow2-header-…`, `vmdk-descriptor-…`, `vmdk-stream-…`, `any-compressed-…`) also go
/// through the whole reader of their format.
pub fn replay(name: &str, data: &[u8]) {
    let mut parts = name.split('-');
    let (format, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    match (format, target) {
        ("roundtrip", _) => return roundtrip(data),
        ("qcow2", "header") => qcow2_header(data),
        ("qcow2", "check") => qcow2_check(data),
        ("qcow2", "edit") => return qcow2_edit(data),
        ("vmdk", "descriptor") => vmdk_descriptor(data),
        ("vmdk", "stream") => vmdk_stream(data),
        ("any", "compressed") => return compressed(data),
        ("vhdx", _) => return vhdx(data),
        _ => {}
    }
    let format = match format {
        "qcow2" => Some(Format::Qcow2),
        "vmdk" => Some(Format::Vmdk),
        "vdi" => Some(Format::Vdi),
        "vpc" => Some(Format::Vpc),
        _ => None,
    };
    open_and_walk(data, format);
}

#[cfg(test)]
mod tests {
    /// Every saved crash input runs through its target without a panic.
    #[test]
    fn fuzz_regressions_replay() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("tests/fuzz-regressions exists") {
            let p = e.expect("readable folder").path();
            let data = std::fs::read(&p).expect("readable input");
            super::replay(&p.file_name().unwrap().to_string_lossy(), &data);
            n += 1;
        }
        assert!(n > 0, "no regression inputs in {}", dir.display());
    }

    /// The VHDX target's made seeds decode to images the reader opens (the differencing
    /// one up to its parent, which an untrusted fuzz run refuses); the inputs fuzzing
    /// kept (named by their SHA-1, mostly invalid images) only run through the target.
    #[test]
    fn vhdx_seeds_open() {
        use crate::image::{OpenContext, OpenOptions};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/vhdx");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("fuzz/seeds/vhdx exists") {
            let p = e.expect("readable folder").path();
            let data = std::fs::read(&p).expect("readable seed");
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name.len() == 40 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
                super::vhdx(&data);
                continue;
            }
            let file = super::SparseSectors::decode(&data).expect("a seed decodes");
            let ctx = OpenContext::detached("seed", &OpenOptions::untrusted());
            let r = crate::format::vhdx::open(std::sync::Arc::new(file), &ctx);
            match r {
                Ok(o) => {
                    assert!(!name.starts_with("differencing"), "{name}");
                    // The dirty-log seeds keep their whole log: it is replayed.
                    let dirty = name.contains("dirty-log");
                    assert_eq!(o.info.dirty_flag, Some(dirty), "{name}");
                }
                Err(crate::Error::UntrustedReference { .. }) => {
                    assert!(name.starts_with("differencing"), "{name}")
                }
                Err(e) => panic!("seed {name}: {e}"),
            }
            super::vhdx(&data);
            n += 1;
        }
        assert!(n >= 6);
    }
}
