//! Container images as sources and targets: `docker://REGISTRY/REPO:TAG` (or
//! `@sha256:…`) through the registry HTTP API (CNCF distribution), and `oci:DIR[:TAG]`,
//! an OCI image layout on disk.
//!
//! Reading: the manifest is resolved (an index or manifest list picks `--platform`,
//! default linux/amd64), then the top layer — where a containerDisk keeps its disk —
//! is streamed through its decompressor and tar reader, its sha256 and size checked as
//! it streams (a mismatch fails the read at the end of the layer, before the output is
//! committed). The disk is the file under `/disk/` (or `--member NAME`). An
//! uncompressed layer of a local layout is checked first, then read in place.
//!
//! Auth: anonymous first; a 401 with `WWW-Authenticate: Bearer realm=…` fetches a token
//! from the realm (with the credentials, if any), `Basic` sends the credentials.
//! Credentials come from `--creds USER:PASS`, else the docker `config.json`
//! (`$DOCKER_CONFIG`, else `~/.docker`).
//!
//! Writing: a containerDisk layout ([`super::container_disk`]); `docker://` pushes its
//! blobs (`HEAD`, then `POST` + `PUT` when missing) and its manifest.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::container_disk::{
    self, blob_path, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_LAYER_TAR, OCI_MANIFEST, REF_NAME,
};
use super::{RemoteTarget, SentFn, TempGuard};
use crate::convert::ConvertOptions;
use crate::error::{Error, Result};
use crate::image::{Image, OpenOptions};
use crate::io::compressed::to_io;
use crate::io::http::{status_error, Client, Failure, ResumableBody};
use crate::io::remote::redact;

/// Largest manifest or index accepted.
const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Most layers looked at.
const MAX_LAYERS: usize = 1024;

/// A parsed `docker://` reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]` as written (docker.io for Docker Hub).
    pub registry: String,
    /// `namespace/name`.
    pub repository: String,
    /// Tag or `sha256:…` digest.
    pub reference: String,
}

impl Reference {
    /// Parses `REGISTRY/REPO[:TAG|@DIGEST]` (after `docker://`).
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::invalid(format!("docker://{s}: {why}"));
        let (name, reference) = if let Some((n, d)) = s.split_once('@') {
            (n, d.to_string())
        } else {
            let slash = s.rfind('/').map_or(0, |i| i + 1);
            match s[slash..].rfind(':') {
                Some(c) => (&s[..slash + c], s[slash + c + 1..].to_string()),
                None => (s, "latest".to_string()),
            }
        };
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
                (first.to_string(), rest.to_string())
            }
            _ if name.contains('/') => ("docker.io".to_string(), name.to_string()),
            _ => ("docker.io".to_string(), format!("library/{name}")),
        };
        let ok_repo = !repository.is_empty()
            && repository
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b));
        if !ok_repo {
            return Err(bad("not a repository name"));
        }
        let ok_ref = !reference.is_empty()
            && reference
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b));
        if !ok_ref {
            return Err(bad("not a tag or digest"));
        }
        Ok(Reference {
            registry,
            repository,
            reference,
        })
    }

    /// `http(s)://host[:port]` of the registry API: plain HTTP on the loopback only.
    fn base(&self) -> String {
        let host = self.registry.as_str();
        let host_only = host.rsplit_once(':').map_or(host, |(h, _)| h);
        if host == "docker.io" {
            "https://registry-1.docker.io".into()
        } else if host_only == "localhost" || host_only.starts_with("127.") || host_only == "[::1]"
        {
            format!("http://{host}")
        } else {
            format!("https://{host}")
        }
    }
}

