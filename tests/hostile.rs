//! Hostile input: the untrusted-reference policy, bounded time and memory on malformed
//! images, no files left behind, and the fuzzers' regression inputs.

mod common;
mod vhd_builder;
use common::*;

use common::watch::watched;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Asserts a clean refusal: exit code 1 (or 2 for compare), a message, fast, small.
fn assert_clean_error(args: &[&str], expect_in_msg: &str) {
    let w = watched(args);
    assert!(
        matches!(w.code, Some(1) | Some(2)),
        "{args:?}: expected an error exit, got {:?}; stderr: {}",
        w.code,
        w.stderr
    );
    assert!(
        w.stderr
            .to_lowercase()
            .contains(&expect_in_msg.to_lowercase()),
        "{args:?}: message {:?} does not mention {expect_in_msg:?}",
        w.stderr
    );
    w.assert_no_panic(args);
    w.assert_faster_than(args, Duration::from_secs(2));
    w.assert_small(args);
}

fn only_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Replaces the first occurrence of `from` in the file by `to` (same length).
fn patch_bytes(path: &Path, from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let mut data = std::fs::read(path).unwrap();
    let i = data
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern present");
    data[i..i + to.len()].copy_from_slice(to);
    std::fs::write(path, data).unwrap();
}

#[test]
fn qcow2_external_data_file_naming_a_host_file_is_refused_when_untrusted() {
    // CVE-2024-32498's shape: a qcow2 whose data file is /etc/hostname.
    let d = scratch();
    let img = d.path().join("evil.qcow2");
    std::fs::write(d.path().join("aaaaaaaaaaaaa"), vec![0u8; 1 << 20]).unwrap();
    // qemu-img resolves the data file name against its working folder.
    let o = Command::new("qemu-img")
        .current_dir(d.path())
        .args([
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file=aaaaaaaaaaaaa",
            "evil.qcow2",
            "1M",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    patch_bytes(&img, b"aaaaaaaaaaaaa", b"/etc/hostname");
    let out = d.path().join("out.raw");
    assert_clean_error(
        &["convert", "--untrusted", "-O", "raw", s(&img), s(&out)],
        "/etc/hostname",
    );
    assert!(!out.exists());
    // info --untrusted still reports the reference without opening it.
    let o = imgconv_out(&["info", "--untrusted", "--output=json", s(&img)]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("/etc/hostname"), "{text}");
}

#[test]
fn qcow2_backing_file_is_refused_when_untrusted() {
    let d = scratch();
    let base = d.path().join("base.qcow2");
    let top = d.path().join("top.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&base), "1M"]);
    qemu_img(&overlay_args("qcow2", &[], "base.qcow2", &top, ""));
    assert_clean_error(
        &[
            "convert",
            "--untrusted",
            "-O",
            "raw",
            s(&top),
            s(&d.path().join("o")),
        ],
        "base.qcow2",
    );
    assert_eq!(only_files(d.path()), ["base.qcow2", "top.qcow2"]);
}

#[test]
fn vmdk_extents_outside_the_folder_are_refused_when_untrusted() {
    // CVE-2022-47951's shape: a descriptor whose flat extent names a host file.
    let d = scratch();
    for (name, extent) in [("abs.vmdk", "/etc/hostname"), ("rel.vmdk", "../secret")] {
        let desc = d.path().join(name);
        std::fs::write(
            &desc,
            format!(
                "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
                 createType=\"monolithicFlat\"\n\nRW 8 FLAT \"{extent}\" 0\n\n\
                 ddb.adapterType = \"ide\"\n"
            ),
        )
        .unwrap();
        assert_clean_error(
            &[
                "convert",
                "--untrusted",
                "-O",
                "raw",
                s(&desc),
                s(&d.path().join("o")),
            ],
            extent,
        );
    }
}

#[test]
fn cyclic_and_too_deep_backing_chains_are_errors() {
    let d = scratch();
    let a = d.path().join("a.qcow2");
    let b = d.path().join("b.qcow2");
    qemu_img(&overlay_args("qcow2", &["-u"], "b.qcow2", &a, "1M"));
    qemu_img(&overlay_args("qcow2", &["-u"], "a.qcow2", &b, "1M"));
    assert_clean_error(&["info", "--backing-chain", s(&a)], "loop");
    let selfref = d.path().join("self.qcow2");
    qemu_img(&overlay_args(
        "qcow2",
        &["-u"],
        "self.qcow2",
        &selfref,
        "1M",
    ));
    assert_clean_error(&["info", "--backing-chain", s(&selfref)], "loop");

    // 20 images deep: more than the 16 allowed.
    let mut prev = d.path().join("l0.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&prev), "1M"]);
    for i in 1..20 {
        let next = d.path().join(format!("l{i}.qcow2"));
        let back = prev.file_name().unwrap().to_str().unwrap().to_string();
        qemu_img(&overlay_args("qcow2", &["-u"], &back, &next, "1M"));
        prev = next;
    }
    assert_clean_error(&["info", "--backing-chain", s(&prev)], "deeper");
    // Without the chain, info opens none of it (as qemu-img).
    imgconv(&["info", s(&prev)]);
}

#[test]
fn corpus_malicious_images_are_handled_quickly() {
    let Some(corpus) = corpus_dir() else { return };
    let d = scratch();
    for (rel, name) in [
        (
            "cdi-malicious/invalid-qcow-large-memory.img.xz",
            "large-memory.img",
        ),
        (
            "cdi-malicious/invalid-qcow-backing-file.img.xz",
            "backing-file.img",
        ),
        (
            "cdi-malicious/invalid-qcow-large-json.img.xz",
            "large-json.img",
        ),
        (
            "cdi-malicious/invalid-qcow-large-size.img.xz",
            "large-size.img",
        ),
        ("qemu-iotests/afl5.img.bz2", "afl5.img"),
        ("qemu-iotests/afl9.vmdk.bz2", "afl9.vmdk"),
    ] {
        let p = corpus_file(&corpus, rel, d.path(), name);
        for args in [
            vec!["info", "--untrusted", s(&p)],
            vec!["info", "--untrusted", "--output=json", s(&p)],
            vec!["map", "--untrusted", "--output=json", s(&p)],
        ] {
            let w = watched(&args);
            assert!(
                matches!(w.code, Some(0) | Some(1)),
                "{args:?}: {:?} {}",
                w.code,
                w.stderr
            );
            w.assert_no_panic(&args);
            w.assert_faster_than(&args, Duration::from_secs(5));
            w.assert_small(args);
        }
        let out = d.path().join("out.raw");
        let w = watched(&["convert", "--untrusted", "-O", "raw", s(&p), s(&out)]);
        w.assert_no_panic(name);
        w.assert_small(name);
        let _ = std::fs::remove_file(&out);
    }
}

/// Truncates a valid image at many points; every open must fail cleanly or succeed, and a
/// conversion either succeeds or leaves nothing behind.
fn truncations(img: &Path, fmt: &str) {
    let d = scratch();
    let data = std::fs::read(img).unwrap();
    let mut cuts: Vec<usize> = vec![0, 1, 3, 4, 8, 63, 64, 71, 72, 100, 104, 112, 511, 512, 513];
    let mut c = 1024;
    while c < data.len() {
        cuts.push(c);
        cuts.push(c - 1);
        c *= 2;
    }
    cuts.push(data.len() - 1);
    for cut in cuts.into_iter().filter(|&c| c < data.len()) {
        let p = d.path().join(format!("cut-{cut}.{fmt}"));
        std::fs::write(&p, &data[..cut]).unwrap();
        let out = d.path().join("out.raw");
        let w = watched(&["convert", "-f", fmt, "-O", "raw", s(&p), s(&out)]);
        let what = format!("{fmt} cut at {cut}");
        w.assert_no_panic(&what);
        assert!(
            matches!(w.code, Some(0) | Some(1)),
            "{fmt} cut at {cut}: {:?}",
            w.code
        );
        w.assert_faster_than(&what, Duration::from_secs(5));
        if w.code == Some(1) {
            assert!(!out.exists(), "{fmt} cut at {cut} left an output behind");
        }
        let _ = std::fs::remove_file(&out);
        std::fs::remove_file(&p).unwrap();
    }
    assert!(
        only_files(d.path()).is_empty(),
        "left: {:?}",
        only_files(d.path())
    );
}

fn sample_raw(dir: &Path) -> PathBuf {
    let raw = dir.join("src.raw");
    make_raw(&raw, 4 << 20, &[(0, 70000, 1), (3 << 20, 5000, 2)]);
    raw
}

#[test]
fn truncated_qcow2_images_fail_cleanly() {
    let d = scratch();
    let raw = sample_raw(d.path());
    for opts in ["compat=1.1", "compat=0.10,cluster_size=4096"] {
        let q = d.path().join("t.qcow2");
        qemu_img(&["convert", "-O", "qcow2", "-o", opts, s(&raw), s(&q)]);
        truncations(&q, "qcow2");
    }
}

#[test]
fn truncated_vmdk_images_fail_cleanly() {
    let d = scratch();
    let raw = sample_raw(d.path());
    for sub in ["monolithicSparse", "streamOptimized"] {
        let v = d.path().join("t.vmdk");
        qemu_convert("vmdk", &format!("subformat={sub}"), &raw, &v);
        truncations(&v, "vmdk");
    }
}

#[test]
fn truncated_vdi_images_fail_cleanly() {
    let d = scratch();
    let raw = sample_raw(d.path());
    let v = d.path().join("t.vdi");
    qemu_img(&["convert", "-O", "vdi", s(&raw), s(&v)]);
    truncations(&v, "vdi");
}

#[test]
fn no_create_never_truncates_the_target() {
    let d = scratch();
    let src = d.path().join("a.raw");
    make_raw(&src, 1 << 20, &[(0, 4096, 1)]);
    let dst = d.path().join("target.raw");
    make_raw(&dst, 3 << 20, &[(0, 8192, 9), (2 << 20, 4096, 9)]);
    imgconv(&["convert", "-n", "-O", "raw", s(&src), s(&dst)]);
    assert_eq!(std::fs::metadata(&dst).unwrap().len(), 3 << 20);
    let data = std::fs::read(&dst).unwrap();
    let srcdata = std::fs::read(&src).unwrap();
    assert_eq!(&data[..1 << 20], &srcdata[..], "first MiB is the source");
    assert!(
        data[(2 << 20)..(2 << 20) + 4096].iter().any(|&b| b != 0),
        "beyond the source is untouched"
    );
    // A target smaller than the source is refused, untouched.
    let small = d.path().join("small.raw");
    make_raw(&small, 4096, &[(0, 4096, 5)]);
    let before = std::fs::read(&small).unwrap();
    let o = imgconv_out(&["convert", "-n", "-O", "raw", s(&src), s(&small)]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(std::fs::read(&small).unwrap(), before);
}

#[test]
fn an_existing_destination_is_replaced_only_by_a_complete_image() {
    let d = scratch();
    let src = d.path().join("a.raw");
    make_raw(&src, 1 << 20, &[(0, 4096, 1)]);
    let dst = d.path().join("keep.img");
    std::fs::write(&dst, b"precious").unwrap();
    // A failing conversion (bad option) leaves the old file as it was.
    let o = imgconv_out(&[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=3",
        s(&src),
        s(&dst),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(std::fs::read(&dst).unwrap(), b"precious");
    assert_eq!(only_files(d.path()), ["a.raw", "keep.img"]);
}

/// Replacing a big file (here 80 MiB of blocks, over the 64 MiB from which the old
/// file's blocks are freed by a background process): `convert`, `dd` and `create` go
/// through that path and succeed with the new file in place, the old one unlinked and no
/// temporary name left. (What the background process holds is checked by the unit test
/// in `src/bin/imgconv/release.rs`.)
#[test]
fn a_big_existing_destination_is_replaced_and_the_old_file_unlinked() {
    use std::os::unix::fs::MetadataExt;
    let d = scratch();
    let src = d.path().join("a.raw");
    make_raw(&src, 80 << 20, &[(0, 80 << 20, 1)]);
    let dst = d.path().join("b.raw");
    let dd_of = format!("of={}", s(&dst));
    let dd_if = format!("if={}", s(&src));
    let commands: [(&str, Vec<&str>); 3] = [
        ("convert", vec!["convert", "-O", "raw", s(&src), s(&dst)]),
        ("dd", vec!["dd", "-O", "raw", "bs=1M", &dd_if, &dd_of]),
        ("create", vec!["create", "-f", "raw", s(&dst), "1M"]),
    ];
    for (name, args) in commands {
        make_raw(&dst, 80 << 20, &[(0, 80 << 20, 7)]);
        let old = std::fs::File::open(&dst).unwrap();
        let o = imgconv_out(&args);
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(
            old.metadata().unwrap().nlink(),
            0,
            "{name}: old file unlinked"
        );
        if name == "create" {
            assert_eq!(std::fs::metadata(&dst).unwrap().len(), 1 << 20);
        } else {
            assert_same(&src, &dst);
        }
        assert_eq!(only_files(d.path()), ["a.raw", "b.raw"], "{name}");
    }
}

#[test]
fn fuzz_regressions_do_not_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for e in entries {
        let p = e.unwrap().path();
        let data = std::fs::read(&p).unwrap();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let format = match name.split('-').next() {
            Some("qcow2") => Some(imgconv::Format::Qcow2),
            Some("vmdk") => Some(imgconv::Format::Vmdk),
            Some("vdi") => Some(imgconv::Format::Vdi),
            Some("vpc") => Some(imgconv::Format::Vpc),
            Some("roundtrip") => {
                imgconv::fuzzing::roundtrip(&data);
                continue;
            }
            _ => None,
        };
        imgconv::fuzzing::open_and_walk(&data, format);
    }
}

#[test]
fn sigterm_or_sigint_mid_conversion_leaves_no_file() {
    let d = scratch();
    let raw = d.path().join("src.raw");
    // Random-ish data so that the compressed stream is long.
    let mut data = vec![0u8; 8 << 20];
    let mut x = 0x1234_5678u32;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    std::fs::write(&raw, &data).unwrap();
    let vmdk = d.path().join("src.vmdk");
    qemu_convert("vmdk", "subformat=streamOptimized", &raw, &vmdk);
    let stream = std::fs::read(&vmdk).unwrap();
    let outdir = d.path().join("out");
    std::fs::create_dir(&outdir).unwrap();
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let out = outdir.join("out.qcow2");
        // Half the stream: the conversion starts writing, then waits for more input.
        let (mut child, stdin) = imgconv_fed_partly(
            &["convert", "-O", "qcow2", "-", s(&out)],
            &[],
            &stream[..stream.len() / 2],
        );
        let t = Instant::now();
        while only_files(&outdir).is_empty() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !only_files(&outdir).is_empty(),
            "no temporary output appeared"
        );
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as libc::pid_t, sig) };
        let status = child.wait().unwrap();
        drop(stdin);
        assert!(!status.success());
        assert!(
            only_files(&outdir).is_empty(),
            "left behind: {:?}",
            only_files(&outdir)
        );
    }
}

/// A compression bomb — 2 GiB of zeros around a little data, in a zstd stream of a few
/// hundred KiB that records no size — converts in one pass with bounded memory into a
/// sparse qcow2 of the right size, and into raw, without a temporary file.
#[test]
fn a_zero_bomb_of_unrecorded_length_converts_in_bounded_memory() {
    let dir = scratch();
    let raw = dir.path().join("bomb.raw");
    make_raw(
        &raw,
        2 << 30,
        &[(1 << 20, 4096, 0x5a), ((2 << 30) - 512, 512, 0xa5)],
    );
    let zst = dir.path().join("bomb.raw.zst");
    let o = Command::new("zstd")
        .args(["-q", "-c", "-1"])
        .stdin(std::fs::File::open(&raw).unwrap())
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(o.stdout.len() < 1 << 20, "{} bytes", o.stdout.len());
    std::fs::write(&zst, &o.stdout).unwrap();
    let nowhere = dir.path().join("no-such-folder");
    for fmt in ["qcow2", "raw"] {
        let out = dir.path().join(format!("out.{fmt}"));
        let args = [
            "convert",
            "--untrusted",
            "--tmpdir",
            s(&nowhere),
            "-O",
            fmt,
            s(&zst),
            s(&out),
        ];
        let w = watched(&args);
        assert_eq!(w.code, Some(0), "{}", w.stderr);
        w.assert_small(args);
        w.assert_faster_than(args, Duration::from_secs(60));
        assert_eq!(qemu_info(&out)["virtual-size"], 2u64 << 30);
        let allocated = std::fs::metadata(&out).map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks() * 512
        });
        assert!(allocated.unwrap() < 4 << 20, "{fmt} output is not sparse");
        assert_same_fmt(&raw, "raw", &out, fmt);
        if fmt == "qcow2" {
            assert_qemu_check_clean(&out);
        }
    }
}

