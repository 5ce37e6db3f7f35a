//! HTTP sources and targets against a real nginx on 127.0.0.1: every format read over
//! range requests (or streamed, when compressed) converts to what qemu-img reads from
//! the same file; a sparse 10 GiB qcow2 costs a few hundred KiB of transfer; uploads
//! with PUT receive exactly what `convert … -` writes.
#![cfg(feature = "http")]

mod common;

use std::path::Path;

use common::servers::{publish, Nginx};
use common::{imgconv, imgconv_out, make_raw, qemu_img, s, scratch};

/// A 64 MiB raw disk with data in a few places.
fn sample_raw(dir: &Path) -> std::path::PathBuf {
    let raw = dir.join("disk.raw");
    make_raw(
        &raw,
        64 << 20,
        &[
            (0, 1 << 20, 1),
            (5 << 20, 3 << 20, 40),
            (33 << 20, 65536, 90),
            ((64 << 20) - 4096, 4096, 200),
        ],
    );
    raw
}

fn sh(cmd: &str) {
    let o = std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn every_format_over_http_reads_as_qemu_img_reads_the_file() {
    let dir = scratch();
    let d = dir.path();
    let raw = sample_raw(d);
    let nginx = Nginx::start();
    let mut cases: Vec<(String, std::path::PathBuf)> = Vec::new();
    for (name, args) in [
        ("disk.qcow2", vec!["-O", "qcow2"]),
        ("disk-zlib.qcow2", vec!["-O", "qcow2", "-c"]),
        ("disk.vmdk", vec!["-O", "vmdk"]),
        (
            "disk-stream.vmdk",
            vec!["-O", "vmdk", "-o", "subformat=streamOptimized"],
        ),
        ("disk.vdi", vec!["-O", "vdi"]),
    ] {
        let p = d.join(name);
        let mut a = vec!["convert"];
        a.extend(args);
        a.extend([s(&raw), s(&p)]);
        qemu_img(&a);
        cases.push((publish(&nginx, &p, name), p));
    }
    // Compressed and archived downloads: streamed, as from a pipe.
    sh(&format!("xz -T0 -c {} > {}/disk.raw.xz", s(&raw), s(d)));
    sh(&format!(
        "gzip -c {}/disk.qcow2 > {}/disk.qcow2.gz",
        s(d),
        s(d)
    ));
    sh(&format!(
        "cp --sparse=always {} {d}/disk.raw-for-tar && cd {d} && mv disk.raw-for-tar disk.raw.orig && \
         mkdir -p t && cp --sparse=always disk.raw.orig t/disk.raw && tar -C t -cSzf disk.tar.gz disk.raw",
        s(&raw),
        d = s(d)
    ));
    for name in ["disk.raw.xz", "disk.qcow2.gz", "disk.tar.gz"] {
        cases.push((publish(&nginx, &d.join(name), name), raw.clone()));
    }
    // An uncompressed tar: its member read in place, with ranges.
    sh(&format!(
        "cd {d} && tar -C t -cSf disk.tar disk.raw",
        d = s(d)
    ));
    cases.push((
        publish(&nginx, &d.join("disk.tar"), "disk.tar"),
        raw.clone(),
    ));

    for (url, local) in &cases {
        let out = d.join("out.raw");
        imgconv(&["convert", "-O", "raw", url, s(&out)]);
        common::assert_same(&out, local);
        // Every reading command takes the URL.
        let o = imgconv_out(&["compare", url, s(local)]);
        assert_eq!(o.status.code(), Some(0), "compare {url}");
        let info = imgconv(&["info", "--output=json", url]);
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(v["virtual-size"], 64 << 20, "{url}");
        let m = imgconv(&["map", "--output=json", url]);
        assert!(m.contains("\"data\": true"), "{url}: {m}");
        let q = imgconv(&["measure", "-O", "qcow2", "--output=json", url]);
        let ql = imgconv(&["measure", "-O", "qcow2", "--output=json", s(local)]);
        let req =
            |j: &str| serde_json::from_str::<serde_json::Value>(j).unwrap()["required"].clone();
        assert_eq!(req(&q), req(&ql), "{url}");
        std::fs::remove_file(&out).unwrap();
    }
    // check reads a remote qcow2, VMDK and VDI in place.
    for name in ["disk.qcow2", "disk.vmdk", "disk.vdi"] {
        let o = imgconv_out(&["check", &nginx.url(name)]);
        assert_eq!(o.status.code(), Some(0), "check {name}: {o:?}");
    }
    // A redirect is followed.
    let out = d.join("moved.raw");
    imgconv(&[
        "convert",
        "-O",
        "raw",
        &nginx.url("moved/disk.vdi"),
        s(&out),
    ]);
    common::assert_same(&out, &raw);
}

#[test]
fn sparse_10_gib_qcow2_converts_after_fetching_little() {
    let dir = scratch();
    let d = dir.path();
    let nginx = Nginx::start();
    let q = d.join("big.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&q), "10G"]);
    common::qemu_io(&[
        "-c",
        "write -P 0x5a 3G 512k",
        "-c",
        "write -P 0x17 7G 512k",
        s(&q),
    ]);
    let url = publish(&nginx, &q, "big.qcow2");
    for fmt in ["qcow2", "raw", "vdi"] {
        nginx.clear_log();
        let out = d.join(format!("out.{fmt}"));
        imgconv(&["convert", "-O", fmt, &url, s(&out)]);
        let sent = nginx.bytes_sent();
        assert!(
            sent < 5 << 20,
            "-O {fmt}: {sent} bytes transferred for 1 MiB of data"
        );
        common::assert_same(&out, &q);
        std::fs::remove_file(&out).unwrap();
        eprintln!("-O {fmt}: {sent} bytes in {} requests", nginx.log().len());
    }
}

#[test]
fn backing_files_resolve_against_the_url_unless_untrusted() {
    let dir = scratch();
    let d = dir.path();
    let nginx = Nginx::start();
    let base = d.join("base.qcow2");
    let top = d.join("top.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&base), "16M"]);
    common::qemu_io(&["-c", "write -P 3 0 1M", s(&base)]);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        "base.qcow2",
        s(&top),
    ]);
    common::qemu_io(&["-c", "write -P 4 8M 1M", s(&top)]);
    publish(&nginx, &base, "img/base.qcow2");
    let url = publish(&nginx, &top, "img/top.qcow2");
    let out = d.join("flat.raw");
    imgconv(&["convert", "-O", "raw", &url, s(&out)]);
    common::assert_same(&out, &top);
    let o = imgconv_out(&["convert", "--untrusted", "-O", "raw", &url, s(&out)]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("untrusted"));
    // A reference to another origin is never followed, trusted or not.
    let evil = d.join("evil.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-u",
        "-b",
        "http://127.0.0.2:9/x.raw",
        s(&evil),
        "16M",
    ]);
    let url = publish(&nginx, &evil, "img/evil.qcow2");
    let o = imgconv_out(&["info", "--backing-chain", &url]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && (err.contains("another origin") || err.contains("protocol")),
        "{err}"
    );
}

