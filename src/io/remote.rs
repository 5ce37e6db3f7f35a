//! Where an image lives when it is not a local file: the names that mean a remote
//! source or target (`http://`, `https://`, `docker://`, `oci:`), and the options for
//! reaching it. Plain data, compiled with or without the `http` feature, so that
//! [`crate::OpenOptions`] has the same shape either way; the client itself is in
//! `io::http` (feature `http`).

use std::path::PathBuf;
use std::time::Duration;

/// What kind of remote location a name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location<'a> {
    /// `http://…` or `https://…`: a file on a web server (range requests where the
    /// server supports them).
    Http(&'a str),
    /// `docker://REGISTRY/REPO:TAG` or `docker://REGISTRY/REPO@sha256:…`: an image in a
    /// container registry (the part after `docker://`).
    Docker(&'a str),
    /// `oci:DIR[:TAG]`: an OCI image layout on disk (the part after `oci:`).
    Oci(&'a str),
}

/// Classifies `name`: `Some` for the remote schemes, `None` for a local path.
pub fn classify(name: &str) -> Option<Location<'_>> {
    let lower = name.get(..8).unwrap_or(name).to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        Some(Location::Http(name))
    } else if lower.starts_with("docker:/") {
        Some(Location::Docker(name[7..].trim_start_matches('/')))
    } else {
        name.strip_prefix("oci:").map(Location::Oci)
    }
}

/// `url` as it may be printed: without `user:password@` and without the query string
/// (signed URLs carry their credentials there).
pub fn redact(url: &str) -> String {
    let (base, had_query) = match url.find(['?', '#']) {
        Some(i) => (&url[..i], url[i..].starts_with('?')),
        None => (url, false),
    };
    let redacted = match base.find("://") {
        Some(i) => {
            let rest = &base[i + 3..];
            let auth_end = rest.find('/').unwrap_or(rest.len());
            match rest[..auth_end].rfind('@') {
                Some(at) => format!("{}://{}", &base[..i], &rest[at + 1..]),
                None => base.to_string(),
            }
        }
        None => base.to_string(),
    };
    if had_query {
        redacted + "?…"
    } else {
        redacted
    }
}

/// `scheme://host[:port]` of `url` (lower-cased), or `None` if it has none.
pub fn origin(url: &str) -> Option<String> {
    let i = url.find("://")?;
    let host = &url[i + 3..authority_end(url)?];
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    Some(format!("{}://{}", &url[..i], host).to_ascii_lowercase())
}

/// Where the `scheme://user@host:port` part of `url` ends.
fn authority_end(url: &str) -> Option<usize> {
    let i = url.find("://")? + 3;
    Some(i + url[i..].find(['/', '?', '#']).unwrap_or(url.len() - i))
}

/// Resolves a reference written in a remote image (a backing file, an extent) against
/// the image's URL `base`: a relative name against its folder, an absolute path
/// against its origin, a URL only if it has the same origin (scheme, host and port).
pub fn resolve_url(base: &str, name: &str) -> Result<String, String> {
    let own = origin(base).ok_or_else(|| "the image's URL has no origin".to_string())?;
    if name.contains("://") {
        return match origin(name) {
            Some(o) if o == own => Ok(name.to_string()),
            _ => Err(format!(
                "a reference to another origin than {} is not followed",
                redact(&own)
            )),
        };
    }
    if name.contains(['\\', '\0']) || name.chars().any(char::is_control) {
        return Err("not a usable name".into());
    }
    let path_start = authority_end(base).unwrap_or(base.len());
    let base_path = base.get(path_start..).unwrap_or("");
    let base_path = &base_path[..base_path.find(['?', '#']).unwrap_or(base_path.len())];
    let joined = if let Some(abs) = name.strip_prefix('/') {
        format!("/{abs}")
    } else {
        let dir = &base_path[..base_path.rfind('/').map_or(0, |i| i + 1)];
        let dir = if dir.is_empty() { "/" } else { dir };
        format!("{dir}{name}")
    };
    Ok(format!("{}{joined}", &base[..path_start]))
}

