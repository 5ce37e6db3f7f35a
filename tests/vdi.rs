//! VDI: reading qemu-img's, VirtualBox's and hand-made images (dynamic, static,
//! differencing, odd block sizes), writing VirtualBox-style images that qemu-img and
//! dissect.hypervisor read back identically, and refusing malformed headers.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use imgconv::format::vdi::header::{
    parse_block_map, serialize_block_map, Header, PreHeader, Uuid, BLOCK_FREE, BLOCK_ZERO,
    MAX_HEADER_BYTES,
};
use imgconv::{BlockDevice, Error, OpenOptions};

const MIB: u64 = 1 << 20;

/// A raw file with data, sparse holes and an all-zero data stretch, `size` bytes.
fn sample_raw(path: &Path, size: u64) {
    make_raw(
        path,
        size,
        &[
            (0, 5000, 1),
            (3 * MIB + 4096, 70000, 2),
            (5 * MIB - 512, 1024, 3),
            (size - 1000, 1000, 4),
        ],
    );
    // A stretch of written zeros (data on disk, zero content) must not become a block.
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&vec![0u8; 2 * MIB as usize], 6 * MIB)
        .unwrap();
}

fn info_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&imgconv(&["info", "--output=json", s(p)])).unwrap()
}

fn read_head(p: &Path) -> (PreHeader, Header) {
    let b = std::fs::read(p).unwrap();
    (
        PreHeader::parse(&b),
        Header::parse(&b[..MAX_HEADER_BYTES]).unwrap(),
    )
}

fn read_map(p: &Path, h: &Header) -> Vec<u32> {
    let b = std::fs::read(p).unwrap();
    let o = h.blocks_offset as usize;
    parse_block_map(&b[o..o + 4 * h.blocks as usize])
}

/// Rewrites the header (and optionally the block map) of a VDI file in place.
fn patch(p: &Path, f: impl FnOnce(&mut Header, &mut Vec<u32>)) {
    let mut b = std::fs::read(p).unwrap();
    let mut h = Header::parse(&b[..MAX_HEADER_BYTES]).unwrap();
    let mut map = read_map(p, &h);
    let old_map_at = h.blocks_offset as usize;
    f(&mut h, &mut map);
    h.serialize(&mut b);
    let m = serialize_block_map(&map);
    if old_map_at + m.len() <= b.len() {
        b[old_map_at..old_map_at + m.len()].copy_from_slice(&m);
    }
    std::fs::write(p, b).unwrap();
}

#[test]
fn qemu_made_dynamic_and_static_vdis_read_identical() {
    let d = scratch();
    let raw = d.path().join("src.raw");
    sample_raw(&raw, 12 * MIB);
    for (name, extra) in [("dyn.vdi", None), ("static.vdi", Some("static=on"))] {
        let v = d.path().join(name);
        let mut args = vec!["convert", "-f", "raw", "-O", "vdi"];
        if let Some(o) = extra {
            args.extend(["-o", o]);
        }
        args.extend([s(&raw), s(&v)]);
        qemu_img(&args);
        check_to_raw(&v, d.path());
        let out = d.path().join(format!("{name}.out.raw"));
        assert_same_fmt(&raw, "raw", &out, "raw");
        let j = info_json(&v);
        assert_eq!(j["virtual-size"], 12 * MIB);
        assert_eq!(j["cluster-size"], MIB);
        let kind = if extra.is_some() { "static" } else { "dynamic" };
        assert_eq!(j["format-details"]["data"]["image-type"], kind);
        assert_eq!(j["format-details"]["data"]["header-size"], 0x180);
    }
}

#[test]
fn corpus_vdis_read_identical() {
    let Some(c) = corpus_dir() else { return };
    let d = scratch();
    for (rel, size, uuid, text) in [
        (
            "virtualbox/TestHD-vbox3.vdi.xz",
            4 * MIB,
            "7684cccd-1ea2-4382-9cbf-d39916ba7405",
            "<<< Sun VirtualBox Disk Image >>>",
        ),
        (
            "virtualbox/TestHD-vbox4.0.8.vdi.xz",
            8 << 30,
            "c92b558e-eba5-43e8-a8b3-984f946db1b2",
            "<<< Oracle VM VirtualBox Disk Image >>>",
        ),
        (
            "dissect-hypervisor/vdi/basic.vdi.gz",
            10 * MIB,
            "874ef599-4fd0-4f09-a3ee-cb161c1f8c41",
            "<<< QEMU VM Virtual Disk Image >>>",
        ),
    ] {
        let name = rel
            .rsplit('/')
            .next()
            .unwrap()
            .trim_end_matches(".xz")
            .trim_end_matches(".gz");
        let v = corpus_file(&c, rel, d.path(), name);
        let t = Instant::now();
        check_to_raw(&v, d.path());
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{rel} took {:?}",
            t.elapsed()
        );
        let j = info_json(&v);
        assert_eq!(j["format"], "vdi");
        assert_eq!(j["virtual-size"], size, "{rel}");
        assert_eq!(j["format-details"]["type"], "vdi");
        assert_eq!(j["format-details"]["data"]["uuid"], uuid, "{rel}");
        assert_eq!(j["format-details"]["data"]["file-info"], text, "{rel}");
    }
    // basic.vdi: MiB 0 unallocated, then 4 KiB block k holds byte k % 256.
    let img = imgconv::open(d.path().join("basic.vdi"), &OpenOptions::default()).unwrap();
    let mut b = vec![0u8; 4096];
    for k in [256u64, 300, 2559] {
        img.device().read_at(&mut b, k * 4096).unwrap();
        assert!(b.iter().all(|&x| x == (k % 256) as u8), "block {k}");
    }
    let e = img.device().map(0, 10 * MIB).unwrap();
    assert_eq!((e.len, e.kind), (MIB, imgconv::ExtentKind::Unallocated));
}

