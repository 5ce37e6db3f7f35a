//! VMDK reading and writing, judged by qemu-img (and by dissect.hypervisor and
//! libvmdk's vmdkinfo as independent readers of what imgconv writes).

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use imgconv::{Error, OpenOptions};

const SUBFORMATS: [&str; 5] = [
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
];

/// A 9 MiB + 1000 byte raw disk with data in a few places (partial grains included).
fn sample_raw(dir: &Path) -> PathBuf {
    let p = dir.join("src.raw");
    make_raw(
        &p,
        9 * (1 << 20) + 1000,
        &[
            (0, 4096, 1),
            (70_000, 200_000, 2),
            (3 << 20, 1 << 20, 3),
            (9 * (1 << 20) - 512, 1512, 4),
        ],
    );
    p
}

/// The same, a whole number of grains long (for readers that want whole grains).
fn whole_grain_raw(dir: &Path) -> PathBuf {
    let p = dir.join("whole.raw");
    make_raw(
        &p,
        8 << 20,
        &[
            (0, 65536, 5),
            (100_000, 300_000, 6),
            ((8 << 20) - 4096, 4096, 7),
        ],
    );
    p
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

fn open_err(path: &Path, opts: &OpenOptions) -> Error {
    match imgconv::open(path, opts) {
        Ok(img) => {
            // Opening may be lazy about tables: reading everything must then fail.
            let mut buf = vec![0u8; 1 << 20];
            let size = img.size();
            let mut off = 0;
            while off < size {
                let n = (size - off).min(buf.len() as u64) as usize;
                if let Err(e) = img.device().read_at(&mut buf[..n], off) {
                    return e;
                }
                off += n as u64;
            }
            panic!("{} opened and read without error", path.display())
        }
        Err(e) => e,
    }
}

/// The embedded descriptor of a sparse file, or the text of a descriptor file.
fn descriptor_text(path: &Path) -> String {
    let b = std::fs::read(path).unwrap();
    if b.starts_with(b"KDMV") {
        let off = le64(&b, 28) as usize * 512;
        let len = le64(&b, 36) as usize * 512;
        let d = &b[off..off + len];
        let end = d.iter().position(|&c| c == 0).unwrap_or(d.len());
        String::from_utf8_lossy(&d[..end]).into_owned()
    } else {
        String::from_utf8_lossy(&b).into_owned()
    }
}

#[test]
fn every_subformat_qemu_writes_reads_like_qemu() {
    let d = scratch();
    let src = sample_raw(d.path());
    for sf in SUBFORMATS {
        for extra in ["", ",zeroed_grain=on", ",adapter_type=lsilogic,hwversion=6"] {
            if extra.contains("zeroed") && sf.contains("Flat") {
                continue;
            }
            let q = d.path().join(format!("q-{sf}{}.vmdk", extra.len()));
            qemu_convert("vmdk", &format!("subformat={sf}{extra}"), &src, &q);
            check_to_raw(&q, d.path());
            assert_same(&src, &q);
        }
    }
}

#[test]
fn zeroed_grains_and_delta_disks_read_like_qemu() {
    let d = scratch();
    let src = sample_raw(d.path());
    let base = d.path().join("base.vmdk");
    qemu_convert("vmdk", "zeroed_grain=on", &src, &base);
    // Zeroed grain over data in the image itself.
    qemu_io(&["-f", "vmdk", "-c", "write -z 3M 128k", s(&base)]);
    check_to_raw(&base, d.path());
    // A delta disk with partial-grain writes and zeroed grains hiding the parent.
    let delta = d.path().join("delta.vmdk");
    qemu_img(&overlay_args(
        "vmdk",
        &["-o", "zeroed_grain=on"],
        "base.vmdk",
        &delta,
        "",
    ));
    qemu_io(&[
        "-f",
        "vmdk",
        "-c",
        "write -P 0x55 72k 4k",
        "-c",
        "write -z 0 64k",
        "-c",
        "write -P 0x66 8M 700k",
        s(&delta),
    ]);
    check_to_raw(&delta, d.path());
    let info: serde_json::Value =
        serde_json::from_str(&imgconv(&["info", "--output=json", s(&delta)])).unwrap();
    let theirs = qemu_info(&delta);
    assert_eq!(info["backing-filename"], theirs["backing-filename"]);
    assert_eq!(
        info["format-specific"]["data"]["parent-cid"],
        theirs["format-specific"]["data"]["parent-cid"]
    );
    // map reports the parent's data one layer down.
    let map = imgconv(&["map", "--output=json", s(&delta)]);
    assert!(
        map.contains("\"depth\": 1") || map.contains("\"depth\":1"),
        "{map}"
    );

    // A parent whose CID changed (written after the delta was made) is refused.
    qemu_io(&["-f", "vmdk", "-c", "write -P 0x77 0 512", s(&base)]);
    let e = open_err(&delta, &OpenOptions::default());
    assert!(matches!(e, Error::BackingChain { .. }), "{e}");
    // Untrusted: the parent is a reference and is refused.
    let e = open_err(&delta, &OpenOptions::untrusted());
    assert!(matches!(e, Error::UntrustedReference { .. }), "{e}");
}

#[test]
fn info_matches_qemu_for_every_subformat() {
    let d = scratch();
    let src = sample_raw(d.path());
    for sf in SUBFORMATS {
        let q = d.path().join(format!("{sf}.vmdk"));
        qemu_convert("vmdk", &format!("subformat={sf}"), &src, &q);
        let ours: serde_json::Value =
            serde_json::from_str(&imgconv(&["info", "--output=json", s(&q)])).unwrap();
        let theirs = qemu_info(&q);
        for k in ["virtual-size", "format", "cluster-size"] {
            assert_eq!(ours[k], theirs[k], "{sf} {k}");
        }
        let (o, t) = (&ours["format-specific"], &theirs["format-specific"]);
        assert_eq!(o["type"], t["type"]);
        for k in ["cid", "parent-cid", "create-type"] {
            assert_eq!(o["data"][k], t["data"][k], "{sf} {k}");
        }
        let (oe, te) = (
            o["data"]["extents"].as_array().unwrap(),
            t["data"]["extents"].as_array().unwrap(),
        );
        assert_eq!(oe.len(), te.len(), "{sf}");
        for (a, b) in oe.iter().zip(te) {
            for k in [
                "filename",
                "format",
                "virtual-size",
                "cluster-size",
                "compressed",
            ] {
                assert_eq!(a[k], b[k], "{sf} extent {k}");
            }
        }
        if sf != "monolithicSparse" && sf != "streamOptimized" {
            assert!(!ours["references"].as_array().unwrap().is_empty(), "{sf}");
        }
    }
}

#[test]
fn corpus_vmdks_read_like_qemu() {
    let Some(c) = corpus_dir() else { return };
    let d = scratch();
    for (rel, name) in [
        (
            "qemu-iotests/iotest-version3.vmdk.bz2",
            "iotest-version3.vmdk",
        ),
        (
            "vagrant-mutate/virtualbox-box-disk1.vmdk.xz",
            "box-disk1.vmdk",
        ),
        ("dfvfs/image.vmdk.xz", "image.vmdk"),
        (
            "freebsd-mkimg/img-1x1-512-mbr.vmdk.xz",
            "img-1x1-512-mbr.vmdk",
        ),
    ] {
        let f = corpus_file(&c, rel, d.path(), name);
        check_to_raw(&f, d.path());
        // Also through the engine into every subformat, judged by qemu-img.
        for sf in ["monolithicSparse", "streamOptimized"] {
            let out = d.path().join(format!("{name}.{sf}.vmdk"));
            imgconv_convert("vmdk", &format!("subformat={sf}"), &f, &out);
            assert_same(&f, &out);
        }
    }
    // The VirtualBox and VMware samples hold known data.
    let v3 = d.path().join("iotest-version3.vmdk");
    let img = imgconv::open(&v3, &OpenOptions::default()).unwrap();
    for i in [0u64, 7, 99] {
        let mut b = [0u8; 512];
        img.device().read_at(&mut b, i * 655360 + i * 512).unwrap();
        assert!(
            b.iter().all(|&x| x == 0x30 + (i % 10) as u8),
            "iotest-version3 sector {i}"
        );
    }
}

#[test]
fn corpus_malformed_vmdks_are_refused_fast() {
    let Some(c) = corpus_dir() else { return };
    let d = scratch();
    for (rel, name) in [
        ("qemu-iotests/afl9.vmdk.bz2", "afl9.vmdk"),
        (
            "cdi-malicious/invalid-qcow-large-memory.img.xz",
            "large-memory.img",
        ),
        (
            "cdi-malicious/invalid-qcow-backing-file.img.xz",
            "backing-file.img",
        ),
    ] {
        let f = corpus_file(&c, rel, d.path(), name);
        let t = Instant::now();
        let e = open_err(&f, &OpenOptions::default());
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{name} took {:?}",
            t.elapsed()
        );
        assert!(
            matches!(
                e,
                Error::Corrupt { format: "vmdk", .. } | Error::TooLarge { format: "vmdk", .. }
            ),
            "{name}: {e}"
        );
        let o = imgconv_out(&["convert", "-O", "raw", s(&f), s(&d.path().join("x.raw"))]);
        assert_eq!(o.status.code(), Some(1), "{name}");
        assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"));
    }
}

