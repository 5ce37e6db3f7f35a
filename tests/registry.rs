//! Container registries and OCI layouts against the real tools: a KubeVirt containerDisk
//! made as `docker build` makes one (gzip tar layer, /disk/ owned by 107), pushed by
//! skopeo to a CNCF distribution registry on 127.0.0.1, pulled and converted by
//! imgconv with its digests checked; imgconv's own `oci:` output pushed by skopeo and
//! pulled back identical; pushes to a registry with htpasswd auth.
#![cfg(feature = "http")]

mod common;

use std::path::Path;

use common::servers::Registry;
use common::{imgconv, imgconv_out, make_raw, qemu_img, run_ok, s, scratch};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

fn put_blob(dir: &Path, bytes: &[u8]) -> Value {
    let d = sha(bytes);
    let p = dir.join("blobs/sha256").join(&d[7..]);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, bytes).unwrap();
    json!({"digest": d, "size": bytes.len()})
}

/// An OCI layout tagged `v1` holding one containerDisk per `(arch, qcow2)`: a gzip
/// layer made by GNU tar with `disk/NAME` owned by 107:107; an index when several.
fn kubevirt_layout(dir: &Path, disks: &[(&str, &Path)]) {
    let mut manifests = Vec::new();
    for (i, (arch, disk)) in disks.iter().enumerate() {
        let root = dir.join(format!("root{i}"));
        std::fs::create_dir_all(root.join("disk")).unwrap();
        std::fs::copy(disk, root.join("disk/fedora.qcow2")).unwrap();
        let tar = dir.join(format!("layer{i}.tar"));
        run_ok(
            "tar",
            &[
                "--owner=107",
                "--group=107",
                "--numeric-owner",
                "-C",
                s(&root),
                "-cf",
                s(&tar),
                "disk",
            ],
        );
        let tar_bytes = std::fs::read(&tar).unwrap();
        let gz = {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&tar_bytes).unwrap();
            e.finish().unwrap()
        };
        let mut layer = put_blob(dir, &gz);
        layer["mediaType"] = json!("application/vnd.oci.image.layer.v1.tar+gzip");
        let config = json!({
            "architecture": arch, "os": "linux", "config": {},
            "rootfs": {"type": "layers", "diff_ids": [sha(&tar_bytes)]},
        });
        let mut config_d = put_blob(dir, &serde_json::to_vec(&config).unwrap());
        config_d["mediaType"] = json!("application/vnd.oci.image.config.v1+json");
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config_d, "layers": [layer],
        });
        let mut m = put_blob(dir, &serde_json::to_vec(&manifest).unwrap());
        m["mediaType"] = json!("application/vnd.oci.image.manifest.v1+json");
        m["platform"] = json!({"os": "linux", "architecture": arch});
        manifests.push(m);
    }
    let mut top = if manifests.len() == 1 {
        manifests.pop().unwrap()
    } else {
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        });
        let mut i = put_blob(dir, &serde_json::to_vec(&index).unwrap());
        i["mediaType"] = json!("application/vnd.oci.image.index.v1+json");
        i
    };
    top["annotations"] = json!({"org.opencontainers.image.ref.name": "v1"});
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [top]})).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

fn skopeo(args: &[&str]) -> String {
    let mut a = vec!["--insecure-policy"];
    a.extend(args);
    run_ok("skopeo", &a)
}

/// Two small qcow2 disks with different contents.
fn disks(d: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let mut out = Vec::new();
    for (name, byte) in [("a", 11u8), ("b", 77u8)] {
        let raw = d.join(format!("{name}.raw"));
        make_raw(
            &raw,
            32 << 20,
            &[(1 << 20, 2 << 20, byte), (20 << 20, 4096, byte)],
        );
        let q = d.join(format!("{name}.qcow2"));
        qemu_img(&["convert", "-O", "qcow2", s(&raw), s(&q)]);
        out.push(q);
    }
    let b = out.pop().unwrap();
    (out.pop().unwrap(), b)
}

