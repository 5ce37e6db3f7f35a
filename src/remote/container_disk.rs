//! A KubeVirt containerDisk as an OCI image layout: one uncompressed layer holding
//! `/disk/` and `/disk/disk.img` (owner 107:107, as KubeVirt's `qemu` user expects), an
//! image config naming that layer, a manifest, and `index.json` tagging the manifest.
//!
//! Blobs are content-addressed files, written under a temporary name and renamed to
//! their digest; `index.json` is replaced last (temporary name, then rename), so an
//! interrupted write never leaves a tag pointing at a half-written image.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Media types of the OCI image spec.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Uncompressed layer.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Docker's manifest list (read only).
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker's image manifest (read only).
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// The annotation that tags a manifest in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// The owner KubeVirt runs QEMU as.
const KUBEVIRT_UID: u64 = 107;

/// A blob in a layout: `(digest "sha256:…", size, media type)`.
#[derive(Debug, Clone)]
pub struct Blob {
    /// `sha256:HEX`.
    pub digest: String,
    /// Bytes.
    pub size: u64,
    /// Media type.
    pub media_type: &'static str,
}

impl Blob {
    /// The descriptor of the blob.
    pub fn descriptor(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }
}

/// Path of the blob `digest` in the layout at `dir`.
pub fn blob_path(dir: &Path, digest: &str) -> Result<PathBuf> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| Error::corrupt("oci", "descriptor", 0, format!("bad digest {digest:?}")))?;
    Ok(dir.join("blobs").join("sha256").join(hex))
}

/// Writes bytes computed by `fill` as a blob of the layout at `dir`.
fn write_blob(
    dir: &Path,
    media_type: &'static str,
    fill: impl FnOnce(&mut HashingWriter<File>) -> Result<()>,
) -> Result<Blob> {
    let blobs = dir.join("blobs").join("sha256");
    std::fs::create_dir_all(&blobs).map_err(|e| Error::io(&blobs, e))?;
    let tmp = blobs.join(format!(
        ".tmp-{}-{:08x}",
        std::process::id(),
        crate::random::u32()
    ));
    let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    crate::io::output::register_temporary(&tmp);
    let mut w = HashingWriter {
        inner: std::io::BufWriter::with_capacity(1 << 20, file),
        hash: Sha256::new(),
        len: 0,
    };
    let r = fill(&mut w).and_then(|()| {
        w.inner.flush().map_err(|e| Error::io(&tmp, e))?;
        let digest = format!("sha256:{:x}", w.hash.clone().finalize());
        let dst = blob_path(dir, &digest)?;
        std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
        Ok(Blob {
            digest,
            size: w.len,
            media_type,
        })
    });
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    crate::io::output::unregister_temporary(&tmp);
    r
}

/// A writer that hashes (sha256) and counts what passes.
pub struct HashingWriter<W: Write> {
    inner: std::io::BufWriter<W>,
    hash: Sha256,
    len: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A ustar header block for `name` (a directory when `size` is `None`), owned by
/// 107:107. Sizes from 8 GiB up use GNU's base-256 encoding, which tar and Go's
/// archive/tar (containerd, the registry tools) read.
pub fn tar_header(name: &str, size: Option<u64>, mtime: u64) -> Result<[u8; 512]> {
    let mut h = [0u8; 512];
    if name.len() > 100 {
        return Err(Error::invalid(format!("tar member name too long: {name}")));
    }
    h[..name.len()].copy_from_slice(name.as_bytes());
    let octal = |field: &mut [u8], v: u64| {
        let s = format!("{:0width$o}\0", v, width = field.len() - 1);
        field.copy_from_slice(s.as_bytes());
    };
    let (mode, typeflag) = match size {
        None => (0o555, b'5'),
        Some(_) => (0o444, b'0'),
    };
    octal(&mut h[100..108], mode);
    octal(&mut h[108..116], KUBEVIRT_UID);
    octal(&mut h[116..124], KUBEVIRT_UID);
    let size = size.unwrap_or(0);
    if size < 1 << 33 {
        octal(&mut h[124..136], size);
    } else {
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
    }
    octal(&mut h[136..148], mtime);
    h[156] = typeflag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    Ok(h)
}

/// The `(os, architecture)` an image config records for this build's target.
fn platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    };
    ("linux", arch)
}

