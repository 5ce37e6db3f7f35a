//! qemu-img's image-changing commands — `rebase`, `commit`, `amend`, `snapshot`,
//! `bitmap` — run by qemu-img and by imgconv on fresh copies of the same images, and
//! the results compared: exit codes, contents (`qemu-img compare`), `qemu-img info`
//! fields, printed lines scripts read; `qemu-img check` clean after every success.
//! Each row says where its command line comes from.

mod common;
use common::*;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

/// A scenario's images, made by qemu-img and qemu-io (the same for both tools).
type Setup = fn(&Path);

struct Row {
    /// Where the command line comes from.
    source: &'static str,
    setup: Setup,
    /// The command line after the program name, run in the scenario's folder.
    args: &'static [&'static str],
    /// Images to compare afterwards (content and info fields).
    images: &'static [&'static str],
    /// Compare standard output too (dates masked).
    stdout: bool,
}

/// Rows whose internal snapshots are compared with what they were before the command,
/// not with qemu-img's result (where qemu-img is known to change them).
const SNAPSHOTS_AS_BEFORE: &[&str] = &["amend compat=0.10 with snapshots"];

fn io(dir: &Path, img: &str, cmds: &[&str]) {
    let mut a = Vec::new();
    for c in cmds {
        a.extend(["-c", c]);
    }
    let p = dir.join(img);
    a.push(s(&p));
    qemu_io(&a);
}