#[test]
fn truncated_vpc_images_fail_cleanly() {
    let d = scratch();
    let raw = sample_raw(d.path());
    for o in ["subformat=dynamic", "subformat=fixed"] {
        let v = d.path().join("t.vhd");
        qemu_convert("vpc", o, &raw, &v);
        truncations(&v, "vpc");
    }
}

/// One hostile change to a VHD file.
type VhdPatch = Box<dyn Fn(&Path)>;

#[test]
fn hostile_vpc_metadata_is_refused_quickly() {
    use vhd_builder::{patch_bat, patch_footer, patch_header, read_bat};
    let d = scratch();
    let raw = sample_raw(d.path());
    let v = d.path().join("base.vhd");
    qemu_convert("vpc", "", &raw, &v);
    let bat = read_bat(&v);
    let used: Vec<usize> = (0..bat.len()).filter(|&i| bat[i] != u32::MAX).collect();
    let (i0, i1) = (used[0], used[1]);
    let other = bat[i1];
    let cases: Vec<(&str, VhdPatch, &str)> = vec![
        (
            "BAT entry into the footer copy",
            Box::new(move |p| patch_bat(p, i0, 0)),
            "overlaps the footer copy",
        ),
        (
            "BAT entry into the header",
            Box::new(move |p| patch_bat(p, i0, 2)),
            "overlaps the dynamic disk header",
        ),
        (
            "BAT entry into the BAT",
            Box::new(move |p| patch_bat(p, i0, 3)),
            "overlaps the BAT",
        ),
        (
            "BAT entry past the end",
            Box::new(move |p| patch_bat(p, i0, 0xFFFF_FFF0)),
            "past the end",
        ),
        (
            "two blocks in one place",
            Box::new(move |p| patch_bat(p, i0, other)),
            "overlaps block",
        ),
        (
            "block size 3",
            Box::new(|p| patch_header(p, true, |h| h.block_size = 3)),
            "block size",
        ),
        (
            "block size 256",
            Box::new(|p| patch_header(p, true, |h| h.block_size = 256)),
            "block size",
        ),
        (
            "block size 2 GiB",
            Box::new(|p| patch_header(p, true, |h| h.block_size = 1 << 31)),
            "past the end",
        ),
        (
            "2^30 BAT entries",
            Box::new(|p| patch_header(p, true, |h| h.max_table_entries = 0x4000_0001)),
            "BAT",
        ),
        (
            "too few BAT entries",
            Box::new(|p| patch_header(p, true, |h| h.max_table_entries = 1)),
            "cover less",
        ),
        (
            "BAT at the end of u64",
            Box::new(|p| patch_header(p, true, |h| h.table_offset = u64::MAX - 3)),
            "BAT",
        ),
        (
            "header far away",
            Box::new(|p| patch_footer(p, |f| f.data_offset = 1 << 60)),
            "dynamic disk header",
        ),
        (
            "header checksum",
            Box::new(|p| patch_header(p, false, |h| h.version = 2)),
            "checksum",
        ),
        (
            "footer checksum",
            Box::new(|p| {
                let mut b = std::fs::read(p).unwrap();
                b[100] ^= 1;
                std::fs::write(p, b).unwrap();
            }),
            "checksum",
        ),
        (
            "disk type 5",
            Box::new(|p| patch_footer(p, |f| f.disk_type = 5)),
            "disk type",
        ),
        (
            "a disk of 2^50 bytes",
            Box::new(|p| {
                patch_footer(p, |f| {
                    f.creator_app = *b"win ";
                    f.current_size = 1 << 50;
                })
            }),
            "too large",
        ),
        (
            "a differencing image without parent",
            Box::new(|p| patch_footer(p, |f| f.disk_type = 4)),
            "names no parent",
        ),
    ];
    for (what, patch, msg) in cases {
        let p = d.path().join("bad.vhd");
        std::fs::copy(&v, &p).unwrap();
        patch(&p);
        let out = d.path().join("out.raw");
        assert_clean_error(&["convert", "-f", "vpc", "-O", "raw", s(&p), s(&out)], msg);
        assert!(!out.exists(), "{what}");
        assert_clean_error(&["info", s(&p)], msg);
        let w = watched(&["check", s(&p)]);
        w.assert_no_panic(what);
        w.assert_faster_than(what, Duration::from_secs(2));
        assert!(
            matches!(w.code, Some(0..=2)),
            "{what}: check gave {:?}",
            w.code
        );
    }
}