/// Writes a containerDisk holding the file `disk` as `/disk/disk.img` into the layout
/// at `dir` (created if needed) and tags it `tag`. Returns the manifest blob.
pub fn write_layout(dir: &Path, disk: &Path, tag: &str) -> Result<Blob> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mtime = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let len = std::fs::metadata(disk)
        .map_err(|e| Error::io(disk, e))?
        .len();
    let layer = write_blob(dir, OCI_LAYER_TAR, |w| {
        let io = |e| Error::io(disk, e);
        w.write_all(&tar_header("disk/", None, mtime)?)
            .map_err(io)?;
        w.write_all(&tar_header("disk/disk.img", Some(len), mtime)?)
            .map_err(io)?;
        let mut f = File::open(disk).map_err(io)?;
        let copied = std::io::copy(&mut f, w).map_err(io)?;
        if copied != len {
            return Err(Error::Format(format!(
                "{}: changed while it was packed",
                disk.display()
            )));
        }
        let pad = (512 - len % 512) % 512;
        w.write_all(&vec![0u8; pad as usize + 1024]).map_err(io)
    })?;
    let (os, arch) = platform();
    let config = json!({
        "architecture": arch,
        "os": os,
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
        "history": [{"created_by": concat!("imgconv ", env!("CARGO_PKG_VERSION"), " (containerDisk)")}],
    });
    let config = write_json_blob(dir, OCI_CONFIG, &config)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.descriptor()],
    });
    let manifest = write_json_blob(dir, OCI_MANIFEST, &manifest)?;
    tag_manifest(dir, &manifest, tag)?;
    Ok(manifest)
}

fn write_json_blob(dir: &Path, media_type: &'static str, v: &Value) -> Result<Blob> {
    let bytes = serde_json::to_vec(v).map_err(|e| Error::Format(e.to_string()))?;
    write_blob(dir, media_type, |w| {
        w.write_all(&bytes).map_err(|e| Error::io(dir, e))
    })
}

/// Points `tag` in `dir/index.json` at `manifest` (other tags kept), and writes the
/// `oci-layout` marker.
fn tag_manifest(dir: &Path, manifest: &Blob, tag: &str) -> Result<()> {
    let index_path = dir.join("index.json");
    let mut index = match std::fs::read(&index_path) {
        Ok(b) => serde_json::from_slice::<Value>(&b)
            .map_err(|e| Error::corrupt("oci", "index.json", 0, format!("not JSON: {e}")))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            json!({"schemaVersion": 2, "manifests": []})
        }
        Err(e) => return Err(Error::io(&index_path, e)),
    };
    let mut d = manifest.descriptor();
    d["annotations"] = json!({ REF_NAME: tag });
    let list = index["manifests"]
        .as_array_mut()
        .ok_or_else(|| Error::corrupt("oci", "index.json", 0, "no manifests list"))?;
    list.retain(|m| m["annotations"][REF_NAME].as_str() != Some(tag));
    list.push(d);
    let marker = dir.join("oci-layout");
    std::fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)
        .map_err(|e| Error::io(&marker, e))?;
    let tmp = dir.join(format!(".index.json.{}.tmp", std::process::id()));
    let bytes = serde_json::to_vec_pretty(&index).map_err(|e| Error::Format(e.to_string()))?;
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &index_path).map_err(|e| Error::io(&index_path, e))
}

/// Reads the sha256 of a file (to check a local blob before using it in place).
pub fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
    Ok((format!("sha256:{:x}", h.finalize()), len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_headers_parse_back() {
        for size in [0u64, 1000, (1 << 33) - 1, 1 << 33, 10 << 40] {
            let h = tar_header("disk/disk.img", Some(size), 1_700_000_000).unwrap();
            let parsed = crate::io::tar::Header::parse(&h, 0).unwrap().unwrap();
            assert_eq!(parsed.size, size);
        }
        let d = tar_header("disk/", None, 0).unwrap();
        assert!(crate::io::tar::Header::parse(&d, 0).unwrap().is_some());
    }
}
