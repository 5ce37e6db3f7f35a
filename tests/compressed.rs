//! Compressed, archived and piped inputs (issue 6), judged by qemu-img.
//!
//! Images are made by qemu-img, wrapped by the real tools (xz, gzip, bzip2, zstd, tar),
//! converted by imgconv, and the result compared with the uncompressed source by
//! `qemu-img compare`. Needs the Debian packages xz-utils, gzip, bzip2, zstd and tar.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

/// The four compressions: (name in `info`, file suffix, compress command).
const COMPRESSIONS: [(&str, &str, &[&str]); 4] = [
    ("xz", "xz", &["xz", "-T2", "--block-size=1MiB", "-c"]),
    ("gzip", "gz", &["gzip", "-c"]),
    ("bzip2", "bz2", &["bzip2", "-c"]),
    ("zstd", "zst", &["zstd", "-q", "-c"]),
];

/// An 8 MiB raw disk with data in a few places (the rest sparse).
fn make_source(dir: &Path) -> PathBuf {
    let p = dir.join("disk.raw");
    make_raw(
        &p,
        8 << 20,
        &[
            (0, 4096, 0x11),
            (1 << 20, 700_000, 0x22),
            ((5 << 20) + 512, 3000, 0x33),
            ((8 << 20) - 65536, 65536, 0x44),
        ],
    );
    p
}

/// `qemu-img convert -O FMT [-o OPTS] SRC DIR/NAME`.
fn qemu_make(src: &Path, fmt: &str, opts: Option<&str>, dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    let mut args = vec!["convert", "-f", "raw", "-O", fmt];
    if let Some(o) = opts {
        args.extend(["-o", o]);
    }
    args.extend([src.to_str().unwrap(), out.to_str().unwrap()]);
    qemu_img(&args);
    out
}