#[test]
fn sesparse_reads_like_qemu_and_rejects_damage() {
    let Some(c) = corpus_dir() else { return };
    let d = scratch();
    let f = corpus_file(
        &c,
        "dissect-hypervisor/vmdk/sesparse.vmdk.gz",
        d.path(),
        "sesparse.vmdk",
    );
    // qemu reads it only through a descriptor; imgconv both ways.
    let desc = d.path().join("se.vmdk");
    std::fs::write(
        &desc,
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"seSparse\"\n\
         RW 1048576 SESPARSE \"sesparse.vmdk\"\n",
    )
    .unwrap();
    check_to_raw(&desc, d.path());
    let out = d.path().join("direct.raw");
    imgconv(&["convert", "-O", "raw", s(&f), s(&out)]);
    assert_same_fmt(&desc, "vmdk", &out, "raw");
    // dissect's test: the first 16 MiB read as 'a'.
    let img = imgconv::open(&f, &OpenOptions::default()).unwrap();
    assert_eq!(img.size(), 512 << 20);
    let mut b = vec![0u8; 16 << 20];
    img.device().read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == b'a'));
    let ours: serde_json::Value =
        serde_json::from_str(&imgconv(&["info", "--output=json", s(&desc)])).unwrap();
    assert_eq!(ours["format-specific"], qemu_info(&desc)["format-specific"]);

    let orig = std::fs::read(&f).unwrap();
    let q = |i: usize| u64::from_le_bytes(orig[i * 8..i * 8 + 8].try_into().unwrap());
    let (gd, gt) = (q(16) as usize * 512, q(18) as usize * 512);
    for (what, bytes) in [
        ("version", patched(&orig, 8, 3, 8)),
        ("grain size", patched(&orig, 24, 16, 8)),
        ("capacity", patched(&orig, 16, 1 << 60, 8)),
        ("volatile magic", patched(&orig, q(10) as usize * 512, 1, 8)),
        ("GD past EOF", patched(&orig, 128, 1 << 40, 8)),
        ("GD entry", patched(&orig, gd, 0x2000_0000_0000_0000, 8)),
        (
            "GD entry index",
            patched(&orig, gd, 0x1000_0000_7fff_ffff, 8),
        ),
        (
            "GT entry kind",
            patched(&orig, gt, 0x5000_0000_0000_0000, 8),
        ),
        (
            "GT entry index",
            patched(&orig, gt, 0x3000_0fff_ffff_ffff, 8),
        ),
        ("truncated", orig[..orig.len() / 2].to_vec()),
    ] {
        let p = d.path().join("bad-se.vmdk");
        std::fs::write(&p, &bytes).unwrap();
        let e = open_err(&p, &OpenOptions::default());
        assert!(
            matches!(
                e,
                Error::Corrupt { format: "vmdk", .. } | Error::Unsupported { format: "vmdk", .. }
            ),
            "{what}: {e:?}"
        );
    }
}

