//! HTTP(S) under the format readers (feature `http`): a blocking client with retries
//! ([`Client`]), a random-access [`HttpStorage`] on range requests, a resumable body
//! stream ([`ResumableBody`]) for compressed downloads and servers without ranges, and
//! uploads with `PUT` ([`upload`]).
//!
//! Client choice: `ureq` 3 — blocking (no async runtime in the library), TLS by
//! rustls (no OpenSSL to link), proxies from `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY`
//! with `NO_PROXY`, a connection pool shared by threads. Its gzip support is left out:
//! bytes arrive as stored, which range requests need.
//!
//! Every failure is an [`Error::Http`] naming the URL without credentials or query
//! string; request headers and credentials are never printed.

pub mod body;
pub mod storage;
pub mod upload;

pub use body::ResumableBody;
pub use storage::HttpStorage;

use std::path::Path;
use std::time::Duration;

use ureq::http::{HeaderMap, Response};
use ureq::Body;

use crate::error::{Error, Result};
use crate::io::remote::{redact, RemoteOptions};

/// Opens `url` as random-access storage (a file an image refers to: a backing file, an
/// extent); a server without range support is refused here.
pub fn open_storage(
    url: &str,
    options: &RemoteOptions,
) -> Result<std::sync::Arc<dyn crate::io::Storage>> {
    let client = std::sync::Arc::new(Client::new(options)?);
    match HttpStorage::probe(client, url)? {
        storage::Probe::Ranged(s) => Ok(std::sync::Arc::new(s)),
        storage::Probe::Whole(_) => Err(Error::Http {
            url: redact(url),
            status: Some(200),
            reason: "the server does not answer range requests, which a referenced file needs"
                .into(),
        }),
    }
}

/// The longest pause between two tries.
const MAX_PAUSE: Duration = Duration::from_secs(8);

/// Where the system keeps its CA bundle (Debian, Fedora, Alpine/macOS-style).
const SYSTEM_CA_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// What identifies one version of a remote object: a later request that sees another
/// validator is reading a changed object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validator {
    /// The `ETag` header.
    pub etag: Option<String>,
    /// The `Last-Modified` header.
    pub last_modified: Option<String>,
}

impl Validator {
    /// The validator of a response.
    pub fn of(headers: &HeaderMap) -> Self {
        Validator {
            etag: header(headers, "etag").map(str::to_string),
            last_modified: header(headers, "last-modified").map(str::to_string),
        }
    }

    /// True when there is something to compare.
    pub fn is_some(&self) -> bool {
        self.etag.is_some() || self.last_modified.is_some()
    }

    /// The precondition that makes the server refuse (412) a changed object: `If-Match`
    /// for a strong ETag, else `If-Unmodified-Since`.
    pub fn precondition(&self) -> Option<(&'static str, String)> {
        match (&self.etag, &self.last_modified) {
            (Some(e), _) if !e.starts_with("W/") => Some(("If-Match", e.clone())),
            (_, Some(m)) => Some(("If-Unmodified-Since", m.clone())),
            _ => None,
        }
    }

    /// Checks a later response against this one.
    pub fn check(&self, headers: &HeaderMap, url: &str) -> Result<()> {
        let now = Validator::of(headers);
        let changed = (self.etag.is_some() && now.etag.is_some() && self.etag != now.etag)
            || (self.last_modified.is_some()
                && now.last_modified.is_some()
                && self.last_modified != now.last_modified);
        if changed {
            return Err(changed_error(url));
        }
        Ok(())
    }
}

/// The error for an object that changed between two requests.
pub fn changed_error(url: &str) -> Error {
    Error::Http {
        url: redact(url),
        status: None,
        reason: "the object changed on the server while it was being read (ETag or \
                 Last-Modified differ); nothing was spliced"
            .into(),
    }
}

/// A header's value as text.
pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// One failed try: to be repeated (server error, dropped connection, timeout), or final.
#[derive(Debug)]
pub enum Failure {
    /// Worth another try after a pause.
    Transient(Error),
    /// Not worth another try.
    Final(Error),
}

impl Failure {
    fn into_error(self) -> Error {
        match self {
            Failure::Transient(e) | Failure::Final(e) => e,
        }
    }
}

/// A blocking HTTP client with the user's headers, TLS roots, timeouts and retry policy.
pub struct Client {
    agent: ureq::Agent,
    options: RemoteOptions,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("options", &self.options)
            .finish()
    }
}