/// Converts `src` to VDI with imgconv (`-o opts`), checks it with qemu-img.
fn write_vdi(src: &Path, dst: &Path, opts: Option<&str>) {
    imgconv_convert("vdi", opts.unwrap_or(""), src, dst);
    assert_same(src, dst);
    assert_qemu_check_clean(dst);
}

#[test]
fn raw_written_as_dynamic_and_static_vdi_is_virtualbox_shaped() {
    let d = scratch();
    let raw = d.path().join("src.raw");
    sample_raw(&raw, 20 * MIB);
    let data = std::fs::read(&raw).unwrap();
    let nonzero_blocks = data
        .chunks(MIB as usize)
        .filter(|c| c.iter().any(|&b| b != 0))
        .count() as u32;

    let dynv = d.path().join("dyn.vdi");
    write_vdi(&raw, &dynv, None);
    let (p, h) = read_head(&dynv);
    assert_eq!(&p.text[..40], b"<<< Oracle VM VirtualBox Disk Image >>>\n");
    assert_eq!((p.major(), p.minor()), (1, 1));
    assert_eq!(h.header_size, 0x190);
    assert_eq!(h.image_type, 1);
    assert_eq!(h.blocks_offset as u64, MIB);
    assert_eq!(h.data_offset as u64, 2 * MIB);
    assert_eq!(h.lchs.unwrap().sector_size, 512);
    assert_eq!(h.legacy_geometry.sector_size, 512);
    assert_eq!(
        (h.blocks, h.block_size, h.disk_size),
        (20, MIB as u32, 20 * MIB)
    );
    assert_eq!(h.blocks_allocated, nonzero_blocks);
    assert!(h.uuid_linkage.is_null() && h.uuid_parent_modify.is_null());
    assert_eq!(h.uuid_create.0[6] >> 4, 4, "random v4 UUID");
    let map = read_map(&dynv, &h);
    // Blocks appended in ascending order; the written-zero stretch (MiB 6..8) is free.
    let allocated: Vec<u32> = map.iter().copied().filter(|&e| e != BLOCK_FREE).collect();
    assert_eq!(allocated, (0..nonzero_blocks).collect::<Vec<_>>());
    assert_eq!(map[6], BLOCK_FREE);
    assert_eq!(map[7], BLOCK_FREE);
    let len = std::fs::metadata(&dynv).unwrap().len();
    assert_eq!(len, 2 * MIB + nonzero_blocks as u64 * MIB);

    let stat = d.path().join("static.vdi");
    write_vdi(&raw, &stat, Some("static=on"));
    let (_, h) = read_head(&stat);
    assert_eq!(h.image_type, 2);
    assert_eq!(h.blocks_allocated, 20);
    assert_eq!(read_map(&stat, &h), (0..20).collect::<Vec<_>>());
    assert_eq!(std::fs::metadata(&stat).unwrap().len(), 22 * MIB);
    let j = info_json(&stat);
    assert_eq!(j["format-details"]["data"]["image-type"], "static");

    // qemu-img reads our header as VDI with the right size.
    let q = qemu_info(&dynv);
    assert_eq!(q["format"], "vdi");
    assert_eq!(q["virtual-size"], 20 * MIB);
    // static=off is the default; explicit off is accepted.
    let off = d.path().join("off.vdi");
    write_vdi(&raw, &off, Some("static=off"));
    assert_eq!(read_head(&off).1.image_type, 1);
}

