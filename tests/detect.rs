//! No image of a format qemu-img detects is ever named raw: each is recognised by its
//! magic bytes and named as qemu-img names it; those imgconv does not read are refused
//! with a typed error naming the format — never copied as if the container were the disk.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// What `imgconv info --output=json` calls the image.
fn our_format(img: &Path) -> Result<String, String> {
    let o = imgconv_out(&["info", "--output=json", s(img)]);
    if o.status.success() {
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        Ok(v["format"].as_str().unwrap().to_string())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).into_owned())
    }
}

/// Asserts that imgconv names `img` as `want`: by `info`, or in the error refusing it;
/// and that converting it to raw either gives the disk qemu-img reads or is refused
/// naming the format.
fn assert_named(img: &Path, want: &str, dir: &Path) {
    match our_format(img) {
        Ok(f) => assert_eq!(f, want, "{}", img.display()),
        Err(e) => assert!(
            e.contains(&format!("{want}:")),
            "{}: refused without naming {want}: {e}",
            img.display()
        ),
    }
    let out = dir.join("out.raw");
    let o = imgconv_out(&["convert", "-O", "raw", s(img), s(&out)]);
    if o.status.success() {
        let r = run(
            "qemu-img",
            &["compare", "-f", want, "-F", "raw", s(img), s(&out)],
        );
        assert!(
            r.status.success(),
            "{}: converted, but not to the disk qemu-img reads: {}",
            img.display(),
            String::from_utf8_lossy(&r.stdout)
        );
    } else {
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(&format!("{want}:")), "{}: {e}", img.display());
        assert!(!out.exists(), "a refused conversion left {}", out.display());
    }
    let _ = std::fs::remove_file(&out);
}

#[test]
fn every_format_qemu_img_creates_is_named_not_raw() {
    let d = scratch();
    let cases: &[(&str, &[&str])] = &[
        ("qcow2", &[]),
        ("qcow", &[]),
        ("qed", &[]),
        ("vmdk", &[]),
        ("vdi", &[]),
        ("vpc", &[]),
        ("vpc", &["-o", "subformat=fixed"]),
        ("vhdx", &[]),
        ("vhdx", &["-o", "subformat=fixed"]),
        ("parallels", &[]),
    ];
    for (i, (fmt, opts)) in cases.iter().enumerate() {
        let img = d.path().join(format!("img{i}.{fmt}"));
        let mut args = vec!["create", "-q", "-f", fmt];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[s(&img), "3M"]);
        qemu_img(&args);
        // Some data, so that a misread container would differ from the disk.
        let o = run(
            "qemu-io",
            &["-f", fmt, "-c", "write -P 0x5a 64k 64k", s(&img)],
        );
        assert!(o.status.success(), "qemu-io on {fmt}");
        assert_named(&img, fmt, d.path());
    }
    // LUKS needs a secret to create.
    let luks = d.path().join("img.luks");
    qemu_img(&[
        "create",
        "-q",
        "--object",
        "secret,id=s0,data=pw",
        "-f",
        "luks",
        "-o",
        "key-secret=s0",
        s(&luks),
        "1M",
    ]);
    assert_named(&luks, "luks", d.path());
}

#[test]
fn corpus_images_of_other_tools_are_named() {
    let Some(c) = corpus_dir() else { return };
    let d = scratch();
    let cases = [
        ("qemu-iotests/empty.bochs.bz2", "empty.bochs", "bochs"),
        ("qemu-iotests/simple-pattern.cloop.bz2", "p.cloop", "cloop"),
        ("qemu-iotests/simple-dmg.dmg.bz2", "simple.dmg", "dmg"),
        ("qemu-iotests/parallels-v1.bz2", "parallels-v1", "parallels"),
        ("qemu-iotests/parallels-v2.bz2", "parallels-v2", "parallels"),
        (
            "freebsd-mkimg/img-1x1-512-mbr.qcow.xz",
            "mkimg.qcow",
            "qcow",
        ),
        ("dissect-hypervisor/vhd/fixed.vhd.gz", "fixed.vhd", "vpc"),
        (
            "dissect-hypervisor/vhdx/fixed.vhdx.gz",
            "fixed.vhdx",
            "vhdx",
        ),
    ];
    for (rel, name, want) in cases {
        let img: PathBuf = corpus_file(&c, rel, d.path(), name);
        // A DMG is named by its trailer; give it a name qemu-img cannot go by either.
        let img = if want == "dmg" {
            let renamed = d.path().join("apple-image");
            std::fs::rename(&img, &renamed).unwrap();
            renamed
        } else {
            img
        };
        match our_format(&img) {
            Ok(f) => assert_eq!(f, want, "{rel}"),
            Err(e) => assert!(e.contains(&format!("{want}:")), "{rel}: {e}"),
        }
    }
}
