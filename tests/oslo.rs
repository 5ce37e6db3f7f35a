//! OpenStack's parser of `qemu-img info` (oslo.utils' `QemuImgInfo`, used by Nova,
//! Cinder and Glance) reads imgconv's output to the same values as qemu-img's: the JSON
//! form (`QemuImgInfo(output)`), and the human form through the parser Nova and Cinder
//! used for it (`QemuImgInfo._parse`, kept in oslo.utils).

mod common;

use std::process::Command;

use common::*;

/// Prints one line per image and form: `same` or what differs.
const SCRIPT: &str = r#"
import json, subprocess, sys
from oslo_utils.imageutils import QemuImgInfo

def parsed(tool, form, image):
    out = subprocess.run([tool, 'info', '--output=' + form, image],
                         capture_output=True, text=True, check=True).stdout
    if form == 'json':
        i = QemuImgInfo(out)
        return {k: v for k, v in vars(i).items()}
    return QemuImgInfo()._parse(out)

qemu, imgconv = sys.argv[1], sys.argv[2]
for image in sys.argv[3:]:
    for form in ('json', 'human'):
        a, b = parsed(qemu, form, image), parsed(imgconv, form, image)
        if a == b:
            print(f'{image} {form}: same')
        else:
            print(f'{image} {form}: qemu-img {json.dumps(a, default=str)} imgconv {json.dumps(b, default=str)}')
"#;

#[test]
fn oslo_parses_imgconv_info_as_qemu_img_info() {
    let d = scratch();
    let p = |n: &str| d.path().join(n).to_string_lossy().into_owned();
    let raw = p("disk.raw");
    qemu_img(&["create", "-q", "-f", "raw", &raw, "6M"]);
    qemu_io(&[
        "-f",
        "raw",
        "-c",
        "write -P 1 0 1M",
        "-c",
        "write -P 2 4M 512k",
        &raw,
    ]);
    let mut images = vec!["disk.raw".to_string()];
    for (name, args) in [
        ("disk.qcow2", &["-O", "qcow2"][..]),
        (
            "v2.qcow2",
            &["-O", "qcow2", "-o", "compat=0.10,cluster_size=4k"],
        ),
        (
            "zstd.qcow2",
            &["-c", "-O", "qcow2", "-o", "compression_type=zstd"],
        ),
        ("disk.vmdk", &["-O", "vmdk"]),
        (
            "stream.vmdk",
            &["-O", "vmdk", "-o", "subformat=streamOptimized"],
        ),
        (
            "flat.vmdk",
            &["-O", "vmdk", "-o", "subformat=monolithicFlat"],
        ),
        ("disk.vdi", &["-O", "vdi"]),
        ("static.vdi", &["-O", "vdi", "-o", "static=on"]),
    ] {
        let mut a = vec!["convert", "-f", "raw"];
        a.extend_from_slice(args);
        let out = p(name);
        a.push(&raw);
        a.push(&out);
        qemu_img(&a);
        images.push(name.to_string());
    }
    // An overlay, and an image with an internal snapshot.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "disk.qcow2",
        "-F",
        "qcow2",
        &p("top.qcow2"),
    ]);
    qemu_img(&["snapshot", "-c", "before", &p("disk.qcow2")]);
    images.push("top.qcow2".into());
    let o = Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .arg("qemu-img")
        .arg(imgconv_bin())
        .args(&images)
        .current_dir(d.path())
        .output()
        .expect("python3 runs");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "the parser failed (is oslo.utils installed?):\n{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(out.lines().count(), images.len() * 2, "{out}");
    let differ: Vec<&str> = out.lines().filter(|l| !l.ends_with(": same")).collect();
    assert!(differ.is_empty(), "{}", differ.join("\n"));
}
