//! `imgconv check` against `qemu-img check`: same verdict, counts, wording and exit
//! code on qemu-made images, on imgconv's own, and on images damaged on purpose.

mod common;
use common::*;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Runs both checkers in both output modes and asserts identical results. Returns
/// qemu-img's JSON.
fn agree(img: &Path) -> Value {
    let mut json = Value::Null;
    for out in ["human", "json"] {
        let q = run("qemu-img", &["check", &format!("--output={out}"), s(img)]);
        let i = imgconv_out(&["check", &format!("--output={out}"), s(img)]);
        assert_eq!(
            q.status.code(),
            i.status.code(),
            "{}: exit codes differ\nqemu: {}\nours: {}",
            img.display(),
            String::from_utf8_lossy(&q.stderr),
            String::from_utf8_lossy(&i.stderr)
        );
        if out == "json" {
            let qj: Value = serde_json::from_slice(&q.stdout).unwrap();
            let ij: Value = serde_json::from_slice(&i.stdout).unwrap();
            assert_eq!(qj, ij, "{}", img.display());
            json = qj;
        }
        // Same text, byte for byte (key order included).
        assert_eq!(
            String::from_utf8_lossy(&q.stdout),
            String::from_utf8_lossy(&i.stdout),
            "{} --output={out}",
            img.display()
        );
        assert_eq!(
            strip(&q.stderr, "qemu-img: "),
            strip(&i.stderr, "imgconv: "),
            "{} messages",
            img.display()
        );
    }
    json
}

/// The lines of a tool's stderr, each without the tool-name prefix `p`.
fn strip(b: &[u8], p: &str) -> Vec<String> {
    String::from_utf8_lossy(b)
        .lines()
        .map(|l| l.strip_prefix(p).unwrap_or(l).to_string())
        .collect()
}

fn pattern_raw(dir: &Path) -> PathBuf {
    let p = dir.join("src.raw");
    make_raw(
        &p,
        12 << 20,
        &[
            (0, 300_000, 1),
            (5 << 20, 1 << 20, 2),
            ((12 << 20) - 4096, 4096, 3),
        ],
    );
    p
}

fn create(dir: &Path, name: &str, opts: &str, size: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_create("qcow2", opts, &p, size);
    p
}

fn io(img: &Path, cmds: &[&str]) {
    let mut a = Vec::new();
    for c in cmds {
        a.extend_from_slice(&["-c", *c]);
    }
    a.push(s(img));
    qemu_io(&a);
}

#[test]
fn agrees_with_qemu_on_qemu_made_images() {
    let d = scratch();
    let src = pattern_raw(d.path());
    let t1 = create(d.path(), "snap.qcow2", "", "20M");
    io(&t1, &["write -P 3 0 3M", "write -P 4 8M 100k"]);
    qemu_img(&["snapshot", "-c", "s1", s(&t1)]);
    io(&t1, &["write -P 5 1M 2M", "write -z 8M 64k"]);
    qemu_img(&["snapshot", "-c", "s2", s(&t1)]);
    io(&t1, &["discard 0 1M"]);
    let t2 = create(
        d.path(),
        "ext.qcow2",
        "extended_l2=on,cluster_size=128k",
        "20M",
    );
    io(&t2, &["write -P 3 4k 3M", "write -z 8M 4k"]);
    let t6 = create(d.path(), "lazy.qcow2", "lazy_refcounts=on", "20M");
    io(&t6, &["write -P 3 0 1M"]);
    let t7 = create(d.path(), "bitmaps.qcow2", "", "20M");
    io(&t7, &["write -P 3 0 1M"]);
    qemu_img(&["bitmap", "--add", s(&t7), "bm0"]);
    // An absolute data file name: a relative one is created relative to the cwd.
    let df = format!(
        "data_file={},data_file_raw=on",
        s(&d.path().join("df.data"))
    );
    let t8 = create(d.path(), "datafile.qcow2", &df, "20M");
    io(&t8, &["write -P 3 0 1M"]);
    let t9 = d.path().join("overlay.qcow2");
    qemu_img(&overlay_args("qcow2", &["-q"], "snap.qcow2", &t9, ""));
    io(&t9, &["write -P 9 64k 64k", "write -z 2M 1M"]);
    let t10 = create(d.path(), "prealloc.qcow2", "preallocation=metadata", "20M");
    let mut imgs = vec![t1, t2, t6, t7, t8, t9, t10];
    for (i, o) in [
        "compression_type=zstd,refcount_bits=1",
        "compat=0.10,cluster_size=512",
        "refcount_bits=64,cluster_size=4k",
        "cluster_size=2M",
    ]
    .iter()
    .enumerate()
    {
        let p = d.path().join(format!("conv{i}.qcow2"));
        qemu_img(&["convert", "-c", "-O", "qcow2", "-o", o, s(&src), s(&p)]);
        imgs.push(p);
    }
    for img in &imgs {
        let j = agree(img);
        assert_eq!(j["check-errors"], Value::from(0));
    }
}

