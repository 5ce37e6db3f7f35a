//! A remote file read with range requests: the same positional-read [`Storage`] the
//! format readers use for a local file.
//!
//! Format readers read metadata in small pieces (a header, an L1 table, one L2 table at
//! a time); each small read would be a round trip. Reads below [`BLOCK`] therefore go
//! through a small cache of aligned blocks ([`CACHE_BLOCKS`] × [`BLOCK`], least
//! recently used out), so neighbouring metadata costs one request. Larger reads — the
//! engine's data units — are fetched directly, in one request each, and bypass the
//! cache. At most [`MAX_CONNECTIONS`] requests run at once (the engine's workers share
//! them), which also bounds the connection pool.
//!
//! Every range response is checked: status 206, the `Content-Range` asked for, the
//! total length and validator (ETag / Last-Modified) of the first response, and a body
//! of exactly the length asked for. Requests carry `If-Match` (or
//! `If-Unmodified-Since`), so a server whose object changed answers 412: a changed
//! object is an error, never a spliced image.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::{changed_error, content_range, status_error, Client, Failure, Validator};
use crate::error::{Error, Result};
use crate::io::compressed::to_io;
use crate::io::remote::redact;
use crate::io::Storage;

/// Size of a cached block, and the smallest read that bypasses the cache.
pub const BLOCK: u64 = 256 << 10;
/// Blocks kept (8 MiB).
pub const CACHE_BLOCKS: usize = 32;
/// Requests in flight at once, per storage.
pub const MAX_CONNECTIONS: usize = 8;

/// A counting semaphore: at most `n` holders.
struct Slots {
    free: Mutex<usize>,
    cv: Condvar,
}

impl Slots {
    fn new(n: usize) -> Self {
        Slots {
            free: Mutex::new(n),
            cv: Condvar::new(),
        }
    }

    fn acquire(&self) -> SlotGuard<'_> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            free = self.cv.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= 1;
        SlotGuard(self)
    }
}

struct SlotGuard<'a>(&'a Slots);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let mut free = self.0.free.lock().unwrap_or_else(|p| p.into_inner());
        *free += 1;
        self.0.cv.notify_one();
    }
}

/// A remote file, read with range requests.
pub struct HttpStorage {
    client: Arc<Client>,
    url: String,
    len: u64,
    validator: Validator,
    /// Cached blocks (index, bytes), most recently used at the back.
    cache: Mutex<VecDeque<(u64, Arc<Vec<u8>>)>>,
    slots: Slots,
    /// Body bytes received so far (requests × their lengths).
    received: AtomicU64,
    requests: AtomicU64,
}

impl std::fmt::Debug for HttpStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpStorage")
            .field("url", &redact(&self.url))
            .field("len", &self.len)
            .finish()
    }
}

/// What the first request learned about a URL.
pub enum Probe {
    /// The server answers range requests: random access.
    Ranged(HttpStorage),
    /// The server sends the whole object (no ranges): read it as a stream.
    Whole(super::ResumableBody),
}

impl HttpStorage {
    /// Asks for the first block of `url`: a server that answers with a range becomes an
    /// [`HttpStorage`] (that block already cached), one that sends the whole object a
    /// stream.
    pub fn probe(client: Arc<Client>, url: &str) -> Result<Probe> {
        enum First {
            Ranged(u64, Validator, Vec<u8>),
            Whole(ureq::http::Response<ureq::Body>),
        }
        let bad = |why: &str| {
            Failure::Final(Error::Http {
                url: redact(url),
                status: Some(206),
                reason: format!("bad range response: {why}"),
            })
        };
        let range = ("Range", format!("bytes=0-{}", BLOCK - 1));
        let first = client.with_retries(|| {
            let resp = client.send("GET", url, std::slice::from_ref(&range))?;
            let validator = Validator::of(resp.headers());
            match resp.status().as_u16() {
                // Nothing to give from byte 0: an empty object.
                416 => return Ok(First::Ranged(0, validator, Vec::new())),
                206 => {}
                _ => return super::status_failure(url, resp).map(First::Whole),
            }
            let (start, end, total) =
                content_range(resp.headers()).ok_or_else(|| bad("no usable Content-Range"))?;
            let Some(total) = total else {
                return Err(bad("the total length is not given (Content-Range …/*)"));
            };
            if start != 0 || end >= total || end >= BLOCK {
                return Err(bad("Content-Range does not match the range asked for"));
            }
            let mut first = vec![0u8; (end + 1) as usize];
            // A body cut short is tried again.
            read_body(resp, &mut first, url).map_err(Failure::Transient)?;
            Ok(First::Ranged(total, validator, first))
        })?;
        match first {
            First::Whole(resp) => Ok(Probe::Whole(super::ResumableBody::from_response(
                client, url, resp,
            )?)),
            First::Ranged(total, validator, first) => {
                let storage = Self::new(client, url, total, validator);
                if !first.is_empty() {
                    storage.note(first.len() as u64);
                    storage.insert(0, Arc::new(first));
                }
                Ok(Probe::Ranged(storage))
            }
        }
    }

