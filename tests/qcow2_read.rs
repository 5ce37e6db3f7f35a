//! qcow2 reading: images made by qemu-img / qemu-io in every supported variant, and
//! corpus images made by other tools, converted to raw by imgconv and judged by
//! `qemu-img compare`; `info` and `map` compared with qemu-img's; malformed headers.

mod common;
use common::*;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use imgconv::format::qcow2::header::{CompressedDescriptor, Header, L1Entry, L2Entry};
use imgconv::{BlockDevice, Error, ExtentKind, OpenOptions};
use serde_json::Value;

/// `qemu-img create -f qcow2 [-o OPTS] PATH SIZE`.
fn create(dir: &Path, name: &str, opts: &str, size: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_create("qcow2", opts, &p, size);
    p
}

/// Runs qemu-io commands on an image.
fn io(img: &Path, cmds: &[&str]) {
    let mut args = Vec::new();
    for c in cmds {
        args.extend(["-c", *c]);
    }
    args.push(s(img));
    qemu_io(&args);
}

/// Converts to raw with imgconv, checks qemu-img finds it identical, and checks `info`.
fn check(img: &Path, dir: &Path) {
    check_to_raw(img, dir);
    assert_info_agrees(img);
}

/// The fields `imgconv info --output=json` must share with qemu-img's.
const INFO_FIELDS: [&str; 9] = [
    "virtual-size",
    "format",
    "cluster-size",
    "backing-filename",
    "backing-filename-format",
    "full-backing-filename",
    "dirty-flag",
    "snapshots",
    "format-specific",
];

fn our_info(img: &Path) -> Value {
    serde_json::from_str(&imgconv(&["info", "--output=json", s(img)])).unwrap()
}

fn assert_info_agrees(img: &Path) {
    let q = qemu_info(img);
    let o = our_info(img);
    for k in INFO_FIELDS {
        assert_eq!(o.get(k), q.get(k), "info field {k} of {}", img.display());
    }
}

/// Pseudo-random, incompressible bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len).map(|_| xorshift64(&mut x) as u8).collect()
}

/// A raw source with compressible patterns, zero gaps and one incompressible stretch.
fn pattern_raw(dir: &Path, size: u64) -> PathBuf {
    use std::os::unix::fs::FileExt;
    let p = dir.join("pattern.raw");
    make_raw(&p, size, &[(0, 300_000, 0x21), (size / 2, 70_000, 0x42)]);
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&noise(200_000, 7), size / 4).unwrap();
    f.write_all_at(b"tail", size - 4).unwrap();
    p
}

#[test]
fn v2_and_v3_images_read_like_qemu() {
    let d = scratch();
    for (name, opts) in [("v2.qcow2", "compat=0.10"), ("v3.qcow2", "compat=1.1")] {
        let img = create(d.path(), name, opts, "8M");
        io(
            &img,
            &[
                "write -P 0xab 0 1M",
                "write -P 0xcd 3M 100k",
                "write -P 0x11 8388096 512",
            ],
        );
        check(&img, d.path());
    }
}

#[test]
fn every_cluster_size_reads_like_qemu() {
    let d = scratch();
    for cs in ["512", "4k", "64k", "2M"] {
        let img = create(
            d.path(),
            &format!("c{cs}.qcow2"),
            &format!("cluster_size={cs}"),
            "9M",
        );
        io(
            &img,
            &[
                "write -P 0x01 0 5000",
                "write -P 0x02 1M 1M",
                "write -P 0x03 6000k 7k",
                "write -P 0x04 9436160 1024",
            ],
        );
        check(&img, d.path());
    }
}

#[test]
fn zlib_compressed_clusters() {
    let d = scratch();
    let raw = pattern_raw(d.path(), 4 << 20);
    for cs in ["512", "4k", "64k", "2M"] {
        let img = d.path().join(format!("z{cs}.qcow2"));
        qemu_compress_to_qcow2(&format!("cluster_size={cs}"), &raw, &img);
        check(&img, d.path());
        assert_same(&raw, &img);
    }
}

#[test]
fn zstd_compressed_clusters() {
    let d = scratch();
    let raw = pattern_raw(d.path(), 4 << 20);
    for cs in ["4k", "64k", "2M"] {
        let img = d.path().join(format!("zs{cs}.qcow2"));
        qemu_compress_to_qcow2(
            &format!("compression_type=zstd,cluster_size={cs}"),
            &raw,
            &img,
        );
        check(&img, d.path());
    }
}

#[test]
fn extended_l2_subclusters_over_a_backing_file() {
    let d = scratch();
    let base = create(d.path(), "base.qcow2", "", "2M");
    io(&base, &["write -P 0x33 0 2M"]);
    for cs in ["16k", "64k", "2M"] {
        let img = d.path().join(format!("ext{cs}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "-o",
            &format!("extended_l2=on,cluster_size={cs}"),
            s(&img),
            "4M",
        ]);
        io(
            &img,
            &[
                "write -P 0x44 2k 4k",
                "write -z 10k 2k",
                "write -P 0x55 130k 1k",
                "write -z 1M 64k",
                "write -P 0x66 3M 8k",
            ],
        );
        check(&img, d.path());
        // Map agrees with the layers: subcluster granularity, backing at depth 1.
        let image = imgconv::open(&img, &OpenOptions::default()).unwrap();
        let dev = image.device();
        let sc = imgconv::format::qcow2::header::SUBCLUSTERS as u64;
        let sub = match cs {
            "16k" => 16384 / sc,
            "64k" => 65536 / sc,
            _ => (2 << 20) / sc,
        };
        let e = dev.map(600 << 10, 1 << 10).unwrap();
        assert_eq!((e.kind, e.depth), (ExtentKind::Data, 1), "{cs}: {e:?}");
        let e = dev.map(1 << 20, 1 << 20).unwrap();
        assert_eq!(
            (e.kind, e.depth, e.len),
            (ExtentKind::Zero, 0, 64 << 10),
            "{cs}: {e:?}"
        );
        let e = dev.map(3 << 20, 1 << 20).unwrap();
        assert_eq!((e.kind, e.depth), (ExtentKind::Data, 0), "{cs}: {e:?}");
        assert_eq!(e.len % sub, 0);
    }
}