/// Compresses `src` with `cmd` into `dst`.
fn compress_to(cmd: &[&str], src: &Path, dst: &Path) {
    let o = Command::new(cmd[0])
        .args(&cmd[1..])
        .arg(src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", cmd[0]));
    assert!(o.status.success(), "{cmd:?} failed");
    std::fs::write(dst, o.stdout).unwrap();
}

fn compress(cmd: &[&str], suffix: &str, src: &Path) -> PathBuf {
    let dst = PathBuf::from(format!("{}.{suffix}", src.display()));
    compress_to(cmd, src, &dst);
    dst
}

fn info_json(path: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["info", "--output=json"];
    args.extend_from_slice(extra);
    args.push(s(path));
    serde_json::from_str(&imgconv(&args)).unwrap()
}

/// Converts `src` to raw with imgconv and checks it against `expect` with qemu-img.
fn converts_same(src: &Path, expect: &Path, extra: &[&str]) {
    let out = PathBuf::from(format!("{}.out.raw", src.display()));
    let mut args = vec!["convert", "-O", "raw"];
    args.extend_from_slice(extra);
    args.extend([s(src), s(&out)]);
    imgconv(&args);
    assert_same_fmt(expect, "raw", &out, "raw");
    std::fs::remove_file(&out).unwrap();
}

/// Every compression of an image made by qemu-img as `fmt` converts back to the source,
/// and `info` names the wrapper and the inner format.
fn every_compression(fmt: &str, opts: Option<&str>) {
    let dir = scratch();
    let raw = make_source(dir.path());
    let img = if fmt == "raw" {
        raw.clone()
    } else {
        qemu_make(&raw, fmt, opts, dir.path(), &format!("disk.{fmt}"))
    };
    for (name, suffix, cmd) in COMPRESSIONS {
        let c = compress(cmd, suffix, &img);
        converts_same(&c, &raw, &[]);
        // -f names the inner format.
        converts_same(&c, &raw, &["-f", fmt]);
        let j = info_json(&c, &[]);
        assert_eq!(j["format"], fmt, "{}: {j}", c.display());
        assert_eq!(j["compression"], name, "{}: {j}", c.display());
        assert_eq!(j["virtual-size"], 8 << 20);
        let human = imgconv(&["info", s(&c)]);
        assert!(human.contains(&format!("file format: {fmt}\n")), "{human}");
        assert!(human.contains(&format!("compression: {name}\n")), "{human}");
        // compare and map read it too.
        let o = imgconv_out(&["compare", s(&c), s(&raw)]);
        assert!(o.status.success(), "compare {}: {o:?}", c.display());
        let map = imgconv(&["map", "--output=json", s(&c)]);
        assert!(map.contains("\"data\": true"), "{map}");
    }
}

#[test]
fn raw_in_every_compression() {
    every_compression("raw", None);
}

#[test]
fn qcow2_in_every_compression() {
    every_compression("qcow2", None);
}

#[test]
fn qcow2_compressed_clusters_in_every_compression() {
    let dir = scratch();
    let raw = make_source(dir.path());
    let q = dir.path().join("c.qcow2");
    qemu_img(&["convert", "-c", "-f", "raw", "-O", "qcow2", s(&raw), s(&q)]);
    for (_, suffix, cmd) in COMPRESSIONS {
        converts_same(&compress(cmd, suffix, &q), &raw, &[]);
    }
}

// VMDK and VDI: these pass once the VMDK and VDI readers are merged with this branch.
#[test]
fn vmdk_monolithic_sparse_in_every_compression() {
    every_compression("vmdk", None);
}

#[test]
fn vmdk_stream_optimized_in_every_compression() {
    every_compression("vmdk", Some("subformat=streamOptimized"));
}

#[test]
fn vdi_in_every_compression() {
    every_compression("vdi", None);
}

/// The raw disk cut in two at `at`, each half compressed on its own and concatenated.
fn two_parts(cmd: &[&str], raw: &Path, at: u64, dst: &Path) {
    let data = std::fs::read(raw).unwrap();
    let dir = dst.parent().unwrap();
    let (a, b) = (dir.join("part.a"), dir.join("part.b"));
    std::fs::write(&a, &data[..at as usize]).unwrap();
    std::fs::write(&b, &data[at as usize..]).unwrap();
    let (ca, cb) = (dir.join("part.a.c"), dir.join("part.b.c"));
    compress_to(cmd, &a, &ca);
    compress_to(cmd, &b, &cb);
    let mut all = std::fs::read(&ca).unwrap();
    all.extend(std::fs::read(&cb).unwrap());
    std::fs::write(dst, all).unwrap();
}

#[test]
fn concatenated_members_streams_and_frames() {
    let dir = scratch();
    let raw = make_source(dir.path());
    for (name, suffix, cmd) in COMPRESSIONS {
        // Cut inside data, not on a block boundary.
        let c = dir.path().join(format!("two.raw.{suffix}"));
        two_parts(cmd, &raw, (1 << 20) + 12345, &c);
        converts_same(&c, &raw, &[]);
        let j = info_json(&c, &[]);
        assert_eq!(j["virtual-size"], 8 << 20, "{name}");
        // A qcow2 cut in two the same way (spooled).
        let q = qemu_make(&raw, "qcow2", None, dir.path(), "two.qcow2");
        let cq = dir.path().join(format!("two.qcow2.{suffix}"));
        two_parts(cmd, &q, 200_001, &cq);
        converts_same(&cq, &raw, &[]);
    }
    // xz: stream padding between streams is allowed.
    let data = std::fs::read(&raw).unwrap();
    let (a, b) = (dir.path().join("pa"), dir.path().join("pb"));
    std::fs::write(&a, &data[..4 << 20]).unwrap();
    std::fs::write(&b, &data[4 << 20..]).unwrap();
    let mut all = Vec::new();
    for p in [&a, &b] {
        let c = dir.path().join("p.xz");
        compress_to(&["xz", "-c"], p, &c);
        all.extend(std::fs::read(&c).unwrap());
        all.extend([0u8; 8]);
    }
    let padded = dir.path().join("padded.raw.xz");
    std::fs::write(&padded, all).unwrap();
    converts_same(&padded, &raw, &[]);
    // zstd written by pzstd (several frames, skippable frames between them).
    if Command::new("pzstd").arg("--version").output().is_ok() {
        let p = dir.path().join("p.raw.zst");
        let o = Command::new("pzstd")
            .args(["-q", "-p", "2", "-c"])
            .arg(&raw)
            .output()
            .unwrap();
        assert!(o.status.success());
        std::fs::write(&p, o.stdout).unwrap();
        converts_same(&p, &raw, &[]);
    }
}

#[test]
fn multi_block_xz_is_one_pass_with_known_size() {
    let dir = scratch();
    let raw = make_source(dir.path());
    let c = compress(&["xz", "-T2", "--block-size=256KiB", "-c"], "xz", &raw);
    let j = info_json(&c, &[]);
    assert_eq!(j["virtual-size"], 8 << 20);
    assert_eq!(j["format"], "raw");
    converts_same(&c, &raw, &["-m", "2"]);
}

fn tar(dir: &Path, args: &[&str]) {
    let o = Command::new("tar")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "tar {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn gcp_tar_gz_with_disk_raw() {
    let dir = scratch();
    let raw = make_source(dir.path());
    // GCP's documented command (sparse old-GNU members), and the plain form.
    for (name, args) in [
        ("sparse.tar.gz", &["--format=oldgnu", "-Sczf"][..]),
        ("plain.tar.gz", &["--format=oldgnu", "-czf"][..]),
        ("posix-sparse.tar", &["--format=posix", "-Scf"][..]),
        ("gnu-sparse.tar", &["--format=gnu", "-Scf"][..]),
        ("plain.tar", &["-cf"][..]),
        ("pax.tar.xz", &["--format=pax", "-cJf"][..]),
    ] {
        let mut a = args.to_vec();
        a.extend([name, "disk.raw"]);
        tar(dir.path(), &a);
        let t = dir.path().join(name);
        converts_same(&t, &raw, &[]);
        let j = info_json(&t, &[]);
        assert_eq!(j["archive-member"], "disk.raw", "{name}: {j}");
        assert_eq!(j["format"], "raw");
        assert_eq!(j["virtual-size"], 8 << 20);
        let human = imgconv(&["info", s(&t)]);
        assert!(human.contains("archive member: disk.raw"), "{human}");
        if name.ends_with(".gz") {
            assert_eq!(j["compression"], "gzip");
        }
    }
}

#[test]
fn container_layer_with_disk_img_and_member_choice() {
    let dir = scratch();
    let raw = make_source(dir.path());
    let d = dir.path().join("disk");
    std::fs::create_dir(&d).unwrap();
    qemu_make(&raw, "qcow2", None, &d, "fedora.img");
    tar(dir.path(), &["-cf", "layer.tar", "disk"]);
    tar(dir.path(), &["-czf", "layer.tar.gz", "disk"]);
    for t in ["layer.tar", "layer.tar.gz"] {
        let t = dir.path().join(t);
        converts_same(&t, &raw, &[]);
        let j = info_json(&t, &[]);
        assert_eq!(j["format"], "qcow2");
        assert_eq!(j["archive-member"], "disk/fedora.img");
    }

    // Two candidates: an error naming both, and --member picks one.
    std::fs::copy(&raw, d.join("other.img")).unwrap();
    tar(dir.path(), &["-cf", "two.tar", "disk"]);
    tar(dir.path(), &["-czf", "two.tar.gz", "disk"]);
    for t in ["two.tar", "two.tar.gz"] {
        let t = dir.path().join(t);
        let out = dir.path().join("never.raw");
        let o = imgconv_out(&["convert", "-O", "raw", s(&t), s(&out)]);
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("disk/fedora.img")
                && err.contains("disk/other.img")
                && err.contains("--member"),
            "{err}"
        );
        assert!(!out.exists());
        converts_same(&t, &raw, &["--member", "disk/other.img"]);
        converts_same(&t, &raw, &["--member", "disk/fedora.img"]);
        let j = info_json(&t, &["--member", "disk/fedora.img"]);
        assert_eq!(j["format"], "qcow2");
        let o = imgconv_out(&["info", "--member", "disk/nope.img", s(&t)]);
        assert_eq!(o.status.code(), Some(1));
    }
}