#[test]
fn two_gb_extents_over_4gib_convert_both_ways() {
    let d = scratch();
    let src = d.path().join("big.raw");
    let g = 1u64 << 30;
    make_raw(
        &src,
        5 * g + 12345,
        &[
            (0, 4096, 1),
            (2 * g - 4096, 8192, 2),
            (4 * g - 65536, 131072, 3),
            (5 * g, 12345, 4),
        ],
    );
    for sf in ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
        // qemu-img writes, imgconv reads.
        let q = d.path().join(format!("q-{sf}.vmdk"));
        qemu_convert("vmdk", &format!("subformat={sf}"), &src, &q);
        check_to_raw(&q, d.path());
        // imgconv writes, qemu-img reads.
        let o = d.path().join(format!("o-{sf}.vmdk"));
        imgconv_convert("vmdk", &format!("subformat={sf}"), &src, &o);
        assert_same(&src, &o);
        let text = std::fs::read_to_string(&o).unwrap();
        assert_eq!(
            text.matches(if sf.contains("Flat") {
                " FLAT "
            } else {
                " SPARSE "
            })
            .count(),
            3,
            "{text}"
        );
    }
}

#[test]
fn every_subformat_written_is_identical_for_qemu() {
    let d = scratch();
    let src = sample_raw(d.path());
    for sf in SUBFORMATS {
        for (adapter, hw) in [
            ("ide", "4"),
            ("lsilogic", "13"),
            ("buslogic", "7"),
            ("legacyESX", "8"),
        ] {
            let o = d.path().join(format!("o-{sf}-{adapter}.vmdk"));
            imgconv_convert(
                "vmdk",
                &format!("subformat={sf},adapter_type={adapter},hwversion={hw},toolsversion=12345"),
                &src,
                &o,
            );
            assert_same(&src, &o);
            let check = qemu_img(&["check", s(&o)]);
            assert!(check.contains("No errors were found"), "{sf}: {check}");
            let info = qemu_info(&o);
            assert_eq!(info["format-specific"]["data"]["create-type"], sf);
            let text = descriptor_text(&o);
            assert!(text.starts_with("# Disk DescriptorFile\n"), "{text}");
            assert!(
                text.contains(&format!("ddb.adapterType = \"{adapter}\"")),
                "{text}"
            );
            assert!(
                text.contains(&format!("ddb.virtualHWVersion = \"{hw}\"")),
                "{text}"
            );
            assert!(text.contains("ddb.toolsVersion = \"12345\""), "{text}");
            assert!(text.contains("parentCID=ffffffff"), "{text}");
            let heads = if adapter == "ide" { "16" } else { "255" };
            assert!(
                text.contains(&format!("ddb.geometry.heads = \"{heads}\"")),
                "{text}"
            );
            assert!(
                text.contains("ddb.uuid.image = \"") && text.contains("ddb.longContentID = \"")
            );
            // And imgconv reads back what it wrote.
            check_to_raw(&o, d.path());
        }
    }
    // zeroed_grain: a version-2 header with the zeroed-grain flag.
    let o = d.path().join("zg.vmdk");
    imgconv_convert("vmdk", "zeroed_grain=on", &src, &o);
    let b = std::fs::read(&o).unwrap();
    assert_eq!((le32(&b, 4), le32(&b, 8)), (2, 7));
    assert_same(&src, &o);
    // -c is implied for streamOptimized and refused elsewhere.
    let o = d.path().join("c.vmdk");
    imgconv(&[
        "convert",
        "-c",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        s(&src),
        s(&o),
    ]);
    assert_same(&src, &o);
    let r = imgconv_out(&[
        "convert",
        "-c",
        "-O",
        "vmdk",
        s(&src),
        s(&d.path().join("c2.vmdk")),
    ]);
    assert_eq!(r.status.code(), Some(1));
    // Unknown options are errors, and nothing is left behind.
    for bad in [
        "bogus=1",
        "adapter_type=scsi",
        "subformat=vmfs",
        "hwversion=abc",
    ] {
        assert_convert_refused("vmdk", bad, &src, &d.path().join("bad.vmdk"));
    }
}

#[test]
fn delta_disk_written_over_a_vmdk_parent() {
    let d = scratch();
    let src = sample_raw(d.path());
    let base_raw = d.path().join("base.raw");
    make_raw(
        &base_raw,
        9 * (1 << 20) + 1000,
        &[(0, 1 << 20, 9), (5 << 20, 1 << 20, 8)],
    );
    let base = d.path().join("base.vmdk");
    imgconv(&["convert", "-O", "vmdk", s(&base_raw), s(&base)]);
    for zg in ["off", "on"] {
        let o = d.path().join(format!("delta-{zg}.vmdk"));
        imgconv(&[
            "convert",
            "-O",
            "vmdk",
            "-o",
            &format!("zeroed_grain={zg}"),
            "-B",
            "base.vmdk",
            "-F",
            "vmdk",
            s(&src),
            s(&o),
        ]);
        assert_same(&src, &o);
        let info = qemu_info(&o);
        assert_eq!(info["backing-filename"], "base.vmdk");
        assert_qemu_check_clean(&o);
    }
}

#[test]
fn independent_readers_accept_our_files() {
    let d = scratch();
    let src = whole_grain_raw(d.path());
    let script = d.path().join("read.py");
    std::fs::write(
        &script,
        "import sys\nfrom dissect.hypervisor import vmdk\n\
         f = open(sys.argv[1], 'rb')\nv = vmdk.VMDK(f)\nh = v.open() if hasattr(v, 'open') else v\n\
         raw = open(sys.argv[2], 'rb').read()\nassert v.size == len(raw), (v.size, len(raw))\n\
         got = b''\nwhile len(got) < v.size:\n    c = h.read(min(1 << 20, v.size - len(got)))\n    \
         assert c, 'short read'\n    got += c\n\
         print('same' if got == raw else 'DIFFERENT')\n",
    )
    .unwrap();
    for (sf, kind) in [
        ("monolithicSparse", "Monolithic sparse"),
        ("streamOptimized", "Stream optimized"),
    ] {
        let o = d.path().join(format!("{sf}.vmdk"));
        imgconv_convert("vmdk", &format!("subformat={sf}"), &src, &o);
        let out = run_ok("python3", &[s(&script), s(&o), s(&src)]);
        assert_eq!(out.trim(), "same", "dissect.hypervisor on {sf}");
        let info = run_ok("vmdkinfo", &[s(&o)]);
        assert!(info.contains(kind), "vmdkinfo on {sf}: {info}");
        assert!(info.contains(&format!("({} bytes)", 8 << 20)), "{info}");
        assert!(
            info.contains("Parent content identifier:\t0xffffffff"),
            "{info}"
        );
    }
}