#[test]
fn extended_l2_with_compressed_clusters() {
    let d = scratch();
    let img = create(
        d.path(),
        "extc.qcow2",
        "extended_l2=on,cluster_size=64k",
        "2M",
    );
    io(
        &img,
        &[
            "write -c -P 0x71 0 64k",
            "write -c -P 0x72 128k 64k",
            "write -P 0x73 200k 4k",
            "write -z 256k 8k",
        ],
    );
    check(&img, d.path());
    let raw = pattern_raw(d.path(), 2 << 20);
    let img2 = d.path().join("extc2.qcow2");
    qemu_compress_to_qcow2("extended_l2=on", &raw, &img2);
    check(&img2, d.path());
}

#[test]
fn refcount_widths_and_preallocation() {
    let d = scratch();
    for opts in [
        "refcount_bits=1",
        "refcount_bits=64",
        "refcount_bits=8,cluster_size=4k",
        "preallocation=metadata",
        "preallocation=metadata,compat=0.10",
    ] {
        let name = format!("{}.qcow2", opts.replace([',', '='], "_"));
        let img = create(d.path(), &name, opts, "3M");
        io(&img, &["write -P 0x5a 100k 300k", "write -P 0x5b 2M 4k"]);
        check(&img, d.path());
    }
}

#[test]
fn lazy_refcounts_with_the_dirty_bit_set() {
    let d = scratch();
    let img = create(d.path(), "lazy.qcow2", "lazy_refcounts=on", "4M");
    // `abort` leaves the image open: the dirty bit stays set.
    let o = run(
        "qemu-io",
        &[
            "-c",
            "write -P 0x77 0 1M",
            "-c",
            "write -P 0x78 2M 64k",
            "-c",
            "abort",
            s(&img),
        ],
    );
    assert!(!o.status.success());
    let info = our_info(&img);
    assert_eq!(info["dirty-flag"], Value::Bool(true));
    assert_eq!(
        info["format-specific"]["data"]["lazy-refcounts"],
        Value::Bool(true)
    );
    check(&img, d.path());
}

#[test]
fn zero_clusters_hide_the_backing_file() {
    let d = scratch();
    let base = create(d.path(), "zbase.qcow2", "", "4M");
    io(&base, &["write -P 0x99 0 4M"]);
    let img = d.path().join("zover.qcow2");
    qemu_img(&overlay_args("qcow2", &["-q"], "zbase.qcow2", &img, ""));
    io(
        &img,
        &["write -z 0 128k", "write -P 0x12 1M 64k", "write -z 2M 1M"],
    );
    check(&img, d.path());
    let image = imgconv::open(&img, &OpenOptions::default()).unwrap();
    let dev = image.device();
    let e = dev.map(0, 4 << 20).unwrap();
    assert_eq!(
        (e.offset, e.len, e.kind, e.depth),
        (0, 128 << 10, ExtentKind::Zero, 0)
    );
    let mut b = vec![1u8; 4096];
    dev.read_at(&mut b, 2 << 20).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    // Zero clusters without a backing file, and preallocated zero clusters.
    let z = create(d.path(), "z.qcow2", "preallocation=metadata", "2M");
    io(&z, &["write -P 0x31 0 2M", "write -z 64k 512k"]);
    check(&z, d.path());
}

#[test]
fn internal_snapshots_are_listed() {
    let d = scratch();
    for opts in ["", "compat=0.10"] {
        let img = create(d.path(), &format!("snap{}.qcow2", opts.len()), opts, "2M");
        io(&img, &["write -P 0x41 0 1M"]);
        qemu_img(&["snapshot", "-c", "first", s(&img)]);
        io(&img, &["write -P 0x42 0 512k"]);
        qemu_img(&["snapshot", "-c", "second one", s(&img)]);
        io(&img, &["write -P 0x43 1M 64k"]);
        check(&img, d.path());
        let info = our_info(&img);
        let snaps = info["snapshots"].as_array().unwrap();
        assert_eq!(snaps.len(), 2);
        assert_eq!(snaps[1]["name"], "second one");
        let human = imgconv(&["info", s(&img)]);
        assert!(human.contains("second one"), "{human}");
    }
}