/// Reads a VDI with dissect.hypervisor one block at a time (its reader mishandles reads
/// that span blocks), optionally on top of a parent raw file.
fn dissect_read(vdi: &Path, parent: Option<&Path>) -> Vec<u8> {
    let script = r#"
import sys
from dissect.hypervisor.disk.vdi import VDI
parent = open(sys.argv[2], "rb") if len(sys.argv) > 2 else None
v = VDI(open(sys.argv[1], "rb"), parent)
st = v.open()
bs = v.block_size
out = sys.stdout.buffer
off = 0
while off < v.size:
    n = min(bs, v.size - off)
    st.seek(off)
    b = st.read(n)
    assert len(b) == n, (off, len(b))
    out.write(b)
    off += n
"#;
    let mut args = vec!["-c", script, s(vdi)];
    if let Some(p) = parent {
        args.push(s(p));
    }
    let o = run("python3", &args);
    assert!(
        o.status.success(),
        "dissect.hypervisor failed (pip install dissect.hypervisor): {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

#[test]
fn dissect_hypervisor_reads_our_vdis() {
    let d = scratch();
    let raw = d.path().join("src.raw");
    sample_raw(&raw, 10 * MIB + 3 * 512);
    let data = std::fs::read(&raw).unwrap();
    for (name, opts) in [
        ("dyn.vdi", None),
        ("static.vdi", Some("static=on")),
        ("small-blocks.vdi", Some("cluster_size=64k")),
        ("big-blocks.vdi", Some("cluster_size=2M,static=on")),
    ] {
        let v = d.path().join(name);
        imgconv_convert("vdi", opts.unwrap_or(""), &raw, &v);
        let got = dissect_read(&v, None);
        assert_eq!(got.len(), data.len(), "{name}");
        assert!(
            got == data,
            "{name}: dissect.hypervisor reads different bytes"
        );
        // imgconv reads its own non-1-MiB blocks back too.
        let back = d.path().join(format!("{name}.raw"));
        imgconv(&["convert", "-O", "raw", s(&v), s(&back)]);
        assert!(std::fs::read(&back).unwrap() == data, "{name}");
    }
}

#[test]
fn every_image_gets_fresh_uuids_and_uuid_can_be_set() {
    let d = scratch();
    let raw = d.path().join("src.raw");
    sample_raw(&raw, 8 * MIB);
    let (a, b) = (d.path().join("a.vdi"), d.path().join("b.vdi"));
    imgconv(&["convert", "-O", "vdi", s(&raw), s(&a)]);
    imgconv(&["convert", "-O", "vdi", s(&raw), s(&b)]);
    let (ja, jb) = (info_json(&a), info_json(&b));
    let fa = &ja["format-details"]["data"];
    let fb = &jb["format-details"]["data"];
    assert_ne!(fa["uuid"], fb["uuid"]);
    assert_ne!(fa["modification-uuid"], fb["modification-uuid"]);
    assert_ne!(fa["uuid"], fa["modification-uuid"]);

    let c = d.path().join("c.vdi");
    let want = "5e4f1c2a-9b3d-4e8f-a1b2-c3d4e5f60718";
    imgconv_convert("vdi", &format!("uuid={want}"), &raw, &c);
    let jc = info_json(&c);
    assert_eq!(jc["format-details"]["data"]["uuid"], want);
    assert_ne!(jc["format-details"]["data"]["modification-uuid"], want);
    // Stored in GUID byte order: the first field little-endian.
    let bytes = std::fs::read(&c).unwrap();
    assert_eq!(&bytes[0x188..0x18C], &[0x2a, 0x1c, 0x4f, 0x5e]);
    assert_same(&raw, &c);

    // Human info shows the same.
    let human = imgconv(&["info", "--details", s(&c)]);
    assert!(human.contains(&format!("uuid: {want}")), "{human}");
    assert!(human.contains("image type: dynamic"), "{human}");
    assert!(human.contains("cluster_size: 1048576"), "{human}");

    // Bad options are errors and leave nothing behind.
    for bad in [
        "uuid=nonsense",
        "uuid=00000000-0000-0000-0000-000000000000",
        "static=maybe",
        "cluster_size=3000",
        "subformat=fixed",
    ] {
        assert_convert_refused("vdi", bad, &raw, &d.path().join("bad.vdi"));
    }
    let o = imgconv_out(&[
        "convert",
        "-c",
        "-O",
        "vdi",
        s(&raw),
        s(&d.path().join("x.vdi")),
    ]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn odd_sizes_work() {
    let d = scratch();
    for size in [MIB + 512, 10_000_001, 3 * MIB - 7, 513] {
        let raw = d.path().join(format!("{size}.raw"));
        make_raw(&raw, size, &[(0, 300, 1), (size - 200, 200, 9)]);
        for opts in [None, Some("static=on")] {
            let v = d.path().join(format!("{size}-{}.vdi", opts.is_some()));
            write_vdi(&raw, &v, opts);
            // Rounded up to 512 as qemu-img does (VirtualBox rounds down otherwise).
            let j = info_json(&v);
            assert_eq!(j["virtual-size"], size.div_ceil(512) * 512);
            let back = d.path().join("back.raw");
            imgconv(&["convert", "-O", "raw", s(&v), s(&back)]);
            let mut want = std::fs::read(&raw).unwrap();
            want.resize((size.div_ceil(512) * 512) as usize, 0);
            assert!(std::fs::read(&back).unwrap() == want, "size {size}");
            let got = dissect_read(&v, None);
            assert!(got == want, "dissect, size {size}");
        }
    }
}

/// Builds `child` as a differencing image of `parent` from the raw `changes`, the way
/// VirtualBox links them: type 4, uuidLinkage = parent's uuidCreate,
/// uuidParentModify = parent's uuidModify. Block `zero_block` is marked discarded.
fn make_child(parent: &Path, changes: &Path, child: &Path, zero_block: Option<usize>) {
    imgconv(&["convert", "-O", "vdi", s(changes), s(child)]);
    let (_, ph) = read_head(parent);
    patch(child, |h, map| {
        h.image_type = 4;
        h.uuid_linkage = ph.uuid_create;
        h.uuid_parent_modify = ph.uuid_modify;
        if let Some(z) = zero_block {
            assert_eq!(map[z], BLOCK_FREE);
            map[z] = BLOCK_ZERO;
        }
    });
}

/// What the child should read as: parent, overlaid by the child's non-zero blocks,
/// with `zero_block` zeroed.
fn expected_child(parent_raw: &[u8], changes: &[u8], zero_block: Option<usize>) -> Vec<u8> {
    let mut want = parent_raw.to_vec();
    for (i, c) in changes.chunks(MIB as usize).enumerate() {
        let w = &mut want[i * MIB as usize..i * MIB as usize + c.len()];
        if c.iter().any(|&b| b != 0) {
            w.copy_from_slice(c);
        } else if Some(i) == zero_block {
            w.fill(0);
        }
    }
    want
}

#[test]
fn differencing_image_reads_as_parent_plus_changes() {
    let d = scratch();
    let size = 8 * MIB;
    let praw = d.path().join("parent.raw");
    make_raw(
        &praw,
        size,
        &[(0, 3 * MIB as usize, 1), (5 * MIB, 3 * MIB as usize, 2)],
    );
    let craw = d.path().join("changes.raw");
    make_raw(
        &craw,
        size,
        &[(MIB + 4096, 8192, 7), (6 * MIB, MIB as usize, 8)],
    );
    let parent = d.path().join("base.vdi");
    imgconv(&["convert", "-O", "vdi", s(&praw), s(&parent)]);
    let child = d.path().join("{0a1b2c3d-snap}.vdi");
    // Block 2 has parent data but is discarded in the child.
    make_child(&parent, &craw, &child, Some(2));
    let want = expected_child(
        &std::fs::read(&praw).unwrap(),
        &std::fs::read(&craw).unwrap(),
        Some(2),
    );
    // A decoy with another UUID in the same folder is not taken for the parent.
    imgconv(&[
        "convert",
        "-O",
        "vdi",
        s(&craw),
        s(&d.path().join("decoy.vdi")),
    ]);

    let out = d.path().join("merged.raw");
    imgconv(&["convert", "-O", "raw", s(&child), s(&out)]);
    assert!(
        std::fs::read(&out).unwrap() == want,
        "imgconv merge differs"
    );
    // dissect.hypervisor agrees, given the parent's contents.
    assert!(dissect_read(&child, Some(&praw)) == want, "dissect differs");

    // info names the parent's UUID without looking for it (as qemu-img's info opens no
    // backing file); --backing-chain finds it and shows both.
    let j = info_json(&child);
    let f = &j["format-details"]["data"];
    let (_, ph) = read_head(&parent);
    assert_eq!(f["image-type"], "differencing");
    assert_eq!(f["parent-uuid"], ph.uuid_create.to_string());
    assert_eq!(f["parent-modification-uuid"], ph.uuid_modify.to_string());
    assert_eq!(j["references"][0]["name"], ph.uuid_create.to_string());
    let chain: serde_json::Value = serde_json::from_str(&imgconv(&[
        "info",
        "--backing-chain",
        "--output=json",
        s(&child),
    ]))
    .unwrap();
    assert_eq!(chain.as_array().unwrap().len(), 2);
    assert!(chain[0]["backing-filename"]
        .as_str()
        .unwrap()
        .ends_with("base.vdi"));

    // The map tells which layer holds what.
    let img = imgconv::open(&child, &OpenOptions::default()).unwrap();
    let dev = img.device();
    let e = dev.map(0, size).unwrap();
    assert_eq!(
        (e.kind, e.depth, e.len),
        (imgconv::ExtentKind::Data, 1, MIB)
    );
    let e = dev.map(MIB, size).unwrap();
    assert_eq!(
        (e.kind, e.depth, e.len),
        (imgconv::ExtentKind::Data, 0, MIB)
    );
    let e = dev.map(2 * MIB, size).unwrap();
    assert_eq!(
        (e.kind, e.depth, e.len),
        (imgconv::ExtentKind::Zero, 0, MIB)
    );
    let e = dev.map(3 * MIB, size).unwrap();
    assert_eq!((e.kind, e.depth), (imgconv::ExtentKind::Unallocated, 1));

    // A VDI converted from the child is a flat image with the merged contents.
    let flat = d.path().join("flat.vdi");
    imgconv(&["convert", "-O", "vdi", s(&child), s(&flat)]);
    assert_same(&out, &flat);

    // Untrusted: the parent reference is refused, naming the UUID; info still works.
    let e = imgconv::open(&child, &OpenOptions::untrusted()).unwrap_err();
    match &e {
        Error::UntrustedReference { reference, .. } => {
            assert_eq!(reference, &ph.uuid_create.to_string())
        }
        other => panic!("expected UntrustedReference, got {other:?}"),
    }
    let o = imgconv_out(&["convert", "--untrusted", "-O", "raw", s(&child), s(&out)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains(&ph.uuid_create.to_string()));
    let human = imgconv(&["info", "--untrusted", "--details", s(&child)]);
    assert!(human.contains(&ph.uuid_create.to_string()), "{human}");

    // Given explicitly (here under a name that would not be searched).
    let hidden = d.path().join("parent.image");
    std::fs::rename(&parent, &hidden).unwrap();
    assert!(
        imgconv::open(&child, &OpenOptions::default()).is_err(),
        "parent gone"
    );
    let img = imgconv::open(&child, &OpenOptions::default().parent("parent.image")).unwrap();
    let mut all = vec![0u8; size as usize];
    img.device().read_at(&mut all, 0).unwrap();
    assert!(all == want);
    // A wrong explicit parent (UUID mismatch) is refused.
    let wrong = imgconv::open(&child, &OpenOptions::default().parent("decoy.vdi"));
    assert!(
        matches!(wrong, Err(Error::BackingChain { .. })),
        "{wrong:?}"
    );
    let refused = imgconv::open(&child, &OpenOptions::untrusted().parent("parent.image"));
    assert!(matches!(refused, Err(Error::UntrustedReference { .. })));
}

#[test]
fn snapshot_in_virtualbox_snapshots_folder_finds_parent_above() {
    let d = scratch();
    let size = 4 * MIB;
    let praw = d.path().join("p.raw");
    make_raw(&praw, size, &[(0, 4 * MIB as usize, 3)]);
    let craw = d.path().join("c.raw");
    make_raw(&craw, size, &[(2 * MIB, 4096, 5)]);
    let vm = d.path().join("VM");
    let snaps = vm.join("Snapshots");
    std::fs::create_dir_all(&snaps).unwrap();
    let parent = vm.join("disk.vdi");
    imgconv(&["convert", "-O", "vdi", s(&praw), s(&parent)]);
    let child = snaps.join("{11111111-2222-4333-8444-555555555555}.vdi");
    make_child(&parent, &craw, &child, None);
    let want = expected_child(
        &std::fs::read(&praw).unwrap(),
        &std::fs::read(&craw).unwrap(),
        None,
    );
    let out = d.path().join("out.raw");
    imgconv(&["convert", "-O", "raw", s(&child), s(&out)]);
    assert!(std::fs::read(&out).unwrap() == want);

    // A grandchild of the snapshot, in the same folder: a chain of three.
    let g_raw = d.path().join("g.raw");
    make_raw(&g_raw, size, &[(3 * MIB, 512, 6)]);
    let grand = snaps.join("{22222222-2222-4333-8444-555555555555}.vdi");
    make_child(&child, &g_raw, &grand, None);
    let want2 = expected_child(&want, &std::fs::read(&g_raw).unwrap(), None);
    imgconv(&["convert", "-O", "raw", s(&grand), s(&out)]);
    assert!(std::fs::read(&out).unwrap() == want2);

    // A child whose parent is itself (loop) is refused, not followed forever.
    let selfie = d.path().join("self.vdi");
    imgconv(&["convert", "-O", "vdi", s(&craw), s(&selfie)]);
    let (_, sh) = read_head(&selfie);
    patch(&selfie, |h, _| {
        h.image_type = 4;
        h.uuid_linkage = sh.uuid_create;
    });
    assert!(imgconv::open(&selfie, &OpenOptions::default()).is_err());
}

#[test]
fn zero_marked_blocks_and_block_extra_are_read_right() {
    let d = scratch();
    // qemu-img reads 0xFFFFFFFE entries as zeros too: it is the oracle here.
    let raw = d.path().join("src.raw");
    make_raw(&raw, 4 * MIB, &[(0, 4 * MIB as usize, 1)]);
    let v = d.path().join("z.vdi");
    imgconv(&["convert", "-O", "vdi", s(&raw), s(&v)]);
    patch(&v, |_, map| map[1] = BLOCK_ZERO);
    let want = d.path().join("want.raw");
    make_raw(&want, 4 * MIB, &[(0, 4 * MIB as usize, 1)]);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&want).unwrap();
        f.write_all_at(&vec![0u8; MIB as usize], MIB).unwrap();
    }
    assert_same(&v, &want);
    check_to_raw(&v, d.path());

    // Hand-made: 4 KiB blocks with 512 extra bytes each (no tool here writes these).
    let bs = 4096u32;
    let extra = 512u32;
    let mut h = imgconv::format::vdi::writer::new_header(
        3 * bs as u64,
        &imgconv::format::vdi::writer::VdiOptions {
            fixed: false,
            uuid: None,
            block_size: bs,
        },
    )
    .unwrap();
    h.block_extra = extra;
    h.blocks_offset = 0x200;
    h.data_offset = 0x400;
    h.blocks_allocated = 2;
    let map = [1u32, BLOCK_FREE, 0];
    let stride = (bs + extra) as usize;
    let mut file = vec![0u8; 0x400 + 2 * stride];
    PreHeader::new("<<< hand made >>>\n").serialize(&mut file);
    h.serialize(&mut file);
    file[0x200..0x20C].copy_from_slice(&serialize_block_map(&map));
    for (phys, byte) in [(0usize, 0xAAu8), (1, 0xBB)] {
        let at = 0x400 + phys * stride;
        file[at..at + extra as usize].fill(0xEE); // extra bytes are not guest data
        file[at + extra as usize..at + stride].fill(byte);
    }
    let p = d.path().join("extra.vdi");
    std::fs::write(&p, &file).unwrap();
    let img = imgconv::open(&p, &OpenOptions::default()).unwrap();
    let mut all = vec![0u8; 3 * bs as usize];
    img.device().read_at(&mut all, 0).unwrap();
    assert!(all[..4096].iter().all(|&b| b == 0xBB));
    assert!(all[4096..8192].iter().all(|&b| b == 0));
    assert!(all[8192..].iter().all(|&b| b == 0xAA));
    // A read spanning blocks.
    let mut mid = vec![0u8; 5000];
    img.device().read_at(&mut mid, 4000).unwrap();
    assert!(mid[..96].iter().all(|&b| b == 0xBB) && mid[96..4192].iter().all(|&b| b == 0));
    assert!(mid[4192..].iter().all(|&b| b == 0xAA));
}

/// A small valid image to break: 4 MiB, blocks 0, 1 and 3 allocated.
fn victim(d: &Path) -> PathBuf {
    let raw = d.join("v.raw");
    make_raw(
        &raw,
        4 * MIB,
        &[(0, 2 * MIB as usize, 1), (3 * MIB, 4096, 2)],
    );
    let v = d.join("victim.vdi");
    imgconv(&["convert", "-O", "vdi", s(&raw), s(&v)]);
    v
}

fn expect_typed_error(p: &Path, what: &str) {
    let t = Instant::now();
    // The format is named: without it, a file that lost its signature is just raw.
    let r =
        imgconv::open(p, &OpenOptions::default().format(imgconv::Format::Vdi)).and_then(|img| {
            let mut b = vec![0u8; img.size().min(8 * MIB) as usize];
            img.device().read_at(&mut b, 0).map(|_| ())
        });
    if let Err(e) = &r {
        eprintln!("{what}: {e}");
    }
    match r {
        Err(Error::Corrupt { format, .. }) => assert_eq!(format, "vdi", "{what}"),
        Err(Error::TooLarge { .. } | Error::Unsupported { .. }) => {}
        other => panic!("{what}: expected a typed error, got {other:?}"),
    }
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "{what}: took {:?}",
        t.elapsed()
    );
    let o = imgconv_out(&["info", "-f", "vdi", s(p)]);
    assert_eq!(o.status.code(), Some(1), "{what}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{what}: {err}");
}

/// Writes a broken variant of the victim to the given path.
type Breaker<'a> = Box<dyn Fn(&Path) + 'a>;

#[test]
fn malformed_inputs_give_typed_errors() {
    let d = scratch();
    let v = victim(d.path());
    let good = std::fs::read(&v).unwrap();
    let p = d.path().join("bad.vdi");
    // A breaker writing the good image with its header and block map edited.
    let edited = |edit: fn(&mut Header, &mut Vec<u32>)| -> Breaker {
        let good = &good;
        Box::new(move |p| {
            std::fs::write(p, good).unwrap();
            patch(p, edit)
        })
    };
    let cases: Vec<(&str, Breaker)> = vec![
        (
            "truncated pre-header",
            Box::new(|p| std::fs::write(p, &good[..50]).unwrap()),
        ),
        (
            "truncated header",
            Box::new(|p| std::fs::write(p, &good[..0x100]).unwrap()),
        ),
        (
            "truncated block map",
            Box::new(|p| std::fs::write(p, &good[..MIB as usize + 6]).unwrap()),
        ),
        (
            "truncated data",
            Box::new(|p| std::fs::write(p, &good[..good.len() - 5000]).unwrap()),
        ),
        (
            "bad signature",
            Box::new(|p| {
                let mut b = good.clone();
                b[0x40] = 0;
                std::fs::write(p, b).unwrap()
            }),
        ),
        (
            "version 2.1",
            Box::new(|p| {
                let mut b = good.clone();
                b[0x46] = 2;
                std::fs::write(p, b).unwrap()
            }),
        ),
        (
            "block map past EOF",
            edited(|h, _| {
                h.blocks_offset = 0x7000_0000;
                h.data_offset = 0x7100_0000;
            }),
        ),
        ("duplicate block map entries", edited(|_, m| m[3] = m[0])),
        ("block map entry out of range", edited(|_, m| m[3] = 1000)),
        (
            "block size not a power of two",
            edited(|h, _| h.block_size = 3 << 19),
        ),
        (
            "huge block count",
            edited(|h, _| {
                h.blocks = 0xFFFF_FFF0;
                h.disk_size = 0xFFFF_FFF0u64 << 20;
                h.data_offset = u32::MAX;
            }),
        ),
        ("huge disk size", edited(|h, _| h.disk_size = u64::MAX)),
        ("zero disk size", edited(|h, _| h.disk_size = 0)),
        ("null UUID", edited(|h, _| h.uuid_create = Uuid::NULL)),
        (
            "null modification UUID",
            edited(|h, _| h.uuid_modify = Uuid::NULL),
        ),
        ("unknown type", edited(|h, _| h.image_type = 9)),
        ("unknown flags", edited(|h, _| h.flags = 0x100)),
        (
            "data offset inside the block map",
            edited(|h, _| h.data_offset = h.blocks_offset + 4),
        ),
        (
            "header size too small",
            edited(|h, _| h.header_size = 0x100),
        ),
        (
            "block extra not a power of two",
            edited(|h, _| h.block_extra = 3),
        ),
        (
            "LCHS sector size",
            edited(|h, _| h.lchs.as_mut().unwrap().sector_size = 4096),
        ),
        (
            "more blocks allocated than exist",
            edited(|h, _| h.blocks_allocated = 5),
        ),
        (
            "too few blocks for the disk",
            edited(|h, _| h.disk_size = 5 * MIB),
        ),
        (
            "differencing image without parent UUID",
            edited(|h, _| h.image_type = 4),
        ),
    ];
    for (what, make) in cases {
        make(&p);
        expect_typed_error(&p, what);
    }
    // A differencing image whose parent is nowhere: an error naming the UUID.
    std::fs::write(&p, &good).unwrap();
    let u = Uuid::random();
    patch(&p, |h, _| {
        h.image_type = 4;
        h.uuid_linkage = u;
    });
    let e = imgconv::open(&p, &OpenOptions::default()).unwrap_err();
    assert!(e.to_string().contains(&u.to_string()), "{e}");
}

#[test]
fn empty_and_oversized_targets_are_refused() {
    let d = scratch();
    let empty = d.path().join("empty.raw");
    std::fs::write(&empty, b"").unwrap();
    assert_convert_refused("vdi", "", &empty, &d.path().join("e.vdi"));
    // A huge sparse disk is fine: only its block map is written (64 TiB = 64 Mi blocks
    // would be 256 MiB of map; 1 TiB is 4 MiB of map).
    let big = d.path().join("big.raw");
    make_raw(&big, 1 << 40, &[(1 << 39, 4096, 7)]);
    let v = d.path().join("big.vdi");
    let t = Instant::now();
    imgconv(&["convert", "-O", "vdi", s(&big), s(&v)]);
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    let (_, h) = read_head(&v);
    assert_eq!((h.blocks, h.blocks_allocated), (1 << 20, 1));
    assert_eq!(std::fs::metadata(&v).unwrap().len(), MIB + 4 * MIB + MIB);
    assert_qemu_check_clean(&v);
}

#[test]
fn qcow2_sources_written_as_vdi_are_identical() {
    let d = scratch();
    let raw = d.path().join("src.raw");
    sample_raw(&raw, 12 * MIB);
    for (name, compressed) in [("plain.qcow2", false), ("compressed.qcow2", true)] {
        let q = d.path().join(name);
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        if compressed {
            args.push("-c");
        }
        args.extend([s(&raw), s(&q)]);
        qemu_img(&args);
        for opts in [None, Some("static=on")] {
            let v = d.path().join(format!("{name}-{}.vdi", opts.is_some()));
            write_vdi(&q, &v, opts);
        }
    }
}

#[test]
fn vmdk_sources_written_as_vdi_are_identical() {
    let d = scratch();
    let raw = d.path().join("src.raw");
    sample_raw(&raw, 12 * MIB);
    for sub in [
        "monolithicSparse",
        "streamOptimized",
        "monolithicFlat",
        "twoGbMaxExtentSparse",
    ] {
        let m = d.path().join(format!("{sub}.vmdk"));
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            &format!("subformat={sub}"),
            s(&raw),
            s(&m),
        ]);
        for opts in [None, Some("static=on")] {
            let v = d.path().join(format!("{sub}-{}.vdi", opts.is_some()));
            write_vdi(&m, &v, opts);
        }
    }
}