/// Standard base64 (with padding).
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn unbase64(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for b in s.bytes().filter(|&b| b != b'=' && !b.is_ascii_whitespace()) {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// `USER:PASSWORD` for `registry`: `--creds`, else the docker `config.json`.
fn credentials(registry: &str, creds: Option<&str>) -> Option<String> {
    if let Some(c) = creds {
        return Some(c.to_string());
    }
    let dir = std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".docker")))?;
    let v: Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).ok()?).ok()?;
    let auths = v["auths"].as_object()?;
    let keys = [
        registry.to_string(),
        format!("https://{registry}"),
        format!("http://{registry}"),
        if registry == "docker.io" {
            "https://index.docker.io/v1/".to_string()
        } else {
            String::new()
        },
    ];
    let entry = keys.iter().find_map(|k| auths.get(k))?;
    let auth = unbase64(entry["auth"].as_str()?)?;
    String::from_utf8(auth).ok().filter(|s| s.contains(':'))
}

/// A client for one repository of one registry, keeping its token.
struct Registry {
    client: Arc<Client>,
    base: String,
    reference: Reference,
    creds: Option<String>,
    /// The `Authorization` value that worked last.
    auth: Mutex<Option<String>>,
    /// `pull` or `pull,push`.
    actions: &'static str,
}

