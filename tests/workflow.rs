//! End-to-end user journeys across formats.

mod common;
use common::*;

/// The VirtualBox workflow: a compressed qcow2 cloud-style image → VDI and → VMDK
/// (monolithicSparse), each back to raw, identical to the source.
#[test]
fn cloud_qcow2_to_virtualbox_and_back() {
    let d = scratch();
    let raw = d.path().join("cloud.raw");
    make_raw(
        &raw,
        64 << 20,
        &[
            (0, 1 << 20, 1),
            (10 << 20, 3 << 20, 2),
            ((64 << 20) - 65536, 65536, 3),
        ],
    );
    let qcow = d.path().join("cloud.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", s(&raw), s(&qcow)]);

    let vdi = d.path().join("cloud.vdi");
    imgconv(&["convert", "-O", "vdi", s(&qcow), s(&vdi)]);
    let vmdk = d.path().join("cloud.vmdk");
    imgconv_convert("vmdk", "subformat=monolithicSparse", &qcow, &vmdk);
    assert_eq!(qemu_info(&vdi)["format"], "vdi");
    assert_eq!(qemu_info(&vmdk)["format"], "vmdk");
    qemu_img(&["check", s(&vdi)]);
    qemu_img(&["check", s(&vmdk)]);

    for img in [&vdi, &vmdk] {
        let back = d.path().join(format!(
            "{}.raw",
            img.extension().unwrap().to_str().unwrap()
        ));
        imgconv(&["convert", "-O", "raw", s(img), s(&back)]);
        assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&raw).unwrap());
    }
}

/// The shipped sample converts as the README says.
#[test]
fn readme_sample_converts() {
    let d = scratch();
    let sample =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/sample-ext4.qcow2");
    let out = d.path().join("sample.vmdk");
    imgconv(&["convert", "-O", "vmdk", s(&sample), s(&out)]);
    assert_same(&sample, &out);
}