#[test]
fn agrees_with_qemu_on_imgconv_images() {
    let d = scratch();
    let src = pattern_raw(d.path());
    for (i, (c, o)) in [
        (false, ""),
        (true, ""),
        (true, "extended_l2=on,cluster_size=64k"),
        (true, "cluster_size=512,refcount_bits=2"),
        (false, "compat=0.10,cluster_size=4k"),
        (false, "preallocation=metadata,refcount_bits=64"),
    ]
    .iter()
    .enumerate()
    {
        let p = d.path().join(format!("ours{i}.qcow2"));
        let mut a = vec!["convert", "-O", "qcow2"];
        if *c {
            a.push("-c");
        }
        if !o.is_empty() {
            a.extend_from_slice(&["-o", o]);
        }
        a.extend_from_slice(&[s(&src), s(&p)]);
        imgconv(&a);
        let j = agree(&p);
        assert!(
            j.get("leaks").is_none() && j.get("corruptions").is_none(),
            "{j}"
        );
        if *c {
            assert!(j["compressed-clusters"].as_u64().unwrap() > 0);
        }
    }
}

/// Big-endian field access for damaging images.
fn rd(f: &std::fs::File, off: u64, n: usize) -> u64 {
    let mut b = vec![0u8; n];
    f.read_exact_at(&mut b, off).unwrap();
    b.iter().fold(0, |a, &x| (a << 8) | x as u64)
}

fn wr(f: &std::fs::File, off: u64, v: u64, n: usize) {
    f.write_all_at(&v.to_be_bytes()[8 - n..], off).unwrap();
}