/// Walks a streamOptimized file: returns (grain count, GT count) after checking the
/// canonical layout.
fn check_stream_layout(b: &[u8]) -> (usize, usize) {
    assert_eq!(&b[0..4], b"KDMV");
    assert_eq!(le32(b, 4), 3, "version");
    assert_eq!(le32(b, 8), 0x30001, "flags");
    assert_eq!(le64(b, 56), u64::MAX, "gdOffset = GD_AT_END");
    assert_eq!(u16::from_le_bytes([b[77], b[78]]), 1, "deflate");
    let grain_sectors = le64(b, 20);
    let overhead = le64(b, 64) as usize;
    assert_eq!(b.len() % 512, 0);
    let n = b.len() / 512;
    // Last three sectors: footer marker, footer, end-of-stream.
    let eos = &b[(n - 1) * 512..];
    assert!(eos.iter().all(|&x| x == 0), "end-of-stream marker last");
    let fm = &b[(n - 3) * 512..(n - 2) * 512];
    assert_eq!(
        (le64(fm, 0), le32(fm, 8), le32(fm, 12)),
        (1, 0, 3),
        "footer marker"
    );
    let footer = &b[(n - 2) * 512..(n - 1) * 512];
    assert_eq!(&footer[0..4], b"KDMV");
    let gd_off = le64(footer, 56) as usize;
    assert_eq!(&footer[..56], &b[..56], "footer repeats the header");
    // Walk the markers from the first grain.
    let mut sec = overhead;
    let (mut grains, mut gts) = (0, 0);
    let mut last_lba = None;
    let mut gd_seen = false;
    let mut gts_at = Vec::new();
    while sec < n - 3 {
        let m = &b[sec * 512..];
        let (val, size) = (le64(m, 0), le32(m, 8));
        if size != 0 {
            assert!(last_lba.is_none_or(|l| val > l), "grains ascend");
            assert_eq!(val % grain_sectors, 0);
            // zlib stream (RFC 1950): CMF 0x78.
            assert_eq!(m[12], 0x78);
            last_lba = Some(val);
            grains += 1;
            sec += (12 + size as usize).div_ceil(512);
        } else {
            match le32(m, 12) {
                1 => {
                    assert_eq!(val, 4);
                    gts += 1;
                    gts_at.push(sec + 1);
                }
                2 => {
                    assert_eq!(sec + 1, gd_off, "footer's gdOffset points at the GD");
                    gd_seen = true;
                    let gd = &b[gd_off * 512..];
                    let gd_entries = (le64(b, 12).div_ceil(grain_sectors) as usize).div_ceil(512);
                    let entries: Vec<u32> = (0..gd_entries).map(|i| le32(gd, i * 4)).collect();
                    assert_eq!(entries.iter().filter(|&&e| e != 0).count(), gts_at.len());
                    for at in &gts_at {
                        assert!(entries.contains(&(*at as u32)), "GD lists the GT at {at}");
                    }
                }
                t => panic!("unexpected marker type {t} at sector {sec}"),
            }
            sec += 1 + val as usize;
        }
    }
    assert!(gd_seen, "GD marker present");
    assert_eq!(sec, n - 3);
    (grains, gts)
}

