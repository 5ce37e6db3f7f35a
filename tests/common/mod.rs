//! Helpers shared by the integration tests: qemu-img as the oracle, the imgconv binary,
//! scratch folders and the corpus of images made by other tools.
#![allow(dead_code)]

pub mod servers;
pub mod watch;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod vhdx;

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

/// A path as `&str`, for command lines.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The argument list of `convert -O FMT [-o OPTS] SRC DST` (no `-o` when `opts` is empty),
/// shared by qemu-img and imgconv since they take the same syntax.
fn convert_args<'a>(fmt: &'a str, opts: &'a str, src: &'a Path, dst: &'a Path) -> Vec<&'a str> {
    let mut a = vec!["convert", "-O", fmt];
    if !opts.is_empty() {
        a.extend(["-o", opts]);
    }
    a.extend([s(src), s(dst)]);
    a
}

/// `qemu-img convert -O FMT [-o OPTS] SRC DST`, which must succeed.
pub fn qemu_convert(fmt: &str, opts: &str, src: &Path, dst: &Path) -> String {
    qemu_img(&convert_args(fmt, opts, src, dst))
}

/// `imgconv convert -O FMT [-o OPTS] SRC DST`, which must succeed.
pub fn imgconv_convert(fmt: &str, opts: &str, src: &Path, dst: &Path) -> String {
    imgconv(&convert_args(fmt, opts, src, dst))
}

/// The argument list of `create -f FMT FLAGS.. -b BACKING -F FMT PATH [SIZE]` (no size
/// when `size` is empty), for qemu-img or imgconv: an overlay over a same-format backing file.
pub fn overlay_args<'a>(
    fmt: &'a str,
    flags: &[&'a str],
    backing: &'a str,
    path: &'a Path,
    size: &'a str,
) -> Vec<&'a str> {
    let mut a = vec!["create", "-f", fmt];
    a.extend(flags);
    a.extend(["-b", backing, "-F", fmt, s(path)]);
    if !size.is_empty() {
        a.push(size);
    }
    a
}

/// One step of the xorshift64 generator (13, 7, 17): cheap, reproducible noise for test data.
pub fn xorshift64(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Asserts `qemu-img check` finds no errors in the image.
pub fn assert_qemu_check_clean(path: &Path) {
    let chk = qemu_img(&["check", s(path)]);
    assert!(chk.contains("No errors"), "{}: {chk}", path.display());
}

/// Spawns imgconv with `args` and the environment `env` (stdout and stderr discarded),
/// writes `input` to its stdin and returns it with stdin still open: the run then waits
/// for input that never comes, to be interrupted by the test.
pub fn imgconv_fed_partly(
    args: &[&str],
    env: &[(&str, &Path)],
    input: &[u8],
) -> (std::process::Child, std::process::ChildStdin) {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new(imgconv_bin())
        .envs(env.iter().copied())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    stdin.flush().unwrap();
    (child, stdin)
}

/// Asserts `imgconv convert -O FMT [-o OPTS] SRC DST` fails with exit code 1 and
/// leaves no `DST` behind.
pub fn assert_convert_refused(fmt: &str, opts: &str, src: &Path, dst: &Path) {
    let o = imgconv_out(&convert_args(fmt, opts, src, dst));
    assert_eq!(
        o.status.code(),
        Some(1),
        "convert -O {fmt} -o {opts:?} {}: {}",
        src.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!dst.exists(), "{} left behind", dst.display());
}

/// `qemu-img create -q -f FMT [-o OPTS] PATH SIZE`, which must succeed.
pub fn qemu_create(fmt: &str, opts: &str, path: &Path, size: &str) {
    let mut a = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        a.extend(["-o", opts]);
    }
    a.extend([s(path), size]);
    qemu_img(&a);
}
