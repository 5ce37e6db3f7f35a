//! imgconv as a drop-in for qemu-img: one row per command line taken from a tool that
//! runs qemu-img (KubeVirt CDI, OpenStack Nova/Cinder/Glance, Proxmox, Packer,
//! diskimage-builder, migration scripts, cloud documentation) or from qemu-img's own
//! documentation, with where it comes from.
//!
//! Each line runs twice — `qemu-img LINE` and `imgconv LINE` — in two folders holding
//! fresh copies of the same small images, and the runs must agree: the exit code; the
//! images the line writes (`qemu-img compare`, `qemu-img info` fields, allocation); and
//! what the line prints, as scripts read it (see [`Out`]).
//!
//! Adding a line is adding a row to [`ROWS`].

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use serde_json::Value;

/// What of a row's standard output must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    /// Nothing beyond the exit code and the images written.
    Code,
    /// Byte for byte.
    Exact,
    /// JSON: the same keys (imgconv's extra keys aside) and values.
    Json,
    /// Human `info`: the lines scripts grep (`file format:`, `virtual size:`,
    /// `disk size:`, `backing file:`…).
    InfoLines,
    /// `-p` progress: CDI's and Proxmox's patterns match every update, the updates are
    /// qemu-img's, and the rest of the output is the same.
    Progress,
    /// `-p` progress where imgconv updates at other points than qemu-img (`rebase`,
    /// `commit`: their walks differ): both patterns match every update, the last is
    /// 100 %, and the rest of the output is the same.
    ProgressPatterns,
    /// The first line only (`bench` then prints a time).
    FirstLine,
    /// The first line of standard error, program name aside (messages scripts match).
    Error,
}

/// One command line and what to compare.
struct Row {
    /// Arguments after the program name; `'…'` quotes an argument holding spaces.
    line: &'static str,
    out: Out,
    /// Files the line writes, compared between the two runs.
    writes: &'static [&'static str],
    /// Where the line comes from.
    from: &'static str,
}

const fn row(
    line: &'static str,
    out: Out,
    writes: &'static [&'static str],
    from: &'static str,
) -> Row {
    Row {
        line,
        out,
        writes,
        from,
    }
}

use Out::*;

const CDI: &str = "KubeVirt CDI pkg/image/qemu.go";
const NOVA_INFO: &str = "OpenStack Nova nova/virt/images.py qemu_img_info";
const NOVA_CONVERT: &str = "OpenStack Nova nova/privsep/qemu.py unprivileged_convert_image";
const CINDER_INFO: &str = "OpenStack Cinder cinder/image/image_utils.py qemu_img_info";
const CINDER_CONVERT: &str =
    "OpenStack Cinder cinder/image/image_utils.py _convert_image (options after the names)";
const GLANCE: &str = "OpenStack Glance glance/async_/flows/plugins/image_conversion.py";
const PROXMOX: &str = "Proxmox qemu-server PVE/QemuServer/QemuImage.pm convert";
const PACKER: &str = "Packer QEMU builder (step_create_disk, step_resize_disk, step_convert_disk)";
const DOCS: &str = "qemu-img(1) manual";
const IMAGE_GUIDE: &str = "OpenStack Virtual Machine Image Guide, converting between formats";
const AZURE: &str =
    "Microsoft Learn, Azure: prepare a Linux VHD (qemu-img convert -f raw -o subformat=fixed,force_size -O vpc)";
const FDROID: &str = "F-Droid fdroidserver vmtools.py (Vagrant box packaging)";
const CINDER_REBASE: &str = "OpenStack Cinder cinder/volume/drivers/remotefs.py _rebase_img";
const CINDER_COMMIT: &str = "OpenStack Cinder cinder/volume/drivers/remotefs.py _img_commit";
const OVIRT_COMMIT: &str = "oVirt v2v-conversion-host wrapper pre_copy.py";
const PVE_SNAPSHOT: &str =
    "Proxmox pve-storage PVE/Storage/Plugin.pm volume_snapshot, _rollback, _delete";