#[test]
fn skopeo_pushed_container_disk_pulls_with_digests_checked() {
    let dir = scratch();
    let d = dir.path();
    let (a, b) = disks(d);
    let layout = d.join("layout");
    kubevirt_layout(&layout, &[("amd64", &a), ("arm64", &b)]);
    let reg = Registry::start(None);
    let url = reg.url("kubevirt/fedora:v1");
    skopeo(&[
        "copy",
        "--all",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", s(&layout)),
        &url,
    ]);
    // linux/amd64 by default, another platform on request.
    for (platform, want) in [(None, &a), (Some("linux/arm64"), &b)] {
        let out = d.join("out.raw");
        let mut args = vec!["convert", "-O", "raw"];
        if let Some(p) = platform {
            args.extend(["--platform", p]);
        }
        args.extend([url.as_str(), s(&out)]);
        imgconv(&args);
        common::assert_same(&out, want);
        std::fs::remove_file(&out).unwrap();
    }
    let info = imgconv(&["info", "--output=json", &url]);
    assert!(info.contains("disk/fedora.qcow2"), "{info}");
    // The local layout reads the same.
    let o = imgconv_out(&["compare", &format!("oci:{}:v1", s(&layout)), s(&a)]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    // A layer changed in the registry's storage: the digest check fails the
    // conversion and no output is left.
    let m: Value =
        serde_json::from_str(&skopeo(&["inspect", "--raw", "--tls-verify=false", &url])).unwrap();
    let amd64 = m["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["platform"]["architecture"] == "amd64")
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(reg.blob_file(&amd64)).unwrap()).unwrap();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap();
    let blob = reg.blob_file(layer);
    let mut bytes = std::fs::read(&blob).unwrap();
    let n = bytes.len();
    // Inside the deflate data, past the gzip header: the gzip CRC may catch it too,
    // but the digest is checked whatever the compression.
    bytes[n - 20] ^= 0x01;
    std::fs::write(&blob, &bytes).unwrap();
    let out = d.join("bad.raw");
    let o = imgconv_out(&["convert", "-O", "raw", &url, s(&out)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("digest") || err.contains("gzip"), "{err}");
    assert!(!out.exists());
}

#[test]
fn oci_output_is_pushed_by_skopeo_and_pulled_back_identical() {
    let dir = scratch();
    let d = dir.path();
    let (a, _) = disks(d);
    let layout = d.join("ours");
    let target = format!("oci:{}:v1", s(&layout));
    imgconv(&["convert", "-O", "qcow2", s(&a), &target]);
    // The layer: disk/ and disk/disk.img, owned by 107:107.
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let mdigest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(layout.join("blobs/sha256").join(&mdigest[7..])).unwrap(),
    )
    .unwrap();
    let ldigest = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let listing = run_ok(
        "tar",
        &[
            "--numeric-owner",
            "-tvf",
            s(&layout.join("blobs/sha256").join(&ldigest[7..])),
        ],
    );
    assert!(
        listing.contains("107/107") && listing.contains("disk/disk.img"),
        "{listing}"
    );
    let reg = Registry::start(None);
    let url = reg.url("ours/disk:v1");
    skopeo(&["copy", "--dest-tls-verify=false", &target, &url]);
    let back = d.join("back");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &url,
        &format!("oci:{}:v1", s(&back)),
    ]);
    // The same layer came back (skopeo compresses it for the registry: the same
    // bytes once decompressed), and reads as the source.
    let bindex: Value =
        serde_json::from_slice(&std::fs::read(back.join("index.json")).unwrap()).unwrap();
    let bm = bindex["manifests"][0]["digest"].as_str().unwrap();
    let bmanifest: Value =
        serde_json::from_slice(&std::fs::read(back.join("blobs/sha256").join(&bm[7..])).unwrap())
            .unwrap();
    assert_eq!(bmanifest["config"], manifest["config"]);
    let bl = &bmanifest["layers"][0];
    let blob = std::fs::read(
        back.join("blobs/sha256")
            .join(&bl["digest"].as_str().unwrap()[7..]),
    )
    .unwrap();
    let tar = if bl["mediaType"].as_str().unwrap().ends_with("gzip") {
        use std::io::Read;
        let mut v = Vec::new();
        flate2::read::MultiGzDecoder::new(&blob[..])
            .read_to_end(&mut v)
            .unwrap();
        v
    } else {
        blob
    };
    assert_eq!(sha(&tar), ldigest);
    let o = imgconv_out(&["compare", &format!("oci:{}:v1", s(&back)), s(&a)]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let out = d.join("out.qcow2");
    imgconv(&["convert", "-O", "qcow2", &url, s(&out)]);
    common::assert_same(&out, &a);
}