/// Runs imgconv with `TMPDIR` set, returning its output.
fn imgconv_tmpdir(tmp: &Path, args: &[&str]) -> std::process::Output {
    Command::new(imgconv_bin())
        .env("TMPDIR", tmp)
        .args(args)
        .output()
        .unwrap()
}

fn assert_empty(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn truncated_or_corrupt_streams_fail_cleanly() {
    let dir = scratch();
    let raw = make_source(dir.path());
    let q = qemu_make(&raw, "qcow2", None, dir.path(), "disk.qcow2");
    let tmp = dir.path().join("tmp");
    let outdir = dir.path().join("out");
    std::fs::create_dir(&tmp).unwrap();
    std::fs::create_dir(&outdir).unwrap();
    for img in [&raw, &q] {
        for (name, suffix, cmd) in COMPRESSIONS {
            let c = std::fs::read(compress(cmd, suffix, img)).unwrap();
            let mut flipped = c.clone();
            let mid = flipped.len() / 2;
            for b in &mut flipped[mid..mid + 4] {
                *b ^= 0xa5;
            }
            for (what, bytes) in [
                ("truncated", c[..c.len() * 2 / 3].to_vec()),
                ("cut-end", c[..c.len() - 1].to_vec()),
                ("corrupt", flipped),
            ] {
                let bad = dir.path().join(format!("bad-{what}.{suffix}"));
                std::fs::write(&bad, &bytes).unwrap();
                let out = outdir.join("out.raw");
                for (fmt, target) in [("raw", s(&out)), ("qcow2", s(&out))] {
                    let o = imgconv_tmpdir(&tmp, &["convert", "-O", fmt, s(&bad), target]);
                    let err = String::from_utf8_lossy(&o.stderr);
                    assert_eq!(
                        o.status.code(),
                        Some(1),
                        "{name} {what} {}: {err}",
                        img.display()
                    );
                    assert!(err.starts_with("imgconv: "), "{err}");
                    assert!(!err.contains("panicked"), "{err}");
                    assert_empty(&outdir);
                    assert_empty(&tmp);
                }
                // From a pipe as well.
                let o = pipe_through(&tmp, &bytes, &["convert", "-O", "raw", "-", s(&out)]);
                assert_eq!(o.status.code(), Some(1), "stdin {name} {what}");
                assert_empty(&outdir);
                assert_empty(&tmp);
            }
        }
    }
    // A tar.gz cut inside its member.
    tar(dir.path(), &["-czf", "cut.tar.gz", "disk.raw"]);
    let t = dir.path().join("cut.tar.gz");
    let bytes = std::fs::read(&t).unwrap();
    std::fs::write(&t, &bytes[..bytes.len() / 2]).unwrap();
    let out = outdir.join("out.raw");
    let o = imgconv_tmpdir(&tmp, &["convert", "-O", "raw", s(&t), s(&out)]);
    assert_eq!(o.status.code(), Some(1));
    assert_empty(&outdir);
    assert_empty(&tmp);
}

/// Runs imgconv with `input` on its stdin and `TMPDIR=tmp`.
fn pipe_through(tmp: &Path, input: &[u8], args: &[&str]) -> std::process::Output {
    let mut child = Command::new(imgconv_bin())
        .env("TMPDIR", tmp)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&data); // imgconv may stop reading early on errors
    });
    let o = child.wait_with_output().unwrap();
    writer.join().unwrap();
    o
}