/// The command lines. Fixtures (see [`fixtures`]): disk.raw (8 MiB, data and holes) and
/// the same disk as disk.qcow2, disk.vmdk, stream.vmdk, disk.vdi, comp.qcow2 (zlib);
/// base.qcow2 with the overlay top.qcow2; other.raw (one sector differs from disk.raw);
/// disk.vhd (dynamic VHD), disk.vhdx; snap.qcow2 (internal snapshot `snap1`); target.raw / target.qcow2 (empty, for -n).
const ROWS: &[Row] = &[
    // KubeVirt CDI: import to a PVC, reading progress from stdout.
    row("convert -t none -p -O raw disk.qcow2 out.raw", Progress, &["out.raw"], CDI),
    row("convert -t none -p -O raw disk.qcow2 out.raw -o preallocation=falloc", Progress, &["out.raw"], CDI),
    row("convert -t none -p -O raw stream.vmdk out.raw", Progress, &["out.raw"], CDI),
    row("convert -t none -p -O raw disk.vdi out.raw", Progress, &["out.raw"], CDI),
    row("convert -t none -p -O raw comp.qcow2 out.raw", Progress, &["out.raw"], CDI),
    row("info --output=json disk.qcow2", Json, &[], CDI),
    row(r#"info --output=json 'json:{"driver":"qcow2","file":{"driver":"file","filename":"disk.qcow2"}}'"#, Json, &[], CDI),
    row(r#"info --output=json 'json: {"file.driver": "file", "file.filename": "disk.vdi"}'"#, Json, &[], CDI),
    row("resize -f raw disk.raw 16M", Exact, &["disk.raw"], CDI),
    row("create -f raw out.raw 16M", Exact, &["out.raw"], CDI),
    row("create -f raw out.raw 16M -o preallocation=falloc", Exact, &["out.raw"], CDI),
    // OpenStack.
    row("info disk.qcow2 --force-share --output=json", Json, &[], NOVA_INFO),
    row("info -f qcow2 --output=json --force-share top.qcow2", Json, &[], NOVA_INFO),
    row("convert -t none -O raw -f qcow2 disk.qcow2 out.raw", Code, &["out.raw"], NOVA_CONVERT),
    row("convert -t none -O qcow2 -f raw -c disk.raw out.qcow2", Code, &["out.qcow2"], NOVA_CONVERT),
    row("create -f qcow2 -o backing_file=base.qcow2,backing_fmt=qcow2 out.qcow2", Exact, &["out.qcow2"], "OpenStack Nova nova/virt/libvirt/utils.py create_cow_image"),
    row("resize top.qcow2 16M", Exact, &["top.qcow2"], "OpenStack Nova nova/virt/disk/api.py extend"),
    row("info --output=json --force-share disk.vmdk", Json, &[], CINDER_INFO),
    row("info --output=json --force-share stream.vmdk", Json, &[], CINDER_INFO),
    row("convert -O raw disk.qcow2 out.raw -t none -f qcow2", Code, &["out.raw"], CINDER_CONVERT),
    row("convert -O vmdk disk.raw out.vmdk -o subformat=streamOptimized -t none -f raw", Code, &["out.vmdk"], CINDER_CONVERT),
    row("convert -O qcow2 disk.raw out.qcow2 -t none -f raw -c", Code, &["out.qcow2"], CINDER_CONVERT),
    row("info -f qcow2 --output=json disk.qcow2", Json, &[], GLANCE),
    row("info --output json disk.vdi", Json, &[], GLANCE),
    row("convert -f qcow2 -O raw disk.qcow2 out.raw", Code, &["out.raw"], GLANCE),
    // Proxmox: into an allocated volume, progress parsed with \((\S+)\/100\%\).
    row("convert -p -n -f qcow2 -O raw disk.qcow2 target.raw", Progress, &["target.raw"], PROXMOX),
    row("convert -p -n -T none -r 4096K -f raw -O raw disk.raw target.raw", Progress, &["target.raw"], PROXMOX),
    row("convert -p -n -t none -f vmdk -O raw disk.vmdk target.raw", Progress, &["target.raw"], PROXMOX),
    row("convert -p -n -f raw --target-image-opts disk.raw driver=qcow2,discard-no-unref=true,file.driver=file,file.filename=target.qcow2", Progress, &["target.qcow2"], PROXMOX),
    row("convert -p -n -l snapshot.name=snap1 -f qcow2 -O raw snap.qcow2 target.raw", Progress, &["target.raw"], PROXMOX),
    // Packer, diskimage-builder, cloud images.
    row("create -f qcow2 out.qcow2 16M", Exact, &["out.qcow2"], PACKER),
    row("resize -f qcow2 disk.qcow2 16M", Exact, &["disk.qcow2"], PACKER),
    row("convert -c -O qcow2 disk.qcow2 out.qcow2", Code, &["out.qcow2"], PACKER),
    row("create -f qcow2 -b base.qcow2 -F qcow2 out.qcow2 16M", Exact, &["out.qcow2"], "Packer use_backing_file; cloud-image overlay scripts"),
    row("convert -f raw -O qcow2 -o compat=0.10 disk.raw out.qcow2", Code, &["out.qcow2"], "diskimage-builder disk-image-create (qemu-img convert $QEMU_IMG_OPTIONS -f raw -O qcow2)"),
    row("convert -c -f raw -O qcow2 -o compat=1.1 disk.raw out.qcow2", Code, &["out.qcow2"], "diskimage-builder disk-image-create with compression"),
    row("convert -p -f vmdk -O raw disk.vmdk out.raw", Progress, &["out.raw"], "VMware → KVM migration scripts (virt-v2v-style wrappers)"),
    row("convert -p -O qcow2 disk.vdi out.qcow2", Progress, &["out.qcow2"], "VirtualBox → KVM how-tos"),
    row("convert -f qcow2 -O raw disk.qcow2 out.img", Code, &["out.img"], IMAGE_GUIDE),
    row("convert -f vmdk -O qcow2 disk.vmdk out.qcow2", Code, &["out.qcow2"], IMAGE_GUIDE),
    row("convert -f raw -O vmdk -o subformat=streamOptimized disk.raw out.vmdk", Code, &["out.vmdk"], "AWS VM Import/Export: streamOptimized VMDK"),
    row("convert -O vdi disk.qcow2 out.vdi", Code, &["out.vdi"], "VirtualBox documentation: qcow2 to VDI"),
    row("convert -O vmdk -o adapter_type=lsilogic,subformat=monolithicSparse disk.qcow2 out.vmdk", Code, &["out.vmdk"], "VMware Workstation/ESXi import how-tos"),
    // qemu-img's documentation: every command and option.
    row("info disk.qcow2", InfoLines, &[], DOCS),
    row("info disk.raw", Exact, &[], DOCS),
    row("info top.qcow2", Exact, &[], DOCS),
    row("info --backing-chain top.qcow2", Exact, &[], DOCS),
    row("info --backing-chain --output=json top.qcow2", Json, &[], DOCS),
    row("info disk.vdi", InfoLines, &[], DOCS),
    row("info disk.vmdk", Exact, &[], DOCS),
    row("info --image-opts driver=qcow2,file.driver=file,file.filename=disk.qcow2", InfoLines, &[], DOCS),
    row("info nonexistent.qcow2", Error, &[], DOCS),
    row("info -f qcow2 disk.raw", Error, &[], DOCS),
    row("map top.qcow2", Exact, &[], DOCS),
    row("map --output=json top.qcow2", Exact, &[], DOCS),
    row("map --output=json disk.raw", Exact, &[], DOCS),
    row("map --output=json disk.vmdk", Exact, &[], DOCS),
    row("map --output=json disk.vdi", Exact, &[], DOCS),
    row("map --output=json comp.qcow2", Exact, &[], DOCS),
    row("map comp.qcow2", Error, &[], DOCS),
    row("map --output=json --start-offset 1M --max-length 4M disk.raw", Exact, &[], DOCS),
    row("compare disk.raw disk.qcow2", Exact, &[], DOCS),
    row("compare disk.raw other.raw", Exact, &[], DOCS),
    row("compare -p disk.raw other.raw", Progress, &[], DOCS),
    row("compare -p disk.qcow2 disk.vdi", Progress, &[], DOCS),
    row("compare -s disk.raw disk.qcow2", Exact, &[], DOCS),
    row("compare -s disk.qcow2 out-of-disk.qcow2", Exact, &[], DOCS),
    row("compare -s -f qcow2 -F qcow2 disk.qcow2 disk.qcow2", Exact, &[], DOCS),
    row("compare -q disk.raw other.raw", Exact, &[], DOCS),
    row("compare -T none -U disk.vmdk disk.vdi", Exact, &[], DOCS),
    row("check disk.qcow2", Exact, &[], DOCS),
    row("check --output=json disk.qcow2", Json, &[], DOCS),
    row("check -r all disk.qcow2", Exact, &["disk.qcow2"], DOCS),
    row("check -r leaks -T writeback disk.qcow2", Exact, &["disk.qcow2"], DOCS),
    row("check disk.vdi", Exact, &[], DOCS),
    row("check disk.raw", Exact, &[], DOCS),
    row("measure -O qcow2 --size 16M", Exact, &[], DOCS),
    row("measure -O qcow2 disk.raw", Exact, &[], DOCS),
    row("measure --output=json -O raw disk.qcow2", Json, &[], DOCS),
    row("create -f qcow2 -o size=16M out.qcow2", Exact, &["out.qcow2"], DOCS),
    row("create -f qcow2 -o cluster_size=128k,lazy_refcounts=on out.qcow2 16M", Exact, &["out.qcow2"], DOCS),
    row("create -f vmdk out.vmdk 16M", Exact, &["out.vmdk"], DOCS),
    row("create -f vdi out.vdi 16M", Exact, &["out.vdi"], DOCS),
    row("create -f qcow2 -o help", Code, &[], DOCS),
    row("resize --shrink disk.qcow2 4M", Exact, &["disk.qcow2"], DOCS),
    row("resize disk.qcow2 4M", Exact, &["disk.qcow2"], DOCS),
    row("resize -f raw --preallocation=falloc disk.raw +8M", Exact, &["disk.raw"], DOCS),
    row("resize -f raw --preallocation=full disk.raw 12M", Exact, &["disk.raw"], DOCS),
    row("convert -S 0 -O raw disk.qcow2 out.raw", Code, &["out.raw"], DOCS),
    row("convert -S 0 -O qcow2 disk.raw out.qcow2", Code, &["out.qcow2"], DOCS),
    row("convert -S 64k -O qcow2 disk.raw out.qcow2", Code, &["out.qcow2"], DOCS),
    row("convert -m 4 -W -O qcow2 disk.raw out.qcow2", Code, &["out.qcow2"], DOCS),
    row("convert --salvage -O raw disk.qcow2 out.raw", Code, &["out.raw"], DOCS),
    row("convert -C -f raw -O raw disk.raw out.raw", Code, &["out.raw"], DOCS),
    row("convert -C -c -O qcow2 disk.raw out.qcow2", Error, &[], DOCS),
    row("convert --bitmaps -O qcow2 disk.qcow2 out.qcow2", Code, &["out.qcow2"], DOCS),
    row("convert --bitmaps -O raw disk.qcow2 out.raw", Error, &[], DOCS),
    row("convert -O raw disk.raw disk.qcow2 out.raw", Code, &["out.raw"], DOCS),
    row("convert -p -O qcow2 disk.vmdk disk.raw out.qcow2", Progress, &["out.qcow2"], DOCS),
    row("convert --image-opts -O raw driver=qcow2,file.filename=disk.qcow2 out.raw", Code, &["out.raw"], DOCS),
    row("convert -B base.qcow2 -F qcow2 -O qcow2 top.qcow2 out.qcow2", Code, &["out.qcow2"], DOCS),
    row("convert -l snap1 -O qcow2 snap.qcow2 out.qcow2", Code, &["out.qcow2"], DOCS),
    row("convert -p -c -O qcow2 disk.raw out.qcow2", Progress, &["out.qcow2"], DOCS),
    row("convert -p -S 0 -O qcow2 disk.qcow2 out.qcow2", Progress, &["out.qcow2"], DOCS),
    row("convert -t bogus -O raw disk.raw out.raw", Error, &[], DOCS),
    row("convert -T bogus -O raw disk.raw out.raw", Error, &[], DOCS),
    row("convert -m 17 -O raw disk.raw out.raw", Error, &[], DOCS),
    row("convert -S 100 -O raw disk.raw out.raw", Error, &[], DOCS),
    row("dd -f raw -O raw bs=1M count=4 if=disk.raw of=out.raw", Exact, &["out.raw"], DOCS),
    row("dd -O qcow2 bs=64k skip=16 if=disk.qcow2 of=out.qcow2", Exact, &["out.qcow2"], DOCS),
    row("dd bs=1M skip=2 count=6 if=disk.vmdk of=out.raw", Exact, &["out.raw"], DOCS),
    row("dd bs=1M skip=100 if=disk.raw of=out.raw", Error, &["out.raw"], DOCS),
    row("dd bs=0 if=disk.raw of=out.raw", Error, &[], DOCS),
    row("bench -c 100 -d 4 disk.qcow2", FirstLine, &[], DOCS),
    row("bench -c 100 -s 64k -S 128k -o 1M disk.vdi", FirstLine, &[], DOCS),
    row("bench -w -f raw -c 50 -s 64k --pattern=7 disk.raw", FirstLine, &["disk.raw"], DOCS),
    // VHD (qemu's vpc): CDI imports it; Azure takes a fixed VHD of a whole-MiB size.
    row("convert -t none -p -O raw disk.vhd out.raw", Progress, &["out.raw"], CDI),
    row("info --output=json disk.vhd", Json, &[], CDI),
    row("info -f vpc disk.vhd", InfoLines, &[], DOCS),
    row("map --output=json disk.vhd", Exact, &[], DOCS),
    row("compare disk.raw disk.vhd", Exact, &[], DOCS),
    row("convert -f raw -O vpc -o subformat=fixed,force_size=on disk.raw out.vhd", Code, &["out.vhd"], AZURE),
    row("convert -O vpc disk.qcow2 out.vhd", Code, &["out.vhd"], DOCS),
    // VHDX (Hyper-V).
    row("info --output=json disk.vhdx", Json, &[], CDI),
    row("compare disk.qcow2 disk.vhdx", Exact, &[], DOCS),
    row("convert -O vhdx -o subformat=dynamic disk.qcow2 out.vhdx", Code, &["out.vhdx"], IMAGE_GUIDE),
    // The image-changing commands (tests/qemu_ops.rs has more of them, with their own
    // fixtures, and tests/qemu_ops_safety.rs kills them midway).
    row("rebase -p -b '' top.qcow2", ProgressPatterns, &["top.qcow2"], FDROID),
    row("rebase -u -b disk.qcow2 top.qcow2 -F qcow2", Exact, &["top.qcow2"], CINDER_REBASE),
    row("commit top.qcow2", Exact, &["top.qcow2", "base.qcow2"], CINDER_COMMIT),
    row("commit -p top.qcow2", ProgressPatterns, &["top.qcow2", "base.qcow2"], OVIRT_COMMIT),
    row("snapshot -c vzdump disk.qcow2", Exact, &["disk.qcow2"], PVE_SNAPSHOT),
    row("snapshot -a snap1 snap.qcow2", Exact, &["snap.qcow2"], PVE_SNAPSHOT),
    row("snapshot -d snap1 snap.qcow2", Exact, &["snap.qcow2"], PVE_SNAPSHOT),
    row("snapshot -a nope snap.qcow2", Error, &["snap.qcow2"], DOCS),
    row("snapshot -l snap.qcow2", FirstLine, &[], DOCS),
    row("amend -f qcow2 -o compat=0.10 disk.qcow2", Exact, &["disk.qcow2"], DOCS),
    row("amend -o lazy_refcounts=on top.qcow2", Exact, &["top.qcow2"], DOCS),
    row("bitmap --add disk.qcow2 bm1", Exact, &["disk.qcow2"], DOCS),
];

/// Makes the fixtures in `dir` with qemu-img and qemu-io.
fn fixtures(dir: &Path) {
    let p = |n: &str| dir.join(n).to_string_lossy().into_owned();
    let disk = p("disk.raw");
    qemu_img(&["create", "-q", "-f", "raw", &disk, "8M"]);
    qemu_io(&[
        "-f",
        "raw",
        "-c",
        "write -P 0x11 0 1M",
        "-c",
        "write -P 0x22 3M 512k",
        "-c",
        "write -P 0x33 7M 1M",
        &disk,
    ]);
    for (name, args) in [
        ("disk.qcow2", &["-O", "qcow2"][..]),
        ("disk.vmdk", &["-O", "vmdk"]),
        (
            "stream.vmdk",
            &["-O", "vmdk", "-o", "subformat=streamOptimized"],
        ),
        ("disk.vdi", &["-O", "vdi"]),
        ("disk.vhd", &["-O", "vpc"]),
        ("disk.vhdx", &["-O", "vhdx"]),
        ("comp.qcow2", &["-c", "-O", "qcow2"]),
        ("snap.qcow2", &["-O", "qcow2"]),
    ] {
        let mut a = vec!["convert", "-f", "raw"];
        a.extend_from_slice(args);
        let out = p(name);
        a.push(&disk);
        a.push(&out);
        qemu_img(&a);
    }
    qemu_img(&["snapshot", "-c", "snap1", &p("snap.qcow2")]);
    qemu_io(&["-c", "write -P 0x44 0 64k", &p("snap.qcow2")]);
    std::fs::copy(&disk, p("other.raw")).unwrap();
    qemu_io(&["-f", "raw", "-c", "write -P 0x55 5000 1", &p("other.raw")]);
    qemu_img(&["create", "-q", "-f", "qcow2", &p("base.qcow2"), "8M"]);
    qemu_io(&["-c", "write -P 0x66 0 2M", &p("base.qcow2")]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &p("top.qcow2"),
    ]);
    qemu_io(&[
        "-c",
        "write -P 0x77 4M 1M",
        "-c",
        "write -z 1M 64k",
        &p("top.qcow2"),
    ]);
    qemu_img(&["create", "-q", "-f", "raw", &p("target.raw"), "8M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", &p("target.qcow2"), "8M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &p("out-of-disk.qcow2"),
        "16M",
    ]);
}

/// Splits a row's line into arguments; `'…'` keeps spaces.
fn split(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                any = true;
            }
            ' ' if !quoted => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            c => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Copies the fixtures into `to`, keeping holes (so that disk sizes agree).
fn copy_fixtures(from: &Path, to: &Path) {
    let o = Command::new("cp")
        .args(["-a", "--sparse=always"])
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
}

fn run_in(dir: &Path, program: &str, args: &[String]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// The progress updates in `out` (the `\r`-ended pieces), and the rest of the text.
fn progress_updates(out: &str) -> (Vec<String>, String) {
    let mut updates = Vec::new();
    let mut rest = String::new();
    for piece in out.split_inclusive(['\r', '\n']) {
        let t = piece.trim_end_matches(['\r', '\n']);
        if t.starts_with("    (") && t.ends_with("/100%)") {
            updates.push(t.to_string());
        } else if !t.is_empty() {
            rest.push_str(t);
            rest.push('\n');
        }
    }
    (updates, rest)
}

/// CDI's pattern `\((\d?\d\.\d\d)\/100%\)`: the value if `line` matches it.
fn cdi_match(line: &str) -> Option<&str> {
    let i = line.find('(')?;
    let v = &line[i + 1..];
    let end = v.find("/100%)")?;
    let num = &v[..end];
    let (a, b) = num.split_once('.')?;
    let ok = (1..=2).contains(&a.len())
        && b.len() == 2
        && a.chars().chain(b.chars()).all(|c| c.is_ascii_digit());
    ok.then_some(num)
}

/// Proxmox's pattern `\((\S+)\/100\%\)`.
fn proxmox_match(line: &str) -> Option<&str> {
    let i = line.find('(')?;
    let v = &line[i + 1..];
    let end = v.find("/100%)")?;
    let num = &v[..end];
    (!num.is_empty() && !num.chars().any(char::is_whitespace)).then_some(num)
}

/// Keys only imgconv prints (qemu's parsers do not read them).
const IMGCONV_ONLY: &[&str] = &[
    "references",
    "format-details",
    "compression",
    "archive-member",
];

/// `a` (qemu-img's) and `b` (imgconv's) agree: same keys and values, imgconv's own keys aside.
fn json_agrees(a: &Value, b: &Value, at: &str) -> Result<(), String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let kx: Vec<&String> = x.keys().collect();
            let ky: Vec<&String> = y
                .keys()
                .filter(|k| !IMGCONV_ONLY.contains(&k.as_str()))
                .collect();
            let (mut sx, mut sy) = (kx.clone(), ky.clone());
            sx.sort();
            sy.sort();
            if sx != sy {
                return Err(format!("{at}: keys {sx:?} vs {sy:?}"));
            }
            for k in kx {
                json_agrees(&x[k], &y[k], &format!("{at}.{k}"))?;
            }
            Ok(())
        }
        (Value::Array(x), Value::Array(y)) => {
            if x.len() != y.len() {
                return Err(format!("{at}: {} vs {} items", x.len(), y.len()));
            }
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                json_agrees(p, q, &format!("{at}[{i}]"))?;
            }
            Ok(())
        }
        _ if a == b => Ok(()),
        _ => Err(format!("{at}: {a} vs {b}")),
    }
}