#[test]
fn headers_are_sent_and_never_printed() {
    let dir = scratch();
    let d = dir.path();
    let nginx = Nginx::start();
    let raw = sample_raw(d);
    let vdi = d.join("glance.vdi");
    // Glance export with an auth header → VDI for VirtualBox.
    let url = publish(&nginx, &raw, "auth/image-file");
    imgconv(&[
        "convert",
        "--header",
        "X-Auth-Token: s3cret",
        "-O",
        "vdi",
        &url,
        s(&vdi),
    ]);
    common::assert_same(&vdi, &raw);
    let o = imgconv_out(&[
        "convert",
        "--header",
        "X-Auth-Token: wrong-s3cret",
        "-O",
        "raw",
        &format!(
            "http://user:pa55word@127.0.0.1:{}/auth/image-file?sig=k3y",
            nginx.port
        ),
        s(&d.join("x.raw")),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("HTTP 401"), "{err}");
    for secret in ["s3cret", "pa55word", "k3y", "user"] {
        assert!(!err.contains(secret), "{secret} printed: {err}");
    }
    assert!(!d.join("x.raw").exists());
}

#[test]
fn uploads_receive_what_convert_writes() {
    let dir = scratch();
    let d = dir.path();
    let nginx = Nginx::start();
    let raw = sample_raw(d);
    let q = d.join("src.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&raw), s(&q)]);
    // Raw, streamed with Content-Length: exactly the bytes of `convert … -`.
    let stdout = std::process::Command::new(common::imgconv_bin())
        .args(["convert", "-O", "raw", s(&q), "-"])
        .output()
        .unwrap()
        .stdout;
    imgconv(&[
        "convert",
        "-p",
        "-O",
        "raw",
        s(&q),
        &nginx.url("up/disk.raw"),
    ]);
    assert_eq!(
        std::fs::read(nginx.www().join("up/disk.raw")).unwrap(),
        stdout
    );
    // streamOptimized VMDK: chunked while written.
    imgconv(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        s(&q),
        &nginx.url("up/disk.vmdk"),
    ]);
    let up = nginx.www().join("up/disk.vmdk");
    common::assert_same(&up, &raw);
    // qcow2: through a temporary file (in --tmpdir), which is gone afterwards.
    let tmp = d.join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    imgconv(&[
        "convert",
        "--tmpdir",
        s(&tmp),
        "-O",
        "qcow2",
        s(&raw),
        &nginx.url("up/disk.qcow2"),
    ]);
    common::assert_same(&nginx.www().join("up/disk.qcow2"), &raw);
    qemu_img(&["check", s(&nginx.www().join("up/disk.qcow2"))]);
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
    // From one server to another URL, straight through.
    imgconv(&[
        "convert",
        "-O",
        "raw",
        &publish(&nginx, &q, "src.qcow2"),
        &nginx.url("up/copy.raw"),
    ]);
    assert_eq!(
        std::fs::read(nginx.www().join("up/copy.raw")).unwrap(),
        stdout
    );
    // A refused upload: non-zero exit naming the server's status, nothing stored.
    for (url, status) in [
        (nginx.url("ro/disk.raw"), "HTTP 4"),
        (nginx.url("auth/disk.raw"), "HTTP 4"),
    ] {
        for fmt in ["raw", "qcow2"] {
            let o = imgconv_out(&["convert", "-O", fmt, s(&q), &url]);
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{url}: {err}");
            assert!(err.contains(status), "{url} -O {fmt}: {err}");
        }
    }
    assert!(!nginx.www().join("ro").exists());
}

#[test]
fn https_with_a_private_ca_given_by_ca_cert() {
    let dir = scratch();
    let d = dir.path();
    // A private CA and a server certificate for 127.0.0.1 signed by it.
    sh(&format!(
        "cd {d} && openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=imgconv-test-ca \
           -keyout ca.key -out ca.pem 2>/dev/null && \
         openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout srv.key -out srv.csr 2>/dev/null && \
         printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\n' > ext && \
         openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
           -extfile ext -out srv.pem 2>/dev/null",
        d = s(d)
    ));
    let nginx = Nginx::start_with_tls(Some((&d.join("srv.pem"), &d.join("srv.key"))));
    let raw = sample_raw(d);
    let q = d.join("disk.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&raw), s(&q)]);
    publish(&nginx, &q, "disk.qcow2");
    let url = format!("https://127.0.0.1:{}/disk.qcow2", nginx.tls_port.unwrap());
    let out = d.join("out.raw");
    // Not in the system's roots: refused, typed, nothing written.
    let o = imgconv_out(&["convert", "-O", "raw", &url, s(&out)]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&url), "{err}");
    assert!(!out.exists());
    imgconv(&[
        "convert",
        "--ca-cert",
        s(&d.join("ca.pem")),
        "-O",
        "raw",
        &url,
        s(&out),
    ]);
    common::assert_same(&out, &raw);
}