#[test]
fn three_deep_chain_with_relative_names_from_another_cwd() {
    let d = scratch();
    let sub = d.path().join("images");
    std::fs::create_dir(&sub).unwrap();
    let base = create(&sub, "base.qcow2", "cluster_size=4k", "6M");
    io(&base, &["write -P 0x01 0 6M"]);
    let mid = sub.join("mid.qcow2");
    qemu_img(&overlay_args("qcow2", &["-q"], "base.qcow2", &mid, ""));
    io(&mid, &["write -P 0x02 1M 2M", "write -z 5M 64k"]);
    let top = sub.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "-o",
        "cluster_size=2M",
        s(&top),
    ]);
    io(&top, &["write -P 0x03 2M 100k"]);
    // From the scratch folder (not the images' folder), by a relative path.
    let out = d.path().join("chain.raw");
    let o = Command::new(imgconv_bin())
        .current_dir(d.path())
        .args(["convert", "-O", "raw", "images/top.qcow2", s(&out)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_same(&top, &out);
    assert_info_agrees(&top);
    // The map falls through the chain with depths.
    let image = imgconv::open(&top, &OpenOptions::default()).unwrap();
    let dev = image.device();
    assert_eq!(dev.map(0, 4096).unwrap().depth, 2);
    assert_eq!(dev.map(1 << 20, 4096).unwrap().depth, 1);
    assert_eq!(dev.map(2 << 20, 4096).unwrap().depth, 0);
    let z = dev.map(5 << 20, 4096).unwrap();
    assert_eq!((z.kind, z.depth), (ExtentKind::Zero, 1));
    let chain = imgconv(&["info", "--backing-chain", s(&top)]);
    assert!(
        chain.contains("base.qcow2") && chain.contains("mid.qcow2"),
        "{chain}"
    );
}

#[test]
fn raw_backing_file_and_shorter_backing_file() {
    let d = scratch();
    let raw = d.path().join("base.raw");
    make_raw(&raw, 1 << 20, &[(0, 1 << 20, 0x61)]);
    let img = d.path().join("over-raw.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&img),
        "3M",
    ]);
    io(&img, &["write -P 0x62 512k 64k", "write -P 0x63 2M 4k"]);
    check(&img, d.path());
    // Bytes past the backing file's end read as zeros.
    let image = imgconv::open(&img, &OpenOptions::default()).unwrap();
    let mut b = vec![9u8; 8192];
    image.device().read_at(&mut b, (1 << 20) - 4096).unwrap();
    let want = std::fs::read(&raw).unwrap();
    assert_eq!(&b[..4096], &want[(1 << 20) - 4096..]);
    assert!(b[4096..].iter().all(|&x| x == 0));
    // A qcow2 backing file shorter than its overlay, with a probed backing format.
    let short = create(d.path(), "short.qcow2", "", "1M");
    io(&short, &["write -P 0x64 0 1M"]);
    let img2 = d.path().join("over-short.qcow2");
    qemu_img(&overlay_args("qcow2", &["-q"], "short.qcow2", &img2, "5M"));
    io(&img2, &["write -P 0x65 4M 4k"]);
    check(&img2, d.path());
}