#[test]
fn stream_optimized_layout_and_stdout_output() {
    let d = scratch();
    let src = d.path().join("s.raw");
    // Data in 3 of the 32 MiB grain-table ranges, none in the middle one.
    make_raw(
        &src,
        100 << 20,
        &[
            (0, 100_000, 1),
            (40 << 20, 65536, 2),
            (99 << 20, 1 << 20, 3),
        ],
    );
    let f = d.path().join("file.vmdk");
    imgconv_convert(
        "vmdk",
        "subformat=streamOptimized,adapter_type=lsilogic",
        &src,
        &f,
    );
    let fb = std::fs::read(&f).unwrap();
    let (grains, gts) = check_stream_layout(&fb);
    assert_eq!(grains, 2 + 1 + 16);
    assert_eq!(gts, 3);
    assert_same(&src, &f);
    assert_qemu_check_clean(&f);

    let o = imgconv_out(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized,adapter_type=lsilogic",
        s(&src),
        "-",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pb = o.stdout;
    assert_eq!(pb.len(), fb.len());
    check_stream_layout(&pb);
    // Identical except the descriptor's random IDs.
    let overhead = le64(&fb, 64) as usize * 512;
    assert!(pb[..512] == fb[..512], "headers differ");
    assert!(
        pb[overhead..] == fb[overhead..],
        "data, tables or footer differ"
    );
    let strip = |b: &[u8]| -> String {
        let d = &b[512..overhead];
        let end = d.iter().position(|&c| c == 0).unwrap_or(d.len());
        String::from_utf8_lossy(&d[..end])
            .lines()
            .filter(|l| {
                !(l.starts_with("CID=")
                    || l.contains("uuid")
                    || l.contains("longContentID")
                    || l.starts_with("RW "))
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        strip(&pb) == strip(&fb),
        "descriptors differ beyond IDs and name"
    );
    // A pipe can only take streamOptimized.
    let o = imgconv_out(&["convert", "-O", "vmdk", s(&src), "-"]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn stream_reader_reads_from_a_pipe_in_order() {
    let d = scratch();
    let src = sample_raw(d.path());
    for (who, f) in [
        ("imgconv", d.path().join("a.vmdk")),
        ("qemu", d.path().join("b.vmdk")),
    ] {
        if who == "qemu" {
            qemu_convert("vmdk", "subformat=streamOptimized", &src, &f);
        } else {
            imgconv_convert("vmdk", "subformat=streamOptimized", &src, &f);
        }
        let file = std::fs::File::open(&f).unwrap();
        let opened = open_piped(Box::new(std::io::BufReader::new(file)));
        assert!(opened.device.sequential_only());
        let out = d.path().join(format!("{who}.raw"));
        stream_to_raw(&opened, &out).unwrap();
        assert_same(&src, &out);
    }
    // The corpus streams too.
    if let Some(c) = corpus_dir() {
        for (rel, name) in [
            ("qemu-iotests/iotest-version3.vmdk.bz2", "v3.vmdk"),
            ("vagrant-mutate/virtualbox-box-disk1.vmdk.xz", "vb.vmdk"),
        ] {
            let f = corpus_file(&c, rel, d.path(), name);
            let opened = open_piped(Box::new(std::fs::File::open(&f).unwrap()));
            let out = d.path().join(format!("{name}.raw"));
            stream_to_raw(&opened, &out).unwrap();
            assert_same(&f, &out);
        }
    }
    // A truncated stream is an error, not a short image.
    let b = std::fs::read(d.path().join("a.vmdk")).unwrap();
    let over = le64(&b, 64) as usize * 512;
    let cut = &b[..over + (b.len() - over) / 2 + 7];
    let opened = open_piped(Box::new(std::io::Cursor::new(cut.to_vec())));
    let r = stream_to_raw(&opened, &d.path().join("cut.raw"));
    assert!(matches!(r, Err(Error::Corrupt { .. })), "{r:?}");
}

/// Opens a streamOptimized VMDK from `r` as imgconv opens one from a pipe ("-").
fn open_piped(r: Box<dyn std::io::Read + Send>) -> imgconv::image::Opened {
    let ctx = imgconv::image::OpenContext::detached("-", &OpenOptions::default());
    imgconv::format::vmdk::open_stream(r, &ctx).unwrap()
}

/// Converts an opened stream to a raw file at `out`, as the engine does.
fn stream_to_raw(opened: &imgconv::image::Opened, out: &Path) -> imgconv::Result<()> {
    let opts = imgconv::ConvertOptions::new(imgconv::Format::Raw);
    imgconv::convert::convert_to(
        opened.device.as_ref(),
        out,
        imgconv::io::OutputSet::new(),
        &opts,
    )
}

/// Patches `len` little-endian bytes of `value` at `off` in a copy of `b`.
fn patched(b: &[u8], off: usize, value: u64, len: usize) -> Vec<u8> {
    let mut v = b.to_vec();
    v[off..off + len].copy_from_slice(&value.to_le_bytes()[..len]);
    v
}

#[test]
fn malformed_sparse_files_give_typed_errors_fast() {
    let d = scratch();
    let src = sample_raw(d.path());
    let good = d.path().join("good.vmdk");
    imgconv(&["convert", "-O", "vmdk", s(&src), s(&good)]);
    let b = std::fs::read(&good).unwrap();
    let gd = le64(&b, 56) as usize * 512;
    let rgd = le64(&b, 48) as usize * 512;
    let gt = le32(&b, gd) as usize * 512;
    let first_grain = le32(&b, gt) as usize * 512;
    assert!(first_grain > 0);
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    // Truncated at every structure.
    for (what, at) in [
        ("header", 100),
        ("descriptor", 1000),
        ("redundant GD", rgd + 2),
        ("GD", gd + 2),
        ("GT", gt + 100),
        ("first grain", first_grain + 1000),
        ("last grain", b.len() - 65536 + 500),
    ] {
        cases.push((format!("truncated in the {what}"), b[..at].to_vec()));
    }
    cases.push(("GD past EOF".into(), patched(&b, 56, 1 << 30, 8)));
    cases.push(("GD entry past EOF".into(), patched(&b, gd, 1 << 28, 4)));
    cases.push(("GT entry past EOF".into(), patched(&b, gt, 1 << 28, 4)));
    cases.push(("huge capacity".into(), patched(&b, 12, 1 << 50, 8)));
    cases.push((
        "capacity beyond 2^62".into(),
        patched(&b, 12, u64::MAX / 2, 8),
    ));
    cases.push(("grain size 0".into(), patched(&b, 20, 0, 8)));
    cases.push(("grain size odd".into(), patched(&b, 20, 3, 8)));
    cases.push(("too many GTEs".into(), patched(&b, 44, 100_000, 4)));
    cases.push(("version 4".into(), patched(&b, 4, 4, 4)));
    cases.push(("unknown flag".into(), patched(&b, 8, 0x100, 4)));
    cases.push(("descriptor 100 MiB".into(), patched(&b, 36, 200_000, 8)));
    for (what, bytes) in cases {
        eprintln!("case: {what}");
        let p = d.path().join("bad.vmdk");
        std::fs::write(&p, &bytes).unwrap();
        let t = Instant::now();
        let e = open_err(&p, &OpenOptions::default());
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{what}: {:?}",
            t.elapsed()
        );
        assert!(
            matches!(
                e,
                Error::Corrupt { format: "vmdk", .. }
                    | Error::TooLarge { format: "vmdk", .. }
                    | Error::Unsupported { format: "vmdk", .. }
            ),
            "{what}: {e:?}"
        );
        let o = imgconv_out(&["convert", "-O", "raw", s(&p), s(&d.path().join("o.raw"))]);
        assert_eq!(o.status.code(), Some(1), "{what}");
        assert!(
            !String::from_utf8_lossy(&o.stderr).contains("panicked"),
            "{what}"
        );
    }

    // A streamOptimized file with a broken footer or a bad grain.
    let st = d.path().join("st.vmdk");
    imgconv_convert("vmdk", "subformat=streamOptimized", &src, &st);
    let b = std::fs::read(&st).unwrap();
    let n = b.len();
    let over = le64(&b, 64) as usize * 512;
    for (what, bytes) in [
        ("no footer", b[..n - 1536].to_vec()),
        (
            "footer gdOffset past EOF",
            patched(&b, n - 1024 + 56, 1 << 30, 8),
        ),
        ("grain marker size huge", patched(&b, over + 8, 1 << 30, 4)),
        ("grain data garbage", patched(&b, over + 12, 0xdead_beef, 4)),
        (
            "grain marker for another sector",
            patched(&b, over, 12345, 8),
        ),
    ] {
        let p = d.path().join("badst.vmdk");
        std::fs::write(&p, &bytes).unwrap();
        let e = open_err(&p, &OpenOptions::default());
        assert!(
            matches!(e, Error::Corrupt { format: "vmdk", .. }),
            "{what}: {e:?}"
        );
    }
}

#[test]
fn descriptors_pointing_elsewhere_are_refused_when_untrusted() {
    let d = scratch();
    let sub = d.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let flat = d.path().join("secret.raw");
    make_raw(&flat, 1 << 20, &[(0, 4096, 1)]);
    for (name, target) in [
        ("abs.vmdk", "/etc/passwd".to_string()),
        ("dotdot.vmdk", "../secret.raw".to_string()),
        ("plain.vmdk", "secret-flat.vmdk".to_string()),
    ] {
        let desc = sub.join(name);
        std::fs::write(
            &desc,
            format!(
                "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
                 createType=\"monolithicFlat\"\n\n# Extent description\nRW 8 FLAT \"{target}\" 0\n"
            ),
        )
        .unwrap();
        let t = Instant::now();
        let e = open_err(&desc, &OpenOptions::untrusted());
        assert!(t.elapsed() < Duration::from_secs(10));
        assert!(
            matches!(&e, Error::UntrustedReference { format: "vmdk", reference, .. } if *reference == target),
            "{name}: {e:?}"
        );
        let o = imgconv_out(&[
            "convert",
            "--untrusted",
            "-O",
            "raw",
            s(&desc),
            s(&d.path().join("o.raw")),
        ]);
        assert_eq!(o.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&o.stderr).contains("untrusted"));
        // info --untrusted lists the reference without opening it.
        let info = imgconv(&["info", "--untrusted", "--output=json", s(&desc)]);
        assert!(info.contains(&target), "{info}");
    }
    // Trusted, the relative ../ extent is followed.
    let desc = sub.join("dotdot.vmdk");
    let img = imgconv::open(&desc, &OpenOptions::default()).unwrap();
    assert_eq!(img.size(), 4096);
    // A monolithic sparse file naming itself needs no reference, even untrusted.
    let src = sample_raw(d.path());
    let m = d.path().join("mono.vmdk");
    imgconv(&["convert", "-O", "vmdk", s(&src), s(&m)]);
    imgconv(&[
        "convert",
        "--untrusted",
        "-O",
        "raw",
        s(&m),
        s(&d.path().join("m.raw")),
    ]);
    // A descriptor over 64 KiB is refused.
    let big = d.path().join("big.vmdk");
    let mut text = String::from("# Disk DescriptorFile\nversion=1\nCID=1\n");
    while text.len() <= 70_000 {
        text += "# padding comment line to make the descriptor large\n";
    }
    text += "RW 8 ZERO\n";
    std::fs::write(&big, text).unwrap();
    let e = open_err(&big, &OpenOptions::default());
    assert!(matches!(e, Error::TooLarge { .. }), "{e:?}");
}

#[test]
fn descriptor_features_zero_noaccess_vmfs_and_comment_spellings() {
    let d = scratch();
    let a = d.path().join("a.raw");
    make_raw(&a, 1 << 20, &[(0, 1 << 20, 1)]);
    let b = d.path().join("b-flat.vmdk");
    make_raw(&b, 1 << 20, &[(0, 1 << 20, 2)]);
    let desc = d.path().join("multi.vmdk");
    std::fs::write(
        &desc,
        "# Disk Descriptor File\nversion=1\nencoding=\"UTF-8\"\nCID=0000abcd\nparentCID=ffffffff\n\
         createType=\"custom\"\n\n# Extent description\nRW 1024 FLAT \"a.raw\" 1024\n\
         RDONLY 512 ZERO\nRDONLY 2048 VMFS \"b-flat.vmdk\"\nNOACCESS 100 FLAT \"missing\" 0\n\
         \n# The disk Data Base \n#DDB\nddb.adapterType=\"lsilogic\"\n",
    )
    .unwrap();
    let img = imgconv::open(&desc, &OpenOptions::default()).unwrap();
    assert_eq!(img.size(), (1024 + 512 + 2048 + 100) * 512);
    let mut buf = vec![0u8; img.size() as usize];
    img.device().read_at(&mut buf, 0).unwrap();
    let araw = std::fs::read(&a).unwrap();
    let braw = std::fs::read(&b).unwrap();
    assert_eq!(&buf[..512 * 1024], &araw[512 * 1024..]);
    assert!(buf[512 * 1024..512 * 1536].iter().all(|&x| x == 0));
    assert_eq!(&buf[512 * 1536..512 * 3584], &braw[..]);
    assert!(buf[512 * 3584..].iter().all(|&x| x == 0));
    let m = img.device().map(512 * 1024, 512 * 512).unwrap();
    assert!(m.kind.reads_as_zero());
}

#[test]
fn qcow2_and_vdi_sources_written_as_every_subformat() {
    let d = scratch();
    let src = sample_raw(d.path());
    let mut sources = Vec::new();
    for (name, args) in [
        ("plain.qcow2", vec!["-O", "qcow2"]),
        ("compressed.qcow2", vec!["-O", "qcow2", "-c"]),
        ("dynamic.vdi", vec!["-O", "vdi"]),
        ("static.vdi", vec!["-O", "vdi", "-o", "static=on"]),
    ] {
        let p = d.path().join(name);
        let mut a = vec!["convert"];
        a.extend(args);
        a.extend([s(&src), s(&p)]);
        qemu_img(&a);
        sources.push(p);
    }
    for p in &sources {
        for sf in SUBFORMATS {
            let o = d.path().join(format!(
                "{}-{sf}.vmdk",
                p.file_name().unwrap().to_string_lossy()
            ));
            imgconv_convert("vmdk", &format!("subformat={sf}"), p, &o);
            assert_same(p, &o);
            assert_qemu_check_clean(&o);
        }
    }
}

#[test]
fn huge_sparse_vmdk_converts_in_time_proportional_to_data() {
    let d = scratch();
    let src = d.path().join("big.raw");
    make_raw(
        &src,
        1 << 40,
        &[(1 << 39, 70_000, 1), ((1 << 40) - 4096, 4096, 2)],
    );
    for sf in ["monolithicSparse", "streamOptimized"] {
        let q = d.path().join(format!("{sf}.vmdk"));
        qemu_convert("vmdk", &format!("subformat={sf}"), &src, &q);
        let out = d.path().join(format!("{sf}.raw"));
        let t = Instant::now();
        imgconv(&["convert", "-O", "raw", s(&q), s(&out)]);
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{sf}: {:?}",
            t.elapsed()
        );
        assert_same(&src, &out);
        std::fs::remove_file(&out).unwrap();
    }
}

/// Builds a 16 MiB COWD (ESX vmfsSparse) extent by hand: 4 KiB grains, one grain
/// table, three grains allocated. Returns the expected guest bytes too.
fn make_cowd(path: &Path) -> Vec<u8> {
    use imgconv::format::vmdk::header::CowdHeader;
    let h = CowdHeader {
        version: 1,
        flags: 3,
        disk_sectors: 32768,
        granularity: 8,
        l1dir_offset: 4,
        l1dir_size: 1,
        file_sectors: 64,
        cylinders: 32,
        heads: 16,
        sectors_per_track: 63,
    };
    let mut f = vec![0u8; 64 * 512];
    f[..44].copy_from_slice(&h.serialize());
    // qemu insists on finding a CID at 0x200 of a COWD file.
    let text = b"CID=fffffffe\nparentCID=ffffffff\n";
    f[512..512 + text.len()].copy_from_slice(text);
    f[4 * 512..4 * 512 + 4].copy_from_slice(&8u32.to_le_bytes());
    let mut expect = vec![0u8; 16 << 20];
    for (i, (g, sector)) in [(0usize, 40usize), (100, 48), (4095, 56)]
        .into_iter()
        .enumerate()
    {
        f[8 * 512 + g * 4..8 * 512 + g * 4 + 4].copy_from_slice(&(sector as u32).to_le_bytes());
        let data: Vec<u8> = (0..4096)
            .map(|k| (k as u8).wrapping_mul(3) ^ (i as u8 + 1))
            .collect();
        f[sector * 512..sector * 512 + 4096].copy_from_slice(&data);
        expect[g * 4096..(g + 1) * 4096].copy_from_slice(&data);
    }
    std::fs::write(path, f).unwrap();
    expect
}

#[test]
fn cowd_extents_read_like_qemu() {
    let d = scratch();
    let cowd = d.path().join("cowd.vmdk");
    let expect = make_cowd(&cowd);
    let q = d.path().join("q.raw");
    qemu_img(&["convert", "-O", "raw", s(&cowd), s(&q)]);
    assert_eq!(
        std::fs::read(&q).unwrap(),
        expect,
        "qemu's reading of the hand-made COWD"
    );
    check_to_raw(&cowd, d.path());
    let img = imgconv::open(&cowd, &OpenOptions::default()).unwrap();
    let mut b = vec![0u8; expect.len()];
    img.device().read_at(&mut b, 0).unwrap();
    assert!(b == expect);
    // Named by a descriptor as a VMFSSPARSE extent.
    let desc = d.path().join("delta.vmdk");
    std::fs::write(
        &desc,
        "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"vmfsSparse\"\n\
         RW 32768 VMFSSPARSE \"cowd.vmdk\"\n",
    )
    .unwrap();
    check_to_raw(&desc, d.path());
    // A directory too small for the disk, or pointing past the end, is refused.
    let orig = std::fs::read(&cowd).unwrap();
    for (what, bytes) in [
        ("no directory", patched(&orig, 24, 0, 4)),
        ("directory past EOF", patched(&orig, 20, 1 << 20, 4)),
        ("table past EOF", patched(&orig, 4 * 512, 1 << 20, 4)),
        ("grain past EOF", patched(&orig, 8 * 512, 1 << 20, 4)),
        ("granularity 0", patched(&orig, 16, 0, 4)),
    ] {
        let p = d.path().join("bad-cowd.vmdk");
        std::fs::write(&p, &bytes).unwrap();
        let e = open_err(&p, &OpenOptions::default());
        assert!(
            matches!(e, Error::Corrupt { format: "vmdk", .. }),
            "{what}: {e:?}"
        );
    }
}

/// Writes a streamOptimized file in open-vmdk's layout: header v3 with a real
/// gdOffset and no redundant GD, GD and GT right after the descriptor, compressed
/// grains with markers, no GT/GD markers, no footer, one end-of-stream sector.
fn make_open_vmdk_stream(path: &Path, guest: &[u8]) {
    use imgconv::format::vmdk::header::{SparseHeader, NEWLINE_BYTES};
    use std::io::Write;
    let grain = 65536usize;
    let capacity = (guest.len() / 512) as u64;
    let grains = guest.len().div_ceil(grain);
    assert!(grains <= 512);
    let h = SparseHeader {
        version: 3,
        flags: 0x30001,
        capacity,
        grain_size: 128,
        descriptor_offset: 1,
        descriptor_size: 20,
        num_gtes_per_gt: 512,
        rgd_offset: 0,
        gd_offset: 21,
        overhead: 128,
        unclean_shutdown: false,
        newline_bytes: NEWLINE_BYTES,
        compress_algorithm: 1,
    };
    let mut f = vec![0u8; 128 * 512];
    f[..512].copy_from_slice(&h.serialize());
    let desc = format!(
        "# Disk DescriptorFile\nversion=1\nCID=0badcafe\nparentCID=ffffffff\n\
         createType=\"streamOptimized\"\n\nRW {capacity} SPARSE \"ov.vmdk\"\n\n\
         ddb.adapterType = \"lsilogic\"\n"
    );
    f[512..512 + desc.len()].copy_from_slice(desc.as_bytes());
    f[21 * 512..21 * 512 + 4].copy_from_slice(&22u32.to_le_bytes());
    for g in 0..grains {
        let data = &guest[g * grain..((g + 1) * grain).min(guest.len())];
        if data.iter().all(|&b| b == 0) {
            continue;
        }
        let sector = (f.len() / 512) as u32;
        f[22 * 512 + g * 4..22 * 512 + g * 4 + 4].copy_from_slice(&sector.to_le_bytes());
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(data).unwrap();
        let c = z.finish().unwrap();
        f.extend_from_slice(&((g * 128) as u64).to_le_bytes());
        f.extend_from_slice(&(c.len() as u32).to_le_bytes());
        f.extend_from_slice(&c);
        f.resize(f.len().div_ceil(512) * 512, 0);
    }
    f.extend_from_slice(&[0u8; 512]);
    std::fs::write(path, f).unwrap();
}

#[test]
fn open_vmdk_stream_layout_reads_like_qemu() {
    let d = scratch();
    let raw = d.path().join("g.raw");
    make_raw(
        &raw,
        8 << 20,
        &[
            (0, 70_000, 1),
            (3 << 20, 4096, 2),
            ((8 << 20) - 512, 512, 3),
        ],
    );
    let guest = std::fs::read(&raw).unwrap();
    let ov = d.path().join("ov.vmdk");
    make_open_vmdk_stream(&ov, &guest);
    assert_same(&raw, &ov); // qemu's reading
    check_to_raw(&ov, d.path()); // ours, random access
    let opened = open_piped(Box::new(std::fs::File::open(&ov).unwrap()));
    let out = d.path().join("piped.raw");
    stream_to_raw(&opened, &out).unwrap();
    assert_same(&raw, &out); // ours, sequential
}

#[test]
fn mutated_images_never_panic() {
    use rand::{Rng, SeedableRng};
    let d = scratch();
    let raw = d.path().join("m.raw");
    make_raw(&raw, 1 << 20, &[(0, 70_000, 1), (600_000, 5000, 2)]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let mut tried = 0;
    for sf in ["monolithicSparse", "streamOptimized"] {
        let f = d.path().join(format!("{sf}.vmdk"));
        imgconv_convert("vmdk", &format!("subformat={sf}"), &raw, &f);
        let orig = std::fs::read(&f).unwrap();
        // Metadata lives in the first 64 KiB and (streams) the last 3 KiB.
        let hot: Vec<usize> = (0..65536).chain(orig.len() - 3072..orig.len()).collect();
        for _ in 0..400 {
            let mut m = orig.clone();
            for _ in 0..rng.gen_range(1..6) {
                let at = hot[rng.gen_range(0..hot.len())];
                m[at] = rng.gen();
            }
            if rng.gen_bool(0.1) {
                m.truncate(rng.gen_range(0..orig.len()));
            }
            let p = d.path().join("mut.vmdk");
            std::fs::write(&p, &m).unwrap();
            let t = Instant::now();
            if let Ok(img) = imgconv::open(&p, &OpenOptions::default()) {
                let size = img.size().min(64 << 20);
                let mut buf = vec![0u8; 1 << 20];
                let mut off = 0;
                while off < size {
                    let n = (size - off).min(buf.len() as u64) as usize;
                    if img.device().read_at(&mut buf[..n], off).is_err() {
                        break;
                    }
                    let _ = img.device().map(off, n as u64);
                    off += n as u64;
                }
            }
            if sf == "streamOptimized" {
                let ctx = imgconv::image::OpenContext::detached("-", &OpenOptions::default());
                let r = Box::new(std::io::Cursor::new(m.clone()));
                if let Ok(o) = imgconv::format::vmdk::open_stream(r, &ctx) {
                    let size = o.device.size().min(64 << 20);
                    let mut off = 0;
                    while off < size {
                        let Ok(e) = o.device.map(off, size - off) else {
                            break;
                        };
                        let mut buf = vec![0u8; e.len.min(1 << 20) as usize];
                        if o.device.read_at(&mut buf, off).is_err() {
                            break;
                        }
                        off += buf.len() as u64;
                    }
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "slow on a mutation of {sf}"
            );
            tried += 1;
        }
    }
    assert_eq!(tried, 800);
}

#[test]
fn empty_disks_and_descriptors_inside_sparse_headers() {
    let d = scratch();
    let zero = d.path().join("zero.raw");
    std::fs::write(&zero, b"").unwrap();
    for sf in SUBFORMATS {
        let o = d.path().join(format!("z-{sf}.vmdk"));
        imgconv_convert("vmdk", &format!("subformat={sf}"), &zero, &o);
        // qemu-img 10.0 cannot open empty VMDKs, not even its own (it takes a 0-sector
        // sparse file for a descriptor, and aborts on a descriptor with no extents), so
        // only imgconv reads these back.
        let out = d.path().join(format!("z-{sf}.raw"));
        imgconv(&["convert", "-O", "raw", s(&o), s(&out)]);
        assert_eq!(std::fs::metadata(&out).unwrap().len(), 0);
        let img = imgconv::open(&o, &OpenOptions::untrusted().metadata_only()).unwrap();
        assert_eq!(img.size(), 0);
    }
    // A KDMV header of capacity 0 whose embedded descriptor lists the extents.
    use imgconv::format::vmdk::header::{SparseHeader, NEWLINE_BYTES};
    let flat = d.path().join("data.raw");
    make_raw(&flat, 1 << 20, &[(0, 1 << 20, 5)]);
    let h = SparseHeader {
        version: 1,
        flags: 3,
        capacity: 0,
        grain_size: 128,
        descriptor_offset: 1,
        descriptor_size: 2,
        num_gtes_per_gt: 512,
        rgd_offset: 0,
        gd_offset: 0,
        overhead: 3,
        unclean_shutdown: false,
        newline_bytes: NEWLINE_BYTES,
        compress_algorithm: 0,
    };
    let mut f = vec![0u8; 3 * 512];
    f[..512].copy_from_slice(&h.serialize());
    let text = b"# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n\
                 createType=\"monolithicFlat\"\nRW 2048 FLAT \"data.raw\" 0\n";
    f[512..512 + text.len()].copy_from_slice(text);
    let w = d.path().join("wrapped.vmdk");
    std::fs::write(&w, f).unwrap();
    let img = imgconv::open(&w, &OpenOptions::default()).unwrap();
    assert_eq!(img.size(), 1 << 20);
    let out = d.path().join("wrapped.raw");
    imgconv(&["convert", "-O", "raw", s(&w), s(&out)]);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&flat).unwrap());
    let e = open_err(&w, &OpenOptions::untrusted());
    assert!(matches!(e, Error::UntrustedReference { .. }), "{e:?}");
}
