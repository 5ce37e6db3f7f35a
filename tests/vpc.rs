//! VHD (`vpc`): reading qemu-img's images in every variant and every VHD of the corpus as
//! qemu-img reads them, differencing images over their parents, writing images that
//! qemu-img, libvhdi and dissect.hypervisor read identically, qemu-img's layout for the
//! Azure recipe, `check`, and the options and refusals.

mod common;
mod vhd_builder;
use common::*;
use vhd_builder::Vhd;

use std::path::{Path, PathBuf};

use imgconv::format::vpc::header::{Footer, Uuid};
use imgconv::{BlockDevice, OpenOptions};

const MIB: u64 = 1 << 20;

/// A raw file of `size` bytes with data at a few places (the rest sparse), including
/// the last bytes.
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
}

fn info_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&imgconv(&["info", "--output=json", s(p)])).unwrap()
}

fn qemu_vpc_info(p: &Path) -> serde_json::Value {
    serde_json::from_str(&qemu_img(&["info", "-f", "vpc", "--output=json", s(p)])).unwrap()
}

/// Converts `vhd` to raw with imgconv and asserts qemu-img reads `vhd` the same, and
/// that `info` gives qemu-img's virtual size and cluster size.
fn assert_reads_like_qemu(vhd: &Path, dir: &Path) {
    let out = dir.join(format!(
        "{}.out.raw",
        vhd.file_name().unwrap().to_string_lossy()
    ));
    imgconv(&["convert", "-O", "raw", s(vhd), s(&out)]);
    assert_same_fmt(vhd, "vpc", &out, "raw");
    let (ours, q) = (info_json(vhd), qemu_vpc_info(vhd));
    assert_eq!(ours["format"], "vpc", "{}", vhd.display());
    for k in ["virtual-size", "cluster-size", "dirty-flag"] {
        assert_eq!(ours[k], q[k], "{}: {k}", vhd.display());
    }
    assert_eq!(std::fs::metadata(&out).unwrap().len(), q["virtual-size"]);
    std::fs::remove_file(out).unwrap();
}

/// A Python interpreter that can import `module` (the system one may differ from the
/// first on the PATH).
fn python_with(module: &str) -> &'static str {
    for py in ["python3", "/usr/bin/python3"] {
        if std::process::Command::new(py)
            .args(["-c", &format!("import {module}")])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return py;
        }
    }
    panic!("no python3 can import {module} (.ci/run installs it)");
}