    fn new(client: Arc<Client>, url: &str, len: u64, validator: Validator) -> Self {
        HttpStorage {
            client,
            url: url.to_string(),
            len,
            validator,
            cache: Mutex::new(VecDeque::with_capacity(CACHE_BLOCKS)),
            slots: Slots::new(MAX_CONNECTIONS),
            received: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        }
    }

    /// The URL (with any credentials: do not print it; see [`redact`]).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The client this storage fetches with.
    pub fn client(&self) -> &Arc<Client> {
        &self.client
    }

    /// The validator of the object being read.
    pub fn validator(&self) -> &Validator {
        &self.validator
    }

    /// Body bytes received and requests made so far.
    pub fn transferred(&self) -> (u64, u64) {
        (
            self.received.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
        )
    }

    fn note(&self, bytes: u64) {
        self.received.fetch_add(bytes, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    fn cached(&self, index: u64) -> Option<Arc<Vec<u8>>> {
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let i = c.iter().position(|(k, _)| *k == index)?;
        let hit = c.remove(i)?;
        let bytes = hit.1.clone();
        c.push_back(hit);
        Some(bytes)
    }

    fn insert(&self, index: u64, bytes: Arc<Vec<u8>>) {
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if c.iter().any(|(k, _)| *k == index) {
            return;
        }
        if c.len() >= CACHE_BLOCKS {
            c.pop_front();
        }
        c.push_back((index, bytes));
    }

    fn block(&self, index: u64) -> Result<Arc<Vec<u8>>> {
        if let Some(b) = self.cached(index) {
            return Ok(b);
        }
        let start = index * BLOCK;
        let len = BLOCK.min(self.len - start) as usize;
        let mut buf = vec![0u8; len];
        self.fetch(&mut buf, start)?;
        let b = Arc::new(buf);
        self.insert(index, b.clone());
        Ok(b)
    }

    /// One range request for `buf.len()` bytes at `offset`, checked, with retries.
    fn fetch(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let _slot = self.slots.acquire();
        let last = offset + buf.len() as u64 - 1;
        let mut headers = vec![("Range", format!("bytes={offset}-{last}"))];
        headers.extend(self.validator.precondition());
        let url = self.url.as_str();
        self.client.with_retries(|| {
            let resp = self.client.send("GET", url, &headers)?;
            match resp.status().as_u16() {
                206 => {}
                412 => return Err(Failure::Final(changed_error(url))),
                200 => {
                    return Err(Failure::Final(Error::Http {
                        url: redact(url),
                        status: Some(200),
                        reason: "the server sent the whole object to a range request \
                                 (it answered ranges before)"
                            .into(),
                    }))
                }
                s if s >= 500 || s == 408 || s == 429 => {
                    return Err(Failure::Transient(status_error(url, resp)))
                }
                _ => return Err(Failure::Final(status_error(url, resp))),
            }
            self.validator
                .check(resp.headers(), url)
                .map_err(Failure::Final)?;
            match content_range(resp.headers()) {
                Some((a, b, Some(t))) if a == offset && b == last && t == self.len => {}
                Some((_, _, t)) if t.is_some_and(|t| t != self.len) => {
                    return Err(Failure::Final(changed_error(url)))
                }
                _ => {
                    return Err(Failure::Final(Error::Http {
                        url: redact(url),
                        status: Some(206),
                        reason: format!(
                            "Content-Range does not match the bytes {offset}-{last} asked for"
                        ),
                    }))
                }
            }
            // A body cut short (a dropped connection, a lying Content-Length) is tried
            // again.
            read_body(resp, buf, url).map_err(Failure::Transient)?;
            self.note(buf.len() as u64);
            Ok(())
        })
    }
}

/// Reads exactly `buf.len()` bytes of a response body, and checks that it ends there.
fn read_body(resp: ureq::http::Response<ureq::Body>, buf: &mut [u8], url: &str) -> Result<()> {
    let mut r = resp.into_body().into_reader();
    let want = buf.len();
    let short = |got: usize, e: String| Error::Http {
        url: redact(url),
        status: None,
        reason: format!("the body ended after {got} of {want} bytes ({e})"),
    };
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => return Err(short(got, "connection closed".into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(short(got, e.to_string())),
        }
    }
    let mut extra = [0u8; 1];
    if matches!(r.read(&mut extra), Ok(n) if n > 0) {
        return Err(Error::Http {
            url: redact(url),
            status: None,
            reason: format!("the body holds more than the {} bytes asked for", buf.len()),
        });
    }
    Ok(())
}

impl Storage for HttpStorage {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = crate::io::read_end(offset, buf.len(), self.len, "remote file")?;
        if buf.is_empty() {
            return Ok(());
        }
        if buf.len() as u64 >= BLOCK {
            return self.fetch(buf, offset).map_err(to_io);
        }
        let mut pos = offset;
        while pos < end {
            let index = pos / BLOCK;
            let block = self.block(index).map_err(to_io)?;
            let from = (pos - index * BLOCK) as usize;
            let n = (block.len() - from).min((end - pos) as usize);
            let at = (pos - offset) as usize;
            buf[at..at + n].copy_from_slice(&block[from..from + n]);
            pos += n as u64;
        }
        Ok(())
    }
}