impl Client {
    /// A client for `options`: the system's CA bundle plus `--ca-cert`, proxies from
    /// the environment.
    pub fn new(options: &RemoteOptions) -> Result<Self> {
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(root_certs(options.ca_cert.as_deref())?)
            .build();
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(options.max_redirects)
            .max_redirects_will_error(true)
            .timeout_connect(Some(options.timeout))
            .timeout_per_read(Some(options.timeout))
            .timeout_per_write(Some(options.timeout))
            .timeout_recv_response(Some(options.timeout))
            .max_idle_connections(storage::MAX_CONNECTIONS * 2)
            .max_idle_connections_per_host(storage::MAX_CONNECTIONS)
            .user_agent(concat!("imgconv/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls)
            .build();
        Ok(Client {
            agent: config.new_agent(),
            options: options.clone(),
        })
    }

    /// The options the client was made with.
    pub fn options(&self) -> &RemoteOptions {
        &self.options
    }

    /// Sends one request (`method` with `headers`, the user's headers added) without a
    /// body; statuses are not errors here.
    pub fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, String)],
    ) -> std::result::Result<Response<Body>, Failure> {
        let mut req = ureq::http::Request::builder().method(method).uri(url);
        for (k, v) in &self.options.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        for (k, v) in headers {
            req = req.header(*k, v.as_str());
        }
        let req = req.body(()).map_err(|e| {
            Failure::Final(Error::Http {
                url: redact(url),
                status: None,
                reason: format!("bad request: {e}"),
            })
        })?;
        self.agent.run(req).map_err(|e| transport_failure(url, e))
    }

    /// Sends a request with a body read from `body` (`Content-Length` when `len` is
    /// given, else chunked).
    pub fn send_body(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, String)],
        len: Option<u64>,
        body: &mut dyn std::io::Read,
    ) -> std::result::Result<Response<Body>, Failure> {
        let mut req = ureq::http::Request::builder().method(method).uri(url);
        for (k, v) in &self.options.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        for (k, v) in headers {
            req = req.header(*k, v.as_str());
        }
        if let Some(n) = len {
            req = req.header("Content-Length", n.to_string());
        }
        // The server answers a refusal (413, 401, 403…) before the body is sent, so
        // the user sees its status rather than a broken connection.
        req = req.header("Expect", "100-continue");
        let req = req.body(ureq::SendBody::from_reader(body)).map_err(|e| {
            Failure::Final(Error::Http {
                url: redact(url),
                status: None,
                reason: format!("bad request: {e}"),
            })
        })?;
        self.agent.run(req).map_err(|e| transport_failure(url, e))
    }

    /// Runs `attempt` until it succeeds, fails for good, or the tries run out (with a
    /// pause doubling from `retry_pause`, at most 8 s).
    pub fn with_retries<T>(
        &self,
        mut attempt: impl FnMut() -> std::result::Result<T, Failure>,
    ) -> Result<T> {
        let mut pause = self.options.retry_pause;
        let mut tries_left = self.options.retries;
        loop {
            match attempt() {
                Ok(v) => return Ok(v),
                Err(Failure::Transient(e)) if tries_left > 0 => {
                    let _ = e;
                    tries_left -= 1;
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(MAX_PAUSE);
                }
                Err(f) => return Err(f.into_error()),
            }
        }
    }

    /// `GET url` with `headers`, tried again on server errors and dropped connections.
    /// 2xx comes back; any other status is an [`Error::Http`] naming it (4xx at once,
    /// 5xx when the tries have run out).
    pub fn get(&self, url: &str, headers: &[(&str, String)]) -> Result<Response<Body>> {
        self.with_retries(|| {
            let resp = self.send("GET", url, headers)?;
            status_failure(url, resp)
        })
    }
}

/// Passes a 2xx response; makes any other status a [`Failure`] (5xx, 408 and 429
/// transient).
pub fn status_failure(
    url: &str,
    resp: Response<Body>,
) -> std::result::Result<Response<Body>, Failure> {
    let status = resp.status().as_u16();
    if (200..300).contains(&status) {
        return Ok(resp);
    }
    let e = status_error(url, resp);
    if status >= 500 || status == 408 || status == 429 {
        Err(Failure::Transient(e))
    } else {
        Err(Failure::Final(e))
    }
}