mod prop {
    use super::*;
    use imgconv::convert::{convert_to, ConvertOptions};
    use imgconv::device::MemDevice;
    use imgconv::io::OutputSet;
    use imgconv::Format;
    use proptest::prelude::*;

    /// A disk of `size` bytes from `(block index, byte)` fills at 4 KiB granularity.
    fn disk(size: usize, fills: &[(usize, u8)]) -> Vec<u8> {
        let mut v = vec![0u8; size];
        for &(i, b) in fills {
            let s = (i * 4096) % size.max(1);
            let e = (s + 4096).min(size);
            for (k, x) in v[s..e].iter_mut().enumerate() {
                *x = b.wrapping_add(k as u8);
            }
        }
        v
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
        #[test]
        fn round_trip(
            size in 1usize..400_000,
            fills in proptest::collection::vec((0usize..100, any::<u8>()), 0..12),
            block_shift in 12u32..17,
            fixed in any::<bool>(),
        ) {
            let data = disk(size, &fills);
            let d = scratch();
            let out = d.path().join("p.vdi");
            let mut opts = ConvertOptions::new(Format::Vdi)
                .option("cluster_size", &(1u64 << block_shift).to_string())
                .threads(1);
            if fixed {
                opts = opts.option("static", "on");
            }
            let src = MemDevice::new(data.clone());
            convert_to(&src, &out, OutputSet::new(), &opts).unwrap();
            let img = imgconv::open(&out, &OpenOptions::default()).unwrap();
            let padded = size.div_ceil(512) * 512;
            prop_assert_eq!(img.size(), padded as u64);
            let mut back = vec![0u8; padded];
            img.device().read_at(&mut back, 0).unwrap();
            prop_assert!(back[..size] == data[..]);
            prop_assert!(back[size..].iter().all(|&b| b == 0));
            // Every allocated block holds data (dynamic images skip zero blocks).
            let (_, h) = read_head(&out);
            if !fixed {
                let bs = 1usize << block_shift;
                let nonzero = back.chunks(bs).filter(|c| c.iter().any(|&b| b != 0)).count();
                prop_assert_eq!(h.blocks_allocated as usize, nonzero);
            }
        }
    }
}

