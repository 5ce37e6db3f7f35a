//! `imgconv check` on VMDK and VDI images, judged against `qemu-img check`: the exit
//! code and every `ERROR` line must agree, on qemu-made and imgconv-made images, on
//! corpus images from VirtualBox and VMware, and on images damaged on purpose.

mod common;
use common::*;

use std::path::{Path, PathBuf};

/// Exit code, the `ERROR` lines of stderr, and stdout of a check run.
fn verdict(cmd: &str, args: &[&str]) -> (Option<i32>, Vec<String>, String) {
    let o = run(cmd, args);
    let err = String::from_utf8_lossy(&o.stderr);
    let errors = err
        .lines()
        .filter(|l| l.starts_with("ERROR"))
        .map(str::to_string)
        .collect();
    (
        o.status.code(),
        errors,
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

/// Checks `img` with both tools (human and JSON output) and asserts they agree;
/// returns the exit code.
fn agree(img: &Path) -> Option<i32> {
    let q = verdict("qemu-img", &["check", s(img)]);
    let o = verdict(imgconv_bin(), &["check", s(img)]);
    assert_eq!(o.0, q.0, "exit code for {}", img.display());
    assert_eq!(o.1, q.1, "ERROR lines for {}", img.display());
    assert_eq!(o.2, q.2, "summary for {}", img.display());
    let q = verdict("qemu-img", &["check", "--output=json", s(img)]);
    let o = verdict(imgconv_bin(), &["check", "--output=json", s(img)]);
    assert_eq!(o.0, q.0, "json exit code for {}", img.display());
    if q.0 != Some(1) {
        let qj: serde_json::Value = serde_json::from_str(&q.2).unwrap();
        let oj: serde_json::Value = serde_json::from_str(&o.2).unwrap();
        assert_eq!(oj, qj, "json for {}", img.display());
    }
    q.0
}

/// A 4 MiB image of `fmt` made by qemu-img with some data written by qemu-io.
fn qemu_image(dir: &Path, name: &str, fmt: &str, opts: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_create(fmt, opts, &p, "4M");
    if !opts.contains("streamOptimized") {
        qemu_io(&[
            "-f",
            fmt,
            "-c",
            "write -P 0x61 0 1M",
            "-c",
            "write -P 0x62 2M 192k",
            s(&p),
        ]);
    }
    p
}

/// A copy of `src` named `name` with `patch` applied to its bytes.
fn damaged(src: &Path, name: &str, patch: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut b = std::fs::read(src).unwrap();
    patch(&mut b);
    let p = src.with_file_name(name);
    std::fs::write(&p, b).unwrap();
    p
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Byte offset of the first grain table of a monolithicSparse VMDK.
fn first_gt(b: &[u8]) -> usize {
    let gd = u64::from_le_bytes(b[56..64].try_into().unwrap()) as usize * 512;
    le32(b, gd) as usize * 512
}

/// VDI header fields (offsets in the file, v1.1 header after the 0x48-byte pre-header).
const VDI_BLOCKS_OFFSET: usize = 0x154;
const VDI_BLOCKS_ALLOCATED: usize = 0x184;

#[test]
fn healthy_qemu_images_check_clean_like_qemu() {
    let d = scratch();
    for (name, fmt, opts) in [
        ("sparse.vmdk", "vmdk", ""),
        ("flat.vmdk", "vmdk", "subformat=monolithicFlat"),
        ("split.vmdk", "vmdk", "subformat=twoGbMaxExtentSparse"),
        ("stream.vmdk", "vmdk", "subformat=streamOptimized"),
        ("dynamic.vdi", "vdi", ""),
        ("static.vdi", "vdi", "static=on"),
    ] {
        let p = qemu_image(d.path(), name, fmt, opts);
        assert_eq!(agree(&p), Some(0), "{name}");
    }
}

#[test]
fn imgconv_made_images_check_clean() {
    let d = scratch();
    let src = d.path().join("src.raw");
    make_raw(
        &src,
        3 << 20,
        &[(0, 300_000, 0x33), (2 << 20, 70_000, 0x44)],
    );
    for (name, fmt, opts) in [
        ("out.vmdk", "vmdk", ""),
        ("outs.vmdk", "vmdk", "subformat=streamOptimized"),
        ("out.vdi", "vdi", ""),
        ("outst.vdi", "vdi", "static=on"),
    ] {
        let p = d.path().join(name);
        imgconv_convert(fmt, opts, &src, &p);
        assert_eq!(agree(&p), Some(0), "{name}");
    }
}

#[test]
fn corpus_images_check_like_qemu() {
    let Some(c) = corpus_dir() else { return };
    let d = scratch();
    for (rel, name) in [
        ("virtualbox/TestHD-vbox3.vdi.xz", "vbox3.vdi"),
        ("virtualbox/TestHD-vbox4.0.8.vdi.xz", "vbox4.vdi"),
        ("dissect-hypervisor/vdi/basic.vdi.gz", "basic.vdi"),
        ("dfvfs/image.vmdk.xz", "image.vmdk"),
        (
            "vagrant-mutate/virtualbox-box-disk1.vmdk.xz",
            "vagrant.vmdk",
        ),
        ("qemu-iotests/iotest-version3.vmdk.bz2", "v3.vmdk"),
    ] {
        let p = corpus_file(&c, rel, d.path(), name);
        agree(&p);
    }
}

#[test]
fn vmdk_grains_past_the_end_of_the_file() {
    let d = scratch();
    let src = qemu_image(d.path(), "base.vmdk", "vmdk", "");
    let sectors = (std::fs::metadata(&src).unwrap().len() / 512) as u32;
    // Grain 1 (sector 128) past EOF: QEMU stops there, "Check failed", exit 1.
    let one = damaged(&src, "one.vmdk", |b| {
        let gt = first_gt(b);
        put32(b, gt + 4, sectors + 1000);
    });
    assert_eq!(agree(&one), Some(1));
    // Two bad grains: only the first is reported.
    let two = damaged(&src, "two.vmdk", |b| {
        let gt = first_gt(b);
        put32(b, gt + 20 * 4, sectors + 5);
        put32(b, gt + 30 * 4, sectors + 9);
    });
    assert_eq!(agree(&two), Some(1));
    let (_, errors, _) = verdict(imgconv_bin(), &["check", s(&two)]);
    assert_eq!(
        errors,
        ["ERROR: cluster offset for sector 2560 points after EOF"]
    );
    // A delta disk over the damaged image: only the delta is checked.
    let child = d.path().join("child.vmdk");
    qemu_img(&overlay_args("vmdk", &["-q"], "one.vmdk", &child, ""));
    qemu_io(&["-c", "write -P 0x63 3M 64k", s(&child)]);
    assert_eq!(agree(&child), Some(0));
    // Repairs are refused as qemu-img refuses them.
    let o = imgconv_out(&["check", "-r", "leaks", s(&src)]);
    assert_eq!(o.status.code(), Some(63));
}

#[test]
fn vmdk_split_extents_report_the_guest_sector() {
    let d = scratch();
    let p = d.path().join("split.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=twoGbMaxExtentSparse",
        s(&p),
        "3G",
    ]);
    qemu_io(&["-c", "write -P 0x64 2047M 2M", s(&p)]);
    assert_eq!(agree(&p), Some(0));
    // The fourth grain of the second extent points past the end of its file.
    let ext = d.path().join("split-s002.vmdk");
    let mut b = std::fs::read(&ext).unwrap();
    let gt = first_gt(&b);
    let sectors = (b.len() / 512) as u32;
    put32(&mut b, gt + 3 * 4, sectors + 50);
    std::fs::write(&ext, b).unwrap();
    assert_eq!(agree(&p), Some(1));
    let (_, errors, _) = verdict(imgconv_bin(), &["check", s(&p)]);
    assert_eq!(
        errors,
        ["ERROR: cluster offset for sector 4194688 points after EOF"]
    );
}

#[test]
fn vdi_block_map_damage() {
    let d = scratch();
    let src = qemu_image(d.path(), "base.vdi", "vdi", "");
    let map_at = |b: &[u8]| le32(b, VDI_BLOCKS_OFFSET) as usize;
    // Two blocks share physical block 0.
    let dup = damaged(&src, "dup.vdi", |b| {
        let m = map_at(b);
        let first = le32(b, m);
        put32(b, m + 4, first);
    });
    assert_eq!(agree(&dup), Some(2));
    // An entry beyond the image's blocks (and the allocated count then disagrees).
    let big = damaged(&src, "big.vdi", |b| {
        let m = map_at(b);
        put32(b, m + 4, 100_000);
    });
    assert_eq!(agree(&big), Some(2));
    // The header's allocated count is wrong.
    let count = damaged(&src, "count.vdi", |b| {
        let n = le32(b, VDI_BLOCKS_ALLOCATED);
        put32(b, VDI_BLOCKS_ALLOCATED, n + 1);
    });
    assert_eq!(agree(&count), Some(2));
    let (_, errors, _) = verdict(imgconv_bin(), &["check", s(&count)]);
    assert_eq!(
        errors,
        ["ERROR: allocated blocks mismatch, is 2, should be 3"]
    );
    // Repairs are refused as qemu-img refuses them.
    for r in ["leaks", "all"] {
        let o = imgconv_out(&["check", "-r", r, s(&dup)]);
        assert_eq!(o.status.code(), Some(63));
    }
}

#[test]
fn vdi_block_past_the_end_of_the_file_is_reported() {
    // QEMU does not look at where blocks are stored; imgconv's reader refuses such an
    // image, so its check reports the block (a deliberate difference).
    let d = scratch();
    let src = qemu_image(d.path(), "base.vdi", "vdi", "");
    let len = std::fs::metadata(&src).unwrap().len();
    let cut = damaged(&src, "cut.vdi", |b| b.truncate(len as usize - (1 << 20)));
    let o = imgconv_out(&["check", s(&cut)]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("ERROR: block 2 is stored at"), "{err}");
}

#[test]
fn raw_images_do_not_support_checks() {
    let d = scratch();
    let p = d.path().join("disk.raw");
    make_raw(&p, 1 << 20, &[(0, 512, 1)]);
    for tool in ["qemu-img", imgconv_bin()] {
        let o = run(tool, &["check", "-f", "raw", s(&p)]);
        assert_eq!(o.status.code(), Some(63), "{tool}");
        assert!(String::from_utf8_lossy(&o.stderr).contains("does not support checks"));
    }
}