/// How to reach remote sources and targets: extra headers, TLS roots, credentials,
/// timeouts, and for registries the platform. `Debug` never shows header values or
/// credentials.
#[derive(Clone)]
pub struct RemoteOptions {
    /// Extra request headers, e.g. `("X-Auth-Token", "…")` (`--header`).
    pub headers: Vec<(String, String)>,
    /// A PEM file of CA certificates trusted in addition to the system's (`--ca-cert`).
    pub ca_cert: Option<PathBuf>,
    /// Registry credentials `USER:PASSWORD` (`--creds`); without them, the docker
    /// `config.json` is looked at, then anonymous access is tried.
    pub creds: Option<String>,
    /// The platform to pick from a registry's image index, `OS/ARCH[/VARIANT]`
    /// (`--platform`); default `linux/amd64`.
    pub platform: Option<String>,
    /// Time to connect, and to wait for each read (`--timeout`).
    pub timeout: Duration,
    /// How often a failed request (5xx, dropped connection, timeout) is tried again,
    /// with a growing pause in between; and how often a body is resumed.
    pub retries: u32,
    /// The first pause between tries; it doubles each time (at most 8 s).
    pub retry_pause: Duration,
    /// Redirects followed per request.
    pub max_redirects: u32,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            headers: Vec::new(),
            ca_cert: None,
            creds: None,
            platform: None,
            timeout: Duration::from_secs(30),
            retries: 5,
            retry_pause: Duration::from_millis(250),
            max_redirects: 10,
        }
    }
}

impl std::fmt::Debug for RemoteOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteOptions")
            .field(
                "headers",
                &self.headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("ca_cert", &self.ca_cert)
            .field("creds", &self.creds.as_ref().map(|_| "(set)"))
            .field("platform", &self.platform)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .finish()
    }
}

impl RemoteOptions {
    /// Adds a header given as `Name: value` (`--header`).
    pub fn header(&mut self, line: &str) -> crate::Result<()> {
        let (k, v) = line.split_once(':').ok_or_else(|| {
            crate::Error::invalid(format!(
                "--header wants 'Name: value', got a line without ':' ({} bytes)",
                line.len()
            ))
        })?;
        let k = k.trim();
        if k.is_empty()
            || !k
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
        {
            return Err(crate::Error::invalid(format!(
                "--header: {k:?} is not a header name"
            )));
        }
        self.headers.push((k.to_string(), v.trim().to_string()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_and_redacts() {
        assert_eq!(
            classify("https://h/x.qcow2"),
            Some(Location::Http("https://h/x.qcow2"))
        );
        assert_eq!(classify("HTTP://h/x"), Some(Location::Http("HTTP://h/x")));
        assert_eq!(
            classify("docker://quay.io/a/b:1"),
            Some(Location::Docker("quay.io/a/b:1"))
        );
        assert_eq!(classify("oci:/tmp/l:t"), Some(Location::Oci("/tmp/l:t")));
        assert_eq!(classify("disk.qcow2"), None);
        assert_eq!(classify("./http:/x"), None);
        assert_eq!(redact("https://u:p@h:8/a/b?X-Sig=s#f"), "https://h:8/a/b?…");
        assert_eq!(redact("http://h/a@b"), "http://h/a@b");
        let mut o = RemoteOptions::default();
        o.header("X-Auth-Token: secret").unwrap();
        assert!(!format!("{o:?}").contains("secret"));
        assert!(o.header("nocolon").is_err());
        let b = "http://u@H:8/img/a.qcow2?x=1";
        assert_eq!(origin(b).unwrap(), "http://h:8");
        assert_eq!(
            resolve_url(b, "base.raw").unwrap(),
            "http://u@H:8/img/base.raw"
        );
        assert_eq!(resolve_url(b, "/x/b.raw").unwrap(), "http://u@H:8/x/b.raw");
        assert_eq!(
            resolve_url(b, "http://h:8/other.raw").unwrap(),
            "http://h:8/other.raw"
        );
        assert!(resolve_url(b, "http://evil:8/x").is_err());
        assert!(resolve_url(b, "https://h:8/x").is_err());
    }
}