/// The error for a response with status `resp.status()`: the reason phrase, and the
/// first line of a short text body (registries explain there).
pub fn status_error(url: &str, resp: Response<Body>) -> Error {
    let status = resp.status();
    let mut reason = status.canonical_reason().unwrap_or("").to_string();
    let mut body = resp.into_body();
    if let Ok(text) = body.with_config().limit(4096).read_to_string() {
        let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        let line: String = line.chars().filter(|c| !c.is_control()).take(200).collect();
        if !line.is_empty() && !line.starts_with('<') {
            reason = format!("{reason} ({})", line.trim());
        }
    }
    Error::Http {
        url: redact(url),
        status: Some(status.as_u16()),
        reason,
    }
}

fn transport_failure(url: &str, e: ureq::Error) -> Failure {
    use ureq::Error as E;
    let transient = matches!(
        e,
        E::Io(_) | E::Timeout(_) | E::ConnectionFailed | E::Protocol(_) | E::BodyStalled
    );
    let reason = match &e {
        E::TooManyRedirects => "too many redirects (a redirect loop?)".to_string(),
        E::HostNotFound => "host not found".to_string(),
        E::ConnectionFailed => "connection failed".to_string(),
        other => other.to_string(),
    };
    let err = Error::Http {
        url: redact(url),
        status: None,
        reason,
    };
    if transient {
        Failure::Transient(err)
    } else {
        Failure::Final(err)
    }
}

/// The roots TLS trusts: the system's CA bundle (`$SSL_CERT_FILE`, else the usual
/// places) plus `extra`; the bundled Mozilla roots where the system has none.
fn root_certs(extra: Option<&Path>) -> Result<ureq::tls::RootCerts> {
    let mut certs = Vec::new();
    let env = std::env::var_os("SSL_CERT_FILE").map(std::path::PathBuf::from);
    let system = env
        .into_iter()
        .chain(SYSTEM_CA_BUNDLES.iter().map(std::path::PathBuf::from))
        .find(|p| p.is_file());
    if let Some(p) = &system {
        // An unreadable system bundle is not the user's fault: fall back below.
        if let Ok(pem) = std::fs::read(p) {
            certs.extend(pem_certs(&pem));
        }
    }
    if let Some(p) = extra {
        let pem = std::fs::read(p).map_err(|e| Error::io(p, e))?;
        let found = pem_certs(&pem);
        if found.is_empty() {
            return Err(Error::invalid(format!(
                "{}: no PEM certificate found (--ca-cert)",
                p.display()
            )));
        }
        certs.extend(found);
    }
    if certs.is_empty() {
        return Ok(ureq::tls::RootCerts::WebPki);
    }
    Ok(ureq::tls::RootCerts::new_with_certs(&certs))
}

fn pem_certs(pem: &[u8]) -> Vec<ureq::tls::Certificate<'static>> {
    ureq::tls::parse_pem(pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect()
}

/// Parses `Content-Range: bytes START-END/TOTAL` (TOTAL may be `*`).
pub fn content_range(headers: &HeaderMap) -> Option<(u64, u64, Option<u64>)> {
    let v = header(headers, "content-range")?.trim();
    let rest = v.strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    let (a, b) = range.split_once('-')?;
    let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a <= b).then_some((a, b, total))
}

/// Parses `Content-Length`.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    header(headers, "content-length")?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_range() {
        let mut h = HeaderMap::new();
        h.insert("content-range", "bytes 0-99/1000".parse().unwrap());
        assert_eq!(content_range(&h), Some((0, 99, Some(1000))));
        h.insert("content-range", "bytes 5-4/1000".parse().unwrap());
        assert_eq!(content_range(&h), None);
        h.insert("content-range", "bytes 0-9/*".parse().unwrap());
        assert_eq!(content_range(&h), Some((0, 9, None)));
    }

    #[test]
    fn validator_preconditions() {
        let v = Validator {
            etag: Some("\"abc\"".into()),
            last_modified: Some("Mon".into()),
        };
        assert_eq!(v.precondition().unwrap().0, "If-Match");
        let w = Validator {
            etag: Some("W/\"abc\"".into()),
            last_modified: Some("Mon".into()),
        };
        assert_eq!(w.precondition().unwrap().0, "If-Unmodified-Since");
        let mut h = HeaderMap::new();
        h.insert("etag", "\"abd\"".parse().unwrap());
        assert!(v.check(&h, "http://x/").is_err());
        h.insert("etag", "\"abc\"".parse().unwrap());
        assert!(v.check(&h, "http://x/").is_ok());
    }
}