fn create(dir: &Path, args: &[&str]) {
    let o = Command::new("qemu-img")
        .arg("create")
        .arg("-q")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// base.qcow2 (8 MiB: data at 0..2M and 4M..5M) under top.qcow2 (data at 512k, a
/// zero cluster at 4M, a partial cluster at 7M).
fn chain(dir: &Path) {
    create(dir, &["-f", "qcow2", "base.qcow2", "8M"]);
    io(dir, "base.qcow2", &["write -P 1 0 2M", "write -P 5 4M 1M"]);
    create(
        dir,
        &[
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    io(
        dir,
        "top.qcow2",
        &[
            "write -P 9 512k 64k",
            "write -z 4M 64k",
            "write -P 3 7M 100k",
        ],
    );
}

/// [`chain`] plus newbase.qcow2 sharing part of base's data, to rebase onto.
fn chain_and_newbase(dir: &Path) {
    chain(dir);
    create(dir, &["-f", "qcow2", "newbase.qcow2", "8M"]);
    io(
        dir,
        "newbase.qcow2",
        &["write -P 1 0 1M", "write -P 6 6M 64k"],
    );
}

/// [`chain`] with base.qcow2 moved to moved.qcow2 (for `rebase -u`).
fn chain_moved(dir: &Path) {
    chain(dir);
    std::fs::rename(dir.join("base.qcow2"), dir.join("moved.qcow2")).unwrap();
}

/// base.qcow2 ← mid.qcow2 ← top.qcow2.
fn deep_chain(dir: &Path) {
    chain(dir);
    std::fs::rename(dir.join("top.qcow2"), dir.join("mid.qcow2")).unwrap();
    create(
        dir,
        &["-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"],
    );
    io(dir, "top.qcow2", &["write -P 4 1M 256k", "write -z 0 64k"]);
}

/// base.raw under top.qcow2.
fn raw_chain(dir: &Path) {
    make_raw(&dir.join("base.raw"), 8 << 20, &[(0, 2 << 20, 1)]);
    create(
        dir,
        &["-f", "qcow2", "-b", "base.raw", "-F", "raw", "top.qcow2"],
    );
    io(
        dir,
        "top.qcow2",
        &[
            "write -P 9 512k 64k",
            "write -z 1M 64k",
            "write -P 3 7M 100k",
        ],
    );
}

/// base.vdi (dynamic, with a block of data) under top.qcow2.
fn vdi_chain(dir: &Path) {
    create(dir, &["-f", "vdi", "base.vdi", "8M"]);
    qemu_io(&[
        "-f",
        "vdi",
        "-c",
        "write -P 1 0 1536k",
        s(&dir.join("base.vdi")),
    ]);
    create(
        dir,
        &["-f", "qcow2", "-b", "base.vdi", "-F", "vdi", "top.qcow2"],
    );
    io(
        dir,
        "top.qcow2",
        &[
            "write -P 9 512k 64k",
            "write -z 1M 64k",
            "write -P 3 7M 100k",
        ],
    );
}

/// A version 2 overlay on a version 2 base.
fn v2_chain(dir: &Path) {
    create(
        dir,
        &["-f", "qcow2", "-o", "compat=0.10", "base.qcow2", "8M"],
    );
    io(dir, "base.qcow2", &["write -P 1 0 2M"]);
    create(
        dir,
        &[
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    io(dir, "top.qcow2", &["write -P 9 1M 1M", "write -z 0 64k"]);
}

/// img.qcow2 with data and zero clusters.
fn plain(dir: &Path) {
    create(dir, &["-f", "qcow2", "img.qcow2", "16M"]);
    io(
        dir,
        "img.qcow2",
        &["write -P 7 0 3M", "write -z 4M 1M", "write -P 8 9M 65k"],
    );
}

/// img.qcow2 (v2) with data.
fn plain_v2(dir: &Path) {
    create(
        dir,
        &["-f", "qcow2", "-o", "compat=0.10", "img.qcow2", "16M"],
    );
    io(dir, "img.qcow2", &["write -P 7 0 3M", "write -P 8 9M 65k"]);
}

/// img.qcow2 with extended L2 entries.
fn plain_extl2(dir: &Path) {
    create(
        dir,
        &["-f", "qcow2", "-o", "extended_l2=on", "img.qcow2", "16M"],
    );
    io(dir, "img.qcow2", &["write -P 7 0 3M"]);
}

/// img.qcow2 with zstd compression (no compressed cluster yet).
fn plain_zstd(dir: &Path) {
    create(
        dir,
        &[
            "-f",
            "qcow2",
            "-o",
            "compression_type=zstd",
            "img.qcow2",
            "16M",
        ],
    );
    io(dir, "img.qcow2", &["write -P 7 0 3M"]);
}

/// img.qcow2 with two snapshots and changes after each.
fn snapshotted(dir: &Path) {
    plain(dir);
    qemu_img(&["snapshot", "-c", "snap1", s(&dir.join("img.qcow2"))]);
    io(dir, "img.qcow2", &["write -P 2 1M 2M", "write -z 9M 64k"]);
    qemu_img(&["snapshot", "-c", "snap2", s(&dir.join("img.qcow2"))]);
    io(dir, "img.qcow2", &["write -P 3 12M 1M"]);
}

/// img.qcow2 with bitmap bm0 (recording: the write after it sets bits), and
/// other.qcow2 with bitmap src holding bits.
fn bitmapped(dir: &Path) {
    plain(dir);
    qemu_img(&["bitmap", "--add", s(&dir.join("img.qcow2")), "bm0"]);
    io(dir, "img.qcow2", &["write -P 4 2M 128k"]);
    create(dir, &["-f", "qcow2", "other.qcow2", "16M"]);
    qemu_img(&[
        "bitmap",
        "--add",
        "-g",
        "128k",
        s(&dir.join("other.qcow2")),
        "src",
    ]);
    io(dir, "other.qcow2", &["write -P 1 5M 300k"]);
}

/// img.qcow2 with three bitmaps for `convert --bitmaps`: b0 (128 KiB granularity,
/// recording), b1 (disabled before the write: no bits), b2 (added after it: no bits),
/// and b3 (recording a second write), beside a plain other.qcow2.
fn many_bitmaps(dir: &Path) {
    create(dir, &["-f", "qcow2", "img.qcow2", "24M"]);
    let img = dir.join("img.qcow2");
    qemu_img(&["bitmap", "--add", "-g", "128k", s(&img), "b0"]);
    qemu_img(&["bitmap", "--add", "--disable", s(&img), "b1"]);
    qemu_img(&["bitmap", "--add", "-g", "1M", s(&img), "b3"]);
    io(
        dir,
        "img.qcow2",
        &["write -P 1 1M 300k", "write -P 2 17M 64k"],
    );
    qemu_img(&["bitmap", "--add", s(&img), "b2"]);
    qemu_img(&["bitmap", "--disable", s(&img), "b0"]);
    io(dir, "img.qcow2", &["write -P 3 9M 4k"]);
    create(dir, &["-f", "qcow2", "other.qcow2", "24M"]);
}

const ROWS: &[Row] = &[
    Row {
        source: "F-Droid fdroidserver vmtools.py (Vagrant box packaging): qemu-img rebase -p -b '' box.img",
        setup: chain,
        args: &["rebase", "-p", "-b", "", "top.qcow2"],
        images: &["top.qcow2"],
        stdout: false,
    },
    Row {
        source: "OpenStack Cinder remotefs.py _rebase_img: qemu-img rebase -u -b BACKING IMAGE -F FMT",
        setup: chain_moved,
        args: &["rebase", "-u", "-b", "moved.qcow2", "top.qcow2", "-F", "qcow2"],
        images: &["top.qcow2"],
        stdout: false,
    },
    Row {
        source: "qemu-img docs (rebase, safe mode onto another base): rebase -b base.img -F FMT diff.qcow2",
        setup: chain_and_newbase,
        args: &["rebase", "-b", "newbase.qcow2", "-F", "qcow2", "top.qcow2"],
        images: &["top.qcow2"],
        stdout: false,
    },
    Row {
        source: "qemu-img docs (rebase -c): compress what is copied",
        setup: chain_and_newbase,
        args: &["rebase", "-c", "-b", "newbase.qcow2", "-F", "qcow2", "top.qcow2"],
        images: &["top.qcow2"],
        stdout: false,
    },
    Row {
        source: "qemu-img docs (rebase of a compat=0.10 overlay, flattening)",
        setup: v2_chain,
        args: &["rebase", "-f", "qcow2", "-b", "", "top.qcow2"],
        images: &["top.qcow2"],
        stdout: false,
    },
    Row {
        source: "qemu-img rebase without -F onto a backing file (QEMU 10 refuses)",
        setup: chain_and_newbase,
        args: &["rebase", "-u", "-b", "newbase.qcow2", "top.qcow2"],
        images: &["top.qcow2"],
        stdout: false,
    },
    Row {
        source: "OpenStack Cinder remotefs.py _img_commit: qemu-img commit PATH",
        setup: chain,
        args: &["commit", "top.qcow2"],
        images: &["top.qcow2", "base.qcow2"],
        stdout: true,
    },
    Row {
        source: "oVirt v2v-conversion-host wrapper pre_copy.py: qemu-img commit -p OVERLAY",
        setup: raw_chain,
        args: &["commit", "-p", "top.qcow2"],
        images: &["top.qcow2", "base.raw"],
        stdout: false,
    },
    Row {
        source: "qemu-img commit into a VDI base (QEMU's VDI driver writes in place)",
        setup: vdi_chain,
        args: &["commit", "top.qcow2"],
        images: &["top.qcow2", "base.vdi"],
        stdout: true,
    },
    Row {
        source: "qemu-img docs (commit -d): keep the overlay",
        setup: chain,
        args: &["commit", "-q", "-d", "-f", "qcow2", "top.qcow2"],
        images: &["top.qcow2", "base.qcow2"],
        stdout: true,
    },
    Row {
        source: "qemu-img docs (commit -b): into a deeper base",
        setup: deep_chain,
        args: &["commit", "-b", "base.qcow2", "top.qcow2"],
        images: &["top.qcow2", "base.qcow2", "mid.qcow2"],
        stdout: true,
    },
    Row {
        source: "qemu-img commit of an image without a backing file (error)",
        setup: plain,
        args: &["commit", "img.qcow2"],
        images: &["img.qcow2"],
        stdout: true,
    },
    Row {
        source: "issue 14 / qemu-img docs: amend -f qcow2 -o compat=0.10 img",
        setup: plain,
        args: &["amend", "-f", "qcow2", "-o", "compat=0.10", "img.qcow2"],
        images: &["img.qcow2"],
        stdout: false,
    },
    Row {
        source: "oVirt vdsm qemuimg.amend: qemu-img amend -o compat=1.1 IMAGE",
        setup: plain_v2,
        args: &["amend", "-o", "compat=1.1", "img.qcow2"],
        images: &["img.qcow2"],
        stdout: false,
    },
    Row {
        source: "qemu-img docs (amend, qcow2 options): lazy_refcounts and refcount_bits",
        setup: plain,
        args: &["amend", "-o", "lazy_refcounts=on,refcount_bits=64", "img.qcow2"],
        images: &["img.qcow2"],
        stdout: false,
    },
    Row {
        source: "qemu-img docs (amend size=): grow",
        setup: chain,
        args: &["amend", "-o", "size=12M", "top.qcow2"],
        images: &["top.qcow2"],
        stdout: false,
    },
    Row {
        source: "qemu-img docs (amend size=): shrink",
        setup: plain,
        args: &["amend", "-o", "size=6M", "img.qcow2"],
        images: &["img.qcow2"],
        stdout: false,
    },
    Row {
        source: "amend compat=0.10 of an overlay: zero clusters become clusters of zeros",
        setup: chain,
        args: &["amend", "-o", "compat=0.10", "top.qcow2"],
        images: &["top.qcow2"],
        stdout: false,
    },
    Row {
        source: "amend compat=0.10 with snapshots (zero clusters expanded in them too; \
                 qemu-img 10 writes zeros into a preallocated zero cluster that snapshot \
                 snap1 still reads as data, changing snap1: imgconv keeps it)",
        setup: snapshotted,
        args: &["amend", "-o", "compat=0.10", "img.qcow2"],
        images: &["img.qcow2"],
        stdout: false,
    },
    Row {
        source: "amend compat=0.10 refused for extended L2 entries",
        setup: plain_extl2,
        args: &["amend", "-o", "compat=0.10", "img.qcow2"],
        images: &["img.qcow2"],
        stdout: false,
    },
    Row {
        source: "amend compat=0.10 with zstd and no compressed cluster",
        setup: plain_zstd,
        args: &["amend", "-o", "compat=0.10", "img.qcow2"],
        images: &["img.qcow2"],
        stdout: false,
    },
    Row {
        source: "amend of a creation-only option (error)",
        setup: plain,
        args: &["amend", "-o", "cluster_size=4k", "img.qcow2"],
        images: &["img.qcow2"],
        stdout: false,
    },
    Row {
        source: "Proxmox pve-storage Plugin.pm volume_snapshot: qemu-img snapshot -c SNAP PATH",
        setup: plain,
        args: &["snapshot", "-c", "vzdump", "img.qcow2"],
        images: &["img.qcow2"],
        stdout: false,
    },
    Row {
        source: "Proxmox pve-storage Plugin.pm volume_snapshot_rollback: qemu-img snapshot -a SNAP PATH",
        setup: snapshotted,
        args: &["snapshot", "-a", "snap1", "img.qcow2"],
        images: &["img.qcow2"],
        stdout: false,
    },
    Row {
        source: "Proxmox pve-storage Plugin.pm volume_snapshot_delete: qemu-img snapshot -d SNAP PATH",
        setup: snapshotted,
        args: &["snapshot", "-d", "snap1", "img.qcow2"],
        images: &["img.qcow2"],
        stdout: false,
    },
    Row {
        source: "qemu-img docs (snapshot -l)",
        setup: snapshotted,
        args: &["snapshot", "-l", "img.qcow2"],
        images: &["img.qcow2"],
        stdout: true,
    },
    Row {
        source: "qemu-img snapshot -a of a missing snapshot (error)",
        setup: snapshotted,
        args: &["snapshot", "-a", "nope", "img.qcow2"],
        images: &["img.qcow2"],
        stdout: false,
    },
    Row {
        source: "qemu-img docs / libvirt incremental backup: qemu-img bitmap --add IMG NAME",
        setup: plain,
        args: &["bitmap", "--add", "img.qcow2", "bm1"],
        images: &["img.qcow2"],
        stdout: false,
    },
    Row {
        source: "qemu-img docs (bitmap -g, several actions in order)",
        setup: plain,
        args: &["bitmap", "--add", "-g", "1M", "--disable", "img.qcow2", "bm1"],
        images: &["img.qcow2"],
        stdout: false,
    },
    Row {
        source: "qemu-img docs (bitmap --merge from another image)",
        setup: bitmapped,
        args: &[
            "bitmap", "--merge", "src", "-b", "other.qcow2", "-F", "qcow2", "img.qcow2", "bm0",
        ],
        images: &["img.qcow2"],
        stdout: false,
    },
    Row {
        source: "qemu-img docs (bitmap --clear, --disable, --enable, --remove)",
        setup: bitmapped,
        args: &["bitmap", "--clear", "--disable", "img.qcow2", "bm0"],
        images: &["img.qcow2"],
        stdout: false,
    },
    Row {
        source: "qemu-img docs (bitmap --remove)",
        setup: bitmapped,
        args: &["bitmap", "--remove", "img.qcow2", "bm0"],
        images: &["img.qcow2"],
        stdout: false,
    },
    Row {
        source: "qemu-img bitmap --remove of a missing bitmap (error)",
        setup: bitmapped,
        args: &["bitmap", "--remove", "img.qcow2", "nope"],
        images: &["img.qcow2"],
        stdout: false,
    },
    Row {
        source: "qemu-img docs / libvirt backup (convert --bitmaps): copy the persistent bitmaps",
        setup: many_bitmaps,
        args: &["convert", "--bitmaps", "-O", "qcow2", "img.qcow2", "out.qcow2"],
        images: &["out.qcow2"],
        stdout: false,
    },
    Row {
        source: "qemu-img convert --bitmaps -n into an existing qcow2",
        setup: many_bitmaps,
        args: &["convert", "--bitmaps", "-n", "-O", "qcow2", "img.qcow2", "other.qcow2"],
        images: &["other.qcow2"],
        stdout: false,
    },
    Row {
        source: "qemu-img convert --bitmaps of two sources (error)",
        setup: many_bitmaps,
        args: &["convert", "--bitmaps", "-O", "qcow2", "img.qcow2", "other.qcow2", "out.qcow2"],
        images: &[],
        stdout: false,
    },
    Row {
        source: "qemu-img convert --bitmaps to a compat=0.10 target (error)",
        setup: many_bitmaps,
        args: &["convert", "--bitmaps", "-O", "qcow2", "-o", "compat=0.10", "img.qcow2", "out.qcow2"],
        images: &[],
        stdout: false,
    },
];

/// The bits of every persistent bitmap of `img`, by name (read by imgconv's library:
/// the images compared were written by qemu-img and by imgconv).
fn bitmap_bits(img: &Path) -> Vec<(String, Vec<u8>)> {
    let info = qemu_info(img);
    let Some(Value::Array(list)) = info.pointer("/format-specific/data/bitmaps").cloned() else {
        return Vec::new();
    };
    let storage = imgconv::io::FileStorage::open_image(img, false).unwrap();
    list.iter()
        .map(|b| {
            let name = b["name"].as_str().unwrap().to_string();
            let bits = imgconv::format::qcow2::bitmap::read_from(&storage, &name)
                .unwrap()
                .bytes;
            (name, bits)
        })
        .collect()
}

fn run_in(dir: &Path, program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

/// The `qemu-img info` fields a script reads, with what differs by nature (file
/// name, sizes on disk, snapshot dates) left out.
fn info_fields(img: &Path) -> Value {
    let mut v = qemu_info(img);
    let o = v.as_object_mut().unwrap();
    for k in [
        "filename",
        "full-backing-filename",
        "actual-size",
        "children",
    ] {
        o.remove(k);
    }
    if let Some(Value::Array(sn)) = o.get_mut("snapshots") {
        for s in sn {
            let s = s.as_object_mut().unwrap();
            s.remove("date-sec");
            s.remove("date-nsec");
        }
    }
    v
}

/// `snapshot -l` output with the dates masked.
fn mask_dates(out: &str) -> String {
    out.lines()
        .map(|l| {
            let mut l = l.to_string();
            if let Some(i) = l.find(" 20") {
                if l.len() >= i + 20 {
                    l.replace_range(i + 1..i + 20, "DATE");
                }
            }
            l
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn commands_match_qemu_img() {
    let root = scratch();
    let mut failures = Vec::new();
    let mut set_bits_compared = 0;
    for (n, row) in ROWS.iter().enumerate() {
        let qd = root.path().join(format!("{n}-qemu"));
        let id = root.path().join(format!("{n}-imgconv"));
        std::fs::create_dir_all(&qd).unwrap();
        std::fs::create_dir_all(&id).unwrap();
        (row.setup)(&qd);
        (row.setup)(&id);
        let before = root.path().join(format!("{n}-before"));
        let keep_snapshots = SNAPSHOTS_AS_BEFORE
            .iter()
            .any(|p| row.source.starts_with(p));
        if keep_snapshots {
            std::fs::create_dir_all(&before).unwrap();
            (row.setup)(&before);
        }
        let q = run_in(&qd, "qemu-img", row.args);
        let i = run_in(&id, imgconv_bin(), row.args);
        let what = format!("row {n} ({}): {:?}", row.source, row.args);
        if q.status.code() != i.status.code() {
            failures.push(format!(
                "{what}: exit code qemu-img {:?} imgconv {:?}\nqemu-img: {}\nimgconv: {}",
                q.status.code(),
                i.status.code(),
                String::from_utf8_lossy(&q.stderr),
                String::from_utf8_lossy(&i.stderr)
            ));
            continue;
        }
        if row.stdout {
            let (qo, io) = (
                String::from_utf8_lossy(&q.stdout),
                String::from_utf8_lossy(&i.stdout),
            );
            if mask_dates(&qo) != mask_dates(&io) {
                failures.push(format!(
                    "{what}: output differs\nqemu-img:\n{qo}\nimgconv:\n{io}"
                ));
            }
        }
        for img in row.images {
            let (qi, ii) = (qd.join(img), id.join(img));
            let c = run("qemu-img", &["compare", s(&qi), s(&ii)]);
            if !c.status.success() {
                failures.push(format!(
                    "{what}: {img} contents differ: {}{}",
                    String::from_utf8_lossy(&c.stdout),
                    String::from_utf8_lossy(&c.stderr)
                ));
            }
            let (qf, if_) = (info_fields(&qi), info_fields(&ii));
            if qf != if_ {
                failures.push(format!(
                    "{what}: {img} info differs\nqemu-img: {qf:#}\nimgconv: {if_:#}"
                ));
            }
            if img.ends_with(".qcow2") {
                let chk = run("qemu-img", &["check", s(&ii)]);
                if !chk.status.success() {
                    failures.push(format!(
                        "{what}: qemu-img check {img}: {}{}",
                        String::from_utf8_lossy(&chk.stdout),
                        String::from_utf8_lossy(&chk.stderr)
                    ));
                }
            }
            if img.ends_with(".qcow2") {
                let (qb, ib) = (bitmap_bits(&qi), bitmap_bits(&ii));
                if qb != ib {
                    failures.push(format!("{what}: the bits of {img}'s bitmaps differ"));
                }
                set_bits_compared += qb
                    .iter()
                    .map(|(_, b)| b.iter().map(|x| x.count_ones()).sum::<u32>())
                    .sum::<u32>();
            }
            // Internal snapshots read the same.
            let reference = if keep_snapshots {
                before.join(img)
            } else {
                qi.clone()
            };
            if let Some(Value::Array(sn)) = qemu_info(&qi).get("snapshots") {
                for s_ in sn {
                    let name = s_["name"].as_str().unwrap();
                    let (qr, ir) = (qd.join("sn.raw"), id.join("sn.raw"));
                    qemu_img(&["convert", "-l", name, "-O", "raw", s(&reference), s(&qr)]);
                    qemu_img(&["convert", "-l", name, "-O", "raw", s(&ii), s(&ir)]);
                    if std::fs::read(&qr).unwrap() != std::fs::read(&ir).unwrap() {
                        failures.push(format!("{what}: snapshot {name} of {img} differs"));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(
        set_bits_compared > 20,
        "bitmap rows compared {set_bits_compared} set bits"
    );
}

/// `convert --bitmaps` of a source with an in-use (inconsistent) bitmap: refused by both
/// programs before any output exists; with `--skip-broken-bitmaps` both copy the others.
#[test]
fn convert_bitmaps_in_use_refused_or_skipped() {
    let d = scratch();
    let img = d.path().join("img.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "16M"]);
    qemu_img(&["bitmap", "--add", s(&img), "b0"]);
    qemu_img(&["bitmap", "--add", s(&img), "b1"]);
    qemu_io(&["-c", "write -P 7 1M 64k", s(&img)]);
    // Mark b0 in use: its directory entry's flags (4 bytes) lie 6 bytes before its
    // name length (2), extra data size (4) and name. Older copies of the directory
    // (in freed clusters) get the same mark; only the current one counts.
    let mut bytes = std::fs::read(&img).unwrap();
    let needle = b"\x00\x02\x00\x00\x00\x00b0";
    let places: Vec<usize> = (0..bytes.len() - needle.len())
        .filter(|&i| &bytes[i..i + needle.len()] == needle)
        .collect();
    assert!(!places.is_empty(), "b0's directory entry");
    for at in places {
        bytes[at - 3] |= 1;
    }
    std::fs::write(&img, &bytes).unwrap();
    let flags = &qemu_info(&img)["format-specific"]["data"]["bitmaps"];
    assert!(flags.to_string().contains("in-use"), "{flags}");

    for program in ["qemu-img", imgconv_bin()] {
        let out = d.path().join("out.qcow2");
        let _ = std::fs::remove_file(&out);
        let o = run_in(
            d.path(),
            program,
            &[
                "convert",
                "--bitmaps",
                "-O",
                "qcow2",
                "img.qcow2",
                "out.qcow2",
            ],
        );
        assert_eq!(o.status.code(), Some(1), "{program}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("Cannot copy inconsistent bitmap 'b0'"),
            "{program}: {err}"
        );
        if program != "qemu-img" {
            assert!(!out.exists(), "imgconv left an output behind");
        }
        let o = run_in(
            d.path(),
            program,
            &[
                "convert",
                "--bitmaps",
                "--skip-broken-bitmaps",
                "-O",
                "qcow2",
                "img.qcow2",
                "out.qcow2",
            ],
        );
        assert!(
            o.status.success(),
            "{program}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let names: Vec<String> = bitmap_bits(&out).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["b1"], "{program}");
        assert_qemu_check_clean(&out);
    }
}