#[test]
fn push_to_a_registry_with_htpasswd_auth() {
    let dir = scratch();
    let d = dir.path();
    let (a, b) = disks(d);
    let reg = Registry::start(Some(("kv", "pa55")));
    let url = reg.url("kv/pushed:v2");
    // Without credentials: the registry's 401, named.
    let o = imgconv_out(&["convert", "-O", "qcow2", s(&a), &url]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("401") || err.contains("credentials"), "{err}");
    imgconv(&["convert", "--creds", "kv:pa55", "-O", "qcow2", s(&a), &url]);
    let inspect = skopeo(&["inspect", "--tls-verify=false", "--creds", "kv:pa55", &url]);
    assert!(inspect.contains("\"Architecture\": \"amd64\""), "{inspect}");
    // Credentials from a docker config.json.
    let cfg = d.join("docker");
    std::fs::create_dir(&cfg).unwrap();
    std::fs::write(
        cfg.join("config.json"),
        format!(
            r#"{{"auths":{{"127.0.0.1:{}":{{"auth":"a3Y6cGE1NQ=="}}}}}}"#,
            reg.port
        ),
    )
    .unwrap();
    let out = d.join("out.raw");
    let o = std::process::Command::new(common::imgconv_bin())
        .env("DOCKER_CONFIG", &cfg)
        .args(["convert", "-O", "raw", &url, s(&out)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    common::assert_same(&out, &a);
    // A second push to the same repository reuses nothing it need not: other disk.
    imgconv(&[
        "convert",
        "--creds",
        "kv:pa55",
        "-O",
        "qcow2",
        s(&b),
        &reg.url("kv/pushed:v3"),
    ]);
    let o = imgconv_out(&[
        "compare",
        "--creds",
        "kv:pa55",
        &reg.url("kv/pushed:v3"),
        s(&b),
    ]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
}

/// A registry that wants bearer tokens (distribution's `auth: token` flow): a tiny
/// test-side server on 127.0.0.1 standing in for both the registry and its token
/// service, serving a layout imgconv wrote. The real registry is tested with htpasswd
/// above; distribution's token mode needs signed JWTs, which this mock does not check.
#[test]
fn bearer_token_flow() {
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    let dir = scratch();
    let d = dir.path();
    let (a, _) = disks(d);
    let layout = d.join("served");
    imgconv(&[
        "convert",
        "-O",
        "qcow2",
        s(&a),
        &format!("oci:{}:v1", s(&layout)),
    ]);
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let mdigest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let scopes = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (scopes2, layout2) = (scopes.clone(), layout.clone());
    let server = std::thread::spawn(move || {
        // Bounded: 40 connections at most; the test's requests need far fewer.
        for conn in listener.incoming().take(40) {
            let Ok(mut conn) = conn else { continue };
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if method == "QUIT" {
                break;
            }
            let mut auth = String::new();
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h
                    .strip_prefix("authorization:")
                    .or(h.strip_prefix("Authorization:"))
                {
                    auth = v.trim().to_string();
                }
            }
            let reply =
                |conn: &mut std::net::TcpStream, status: &str, headers: &str, body: &[u8]| {
                    let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n{headers}\r\n",
                    body.len()
                );
                    if method != "HEAD" {
                        let _ = conn.write_all(body);
                    }
                };
            if let Some(q) = path.strip_prefix("/token?") {
                scopes2.lock().unwrap().push(q.to_string());
                if auth == "Basic a3Y6cGE1NQ==" {
                    reply(
                        &mut conn,
                        "200 OK",
                        "Content-Type: application/json\r\n",
                        br#"{"token":"tok-123"}"#,
                    );
                } else {
                    reply(&mut conn, "401 Unauthorized", "", b"");
                }
                continue;
            }
            if auth != "Bearer tok-123" {
                let h = format!(
                    "WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"mock\",scope=\"repository:kv/disk:pull\"\r\n"
                );
                reply(&mut conn, "401 Unauthorized", &h, b"");
                continue;
            }
            let file = if path.starts_with("/v2/kv/disk/manifests/") {
                Some((
                    mdigest.clone(),
                    "application/vnd.oci.image.manifest.v1+json",
                ))
            } else {
                path.strip_prefix("/v2/kv/disk/blobs/")
                    .map(|dg| (dg.to_string(), "application/octet-stream"))
            };
            match file.and_then(|(dg, ct)| {
                Some((
                    std::fs::read(layout2.join("blobs/sha256").join(dg.get(7..)?)).ok()?,
                    ct,
                ))
            }) {
                Some((body, ct)) => reply(
                    &mut conn,
                    "200 OK",
                    &format!("Content-Type: {ct}\r\n"),
                    &body,
                ),
                None => reply(&mut conn, "404 Not Found", "", b""),
            }
        }
    });
    let url = format!("docker://127.0.0.1:{port}/kv/disk:v1");
    let out = d.join("out.raw");
    let o = imgconv_out(&["convert", "-O", "raw", &url, s(&out)]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "no credentials: the token service says 401"
    );
    assert!(!out.exists());
    imgconv(&["convert", "--creds", "kv:pa55", "-O", "raw", &url, s(&out)]);
    common::assert_same(&out, &a);
    let seen = scopes.lock().unwrap().clone();
    assert!(
        seen.iter().any(
            |q| q.contains("service=mock") && q.contains("scope=repository%3Akv%2Fdisk%3Apull")
        ),
        "{seen:?}"
    );
    let mut stop = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let _ = stop.write_all(b"QUIT / HTTP/1.1\r\n\r\n");
    server.join().unwrap();
}
