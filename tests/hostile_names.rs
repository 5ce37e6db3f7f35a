//! Issue 13, finding 9: strings from an image's metadata never reach the terminal raw.
//! Human output and error messages quote them with control characters escaped (as git
//! quotes odd file names); JSON escapes them by JSON's rules, so a parser gets them back
//! exactly.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;
use serde_json::Value;

/// Sets a window title, rings the bell, clears the screen and fakes a green verdict.
const HOSTILE: &str = "\u{1b}]0;pwned\u{7}\u{1b}[2J\u{1b}[32mNo errors were found\u{9b}0m\r";

/// True when `b` holds a byte a terminal acts on (C0 controls but newline, DEL, C1).
fn has_control(b: &[u8]) -> bool {
    let s = String::from_utf8_lossy(b);
    s.chars().any(|c| c != '\n' && c.is_control())
}

fn assert_clean(o: &std::process::Output, what: &str) {
    assert!(
        !has_control(&o.stdout) && !has_control(&o.stderr),
        "{what}: control bytes reach the terminal:\n{:?}\n{:?}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

fn find(path: &Path, needle: &[u8]) -> u64 {
    let b = std::fs::read(path).unwrap();
    b.windows(needle.len())
        .position(|w| w == needle)
        .expect("needle in file") as u64
}

#[test]
fn backing_names_and_formats_are_escaped() {
    let d = scratch();
    let img = d.path().join("evil.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        HOSTILE,
        "-F",
        "qcow2",
        s(&img),
        "1M",
    ]);
    // The backing format too: "qcow2" becomes five bytes of escapes.
    let at = find(&img, b"qcow2\0\0\0");
    patch(&img, at, b"\x1b[2J\x07");
    for args in [
        vec!["info", "--untrusted", s(&img)],
        vec!["info", "--untrusted", "--details", s(&img)],
        vec!["info", s(&img)],
        vec!["info", "--backing-chain", s(&img)],
        vec!["map", s(&img)],
        vec!["check", s(&img)],
        vec!["convert", "-O", "raw", s(&img), "/dev/null"],
        vec!["compare", s(&img), s(&img)],
    ] {
        let o = imgconv_out(&args);
        assert_clean(&o, &args.join(" "));
    }
    let o = imgconv_out(&["info", "--untrusted", s(&img)]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("backing file: \"\\033]0;pwned\\a\\033[2J"),
        "{out}"
    );
    assert!(
        out.contains("backing file format: \"\\033[2J\\a\""),
        "{out}"
    );
    // JSON: escaped by JSON's rules, parsed back to the very bytes.
    let o = imgconv_out(&["info", "--untrusted", "--output=json", s(&img)]);
    assert_clean(&o, "info --output=json");
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["backing-filename"], HOSTILE);
    assert_eq!(j["backing-filename-format"], "\u{1b}[2J\u{7}");
}

#[test]
fn file_names_vmdk_create_types_and_vdi_comments_are_escaped() {
    let d = scratch();
    // A file name with escapes in it.
    let named = d.path().join(format!("disk{HOSTILE}.raw"));
    make_raw(&named, 1 << 20, &[(0, 4096, 1)]);
    for args in [
        vec!["info", s(&named)],
        vec!["map", s(&named)],
        vec!["info", "--output=json", s(&named)],
        vec!["check", s(&named)],
    ] {
        assert_clean(&imgconv_out(&args), &args.join(" "));
    }
    // A VMDK descriptor whose createType is escapes (the same length as before).
    let vmdk = d.path().join("flat.vmdk");
    let raw = d.path().join("src.raw");
    make_raw(&raw, 1 << 20, &[(0, 4096, 1)]);
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        s(&raw),
        s(&vmdk),
    ]);
    let at = find(&vmdk, b"monolithicFlat");
    patch(&vmdk, at, b"\x1b]0;x\x07\x1b[2J\x1b[1m");
    for args in [
        vec!["info", s(&vmdk)],
        vec!["info", "--output=json", s(&vmdk)],
        vec!["check", s(&vmdk)],
        vec!["map", s(&vmdk)],
    ] {
        assert_clean(&imgconv_out(&args), &args.join(" "));
    }
    // A VDI whose comment is escapes.
    let vdi = d.path().join("c.vdi");
    qemu_img(&["convert", "-f", "raw", "-O", "vdi", s(&raw), s(&vdi)]);
    patch(&vdi, 0x54, HOSTILE.as_bytes());
    for args in [
        vec!["info", s(&vdi)],
        vec!["info", "--details", s(&vdi)],
        vec!["info", "--output=json", s(&vdi)],
        vec!["check", s(&vdi)],
    ] {
        assert_clean(&imgconv_out(&args), &args.join(" "));
    }
    let o = imgconv_out(&["info", "--details", s(&vdi)]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("comment: \"\\033]0;pwned"));
}

#[test]
fn qcow2_feature_names_are_escaped() {
    let d = scratch();
    let img = d.path().join("feat.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "1M"]);
    // Rename the feature table's "dirty bit" entry to escapes, move it to bit 20 and
    // set that incompatible bit: opening must refuse it, naming it.
    let at = find(&img, b"dirty bit");
    patch(&img, at - 1, &[20]);
    let mut name = [0u8; 46];
    name[..HOSTILE.len()].copy_from_slice(HOSTILE.as_bytes());
    patch(&img, at, &name);
    patch(&img, 72, &(1u64 << 20).to_be_bytes());
    for args in [
        vec!["info", s(&img)],
        vec!["check", s(&img)],
        vec!["map", s(&img)],
        vec!["convert", "-O", "raw", s(&img), "/dev/null"],
    ] {
        let o = imgconv_out(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert_clean(&o, &args.join(" "));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("\\033]0;pwned"),
            "{args:?}"
        );
    }
}
