//! raw reading and writing, the engine on sparse files, and the CLI basics.

mod common;
use common::*;

#[test]
fn huge_sparse_raw_converts_fast_and_stays_sparse() {
    let d = scratch();
    let src = d.path().join("big.raw");
    make_raw(
        &src,
        1 << 40,
        &[(1 << 30, 65536, 7), ((1 << 40) - 4096, 4096, 9)],
    );
    let out = d.path().join("out.raw");
    let t = std::time::Instant::now();
    imgconv(&[
        "convert",
        "-O",
        "raw",
        src.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(t.elapsed().as_secs_f64() < 1.0, "took {:?}", t.elapsed());
    assert_same(&src, &out);
    use std::os::unix::fs::MetadataExt;
    let blocks = std::fs::metadata(&out).unwrap().blocks() * 512;
    assert!(
        blocks <= 65536 + 4096 + 8192,
        "output occupies {blocks} bytes"
    );
}

#[test]
fn raw_to_raw_keeps_odd_sizes_and_zero_runs() {
    let d = scratch();
    let src = d.path().join("odd.raw");
    make_raw(&src, 10_000_001, &[(0, 5000, 1), (9_000_000, 1_000_001, 3)]);
    let out = d.path().join("odd.out");
    imgconv(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        src.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&out).unwrap());
}

#[test]
fn compare_reports_first_difference_with_qemu_exit_codes() {
    let d = scratch();
    let a = d.path().join("a.raw");
    let b = d.path().join("b.raw");
    make_raw(&a, 1 << 20, &[(4096, 512, 1)]);
    make_raw(&b, 1 << 20, &[(4096, 512, 1), (70000, 1, 5)]);
    let o = imgconv_out(&["compare", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    // qemu-img names the first differing 512-byte sector.
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "Content mismatch at offset 69632!"
    );
    let q = run(
        "qemu-img",
        &["compare", a.to_str().unwrap(), b.to_str().unwrap()],
    );
    assert_eq!(o.stdout, q.stdout);
    let o = imgconv_out(&["compare", a.to_str().unwrap(), a.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0));
    let o = imgconv_out(&["compare", a.to_str().unwrap(), "/nonexistent"]);
    assert_eq!(o.status.code(), Some(2));
    // Different sizes: the extra part is zero, so equal unless strict.
    let c = d.path().join("c.raw");
    make_raw(&c, 2 << 20, &[(4096, 512, 1)]);
    let o = imgconv_out(&["compare", a.to_str().unwrap(), c.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0));
    let o = imgconv_out(&["compare", "-s", a.to_str().unwrap(), c.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn failed_conversion_leaves_no_file() {
    let d = scratch();
    let src = d.path().join("a.raw");
    make_raw(&src, 1 << 20, &[(0, 512, 1)]);
    let out = d.path().join("out.img");
    let o = imgconv_out(&[
        "convert",
        "-O",
        "raw",
        "-o",
        "bogus=1",
        src.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("bogus"));
    let names: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "left behind: {names:?}");
}

#[test]
fn info_json_matches_qemu_for_raw() {
    let d = scratch();
    let src = d.path().join("a.raw");
    make_raw(&src, 3 << 20, &[(0, 512, 1)]);
    let ours: serde_json::Value =
        serde_json::from_str(&imgconv(&["info", "--output=json", src.to_str().unwrap()])).unwrap();
    let theirs = qemu_info(&src);
    for k in ["virtual-size", "format"] {
        assert_eq!(ours[k], theirs[k], "{k}");
    }
}

#[test]
fn stdout_output_equals_file_output() {
    let d = scratch();
    let src = d.path().join("a.raw");
    make_raw(&src, 3 << 20, &[(70000, 9000, 1), (2 << 20, 4096, 2)]);
    let o = imgconv_out(&["convert", "-O", "raw", src.to_str().unwrap(), "-"]);
    assert!(o.status.success());
    assert_eq!(o.stdout, std::fs::read(&src).unwrap());
}

#[test]
fn every_command_has_help() {
    for cmd in ["info", "convert", "compare", "map"] {
        let out = imgconv(&[cmd, "--help"]);
        assert!(out.contains("Usage"), "{cmd} --help: {out}");
    }
}