#[test]
fn vpc_parent_locator_loops_and_deep_chains_are_refused() {
    use imgconv::format::vpc::header::Uuid;
    use vhd_builder::Vhd;
    let d = scratch();
    let (ua, ub) = (Uuid::random(), Uuid::random());
    let mut a = Vhd::differencing(1 << 20, 64 << 10, ub).windows_locator(b"W2ru", ".\\b.vhd");
    a.uuid = ua;
    let mut b = Vhd::differencing(1 << 20, 64 << 10, ua).windows_locator(b"W2ru", ".\\a.vhd");
    b.uuid = ub;
    a.write(&d.path().join("a.vhd"));
    b.write(&d.path().join("b.vhd"));
    // Plain info opens no parent (as qemu-img); the chain is followed with --backing-chain.
    assert_clean_error(
        &["info", "--backing-chain", s(&d.path().join("a.vhd"))],
        "loops",
    );
    let mut me =
        Vhd::differencing(1 << 20, 64 << 10, Uuid::default()).windows_locator(b"W2ru", "me.vhd");
    me.parent_uuid = me.uuid;
    me.write(&d.path().join("me.vhd"));
    assert_clean_error(
        &["info", "--backing-chain", s(&d.path().join("me.vhd"))],
        "loops",
    );
    // A chain deeper than the limit: c0 → c1 → … → c20 (a dynamic base).
    let mut uuids: Vec<Uuid> = (0..=20).map(|_| Uuid::random()).collect();
    uuids[20] = Uuid::random();
    for i in 0..20 {
        let mut c = Vhd::differencing(1 << 20, 64 << 10, uuids[i + 1])
            .windows_locator(b"W2ru", &format!("c{}.vhd", i + 1));
        c.uuid = uuids[i];
        c.write(&d.path().join(format!("c{i}.vhd")));
    }
    let mut base = Vhd::dynamic(1 << 20, 64 << 10);
    base.uuid = uuids[20];
    base.write(&d.path().join("c20.vhd"));
    assert_clean_error(
        &["info", "--backing-chain", s(&d.path().join("c0.vhd"))],
        "deeper than",
    );
    // Within the limit it opens.
    imgconv(&["info", "--backing-chain", s(&d.path().join("c10.vhd"))]);
}