impl Registry {
    fn new(
        reference: Reference,
        options: &crate::io::remote::RemoteOptions,
        push: bool,
    ) -> Result<Self> {
        Ok(Registry {
            client: Arc::new(Client::new(options)?),
            base: reference.base(),
            creds: credentials(&reference.registry, options.creds.as_deref()),
            reference,
            auth: Mutex::new(None),
            actions: if push { "pull,push" } else { "pull" },
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v2/{}/{path}", self.base, self.reference.repository)
    }

    fn auth_header(&self) -> Option<(&'static str, String)> {
        let a = self.auth.lock().unwrap_or_else(|p| p.into_inner());
        a.clone().map(|v| ("Authorization", v))
    }

    /// Sends a request (with a body when `body` is given), authenticating on a 401 and
    /// trying server errors again; returns the response whatever its status.
    fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, String)],
        body: Option<(&Path, u64)>,
    ) -> Result<ureq::http::Response<ureq::Body>> {
        let mut authenticated = false;
        loop {
            let mut h: Vec<(&str, String)> = headers.to_vec();
            h.extend(self.auth_header());
            let resp = self.client.with_retries(|| {
                let resp = match body {
                    None => self.client.send(method, url, &h)?,
                    Some((path, len)) => {
                        let mut f = std::fs::File::open(path)
                            .map_err(|e| Failure::Final(Error::io(path, e)))?;
                        self.client.send_body(method, url, &h, Some(len), &mut f)?
                    }
                };
                let s = resp.status().as_u16();
                if s >= 500 || s == 429 {
                    return Err(Failure::Transient(status_error(url, resp)));
                }
                Ok(resp)
            })?;
            if resp.status().as_u16() != 401 || authenticated {
                return Ok(resp);
            }
            let challenge = crate::io::http::header(resp.headers(), "www-authenticate")
                .unwrap_or("")
                .to_string();
            self.authenticate(&challenge, url)?;
            authenticated = true;
        }
    }

    /// Answers a `WWW-Authenticate` challenge: a bearer token from the realm, or the
    /// basic credentials.
    fn authenticate(&self, challenge: &str, url: &str) -> Result<()> {
        let denied = |why: String| Error::Http {
            url: redact(url),
            status: Some(401),
            reason: why,
        };
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        let basic = self
            .creds
            .as_ref()
            .map(|c| format!("Basic {}", base64(c.as_bytes())));
        let value = if scheme.eq_ignore_ascii_case("basic") {
            basic.ok_or_else(|| {
                denied(
                    "the registry wants credentials (--creds USER:PASSWORD or docker login)".into(),
                )
            })?
        } else if scheme.eq_ignore_ascii_case("bearer") {
            let p = parse_challenge(params);
            let realm = p
                .iter()
                .find(|(k, _)| k == "realm")
                .map(|(_, v)| v.clone())
                .ok_or_else(|| denied("bearer challenge without a realm".into()))?;
            let mut query = Vec::new();
            if let Some((_, s)) = p.iter().find(|(k, _)| k == "service") {
                query.push(format!("service={}", urlencode(s)));
            }
            let scope = format!("repository:{}:{}", self.reference.repository, self.actions);
            query.push(format!("scope={}", urlencode(&scope)));
            let token_url = format!(
                "{realm}{}{}",
                if realm.contains('?') { "&" } else { "?" },
                query.join("&")
            );
            let mut h = Vec::new();
            if let Some(b) = &basic {
                h.push(("Authorization", b.clone()));
            }
            let resp = self.client.get(&token_url, &h)?;
            let bytes = resp
                .into_body()
                .with_config()
                .limit(1 << 20)
                .read_to_vec()
                .map_err(|e| denied(format!("token answer: {e}")))?;
            let v: Value = serde_json::from_slice(&bytes)
                .map_err(|e| denied(format!("token answer is not JSON: {e}")))?;
            let token = v["token"]
                .as_str()
                .or(v["access_token"].as_str())
                .ok_or_else(|| denied("token answer holds no token".into()))?;
            format!("Bearer {token}")
        } else {
            return Err(denied(format!("unknown auth scheme {scheme:?}")));
        };
        *self.auth.lock().unwrap_or_else(|p| p.into_inner()) = Some(value);
        Ok(())
    }

    /// A manifest or index by tag or digest: `(media type, bytes)`; checked against the
    /// digest when fetched by one.
    fn manifest(&self, reference: &str) -> Result<(String, Vec<u8>)> {
        let url = self.url(&format!("manifests/{reference}"));
        let accept = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST].join(", ");
        let resp = self.send("GET", &url, &[("Accept", accept)], None)?;
        if !resp.status().is_success() {
            return Err(status_error(&url, resp));
        }
        let media = crate::io::http::header(resp.headers(), "content-type")
            .unwrap_or("")
            .to_string();
        let bytes = resp
            .into_body()
            .with_config()
            .limit(MAX_MANIFEST_BYTES)
            .read_to_vec()
            .map_err(|e| Error::Http {
                url: redact(&url),
                status: None,
                reason: format!("manifest: {e}"),
            })?;
        if reference.starts_with("sha256:") {
            check_digest(&bytes, reference, "manifest")?;
        }
        Ok((media, bytes))
    }

    /// The blob `digest` as a stream, resumed if the connection drops.
    fn blob(&self, digest: &str) -> Result<ResumableBody> {
        let url = self.url(&format!("blobs/{digest}"));
        // Authenticate first (a HEAD costs nothing), then stream with the token.
        let resp = self.send("HEAD", &url, &[], None)?;
        if !resp.status().is_success() {
            return Err(status_error(&url, resp));
        }
        let headers: Vec<(&'static str, String)> = self.auth_header().into_iter().collect();
        ResumableBody::open_with(self.client.clone(), &url, headers)
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `k="v",k2="v2"` → pairs.
fn parse_challenge(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq]
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        rest = &rest[eq + 1..];
        let value;
        if let Some(r) = rest.strip_prefix('"') {
            let end = r.find('"').unwrap_or(r.len());
            value = r[..end].to_string();
            rest = r.get(end + 1..).unwrap_or("");
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_string();
            rest = &rest[end..];
        }
        out.push((key, value));
        rest = rest.trim_start_matches([',', ' ']);
    }
    out
}

fn check_digest(bytes: &[u8], digest: &str, what: &'static str) -> Result<()> {
    let got = format!("sha256:{:x}", Sha256::digest(bytes));
    if got != digest {
        return Err(Error::corrupt(
            "registry",
            what,
            0,
            format!("content has digest {got}, expected {digest}"),
        ));
    }
    Ok(())
}