#[test]
fn stdin_to_stdout_matches_file_to_file() {
    let dir = scratch();
    let raw = make_source(dir.path());
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let xz = compress(&["xz", "-T2", "--block-size=1MiB", "-c"], "xz", &raw);
    let bytes = std::fs::read(&xz).unwrap();

    // raw.xz -> raw through `- -`.
    let file_out = dir.path().join("file.raw");
    imgconv(&["convert", "-O", "raw", s(&xz), s(&file_out)]);
    let o = pipe_through(&tmp, &bytes, &["convert", "-O", "raw", "-", "-"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.stdout, std::fs::read(&file_out).unwrap());
    assert_eq!(o.stdout, std::fs::read(&raw).unwrap());
    assert_empty(&tmp);

    // Every compression, and no compression, from stdin.
    for (_, suffix, cmd) in COMPRESSIONS {
        let c = std::fs::read(compress(cmd, suffix, &raw)).unwrap();
        let o = pipe_through(&tmp, &c, &["convert", "-O", "raw", "-", "-"]);
        assert!(
            o.status.success(),
            "{suffix}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(o.stdout, std::fs::read(&raw).unwrap(), "{suffix}");
    }
    let o = pipe_through(
        &tmp,
        &std::fs::read(&raw).unwrap(),
        &["convert", "-O", "raw", "-", "-"],
    );
    assert_eq!(o.stdout, std::fs::read(&raw).unwrap());

    // qcow2.gz from stdin: spooled in --tmpdir, which is left empty.
    let q = qemu_make(&raw, "qcow2", None, dir.path(), "disk.qcow2");
    let qgz = std::fs::read(compress(&["gzip", "-c"], "gz", &q)).unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    let out = dir.path().join("from-stdin.raw");
    let o = pipe_through(
        &tmp,
        &qgz,
        &["convert", "--tmpdir", s(&spool), "-O", "raw", "-", s(&out)],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_same_fmt(&raw, "raw", &out, "raw");
    assert_empty(&spool);
    assert_empty(&tmp);

    // info from stdin names the wrapper and the inner format.
    let o = pipe_through(&tmp, &qgz, &["info", "--output=json", "-"]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["format"], "qcow2");
    assert_eq!(j["compression"], "gzip");
    assert_empty(&tmp);
}

// Needs the VMDK writer and stream reader (branch vmdk).
#[test]
fn stdin_stream_optimized_vmdk_both_ways() {
    let dir = scratch();
    let raw = make_source(dir.path());
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let xz = compress(&["xz", "-c"], "xz", &raw);

    // raw.xz -> streamOptimized VMDK on stdout, vs the file-to-file conversion.
    let file_vmdk = dir.path().join("file.vmdk");
    imgconv_convert("vmdk", "subformat=streamOptimized", &xz, &file_vmdk);
    let o = pipe_through(
        &tmp,
        &std::fs::read(&xz).unwrap(),
        &[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            "-",
            "-",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pipe_vmdk = dir.path().join("pipe.vmdk");
    std::fs::write(&pipe_vmdk, &o.stdout).unwrap();
    assert_same_fmt(&file_vmdk, "vmdk", &pipe_vmdk, "vmdk");
    assert_same_fmt(&raw, "raw", &pipe_vmdk, "vmdk");

    // streamOptimized VMDK (plain and xz'd) -> raw from stdin.
    let file_raw = dir.path().join("file.raw");
    imgconv(&["convert", "-O", "raw", s(&pipe_vmdk), s(&file_raw)]);
    let vxz = compress(&["xz", "-c"], "xz", &pipe_vmdk);
    for input in [&pipe_vmdk, &vxz] {
        let o = pipe_through(
            &tmp,
            &std::fs::read(input).unwrap(),
            &["convert", "-O", "raw", "-", "-"],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(o.stdout, std::fs::read(&file_raw).unwrap());
    }
    assert_empty(&tmp);
}

/// Feeds `input` to `imgconv ARGS` on stdin and then nothing, interrupts it with SIGINT
/// half a second later, and checks that it failed.
fn ctrl_c_half_fed(args: &[&str], env: &[(&str, &Path)], input: &[u8]) {
    let (mut child, stdin) = imgconv_fed_partly(args, env, input);
    std::thread::sleep(std::time::Duration::from_millis(500));
    // SAFETY: signalling a child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    drop(stdin);
    assert!(!status.success(), "{args:?} was not interrupted");
}

#[test]
fn interrupted_spool_leaves_nothing() {
    let dir = scratch();
    let raw = make_source(dir.path());
    let q = qemu_make(&raw, "qcow2", None, dir.path(), "disk.qcow2");
    let qgz = std::fs::read(compress(&["gzip", "-c"], "gz", &q)).unwrap();
    let tmp = dir.path().join("tmp");
    let outdir = dir.path().join("out");
    std::fs::create_dir(&tmp).unwrap();
    std::fs::create_dir(&outdir).unwrap();
    let out = outdir.join("x.raw");
    // Half of the stream, then silence: imgconv is in the middle of spooling.
    ctrl_c_half_fed(
        &["convert", "-O", "raw", "-", s(&out)],
        &[("TMPDIR", &tmp)],
        &qgz[..qgz.len() / 2],
    );
    assert_empty(&tmp);
    assert_empty(&outdir);
}

#[test]
fn library_opens_any_reader() {
    let dir = scratch();
    let raw = make_source(dir.path());
    let zst = compress(&["zstd", "-q", "-c"], "zst", &raw);
    let f = std::fs::File::open(&zst).unwrap();
    let img = imgconv::open_reader(f, &imgconv::OpenOptions::default()).unwrap();
    assert_eq!(img.info().wrapper, Some(imgconv::Compression::Zstd));
    assert_eq!(img.format(), imgconv::Format::Raw);
    let mut all = Vec::new();
    img.reader().read_to_end(&mut all).unwrap();
    assert_eq!(all, std::fs::read(&raw).unwrap());
    // And through the engine to any Write.
    let f = std::fs::File::open(&zst).unwrap();
    let img = imgconv::open_reader(f, &imgconv::OpenOptions::default()).unwrap();
    let out = dir.path().join("lib.raw");
    let w = std::fs::File::create(&out).unwrap();
    imgconv::convert_to_writer(
        &img,
        Box::new(w),
        &imgconv::ConvertOptions::new(imgconv::Format::Raw),
    )
    .unwrap();
    assert_same_fmt(&raw, "raw", &out, "raw");

    // A gzip body read in one pass: into qcow2 it works; VMDK (which needs the size
    // first) is refused with an error naming the feature, and leaves no file.
    let gz = dir.path().join("body.raw.gz");
    compress_piped(&["gzip", "-c"], &raw, &gz);
    let one_pass = imgconv::OpenOptions::untrusted().stream_unknown_length();
    let img = imgconv::open_reader(std::fs::File::open(&gz).unwrap(), &one_pass).unwrap();
    assert!(!img.device().length_known());
    let q = dir.path().join("lib.qcow2");
    imgconv::convert(
        &img,
        &q,
        &imgconv::ConvertOptions::new(imgconv::Format::Qcow2),
    )
    .unwrap();
    assert!(img.device().length_known());
    assert_eq!(img.size(), 8 << 20);
    assert_converted_whole(&raw, 8 << 20, &q, "qcow2");
    let img = imgconv::open_reader(std::fs::File::open(&gz).unwrap(), &one_pass).unwrap();
    let v = dir.path().join("lib.vmdk");
    let e = imgconv::convert(
        &img,
        &v,
        &imgconv::ConvertOptions::new(imgconv::Format::Vmdk),
    )
    .unwrap_err();
    assert!(matches!(e, imgconv::Error::Unsupported { .. }), "{e}");
    assert!(e.to_string().contains("unknown length"), "{e}");
    assert!(!v.exists());
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// Compression is transparent on real images: every corpus file that imgconv reads
/// once decompressed, it reads the same straight from the compressed file.
#[test]
fn corpus_images_straight_from_their_compressed_files() {
    let Some(corpus) = corpus_dir() else { return };
    let dir = scratch();
    let mut files = Vec::new();
    walk(&corpus, &mut files);
    files.sort();
    let mut n = 0;
    for p in files {
        let Some(ext) = p.extension().and_then(|e| e.to_str()) else {
            continue;
        };
        if !["xz", "gz", "bz2"].contains(&ext) || std::fs::metadata(&p).unwrap().len() > 4 << 20 {
            continue;
        }
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        let rel = p
            .strip_prefix(&corpus)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let plain = corpus_file(&corpus, &rel, dir.path(), &name);
        let (a, b) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
        let untrusted = ["convert", "--untrusted", "-O", "raw"];
        let mut args = untrusted.to_vec();
        args.extend([s(&plain), s(&a)]);
        if imgconv_out(&args).status.success() {
            let mut args = untrusted.to_vec();
            // A fixed VHD has its only footer at its end, which a stream does not show in
            // advance: inside a compressed file it is named with -f (see the README).
            let info = imgconv(&["info", "--output=json", s(&plain)]);
            if info.contains("\"format\": \"vpc\"") && !info.contains("cluster-size") {
                args.extend(["-f", "vpc"]);
            }
            args.extend([s(&p), s(&b)]);
            let o = imgconv_out(&args);
            assert!(
                o.status.success(),
                "{rel}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert_same_fmt(&a, "raw", &b, "raw");
            n += 1;
        }
        for f in [&plain, &a, &b] {
            let _ = std::fs::remove_file(f);
        }
    }
    eprintln!("{n} corpus images read straight from their compressed files");
    assert!(n > 0);
}

/// A GNU tar header for `name` with a base-256 `size` field.
fn gnu_header(name: &str, size: u64) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[..name.len()].copy_from_slice(name.as_bytes());
    b[100..108].copy_from_slice(b"0000644\0");
    b[124] = 0x80;
    b[128..136].copy_from_slice(&size.to_be_bytes());
    b[156] = b'0';
    b[257..265].copy_from_slice(b"ustar  \0");
    b[148..156].copy_from_slice(b"        ");
    let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
    b[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    b
}

fn gzip_bytes(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[test]
fn sizes_from_headers_are_bounded_and_checked() {
    let dir = scratch();
    let outdir = dir.path().join("out");
    std::fs::create_dir(&outdir).unwrap();
    let out = outdir.join("o.raw");
    // A member claiming more than any disk may hold.
    let mut t = gnu_header("disk.raw", 1 << 63).to_vec();
    t.extend_from_slice(&[7u8; 4096]);
    let huge = dir.path().join("huge.tar.gz");
    std::fs::write(&huge, gzip_bytes(&t)).unwrap();
    let o = imgconv_out(&["convert", "-O", "raw", s(&huge), s(&out)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("too large"),
        "{o:?}"
    );
    // A member claiming 1 TiB that holds 4 KiB: the conversion fails at the end of the
    // data and leaves no output.
    let mut t = gnu_header("disk.raw", 1 << 40).to_vec();
    t.extend_from_slice(&[7u8; 4096]);
    let short = dir.path().join("short.tar.gz");
    std::fs::write(&short, gzip_bytes(&t)).unwrap();
    let j = info_json(&short, &[]);
    assert_eq!(j["virtual-size"], 1u64 << 40);
    let o = imgconv_out(&["convert", "-O", "raw", s(&short), s(&out)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("ends inside"),
        "{o:?}"
    );
    assert_empty(&outdir);
    // A damaged xz index is reported as such.
    let raw = make_source(dir.path());
    let xz = compress(&["xz", "-c"], "xz", &raw);
    let mut b = std::fs::read(&xz).unwrap();
    let n = b.len();
    b[n - 20] ^= 0xff; // inside the index
    std::fs::write(&xz, &b).unwrap();
    let o = imgconv_out(&["info", s(&xz)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("xz: invalid"),
        "{o:?}"
    );
}

#[test]
fn named_pipe_is_read_as_a_stream() {
    let dir = scratch();
    let raw = make_source(dir.path());
    let gz = compress(&["gzip", "-c"], "gz", &raw);
    let fifo = dir.path().join("fifo");
    run_ok("mkfifo", &[s(&fifo)]);
    let data = std::fs::read(&gz).unwrap();
    let f2 = fifo.clone();
    let writer = std::thread::spawn(move || {
        let mut w = std::fs::OpenOptions::new().write(true).open(&f2).unwrap();
        let _ = w.write_all(&data);
    });
    let out = dir.path().join("o.raw");
    imgconv(&["convert", "-O", "raw", s(&fifo), s(&out)]);
    writer.join().unwrap();
    assert_same_fmt(&raw, "raw", &out, "raw");
}

/// A raw disk in a gzip or bzip2 file is decoded once: straight into raw and qcow2
/// targets, and into a sparse spool file, unlinked at once, for VDI and VMDK targets
/// and `info` (which need the size first). Everything is right and nothing is left in
/// `$TMPDIR`.
#[test]
fn raw_gz_and_bz2_files_convert_through_an_unlinked_spool() {
    let dir = scratch();
    let raw = make_source(dir.path());
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    for (name, suffix, cmd) in [
        ("gzip", "gz", &["gzip", "-c"][..]),
        ("bzip2", "bz2", &["bzip2", "-c"][..]),
    ] {
        let c = compress(cmd, suffix, &raw);
        for fmt in ["qcow2", "raw", "vdi", "vmdk"] {
            let out = dir.path().join(format!("out.{fmt}"));
            let o = imgconv_tmpdir(&tmp, &["convert", "-O", fmt, s(&c), s(&out)]);
            assert!(
                o.status.success(),
                "{name} -> {fmt}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert_same_fmt(&raw, "raw", &out, fmt);
            assert_empty(&tmp);
            std::fs::remove_file(&out).unwrap();
        }
        let o = imgconv_tmpdir(&tmp, &["info", "--output=json", s(&c)]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(j["format"], "raw");
        assert_eq!(j["compression"], name);
        assert_eq!(j["virtual-size"], 8u64 << 20);
        assert_empty(&tmp);
    }
}

/// Ctrl-C while a bzip2 raw file is being spooled (for a VDI target, which needs the
/// size up front) leaves no spool and no output.
#[test]
fn ctrl_c_while_spooling_a_bz2_file_leaves_nothing() {
    let dir = scratch();
    // 24 MiB of poorly compressible data: bzip2 takes a while to decode it.
    let mut data = vec![0u8; 24 << 20];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for chunk in data.chunks_mut(8) {
        chunk.copy_from_slice(&(xorshift64(&mut x) & 0x0f0f_0f0f_0f0f_0f0f).to_le_bytes());
    }
    let raw = dir.path().join("noise.raw");
    std::fs::write(&raw, &data).unwrap();
    drop(data);
    let bz = compress(&["bzip2", "-1", "-c"], "bz2", &raw);
    let tmp = dir.path().join("tmp");
    let outdir = dir.path().join("out");
    std::fs::create_dir(&tmp).unwrap();
    std::fs::create_dir(&outdir).unwrap();
    let out = outdir.join("x.vdi");
    let mut child = Command::new(imgconv_bin())
        .env("TMPDIR", &tmp)
        .args(["convert", "-O", "vdi", s(&bz), s(&out)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the (already unlinked) spool file is open in the child.
    let fds = PathBuf::from(format!("/proc/{}/fd", child.id()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut spooling = false;
    while !spooling && std::time::Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        spooling = std::fs::read_dir(&fds).into_iter().flatten().any(|e| {
            e.ok()
                .and_then(|e| std::fs::read_link(e.path()).ok())
                .is_some_and(|t| t.to_string_lossy().contains(".imgconv-spool"))
        });
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(spooling, "the conversion never spooled (or was too quick)");
    // SAFETY: signalling a child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert_empty(&tmp);
    assert_empty(&outdir);
}

/// A multi-stream bzip2 file (as pbzip2 writes it) big enough to be decoded by several
/// threads converts to the same disk.
#[test]
fn multi_stream_bz2_file_converts() {
    let dir = scratch();
    // 12 MiB of poorly compressible data in 1 MiB streams, plus a sparse tail.
    let mut data = vec![0u8; 16 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in data[..12 << 20].chunks_mut(8) {
        chunk.copy_from_slice(&xorshift64(&mut x).to_le_bytes());
    }
    let raw = dir.path().join("multi.raw");
    std::fs::write(&raw, &data).unwrap();
    let bz = dir.path().join("multi.raw.bz2");
    let mut all = Vec::new();
    for part in data.chunks(1 << 20) {
        let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
        e.write_all(part).unwrap();
        all.extend(e.finish().unwrap());
    }
    std::fs::write(&bz, &all).unwrap();
    drop(data);
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let out = dir.path().join("multi.qcow2");
    let o = imgconv_tmpdir(&tmp, &["convert", "-O", "qcow2", s(&bz), s(&out)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_same_fmt(&raw, "raw", &out, "qcow2");
    assert_empty(&tmp);
    // A damaged stream in the middle fails cleanly.
    let mid = all.len() / 2;
    all[mid] ^= 0x33;
    std::fs::write(&bz, &all).unwrap();
    std::fs::remove_file(&out).unwrap();
    let o = imgconv_tmpdir(&tmp, &["convert", "-O", "qcow2", s(&bz), s(&out)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("bzip2"));
    assert!(!out.exists());
    assert_empty(&tmp);
}

/// Compresses `src` into `dst` through a pipe, so that the compressor records no size
/// (zstd then writes frames without a content size).
fn compress_piped(cmd: &[&str], src: &Path, dst: &Path) {
    let o = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(std::fs::File::open(src).unwrap())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", cmd[0]));
    assert!(o.status.success(), "{cmd:?} failed");
    std::fs::write(dst, o.stdout).unwrap();
}

/// The compressions that record no length when fed through a pipe.
const UNSIZED: [(&str, &[&str]); 3] = [
    ("gz", &["gzip", "-c"]),
    ("bz2", &["bzip2", "-c"]),
    ("zst", &["zstd", "-q", "-c"]),
];

/// `convert -O FMT SRC DST` with a spooling folder `nowhere` that does not exist, so
/// that any spooling fails.
fn one_pass<'a>(nowhere: &'a str, fmt: &'a str, src: &'a str, dst: &'a str) -> [&'a str; 7] {
    ["convert", "--tmpdir", nowhere, "-O", fmt, src, dst]
}

/// Judges a conversion of the raw disk `raw` (`size` bytes) into `out` (raw or qcow2).
fn assert_converted_whole(raw: &Path, size: u64, out: &Path, fmt: &str) {
    if fmt == "raw" {
        assert_eq!(std::fs::read(out).unwrap(), std::fs::read(raw).unwrap());
        return;
    }
    assert_qemu_check_clean(out);
    assert_eq!(qemu_info(out)["virtual-size"], size.next_multiple_of(512));
    if size > 0 {
        assert_same_fmt(raw, "raw", out, fmt);
    }
}

/// A raw disk in a stream that records its length nowhere (gzip, bzip2, zstd without
/// content size, plain stdin) converts into raw and qcow2 in one pass: nothing is
/// spooled (the spooling folder does not even exist) and the size is found at the end,
/// whether the stream ends on a buffer boundary, mid-sector, after zeros, or at once.
#[test]
fn unknown_length_raw_streams_convert_in_one_pass() {
    let dir = scratch();
    let nowhere = dir.path().join("no-such-folder");
    // (size, pieces of data as make_raw takes them)
    type Case = (u64, &'static [(u64, usize, u8)]);
    let cases: [Case; 4] = [
        (
            8 << 20,
            &[(0, 4096, 0x11), ((8 << 20) - 65536, 65536, 0x44)],
        ),
        (
            (5 << 20) + 1000,
            &[(1 << 20, 700_000, 0x22), ((5 << 20) + 1, 999, 0x55)],
        ),
        ((6 << 20) + 1536, &[(4096, 4096, 0x66)]),
        (0, &[]),
    ];
    let nowhere = s(&nowhere);
    for (i, (size, pieces)) in cases.iter().enumerate() {
        let raw = dir.path().join(format!("d{i}.raw"));
        make_raw(&raw, *size, pieces);
        let bytes = std::fs::read(&raw).unwrap();
        for (suffix, cmd) in UNSIZED {
            let c = dir.path().join(format!("d{i}.raw.{suffix}"));
            compress_piped(cmd, &raw, &c);
            for fmt in ["raw", "qcow2"] {
                let out = dir.path().join(format!("o{i}-{suffix}.{fmt}"));
                imgconv(&one_pass(nowhere, fmt, s(&c), s(&out)));
                assert_converted_whole(&raw, *size, &out, fmt);
            }
        }
        // Plain raw and raw.gz on stdin, to a file and to stdout.
        let out = dir.path().join(format!("o{i}-stdin.qcow2"));
        let args = one_pass(nowhere, "qcow2", "-", s(&out));
        let o = pipe_through(dir.path(), &bytes, &args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_converted_whole(&raw, *size, &out, "qcow2");
        let gz = std::fs::read(dir.path().join(format!("d{i}.raw.gz"))).unwrap();
        let o = pipe_through(dir.path(), &gz, &one_pass(nowhere, "raw", "-", "-"));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(o.stdout, bytes);
    }
}

/// Every qcow2 layout option works when the size is only known at the end (the L1
/// table then goes after the data): 512-byte clusters need an L1 table of many clusters
/// and many refcount blocks; preallocation, extended L2, v2, narrow refcounts,
/// compression and a backing file are all judged by `qemu-img check` and `compare`.
#[test]
fn qcow2_options_with_a_size_known_at_the_end() {
    let dir = scratch();
    let size = (40 << 20) + 3584;
    let raw = dir.path().join("d.raw");
    make_raw(
        &raw,
        size,
        &[
            (0, 70_000, 0x11),
            (9 << 20, 4096, 0x22),
            ((20 << 20) + 512, 300_000, 0x33),
            (size - 2048, 2048, 0x44),
        ],
    );
    let zst = dir.path().join("d.raw.zst");
    compress_piped(&["zstd", "-q", "-c"], &raw, &zst);
    let nowhere = dir.path().join("no-such-folder");
    for opts in [
        "cluster_size=512",
        "cluster_size=2M",
        "extended_l2=on",
        "extended_l2=on,preallocation=metadata",
        "compat=0.10",
        "refcount_bits=1",
        "refcount_bits=64,lazy_refcounts=on",
        "preallocation=metadata",
        "preallocation=falloc",
        "preallocation=full",
        "compression_type=zstd",
    ] {
        for compress in [false, true] {
            if compress && opts.contains("prealloc") {
                continue;
            }
            let out = dir.path().join("o.qcow2");
            let mut args = vec![
                "convert",
                "--tmpdir",
                s(&nowhere),
                "-O",
                "qcow2",
                "-o",
                opts,
            ];
            if compress {
                args.push("-c");
            }
            args.extend([s(&zst), s(&out)]);
            imgconv(&args);
            assert_converted_whole(&raw, size, &out, "qcow2");
            std::fs::remove_file(&out).unwrap();
        }
    }
    // Over a backing file: only what differs is stored, and it reads the same.
    let base_raw = dir.path().join("base.raw");
    make_raw(
        &base_raw,
        size,
        &[(0, 70_000, 0x11), (30 << 20, 65536, 0x77)],
    );
    let base = qemu_make(&base_raw, "qcow2", None, dir.path(), "base.qcow2");
    let out = dir.path().join("overlay.qcow2");
    let args = [
        "convert",
        "--tmpdir",
        s(&nowhere),
        "-O",
        "qcow2",
        "-B",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&zst),
        s(&out),
    ];
    imgconv(&args);
    assert_qemu_check_clean(&out);
    assert_same_fmt(&raw, "raw", &out, "qcow2");
    let map = qemu_img(&["map", "--output=json", s(&out)]);
    assert!(
        map.contains("\"depth\": 1"),
        "nothing taken from the backing file: {map}"
    );
    drop(base);
}

/// A one-pass conversion interrupted by Ctrl-C, or fed a damaged stream, leaves
/// no output.
#[test]
fn one_pass_conversion_interrupted_or_damaged_leaves_nothing() {
    let dir = scratch();
    let raw = make_source(dir.path());
    let gz = dir.path().join("d.raw.gz");
    compress_piped(&["gzip", "-c"], &raw, &gz);
    let gz = std::fs::read(&gz).unwrap();
    let outdir = dir.path().join("out");
    std::fs::create_dir(&outdir).unwrap();
    let out = outdir.join("x.qcow2");
    ctrl_c_half_fed(
        &["convert", "-O", "qcow2", "-", s(&out)],
        &[],
        &gz[..gz.len() / 2],
    );
    assert_empty(&outdir);
    // Cut short on stdin: the disk must not silently end early.
    for fmt in ["raw", "qcow2"] {
        let o = pipe_through(
            dir.path(),
            &gz[..gz.len() - 9],
            &["convert", "-O", fmt, "-", s(&out)],
        );
        assert_eq!(
            o.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(String::from_utf8_lossy(&o.stderr).contains("gzip"));
        assert_empty(&outdir);
    }
}

/// xz streams as `xz -T0` writes them (multi-block): with 12 MiB blocks (`-3`) two
/// decoder threads fit the 64 MiB budget; with 24 MiB blocks (`-6`) the decoder drops
/// to one thread rather than exceed it. Either way the disk is read right.
#[test]
fn multithreaded_xz_stays_within_the_memory_budget() {
    use common::watch::Watch;
    let d = scratch();
    let raw = d.path().join("big.raw");
    // 160 MiB with data in every 8 MiB: every block holds some.
    let pieces: Vec<(u64, usize, u8)> = (0..20u64)
        .map(|k| (k * (8 << 20), 1 << 20, k as u8 + 1))
        .collect();
    make_raw(&raw, 160 << 20, &pieces);
    let w = Watch::default();
    for preset in ["-3", "-6"] {
        let xz = d.path().join(format!("big{preset}.raw.xz"));
        compress_to(&["xz", "-T2", preset, "-c"], &raw, &xz);
        let out = d.path().join("out.qcow2");
        let _ = std::fs::remove_file(&out);
        let args = ["convert", "-O", "qcow2", s(&xz), s(&out)];
        let r = w.run(&args);
        r.assert_code(args, 0);
        r.assert_rss_below(args, 64 << 10);
        assert_same_fmt(&raw, "raw", &out, "qcow2");
    }
}