#[test]
fn truncated_vhdx_images_fail_cleanly() {
    let d = scratch();
    let raw = sample_raw(d.path());
    let v = d.path().join("t.vhdx");
    qemu_convert("vhdx", "block_size=1M", &raw, &v);
    truncations(&v, "vhdx");
    imgconv_convert("vhdx", "subformat=fixed,block_size=1M", &raw, &v);
    truncations(&v, "vhdx");
}

/// Hostile VHDX images: each is refused with a typed error naming what is wrong, fast
/// and in little memory.
#[test]
fn hostile_vhdx_images_give_typed_errors() {
    use common::vhdx::*;
    use imgconv::format::vhdx::header::{
        BatEntry, Guid, RegionTable, BAT_REGION, METADATA_REGION, REGION_TABLE_OFFSETS,
    };
    use imgconv::format::vhdx::metadata::{
        FileParameters, FILE_PARAMETERS, LOGICAL_SECTOR_SIZE, VIRTUAL_DISK_SIZE,
    };
    const MIB: u64 = 1 << 20;
    let d = scratch();
    let raw = sample_raw(d.path());
    let good = d.path().join("good.vhdx");
    imgconv_convert("vhdx", "block_size=1M", &raw, &good);
    let len = std::fs::metadata(&good).unwrap().len();
    let md = region(&good, METADATA_REGION).file_offset;
    let params = |bs: u32| {
        FileParameters {
            block_size: bs,
            leave_blocks_allocated: false,
            has_parent: false,
            reserved: 0,
        }
        .serialize()
    };
    let overwrite = |p: &Path, at: u64, bytes: &[u8]| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
        f.write_all_at(bytes, at).unwrap();
    };
    let guid = Guid::random();
    let log_entry = |descs| LogEntrySpec {
        pos: 0,
        seq: 1,
        tail: 0,
        guid,
        descs,
        flushed: 0,
        last: 0,
        corrupt: false,
    };
    type Damage<'a> = Box<dyn Fn(&Path) + 'a>;
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "bat-into-metadata",
            Box::new(|p| patch_bat(p, |b| b[0] = BatEntry::new(6, md))),
            "overlaps the metadata region",
        ),
        (
            "bat-past-eof",
            Box::new(|p| patch_bat(p, |b| b[3] = BatEntry::new(6, len + 64 * MIB))),
            "past the end of the file",
        ),
        (
            "bat-in-header",
            Box::new(|p| patch_bat(p, |b| b[1] = BatEntry::new(6, 0))),
            "header section",
        ),
        (
            "bat-reserved-state",
            Box::new(|p| patch_bat(p, |b| b[2] = BatEntry::new(4, 0))),
            "reserved state",
        ),
        (
            "bat-partial",
            Box::new(|p| patch_bat(p, |b| b[0] = BatEntry::new(7, b[0].offset()))),
            "partially present",
        ),
        (
            "block-3m",
            Box::new(|p| patch_metadata_item(p, FILE_PARAMETERS, &params(3 << 20))),
            "block size",
        ),
        (
            "block-512m",
            Box::new(|p| patch_metadata_item(p, FILE_PARAMETERS, &params(512 << 20))),
            "block size",
        ),
        (
            "block-0",
            Box::new(|p| patch_metadata_item(p, FILE_PARAMETERS, &params(0))),
            "block size",
        ),
        (
            "sector-1000",
            Box::new(|p| patch_metadata_item(p, LOGICAL_SECTOR_SIZE, &1000u32.to_le_bytes())),
            "logical sector size",
        ),
        (
            "size-odd",
            Box::new(|p| patch_metadata_item(p, VIRTUAL_DISK_SIZE, &1001u64.to_le_bytes())),
            "multiple",
        ),
        (
            "size-huge",
            Box::new(|p| patch_metadata_item(p, VIRTUAL_DISK_SIZE, &(1u64 << 61).to_le_bytes())),
            "BAT",
        ),
        (
            "headers-bad",
            Box::new(|p| {
                overwrite(p, 64 << 10 | 100, b"x");
                overwrite(p, 128 << 10 | 100, b"x");
            }),
            "neither header is valid",
        ),
        (
            "region-crc",
            Box::new(|p| overwrite(p, REGION_TABLE_OFFSETS[0] + 300, b"x")),
            "region table",
        ),
        (
            "region-required-unknown",
            Box::new(|p| {
                let mut t = region_table(p);
                t.entries.push(imgconv::format::vhdx::header::RegionEntry {
                    guid: Guid::random(),
                    file_offset: 400 * MIB,
                    length: MIB as u32,
                    required: 1,
                });
                overwrite(p, REGION_TABLE_OFFSETS[0], &t.serialize());
            }),
            "required region",
        ),
        (
            "region-overlap",
            Box::new(|p| {
                let mut t: RegionTable = region_table(p);
                let bat = *t.find(BAT_REGION).unwrap();
                t.entries
                    .iter_mut()
                    .find(|e| e.guid == METADATA_REGION)
                    .unwrap()
                    .file_offset = bat.file_offset;
                overwrite(p, REGION_TABLE_OFFSETS[0], &t.serialize());
            }),
            "overlaps",
        ),
        (
            "metadata-count",
            Box::new(|p| overwrite(p, md + 10, &2047u16.to_le_bytes())),
            "metadata",
        ),
        (
            "log-zero-bomb",
            Box::new(|p| {
                write_log(
                    p,
                    guid,
                    &[log_entry(vec![(1 << 40, LogWrite::Zero(1 << 62))])],
                )
            }),
            "past any possible file",
        ),
        (
            "log-too-long",
            Box::new(|p| {
                replace_headers(p, |h| {
                    h.log_guid = guid;
                    h.log_length = 1 << 30;
                })
            }),
            "log",
        ),
        (
            "log-version",
            Box::new(|p| {
                replace_headers(p, |h| {
                    h.log_guid = guid;
                    h.log_version = 3;
                })
            }),
            "log version",
        ),
    ];
    for (name, damage, what) in cases {
        let p = d.path().join(format!("{name}.vhdx"));
        std::fs::copy(&good, &p).unwrap();
        damage(&p);
        let out = d.path().join("out.raw");
        assert_clean_error(&["convert", "-O", "raw", s(&p), s(&out)], what);
        assert!(!out.exists(), "{name}");
        // check either reports it or fails the same way, without a panic.
        let w = watched(&["check", s(&p)]);
        w.assert_no_panic(name);
        assert!(
            matches!(w.code, Some(1) | Some(2)),
            "{name}: check {:?}",
            w.code
        );
    }

    // Thousands of overlapping zero and data descriptors replay fast, later over earlier.
    let p = d.path().join("log-overlaps.vhdx");
    std::fs::copy(&good, &p).unwrap();
    let b0 = read_bat(&p)[0].offset();
    let mut descs: Vec<(u64, LogWrite)> = Vec::new();
    for i in 0..2000u64 {
        descs.push((b0 + (i % 7) * 4096, LogWrite::Zero(8 * 4096)));
    }
    descs.push((b0, LogWrite::Data(vec![0x5a; 4096])));
    write_log(&p, guid, &[log_entry(descs)]);
    let w = watched(&["convert", "-O", "raw", s(&p), s(&d.path().join("o.raw"))]);
    assert_eq!(w.code, Some(0), "{}", w.stderr);
    w.assert_faster_than("overlapping log", Duration::from_secs(2));
    let o = std::fs::read(d.path().join("o.raw")).unwrap();
    assert!(o[..4096].iter().all(|&x| x == 0x5a) && o[4096..14 * 4096].iter().all(|&x| x == 0));

    // Parent locators that loop (a → b → a), and one naming the image itself.
    let (a, b) = (d.path().join("a.avhdx"), d.path().join("b.avhdx"));
    let child = |path: &Path, parent: &str, linkage: Guid| {
        make_child(
            path,
            &ChildSpec {
                size: 4 * MIB,
                block_size: MIB,
                lss: 512,
                linkage,
                relative_path: Some(parent),
                absolute_path: None,
                blocks: vec![],
            },
            &mut vec![],
        )
    };
    let ga = child(&a, "b.avhdx", Guid::random());
    child(&b, "a.avhdx", ga);
    assert_clean_error(&["info", "--backing-chain", s(&a)], "loops");
    let selfish = d.path().join("self.avhdx");
    child(&selfish, "self.avhdx", Guid::random());
    assert_clean_error(&["info", "--backing-chain", s(&selfish)], "loops");
}
