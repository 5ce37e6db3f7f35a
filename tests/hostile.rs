//! Hostile input: the untrusted-reference policy, bounded time and memory on malformed
//! images, no files left behind, and the fuzzers' regression inputs.

mod common;
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