/// A 16-bit-refcount, 64 KiB-cluster image made by `tool`, damaged in one way.
fn damaged(dir: &Path, src: &Path, tool: &str, kind: &str) -> PathBuf {
    let p = dir.join(format!("{tool}-{kind}.qcow2"));
    if tool == "qemu" {
        qemu_img(&["convert", "-O", "qcow2", s(src), s(&p)]);
    } else {
        imgconv(&["convert", "-O", "qcow2", s(src), s(&p)]);
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    let cs = 1u64 << rd(&f, 20, 4);
    let rt = rd(&f, 48, 8);
    let rb = rd(&f, rt, 8);
    let l1 = rd(&f, 40, 8);
    let l2 = rd(&f, l1, 8) & 0x00ff_ffff_ffff_fe00;
    let first_data = (0..cs / 8)
        .map(|j| l2 + 8 * j)
        .find(|&o| rd(&f, o, 8) != 0)
        .unwrap();
    match kind {
        "leak" => {
            // One more cluster at the end of the file, counted but unused.
            let n = f.metadata().unwrap().len().div_ceil(cs);
            f.set_len((n + 1) * cs).unwrap();
            wr(&f, rb + 2 * n, 1, 2);
        }
        "low" => {
            let c = (rd(&f, first_data, 8) & 0x00ff_ffff_ffff_fe00) / cs;
            wr(&f, rb + 2 * c, 0, 2);
        }
        "eof" => wr(&f, first_data, (1 << 63) | (0x10_0000 * cs), 8),
        "high" => wr(&f, rb + 2 * (l2 / cs), 2, 2),
        _ => unreachable!(),
    }
    p
}

#[test]
fn damaged_images_get_the_same_verdict() {
    let d = scratch();
    let src = pattern_raw(d.path());
    for tool in ["qemu", "imgconv"] {
        for (kind, code, leaks, corruptions) in [
            ("leak", 3, 1, 0),
            ("low", 2, 0, 2),
            ("eof", 2, 1, 2),
            ("high", 2, 1, 1),
        ] {
            let p = damaged(d.path(), &src, tool, kind);
            let j = agree(&p);
            assert_eq!(
                j["leaks"].as_u64().unwrap_or(0),
                leaks,
                "{tool} {kind}: {j}"
            );
            assert_eq!(
                j["corruptions"].as_u64().unwrap_or(0),
                corruptions,
                "{tool} {kind}: {j}"
            );
            let o = imgconv_out(&["check", s(&p)]);
            assert_eq!(o.status.code(), Some(code), "{tool} {kind}");
        }
    }
}

#[test]
fn formats_without_checks_and_repair_requests() {
    let d = scratch();
    let raw = d.path().join("r.raw");
    make_raw(&raw, 1 << 20, &[]);
    let q = run("qemu-img", &["check", "-f", "raw", s(&raw)]);
    let i = imgconv_out(&["check", "-f", "raw", s(&raw)]);
    assert_eq!(q.status.code(), Some(63));
    assert_eq!(i.status.code(), Some(63));
    assert!(
        String::from_utf8_lossy(&i.stderr).contains("This image format does not support checks")
    );
    let src = pattern_raw(d.path());
    // `-r all` repairs leaks as qemu-img does…
    let p = damaged(d.path(), &src, "imgconv", "leak");
    let o = imgconv_out(&["check", "-r", "all", s(&p)]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert_eq!(run("qemu-img", &["check", s(&p)]).status.code(), Some(0));
    // …and refuses corruptions, which imgconv does not repair, changing nothing.
    let p = damaged(d.path(), &src, "imgconv", "low");
    let before = std::fs::read(&p).unwrap();
    let o = imgconv_out(&["check", "-r", "all", s(&p)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("repair"));
    assert!(std::fs::read(&p).unwrap() == before);
    let o = imgconv_out(&["check", "-r", "bogus", s(&p)]);
    assert_eq!(o.status.code(), Some(1));
    // Not a qcow2 at all with -f qcow2: could not check.
    let o = imgconv_out(&["check", "-f", "qcow2", s(&raw)]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn agrees_with_qemu_on_corpus_images() {
    let Some(corpus) = corpus_dir() else { return };
    let d = scratch();
    let dh = "dissect-hypervisor/qcow2";
    for (rel, name) in [
        (format!("{dh}/basic.qcow2.gz"), "basic.qcow2"),
        (format!("{dh}/basic-zstd.qcow2.gz"), "basic-zstd.qcow2"),
        (
            format!("{dh}/backing-chain-3.qcow2.gz"),
            "backing-chain-3.qcow2",
        ),
        (
            format!("{dh}/backing-chain-2.qcow2.gz"),
            "backing-chain-2.qcow2",
        ),
        (format!("{dh}/snapshot.qcow2.gz"), "snapshot.qcow2"),
        ("dfvfs/vsstest.qcow2.xz".to_string(), "vsstest.qcow2"),
        ("dfvfs/image.qcow2.xz".to_string(), "image.qcow2"),
        (
            "vagrant-mutate/kvm-box-disk1.qcow2.xz".to_string(),
            "kvm-box-disk1.qcow2",
        ),
        (
            "cdi-malicious/invalid-qcow-large-json.img.xz".to_string(),
            "invalid-qcow-large-json.img",
        ),
    ] {
        let p = corpus_file(&corpus, &rel, d.path(), name);
        agree(&p);
    }
}

#[test]
fn repairs_leaks_like_qemu() {
    let d = scratch();
    let src = pattern_raw(d.path());
    for tool in ["qemu", "imgconv"] {
        for kind in ["leak", "high", "eof", "low"] {
            let p = damaged(d.path(), &src, tool, kind);
            for out in ["human", "json"] {
                let a = d.path().join("a.qcow2");
                let b = d.path().join("b.qcow2");
                std::fs::copy(&p, &a).unwrap();
                std::fs::copy(&p, &b).unwrap();
                let o = format!("--output={out}");
                let q = run("qemu-img", &["check", "-r", "leaks", &o, s(&a)]);
                let i = imgconv_out(&["check", "-r", "leaks", &o, s(&b)]);
                assert_eq!(q.status.code(), i.status.code(), "{tool} {kind} {out}");
                let qs = String::from_utf8_lossy(&q.stdout).replace("a.qcow2", "X");
                let is = String::from_utf8_lossy(&i.stdout).replace("b.qcow2", "X");
                assert_eq!(qs, is, "{tool} {kind} {out}");
                assert_eq!(
                    strip(&q.stderr, "qemu-img: "),
                    strip(&i.stderr, "imgconv: ")
                );
                // Afterwards both images check the same.
                let qa = run("qemu-img", &["check", "--output=json", s(&a)]);
                let qb = run("qemu-img", &["check", "--output=json", s(&b)]);
                assert_eq!(qa.status.code(), qb.status.code(), "{tool} {kind}");
            }
        }
    }
}