#[test]
fn blank_images_come_from_the_zero_device() {
    // What `imgconv create -f vdi` does: convert a zero device.
    use imgconv::convert::{convert_to, ConvertOptions};
    use imgconv::device::ZeroDevice;
    use imgconv::io::OutputSet;
    let d = scratch();
    for (name, fixed) in [("blank.vdi", false), ("blank-fixed.vdi", true)] {
        let p = d.path().join(name);
        let mut o = ConvertOptions::new(imgconv::Format::Vdi);
        if fixed {
            o = o.option("static", "on");
        }
        convert_to(&ZeroDevice::new(64 * MIB), &p, OutputSet::new(), &o).unwrap();
        assert_qemu_check_clean(&p);
        let q = qemu_info(&p);
        assert_eq!(q["virtual-size"], 64 * MIB);
        let (_, h) = read_head(&p);
        assert_eq!(h.blocks_allocated, if fixed { 64 } else { 0 });
        let len = std::fs::metadata(&p).unwrap().len();
        assert_eq!(len, 2 * MIB + if fixed { 64 * MIB } else { 0 });
        let zero = d.path().join("zero.raw");
        make_raw(&zero, 64 * MIB, &[]);
        assert_same(&zero, &p);
    }
}

#[test]
fn vdi_snapshot_of_a_vmdk_base_opens_with_the_parent_given() {
    let d = scratch();
    let size = 4 * MIB;
    let praw = d.path().join("p.raw");
    make_raw(&praw, size, &[(0, 4 * MIB as usize, 3)]);
    let base = d.path().join("base.vmdk");
    qemu_img(&["convert", "-f", "raw", "-O", "vmdk", s(&praw), s(&base)]);
    let craw = d.path().join("c.raw");
    make_raw(&craw, size, &[(MIB, 8192, 5)]);
    let child = d.path().join("snap.vdi");
    imgconv(&["convert", "-O", "vdi", s(&craw), s(&child)]);
    patch(&child, |h, _| {
        h.image_type = 4;
        h.uuid_linkage = Uuid::random();
    });
    // Not found by searching (the base is no VDI) ...
    assert!(imgconv::open(&child, &OpenOptions::default()).is_err());
    // ... but opened on the parent the caller names.
    let img = imgconv::open(&child, &OpenOptions::default().parent("base.vmdk")).unwrap();
    assert_eq!(img.info().backing_filename_format.as_deref(), Some("vmdk"));
    let mut all = vec![0u8; size as usize];
    img.device().read_at(&mut all, 0).unwrap();
    let want = expected_child(
        &std::fs::read(&praw).unwrap(),
        &std::fs::read(&craw).unwrap(),
        None,
    );
    assert!(all == want);
}