#[test]
fn external_data_file() {
    let d = scratch();
    for raw_flag in ["on", "off"] {
        let name = format!("ext-{raw_flag}.qcow2");
        let data = format!("ext-{raw_flag}.data");
        let o = Command::new("qemu-img")
            .current_dir(d.path())
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("data_file={data},data_file_raw={raw_flag}"),
                &name,
                "3M",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let o = Command::new("qemu-io")
            .current_dir(d.path())
            .args([
                "-c",
                "write -P 0x7a 0 1M",
                "-c",
                "write -P 0x7b 2M 4k",
                &name,
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let img = d.path().join(&name);
        // qemu resolves the data file against its cwd: judge from the image's folder.
        let out = d.path().join(format!("{name}.raw"));
        imgconv(&["convert", "-O", "raw", s(&img), s(&out)]);
        let o = Command::new("qemu-img")
            .current_dir(d.path())
            .args(["compare", &name, s(&out)])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
        let q: Value = serde_json::from_slice(
            &Command::new("qemu-img")
                .current_dir(d.path())
                .args(["info", "--output=json", &name])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        let ours = our_info(&img);
        assert_eq!(ours["format-specific"], q["format-specific"]);
        let refs = ours["references"].as_array().unwrap();
        assert_eq!(refs[0]["field"], "external data file");
        assert_eq!(refs[0]["name"], Value::String(data.clone()));
        // Untrusted: the data file is refused, or only recorded in metadata-only mode.
        match imgconv::open(&img, &OpenOptions::untrusted()) {
            Err(Error::UntrustedReference { field, .. }) => assert_eq!(field, "external data file"),
            other => panic!(
                "expected an untrusted-reference error, got {}",
                brief(&other)
            ),
        }
        let meta = imgconv::open(&img, &OpenOptions::untrusted().metadata_only()).unwrap();
        assert_eq!(meta.info().references[0].name, data);
        let mut b = [0u8; 512];
        assert!(meta.device().read_at(&mut b, 0).is_err());
    }
}

#[test]
fn untrusted_mode_reports_but_refuses_references() {
    let d = scratch();
    let base = create(d.path(), "b.qcow2", "", "1M");
    let top = d.path().join("t.qcow2");
    qemu_img(&overlay_args("qcow2", &["-q"], "b.qcow2", &top, ""));
    let _ = base;
    match imgconv::open(&top, &OpenOptions::untrusted()) {
        Err(Error::UntrustedReference {
            field, reference, ..
        }) => {
            assert_eq!((field, reference.as_str()), ("backing file", "b.qcow2"));
        }
        other => panic!(
            "expected an untrusted-reference error, got {}",
            brief(&other)
        ),
    }
    let img = imgconv::open(&top, &OpenOptions::untrusted().metadata_only()).unwrap();
    let refs = &img.info().references;
    assert_eq!(refs.len(), 1);
    assert_eq!(refs[0].name, "b.qcow2");
    assert_eq!(img.info().backing_filename.as_deref(), Some("b.qcow2"));
    let info = imgconv(&["info", "--untrusted", "--output=json", s(&top)]);
    assert!(info.contains("\"backing file\""), "{info}");
    let o = imgconv_out(&[
        "convert",
        "--untrusted",
        "-O",
        "raw",
        s(&top),
        s(&d.path().join("x.raw")),
    ]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn a_1tib_empty_image_converts_instantly_and_sparse() {
    let d = scratch();
    let img = create(d.path(), "huge.qcow2", "", "1T");
    io(&img, &["write -P 0x3c 512G 64k"]);
    let out = d.path().join("huge.raw");
    let t = Instant::now();
    imgconv(&["convert", "-O", "raw", s(&img), s(&out)]);
    let took = t.elapsed();
    assert!(took.as_secs_f64() < 1.0, "took {took:?}");
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(&out).unwrap();
    assert_eq!(m.len(), 1 << 40);
    assert!(
        m.blocks() * 512 <= 256 << 10,
        "{} bytes allocated",
        m.blocks() * 512
    );
    let image = imgconv::open(&img, &OpenOptions::default()).unwrap();
    let t = Instant::now();
    let e = image.device().map(0, 1 << 40).unwrap();
    assert!(t.elapsed().as_millis() < 50);
    assert_eq!((e.len, e.kind), (512 << 30, ExtentKind::Unallocated));
    let mut b = vec![0u8; 65536];
    image.device().read_at(&mut b, 512 << 30).unwrap();
    assert!(b.iter().all(|&x| x == 0x3c));
}

/// `(start, length, data, zero)` runs, adjacent equal ones merged.
fn map_runs(v: &Value) -> Vec<(u64, u64, bool, bool)> {
    let mut out: Vec<(u64, u64, bool, bool)> = Vec::new();
    for e in v.as_array().unwrap() {
        let r = (
            e["start"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["data"].as_bool().unwrap(),
            e["zero"].as_bool().unwrap(),
        );
        match out.last_mut() {
            Some(l) if l.0 + l.1 == r.0 && (l.2, l.3) == (r.2, r.3) => l.1 += r.1,
            _ => out.push(r),
        }
    }
    out
}

#[test]
fn map_agrees_with_qemu() {
    let d = scratch();
    let img = create(d.path(), "m.qcow2", "", "16M");
    io(
        &img,
        &[
            "write -P 0x01 0 256k",
            "write -z 1M 128k",
            "write -P 0x02 4M 64k",
            "write -c -P 0x03 8M 64k",
            "write -P 0x04 16711680 64k",
        ],
    );
    let q: Value = serde_json::from_str(&qemu_img(&["map", "--output=json", s(&img)])).unwrap();
    let o: Value = serde_json::from_str(&imgconv(&["map", "--output=json", s(&img)])).unwrap();
    assert_eq!(map_runs(&o), map_runs(&q));
    // Host offsets of plain data agree too.
    let offs = |v: &Value| -> Vec<Option<u64>> {
        v.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"] == Value::Bool(true))
            .map(|e| e["offset"].as_u64())
            .collect()
    };
    assert_eq!(offs(&o), offs(&q));
}

#[test]
fn reads_are_thread_safe() {
    let d = scratch();
    let raw = pattern_raw(d.path(), 4 << 20);
    let img = d.path().join("t.qcow2");
    qemu_compress_to_qcow2("cluster_size=4k", &raw, &img);
    let image = imgconv::open(&img, &OpenOptions::default()).unwrap();
    let want = std::fs::read(&raw).unwrap();
    std::thread::scope(|sc| {
        for t in 0..4u64 {
            let dev = image.device().clone();
            let want = &want;
            sc.spawn(move || {
                let mut off = t * 1234;
                while off < (4 << 20) - 10_000 {
                    let mut b = vec![0u8; 10_000];
                    dev.read_at(&mut b, off).unwrap();
                    assert_eq!(&b[..], &want[off as usize..off as usize + 10_000]);
                    off += 77_777;
                }
            });
        }
    });
}

// ---- corpus ----

/// Decompresses a corpus file, leaving runs of zeros as holes.
fn sparse_corpus_file(corpus: &Path, rel: &str, dir: &Path, name: &str) -> PathBuf {
    use std::os::unix::fs::FileExt;
    let src = corpus.join(rel);
    assert!(src.exists(), "corpus file {} missing", src.display());
    let mut child = Command::new("gzip")
        .args(["-dc", s(&src)])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = dir.join(name);
    let f = std::fs::File::create(&out).unwrap();
    let mut r = child.stdout.take().unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let mut pos = 0u64;
    loop {
        let mut n = 0;
        while n < buf.len() {
            let k = r.read(&mut buf[n..]).unwrap();
            if k == 0 {
                break;
            }
            n += k;
        }
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            f.write_all_at(&buf[..n], pos).unwrap();
        }
        pos += n as u64;
    }
    f.set_len(pos).unwrap();
    assert!(child.wait().unwrap().success());
    out
}

#[test]
fn corpus_qcow2_images_read_like_qemu() {
    let Some(c) = corpus_dir() else { return };
    let d = scratch();
    for (rel, name) in [
        ("dfvfs/vsstest.qcow2.xz", "vsstest.qcow2"),
        ("dfvfs/image.qcow2.xz", "image.qcow2"),
        ("freebsd-mkimg/img-1x1-512-mbr.qcow2.xz", "mkimg.qcow2"),
        (
            "vagrant-mutate/kvm-box-disk1.qcow2.xz",
            "kvm-box-disk1.qcow2",
        ),
        ("dissect-hypervisor/qcow2/basic.qcow2.gz", "basic.qcow2"),
        (
            "dissect-hypervisor/qcow2/basic-zstd.qcow2.gz",
            "basic-zstd.qcow2",
        ),
        (
            "dissect-hypervisor/qcow2/snapshot.qcow2.gz",
            "snapshot.qcow2",
        ),
    ] {
        let img = corpus_file(&c, rel, d.path(), name);
        check(&img, d.path());
        let out = d.path().join(format!("{name}.out.raw"));
        let _ = std::fs::remove_file(out);
    }
}

#[test]
fn corpus_backing_chain_and_data_file() {
    let Some(c) = corpus_dir() else { return };
    let d = scratch();
    for n in 1..=3 {
        let name = format!("backing-chain-{n}.qcow2");
        corpus_file(
            &c,
            &format!("dissect-hypervisor/qcow2/{name}.gz"),
            d.path(),
            &name,
        );
    }
    let top = d.path().join("backing-chain-1.qcow2");
    check(&top, d.path());
    let img = imgconv::open(&top, &OpenOptions::default()).unwrap();
    let mut b = [0u8; 14];
    // dissect's test: chain-3 writes "Something here" at MiB 0, seen through the chain.
    img.device().read_at(&mut b, 0).unwrap();
    let base = imgconv::open(
        d.path().join("backing-chain-3.qcow2"),
        &OpenOptions::default(),
    )
    .unwrap();
    let mut bb = [0u8; 14];
    base.device().read_at(&mut bb, 0).unwrap();
    assert_eq!(&bb, b"Something here");

    let img = corpus_file(
        &c,
        "dissect-hypervisor/qcow2/data-file.qcow2.gz",
        d.path(),
        "data-file.qcow2",
    );
    sparse_corpus_file(
        &c,
        "dissect-hypervisor/qcow2/data-file.bin.gz",
        d.path(),
        "data-file.bin",
    );
    let out = d.path().join("data-file.raw");
    imgconv(&["convert", "-O", "raw", s(&img), s(&out)]);
    let o = Command::new("qemu-img")
        .current_dir(d.path())
        .args(["compare", "data-file.qcow2", s(&out)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let info = our_info(&img);
    assert_eq!(
        info["format-specific"]["data"]["data-file"],
        "data-file.bin"
    );
    assert_eq!(info["format-specific"]["data"]["data-file-raw"], false);
}

#[test]
fn corpus_65536_snapshots_listed_like_qemu() {
    // The snapshot table starts at offset 0 and runs far past the end of the file: QEMU
    // reads the missing bytes as zeros and lists 65536 (mostly empty) snapshots; `check`
    // reports each entry as incomplete. imgconv does the same, quickly.
    let Some(c) = corpus_dir() else { return };
    let d = scratch();
    let img = corpus_file(
        &c,
        "cdi-malicious/invalid-qcow-large-json.img.xz",
        d.path(),
        "json.img",
    );
    let t = Instant::now();
    let r = imgconv::open(&img, &OpenOptions::default()).unwrap();
    assert!(t.elapsed().as_secs_f64() < 2.0);
    assert_eq!(r.info().snapshots.len(), 65536);
    let ours = our_info(&img);
    let theirs = qemu_info(&img);
    assert_eq!(ours["snapshots"], theirs["snapshots"]);
    let o = imgconv_out(&["check", s(&img)]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("ERROR snapshot table entry 65535 is incomplete"));
}

/// `qemu-img create`, write, snapshot s1, write, snapshot s2: the snapshot table is the
/// last thing in the file and its last entry is not padded.
fn two_snapshots(dir: &Path) -> PathBuf {
    let img = create(dir, "two.qcow2", "", "20M");
    io(&img, &["write -P 0x11 0 1M"]);
    qemu_img(&["snapshot", "-c", "s1", s(&img)]);
    io(&img, &["write -P 0x22 1M 1M"]);
    qemu_img(&["snapshot", "-c", "s2", s(&img)]);
    img
}

#[test]
fn snapshot_table_at_the_end_of_the_file() {
    let d = scratch();
    let img = two_snapshots(d.path());
    let info = our_info(&img);
    let snaps = info["snapshots"].as_array().unwrap();
    let names: Vec<&str> = snaps.iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["s1", "s2"]);
    assert_info_agrees(&img);
    // The active layer has both writes.
    check_to_raw(&img, d.path());
    let out = d.path().join("active.raw");
    imgconv(&["convert", "-O", "raw", s(&img), s(&out)]);
    let b = std::fs::read(&out).unwrap();
    assert!(b[..1 << 20].iter().all(|&x| x == 0x11));
    assert!(b[1 << 20..2 << 20].iter().all(|&x| x == 0x22));
    // A healthy image checks clean.
    let o = imgconv_out(&["check", s(&img)]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn convert_l_converts_a_snapshot_like_qemu() {
    let d = scratch();
    let img = two_snapshots(d.path());
    for (sel, qsel) in [
        ("1", "snapshot.id=1"),
        ("s1", "snapshot.name=s1"),
        ("snapshot.id=2", "snapshot.id=2"),
        ("snapshot.name=s2", "snapshot.name=s2"),
        (
            "snapshot.id=1,snapshot.name=s1",
            "snapshot.id=1,snapshot.name=s1",
        ),
    ] {
        let ours = d.path().join("ours.raw");
        let theirs = d.path().join("theirs.raw");
        let _ = std::fs::remove_file(&ours);
        imgconv(&["convert", "-l", sel, "-O", "raw", s(&img), s(&ours)]);
        qemu_img(&["convert", "-l", qsel, "-O", "raw", s(&img), s(&theirs)]);
        assert_eq!(
            std::fs::read(&ours).unwrap(),
            std::fs::read(&theirs).unwrap(),
            "{sel}"
        );
    }
    // Snapshot 1 has only the first write.
    let out = d.path().join("s1.qcow2");
    imgconv(&["convert", "-s", "s1", "-O", "qcow2", s(&img), s(&out)]);
    let raw = d.path().join("s1.raw");
    qemu_img(&["convert", "-O", "raw", s(&out), s(&raw)]);
    let b = std::fs::read(&raw).unwrap();
    assert!(b[..1 << 20].iter().all(|&x| x == 0x11));
    assert!(b[1 << 20..].iter().all(|&x| x == 0));
    // Unknown snapshots, mismatched selectors and formats without snapshots fail.
    for sel in ["nope", "snapshot.id=1,snapshot.name=s2", "snapshot.bogus=1"] {
        let o = imgconv_out(&["convert", "-l", sel, s(&img), s(&raw)]);
        assert_eq!(o.status.code(), Some(1), "{sel}");
    }
    let plain = d.path().join("plain.raw");
    make_raw(&plain, 1 << 20, &[(0, 4096, 7)]);
    let o = imgconv_out(&["convert", "-l", "1", "-f", "raw", s(&plain), s(&raw)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("internal snapshots"));
    let r = imgconv::open(&plain, &OpenOptions::default().snapshot("1"));
    assert!(matches!(r, Err(Error::Unsupported { .. })), "{:?}", r.err());
}

// ---- malformed images ----

/// A small valid image's bytes (64 KiB clusters, 1 MiB, one data cluster).
fn template(dir: &Path) -> Vec<u8> {
    let img = create(dir, "template.qcow2", "", "1M");
    io(&img, &["write -P 0x5e 0 64k"]);
    std::fs::read(&img).unwrap()
}

/// An open result in one short line (an image's info can be huge).
fn brief(r: &imgconv::Result<imgconv::Image>) -> String {
    match r {
        Ok(i) => format!("an image of {} bytes", i.size()),
        Err(e) => format!("{e:?}"),
    }
}

fn put(b: &mut [u8], off: usize, v: &[u8]) {
    b[off..off + v.len()].copy_from_slice(v);
}

/// Writes `bytes` as an image and opens it, checking the CLI fails cleanly too.
fn open_bytes(dir: &Path, name: &str, bytes: &[u8]) -> imgconv::Result<imgconv::Image> {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    let r = imgconv::open(&p, &OpenOptions::default().format(imgconv::Format::Qcow2));
    if r.is_err() {
        let o = imgconv_out(&["info", "-f", "qcow2", s(&p)]);
        assert_eq!(o.status.code(), Some(1), "{name}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !err.contains("panicked") && err.contains("qcow2"),
            "{name}: {err}"
        );
    }
    r
}

#[test]
fn malformed_headers_give_typed_errors() {
    let d = scratch();
    let t = template(d.path());
    let dp = d.path();
    let corrupt = |r: imgconv::Result<imgconv::Image>, what: &str| match r {
        Err(Error::Corrupt {
            format: "qcow2", ..
        }) => {}
        other => panic!(
            "{what}: expected a qcow2 corruption error, got {}",
            brief(&other)
        ),
    };
    let unsupported = |r: imgconv::Result<imgconv::Image>, what: &str, needle: &str| match r {
        Err(Error::Unsupported {
            format: "qcow2",
            feature,
        }) => {
            assert!(feature.contains(needle), "{what}: {feature}")
        }
        other => panic!("{what}: expected unsupported, got {}", brief(&other)),
    };
    let too_large = |r: imgconv::Result<imgconv::Image>, what: &str| match r {
        Err(Error::TooLarge {
            format: "qcow2", ..
        }) => {}
        other => panic!("{what}: expected too-large, got {}", brief(&other)),
    };

    corrupt(open_bytes(dp, "trunc50", &t[..50]), "truncated header");
    corrupt(open_bytes(dp, "trunc100", &t[..100]), "truncated v3 header");
    corrupt(open_bytes(dp, "trunc512", &t[..512]), "tables cut off");

    // (file name, what is wrong, header edits) for each kind of refusal.
    type Edits<'a> = &'a [(usize, &'a [u8])];
    type Case<'a> = (&'a str, &'a str, Edits<'a>);
    let corrupt_cases: &[Case] = &[
        ("magic", "bad magic", &[(0, b"QFI\xfa")]),
        ("cb30", "cluster_bits 30", &[(20, &30u32.to_be_bytes())]),
        ("l1small", "l1_size too small", &[(36, &0u32.to_be_bytes())]),
        (
            "l1eof",
            "L1 offset past EOF",
            &[(40, &(1u64 << 40).to_be_bytes())],
        ),
        (
            "l1align",
            "L1 offset unaligned",
            &[(40, &0x30200u64.to_be_bytes())],
        ),
        (
            "rteof",
            "refcount table past EOF",
            &[(48, &(1u64 << 40).to_be_bytes())],
        ),
        (
            "snaptable",
            "snapshot table past EOF",
            &[
                (60, &60000u32.to_be_bytes()),
                (64, &0x10000u64.to_be_bytes()),
            ],
        ),
        ("hlen", "header_length 100", &[(100, &100u32.to_be_bytes())]),
        // A header extension whose length runs past the first cluster.
        (
            "extlen",
            "extension length",
            &[(116, &0x20000u32.to_be_bytes())],
        ),
        // Backing file name outside the first cluster.
        (
            "bfname",
            "backing name offset",
            &[(8, &0xfff0u64.to_be_bytes()), (16, &100u32.to_be_bytes())],
        ),
        // External data file bit without a data file name.
        (
            "nodatafile",
            "data file bit without name",
            &[(72, &4u64.to_be_bytes())],
        ),
    ];
    for &(name, what, edits) in corrupt_cases {
        corrupt(open_bytes(dp, name, &patched(&t, edits)), what);
    }
    let too_large_cases: &[Case] = &[
        (
            "l1huge",
            "l1_size huge",
            &[(36, &0x1000_0000u32.to_be_bytes())],
        ),
        (
            "size63",
            "virtual size 2^63",
            &[(24, &(1u64 << 63).to_be_bytes())],
        ),
        ("snaps", "70000 snapshots", &[(60, &70000u32.to_be_bytes())]),
    ];
    for &(name, what, edits) in too_large_cases {
        too_large(open_bytes(dp, name, &patched(&t, edits)), what);
    }
    // (file name, what is wrong, word the error must name, header edits).
    let unsupported_cases: &[(&str, &str, &str, Edits)] = &[
        ("v4", "version 4", "version 4", &[(4, &4u32.to_be_bytes())]),
        (
            "incompat5",
            "unknown incompatible bit",
            "bit 5",
            &[(72, &(1u64 << 5).to_be_bytes())],
        ),
        ("luks", "LUKS", "LUKS", &[(32, &2u32.to_be_bytes())]),
        ("aes", "AES", "AES", &[(32, &1u32.to_be_bytes())]),
        (
            "ct7",
            "compression type 7",
            "compression type 7",
            &[(72, &8u64.to_be_bytes()), (104, &[7])],
        ),
    ];
    for &(name, what, needle, edits) in unsupported_cases {
        unsupported(open_bytes(dp, name, &patched(&t, edits)), what, needle);
    }
}

#[test]
fn malformed_tables_fail_on_read_not_panic() {
    let d = scratch();
    let t = template(d.path());
    let h = Header::parse(&t).unwrap();
    let l1_off = h.l1_table_offset as usize;
    let l1 = L1Entry(u64::from_be_bytes(
        t[l1_off..l1_off + 8].try_into().unwrap(),
    ));
    let l2_off = l1.l2_offset().unwrap() as usize;
    let read_err = |name: &str, bytes: &[u8]| {
        let img = open_bytes(d.path(), name, bytes).unwrap();
        let mut b = vec![0u8; 65536];
        match img.device().read_at(&mut b, 0) {
            Err(Error::Corrupt {
                format: "qcow2", ..
            }) => {}
            other => panic!("{name}: expected a corruption error, got {other:?}"),
        }
        let out = d.path().join(format!("{name}.raw"));
        assert_convert_refused("raw", "", &d.path().join(name), &out);
    };

    read_err(
        "l2eof",
        &patched(
            &t,
            &[(l1_off, &L1Entry::new(1 << 40, true).0.to_be_bytes())],
        ),
    );

    read_err(
        "l2align",
        &patched(
            &t,
            &[(l1_off, &(0x8000_0000_0000_0000u64 | 0x40200).to_be_bytes())],
        ),
    );

    read_err(
        "dataalign",
        &patched(
            &t,
            &[(l2_off, &L2Entry::normal(0x50200, true).0.to_be_bytes())],
        ),
    );

    read_err(
        "dataeof",
        &patched(
            &t,
            &[(l2_off, &L2Entry::normal(1 << 40, true).0.to_be_bytes())],
        ),
    );

    // A compressed cluster holding garbage, and one pointing past the end of the file.
    let desc = CompressedDescriptor::for_data(0x50000, 1000, 16).unwrap();
    let garbage = noise(1000, 3);
    read_err(
        "garbage",
        &patched(
            &t,
            &[
                (l2_off, &L2Entry::compressed(desc, 16).0.to_be_bytes()),
                (0x50000, &garbage[..]),
            ],
        ),
    );

    let desc = CompressedDescriptor::for_data(1 << 30, 1000, 16).unwrap();
    read_err(
        "compeof",
        &patched(
            &t,
            &[(l2_off, &L2Entry::compressed(desc, 16).0.to_be_bytes())],
        ),
    );
}

#[test]
fn backing_loops_and_deep_chains_are_refused() {
    let d = scratch();
    let a = create(d.path(), "a.qcow2", "", "1M");
    let b = d.path().join("b.qcow2");
    qemu_img(&overlay_args("qcow2", &["-q"], "a.qcow2", &b, ""));
    qemu_img(&["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", s(&a)]);
    match imgconv::open(&a, &OpenOptions::default()) {
        Err(Error::BackingChain { .. }) => {}
        other => panic!("expected a backing-chain error, got {}", brief(&other)),
    }
    // 17 images: one more than the limit.
    let mut prev = create(d.path(), "c0.qcow2", "", "1M");
    for i in 1..17 {
        let next = d.path().join(format!("c{i}.qcow2"));
        let pn = prev.file_name().unwrap().to_str().unwrap().to_string();
        qemu_img(&overlay_args("qcow2", &["-q"], &pn, &next, ""));
        prev = next;
    }
    match imgconv::open(&prev, &OpenOptions::default()) {
        Err(Error::BackingChain { .. }) => {}
        other => panic!("expected a backing-chain error, got {}", brief(&other)),
    }
    // 16 images is fine.
    let ok = d.path().join("c15.qcow2");
    imgconv::open(&ok, &OpenOptions::default()).unwrap();
}

#[test]
fn persistent_bitmaps_are_listed_like_qemu() {
    let d = scratch();
    let img = create(d.path(), "bm.qcow2", "", "4M");
    qemu_img(&["bitmap", "--add", s(&img), "b0"]);
    qemu_img(&[
        "bitmap",
        "--add",
        "-g",
        "128k",
        "--disable",
        s(&img),
        "other",
    ]);
    io(&img, &["write -P 0x15 0 64k"]);
    check(&img, d.path());
    let info = our_info(&img);
    assert_eq!(
        info["format-specific"]["data"]["bitmaps"]
            .as_array()
            .map(|a| a.len()),
        Some(2)
    );
}

#[test]
fn odd_sized_compressed_images() {
    let d = scratch();
    let raw = d.path().join("odd.raw");
    make_raw(&raw, 1_000_448, &[(0, 1_000_448, 0x2d)]);
    for ct in ["zlib", "zstd"] {
        let img = d.path().join(format!("odd-{ct}.qcow2"));
        qemu_compress_to_qcow2(&format!("compression_type={ct}"), &raw, &img);
        check(&img, d.path());
    }
}

/// Random byte mutations of small images (metadata and data): opening and reading must
/// give a result or a typed error, never a panic or a hang.
#[test]
fn mutated_images_never_panic() {
    use imgconv::format::qcow2;
    use imgconv::image::OpenContext;
    use imgconv::io::MemStorage;
    use std::sync::Arc;

    let d = scratch();
    let raw = pattern_raw(d.path(), 1 << 20);
    let mut templates = Vec::new();
    for (name, opts, compress) in [
        ("plain.qcow2", "cluster_size=4k", false),
        ("comp.qcow2", "cluster_size=4k", true),
        (
            "zstd.qcow2",
            "cluster_size=16k,compression_type=zstd,extended_l2=on",
            true,
        ),
        ("v2.qcow2", "compat=0.10,cluster_size=512", false),
    ] {
        let img = d.path().join(name);
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2", "-o", opts];
        if compress {
            args.push("-c");
        }
        args.extend([s(&raw), s(&img)]);
        qemu_img(&args);
        templates.push(std::fs::read(&img).unwrap());
    }
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let opts = OpenOptions::default();
    let mut opened = 0;
    let t = Instant::now();
    for i in 0..2000 {
        let mut b = templates[i % templates.len()].clone();
        let n = 1 + next() % 6;
        for _ in 0..n {
            // Mostly the metadata near the start of the file, sometimes anywhere.
            let span = if next() % 4 == 0 {
                b.len()
            } else {
                b.len().min(0x8000)
            };
            let at = (next() as usize) % span;
            b[at] = match next() % 3 {
                0 => next() as u8,
                1 => b[at] ^ (1 << (next() % 8)),
                _ => 0xff,
            };
        }
        let ctx = OpenContext::detached("fuzz", &opts);
        let Ok(img) = qcow2::open(Arc::new(MemStorage::new(b)), &ctx) else {
            continue;
        };
        opened += 1;
        let dev = img.device;
        let size = dev.size();
        let mut buf = vec![0u8; 256 << 10];
        for off in [0, size / 3, size.saturating_sub(buf.len() as u64)] {
            let len = (buf.len() as u64).min(size.saturating_sub(off)) as usize;
            let _ = dev.read_at(&mut buf[..len], off);
        }
        let mut pos = 0;
        let mut steps = 0;
        while pos < size && steps < 10_000 {
            match dev.map(pos, size - pos) {
                Ok(e) => {
                    assert!(e.offset == pos && e.len > 0 && e.end() <= size, "{e:?}");
                    pos = e.end();
                }
                Err(_) => break,
            }
            steps += 1;
        }
    }
    assert!(opened > 100, "only {opened} mutated images opened");
    assert!(t.elapsed().as_secs() < 60, "took {:?}", t.elapsed());
}

#[test]
fn snapshot_contents_read_like_qemu_convert_l() {
    use imgconv::format::qcow2;
    use imgconv::image::OpenContext;
    use imgconv::io::FileStorage;
    use std::sync::Arc;

    let d = scratch();
    let img = create(d.path(), "sn.qcow2", "cluster_size=4k", "2M");
    io(&img, &["write -P 0x41 0 1M"]);
    qemu_img(&["snapshot", "-c", "first", s(&img)]);
    io(&img, &["write -P 0x42 0 512k", "write -z 1M 64k"]);
    qemu_img(&["resize", s(&img), "3M"]);
    io(&img, &["write -P 0x43 2M 64k"]);
    for which in ["first", "1"] {
        let ctx = OpenContext::for_path(&img, &OpenOptions::default());
        let st = Arc::new(FileStorage::open(&img).unwrap());
        let snap = qcow2::open_snapshot(st, &ctx, which).unwrap();
        // qemu-img reads the snapshot at the image's current size.
        assert_eq!(snap.device.size(), 3 << 20);
        let mut ours = vec![0u8; 3 << 20];
        snap.device.read_at(&mut ours, 0).unwrap();
        let out = d.path().join("sn.raw");
        qemu_img(&[
            "convert",
            "-l",
            "snapshot.name=first",
            "-O",
            "raw",
            s(&img),
            s(&out),
        ]);
        let theirs = std::fs::read(&out).unwrap();
        assert_eq!(ours.len(), theirs.len());
        let diff = (0..ours.len()).find(|&i| ours[i] != theirs[i]);
        assert_eq!(diff, None, "{which}: first difference");
    }
    let ctx = OpenContext::for_path(&img, &OpenOptions::default());
    let st = Arc::new(FileStorage::open(&img).unwrap());
    assert!(qcow2::open_snapshot(st, &ctx, "nope").is_err());
}

/// A copy of the template `t` with each `(offset, bytes)` written over it.
fn patched(t: &[u8], edits: &[(usize, &[u8])]) -> Vec<u8> {
    let mut b = t.to_vec();
    for (off, v) in edits {
        put(&mut b, *off, v);
    }
    b
}

/// `qemu-img convert -c -f raw -O qcow2 -o OPTS RAW IMG`: a compressed qcow2 made by qemu.
fn qemu_compress_to_qcow2(opts: &str, raw: &Path, img: &Path) {
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        opts,
        s(raw),
        s(img),
    ]);
}
