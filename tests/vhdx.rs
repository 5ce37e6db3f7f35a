//! VHDX: reading qemu-img's images of every variant and the corpus (Hyper-V, Disk2VHD,
//! FreeBSD mkimg, QEMU's dirty log, dissect's samples) as qemu-img reads them;
//! differencing images over each kind of parent (made here: qemu-img cannot) read as
//! libvhdi and dissect.hypervisor read them; dirty logs replayed in memory as the spec
//! says; our outputs read identically by qemu-img, libvhdi and dissect.hypervisor.

mod common;
use common::vhdx::*;
use common::*;

use std::path::{Path, PathBuf};

use imgconv::format::vhdx::header::{Guid, MIB as MIB_U64};
use imgconv::{BlockDevice, ExtentKind, OpenOptions};
use proptest::prelude::*;

const MIB: u64 = MIB_U64;

/// A raw disk with data, holes, a written-zero stretch and data at its very end.
fn sample_raw(path: &Path, size: u64) {
    make_raw(
        path,
        size,
        &[
            (0, 5000, 1),
            (3 * MIB + 4096, 70000, 2),
            (9 * MIB - 512, 1024, 3),
            (size - 1000, 1000, 4),
        ],
    );
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&vec![0u8; 2 * MIB as usize], 12 * MIB)
        .unwrap();
}

fn info_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&imgconv(&["info", "--output=json", s(p)])).unwrap()
}

/// imgconv's reading of `img` (whole virtual disk).
fn read_all(img: &Path) -> Vec<u8> {
    let i = imgconv::open(img, &OpenOptions::trusted()).unwrap();
    let mut b = vec![0u8; i.size() as usize];
    i.device().read_at(&mut b, 0).unwrap();
    b
}

/// `info`'s fields that qemu-img also prints, equal to qemu-img's.
fn assert_info_like_qemu(img: &Path) {
    let ours = info_json(img);
    let q = qemu_info(img);
    for k in [
        "virtual-size",
        "cluster-size",
        "format",
        "actual-size",
        "dirty-flag",
    ] {
        assert_eq!(ours[k], q[k], "{}: {k}", img.display());
    }
}

