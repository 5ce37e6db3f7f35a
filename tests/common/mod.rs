//! Helpers shared by the integration tests: qemu-img as the oracle, the imgconv binary,
//! scratch folders and the corpus of images made by other tools.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The imgconv binary built for this test run.
pub fn imgconv_bin() -> &'static str {
    env!("CARGO_BIN_EXE_imgconv")
}

/// Runs a command and returns its output (never panics on a non-zero exit).
pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let o = run(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `qemu-img ARGS`, which must succeed.
pub fn qemu_img(args: &[&str]) -> String {
    run_ok("qemu-img", args)
}

/// `qemu-io ARGS`, which must succeed.
pub fn qemu_io(args: &[&str]) -> String {
    run_ok("qemu-io", args)
}

/// `imgconv ARGS`, which must succeed.
pub fn imgconv(args: &[&str]) -> String {
    run_ok(imgconv_bin(), args)
}

/// `imgconv ARGS`, returning the whole output.
pub fn imgconv_out(args: &[&str]) -> Output {
    run(imgconv_bin(), args)
}

/// Asserts that qemu-img finds the two images' contents identical.
pub fn assert_same(a: &Path, b: &Path) {
    let o = run(
        "qemu-img",
        &["compare", a.to_str().unwrap(), b.to_str().unwrap()],
    );
    assert!(
        o.status.success(),
        "qemu-img compare {} {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Like [`assert_same`], with the formats named (`-f A -F B`).
pub fn assert_same_fmt(a: &Path, fa: &str, b: &Path, fb: &str) {
    let o = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            fa,
            "-F",
            fb,
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
    );
    assert!(
        o.status.success(),
        "qemu-img compare {} {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `qemu-img info --output=json FILE` parsed.
pub fn qemu_info(path: &Path) -> serde_json::Value {
    serde_json::from_str(&qemu_img(&[
        "info",
        "--output=json",
        path.to_str().unwrap(),
    ]))
    .unwrap()
}

/// A fresh scratch folder, removed when dropped.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("imgconv-test-")
        .tempdir()
        .unwrap()
}

/// Writes a raw file of `size` bytes holding a recognisable pattern at a few offsets
/// (the rest sparse): `(offset, len, byte)` triples.
pub fn make_raw(path: &Path, size: u64, pieces: &[(u64, usize, u8)]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for &(off, len, byte) in pieces {
        let data: Vec<u8> = (0..len)
            .map(|i| byte.wrapping_add((i / 512) as u8) | 1)
            .collect();
        f.write_all_at(&data, off).unwrap();
    }
}

/// The corpus of images made by other tools.
///
/// `IMGCONV_CORPUS` names it (`.ci/run` sets it); when set but missing the test fails.
/// When unset, `../shared/corpus` beside the repository is used if present; otherwise
/// `None` (the test then says it skipped).
pub fn corpus_dir() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("IMGCONV_CORPUS") {
        let p = PathBuf::from(p);
        assert!(
            p.join("SOURCES.md").exists(),
            "IMGCONV_CORPUS={} is set but holds no corpus",
            p.display()
        );
        return Some(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus");
    if p.join("SOURCES.md").exists() {
        Some(p)
    } else {
        eprintln!("corpus not found: set IMGCONV_CORPUS; skipping");
        None
    }
}

/// Decompresses a corpus file (`.xz`, `.bz2`, `.gz`) into `dir` under `name`.
pub fn corpus_file(corpus: &Path, rel: &str, dir: &Path, name: &str) -> PathBuf {
    let src = corpus.join(rel);
    assert!(src.exists(), "corpus file {} missing", src.display());
    let tool = match src.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("bz2") => "bzip2",
        Some("gz") => "gzip",
        _ => {
            let out = dir.join(name);
            std::fs::copy(&src, &out).unwrap();
            return out;
        }
    };
    let out = dir.join(name);
    let o = Command::new(tool)
        .args(["-dc", src.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{tool} -dc {} failed", src.display());
    std::fs::write(&out, o.stdout).unwrap();
    out
}

/// Converts with imgconv to raw and checks qemu-img calls the result identical to `src`.
pub fn check_to_raw(src: &Path, dir: &Path) {
    let out = dir.join(format!(
        "{}.out.raw",
        src.file_name().unwrap().to_string_lossy()
    ));
    imgconv(&[
        "convert",
        "-O",
        "raw",
        src.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_same(src, &out);
}
