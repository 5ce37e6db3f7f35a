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
/// its data. Errors are fine; panics, hangs and huge allocations are the bugs.
pub fn open_and_walk(data: &[u8], format: Option<Format>) {
    let storage = Arc::new(MemStorage::new(data.to_vec()));
    let mut opts = OpenOptions::untrusted();
    opts.format = format;
    let ctx = OpenContext::detached("fuzz-input", &opts);
    let Ok(img) = crate::format::open_storage(storage, &ctx) else {
        return;
    };
    let _ = serde_json::to_string(img.info());
    walk(img.device().as_ref());
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
];

/// Builds a disk from `data` (a size, then pieces of content at offsets), writes it with
/// one of [`WRITER_CONFIGS`], reads it back and panics if the content differs.
pub fn roundtrip(data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    let (format, o, compressed) = WRITER_CONFIGS[data[0] as usize % WRITER_CONFIGS.len()];
    let mut size = 1 + (u16::from_le_bytes([data[1], data[2]]) as u64) * 97 % (3 << 20);
    if matches!(format, Format::Vmdk | Format::Vdi) {
        // VMDK counts whole sectors; the VDI writer rounds up to 512 because VirtualBox
        // rounds an odd disk size down (cutting data off).
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
    assert_eq!(img.size(), size, "{format} ({o}) changed the size");
    let mut back = vec![0u8; size as usize];
    img.device()
        .read_at(&mut back, 0)
        .unwrap_or_else(|e| panic!("reading back {format} ({o}) failed: {e}"));
    assert!(
        back == content,
        "{format} ({o}) gave different content back"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