/// imgconv's check exit code and output.
fn check_code(img: &Path) -> (Option<i32>, String) {
    let o = imgconv_out(&["check", s(img)]);
    (
        o.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[test]
fn qemu_made_images_of_every_variant_read_identical() {
    let d = scratch();
    let raw = d.path().join("src.raw");
    let size = 37 * MIB + 3 * 512;
    sample_raw(&raw, size);
    for (name, opts) in [
        ("dyn.vhdx", ""),
        ("fixed.vhdx", "subformat=fixed"),
        ("fixed-nozero.vhdx", "subformat=fixed,block_state_zero=off"),
        ("b1.vhdx", "block_size=1M"),
        ("b32.vhdx", "block_size=32M,block_state_zero=off"),
        ("b256.vhdx", "block_size=256M"),
        ("log4.vhdx", "log_size=4M,block_size=2M"),
    ] {
        let v = d.path().join(name);
        qemu_convert("vhdx", opts, &raw, &v);
        check_to_raw(&v, d.path());
        assert_same_fmt(
            &raw,
            "raw",
            &d.path().join(format!("{name}.out.raw")),
            "raw",
        );
        assert_info_like_qemu(&v);
        let (code, out) = check_code(&v);
        assert_eq!(code, Some(0), "{name}: {out}");
        // The map stays sparse: the holes of the source are not data.
        let img = imgconv::open(&v, &OpenOptions::trusted()).unwrap();
        let e = img.device().map(20 * MIB, 4096).unwrap();
        assert!(e.kind.reads_as_zero(), "{name}: {e:?}");
    }
}

#[test]
fn our_outputs_read_identically_by_qemu_libvhdi_and_dissect() {
    let d = scratch();
    let raw = d.path().join("src.raw");
    let size = 37 * MIB + 4096;
    sample_raw(&raw, size);
    let content = std::fs::read(&raw).unwrap();
    for (name, opts, block) in [
        ("dyn.vhdx", "", 8 * MIB),
        ("fixed.vhdx", "subformat=fixed", 8 * MIB),
        ("b1.vhdx", "block_size=1M,block_state_zero=off", MIB),
        ("b32.vhdx", "block_size=32M", 32 * MIB),
        ("b256f.vhdx", "block_size=256M,subformat=fixed", 256 * MIB),
        ("log3.vhdx", "log_size=3M,block_size=4M", 4 * MIB),
    ] {
        let v = d.path().join(name);
        imgconv_convert("vhdx", opts, &raw, &v);
        assert_same_fmt(&raw, "raw", &v, "vhdx");
        assert_qemu_check_clean(&v);
        let q = qemu_info(&v);
        assert_eq!(q["virtual-size"], size, "{name}");
        assert_eq!(q["cluster-size"], block, "{name}");
        assert_info_like_qemu(&v);
        assert_eq!(vhdiinfo_media_size(&v), size, "{name}");
        assert!(libvhdi_read(&v, &[]) == content, "{name}: libvhdi differs");
        assert!(dissect_read(&v) == content, "{name}: dissect differs");
        // Only blocks holding data were allocated in a dynamic image.
        if !opts.contains("fixed") {
            let len = std::fs::metadata(&v).unwrap().len();
            assert!(len < 16 * MIB + 3 * block, "{name}: {len} bytes");
        }
    }
}

#[test]
fn four_kib_sector_images_read_identically_by_libvhdi_and_dissect() {
    let d = scratch();
    let raw = d.path().join("src.raw");
    let size = 21 * MIB + 8192;
    sample_raw(&raw, size);
    let content = std::fs::read(&raw).unwrap();
    for opts in [
        "logical_sector_size=4096",
        "logical_sector_size=4096,block_size=1M,subformat=fixed",
        "logical_sector_size=4096,block_size=256M",
    ] {
        let v = d.path().join("4k.vhdx");
        imgconv_convert("vhdx", opts, &raw, &v);
        let j = info_json(&v);
        assert_eq!(j["virtual-size"], size);
        assert_eq!(j["format-details"]["data"]["logical-sector-size"], 4096);
        assert_eq!(vhdiinfo_media_size(&v), size);
        assert!(libvhdi_read(&v, &[]) == content, "{opts}: libvhdi differs");
        assert!(dissect_read(&v) == content, "{opts}: dissect differs");
        assert!(read_all(&v) == content, "{opts}: imgconv differs");
        assert_eq!(check_code(&v).0, Some(0));
        // QEMU 10 refuses 4 KiB logical sectors ("Operation not supported").
        let o = run("qemu-img", &["info", s(&v)]);
        assert!(!o.status.success());
    }
}

/// A parent made by `qemu-img convert` (or by imgconv for 4 KiB sectors) from a raw
/// disk, and its contents.
fn make_parent(dir: &Path, name: &str, opts: &str, size: u64, ours: bool) -> (PathBuf, Vec<u8>) {
    let raw = dir.join(format!("{name}.raw"));
    make_raw(
        &raw,
        size,
        &[
            (0, 3 * MIB as usize, 0x10),
            (5 * MIB, 2 * MIB as usize, 0x20),
        ],
    );
    let p = dir.join(name);
    if ours {
        imgconv_convert("vhdx", opts, &raw, &p);
    } else {
        qemu_convert("vhdx", opts, &raw, &p);
    }
    (p, std::fs::read(&raw).unwrap())
}

#[test]
fn differencing_images_over_each_kind_of_parent() {
    let d = scratch();
    let size = 12 * MIB;
    for (parent_name, popts, ours, bs, lss) in [
        ("qdyn.vhdx", "block_size=1M", false, MIB, 512),
        ("qfixed.vhdx", "subformat=fixed", false, 2 * MIB, 512),
        (
            "ours4k.vhdx",
            "logical_sector_size=4096,block_size=2M",
            true,
            2 * MIB,
            4096,
        ),
        (
            "ours.vhdx",
            "block_size=8M,block_state_zero=off",
            true,
            MIB,
            512,
        ),
    ] {
        let (parent, mut expected) = make_parent(d.path(), parent_name, popts, size, ours);
        let spb = bs / lss;
        let child = d.path().join(format!("child-{parent_name}"));
        let (rel, abs) = (
            format!(".\\{parent_name}"),
            format!("C:\\Hyper-V\\{parent_name}"),
        );
        let spec = ChildSpec {
            size,
            block_size: bs,
            lss,
            linkage: data_write_guid(&parent),
            relative_path: Some(&rel),
            absolute_path: Some(&abs),
            blocks: vec![
                (
                    0,
                    ChildBlock::Partial(7, vec![(0, 1), (3, 2), (spb - 1, 1)]),
                ),
                (1, ChildBlock::Full(9)),
                (2, ChildBlock::Zero),
                (4, ChildBlock::Unmapped),
                (5, ChildBlock::Partial(11, vec![(1, spb - 2)])),
            ],
        };
        make_child(&child, &spec, &mut expected);
        assert!(
            read_all(&child) == expected,
            "{parent_name}: imgconv differs"
        );
        // libvhdi reads ZERO and UNMAPPED blocks of a differencing image from the parent
        // (the spec: ZERO blocks MUST read as zeros; dissect and imgconv do so).
        let mut lv = libvhdi_read(&child, &[&parent]);
        for b in [2, 4] {
            let r = (b * bs) as usize..((b + 1) * bs) as usize;
            lv[r.clone()].copy_from_slice(&expected[r]);
        }
        assert!(lv == expected, "{parent_name}: libvhdi differs");
        assert!(
            dissect_read(&child) == expected,
            "{parent_name}: dissect differs"
        );
        // Converted to raw, and compared by qemu-img with the expected disk.
        let out = d.path().join("child.raw");
        imgconv(&["convert", "-O", "raw", s(&child), s(&out)]);
        assert!(std::fs::read(&out).unwrap() == expected);
        // And to a dynamic VHDX, which qemu-img reads.
        let flat = d.path().join("flat.vhdx");
        imgconv(&["convert", "-O", "vhdx", s(&child), s(&flat)]);
        assert_same_fmt(&out, "raw", &flat, "vhdx");

        let j = info_json(&child);
        assert_eq!(j["backing-filename"], format!(".\\{parent_name}"));
        assert_eq!(j["format-details"]["data"]["subformat"], "differencing");
        assert_eq!(j["references"][0]["field"], "parent locator relative_path");
        // The map tells the child's blocks from the parent's.
        let img = imgconv::open(&child, &OpenOptions::trusted()).unwrap();
        let e = img.device().map(bs, bs).unwrap();
        assert_eq!((e.kind, e.depth), (ExtentKind::Data, 0));
        let e = img.device().map(2 * bs, bs).unwrap();
        assert_eq!((e.kind, e.depth), (ExtentKind::Zero, 0));
        let e = img.device().map(3 * bs, bs).unwrap();
        assert_eq!(e.depth, 1, "{parent_name}: {e:?}");
        let e = img.device().map(lss, 10 * lss).unwrap();
        assert_eq!((e.len, e.depth), (2 * lss, 1), "{parent_name}: {e:?}");
    }
}

#[test]
fn differencing_chains_untrusted_refusal_and_bad_links() {
    let d = scratch();
    let size = 6 * MIB;
    let (parent, mut expected) = make_parent(d.path(), "base.vhdx", "block_size=1M", size, false);
    let mid = d.path().join("mid.avhdx");
    let mid_guid = make_child(
        &mid,
        &ChildSpec {
            size,
            block_size: MIB,
            lss: 512,
            linkage: data_write_guid(&parent),
            relative_path: Some(".\\base.vhdx"),
            absolute_path: None,
            blocks: vec![
                (1, ChildBlock::Full(3)),
                (4, ChildBlock::Partial(5, vec![(8, 8)])),
            ],
        },
        &mut expected,
    );
    let mid_expected = expected.clone();
    // The grandchild names its parent only by an absolute Windows path: found by file
    // name in its own folder.
    let top = d.path().join("top.avhdx");
    make_child(
        &top,
        &ChildSpec {
            size,
            block_size: 2 * MIB,
            lss: 512,
            linkage: mid_guid,
            relative_path: None,
            absolute_path: Some("\\\\?\\D:\\vms\\mid.avhdx"),
            blocks: vec![(2, ChildBlock::Partial(8, vec![(100, 3000)]))],
        },
        &mut expected,
    );
    assert!(read_all(&top) == expected);
    assert!(libvhdi_read(&top, &[&mid, &parent]) == expected);
    let chain = imgconv(&["info", "--backing-chain", s(&top)]);
    let images = chain.lines().filter(|l| l.starts_with("file format: vhdx"));
    assert_eq!(images.count(), 3, "{chain}");

    // --untrusted refuses the parent, naming the locator entry; info lists it.
    let o = imgconv_out(&[
        "convert",
        "--untrusted",
        "-O",
        "raw",
        s(&mid),
        s(&d.path().join("x.raw")),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("parent locator relative_path") && err.contains("base.vhdx"),
        "{err}"
    );
    let j: serde_json::Value =
        serde_json::from_str(&imgconv(&["info", "--untrusted", "--output=json", s(&mid)])).unwrap();
    assert_eq!(j["references"][0]["name"], ".\\base.vhdx");

    // A parent whose data write GUID is not the child's linkage is refused.
    let wrong = d.path().join("wrong.avhdx");
    make_child(
        &wrong,
        &ChildSpec {
            size,
            block_size: MIB,
            lss: 512,
            linkage: Guid::random(),
            relative_path: Some("base.vhdx"),
            absolute_path: None,
            blocks: vec![],
        },
        &mut vec![],
    );
    // Plain info opens no parent (as qemu-img's); the chain is followed on request.
    let o = imgconv_out(&["info", "--backing-chain", s(&wrong)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("parent linkage"));

    // A missing parent: the error names it.
    let orphan = d.path().join("orphan.avhdx");
    make_child(
        &orphan,
        &ChildSpec {
            size,
            block_size: MIB,
            lss: 512,
            linkage: Guid::random(),
            relative_path: Some("..\\gone\\parent.vhdx"),
            absolute_path: None,
            blocks: vec![],
        },
        &mut vec![],
    );
    let o = imgconv_out(&[
        "convert",
        "-O",
        "raw",
        s(&orphan),
        s(&d.path().join("y.raw")),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("..\\\\gone\\\\parent.vhdx"));
    assert!(!d.path().join("y.raw").exists());

    // The library can be given the parent explicitly (a parent that moved).
    let moved = d.path().join("moved.vhdx");
    std::fs::copy(&parent, &moved).unwrap();
    std::fs::remove_file(&parent).unwrap();
    assert!(imgconv::open(&mid, &OpenOptions::trusted()).is_err());
    assert!(read_all_with_parent(&mid, "moved.vhdx") == mid_expected);
}

fn read_all_with_parent(img: &Path, parent: &str) -> Vec<u8> {
    let i = imgconv::open(img, &OpenOptions::trusted().parent(parent)).unwrap();
    let mut b = vec![0u8; i.size() as usize];
    i.device().read_at(&mut b, 0).unwrap();
    b
}

#[test]
fn corpus_images_read_as_qemu_reads_them() {
    let Some(c) = corpus_dir() else { return };
    let d = scratch();
    for (rel, size, block) in [
        (
            "qemu-iotests/iotest-dynamic-1G.vhdx.bz2",
            1u64 << 30,
            32 * MIB,
        ),
        ("qemu-iotests/test-disk2vhd.vhdx.bz2", 256 * MIB, 2 * MIB),
        (
            "dissect-hypervisor/vhdx/dynamic.vhdx.gz",
            10 * MIB,
            32 * MIB,
        ),
        ("dissect-hypervisor/vhdx/fixed.vhdx.gz", 10 * MIB, 2 * MIB),
        ("freebsd-mkimg/img-1x1-512-mbr.vhdx.xz", 16 * MIB, 16 * MIB),
    ] {
        let name = rel.rsplit('/').next().unwrap();
        let name = name
            .trim_end_matches(".bz2")
            .trim_end_matches(".gz")
            .trim_end_matches(".xz");
        let v = corpus_file(&c, rel, d.path(), name);
        check_to_raw(&v, d.path());
        assert_info_like_qemu(&v);
        let j = info_json(&v);
        assert_eq!(
            (j["virtual-size"].as_u64(), j["cluster-size"].as_u64()),
            (Some(size), Some(block)),
            "{rel}"
        );
        assert_eq!(check_code(&v).0, Some(0), "{rel}");
    }
    // Hyper-V's 1 GiB image: the first 33 MiB are 0xa5 (iotest 064).
    let img = imgconv::open(
        d.path().join("iotest-dynamic-1G.vhdx"),
        &OpenOptions::trusted(),
    )
    .unwrap();
    let mut b = vec![0u8; 33 << 20];
    img.device().read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0xa5));
    // mkimg's image holds the same disk as its raw baseline.
    let raw = corpus_file(
        &c,
        "freebsd-mkimg/img-1x1-512-mbr.raw.xz",
        d.path(),
        "mkimg.raw",
    );
    let out = d.path().join("img-1x1-512-mbr.vhdx.out.raw");
    let (a, b) = (std::fs::read(&raw).unwrap(), std::fs::read(&out).unwrap());
    assert!(b[..a.len()] == a[..] && b[a.len()..].iter().all(|&x| x == 0));
}

#[test]
fn corpus_dirty_log_reads_as_qemu_reads_it_after_replaying() {
    let Some(c) = corpus_dir() else { return };
    let d = scratch();
    let v = corpus_file(
        &c,
        "qemu-iotests/iotest-dirtylog-10G-4M.vhdx.bz2",
        d.path(),
        "dirty.vhdx",
    );
    let before = std::fs::read(&v).unwrap();
    // qemu-img refuses it read-only; its replay on a copy is the reference.
    assert!(!run("qemu-img", &["info", s(&v)]).status.success());
    let copy = d.path().join("replayed.vhdx");
    std::fs::copy(&v, &copy).unwrap();
    qemu_img(&["check", "-r", "all", s(&copy)]);
    // qemu-img compare would read all 10 GiB (QEMU's VHDX driver reports no holes, ~80 s):
    // compare the first 64 MiB as qemu-img reads them, and beyond them check that the
    // replayed copy has no block present where imgconv's map sees none.
    let head = d.path().join("head.raw");
    qemu_img(&[
        "dd",
        "-f",
        "vhdx",
        "-O",
        "raw",
        "bs=1M",
        "count=64",
        &format!("if={}", s(&copy)),
        &format!("of={}", s(&head)),
    ]);
    let img = imgconv::open(&v, &OpenOptions::trusted()).unwrap();
    let mut ours = vec![0u8; 64 << 20];
    img.device().read_at(&mut ours, 0).unwrap();
    assert!(ours == std::fs::read(&head).unwrap());
    let replayed_bat = read_bat(&copy);
    for mib in 64..10 << 10 {
        let e = img.device().map(mib << 20, 1 << 20).unwrap();
        let state = replayed_bat[(mib + mib / 4096) as usize].state();
        assert_eq!(e.kind == ExtentKind::Data, state == 6, "MiB {mib}");
    }
    let out = d.path().join("dirty.raw");
    imgconv(&["convert", "-O", "raw", s(&v), s(&out)]);
    let mut converted = vec![0u8; 64 << 20];
    use std::io::Read;
    std::fs::File::open(&out)
        .unwrap()
        .read_exact(&mut converted)
        .unwrap();
    assert!(converted == ours);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 10 << 30);
    // The first 18 MiB are 0xa5 (iotest 070).
    assert!(ours[..18 << 20].iter().all(|&x| x == 0xa5));
    let j = info_json(&v);
    assert_eq!(j["virtual-size"], 10u64 << 30);
    assert_eq!(j["dirty-flag"], true);
    assert_eq!(j["format-details"]["data"]["log-entries-replayed"], 1);
    // check: the log needing replay is a corruption (qemu-img check -r all counts it as
    // one, repaired); the replayed copy is clean.
    let (code, text) = check_code(&v);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("must be replayed"), "{text}");
    assert_eq!(check_code(&copy).0, Some(0));
    // The source was never written.
    assert!(std::fs::read(&v).unwrap() == before);
}

#[test]
fn corpus_differencing_image_names_its_missing_parent() {
    let Some(c) = corpus_dir() else { return };
    let d = scratch();
    let v = corpus_file(
        &c,
        "dissect-hypervisor/vhdx/differencing.avhdx.gz",
        d.path(),
        "diff.avhdx",
    );
    let o = imgconv_out(&["convert", "-O", "raw", s(&v), s(&d.path().join("x.raw"))]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("Generation 1_49C4BAF3-4B25-4406-8C4B-D39E65C32385.avhdx"),
        "{err}"
    );
    // info --untrusted lists the parent without opening it.
    let j: serde_json::Value =
        serde_json::from_str(&imgconv(&["info", "--untrusted", "--output=json", s(&v)])).unwrap();
    assert_eq!(j["virtual-size"], 8u64 << 30);
    assert_eq!(j["format-details"]["data"]["subformat"], "differencing");
    assert_eq!(
        j["format-details"]["data"]["parent-linkage"],
        "{ff34003b-11ed-4cf8-a166-b2be05e20b80}"
    );
    assert_eq!(j["references"].as_array().unwrap().len(), 3);
    assert_eq!(check_code(&v).0, Some(0));
}

/// A fixed image with 1 MiB blocks and a 1 MiB log (empty), its data, and the file
/// offset of its first block.
fn log_base(dir: &Path) -> (PathBuf, Vec<u8>, u64) {
    let raw = dir.join("base.raw");
    make_raw(&raw, 4 * MIB, &[(0, 4 * MIB as usize, 0x30)]);
    let v = dir.join("logged.vhdx");
    imgconv_convert("vhdx", "subformat=fixed,block_size=1M", &raw, &v);
    let first = read_bat(&v)[0].offset();
    (v, std::fs::read(&raw).unwrap(), first)
}

fn sector(byte: u8) -> Vec<u8> {
    (0..4096).map(|i| byte ^ (i % 7) as u8).collect()
}

#[test]
fn dirty_logs_replay_as_the_spec_says() {
    let d = scratch();
    let guid = Guid::random();
    let entry = |pos: u64, seq: u64, tail: u64, descs: Vec<(u64, LogWrite)>| LogEntrySpec {
        pos,
        seq,
        tail,
        guid,
        descs,
        flushed: 0,
        last: 0,
        corrupt: false,
    };
    // One sequence of three entries writing over each other, a torn fourth entry and a
    // stale entry of an older log GUID.
    let (v, mut want, b0) = log_base(d.path());
    let x = b0 + 8192;
    let mut stale = entry(
        64 * 4096,
        99,
        64 * 4096,
        vec![(x, LogWrite::Data(sector(0xdd)))],
    );
    stale.guid = Guid::random();
    let mut torn = entry(6 * 4096, 13, 0, vec![(x, LogWrite::Data(sector(0xcc)))]);
    torn.corrupt = true;
    write_log(
        &v,
        guid,
        &[
            entry(
                0,
                10,
                0,
                vec![
                    (x, LogWrite::Data(sector(0xaa))),
                    (x + 4096, LogWrite::Data(sector(0xab))),
                ],
            ),
            entry(3 * 4096, 11, 0, vec![(x, LogWrite::Zero(8192))]),
            entry(4 * 4096, 12, 0, vec![(x, LogWrite::Data(sector(0xbb)))]),
            torn,
            stale,
        ],
    );
    want[8192..12288].copy_from_slice(&sector(0xbb));
    want[12288..16384].fill(0);
    assert!(read_all(&v) == want);
    assert_eq!(
        info_json(&v)["format-details"]["data"]["log-entries-replayed"],
        3
    );
    // qemu-img's replay of a copy agrees.
    let copy = d.path().join("copy.vhdx");
    std::fs::copy(&v, &copy).unwrap();
    qemu_img(&["check", "-r", "all", s(&copy)]);
    let out = d.path().join("out.raw");
    imgconv(&["convert", "-O", "raw", s(&v), s(&out)]);
    assert_same_fmt(&copy, "vhdx", &out, "raw");

    // A newer sequence elsewhere in the log wins; the older one is not replayed. Its
    // head's tail points past its first entry: that entry is not replayed either.
    let (v, mut want, b0) = log_base(d.path());
    write_log(
        &v,
        guid,
        &[
            entry(0, 40, 0, vec![(b0, LogWrite::Data(sector(0x11)))]),
            entry(
                100 * 4096,
                50,
                100 * 4096,
                vec![(b0 + 4096, LogWrite::Data(sector(0x22)))],
            ),
            entry(
                102 * 4096,
                51,
                102 * 4096,
                vec![(b0 + 8192, LogWrite::Data(sector(0x33)))],
            ),
        ],
    );
    want[8192..12288].copy_from_slice(&sector(0x33));
    assert!(read_all(&v) == want);

    // An entry wrapping around the end of the log.
    let (v, mut want, b0) = log_base(d.path());
    let pos = MIB - 4096;
    write_log(
        &v,
        guid,
        &[entry(
            pos,
            7,
            pos,
            vec![
                (b0 + MIB, LogWrite::Data(sector(0x44))),
                (b0 + MIB + 4096, LogWrite::Data(sector(0x55))),
                (b0 + 3 * MIB, LogWrite::Zero(MIB)),
            ],
        )],
    );
    want[MIB as usize..MIB as usize + 4096].copy_from_slice(&sector(0x44));
    want[MIB as usize + 4096..MIB as usize + 8192].copy_from_slice(&sector(0x55));
    want[3 * MIB as usize..].fill(0);
    assert!(read_all(&v) == want);

    // A log GUID with no valid sequence (entries all torn): nothing to replay, as QEMU.
    let (v, want, b0) = log_base(d.path());
    let mut t = entry(0, 3, 0, vec![(b0, LogWrite::Data(sector(0x66)))]);
    t.corrupt = true;
    write_log(&v, guid, &[t]);
    assert!(read_all(&v) == want);
    assert_eq!(info_json(&v)["dirty-flag"], false);
}

#[test]
fn replay_extends_the_file_and_refuses_a_truncated_one() {
    let d = scratch();
    let guid = Guid::random();
    // A dynamic image whose log allocates block 3 past the end of the file: the replay
    // extends the file to LastFileOffset, and the block reads as zeros.
    let raw = d.path().join("r.raw");
    make_raw(&raw, 4 * MIB, &[(0, 4096, 0x70)]);
    let v = d.path().join("dyn.vhdx");
    imgconv_convert("vhdx", "block_size=1M", &raw, &v);
    let len = std::fs::metadata(&v).unwrap().len();
    let bat = region(&v, imgconv::format::vhdx::header::BAT_REGION).file_offset;
    let mut bat_sector = vec![0u8; 4096];
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(&v).unwrap();
        f.read_exact_at(&mut bat_sector, bat).unwrap();
    }
    bat_sector[24..32].copy_from_slice(&(len | 6).to_le_bytes());
    let spec = |flushed: u64| LogEntrySpec {
        pos: 0,
        seq: 1,
        tail: 0,
        guid,
        descs: vec![(bat, LogWrite::Data(bat_sector.clone()))],
        flushed,
        last: len + MIB,
        corrupt: false,
    };
    write_log(&v, guid, &[spec(len)]);
    let mut want = std::fs::read(&raw).unwrap();
    want[3 * MIB as usize..].fill(0);
    assert!(read_all(&v) == want);
    let img = imgconv::open(&v, &OpenOptions::trusted()).unwrap();
    assert_eq!(
        img.device().map(3 * MIB, MIB).unwrap().kind,
        ExtentKind::Data
    );
    // The same log claiming a longer file than there is: truncated, refused.
    write_log(&v, guid, &[spec(len + MIB)]);
    let o = imgconv_out(&["info", s(&v)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("truncated"));
}

#[test]
fn compressed_vhdx_reads_through_the_spool() {
    let d = scratch();
    let raw = d.path().join("src.raw");
    sample_raw(&raw, 20 * MIB);
    let v = d.path().join("img.vhdx");
    imgconv_convert("vhdx", "block_size=1M", &raw, &v);
    run_ok("gzip", &["-k", s(&v)]);
    let gz = d.path().join("img.vhdx.gz");
    let j = info_json(&gz);
    assert_eq!(
        (j["format"].as_str(), j["compression"].as_str()),
        (Some("vhdx"), Some("gzip"))
    );
    let out = d.path().join("out.raw");
    imgconv(&["convert", "-O", "raw", s(&gz), s(&out)]);
    assert_same_fmt(&raw, "raw", &out, "raw");
}

#[test]
fn cli_create_measure_map_compare_and_check() {
    let d = scratch();
    let f = d.path().join("new.vhdx");
    imgconv(&[
        "create",
        "-f",
        "vhdx",
        "-o",
        "subformat=fixed,block_size=4M",
        s(&f),
        "30M",
    ]);
    let q = qemu_info(&f);
    assert_eq!(
        (q["virtual-size"].as_u64(), q["cluster-size"].as_u64()),
        (Some(30 * MIB), Some(4 * MIB))
    );
    assert_qemu_check_clean(&f);
    let dynamic = d.path().join("new-dyn.vhdx");
    imgconv(&["create", "-f", "vhdx", s(&dynamic), "1T"]);
    assert_eq!(qemu_info(&dynamic)["virtual-size"], 1u64 << 40);
    assert!(std::fs::metadata(&dynamic).unwrap().len() < 8 * MIB);
    assert_eq!(check_code(&dynamic).0, Some(0));

    let raw = d.path().join("src.raw");
    sample_raw(&raw, 20 * MIB);
    let v = d.path().join("img.vhdx");
    imgconv_convert("vhdx", "block_size=1M", &raw, &v);
    // measure with a VHDX source, as qemu-img measures it.
    let ours: serde_json::Value = serde_json::from_str(&imgconv(&[
        "measure",
        "--output=json",
        "-O",
        "qcow2",
        s(&v),
    ]))
    .unwrap();
    let theirs: serde_json::Value = serde_json::from_str(&qemu_img(&[
        "measure",
        "--output=json",
        "-O",
        "qcow2",
        s(&v),
    ]))
    .unwrap();
    // qemu-img sees every VHDX block as allocated (the driver reports no holes) and
    // counts them all; imgconv counts the data only.
    assert_eq!(ours["fully-allocated"], theirs["fully-allocated"]);
    let (r, q) = (
        ours["required"].as_u64().unwrap(),
        theirs["required"].as_u64().unwrap(),
    );
    assert!(r > 0 && r < q, "{r} {q}");
    assert_eq!(
        imgconv_out(&["compare", s(&raw), s(&v)]).status.code(),
        Some(0)
    );
    let map: serde_json::Value =
        serde_json::from_str(&imgconv(&["map", "--output=json", s(&v)])).unwrap();
    assert!(map.as_array().unwrap().iter().any(|e| e["data"] == false));
    // check -r: imgconv never writes to a VHDX (qemu-img replays the log with -r all).
    // As for every format without repairs: qemu-img's "does not support checks", 63.
    let before = std::fs::read(&v).unwrap();
    let o = imgconv_out(&["check", "-r", "all", s(&v)]);
    assert_eq!(o.status.code(), Some(63));
    assert!(std::fs::read(&v).unwrap() == before);
    let c: serde_json::Value =
        serde_json::from_str(&imgconv(&["check", "--output=json", s(&v)])).unwrap();
    assert_eq!(
        (c["format"].as_str(), c["check-errors"].as_u64()),
        (Some("vhdx"), Some(0))
    );
    // Options qemu-img would refuse are refused.
    for bad in [
        "block_size=3M",
        "subformat=diff",
        "log_size=8G",
        "logical_sector_size=1024",
        "cluster_size=64k",
    ] {
        assert_convert_refused("vhdx", bad, &raw, &d.path().join("bad.vhdx"));
    }
}

/// Overwrites bytes of a file.
fn overwrite(p: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

/// A way to damage an image.
type Damage = Box<dyn Fn(&Path)>;

#[test]
fn check_reports_what_is_wrong() {
    use imgconv::format::vhdx::header::{BatEntry, METADATA_REGION};
    let d = scratch();
    let raw = d.path().join("src.raw");
    sample_raw(&raw, 20 * MIB);
    let good = d.path().join("good.vhdx");
    imgconv_convert("vhdx", "block_size=1M,block_state_zero=off", &raw, &good);
    let len = std::fs::metadata(&good).unwrap().len();
    let md = region(&good, METADATA_REGION).file_offset;
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "past-eof",
            Box::new(move |p| patch_bat(p, |b| b[0] = BatEntry::new(6, len + 10 * MIB))),
            "points after end of file",
        ),
        (
            "into-metadata",
            Box::new(move |p| patch_bat(p, |b| b[0] = BatEntry::new(6, md))),
            "overlaps the metadata region",
        ),
        (
            "overlapping",
            Box::new(|p| patch_bat(p, |b| b[3] = b[0])),
            "overlapping blocks",
        ),
        (
            "partial-in-dynamic",
            Box::new(|p| patch_bat(p, |b| b[0] = BatEntry::new(7, b[0].offset()))),
            "state 7",
        ),
        (
            "bad-header",
            Box::new(|p| overwrite(p, 64 * 1024 + 200, b"x")),
            "header 1",
        ),
        (
            "bad-region-2",
            Box::new(|p| overwrite(p, 256 * 1024 + 200, b"x")),
            "region table 2",
        ),
    ];
    for (name, damage, what) in cases {
        let p = d.path().join(format!("{name}.vhdx"));
        std::fs::copy(&good, &p).unwrap();
        damage(&p);
        let (code, text) = check_code(&p);
        assert_eq!(code, Some(2), "{name}: {text}");
        assert!(text.contains(what), "{name}: {text}");
        // qemu-img finds the BAT problems too (it does not compare the second region
        // table, nor count a bad header while the other one is good).
        if name == "past-eof" || name == "into-metadata" {
            let q = run("qemu-img", &["check", s(&p)]);
            assert_eq!(q.status.code(), Some(2), "{name}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Write → read back identical, for random sparse content and option combinations.
    #[test]
    fn writer_round_trips(
        sectors in 1u64..(9 << 11),
        pieces in prop::collection::vec((0u64..(9 << 20), 1usize..70_000, 1u8..255), 0..6),
        fixed in any::<bool>(),
        block in 0u32..3,
        big_sectors in any::<bool>(),
        zero_state in any::<bool>(),
    ) {
        let lss = if big_sectors { 4096 } else { 512 };
        let size = (sectors * 512).div_ceil(lss) * lss;
        let d = scratch();
        let raw = d.path().join("src.raw");
        let pieces: Vec<(u64, usize, u8)> = pieces
            .into_iter()
            .map(|(o, l, b)| (o % size, l.min((size - o % size) as usize), b))
            .collect();
        make_raw(&raw, size, &pieces);
        let opts = format!(
            "subformat={},block_size={}M,block_state_zero={},logical_sector_size={lss}",
            if fixed { "fixed" } else { "dynamic" },
            1 << block,
            if zero_state { "on" } else { "off" },
        );
        let v = d.path().join("out.vhdx");
        imgconv_convert("vhdx", &opts, &raw, &v);
        let content = std::fs::read(&raw).unwrap();
        prop_assert!(read_all(&v) == content, "{}", opts);
        if !big_sectors {
            assert_same_fmt(&raw, "raw", &v, "vhdx");
        }
    }
}

/// Encodes the image at `p` as the VHDX fuzz target's input (see
/// `imgconv::fuzzing::vhdx`): the length in MiB, then non-zero 512-byte sectors as
/// (sector number, length, bytes without the trailing zeros) records, those of the header
/// section, the log, the metadata region and the BAT first, then data, until the input
/// would outgrow `max` bytes.
fn fuzz_records(p: &Path, max: usize) -> Vec<u8> {
    use imgconv::format::vhdx::header::{BAT_REGION, METADATA_REGION};
    let d = std::fs::read(p).unwrap();
    let mib = d.len().div_ceil(1 << 20).clamp(1, 64);
    let (md, bat) = (region(p, METADATA_REGION), region(p, BAT_REGION));
    let log = current_header(p).1;
    let ranges = [
        (0, MIB),
        (log.log_offset, log.log_length as u64),
        (md.file_offset, md.length as u64),
        (bat.file_offset, bat.length as u64),
        (0, d.len() as u64),
    ];
    let mut out = vec![(mib - 1) as u8];
    let mut chosen: Vec<u64> = Vec::new();
    for (start, len) in ranges {
        let end = (start + len).min(d.len() as u64);
        for n in start / 512..end / 512 {
            let sector = &d[(n * 512) as usize..(n * 512 + 512) as usize];
            let used = sector.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
            if used == 0 || chosen.contains(&n) || out.len() + 6 + used > max {
                continue;
            }
            chosen.push(n);
            out.extend_from_slice(&(n as u32).to_le_bytes());
            out.extend_from_slice(&(used as u16).to_le_bytes());
            out.extend_from_slice(&sector[..used]);
        }
    }
    out
}

/// Writes the seeds of the `vhdx` fuzz target into `$VHDX_SEED_DIR` (run by
/// `fuzz/make-seeds.sh`): dynamic, fixed, 4 KiB-sector, dirty-log and differencing
/// images, each as sparse sector records of at most 16 KiB.
#[test]
#[ignore]
fn make_fuzz_seeds() {
    let Ok(dir) = std::env::var("VHDX_SEED_DIR") else {
        return;
    };
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let d = scratch();
    let raw = d.path().join("src.raw");
    make_raw(&raw, 3 * MIB, &[(0, 1000, 1), (MIB + 512, 600, 2)]);
    let mut images: Vec<(String, PathBuf)> = Vec::new();
    for (name, opts, ours) in [
        ("qemu-dynamic", "block_size=1M", false),
        (
            "qemu-fixed",
            "subformat=fixed,block_size=1M,block_state_zero=off",
            false,
        ),
        ("ours-dynamic", "block_size=1M,block_state_zero=off", true),
        ("ours-4k", "logical_sector_size=4096,block_size=2M", true),
    ] {
        let p = d.path().join(format!("{name}.vhdx"));
        if ours {
            imgconv_convert("vhdx", opts, &raw, &p);
        } else {
            qemu_convert("vhdx", opts, &raw, &p);
        }
        images.push((name.into(), p));
    }
    let (v, _, b0) = log_base(d.path());
    let guid = Guid::random();
    let e = |pos: u64, seq: u64, descs: Vec<(u64, LogWrite)>| LogEntrySpec {
        pos,
        seq,
        tail: 0,
        guid,
        descs,
        flushed: 0,
        last: 0,
        corrupt: false,
    };
    write_log(
        &v,
        guid,
        &[
            e(
                0,
                5,
                vec![
                    (b0, LogWrite::Data(vec![7; 4096])),
                    (b0 + 8192, LogWrite::Zero(8192)),
                ],
            ),
            e(8192, 6, vec![(b0 + 4096, LogWrite::Zero(4096))]),
        ],
    );
    images.push(("dirty-log".into(), v));
    let child = d.path().join("child.avhdx");
    make_child(
        &child,
        &ChildSpec {
            size: 3 * MIB,
            block_size: MIB,
            lss: 512,
            linkage: Guid::random(),
            relative_path: Some(".\\parent.vhdx"),
            absolute_path: Some("C:\\vms\\parent.vhdx"),
            blocks: vec![
                (0, ChildBlock::Partial(3, vec![(1, 2)])),
                (1, ChildBlock::Full(4)),
                (2, ChildBlock::Zero),
            ],
        },
        &mut vec![],
    );
    images.push(("differencing".into(), child));
    if let Some(c) = corpus_dir() {
        let p = corpus_file(
            &c,
            "qemu-iotests/iotest-dirtylog-10G-4M.vhdx.bz2",
            d.path(),
            "q.vhdx",
        );
        images.push(("qemu-dirty-log".into(), p));
    }
    for (name, p) in images {
        let rec = fuzz_records(&p, 16 << 10);
        std::fs::write(dir.join(format!("{name}.rec")), rec).unwrap();
    }
}