/// The human `info` lines scripts grep.
fn info_lines(s: &str) -> Vec<&str> {
    s.lines()
        .filter(|l| {
            [
                "image:",
                "file format:",
                "virtual size:",
                "disk size:",
                "cluster_size:",
                "backing file:",
                "backing file format:",
                "cleanly shut down:",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        })
        .collect()
}

/// The fields of `qemu-img info --output=json` that describe an output image.
fn image_facts(path: &Path) -> Value {
    let i = qemu_info(path);
    let fs = &i["format-specific"]["data"];
    serde_json::json!({
        "format": i["format"],
        "virtual-size": i["virtual-size"],
        "cluster-size": i["cluster-size"],
        "backing-filename": i["backing-filename"],
        "backing-filename-format": i["backing-filename-format"],
        "dirty-flag": i["dirty-flag"],
        "compat": fs["compat"],
        "lazy-refcounts": fs["lazy-refcounts"],
        "refcount-bits": fs["refcount-bits"],
        "compression-type": fs["compression-type"],
        "create-type": fs["create-type"],
        "extents": fs["extents"].as_array().map(|e| e.len()),
    })
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// Runs one row; returns what disagrees.
fn check_row(template: &Path, r: &Row) -> Result<(), String> {
    let (dq, di) = (scratch(), scratch());
    copy_fixtures(template, dq.path());
    copy_fixtures(template, di.path());
    let args = split(r.line);
    let q = run_in(dq.path(), "qemu-img", &args);
    let i = run_in(di.path(), imgconv_bin(), &args);
    let (qo, io) = (
        String::from_utf8_lossy(&q.stdout),
        String::from_utf8_lossy(&i.stdout),
    );
    let (qe, ie) = (
        String::from_utf8_lossy(&q.stderr),
        String::from_utf8_lossy(&i.stderr),
    );
    let show = || format!("\n--- qemu-img:\n{qo}{qe}\n--- imgconv:\n{io}{ie}");
    if q.status.code() != i.status.code() {
        return Err(format!(
            "exit code {:?} vs {:?}{}",
            q.status.code(),
            i.status.code(),
            show()
        ));
    }
    match r.out {
        Code => {}
        Exact => {
            if qo != io {
                return Err(format!("stdout differs{}", show()));
            }
        }
        Json => {
            let a: Value = serde_json::from_str(&qo).map_err(|e| format!("qemu JSON: {e}"))?;
            let b: Value =
                serde_json::from_str(&io).map_err(|e| format!("imgconv JSON: {e}{}", show()))?;
            json_agrees(&a, &b, "").map_err(|e| format!("{e}{}", show()))?;
        }
        InfoLines => {
            if info_lines(&qo) != info_lines(&io) {
                return Err(format!("info lines differ{}", show()));
            }
        }
        Progress | ProgressPatterns => {
            let (uq, rq) = progress_updates(&qo);
            let (ui, ri) = progress_updates(&io);
            if ui.is_empty() {
                return Err(format!("no progress lines{}", show()));
            }
            for u in &ui {
                let p = proxmox_match(u).ok_or(format!("Proxmox's pattern misses {u:?}"))?;
                // CDI's pattern has room for two integer digits: 100.00 never matches it,
                // from qemu-img either.
                if p != "100.00" && cdi_match(u) != Some(p) {
                    return Err(format!("CDI's pattern misses {u:?}"));
                }
            }
            if r.out == Progress && uq != ui {
                return Err(format!("progress updates differ:\n{uq:?}\n{ui:?}"));
            }
            if r.out == ProgressPatterns
                && ui.last().map(String::as_str) != Some("    (100.00/100%)")
            {
                return Err(format!("progress does not end at 100 %: {ui:?}"));
            }
            if rq != ri {
                return Err(format!("text besides progress differs{}", show()));
            }
        }
        FirstLine => {
            if qo.lines().next() != io.lines().next() {
                return Err(format!("first line differs{}", show()));
            }
        }
        Error => {
            let a = qe.lines().next().unwrap_or("").replacen("qemu-img:", "", 1);
            let b = ie.lines().next().unwrap_or("").replacen("imgconv:", "", 1);
            if a != b || qo != io {
                return Err(format!("message differs{}", show()));
            }
        }
    }
    if q.status.success() {
        for w in r.writes {
            let (a, b) = (dq.path().join(w), di.path().join(w));
            // qemu probes a fixed VHD as raw (its footer, with a time stamp and a UUID,
            // would then differ): name the format.
            let c = if w.ends_with(".vhd") {
                run(
                    "qemu-img",
                    &["compare", "-f", "vpc", "-F", "vpc", s(&a), s(&b)],
                )
            } else {
                run("qemu-img", &["compare", s(&a), s(&b)])
            };
            if !c.status.success() {
                return Err(format!(
                    "{w}: contents differ: {}{}",
                    String::from_utf8_lossy(&c.stdout),
                    String::from_utf8_lossy(&c.stderr)
                ));
            }
            let (fa, fb) = (image_facts(&a), image_facts(&b));
            if fa != fb {
                return Err(format!("{w}: info {fa} vs {fb}"));
            }
            // As sparse or as allocated as qemu-img's (compression levels aside).
            let (sa, sb) = (allocated(&a), allocated(&b));
            if sb > sa + sa / 4 + (256 << 10) || sa > sb + sb / 4 + (256 << 10) {
                return Err(format!(
                    "{w}: {sa} bytes allocated by qemu-img, {sb} by imgconv"
                ));
            }
            if fa["format"] == "qcow2" {
                assert_qemu_check_clean(&b);
            }
        }
    }
    Ok(())
}

#[test]
fn command_lines_behave_as_with_qemu_img() {
    let template = scratch();
    fixtures(template.path());
    let mut failures = Vec::new();
    for r in ROWS {
        if let Err(e) = check_row(template.path(), r) {
            failures.push(format!("`{}` ({}): {e}", r.line, r.from));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} lines disagree:\n\n{}",
        failures.len(),
        ROWS.len(),
        failures.join("\n\n")
    );
}

#[test]
fn patterns_of_importers() {
    assert_eq!(cdi_match("    (47.06/100%)"), Some("47.06"));
    assert_eq!(cdi_match("    (100.00/100%)"), None);
    assert_eq!(proxmox_match("    (100.00/100%)"), Some("100.00"));
    assert_eq!(proxmox_match("    ( 1/100%)"), None);
    assert_eq!(
        split(r#"info 'json: {"a": 1}' x"#),
        ["info", r#"json: {"a": 1}"#, "x"]
    );
}

/// Proxmox's qemu-img has `dd -n … osize=`, which it clones EFI disks with; upstream
/// qemu-img refuses them, so they are checked against the result, not against qemu-img.
#[test]
fn proxmox_dd_into_an_existing_volume() {
    let d = scratch();
    let (src, dst) = (d.path().join("efi.raw"), d.path().join("vol.raw"));
    make_raw(&src, 528 << 10, &[(0, 4096, 9), (300 << 10, 8192, 3)]);
    qemu_img(&["create", "-q", "-f", "raw", s(&dst), "4M"]);
    qemu_io(&["-f", "raw", "-c", "write -P 0x42 0 4M", s(&dst)]);
    let osize = (528u64 << 10).to_string();
    let osize_arg = format!("osize={osize}");
    let (i, o) = (format!("if={}", s(&src)), format!("of={}", s(&dst)));
    imgconv(&[
        "dd", "-n", "-f", "raw", "-O", "raw", "bs=1M", &osize_arg, &i, &o,
    ]);
    let got = std::fs::read(&dst).unwrap();
    assert_eq!(got.len(), 4 << 20, "-n keeps the volume's size");
    assert!(got[..528 << 10] == std::fs::read(&src).unwrap()[..]);
    assert!(got[528 << 10..].iter().all(|&b| b == 0x42));
}

/// `--object secret` (keys for encrypted images) is refused with an error naming it;
/// qemu-img accepts an unused one, imgconv reads no encrypted image at all.
#[test]
fn secret_objects_are_refused() {
    let d = scratch();
    let src = d.path().join("a.raw");
    make_raw(&src, 1 << 20, &[(0, 4096, 1)]);
    let out = d.path().join("b.raw");
    let o = imgconv_out(&[
        "convert",
        "--object",
        "secret,id=sec0,data=123456",
        "-O",
        "raw",
        s(&src),
        s(&out),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("unsupported feature") && e.contains("secret"),
        "{e}"
    );
    assert!(!out.exists());
}