/// The platform wanted: `(os, arch, variant)`.
fn wanted_platform(p: Option<&str>) -> (String, String, Option<String>) {
    let p = p.unwrap_or("linux/amd64");
    let mut it = p.split('/');
    let os = it.next().unwrap_or("linux").to_string();
    let arch = it.next().unwrap_or("amd64").to_string();
    (os, arch, it.next().map(str::to_string))
}

/// Picks the manifest for the platform from an index / manifest list.
fn pick_platform(index: &Value, platform: Option<&str>) -> Result<String> {
    let (os, arch, variant) = wanted_platform(platform);
    let list = index["manifests"]
        .as_array()
        .ok_or_else(|| Error::corrupt("registry", "image index", 0, "no manifests"))?;
    let found = list.iter().find(|m| {
        let p = &m["platform"];
        p["os"].as_str() == Some(&os)
            && p["architecture"].as_str() == Some(&arch)
            && variant
                .as_deref()
                .is_none_or(|v| p["variant"].as_str() == Some(v))
    });
    match found.and_then(|m| m["digest"].as_str()) {
        Some(d) => Ok(d.to_string()),
        None => Err(Error::Format(format!(
            "the image index has no manifest for {os}/{arch}{} (platforms: {})",
            variant.map(|v| format!("/{v}")).unwrap_or_default(),
            list.iter()
                .map(|m| format!(
                    "{}/{}",
                    m["platform"]["os"].as_str().unwrap_or("?"),
                    m["platform"]["architecture"].as_str().unwrap_or("?")
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn parse_json(bytes: &[u8], what: &'static str) -> Result<Value> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::corrupt("registry", what, 0, format!("not JSON: {e}")))
}

fn is_index(media: &str, v: &Value) -> bool {
    media.starts_with(OCI_INDEX)
        || media.starts_with(DOCKER_LIST)
        || (v.get("manifests").is_some() && v.get("layers").is_none())
}

/// The layer holding the disk: the top one. `(digest, size, media type)`.
fn disk_layer(manifest: &Value) -> Result<(String, u64, String)> {
    let layers = manifest["layers"]
        .as_array()
        .filter(|l| !l.is_empty() && l.len() <= MAX_LAYERS)
        .ok_or_else(|| Error::corrupt("registry", "manifest", 0, "no layers"))?;
    let top = &layers[layers.len() - 1];
    let digest = top["digest"]
        .as_str()
        .ok_or_else(|| Error::corrupt("registry", "manifest", 0, "layer without digest"))?;
    let size = top["size"]
        .as_u64()
        .ok_or_else(|| Error::corrupt("registry", "manifest", 0, "layer without size"))?;
    let media = top["mediaType"].as_str().unwrap_or("").to_string();
    if media.contains("encrypted") {
        return Err(Error::unsupported(
            "registry",
            format!("layers of type {media}"),
        ));
    }
    Ok((digest.to_string(), size, media))
}

/// Checks the sha256 and length of what passes through, failing at the end of the
/// stream on a mismatch (so a bad layer never completes a conversion).
struct DigestReader<R> {
    inner: R,
    hash: Sha256,
    got: u64,
    digest: String,
    size: u64,
    checked: bool,
}

impl<R: Read> Read for DigestReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.hash.update(&buf[..n]);
            self.got += n as u64;
            if self.got > self.size {
                return Err(to_io(Error::corrupt(
                    "registry",
                    "layer blob",
                    self.size,
                    format!("longer than the {} bytes its descriptor gives", self.size),
                )));
            }
        } else if !buf.is_empty() && !self.checked {
            self.checked = true;
            let got = format!("sha256:{:x}", self.hash.clone().finalize());
            if self.got != self.size || got != self.digest {
                return Err(to_io(Error::corrupt(
                    "registry",
                    "layer blob",
                    self.got,
                    format!(
                        "{} bytes with digest {got}; the manifest gives {} bytes with digest {}",
                        self.got, self.size, self.digest
                    ),
                )));
            }
        }
        Ok(n)
    }
}

/// Opens the disk in a layer stream: decompressed, the tar walked to `/disk/`.
fn open_layer_stream(
    reader: Box<dyn Read + Send>,
    shown: &str,
    options: &OpenOptions,
) -> Result<Image> {
    let img = crate::open::local::open_stream_input(reader, shown, options)?;
    check_disk_member(&img, options)?;
    Ok(img)
}

/// Without `--member`, the disk must be the file under `/disk/` (KubeVirt's
/// containerDisk convention).
fn check_disk_member(img: &Image, options: &OpenOptions) -> Result<()> {
    if options.member.is_some() {
        return Ok(());
    }
    match img.info().archive_member.as_deref() {
        Some(m)
            if m.trim_start_matches("./")
                .trim_start_matches('/')
                .starts_with("disk/") =>
        {
            Ok(())
        }
        Some(m) => Err(Error::Format(format!(
            "the image's top layer holds {m}, not a disk under /disk/ (name it with --member)"
        ))),
        None => Err(Error::Format(
            "the image's top layer is not a tar archive".into(),
        )),
    }
}

/// Opens the disk of the registry image `reference` (after `docker://`).
pub fn open_docker(reference: &str, options: &OpenOptions) -> Result<Image> {
    let r = Reference::parse(reference)?;
    let reg = Registry::new(r.clone(), &options.remote, false)?;
    let (mut media, mut bytes) = reg.manifest(&r.reference)?;
    let mut v = parse_json(&bytes, "manifest")?;
    if is_index(&media, &v) {
        let digest = pick_platform(&v, options.remote.platform.as_deref())?;
        (media, bytes) = reg.manifest(&digest)?;
        v = parse_json(&bytes, "manifest")?;
        let _ = media;
    }
    let (digest, size, _media) = disk_layer(&v)?;
    let body = reg.blob(&digest)?;
    let reader = DigestReader {
        inner: body,
        hash: Sha256::new(),
        got: 0,
        digest,
        size,
        checked: false,
    };
    let shown = format!("docker://{reference}");
    let mut img = open_layer_stream(Box::new(reader), &shown, options)?;
    img.info_mut().filename = shown;
    Ok(img)
}

/// Splits `DIR[:TAG]`.
fn split_layout(s: &str) -> (&str, Option<&str>) {
    match s.rsplit_once(':') {
        Some((d, t)) if !t.is_empty() && !t.contains('/') => (d, Some(t)),
        _ => (s, None),
    }
}

fn read_blob_json(dir: &Path, digest: &str, what: &'static str) -> Result<Value> {
    let p = blob_path(dir, digest)?;
    let meta = std::fs::metadata(&p).map_err(|e| Error::io(&p, e))?;
    if meta.len() > MAX_MANIFEST_BYTES {
        return Err(Error::TooLarge {
            format: "oci",
            structure: what,
            size: meta.len(),
            limit: MAX_MANIFEST_BYTES,
        });
    }
    let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
    check_digest(&bytes, digest, what)?;
    parse_json(&bytes, what)
}

/// Opens the disk of an OCI image layout `DIR[:TAG]` (after `oci:`).
pub fn open_oci(layout: &str, options: &OpenOptions) -> Result<Image> {
    let (dir, tag) = split_layout(layout);
    let dir = Path::new(dir);
    let index_path = dir.join("index.json");
    let bytes = std::fs::read(&index_path).map_err(|e| Error::io(&index_path, e))?;
    let index = parse_json(&bytes, "index.json")?;
    let list = index["manifests"]
        .as_array()
        .ok_or_else(|| Error::corrupt("oci", "index.json", 0, "no manifests"))?;
    let chosen = match tag {
        Some(t) => list
            .iter()
            .find(|m| m["annotations"][REF_NAME].as_str() == Some(t))
            .ok_or_else(|| Error::invalid(format!("oci:{layout}: no image tagged {t:?}")))?,
        None if list.len() == 1 => &list[0],
        None => {
            return Err(Error::invalid(format!(
                "oci:{layout}: the layout holds {} images; name one with oci:DIR:TAG",
                list.len()
            )))
        }
    };
    let mut digest = chosen["digest"].as_str().unwrap_or("").to_string();
    let mut v = read_blob_json(dir, &digest, "manifest")?;
    if is_index(chosen["mediaType"].as_str().unwrap_or(""), &v) {
        digest = pick_platform(&v, options.remote.platform.as_deref())?;
        v = read_blob_json(dir, &digest, "manifest")?;
    }
    let (layer, size, media) = disk_layer(&v)?;
    let path = blob_path(dir, &layer)?;
    let shown = format!("oci:{layout}");
    let mut img = if media == OCI_LAYER_TAR || media.ends_with(".tar") {
        // Uncompressed: checked whole, then its member read in place (no copy, even for
        // qcow2).
        let (got, len) = container_disk::sha256_file(&path)?;
        if got != layer || len != size {
            return Err(Error::corrupt(
                "registry",
                "layer blob",
                0,
                format!("{len} bytes with digest {got}; the manifest gives {size} bytes with digest {layer}"),
            ));
        }
        let storage = Arc::new(crate::io::FileStorage::open(&path)?);
        let ctx = crate::image::OpenContext::detached(&shown, options)
            .with_opener(crate::open::local::open_storage);
        let img = crate::open::local::open_tar_storage(storage, &ctx)?;
        check_disk_member(&img, options)?;
        img
    } else {
        let f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let reader = DigestReader {
            inner: f,
            hash: Sha256::new(),
            got: 0,
            digest: layer,
            size,
            checked: false,
        };
        open_layer_stream(Box::new(reader), &shown, options)?
    };
    img.info_mut().filename = shown;
    Ok(img)
}

/// Converts `src` to `opts.format` in a temporary file and returns its guard.
fn convert_to_temp(src: &Image, opts: &ConvertOptions, target: &RemoteTarget) -> Result<TempGuard> {
    super::check_single_file(opts)?;
    let tmp = super::temp_file(target.tmpdir.as_deref(), opts.format.name())?;
    let guard = TempGuard(tmp.clone());
    crate::convert::convert(src, &tmp, opts)?;
    crate::io::output::register_temporary(&tmp);
    Ok(guard)
}

/// Writes `src` as a containerDisk into the OCI layout `DIR[:TAG]` (tag default
/// `latest`). Returns the bytes of the layer.
pub fn write_oci(
    src: &Image,
    layout: &str,
    opts: &ConvertOptions,
    target: &RemoteTarget,
) -> Result<u64> {
    let (dir, tag) = split_layout(layout);
    let disk = convert_to_temp(src, opts, target)?;
    container_disk::write_layout(Path::new(dir), &disk.0, tag.unwrap_or("latest"))?;
    Ok(std::fs::metadata(&disk.0).map_or(0, |m| m.len()))
}

/// Pushes `src` as a containerDisk to `reference` (after `docker://`). Returns the
/// bytes uploaded.
pub fn push_docker(
    src: &Image,
    reference: &str,
    opts: &ConvertOptions,
    target: &RemoteTarget,
    sent: Option<Arc<SentFn>>,
) -> Result<u64> {
    let r = Reference::parse(reference)?;
    if r.reference.starts_with("sha256:") {
        return Err(Error::invalid(format!(
            "docker://{reference}: push to a tag, not a digest"
        )));
    }
    let disk = convert_to_temp(src, opts, target)?;
    let layout = super::temp_file(target.tmpdir.as_deref(), "oci")?;
    let _layout_guard = DirGuard(layout.clone());
    let manifest = container_disk::write_layout(&layout, &disk.0, "push")?;
    drop(disk);
    let reg = Registry::new(r.clone(), &target.remote, true)?;
    let m: Value = read_blob_json(&layout, &manifest.digest, "manifest")?;
    let mut blobs: Vec<(String, u64)> = vec![(
        m["config"]["digest"].as_str().unwrap_or("").to_string(),
        m["config"]["size"].as_u64().unwrap_or(0),
    )];
    for l in m["layers"].as_array().into_iter().flatten() {
        blobs.push((
            l["digest"].as_str().unwrap_or("").to_string(),
            l["size"].as_u64().unwrap_or(0),
        ));
    }
    let mut total = 0u64;
    for (digest, size) in &blobs {
        let path = blob_path(&layout, digest)?;
        let url = reg.url(&format!("blobs/{digest}"));
        if reg.send("HEAD", &url, &[], None)?.status().is_success() {
            continue;
        }
        let start = reg.url("blobs/uploads/");
        let resp = reg.send("POST", &start, &[("Content-Length", "0".into())], None)?;
        if resp.status().as_u16() != 202 {
            return Err(status_error(&start, resp));
        }
        let location = crate::io::http::header(resp.headers(), "location")
            .ok_or_else(|| Error::Http {
                url: redact(&start),
                status: Some(202),
                reason: "upload started without a Location".into(),
            })?
            .to_string();
        let location = if location.starts_with('/') {
            format!("{}{location}", reg.base)
        } else {
            location
        };
        let put = format!(
            "{location}{}digest={}",
            if location.contains('?') { "&" } else { "?" },
            urlencode(digest)
        );
        let resp = reg.send(
            "PUT",
            &put,
            &[("Content-Type", "application/octet-stream".into())],
            Some((&path, *size)),
        )?;
        if resp.status().as_u16() != 201 {
            return Err(status_error(&put, resp));
        }
        total += size;
        if let Some(s) = &sent {
            s(total);
        }
    }
    let path = blob_path(&layout, &manifest.digest)?;
    let url = reg.url(&format!("manifests/{}", r.reference));
    let resp = reg.send(
        "PUT",
        &url,
        &[("Content-Type", OCI_MANIFEST.into())],
        Some((&path, manifest.size)),
    )?;
    if resp.status().as_u16() != 201 {
        return Err(status_error(&url, resp));
    }
    Ok(total + manifest.size)
}

/// Removes a folder tree when dropped.
struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let r = Reference::parse("127.0.0.1:5000/kv/disk:v1").unwrap();
        assert_eq!(
            (
                r.registry.as_str(),
                r.repository.as_str(),
                r.reference.as_str()
            ),
            ("127.0.0.1:5000", "kv/disk", "v1")
        );
        assert_eq!(r.base(), "http://127.0.0.1:5000");
        let r = Reference::parse("quay.io/containerdisks/fedora").unwrap();
        assert_eq!(r.reference, "latest");
        assert_eq!(r.base(), "https://quay.io");
        let r = Reference::parse("alpine").unwrap();
        assert_eq!(r.repository, "library/alpine");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("localhost:5000/x@{d}")).unwrap();
        assert_eq!(r.reference, d);
        assert!(Reference::parse("quay.io/UPPER:1").is_err());
        assert_eq!(split_layout("/tmp/l:v1"), ("/tmp/l", Some("v1")));
        assert_eq!(split_layout("/tmp/l"), ("/tmp/l", None));
    }

    #[test]
    fn base64_round_trip_and_challenges() {
        for s in ["", "a", "ab", "abc", "user:pa55:word"] {
            assert_eq!(unbase64(&base64(s.as_bytes())).unwrap(), s.as_bytes());
        }
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
        let p = parse_challenge(
            r#"realm="http://127.0.0.1:1/token",service="reg",scope="repository:a/b:pull""#,
        );
        assert_eq!(p[0], ("realm".into(), "http://127.0.0.1:1/token".into()));
        assert_eq!(p[1], ("service".into(), "reg".into()));
        assert_eq!(p[2].1, "repository:a/b:pull");
    }
}