/// The guest bytes of `vhd` as libvhdi (pyvhdi) reads them, over `parent` if given.
fn libvhdi_read(vhd: &Path, parent: Option<&Path>) -> Vec<u8> {
    let script = r#"
import sys, pyvhdi
f = pyvhdi.file()
f.open(sys.argv[1])
if len(sys.argv) > 2:
    p = pyvhdi.file()
    p.open(sys.argv[2])
    f.set_parent(p)
n = f.media_size
out = sys.stdout.buffer
off = 0
while off < n:
    k = min(1 << 20, n - off)
    b = f.read_buffer_at_offset(k, off)
    assert len(b) == k, (off, len(b))
    out.write(b)
    off += k
"#;
    let mut args = vec!["-c", script, s(vhd)];
    if let Some(p) = parent {
        args.push(s(p));
    }
    let o = run(python_with("pyvhdi"), &args);
    assert!(
        o.status.success(),
        "libvhdi failed on {}: {}",
        vhd.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

/// The guest bytes of `vhd` as dissect.hypervisor reads them.
fn dissect_read(vhd: &Path) -> Vec<u8> {
    let script = r#"
import sys
from dissect.hypervisor.disk.vhd import VHD
v = VHD(open(sys.argv[1], "rb"))
out = sys.stdout.buffer
off = 0
while off < v.size:
    k = min(1 << 20, v.size - off)
    v.seek(off)
    b = v.read(k)
    assert len(b) == k, (off, len(b))
    out.write(b)
    off += k
"#;
    let o = run(python_with("dissect.hypervisor"), &["-c", script, s(vhd)]);
    assert!(
        o.status.success(),
        "dissect.hypervisor failed on {}: {}",
        vhd.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

/// `want` followed by zeros up to `len` bytes.
fn padded(want: &[u8], len: u64) -> Vec<u8> {
    let mut v = want.to_vec();
    v.resize(len as usize, 0);
    v
}

const VARIANTS: [&str; 4] = [
    "",
    "subformat=fixed",
    "force_size=on",
    "subformat=fixed,force_size=on",
];

#[test]
fn qemu_made_vhds_read_identical() {
    let d = scratch();
    let raw = d.path().join("src.raw");
    sample_raw(&raw, 10 * MIB + 12345);
    for (i, o) in VARIANTS.iter().enumerate() {
        let v = d.path().join(format!("q{i}.vhd"));
        qemu_convert("vpc", o, &raw, &v);
        assert_reads_like_qemu(&v, d.path());
        // Fixed images too are named vpc by probing (qemu-img calls them raw).
        assert_eq!(info_json(&v)["format"], "vpc", "{o}");
    }
}

#[test]
fn qemu_created_sizes_are_read_and_written_alike() {
    let d = scratch();
    let sizes = [
        "512", "1000", "1M", "100M", "31G", "33G", "127G", "128G", "2040G",
    ];
    for size in sizes {
        for o in [
            "",
            "force_size=on",
            "subformat=fixed",
            "subformat=fixed,force_size=on",
        ] {
            if o.contains("fixed") && size.ends_with('G') {
                continue; // a sparse file of that size is fine, but slow on some file systems
            }
            let q = d.path().join("q.vhd");
            let ours = d.path().join("ours.vhd");
            qemu_create("vpc", o, &q, size);
            let mut args = vec!["create", "-q", "-f", "vpc"];
            if !o.is_empty() {
                args.extend(["-o", o]);
            }
            args.extend([s(&ours), size]);
            imgconv(&args);
            let qi = qemu_vpc_info(&q);
            assert_eq!(
                info_json(&q)["virtual-size"],
                qi["virtual-size"],
                "{size} {o}"
            );
            assert_eq!(
                qemu_vpc_info(&ours)["virtual-size"],
                qi["virtual-size"],
                "{size} {o}: qemu-img reads our size"
            );
            assert_eq!(
                std::fs::metadata(&ours).unwrap().len(),
                std::fs::metadata(&q).unwrap().len(),
                "{size} {o}: file length"
            );
            let (fo, fq) = (read_footer(&ours), read_footer(&q));
            assert_eq!(
                (fo.geometry, fo.current_size, fo.creator_app, fo.data_offset),
                (fq.geometry, fq.current_size, fq.creator_app, fq.data_offset),
                "{size} {o}"
            );
        }
    }
}

/// The footer a reader uses (at 0 for dynamic images, at the end for fixed ones).
fn read_footer(p: &Path) -> Footer {
    let data = std::fs::read(p).unwrap();
    let at = if data.starts_with(b"conectix") {
        0
    } else {
        data.len() - 512
    };
    Footer::validate(&data[at..at + 512], at as u64).unwrap()
}

/// Decompresses corpus file `rel` into `dir`.
fn corpus_vhd(c: &Path, rel: &str, dir: &Path) -> PathBuf {
    let name = rel.rsplit('/').next().unwrap();
    let name = name
        .trim_end_matches(".xz")
        .trim_end_matches(".bz2")
        .trim_end_matches(".gz");
    corpus_file(c, rel, dir, name)
}

#[test]
fn corpus_vhds_read_as_qemu_reads_them() {
    let Some(c) = corpus_dir() else { return };
    let d = scratch();
    for (rel, size) in [
        ("qemu-iotests/hyperv2012r2-dynamic.vhd.bz2", 136365211648u64),
        ("qemu-iotests/virtualpc-dynamic.vhd.bz2", 136363130880),
        ("qemu-iotests/d2v-zerofilled.vhd.bz2", 263454720),
        ("dissect-hypervisor/vhd/dynamic.vhd.gz", 10 * MIB),
        ("dissect-hypervisor/vhd/fixed.vhd.gz", 10 * MIB),
        ("dfvfs/image-2013.vhd.xz", 104448),
        ("freebsd-mkimg/img-1x1-512-mbr.vhd.xz", 6 * MIB),
        ("freebsd-mkimg/img-1x1-512-mbr.vhdf.xz", 4352000),
    ] {
        let v = corpus_vhd(&c, rel, d.path());
        assert_reads_like_qemu(&v, d.path());
        assert_eq!(info_json(&v)["virtual-size"], size, "{rel}");
        std::fs::remove_file(v).unwrap();
    }
    // mkimg's VHDs hold the same disk as its raw baseline.
    let raw = corpus_vhd(&c, "freebsd-mkimg/img-1x1-512-mbr.raw.xz", d.path());
    for rel in [
        "freebsd-mkimg/img-1x1-512-mbr.vhd.xz",
        "freebsd-mkimg/img-1x1-512-mbr.vhdf.xz",
    ] {
        let v = corpus_vhd(&c, rel, d.path());
        let out = d.path().join("mkimg.raw");
        imgconv(&["convert", "-O", "raw", s(&v), s(&out)]);
        let (a, b) = (std::fs::read(&raw).unwrap(), std::fs::read(&out).unwrap());
        assert_eq!(&b[..a.len()], &a[..], "{rel}");
        assert!(b[a.len()..].iter().all(|&x| x == 0), "{rel}");
    }
}

#[test]
fn corpus_vhds_qemu_refuses_are_refused() {
    let Some(c) = corpus_dir() else { return };
    let d = scratch();
    for (rel, why) in [
        ("qemu-iotests/afl5.img.bz2", "dynamic disk header"),
        ("dfvfs/image.vhd.xz", "checksum"),
        ("dfvfs/image-differential.vhd.xz", "checksum"),
    ] {
        let v = corpus_vhd(&c, rel, d.path());
        let out = d.path().join("out.raw");
        let o = imgconv_out(&["convert", "-f", "vpc", "-O", "raw", s(&v), s(&out)]);
        assert_eq!(o.status.code(), Some(1), "{rel}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("vpc") && err.contains(why), "{rel}: {err}");
        assert!(!out.exists());
        assert!(!run("qemu-img", &["info", "-f", "vpc", s(&v)])
            .status
            .success());
        // Library: a typed error naming the format.
        match imgconv::open(&v, &OpenOptions::default()) {
            Err(imgconv::Error::Corrupt { format, .. }) => assert_eq!(format, "vpc"),
            other => panic!("{rel}: {other:?}"),
        }
    }
}

#[test]
fn our_vhds_read_identically_by_qemu_libvhdi_and_dissect() {
    let d = scratch();
    let raw = d.path().join("src.raw");
    sample_raw(&raw, 7 * MIB + 3 * 512);
    let data = std::fs::read(&raw).unwrap();
    for (i, o) in VARIANTS.iter().enumerate() {
        let v = d.path().join(format!("o{i}.vhd"));
        imgconv_convert("vpc", o, &raw, &v);
        let q = qemu_vpc_info(&v);
        let size = q["virtual-size"].as_u64().unwrap();
        assert!(size >= data.len() as u64, "{o}");
        let want = padded(&data, size);
        assert_same_fmt(&raw, "raw", &v, "vpc");
        let lib = libvhdi_read(&v, None);
        assert!(
            lib == want,
            "{o}: libvhdi reads different bytes ({} bytes)",
            lib.len()
        );
        let dis = dissect_read(&v);
        assert!(
            dis == want,
            "{o}: dissect reads different bytes ({} bytes)",
            dis.len()
        );
        let vi = run_ok("vhdiinfo", &[s(&v)]);
        assert!(vi.contains(&format!("({size} bytes)")), "{o}: {vi}");
        // Only blocks with data are allocated, and holes stay holes.
        if !o.contains("fixed") {
            assert_eq!(info_json(&v)["cluster-size"], 2 * MIB);
        }
        let j = info_json(&v);
        assert!(j["actual-size"].as_u64().unwrap() < 2 * MIB, "{o}: {j}");
    }
}

/// Footer fields that must match qemu-img's (all but timestamp, UUID and checksum).
fn layout_fields(f: &Footer) -> impl PartialEq + std::fmt::Debug {
    (
        f.cookie,
        f.features,
        f.version,
        f.data_offset,
        f.creator_app,
        f.creator_version,
        f.creator_os,
        f.original_size,
        f.current_size,
        f.geometry,
        f.disk_type,
        f.saved_state,
    )
}

#[test]
fn azure_recipe_gives_qemus_layout() {
    let d = scratch();
    let raw = d.path().join("src.raw");
    sample_raw(&raw, 9 * MIB);
    let qcow = d.path().join("in.qcow2");
    qemu_convert("qcow2", "", &raw, &qcow);
    let (q, ours) = (d.path().join("q.vhd"), d.path().join("ours.vhd"));
    for o in [
        "subformat=fixed,force_size",
        "subformat=fixed,force_size=on",
    ] {
        qemu_convert("vpc", o, &qcow, &q);
        imgconv_convert("vpc", o, &qcow, &ours);
        let (fq, fo) = (read_footer(&q), read_footer(&ours));
        assert_eq!(layout_fields(&fo), layout_fields(&fq), "{o}");
        assert_ne!(fo.uuid, Uuid::default());
        assert_eq!(fo.current_size, 9 * MIB);
        assert_eq!(
            std::fs::metadata(&ours).unwrap().len(),
            std::fs::metadata(&q).unwrap().len()
        );
        assert_same_fmt(&q, "vpc", &ours, "vpc");
        assert_same_fmt(&raw, "raw", &ours, "vpc");
        // The data area is the disk, byte for byte, as Azure reads a fixed VHD.
        let b = std::fs::read(&ours).unwrap();
        assert!(b[..9 * MIB as usize] == std::fs::read(&raw).unwrap()[..]);
    }
    // azure=on is the same recipe, by construction.
    let az = d.path().join("az.vhd");
    imgconv_convert("vpc", "azure=on", &qcow, &az);
    assert_eq!(
        layout_fields(&read_footer(&az)),
        layout_fields(&read_footer(&q))
    );
}

#[test]
fn azure_option_refuses_or_rounds_sizes_that_are_not_whole_mib() {
    let d = scratch();
    let raw = d.path().join("odd.raw");
    sample_raw(&raw, 6 * MIB + 512);
    let out = d.path().join("az.vhd");
    assert_convert_refused("vpc", "azure=on", &raw, &out);
    let o = imgconv_out(&["convert", "-O", "vpc", "-o", "azure=on", s(&raw), s(&out)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("whole number of MiB") && err.contains("azure=round"),
        "{err}"
    );
    for bad in [
        "azure=on,subformat=dynamic",
        "azure=round,force_size=off",
        "azure=yes",
    ] {
        assert_convert_refused("vpc", bad, &raw, &out);
    }
    imgconv_convert("vpc", "azure=round", &raw, &out);
    let f = read_footer(&out);
    assert_eq!(f.current_size, 7 * MIB);
    assert_eq!(&f.creator_app, b"qem2");
    assert_eq!(f.disk_type, 2);
    assert_eq!(qemu_vpc_info(&out)["virtual-size"], 7 * MIB);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 7 * MIB + 512);
    assert_same_fmt(&raw, "raw", &out, "vpc");
}

#[test]
fn writer_refusals() {
    let d = scratch();
    let raw = d.path().join("src.raw");
    sample_raw(&raw, 2 * MIB);
    let out = d.path().join("o.vhd");
    for bad in [
        "cluster_size=64k",
        "subformat=streamOptimized",
        "force_size=maybe",
    ] {
        assert_convert_refused("vpc", bad, &raw, &out);
    }
    let o = imgconv_out(&["convert", "-c", "-O", "vpc", s(&raw), s(&out)]);
    assert_eq!(o.status.code(), Some(1));
    let o = imgconv_out(&["convert", "-O", "vpc", s(&raw), "-"]);
    assert_eq!(o.status.code(), Some(1));
    // Larger than 2040 GiB, as qemu-img refuses.
    let o = imgconv_out(&["create", "-f", "vpc", s(&out), "2041G"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(!out.exists());
}

#[test]
fn differencing_image_reads_through_its_parent() {
    let d = scratch();
    // The parent: a dynamic image with data everywhere in its first 3 blocks.
    let praw = d.path().join("parent.raw");
    make_raw(&praw, 4 * MIB, &[(0, 3 * MIB as usize, 0x20)]);
    let parent = d.path().join("parent.vhd");
    imgconv_convert("vpc", "force_size=on", &praw, &parent);
    let puuid = read_footer(&parent).uuid;
    // The child: 64 KiB blocks, one with a partial bitmap, one full, one with an empty
    // bitmap, the rest unallocated; relative and absolute locators and a parent name.
    let child = Vhd::differencing(4 * MIB, 64 << 10, puuid)
        .windows_locator(b"W2ku", "D:\\vms\\parent.vhd")
        .windows_locator(b"W2ru", ".\\parent.vhd")
        .block(0, [0, 1, 2, 100, 127], 0xC1)
        .block(5, 0..128, 0xC5)
        .block(9, [], 0xC9)
        .block(40, (0..128).step_by(3), 0xD0);
    let mut child = child;
    child.parent_name = "D:\\vms\\parent.vhd".into();
    let cpath = d.path().join("child.vhd");
    child.write(&cpath);
    let want = child.overlay(&std::fs::read(&praw).unwrap());

    let out = d.path().join("flat.raw");
    imgconv(&["convert", "-O", "raw", s(&cpath), s(&out)]);
    assert!(std::fs::read(&out).unwrap() == want, "imgconv");
    // libvhdi, given the parent, reads the same where whole blocks are in the child or
    // not (libvhdi 20210425 misreads partial bitmaps: it takes a few sectors after each
    // run of present sectors from the child too, against the Windows-made image of the
    // dfvfs corpus, whose present sectors are exactly those holding data).
    let whole = Vhd::differencing(4 * MIB, 64 << 10, puuid)
        .windows_locator(b"W2ru", "parent.vhd")
        .block(5, 0..128, 0xC5)
        .block(9, [], 0xC9)
        .block(63, 0..128, 0xCF);
    let wpath = d.path().join("whole.vhd");
    whole.write(&wpath);
    let wout = d.path().join("whole.raw");
    imgconv(&["convert", "-O", "raw", s(&wpath), s(&wout)]);
    let wwant = whole.overlay(&std::fs::read(&praw).unwrap());
    assert!(
        std::fs::read(&wout).unwrap() == wwant,
        "imgconv, whole blocks"
    );
    assert!(
        libvhdi_read(&wpath, Some(&parent)) == wwant,
        "libvhdi, whole blocks"
    );

    // Plain info opens no parent (as qemu-img's, for any backing file): the chain does.
    let chain: serde_json::Value = serde_json::from_str(&imgconv(&[
        "info",
        "--backing-chain",
        "--output=json",
        s(&cpath),
    ]))
    .unwrap();
    let j = chain[0].clone();
    assert_eq!(j["virtual-size"], 4 * MIB);
    assert_eq!(j["backing-filename"], ".\\parent.vhd");
    assert_eq!(j["backing-filename-format"], "vpc");
    let refs: Vec<&str> = j["references"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["field"].as_str().unwrap())
        .collect();
    assert_eq!(refs, ["parent locator W2ru", "parent locator W2ku"]);

    // The map tells this image's sectors from the parent's, and the parent's unallocated
    // blocks as unallocated.
    let img = imgconv::open(&cpath, &OpenOptions::default()).unwrap();
    let e = img.device().map(0, 4 * MIB).unwrap();
    assert_eq!((e.len, e.depth), (3 * 512, 0));
    let e = img.device().map(3 * 512, 4 * MIB).unwrap();
    assert_eq!(e.depth, 1);
    let e = img.device().map(5 * (64 << 10), 4 * MIB).unwrap();
    assert_eq!(
        (e.len, e.depth, e.kind),
        (64 << 10, 0, imgconv::ExtentKind::Data)
    );
    let e = img.device().map(3 * MIB, 4 * MIB).unwrap();
    assert_eq!((e.depth, e.len), (1, MIB));

    // Untrusted: refused, naming the locator; info lists the references.
    let o = imgconv_out(&["convert", "--untrusted", "-O", "raw", s(&cpath), s(&out)]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("parent locator W2ru"), "{err}");
    let o = imgconv(&["info", "--untrusted", "--details", s(&cpath)]);
    assert!(
        o.contains("parent locator W2ku: D:\\vms\\parent.vhd"),
        "{o}"
    );

    // Another parent (same name, another UUID) is refused.
    imgconv_convert("vpc", "force_size=on", &praw, &parent);
    let o = imgconv_out(&["convert", "-O", "raw", s(&cpath), s(&out)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("UUID"));
    // No parent at all: the error names what was tried.
    std::fs::remove_file(&parent).unwrap();
    let o = imgconv_out(&["info", "--backing-chain", s(&cpath)]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not found") && err.contains("W2ru"), "{err}");
}

#[test]
fn dfvfs_differencing_image_over_a_made_parent() {
    let Some(c) = corpus_dir() else { return };
    let d = scratch();
    let child = corpus_vhd(&c, "dfvfs/fat-differential.vhd.xz", d.path());
    // Without its parent (absent from the corpus) it is refused, naming the locators.
    let o = imgconv_out(&["info", "--backing-chain", s(&child)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("fat-parent.vhd"));
    // A stand-in parent with the UUID the child names: the child's sectors come from the
    // child, all others from the parent.
    let praw = d.path().join("p.raw");
    std::fs::write(&praw, vec![0x40u8; 4 * MIB as usize]).unwrap();
    let parent = d.path().join("fat-parent.vhd");
    imgconv_convert("vpc", "subformat=fixed,force_size=on", &praw, &parent);
    let want_uuid = {
        let b = std::fs::read(&child).unwrap();
        imgconv::format::vpc::header::DynamicHeader::parse(b[512..1536].try_into().unwrap())
            .parent_uuid
    };
    vhd_builder::patch_footer(&parent, |f| f.uuid = want_uuid);
    let out = d.path().join("out.raw");
    imgconv(&["convert", "-O", "raw", s(&child), s(&out)]);
    let got = std::fs::read(&out).unwrap();
    // Windows marked present exactly the sectors of block 0 that hold data: those come
    // from the child (as qemu-img, which ignores the parent, reads them), every other
    // sector from the parent.
    let qraw = d.path().join("q.raw");
    qemu_img(&["convert", "-f", "vpc", "-O", "raw", s(&child), s(&qraw)]);
    let q = std::fs::read(&qraw).unwrap();
    assert_eq!(got.len(), q.len());
    let present = [
        134, 143, 152, 153, 154, 155, 156, 157, 158, 159, 184, 185, 188, 190, 191, 192, 194, 196,
    ];
    let mut with_data = Vec::new();
    for (i, (a, b)) in got.chunks(512).zip(q.chunks(512)).enumerate() {
        if present.contains(&i) {
            assert_eq!(a, b, "sector {i}");
        } else {
            assert!(a.iter().all(|&x| x == 0x40), "sector {i}");
        }
        if b.iter().any(|&x| x != 0) {
            with_data.push(i);
        }
    }
    assert!(
        with_data.iter().all(|i| present.contains(i)),
        "{with_data:?}"
    );
    assert_eq!(with_data.len(), 9);
}

#[test]
fn check_reports_corruptions() {
    let d = scratch();
    let raw = d.path().join("src.raw");
    sample_raw(&raw, 8 * MIB);
    let v = d.path().join("v.vhd");
    imgconv_convert("vpc", "", &raw, &v);
    let o = imgconv_out(&["check", s(&v)]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let fixed = d.path().join("f.vhd");
    imgconv_convert("vpc", "subformat=fixed", &raw, &fixed);
    assert_eq!(imgconv_out(&["check", s(&fixed)]).status.code(), Some(0));
    // qemu-img has no check for vpc.
    assert_eq!(run("qemu-img", &["check", s(&v)]).status.code(), Some(63));

    let bat = vhd_builder::read_bat(&v);
    let used: Vec<usize> = (0..bat.len()).filter(|&i| bat[i] != u32::MAX).collect();
    assert!(used.len() >= 2);
    for (what, patch) in [
        ("past the end", 0x7FFF_0000u32),
        ("overlaps the BAT", 3),
        ("overlaps block", bat[used[1]]),
    ] {
        let p = d.path().join("bad.vhd");
        std::fs::copy(&v, &p).unwrap();
        vhd_builder::patch_bat(&p, used[0], patch);
        let o = imgconv_out(&["check", "--output=json", s(&p)]);
        assert_eq!(o.status.code(), Some(2), "{what}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(what), "{what}: {err}");
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(j["corruptions"].as_u64().unwrap() >= 1);
        assert_eq!(j["format"], "vpc");
        // Opening refuses it, naming the BAT entry.
        let o = imgconv_out(&["info", s(&p)]);
        assert_eq!(o.status.code(), Some(1));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("BAT entry"),
            "{what}"
        );
    }
    let p = d.path().join("badsum.vhd");
    std::fs::copy(&v, &p).unwrap();
    vhd_builder::patch_header(&p, false, |h| h.parent_timestamp = 7);
    let o = imgconv_out(&["check", s(&p)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("checksum"));
}

#[test]
fn compressed_and_piped_vhds_are_read() {
    let d = scratch();
    let raw = d.path().join("src.raw");
    sample_raw(&raw, 6 * MIB);
    for (name, o, flags) in [
        ("dyn.vhd", "", vec![]),
        ("fixed.vhd", "subformat=fixed", vec!["-f", "vpc"]),
    ] {
        let v = d.path().join(name);
        imgconv_convert("vpc", o, &raw, &v);
        run_ok("xz", &["-k", "-T1", "-1", s(&v)]);
        let xz = d.path().join(format!("{name}.xz"));
        let out = d.path().join("out.raw");
        let mut args = vec!["convert"];
        args.extend(&flags);
        args.extend(["-O", "raw", s(&xz), s(&out)]);
        imgconv(&args);
        assert_same_fmt(&v, "vpc", &out, "raw");
        let mut args = vec!["info", "--output=json"];
        args.extend(&flags);
        args.push(s(&xz));
        let j: serde_json::Value = serde_json::from_str(&imgconv(&args)).unwrap();
        assert_eq!(j["format"], "vpc");
        assert_eq!(j["compression"], "xz");
        // From a pipe: spooled, then read.
        let piped = std::process::Command::new(imgconv_bin())
            .arg("convert")
            .args(&flags)
            .args(["-O", "raw", "-", s(&out)])
            .stdin(std::fs::File::open(&v).unwrap())
            .output()
            .unwrap();
        assert!(
            piped.status.success(),
            "{}",
            String::from_utf8_lossy(&piped.stderr)
        );
        assert_same_fmt(&v, "vpc", &out, "raw");
    }
}

#[test]
fn measure_and_map_of_vhd_sources() {
    let d = scratch();
    let raw = d.path().join("src.raw");
    sample_raw(&raw, 12 * MIB);
    let v = d.path().join("v.vhd");
    qemu_convert("vpc", "force_size=on", &raw, &v);
    for o in ["qcow2", "raw"] {
        let ours = imgconv(&["measure", "--output=json", "-O", o, s(&v)]);
        let q = qemu_img(&["measure", "--output=json", "-O", o, "-f", "vpc", s(&v)]);
        let (a, b): (serde_json::Value, serde_json::Value) = (
            serde_json::from_str(&ours).unwrap(),
            serde_json::from_str(&q).unwrap(),
        );
        assert_eq!(a["required"], b["required"], "{o}");
        assert_eq!(a["fully-allocated"], b["fully-allocated"], "{o}");
    }
    // Unallocated blocks map as such, so a conversion stays sparse.
    let q2 = d.path().join("o.qcow2");
    imgconv(&["convert", "-O", "qcow2", s(&v), s(&q2)]);
    assert_same_fmt(&v, "vpc", &q2, "qcow2");
    let m = imgconv(&["map", "--output=json", s(&v)]);
    assert!(m.contains("\"data\": false"), "{m}");
}

#[test]
fn fixed_vhd_with_an_old_511_byte_footer_is_read() {
    let d = scratch();
    let raw = d.path().join("src.raw");
    sample_raw(&raw, 6 * MIB);
    let v = d.path().join("old.vhd");
    imgconv_convert("vpc", "subformat=fixed,force_size=on", &raw, &v);
    // Virtual PC before 2004 wrote the footer without its last (reserved, zero) byte.
    let mut b = std::fs::read(&v).unwrap();
    assert_eq!(b.pop(), Some(0));
    std::fs::write(&v, &b).unwrap();
    assert_eq!(info_json(&v)["format"], "vpc");
    assert_eq!(info_json(&v)["virtual-size"], 6 * MIB);
    let out = d.path().join("out.raw");
    imgconv(&["convert", "-O", "raw", s(&v), s(&out)]);
    assert_same_fmt(&raw, "raw", &out, "raw");
    // qemu-img reads it too (its file layer rounds the length up to a sector, which puts
    // the footer back in the last 512 bytes).
    assert_reads_like_qemu(&v, d.path());
}
